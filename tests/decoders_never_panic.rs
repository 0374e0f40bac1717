//! The byte decoders (`Delta::decode`, `Replica::restore`) never panic and never over-allocate.
//!
//! Inputs: random bytes, and valid delta and snapshot encodings damaged by bit flips, overwrites,
//! truncations, insertions and removals. Each decode must return `Ok` or `Err`. Whatever is
//! accepted must also be safe to use: a decoded delta re-encodes to itself and applies (or is
//! refused without changing the replica), and a replica that accepted it — or was restored from
//! damaged bytes — reads, writes, snapshots and restores again without panicking.
//!
//! A counting global allocator checks that a tiny input claiming 2^40 (or 2^64 − 1) elements is
//! refused at once, without a large allocation.
//!
//! Time-bounded mode: with `MANTISSA_DECODER_FUZZ_SECS=<s>`, `decoders_never_panic_for_a_set_time`
//! keeps generating the same kinds of inputs for that many seconds from a seed it prints
//! (`MANTISSA_DECODER_FUZZ_SEED` replays one); without it, that test returns at once.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use mantissa::crdt::{
    DELTA_FORMAT, Delta, Key, MAX_KEY_LEN, NodeId, Replica, ReplicaConfig, SNAPSHOT_FORMAT,
    VersionVector,
};
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
use serde_json::json;

// ---------------------------------------------------------------------------------------------
// Allocation tracking
// ---------------------------------------------------------------------------------------------

/// The system allocator, recording the largest single request made by the current thread.
struct LargestRequest;

