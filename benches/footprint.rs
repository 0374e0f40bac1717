//! Memory and size figures of the CRDT keyspace next to an automerge document holding the same map
//! (key → 100-byte value at the root, one committed change per write), printed as tables.
//!
//! `cargo bench --bench footprint`. Heap figures come from a counting global allocator wrapping
//! the system allocator: "heap" is the bytes the program asked for; "malloc" adds an estimate of
//! glibc's per-chunk header and 16-byte rounding. Results: `docs/benchmarks.md`.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, Instant};

use automerge::transaction::Transactable;
use automerge::{AutoCommit, ROOT, ReadDoc, ScalarValue};
use common::*;
use mantissa::crdt::{NodeId, Replica, ReplicaConfig};

// ---- the counting allocator ----

static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
static CHUNKS: AtomicUsize = AtomicUsize::new(0);
static LIVE: AtomicUsize = AtomicUsize::new(0);
/// Allocations ever made (reallocations count as one).
static MADE: AtomicUsize = AtomicUsize::new(0);
/// Live allocations by requested size (the last slot counts every larger one).
static BY_SIZE: [AtomicUsize; HISTOGRAM] = [const { AtomicUsize::new(0) }; HISTOGRAM];
const HISTOGRAM: usize = 1025;

struct Counting;

/// What glibc malloc takes for a request: an 8-byte header, rounded up to 16, at least 32 bytes.
fn chunk(size: usize) -> usize {
    ((size + 8 + 15) & !15).max(32)
}

fn track_alloc(size: usize) {
    let now = CURRENT.fetch_add(size, Relaxed) + size;
    PEAK.fetch_max(now, Relaxed);
    CHUNKS.fetch_add(chunk(size), Relaxed);
    LIVE.fetch_add(1, Relaxed);
    MADE.fetch_add(1, Relaxed);
    BY_SIZE[size.min(HISTOGRAM - 1)].fetch_add(1, Relaxed);
}

fn track_dealloc(size: usize) {
    CURRENT.fetch_sub(size, Relaxed);
    CHUNKS.fetch_sub(chunk(size), Relaxed);
    LIVE.fetch_sub(1, Relaxed);
    BY_SIZE[size.min(HISTOGRAM - 1)].fetch_sub(1, Relaxed);
}

// SAFETY: every call is forwarded unchanged to `System`; the counters only observe sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller upholds `GlobalAlloc::alloc`'s contract, which we pass on.
        let ptr = unsafe { System.alloc(layout) };
        if !ptr.is_null() {
            track_alloc(layout.size());
        }
        ptr
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as for `alloc`.
        let ptr = unsafe { System.alloc_zeroed(layout) };
        if !ptr.is_null() {
            track_alloc(layout.size());
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by `System` with `layout` (we forward every allocation).
        unsafe { System.dealloc(ptr, layout) };
        track_dealloc(layout.size());
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as for `dealloc`; the caller upholds `realloc`'s contract.
        let new = unsafe { System.realloc(ptr, layout, new_size) };
        if !new.is_null() {
            track_dealloc(layout.size());
            track_alloc(new_size);
        }
        new
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Heap held by what a closure built and returned (it stays alive until dropped by the caller).
#[derive(Clone, Copy)]
struct Heap {
    bytes: usize,
    chunks: usize,
    allocations: usize,
    peak: usize,
}

/// Runs `build`, returning its result and the heap it still holds, plus the peak on the way.
fn measure<T>(build: impl FnOnce() -> T) -> (T, Heap) {
    let (bytes, chunks, live) = (
        CURRENT.load(Relaxed),
        CHUNKS.load(Relaxed),
        LIVE.load(Relaxed),
    );
    PEAK.store(bytes, Relaxed);
    let value = black_box(build());
    let heap = Heap {
        bytes: CURRENT.load(Relaxed) - bytes,
        chunks: CHUNKS.load(Relaxed) - chunks,
        allocations: LIVE.load(Relaxed) - live,
        peak: PEAK.load(Relaxed) - bytes,
    };
    (value, heap)
}

fn histogram() -> Vec<usize> {
    BY_SIZE.iter().map(|count| count.load(Relaxed)).collect()
}

/// The median of `runs` timings of `f`.
fn median_time<T>(runs: usize, mut f: impl FnMut() -> T) -> Duration {
    let mut times: Vec<Duration> = (0..runs)
        .map(|_| {
            let start = Instant::now();
            let out = black_box(f());
            let elapsed = start.elapsed();
            drop(out);
            elapsed
        })
        .collect();
    times.sort();
    times[runs / 2]
}

// ---- output ----

const RAW_PER_KEY: usize = KEY_LEN + VALUE_LEN;

fn mb(bytes: usize) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}

