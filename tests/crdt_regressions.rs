//! Regression tests: the minimal cases the property tests in `crdt_properties.rs` shrank to.
//!
//! Each test names the behaviour it pins down. Tests marked `#[ignore = "bug: …"]` reproduce a
//! confirmed bug in `src/crdt` and assert the documented behaviour; they pass once it is fixed.

use mantissa::crdt::{Key, NodeId, Replica, ReplicaConfig, SNAPSHOT_FORMAT, Value};

fn set(replica: &Replica, key: &Key) -> Option<Vec<Vec<u8>>> {
    match replica.get(key).expect("the key reads") {
        Some(Value::Set(elements)) => Some(elements),
        Some(other) => panic!("{key:?} holds {other:?}"),
        None => None,
    }
}

/// Shrunk from `random_scenarios_with_multi_element_set_adds`: one replica adds {b, c} in one
/// write, then adds b again. The architecture says a set add "replaces earlier adds of the same
/// element"; c was never removed, so the set must still hold it.
#[test]
fn re_adding_one_element_keeps_the_others_of_a_multi_element_add() {
    let key = Key::new("set").expect("valid key");
    let mut writer = Replica::new(NodeId(1));
    let mut peer = Replica::new(NodeId(2));
    let both = writer
        .set_add(key.clone(), vec![b"b".to_vec(), b"c".to_vec()], 990)
        .expect("add b and c");
    let again = writer
        .set_add(key.clone(), vec![b"b".to_vec()], 1_007)
        .expect("add b again");
    peer.apply(both).expect("apply");
    peer.apply(again).expect("apply");
    let expected = Some(vec![b"b".to_vec(), b"c".to_vec()]);
    // Actual: Some([b"b"]) on both replicas.
    assert_eq!(set(&writer, &key), expected, "at the writer");
    assert_eq!(set(&peer, &key), expected, "at a peer");
}

/// The same cause seen through `set_remove`: removing b alone must leave c, which the remove
/// never named.
#[test]
fn removing_one_element_keeps_the_others_of_a_multi_element_add() {
    let key = Key::new("set").expect("valid key");
    let mut writer = Replica::new(NodeId(1));
    let mut peer = Replica::new(NodeId(2));
    let both = writer
        .set_add(key.clone(), vec![b"b".to_vec(), b"c".to_vec()], 1)
        .expect("add b and c");
    let removed = writer
        .set_remove(key.clone(), &[b"b".to_vec()], 2)
        .expect("remove b")
        .expect("b was present");
    peer.apply(both).expect("apply");
    peer.apply(removed).expect("apply");
    // Actual: None (the set reads as absent) on both replicas.
    assert_eq!(
        set(&writer, &key),
        Some(vec![b"c".to_vec()]),
        "at the writer"
    );
    assert_eq!(set(&peer, &key), Some(vec![b"c".to_vec()]), "at a peer");
}

/// A watcher's cursor beyond the end of the feed gets no events: true for 10, but
/// `Feed::since` computes `after + 1`, which wraps for `u64::MAX`.
#[test]
fn events_since_the_largest_cursor_returns_nothing() {
    let key = Key::new("k").expect("valid key");
    let mut replica = Replica::new(NodeId(1));
    replica.put(key.clone(), b"1".to_vec(), 1).expect("put");
    replica.put(key, b"2".to_vec(), 2).expect("put");
    assert_eq!(replica.events_since(10).map(Iterator::count), Ok(0));
    // Actual: Ok(2) in release builds.
    assert_eq!(replica.events_since(u64::MAX).map(Iterator::count), Ok(0));
}

/// Cursors are "strictly increasing, never reused, and continue across a snapshot restore", yet
/// `restore` accepts a snapshot whose feed cursor is `u64::MAX`, which cannot advance.
#[test]
fn a_restored_feed_cursor_keeps_increasing() {
    // An empty replica of node 1: node, clock (node, last), version, collected, feed cursor, entries.
    let mut snapshot = vec![SNAPSHOT_FORMAT, 1, 1, 0, 0, 0];
    snapshot.extend([0xff; 9]);
    snapshot.extend([0x01, 0]);
    let Ok(mut replica) = Replica::restore(&snapshot, ReplicaConfig::default()) else {
        return; // Refusing the snapshot is a fix.
    };
    let before = replica.cursor();
    assert_eq!(before, u64::MAX);
    let Ok(_) = replica.put(Key::new("k").expect("valid key"), b"v".to_vec(), 1) else {
        return; // So is refusing the write.
    };
    // Actual: the cursor wraps to 0 in release builds.
    assert!(
        replica.cursor() > before,
        "cursor went from {before} to {}",
        replica.cursor()
    );
}