thread_local! {
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn record(size: usize) {
    // `try_with`: allocations can happen while a thread is being torn down.
    let _ = LARGEST.try_with(|largest| largest.set(largest.get().max(size)));
}

// SAFETY: every method forwards to `System` unchanged; recording a size touches only a
// const-initialised thread-local `Cell`, which never allocates.
unsafe impl GlobalAlloc for LargestRequest {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        record(layout.size());
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        record(layout.size());
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        record(new_size);
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: LargestRequest = LargestRequest;

/// Runs `operation`, returning its result, the largest allocation it requested and its duration.
fn measured<T>(operation: impl FnOnce() -> T) -> (T, usize, Duration) {
    LARGEST.with(|largest| largest.set(0));
    let start = Instant::now();
    let result = operation();
    let elapsed = start.elapsed();
    (result, LARGEST.with(Cell::get), elapsed)
}

// ---------------------------------------------------------------------------------------------
// Valid encodings to damage
// ---------------------------------------------------------------------------------------------

struct Corpus {
    deltas: Vec<Vec<u8>>,
    snapshots: Vec<Vec<u8>>,
    /// A snapshot of a replica that holds part of the corpus's writes: what damaged deltas hit.
    target: Vec<u8>,
}

fn key(name: &str) -> Key {
    Key::new(name).expect("the test keys are valid")
}

/// Write deltas of every type, sync and full deltas (one with a collection floor), and snapshots.
fn corpus() -> &'static Corpus {
    static CORPUS: OnceLock<Corpus> = OnceLock::new();
    CORPUS.get_or_init(|| {
        let mut a = Replica::new(NodeId(1));
        let mut b = Replica::new(NodeId(0x1234_5678_9abc));
        let mut writes = vec![
            a.put(key("reg"), b"value".to_vec(), 1_000),
            a.counter_add(key("counter"), -7, 1_001),
            a.set_add(key("set"), vec![b"x".to_vec(), b"y".to_vec()], 1_002),
            a.document_patch(
                key("doc"),
                &json!({"name": "web", "n": 2, "tags": ["a", 1.5], "nested": {"ok": true}}),
                1_003,
            ),
        ]
        .into_iter()
        .collect::<Result<Vec<Delta>, _>>()
        .expect("local writes succeed");
        let target = Replica::new(NodeId(3));
        let mut target = Replica::restore(&target.snapshot(), ReplicaConfig::default())
            .expect("an empty snapshot restores");
        for write in &writes {
            b.apply(write.clone()).expect("apply");
        }
        target.apply(writes[0].clone()).expect("apply");
        target.apply(writes[2].clone()).expect("apply");
        let from_b = [
            b.delete(key("reg"), 900).expect("delete"),
            b.set_remove(key("set"), &[b"x".to_vec()], 901)
                .expect("remove"),
            Some(b.counter_add(key("counter"), 3, 902).expect("add")),
            Some(b.put(key("other"), vec![0; 40], 903).expect("put")),
        ];
        for write in from_b.into_iter().flatten() {
            a.apply(write.clone()).expect("apply");
            writes.push(write);
        }
        let mut deltas: Vec<Vec<u8>> = writes.iter().map(Delta::encode).collect();
        deltas.push(a.delta_since(target.version()).encode());
        deltas.push(a.full_delta().encode());
        let before_collection = b.snapshot();
        let stable = a.version().meet(b.version());
        a.collect_garbage(&stable);
        deltas.push(a.delta_since(&VersionVector::new()).encode());
        deltas.push(a.delta_since(target.version()).encode());
        Corpus {
            deltas,
            snapshots: vec![
                a.snapshot(),
                before_collection,
                target.snapshot(),
                Replica::new(NodeId(9)).snapshot(),
            ],
            target: target.snapshot(),
        }
    })
}

/// One way to damage bytes; positions are taken modulo the length at the time.
#[derive(Clone, Debug)]
enum Damage {
    FlipBit { at: Index, bit: u8 },
    Overwrite { at: Index, byte: u8 },
    Truncate { at: Index },
    Insert { at: Index, byte: u8 },
    Remove { at: Index },
}

fn damage() -> impl Strategy<Value = Damage> {
    prop_oneof![
        3 => (any::<Index>(), 0u8..8).prop_map(|(at, bit)| Damage::FlipBit { at, bit }),
        2 => (any::<Index>(), any::<u8>()).prop_map(|(at, byte)| Damage::Overwrite { at, byte }),
        1 => any::<Index>().prop_map(|at| Damage::Truncate { at }),
        2 => (any::<Index>(), any::<u8>()).prop_map(|(at, byte)| Damage::Insert { at, byte }),
        1 => any::<Index>().prop_map(|at| Damage::Remove { at }),
    ]
}

fn damaged(mut bytes: Vec<u8>, damages: &[Damage]) -> Vec<u8> {
    for damage in damages {
        let len = bytes.len();
        match *damage {
            Damage::FlipBit { at, bit } if len > 0 => bytes[at.index(len)] ^= 1 << bit,
            Damage::Overwrite { at, byte } if len > 0 => bytes[at.index(len)] = byte,
            Damage::Truncate { at } => bytes.truncate(at.index(len + 1)),
            Damage::Insert { at, byte } => bytes.insert(at.index(len + 1), byte),
            Damage::Remove { at } if len > 0 => {
                bytes.remove(at.index(len));
            }
            _ => {}
        }
    }
    bytes
}

// ---------------------------------------------------------------------------------------------
// What accepted input must allow
// ---------------------------------------------------------------------------------------------

/// Reads everything, writes to every type, and snapshots a replica: nothing may panic, and the
/// snapshot must restore to the same state.
fn exercise(replica: &mut Replica) -> Result<(), TestCaseError> {
    let _ = replica.range(b"", usize::MAX);
    let _ = (replica.len(), replica.tombstones(), replica.size());
    let snapshot = replica.snapshot();
    let restored = Replica::restore(&snapshot, ReplicaConfig::default());
    prop_assert!(
        restored.is_ok(),
        "a replica's own snapshot restores: {:?}",
        restored.err()
    );
    let restored = restored.expect("checked just above");
    prop_assert_eq!(restored.digest(), replica.digest());
    prop_assert_eq!(restored.snapshot(), snapshot);
    let stable = replica.version().clone();
    let _ = replica.delta_since(&VersionVector::new()).encode();
    let _ = replica.put(key("reg"), b"after".to_vec(), 5_000);
    let _ = replica.counter_add(key("counter"), 1, 5_001);
    let _ = replica.set_add(key("set"), vec![b"z".to_vec()], 5_002);
    let _ = replica.document_patch(key("doc"), &json!({"after": 1}), 5_003);
    let _ = replica.delete(key("other"), 5_004);
    replica.collect_garbage(&stable);
    let _ = replica.events_since(0).map(Iterator::count);
    let _ = replica.full_delta().encode();
    Ok(())
}

/// Decodes `bytes` as a delta; an accepted delta must round-trip, and apply (or be refused without
/// a change) to a fresh and a populated replica.
fn check_delta_bytes(bytes: &[u8]) -> Result<(), TestCaseError> {
    let Ok(delta) = Delta::decode(bytes) else {
        return Ok(());
    };
    prop_assert_eq!(Delta::decode(&delta.encode()), Ok(delta.clone()));
    let populated = Replica::restore(&corpus().target, ReplicaConfig::default())
        .expect("the target snapshot restores");
    for mut replica in [Replica::new(NodeId(77)), populated] {
        let digest = replica.digest();
        if replica.apply(delta.clone()).is_err() {
            prop_assert_eq!(
                replica.digest(),
                digest,
                "a refused delta changed the replica"
            );
        }
        exercise(&mut replica)?;
    }
    Ok(())
}

/// Restores `bytes` as a snapshot; an accepted one must behave like a replica.
fn check_snapshot_bytes(bytes: &[u8]) -> Result<(), TestCaseError> {
    if let Ok(mut replica) = Replica::restore(bytes, ReplicaConfig::default()) {
        exercise(&mut replica)?;
    }
    Ok(())
}

/// Random bytes, half of them behind the right format version byte so decoding gets past it.
fn random_bytes(version: u8) -> impl Strategy<Value = Vec<u8>> {
    (any::<bool>(), prop::collection::vec(any::<u8>(), 0..512)).prop_map(
        move |(versioned, mut bytes)| {
            if versioned {
                bytes.insert(0, version);
            }
            bytes
        },
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(5_000))]

    #[test]
    fn random_bytes_never_panic_the_delta_decoder(bytes in random_bytes(DELTA_FORMAT)) {
        check_delta_bytes(&bytes)?;
    }

    #[test]
    fn random_bytes_never_panic_restore(bytes in random_bytes(SNAPSHOT_FORMAT)) {
        check_snapshot_bytes(&bytes)?;
    }

    #[test]
    fn damaged_deltas_never_panic(
        pick in any::<Index>(),
        damages in prop::collection::vec(damage(), 1..4),
    ) {
        let deltas = &corpus().deltas;
        check_delta_bytes(&damaged(deltas[pick.index(deltas.len())].clone(), &damages))?;
    }

    #[test]
    fn damaged_snapshots_never_panic(
        pick in any::<Index>(),
        damages in prop::collection::vec(damage(), 1..4),
    ) {
        let snapshots = &corpus().snapshots;
        check_snapshot_bytes(&damaged(snapshots[pick.index(snapshots.len())].clone(), &damages))?;
    }
}