fn row(cells: &[String]) {
    println!("| {} |", cells.join(" | "));
}

fn header(cells: &[&str]) {
    println!("| {} |", cells.join(" | "));
    println!("|{}", "---|".repeat(cells.len()));
}

fn heap_row(what: &str, heap: Heap, keys: usize, live_raw: usize) {
    row(&[
        what.to_string(),
        mb(heap.bytes),
        format!("{:.0}", heap.bytes as f64 / keys as f64),
        format!("{:.2}×", heap.bytes as f64 / live_raw as f64),
        format!("{:.2}×", heap.chunks as f64 / live_raw as f64),
        format!("{:.2}", heap.allocations as f64 / keys as f64),
        mb(heap.peak),
    ]);
}

const HEAP_COLUMNS: [&str; 7] = [
    "state",
    "heap",
    "heap B/key",
    "heap ÷ raw",
    "malloc ÷ raw",
    "allocations/key",
    "peak while building",
];

// ---- the figures ----

const MILLION: usize = 1_000_000;
const CHURN_KEYS: usize = 1_000;
const CHURN_ROUNDS: usize = 100;

fn million() {
    let raw = MILLION * RAW_PER_KEY;
    println!(
        "\n## 1M keys × 100-byte values (raw key+value bytes: {})\n",
        mb(raw)
    );
    header(&HEAP_COLUMNS);

    let before = histogram();
    let (replica, built) = measure(|| replica_with(MILLION, 1));
    let after = histogram();
    heap_row("mantissa, built by 1M puts", built, MILLION, raw);
    let snapshot = replica.snapshot();
    let encode = median_time(3, || replica.snapshot());
    drop(replica);
    let (restored, heap) =
        measure(|| Replica::restore(&snapshot, ReplicaConfig::default()).expect("restore"));
    heap_row("mantissa, restored from its snapshot", heap, MILLION, raw);
    drop(restored);
    let decode = median_time(3, || {
        Replica::restore(&snapshot, ReplicaConfig::default()).expect("restore")
    });

    let start = Instant::now();
    let (mut doc, doc_heap) = measure(|| automerge_with(MILLION));
    let doc_build = start.elapsed();
    heap_row("automerge, built by 1M put+commit", doc_heap, MILLION, raw);
    let start = Instant::now();
    let saved = doc.save();
    let save = start.elapsed();
    drop(doc);
    let start = Instant::now();
    let (loaded, heap) = measure(|| AutoCommit::load(&saved).expect("load"));
    let load = start.elapsed();
    heap_row("automerge, loaded from its save", heap, MILLION, raw);
    drop(loaded);

    println!("\nLive allocations the 1M-key replica added, by requested size (top 6):\n");
    header(&["size", "allocations", "per key", "bytes per key"]);
    let mut sizes: Vec<(usize, isize)> = before
        .iter()
        .zip(&after)
        .enumerate()
        .map(|(size, (b, a))| (size, *a as isize - *b as isize))
        .filter(|&(_, count)| count > 0)
        .collect();
    sizes.sort_by_key(|&(size, count)| std::cmp::Reverse(size as isize * count));
    for (size, count) in sizes.into_iter().take(6) {
        let label = if size == HISTOGRAM - 1 {
            format!("≥ {size}")
        } else {
            size.to_string()
        };
        row(&[
            label,
            count.to_string(),
            format!("{:.3}", count as f64 / MILLION as f64),
            format!("{:.1}", (size as isize * count) as f64 / MILLION as f64),
        ]);
    }

    println!("\n## 1M keys: snapshot and save\n");
    header(&["", "bytes", "÷ raw", "encode", "decode"]);
    row(&[
        "mantissa `snapshot()` / `restore()`".into(),
        mb(snapshot.len()),
        format!("{:.2}×", snapshot.len() as f64 / raw as f64),
        format!("{encode:.2?} (median of 3)"),
        format!("{decode:.2?} (median of 3)"),
    ]);
    row(&[
        "automerge `save()` / `load()`".into(),
        mb(saved.len()),
        format!("{:.2}×", saved.len() as f64 / raw as f64),
        format!("{save:.2?} (1 run)"),
        format!("{load:.2?} (1 run)"),
    ]);
    println!("\n(automerge: building the 1M-key document took {doc_build:.1?}.)");
}

