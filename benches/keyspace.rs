//! Timings of the CRDT keyspace next to an automerge document doing the same work (a root map of
//! key → 100-byte value, one committed change per write). Memory and sizes: `benches/footprint.rs`.
//!
//! `cargo bench --bench keyspace` (pass a filter, e.g. `-- put/`, to run a subset; set
//! `MANTISSA_BENCH_SLOW=1` to include automerge applying 10,000 changes one by one, ~5 minutes).
//! Set `MANTISSA_BENCH_CLOCK=cpu` to measure this thread's CPU time instead of wall-clock time,
//! which keeps other processes on a busy machine out of the figures.
//! Results and the targets they are checked against: `docs/benchmarks.md`.

mod common;
#[path = "common/process.rs"]
mod process;

use std::cell::{OnceCell, RefCell};
use std::collections::BTreeMap;
use std::hint::black_box;
use std::time::{Duration, Instant};

use automerge::transaction::Transactable;
use automerge::{AutoCommit, Change, ChangeHash, ROOT, ReadDoc, ScalarValue};
use common::*;
use criterion::measurement::{Measurement, ValueFormatter};
use criterion::{BatchSize, Criterion, SamplingMode, Throughput};
use mantissa::crdt::{Delta, Key, NodeId, Replica, ReplicaConfig, VersionVector};
use process::thread_cpu_time;

/// Keys in the replica the point operations run against.
const KEYS: usize = 100_000;
/// Keys the peer of the `delta_since` benchmark lacks (1%).
const LACKING: usize = KEYS / 100;
/// Keys in the replica that is snapshotted and restored.
const SNAPSHOT_KEYS: usize = 1_000_000;
/// A benchmark that adds keys starts over from the 100k-key state once it has added this many, so
/// it always runs against 100k–200k keys.
const REGROW: u64 = 100_000;

// ---- the clock ----

/// Wall-clock time (criterion's default), or with `cpu` this thread's CPU time.
#[derive(Clone, Copy)]
struct Clock {
    cpu: bool,
}

impl Clock {
    fn from_env() -> Self {
        Clock {
            cpu: std::env::var("MANTISSA_BENCH_CLOCK").is_ok_and(|clock| clock == "cpu"),
        }
    }

    /// Time since an arbitrary, fixed origin.
    fn now(self) -> Duration {
        if self.cpu {
            thread_cpu_time()
        } else {
            static ORIGIN: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
            ORIGIN.get_or_init(Instant::now).elapsed()
        }
    }
}

impl Measurement for Clock {
    type Intermediate = Duration;
    type Value = Duration;

    fn start(&self) -> Duration {
        self.now()
    }
    fn end(&self, start: Duration) -> Duration {
        self.now() - start
    }
    fn add(&self, a: &Duration, b: &Duration) -> Duration {
        *a + *b
    }
    fn zero(&self) -> Duration {
        Duration::ZERO
    }
    fn to_f64(&self, value: &Duration) -> f64 {
        value.as_nanos() as f64
    }
    fn formatter(&self) -> &dyn ValueFormatter {
        &Nanoseconds
    }
}

/// Formats nanoseconds as criterion's wall-clock measurement does.
struct Nanoseconds;

impl ValueFormatter for Nanoseconds {
    fn scale_values(&self, ns: f64, values: &mut [f64]) -> &'static str {
        let (factor, unit) = match ns {
            ns if ns < 1e3 => (1.0, "ns"),
            ns if ns < 1e6 => (1e-3, "µs"),
            ns if ns < 1e9 => (1e-6, "ms"),
            _ => (1e-9, "s"),
        };
        values.iter_mut().for_each(|value| *value *= factor);
        unit
    }

    fn scale_throughputs(
        &self,
        typical: f64,
        throughput: &Throughput,
        values: &mut [f64],
    ) -> &'static str {
        let elements = match *throughput {
            Throughput::Elements(elements) => elements as f64,
            _ => 1.0,
        };
        let per_second = elements * 1e9 / typical;
        let (denominator, unit) = match per_second {
            rate if rate < 1e3 => (1.0, "elem/s"),
            rate if rate < 1e6 => (1e3, "Kelem/s"),
            rate if rate < 1e9 => (1e6, "Melem/s"),
            _ => (1e9, "Gelem/s"),
        };
        values
            .iter_mut()
            .for_each(|value| *value = elements * 1e9 / *value / denominator);
        unit
    }

    fn scale_for_machines(&self, _values: &mut [f64]) -> &'static str {
        "ns"
    }
}