/// The four kinds of input above, for as long as `MANTISSA_DECODER_FUZZ_SECS` says (a no-op
/// without it). The seed is `MANTISSA_DECODER_FUZZ_SEED` (decimal or `0x` hex) or the clock's,
/// printed first; a failure names it, the case number and the input.
#[test]
fn decoders_never_panic_for_a_set_time() {
    let Ok(secs) = std::env::var("MANTISSA_DECODER_FUZZ_SECS") else {
        return;
    };
    let secs: f64 = match secs.trim().parse::<f64>() {
        Ok(secs) if secs.is_finite() && secs >= 0.0 => secs,
        _ => panic!("MANTISSA_DECODER_FUZZ_SECS={secs:?} is not a number of seconds"),
    };
    let seed = match std::env::var("MANTISSA_DECODER_FUZZ_SEED") {
        Ok(text) => {
            let text = text.trim();
            let parsed = match text.strip_prefix("0x") {
                Some(hex) => u64::from_str_radix(hex, 16),
                None => text.parse(),
            };
            parsed.unwrap_or_else(|_| panic!("MANTISSA_DECODER_FUZZ_SEED={text:?} is not a u64"))
        }
        Err(_) => {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |elapsed| elapsed.as_nanos() as u64)
                .rotate_left(17)
                ^ u64::from(std::process::id())
        }
    };
    let replay = format!(
        "MANTISSA_DECODER_FUZZ_SEED={seed:#x} MANTISSA_DECODER_FUZZ_SECS={secs} cargo test \
         --release --test decoders_never_panic decoders_never_panic_for_a_set_time -- --nocapture"
    );
    println!("decoders fuzz: seed {seed:#x}, {secs} s; replay with: {replay}");
    let mut rng_seed = [0u8; 32];
    rng_seed[..8].copy_from_slice(&seed.to_le_bytes());
    let mut runner = TestRunner::new_with_rng(
        Config::default(),
        TestRng::from_seed(RngAlgorithm::ChaCha, &rng_seed),
    );
    let random_delta = random_bytes(DELTA_FORMAT);
    let random_snapshot = random_bytes(SNAPSHOT_FORMAT);
    let damaging = (any::<Index>(), prop::collection::vec(damage(), 1..8));
    let corpus = corpus();
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let mut cases = 0u64;
    while Instant::now() < deadline {
        let (is_delta, input) = match cases % 4 {
            0 => (true, new_value(&random_delta, &mut runner)),
            1 => (false, new_value(&random_snapshot, &mut runner)),
            kind => {
                let (pick, damages) = new_value(&damaging, &mut runner);
                let pool = if kind == 2 {
                    &corpus.deltas
                } else {
                    &corpus.snapshots
                };
                (
                    kind == 2,
                    damaged(pool[pick.index(pool.len())].clone(), &damages),
                )
            }
        };
        let what = if is_delta { "delta" } else { "snapshot" };
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match is_delta {
            true => check_delta_bytes(&input),
            false => check_snapshot_bytes(&input),
        }));
        let problem = match outcome {
            Ok(Ok(())) => None,
            Ok(Err(error)) => Some(error.to_string()),
            Err(_) => Some("panicked (message above)".to_owned()),
        };
        if let Some(problem) = problem {
            panic!(
                "decoders fuzz seed {seed:#x}, case {cases}: {what} input {input:?}: {problem}\n\
                 (replay: {replay})"
            );
        }
        cases += 1;
    }
    println!("decoders fuzz: seed {seed:#x}: {cases} inputs, none made a decoder panic");
}

