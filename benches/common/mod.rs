//! Fixtures shared by the `keyspace` (timings) and `footprint` (memory and sizes) benches: the same
//! keys, values and write patterns for mantissa's [`Replica`] and an automerge [`AutoCommit`]
//! document holding the same map of key → bytes at its root.

#![allow(dead_code)] // each bench binary uses a different subset

use automerge::transaction::Transactable;
use automerge::{AutoCommit, ROOT, ScalarValue};
use mantissa::crdt::{Delta, Key, NodeId, Replica};

/// Bytes in every value.
pub const VALUE_LEN: usize = 100;
/// Bytes in every key (`nodes/host-000123/status/cpu00`).
pub const KEY_LEN: usize = 30;
/// The wall clock the writes pretend to happen at (ms).
pub const EPOCH_MS: u64 = 1_700_000_000_000;

/// The `i`-th key of a prefilled keyspace: 100 keys per host, in host order.
pub fn base_key(i: usize) -> String {
    format!("nodes/host-{:06}/status/cpu{:02}", i / 100, i % 100)
}

/// The `n`-th key that no prefilled keyspace of up to 100k keys holds, spread over the first 1,000
/// hosts so fresh inserts land all over the tree rather than at its end (`n` < 10M).
pub fn fresh_key(n: usize) -> String {
    format!(
        "nodes/host-{:06}/status/x{:04}",
        (n * 7919) % 1000,
        n / 1000
    )
}

/// The prefix of 1,000 keys (hosts 120..=129) in a keyspace of at least 13,000 base keys.
pub const RANGE_PREFIX: &str = "nodes/host-00012";
pub const RANGE_END: &str = "nodes/host-00013";

/// A 100-byte value that does not compress (so snapshot sizes are not flattered by DEFLATE).
pub fn value(seed: usize) -> Vec<u8> {
    let mut state = (seed as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..VALUE_LEN)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

pub fn key(text: &str) -> Key {
    Key::new(text).expect("valid key")
}

/// A spread-out index in `0..n`, for overwrites and reads that do not walk the tree in order.
pub fn spread(n: usize, len: usize) -> usize {
    (n.wrapping_mul(7919)) % len
}

/// A replica of `node` holding base keys `0..n`, one put each.
pub fn replica_with(n: usize, node: u64) -> Replica {
    let mut replica = Replica::new(NodeId(node));
    for i in 0..n {
        replica
            .put(key(&base_key(i)), value(i), EPOCH_MS + i as u64)
            .expect("put");
    }
    replica
}

/// Puts base keys `range` on `replica`, returning the write deltas.
pub fn puts(replica: &mut Replica, range: std::ops::Range<usize>) -> Vec<Delta> {
    range
        .map(|i| {
            replica
                .put(key(&base_key(i)), value(i), EPOCH_MS + i as u64)
                .expect("put")
        })
        .collect()
}

/// An automerge document holding base keys `0..n` at its root, one committed change per put (as a
/// replica makes one delta per put).
pub fn automerge_with(n: usize) -> AutoCommit {
    let mut doc = AutoCommit::new();
    automerge_puts(&mut doc, 0..n);
    doc
}

/// Puts base keys `range` into `doc`, one committed change each.
pub fn automerge_puts(doc: &mut AutoCommit, range: std::ops::Range<usize>) {
    for i in range {
        automerge_put(doc, &base_key(i), value(i));
    }
}

/// One automerge write as a replica makes one: put, then commit (which makes the change to sync).
pub fn automerge_put(doc: &mut AutoCommit, key: &str, value: Vec<u8>) {
    doc.put(ROOT, key, ScalarValue::Bytes(value)).expect("put");
    doc.commit();
}
