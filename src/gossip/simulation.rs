//! A message-level simulation of a whole cluster: many [`Node`]s, a latency model, loss and
//! partitions, all in simulated time. No sockets, no QUIC: it measures the protocol itself, at sizes
//! no single machine could run for real.

use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap, HashMap};
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};

use crate::crdt::{self, Delta, Dot, NodeId, Replica, ReplicaConfig};
use crate::gossip::{Channel, Config, Member, MemberName, Node, Transmit};

/// How messages travel between simulated nodes.
#[derive(Clone, Debug, PartialEq)]
pub struct NetworkModel {
    /// One-way delay of every message.
    pub latency: Duration,
    /// Extra delay drawn uniformly from zero to this, per message.
    pub jitter: Duration,
    /// Probability that a datagram is lost (streams are reliable, as QUIC makes them).
    pub datagram_loss: f64,
}

impl Default for NetworkModel {
    fn default() -> Self {
        NetworkModel {
            latency: Duration::from_millis(1),
            jitter: Duration::ZERO,
            datagram_loss: 0.0,
        }
    }
}

/// A simulated cluster.
pub struct Simulation {
    nodes: Vec<Node>,
    index: HashMap<MemberName, usize>,
    now: Instant,
    network: NetworkModel,
    rng: SmallRng,
    /// Messages in flight: (arrival, sequence) → (from, to, payload).
    in_flight: BinaryHeap<Reverse<(Instant, u64, usize)>>,
    envelopes: HashMap<u64, (usize, usize, Vec<u8>)>,
    /// Node timers: (when, node); stale entries are skipped when popped.
    timers: BinaryHeap<Reverse<(Instant, usize)>>,
    /// Pairs of nodes that cannot reach each other.
    cut: BTreeSet<(usize, usize)>,
    down: BTreeSet<usize>,
    sequence: u64,
    /// Messages delivered so far, and their bytes.
    pub delivered: (u64, u64),
    /// Messages dropped by loss, partitions or crashed receivers.
    pub dropped: u64,
    /// Messages a node refused (malformed, forged, or not applicable).
    pub refused: u64,
}

impl Simulation {
    /// `size` nodes named `node-0`…, each knowing every other from the start (no join phase).
    pub fn new(
        size: usize,
        config: Config,
        network: NetworkModel,
        seed: u64,
        start: Instant,
    ) -> Self {
        let members: Vec<Member> = (0..size).map(member).collect();
        let mut rng = SmallRng::seed_from_u64(seed);
        let mut nodes = Vec::with_capacity(size);
        for (i, me) in members.iter().enumerate() {
            let replica = Replica::with_config(me.replica, ReplicaConfig::default());
            let mut node = Node::new(me.clone(), replica, config.clone(), rng.random(), start)
                .expect("simulation configs are valid");
            // Each node learns the others in its own random order, so push trees differ.
            let mut others: Vec<Member> = members
                .iter()
                .filter(|m| m.name != me.name)
                .cloned()
                .collect();
            shuffle(&mut others, &mut rng);
            node.add_members(others, start);
            nodes.push(node);
            let _ = i;
        }
        let index = members
            .iter()
            .enumerate()
            .map(|(i, m)| (m.name.clone(), i))
            .collect();
        let mut simulation = Simulation {
            nodes,
            index,
            now: start,
            network,
            rng,
            in_flight: BinaryHeap::new(),
            envelopes: HashMap::new(),
            timers: BinaryHeap::new(),
            cut: BTreeSet::new(),
            down: BTreeSet::new(),
            sequence: 0,
            delivered: (0, 0),
            dropped: 0,
            refused: 0,
        };
        for i in 0..size {
            simulation.drain(i);
        }
        simulation
    }

    /// The simulated time.
    pub fn now(&self) -> Instant {
        self.now
    }

    /// The nodes.
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// Node `i`.
    pub fn node(&self, i: usize) -> &Node {
        &self.nodes[i]
    }

    /// Makes a local write at node `i` and lets it leave.
    pub fn write(
        &mut self,
        i: usize,
        op: impl FnOnce(&mut Replica) -> Result<Option<Delta>, crdt::Error>,
    ) -> Result<Option<Dot>, crdt::Error> {
        let dot = self.nodes[i].write(self.now, op)?;
        self.drain(i);
        Ok(dot)
    }

    /// Cuts every link between `side` and the other nodes.
    pub fn partition(&mut self, side: &[usize]) {
        let side: BTreeSet<usize> = side.iter().copied().collect();
        for &a in &side {
            for b in 0..self.nodes.len() {
                if !side.contains(&b) {
                    self.cut.insert((a, b));
                    self.cut.insert((b, a));
                }
            }
        }
    }