/// One value drawn from `strategy`.
fn new_value<S: Strategy>(strategy: &S, runner: &mut TestRunner) -> S::Value {
    strategy
        .new_tree(runner)
        .map(|tree| tree.current())
        .unwrap_or_else(|reason| panic!("the strategy rejected its own draw: {reason}"))
}

/// The undamaged corpus decodes, so the damaged cases start from valid bytes.
#[test]
fn the_corpus_is_valid() {
    let corpus = corpus();
    for bytes in &corpus.deltas {
        let delta = Delta::decode(bytes).expect("a valid delta decodes");
        assert_eq!(&delta.encode(), bytes);
    }
    for bytes in &corpus.snapshots {
        let replica = Replica::restore(bytes, ReplicaConfig::default()).expect("restores");
        assert_eq!(&replica.snapshot(), bytes);
    }
    assert!(
        corpus
            .deltas
            .iter()
            .any(|bytes| { Delta::decode(bytes).is_ok_and(|delta| delta.is_full()) })
    );
}

// ---------------------------------------------------------------------------------------------
// Huge claimed lengths
// ---------------------------------------------------------------------------------------------

/// `value` as a postcard varint (LEB128).
fn varint(mut value: u64) -> Vec<u8> {
    let mut bytes = Vec::new();
    loop {
        let low = (value & 0x7f) as u8;
        value >>= 7;
        if value == 0 {
            bytes.push(low);
            return bytes;
        }
        bytes.push(low | 0x80);
    }
}