/// Writes every churn key once, then overwrites each `rounds - 1` more times, round robin.
fn churn_replica(config: ReplicaConfig, rounds: usize) -> Replica {
    let mut replica = Replica::with_config(NodeId(1), config);
    for round in 0..rounds {
        for i in 0..CHURN_KEYS {
            let n = round * CHURN_KEYS + i;
            replica
                .put(key(&base_key(i)), value(n), EPOCH_MS + n as u64)
                .expect("put");
        }
    }
    replica
}

fn churn_doc(rounds: usize) -> AutoCommit {
    let mut doc = AutoCommit::new();
    for round in 0..rounds {
        for i in 0..CHURN_KEYS {
            automerge_put(&mut doc, &base_key(i), value(round * CHURN_KEYS + i));
        }
    }
    doc
}

fn churn() {
    let live = CHURN_KEYS * RAW_PER_KEY;
    println!(
        "\n## Churn: {CHURN_KEYS} keys overwritten {CHURN_ROUNDS} times each \
         (live raw key+value bytes: {live})\n"
    );
    header(&HEAP_COLUMNS);
    let no_feed = ReplicaConfig {
        feed_capacity: 0,
        ..ReplicaConfig::default()
    };
    let (_, heap) = measure(|| churn_replica(ReplicaConfig::default(), 1));
    heap_row(
        "mantissa, written once (default config)",
        heap,
        CHURN_KEYS,
        live,
    );
    let (_, heap) = measure(|| churn_replica(no_feed.clone(), 1));
    heap_row(
        "mantissa, written once (`feed_capacity: 0`)",
        heap,
        CHURN_KEYS,
        live,
    );
    let (replica, heap) = measure(|| churn_replica(ReplicaConfig::default(), CHURN_ROUNDS));
    heap_row(
        "mantissa, after churn (default config)",
        heap,
        CHURN_KEYS,
        live,
    );
    let (_, heap) = measure(|| churn_replica(no_feed.clone(), CHURN_ROUNDS));
    heap_row(
        "mantissa, after churn (`feed_capacity: 0`)",
        heap,
        CHURN_KEYS,
        live,
    );
    let snapshot = replica.snapshot();
    let (_, heap) = measure(|| Replica::restore(&snapshot, no_feed).expect("restore"));
    heap_row(
        "mantissa, after churn, restored (`feed_capacity: 0`)",
        heap,
        CHURN_KEYS,
        live,
    );
    let (_, heap) = measure(|| churn_doc(1));
    heap_row("automerge, written once (no churn)", heap, CHURN_KEYS, live);
    let (mut doc, heap) = measure(|| churn_doc(CHURN_ROUNDS));
    heap_row("automerge, after churn", heap, CHURN_KEYS, live);
    let saved = doc.save();
    let (_, heap) = measure(|| AutoCommit::load(&saved).expect("load"));
    heap_row("automerge, after churn, loaded", heap, CHURN_KEYS, live);

    println!("\nSnapshot after churn:\n");
    header(&["", "bytes", "÷ live raw"]);
    for (what, len) in [
        ("mantissa `snapshot().len()`", snapshot.len()),
        ("automerge `save().len()`", saved.len()),
    ] {
        row(&[
            what.into(),
            len.to_string(),
            format!("{:.2}×", len as f64 / live as f64),
        ]);
    }
}