type Bench = Criterion<Clock>;

/// Fixtures, each built on first use (so a filtered run builds only what it needs).
#[derive(Default)]
struct Fixtures {
    ours: OnceCell<Ours>,
    theirs: OnceCell<Theirs>,
    million: OnceCell<(Replica, Vec<u8>)>,
}

/// A replica holding base keys `0..KEYS`; its peer has applied all but the last 1% of them.
struct Ours {
    replica: Replica,
    snapshot: Vec<u8>,
    peer_version: VersionVector,
}

/// The same for automerge.
struct Theirs {
    doc: AutoCommit,
    peer_heads: Vec<ChangeHash>,
}

impl Fixtures {
    fn ours(&self) -> &Ours {
        self.ours.get_or_init(|| {
            let mut replica = replica_with(KEYS - LACKING, 1);
            let peer_version = replica.version().clone();
            puts(&mut replica, KEYS - LACKING..KEYS);
            let snapshot = replica.snapshot();
            Ours {
                replica,
                snapshot,
                peer_version,
            }
        })
    }

    fn theirs(&self) -> &Theirs {
        self.theirs.get_or_init(|| {
            let mut doc = automerge_with(KEYS - LACKING);
            let peer_heads = doc.get_heads();
            automerge_puts(&mut doc, KEYS - LACKING..KEYS);
            Theirs { doc, peer_heads }
        })
    }

    fn million(&self) -> &(Replica, Vec<u8>) {
        self.million.get_or_init(|| {
            let replica = replica_with(SNAPSHOT_KEYS, 1);
            let snapshot = replica.snapshot();
            (replica, snapshot)
        })
    }
}

fn restore(snapshot: &[u8]) -> Replica {
    Replica::restore(snapshot, ReplicaConfig::default()).expect("restore")
}

/// Runs `iters` writes against a state that starts over (untimed) whenever it has taken
/// [`REGROW`] writes. `prepare(first, count)` makes the arguments of writes `first..first+count`
/// (untimed); `write` makes one, timed.
fn timed_writes<S, A>(
    clock: Clock,
    iters: u64,
    state: &RefCell<(S, u64, u64)>,
    reset: impl Fn() -> S,
    prepare: impl Fn(u64, u64) -> Vec<A>,
    mut write: impl FnMut(&mut S, A, u64),
) -> Duration {
    let mut state = state.borrow_mut();
    let (live, taken, counter) = &mut *state;
    let mut elapsed = Duration::ZERO;
    let mut left = iters;
    while left > 0 {
        if *taken >= REGROW {
            *live = reset();
            *taken = 0;
        }
        let count = left.min(REGROW - *taken);
        let args = prepare(*counter, count);
        let first = *counter;
        let start = clock.now();
        for (offset, arg) in args.into_iter().enumerate() {
            write(live, arg, first + offset as u64);
        }
        elapsed += clock.now() - start;
        *taken += count;
        *counter += count;
        left -= count;
    }
    elapsed
}

/// The key of the `n`-th write of a run: a fresh key, or an overwrite of a base key.
fn write_key(fresh: bool, n: u64) -> String {
    if fresh {
        fresh_key((n % 10_000_000) as usize)
    } else {
        base_key(spread(n as usize, KEYS))
    }
}

fn now(n: u64) -> u64 {
    EPOCH_MS + 10_000_000 + n
}

fn bench_put(c: &mut Bench, fx: &Fixtures) {
    let clock = Clock::from_env();
    let mut group = c.benchmark_group("put");
    group.throughput(Throughput::Elements(1));
    for (name, fresh) in [("fresh", true), ("overwrite", false)] {
        let prepare = move |first: u64, count: u64| -> Vec<(String, Vec<u8>)> {
            (first..first + count)
                .map(|n| (write_key(fresh, n), value(n as usize)))
                .collect()
        };
        let ours = RefCell::new((None::<Replica>, REGROW, 0));
        group.bench_function(format!("mantissa/{name}"), |b| {
            let base = fx.ours();
            b.iter_custom(|iters| {
                timed_writes(
                    clock,
                    iters,
                    &ours,
                    || Some(restore(&base.snapshot)),
                    prepare,
                    |replica, (key, value), n| {
                        let replica = replica.as_mut().expect("reset first");
                        let key = Key::new(key).expect("valid key");
                        black_box(replica.put(key, value, now(n)).expect("put"));
                    },
                )
            });
        });
        let theirs = RefCell::new((None::<AutoCommit>, REGROW, 0));
        group.bench_function(format!("automerge/{name}"), |b| {
            let base = fx.theirs();
            b.iter_custom(|iters| {
                timed_writes(
                    clock,
                    iters,
                    &theirs,
                    || Some(base.doc.clone()),
                    prepare,
                    |doc, (key, value), _| {
                        let doc = doc.as_mut().expect("reset first");
                        doc.put(ROOT, key.as_str(), ScalarValue::Bytes(value))
                            .expect("put");
                        black_box(doc.commit());
                    },
                )
            });
        });
    }
    group.finish();
}