/// `prefix`, then a length of `claimed`, then a few bytes of padding.
fn claiming(prefix: &[u8], claimed: u64) -> Vec<u8> {
    let mut bytes = prefix.to_vec();
    bytes.extend(varint(claimed));
    bytes.extend([1, 2, 3, 4]);
    bytes
}

/// Where a length sits in each format (field order of the postcard encoding).
fn huge_length_inputs(claimed: u64) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
    let v = DELTA_FORMAT;
    let deltas = vec![
        // write: None, then the context's version vector: a map of `claimed` entries.
        claiming(&[v, 0], claimed),
        // …the context's cloud of dots.
        claiming(&[v, 0, 0], claimed),
        // …empty context, full: false, empty collected, then the list of entries.
        claiming(&[v, 0, 0, 0, 0, 0], claimed),
        // …one entry whose key claims `claimed` bytes.
        claiming(&[v, 0, 0, 0, 0, 0, 1], claimed),
        // …one entry, key "k", and its list of items.
        claiming(&[v, 0, 0, 0, 0, 0, 1, 1, b'k'], claimed),
        // write: Some, dot (node 1, seq 1), then its dependency list.
        claiming(&[v, 1, 1, 1], claimed),
    ];
    let s = SNAPSHOT_FORMAT;
    let snapshots = vec![
        // node 1, clock (node 1, last 0), then the version vector.
        claiming(&[s, 1, 1, 0], claimed),
        // …empty version and collected, feed cursor 0, then the entries.
        claiming(&[s, 1, 1, 0, 0, 0, 0], claimed),
        // …one entry whose key claims `claimed` bytes.
        claiming(&[s, 1, 1, 0, 0, 0, 0, 1], claimed),
    ];
    (deltas, snapshots)
}

#[test]
fn huge_claimed_lengths_are_refused_at_once() {
    const LIMIT: usize = 1 << 20;
    for claimed in [1 << 40, u64::MAX] {
        let (deltas, snapshots) = huge_length_inputs(claimed);
        for bytes in &deltas {
            let (result, largest, elapsed) = measured(|| Delta::decode(bytes));
            assert!(result.is_err(), "{bytes:?} decoded as a delta");
            assert!(
                largest < LIMIT,
                "{bytes:?}: allocated {largest} bytes at once"
            );
            assert!(
                elapsed < Duration::from_millis(200),
                "{bytes:?}: took {elapsed:?}"
            );
        }
        for bytes in &snapshots {
            let (result, largest, elapsed) =
                measured(|| Replica::restore(bytes, ReplicaConfig::default()));
            assert!(result.is_err(), "{bytes:?} restored as a snapshot");
            assert!(
                largest < LIMIT,
                "{bytes:?}: allocated {largest} bytes at once"
            );
            assert!(
                elapsed < Duration::from_millis(200),
                "{bytes:?}: took {elapsed:?}"
            );
        }
    }
}

/// The allocation tracker does see large allocations, so the test above can fail.
#[test]
fn the_allocation_tracker_sees_large_requests() {
    let (buffer, largest, _) = measured(|| vec![0u8; 4 << 20]);
    assert!(largest >= 4 << 20, "saw only {largest} bytes");
    drop(buffer);
}

#[test]
fn keys_must_have_between_one_and_max_key_len_bytes() {
    assert!(Key::new(b"").is_err());
    assert!(Key::new(vec![b'k'; MAX_KEY_LEN + 1]).is_err());
    assert_eq!(MAX_KEY_LEN, 4096);
    assert!(Key::new([b'k']).is_ok());
    assert!(Key::new(vec![b'k'; MAX_KEY_LEN]).is_ok());
}
