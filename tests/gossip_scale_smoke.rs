//! A small run of what `benches/gossip_scale.rs` measures: a 200-node cluster whose members start
//! knowing only 32 others each (`Simulation::with_view`), SWIM spreading the rest, and writes that
//! must reach every node, checked with the simulation's per-write delivery tracking.

use std::num::NonZeroU32;
use std::time::{Duration, Instant};

use mantissa::crdt::{Key, Value};
use mantissa::gossip::{Config, NetworkModel, Simulation};

const SIZE: usize = 200;

fn key(k: usize) -> Key {
    Key::new(format!("smoke/{k}")).expect("valid key")
}

fn cluster() -> Simulation {
    let mut config = Config::lan();
    config.cluster_size = NonZeroU32::new(SIZE as u32).expect("not zero");
    let network = NetworkModel {
        latency: Duration::from_millis(1),
        jitter: Duration::from_millis(1),
        datagram_loss: 0.0,
    };
    Simulation::with_view(SIZE, 32, config, network, 11, Instant::now())
}

#[test]
fn every_write_reaches_every_node_of_a_partial_view_cluster() {
    let mut sim = cluster();
    sim.run_for(Duration::from_secs(2));
    let known = sim.nodes().iter().map(|n| n.members().count()).min();
    assert!(
        known.is_some_and(|k| k >= 32),
        "SWIM lost members: {known:?}"
    );
    for k in 0..12 {
        let writer = (k * 37 + 5) % SIZE;
        let dot = sim
            .write(writer, |r| {
                r.put(key(k), vec![k as u8; 100], 1_000 + k as u64)
                    .map(Some)
            })
            .expect("write")
            .expect("a put writes");
        sim.track(dot);
        let deadline = sim.now() + Duration::from_secs(1);
        let complete = sim.run_until(deadline, Simulation::tracked_complete);
        let delivery = sim.untrack(dot).expect("tracked");
        assert!(
            complete,
            "write {k} from node {writer} reached {} of {SIZE} nodes in 1 s",
            delivery.informed()
        );
        assert_eq!(delivery.informed(), SIZE);
        assert_eq!(delivery.writer(), writer);
        assert_eq!(delivery.arrival(writer), Some(Duration::ZERO));
        assert!(delivery.complete_after().is_some());
        // Every node but the writer reports hops, unless anti-entropy got there first.
        assert!(delivery.hops().len() > SIZE / 2, "{:?}", delivery.hops());
        for node in sim.nodes() {
            let value = node.replica().get(&key(k)).expect("readable");
            assert!(
                matches!(value, Some(Value::Register(ref r)) if r.value == vec![k as u8; 100]),
                "{} lacks write {k}",
                node.me().name
            );
        }
        sim.run_for(Duration::from_millis(200));
    }
}

#[test]
fn tracking_sees_a_write_that_cannot_reach_everyone() {
    let mut sim = cluster();
    sim.run_for(Duration::from_secs(1));
    let side: Vec<usize> = (0..SIZE / 4).collect();
    sim.partition(&side);
    let dot = sim
        .write(0, |r| r.put(key(0), b"cut off".to_vec(), 1_000).map(Some))
        .expect("write")
        .expect("a put writes");
    sim.track(dot);
    let deadline = sim.now() + Duration::from_millis(500);
    assert!(!sim.run_until(deadline, Simulation::tracked_complete));
    let delivery = sim.delivery(dot).expect("tracked");
    assert!(delivery.informed() <= side.len(), "{}", delivery.informed());
    assert!(delivery.arrival(SIZE - 1).is_none());
    assert!(delivery.complete_after().is_none());
    sim.heal();
    let deadline = sim.now() + Duration::from_secs(30);
    assert!(
        sim.run_until(deadline, Simulation::tracked_complete),
        "anti-entropy did not finish the write after the heal: {} of {SIZE}",
        sim.delivery(dot).expect("tracked").informed()
    );
}