    /// Restores every link.
    pub fn heal(&mut self) {
        self.cut.clear();
    }

    /// Stops node `i`: it neither receives nor runs timers until [`Simulation::restart`].
    pub fn crash(&mut self, i: usize) {
        self.down.insert(i);
    }

    /// Brings a crashed node back with the state it had (a restart from durable storage).
    pub fn restart(&mut self, i: usize) {
        self.down.remove(&i);
        let now = self.now;
        self.nodes[i].handle_timeout(now);
        self.drain(i);
    }

    /// Runs the simulation until `deadline`, or until `done` holds (checked after each event).
    /// Returns whether `done` held.
    pub fn run_until(
        &mut self,
        deadline: Instant,
        mut done: impl FnMut(&Simulation) -> bool,
    ) -> bool {
        loop {
            if done(self) {
                return true;
            }
            let next_message = self.in_flight.peek().map(|Reverse((at, _, _))| *at);
            let next_timer = self.timers.peek().map(|Reverse((at, _))| *at);
            let next = match (next_message, next_timer) {
                (Some(a), Some(b)) => a.min(b),
                (Some(a), None) | (None, Some(a)) => a,
                (None, None) => return false,
            };
            if next > deadline {
                self.now = deadline;
                return done(self);
            }
            self.now = next;
            if next_message == Some(next) {
                self.deliver_next();
            } else {
                self.fire_next_timer();
            }
        }
    }

    /// Runs for `duration` of simulated time.
    pub fn run_for(&mut self, duration: Duration) {
        let deadline = self.now + duration;
        self.run_until(deadline, |_| false);
    }

    fn deliver_next(&mut self) {
        let Some(Reverse((_, sequence, _))) = self.in_flight.pop() else {
            return;
        };
        let Some((from, to, payload)) = self.envelopes.remove(&sequence) else {
            return;
        };
        if self.down.contains(&to) || self.cut.contains(&(from, to)) {
            self.dropped += 1;
            return;
        }
        self.delivered.0 += 1;
        self.delivered.1 += payload.len() as u64;
        let sender = self.nodes[from].me().clone();
        let now = self.now;
        if self.nodes[to]
            .handle_message(&sender.name, sender.addr, &payload, now)
            .is_err()
        {
            self.refused += 1;
        }
        self.drain(to);
    }

    fn fire_next_timer(&mut self) {
        let Some(Reverse((at, i))) = self.timers.pop() else {
            return;
        };
        if self.down.contains(&i) || self.nodes[i].poll_timeout() != Some(at) {
            return;
        }
        self.nodes[i].handle_timeout(at);
        self.drain(i);
    }

    /// Moves node `i`'s outputs into the network and its next timeout into the timer queue.
    fn drain(&mut self, i: usize) {
        while let Some(transmit) = self.nodes[i].poll_transmit() {
            self.send(i, transmit);
        }
        while self.nodes[i].poll_event().is_some() {}
        if let Some(at) = self.nodes[i].poll_timeout() {
            self.timers.push(Reverse((at, i)));
        }
    }

    fn send(&mut self, from: usize, transmit: Transmit) {
        let to = match &transmit.to.name {
            Some(name) => self.index.get(name).copied(),
            None => self
                .nodes
                .iter()
                .position(|node| node.me().addr == transmit.to.addr),
        };
        let Some(to) = to else {
            self.dropped += 1;
            return;
        };
        if transmit.channel == Channel::Datagram
            && self.rng.random::<f64>() < self.network.datagram_loss
        {
            self.dropped += 1;
            return;
        }
        let jitter = if self.network.jitter.is_zero() {
            Duration::ZERO
        } else {
            self.network.jitter.mul_f64(self.rng.random::<f64>())
        };
        self.sequence += 1;
        let arrival = self.now + self.network.latency + jitter;
        self.in_flight.push(Reverse((arrival, self.sequence, to)));
        self.envelopes
            .insert(self.sequence, (from, to, transmit.payload));
    }
}

/// The `i`-th simulated member.
pub fn member(i: usize) -> Member {
    let name = MemberName::new(format!("node-{i}")).expect("generated names are valid");
    let addr = SocketAddr::from((
        Ipv4Addr::new(127, 1 + (i >> 16) as u8, (i >> 8) as u8, i as u8),
        7701,
    ));
    Member::new(name, NodeId(i as u64 + 1), addr)
}

fn shuffle<T>(items: &mut [T], rng: &mut SmallRng) {
    for i in (1..items.len()).rev() {
        let j = rng.random_range(0..=i);
        items.swap(i, j);
    }
}