fn bench_reads(c: &mut Bench, fx: &Fixtures) {
    let mut group = c.benchmark_group("get");
    group.throughput(Throughput::Elements(1));
    let order: Vec<String> = (0..KEYS).map(|n| base_key(spread(n, KEYS))).collect();
    group.bench_function("mantissa", |b| {
        let replica = &fx.ours().replica;
        let keys: Vec<Key> = order.iter().map(|text| key(text)).collect();
        let mut n = 0;
        b.iter(|| {
            n = (n + 1) % KEYS;
            black_box(replica.get(&keys[n]).expect("get"))
        });
    });
    group.bench_function("automerge", |b| {
        let doc = &fx.theirs().doc;
        let mut n = 0;
        b.iter(|| {
            n = (n + 1) % KEYS;
            // Owned bytes, as `Replica::get` returns them.
            black_box(
                doc.get(ROOT, order[n].as_str())
                    .expect("get")
                    .map(|(value, _)| value.into_bytes()),
            )
        });
    });
    group.finish();

    // Floors for the get above: a plain std BTreeMap with the same 100k keys and values, looked up
    // in the same order, the value copied out. Keys boxed as `Key` boxes them, or stored inline.
    let mut group = c.benchmark_group("get_baseline");
    group.throughput(Throughput::Elements(1));
    group.bench_function("std_btreemap/boxed_key", |b| {
        let map: BTreeMap<Box<[u8]>, Box<[u8]>> = (0..KEYS)
            .map(|i| (base_key(i).into_bytes().into(), value(i).into()))
            .collect();
        let keys: Vec<Box<[u8]>> = order.iter().map(|text| text.as_bytes().into()).collect();
        let mut n = 0;
        b.iter(|| {
            n = (n + 1) % KEYS;
            black_box(map.get(&keys[n]).map(|value| value.to_vec()))
        });
    });
    group.bench_function("std_btreemap/inline_key", |b| {
        let inline = |text: &str| {
            let mut key = [0u8; 32];
            key[..text.len()].copy_from_slice(text.as_bytes());
            key
        };
        let map: BTreeMap<[u8; 32], Box<[u8]>> = (0..KEYS)
            .map(|i| (inline(&base_key(i)), value(i).into()))
            .collect();
        let keys: Vec<[u8; 32]> = order.iter().map(|text| inline(text)).collect();
        let mut n = 0;
        b.iter(|| {
            n = (n + 1) % KEYS;
            black_box(map.get(&keys[n]).map(|value| value.to_vec()))
        });
    });
    group.finish();

    let mut group = c.benchmark_group("range_1000_of_100k");
    group.throughput(Throughput::Elements(1000));
    group.bench_function("mantissa", |b| {
        let replica = &fx.ours().replica;
        assert_eq!(
            replica
                .range(RANGE_PREFIX.as_bytes(), usize::MAX)
                .unwrap()
                .len(),
            1000
        );
        b.iter(|| black_box(replica.range(RANGE_PREFIX.as_bytes(), usize::MAX).unwrap()));
    });
    group.bench_function("automerge", |b| {
        let doc = &fx.theirs().doc;
        let range = || {
            doc.map_range(ROOT, RANGE_PREFIX.to_string()..RANGE_END.to_string())
                .map(|item| {
                    let value = item.value.into_value().into_bytes().ok();
                    (item.key.into_owned(), value)
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(range().len(), 1000);
        b.iter(|| black_box(range()));
    });
    group.finish();
}

fn bench_merge(c: &mut Bench, fx: &Fixtures) {
    for n in [1usize, 100, 10_000] {
        let mut group = c.benchmark_group(format!("merge_{n}"));
        group.throughput(Throughput::Elements(n as u64));
        if n >= 10_000 {
            group.sampling_mode(SamplingMode::Flat);
        }
        let size = if n >= 10_000 {
            BatchSize::PerIteration
        } else {
            BatchSize::SmallInput
        };
        // Replica A makes `n` puts; B, empty, merges them.
        let ours = OnceCell::new();
        let ours = || {
            ours.get_or_init(|| {
                let mut a = Replica::new(NodeId(1));
                let writes = puts(&mut a, 0..n);
                let sync = a.delta_since(Replica::new(NodeId(2)).version());
                assert_eq!(sync.len(), n);
                (writes, sync)
            })
        };
        group.bench_function("mantissa/write_deltas", |b| {
            let (writes, _) = ours();
            b.iter_batched(
                || (Replica::new(NodeId(2)), writes.clone()),
                |(mut b, writes): (Replica, Vec<Delta>)| {
                    for delta in writes {
                        b.apply(delta).expect("apply");
                    }
                    b
                },
                size,
            );
        });
        group.bench_function("mantissa/sync_delta", |b| {
            let (_, sync) = ours();
            b.iter_batched(
                || (Replica::new(NodeId(2)), sync.clone()),
                |(mut b, sync)| {
                    b.apply(sync).expect("apply");
                    b
                },
                size,
            );
        });
        let theirs = OnceCell::new();
        let theirs = || {
            theirs.get_or_init(|| {
                let mut a = AutoCommit::new();
                automerge_puts(&mut a, 0..n);
                a.get_changes(&[])
            })
        };
        // Automerge applies changes one by one in time that grows with the document: 10,000 of
        // them took ~30 s per iteration here (5 minutes for 10 samples), so that case only runs
        // when asked for.
        let slow = n >= 10_000 && std::env::var_os("MANTISSA_BENCH_SLOW").is_none();
        if !slow {
            group.bench_function("automerge/changes_one_by_one", |b| {
                let changes = theirs();
                b.iter_batched(
                    || (AutoCommit::new(), changes.clone()),
                    |(mut b, changes): (AutoCommit, Vec<Change>)| {
                        for change in changes {
                            b.apply_changes([change]).expect("apply");
                        }
                        b
                    },
                    size,
                );
            });
        }
        group.bench_function("automerge/changes_at_once", |b| {
            let changes = theirs();
            b.iter_batched(
                || (AutoCommit::new(), changes.clone()),
                |(mut b, changes)| {
                    b.apply_changes(changes).expect("apply");
                    b
                },
                size,
            );
        });
        group.finish();
    }

    let mut group = c.benchmark_group("delta_since_100k_peer_lacks_1pct");
    group.bench_function("mantissa", |b| {
        let ours = fx.ours();
        assert_eq!(ours.replica.delta_since(&ours.peer_version).len(), LACKING);
        b.iter(|| black_box(ours.replica.delta_since(&ours.peer_version)));
    });
    group.bench_function("automerge/get_changes", |b| {
        let theirs = fx.theirs();
        let mut doc = theirs.doc.clone();
        assert_eq!(doc.get_changes(&theirs.peer_heads).len(), LACKING);
        b.iter(|| black_box(doc.get_changes(&theirs.peer_heads)));
    });
    group.finish();
}

fn bench_snapshot(c: &mut Bench, fx: &Fixtures) {
    let mut group = c.benchmark_group("snapshot_1m");
    group.sampling_mode(SamplingMode::Flat);
    group.throughput(Throughput::Elements(SNAPSHOT_KEYS as u64));
    group.bench_function("mantissa/encode", |b| {
        let (replica, _) = fx.million();
        b.iter(|| black_box(replica.snapshot()));
    });
    group.bench_function("mantissa/restore", |b| {
        let (_, snapshot) = fx.million();
        b.iter_batched(|| (), |()| restore(snapshot), BatchSize::PerIteration);
    });
    // Automerge's save and load of 1M keys take seconds each: `footprint` times them once.
    group.finish();
}

fn main() {
    let mut c = Criterion::default()
        .with_measurement(Clock::from_env())
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .configure_from_args();
    let fx = Fixtures::default();
    bench_put(&mut c, &fx);
    bench_reads(&mut c, &fx);
    bench_merge(&mut c, &fx);
    bench_snapshot(&mut c, &fx);
    c.final_summary();
}