/// Allocations per operation, averaged over `count` operations.
fn allocations_per_op(count: usize, mut op: impl FnMut(usize)) -> f64 {
    let before = MADE.load(Relaxed);
    for n in 0..count {
        op(n);
    }
    (MADE.load(Relaxed) - before) as f64 / count as f64
}

fn allocations() {
    const KEYS: usize = 100_000;
    const OPS: usize = 10_000;
    println!("\n## Allocations per operation on a 100k-key state (average of {OPS})\n");
    let mut replica = replica_with(KEYS, 1);
    let mut doc = automerge_with(KEYS);
    let keys: Vec<String> = (0..OPS).map(|n| base_key(spread(n, KEYS))).collect();
    let fresh: Vec<String> = (0..OPS).map(fresh_key).collect();
    let at = |n: usize| EPOCH_MS + 10_000_000 + n as u64;
    let mut ours = Vec::new();
    let mut theirs = Vec::new();
    // The caller's owned key and value are made outside the count (automerge copies the key
    // inside `put`, which is counted).
    let args = |texts: &[String]| -> Vec<_> {
        texts
            .iter()
            .enumerate()
            .map(|(n, text)| (key(text), value(n)))
            .collect()
    };
    for (texts, _) in [(&fresh, "fresh"), (&keys, "overwrite")] {
        let mut owned = args(texts).into_iter();
        ours.push(allocations_per_op(OPS, |n| {
            let (key, value) = owned.next().expect("one per op");
            black_box(replica.put(key, value, at(n)).expect("put"));
        }));
        let mut values = texts
            .iter()
            .enumerate()
            .map(|(n, _)| value(n))
            .collect::<Vec<_>>()
            .into_iter();
        theirs.push(allocations_per_op(OPS, |n| {
            let value = values.next().expect("one per op");
            doc.put(ROOT, texts[n].as_str(), ScalarValue::Bytes(value))
                .expect("put");
            black_box(doc.commit());
        }));
    }
    let lookups: Vec<_> = keys.iter().map(|text| key(text)).collect();
    ours.push(allocations_per_op(OPS, |n| {
        black_box(replica.get(&lookups[n]).expect("get"));
    }));
    theirs.push(allocations_per_op(OPS, |n| {
        black_box(
            doc.get(ROOT, keys[n].as_str())
                .expect("get")
                .map(|(value, _)| value.into_bytes()),
        );
    }));
    header(&["operation", "mantissa", "automerge"]);
    for (n, what) in ["put, fresh key", "put, overwrite", "get (owned value)"]
        .into_iter()
        .enumerate()
    {
        row(&[
            what.into(),
            format!("{:.1}", ours[n]),
            format!("{:.1}", theirs[n]),
        ]);
    }
}

fn main() {
    // `cargo bench` passes `--bench`; a filter argument selects one part.
    let filter: Option<String> = std::env::args().skip(1).find(|arg| !arg.starts_with('-'));
    let wanted = |name: &str| filter.as_deref().is_none_or(|f| name.contains(f));
    println!(
        "Heap = bytes requested from the allocator; malloc = plus an estimate of glibc's chunk \
         overhead (8-byte header, 16-byte rounding, 32-byte minimum)."
    );
    if wanted("allocations") {
        allocations();
    }
    if wanted("churn") {
        churn();
    }
    if wanted("million") {
        million();
    }
}
