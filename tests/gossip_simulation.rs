//! The gossip protocol in the message-level simulation: dissemination, anti-entropy after
//! partitions and loss, crashes, and garbage collection, all in simulated time.

use std::time::{Duration, Instant};

use mantissa::crdt::{Key, Value};
use mantissa::gossip::{Config, NetworkModel, Simulation};

fn key(name: &str) -> Key {
    Key::new(name).expect("valid key")
}

fn converged(sim: &Simulation) -> bool {
    let first = sim.node(0).replica().digest();
    sim.nodes()
        .iter()
        .all(|node| node.replica().digest() == first)
}

fn sim(size: usize, seed: u64, network: NetworkModel) -> Simulation {
    Simulation::new(size, Config::lan(), network, seed, Instant::now())
}

#[test]
fn a_write_reaches_every_node_through_the_push_tree() {
    let mut sim = sim(20, 1, NetworkModel::default());
    sim.run_for(Duration::from_secs(2));
    sim.write(3, |r| r.put(key("a"), b"1".to_vec(), 1_000).map(Some))
        .expect("write");
    let deadline = sim.now() + Duration::from_millis(100);
    assert!(
        sim.run_until(deadline, converged),
        "not every node had the write 100 ms after it (1 ms links)"
    );
    for node in sim.nodes() {
        let Some(Value::Register(register)) = node.replica().get(&key("a")).expect("readable")
        else {
            panic!("{} lacks the write", node.me().name);
        };
        assert_eq!(register.value, b"1");
    }
}

#[test]
fn both_sides_of_a_partition_keep_writing_and_converge_after_the_heal() {
    let mut sim = sim(10, 2, NetworkModel::default());
    sim.run_for(Duration::from_secs(1));
    sim.partition(&[0, 1, 2]);
    sim.write(0, |r| {
        r.put(key("minority"), b"m".to_vec(), 1_000).map(Some)
    })
    .expect("write");
    sim.write(7, |r| {
        r.put(key("majority"), b"M".to_vec(), 1_000).map(Some)
    })
    .expect("write");
    sim.write(1, |r| r.counter_add(key("hits"), 2, 1_001).map(Some))
        .expect("write");
    sim.write(8, |r| r.counter_add(key("hits"), 3, 1_001).map(Some))
        .expect("write");
    sim.run_for(Duration::from_secs(2));
    assert!(
        sim.node(2)
            .replica()
            .get(&key("majority"))
            .expect("readable")
            .is_none()
    );
    assert!(!converged(&sim));
    sim.heal();
    let deadline = sim.now() + Duration::from_secs(30);
    assert!(
        sim.run_until(deadline, converged),
        "no convergence 30 s after the heal"
    );
    assert_eq!(
        sim.node(4).replica().get(&key("hits")).expect("readable"),
        Some(Value::Counter(5))
    );
}

#[test]
fn datagram_loss_does_not_lose_writes() {
    let network = NetworkModel {
        datagram_loss: 0.2,
        jitter: Duration::from_millis(3),
        ..NetworkModel::default()
    };
    let mut sim = sim(12, 3, network);
    for round in 0..30u64 {
        let node = (round % 12) as usize;
        let name = format!("k{}", round % 7);
        sim.write(node, |r| {
            r.put(key(&name), round.to_be_bytes().to_vec(), 1_000 + round)
                .map(Some)
        })
        .expect("write");
        sim.run_for(Duration::from_millis(50));
    }
    let deadline = sim.now() + Duration::from_secs(20);
    assert!(sim.run_until(deadline, converged));
}

#[test]
fn a_crashed_node_catches_up_after_restart() {
    let mut sim = sim(8, 4, NetworkModel::default());
    sim.run_for(Duration::from_secs(1));
    sim.crash(5);
    for i in 0..20u64 {
        sim.write((i % 4) as usize, |r| {
            r.set_add(key("s"), vec![i.to_be_bytes().to_vec()], 2_000 + i)
                .map(Some)
        })
        .expect("write");
    }
    sim.run_for(Duration::from_millis(500));
    sim.restart(5);
    let deadline = sim.now() + Duration::from_secs(30);
    assert!(sim.run_until(deadline, converged));
    let Some(Value::Set(elements)) = sim.node(5).replica().get(&key("s")).expect("readable") else {
        panic!("node 5 has no set");
    };
    assert_eq!(elements.len(), 20);
}

#[test]
fn tombstones_are_collected_once_every_member_has_seen_them() {
    let mut sim = sim(5, 5, NetworkModel::default());
    sim.run_for(Duration::from_secs(1));
    for i in 0..10 {
        let name = format!("k{i}");
        sim.write(0, |r| r.put(key(&name), b"x".to_vec(), 1_000).map(Some))
            .expect("write");
    }
    sim.run_for(Duration::from_millis(200));
    for i in 0..10 {
        let name = format!("k{i}");
        sim.write(1, |r| r.delete(key(&name), 2_000))
            .expect("write");
    }
    sim.run_for(Duration::from_millis(200));
    assert!(converged(&sim));
    assert_eq!(sim.node(2).replica().tombstones(), 10);
    let deadline = sim.now() + Duration::from_secs(120);
    assert!(
        sim.run_until(deadline, |sim| sim
            .nodes()
            .iter()
            .all(|n| n.replica().tombstones() == 0)),
        "tombstones still held: {:?}",
        sim.nodes()
            .iter()
            .map(|n| n.replica().tombstones())
            .collect::<Vec<_>>()
    );
    assert!(sim.nodes().iter().all(|n| n.replica().is_empty()));
}

#[test]
fn a_large_catch_up_travels_in_pieces_and_applies_whole() {
    let config = Config {
        sync_chunk_bytes: 1024,
        max_message_bytes: 64 * 1024,
        ..Config::lan()
    };
    let mut sim = Simulation::new(4, config, NetworkModel::default(), 6, Instant::now());
    sim.run_for(Duration::from_secs(1));
    sim.crash(3);
    for i in 0..200u64 {
        let name = format!("big/{i:04}");
        sim.write((i % 3) as usize, |r| {
            r.put(key(&name), vec![7; 100], 3_000 + i).map(Some)
        })
        .expect("write");
    }
    sim.run_for(Duration::from_secs(1));
    sim.restart(3);
    let deadline = sim.now() + Duration::from_secs(30);
    assert!(
        sim.run_until(deadline, converged),
        "the restarted node never caught up"
    );
    assert_eq!(sim.node(3).replica().len(), 200);
    let pieces: u64 = sim
        .nodes()
        .iter()
        .map(|node| {
            node.stats()
                .bytes_sent_by_kind
                .get("sync-chunk")
                .copied()
                .unwrap_or(0)
        })
        .sum();
    assert!(
        pieces > 20 * 1024,
        "the catch-up should travel in pieces, sent {pieces} bytes of them"
    );
}
