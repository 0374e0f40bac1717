//! A message-level simulation of a whole cluster: many [`Node`]s, a latency model, loss and
//! partitions, all in simulated time. No sockets, no QUIC: it measures the protocol itself, at sizes
//! no single machine could run for real.
//!
//! Every step costs O(log m) for m events pending, never O(nodes): messages and timers wait in
//! binary heaps, a node's pending timeout is queued once, partitions are a per-node signature, and
//! tracked writes are checked only at the node a message was delivered to.

use std::cmp::{Ordering, Reverse};
use std::collections::{BinaryHeap, HashMap};
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};

use crate::crdt::{self, Delta, Dot, NodeId, Replica, ReplicaConfig};
use crate::gossip::{Channel, Config, Event, Member, MemberName, Node, Stats, Transmit};

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

/// A message in flight, ordered by arrival (then by sending order, so runs are reproducible).
struct Envelope {
    at: Instant,
    sequence: u64,
    from: u32,
    to: u32,
    payload: Vec<u8>,
}

impl PartialEq for Envelope {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Envelope {}

impl PartialOrd for Envelope {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Envelope {
    /// Reversed, so the max-heap pops the earliest arrival.
    fn cmp(&self, other: &Self) -> Ordering {
        (other.at, other.sequence).cmp(&(self.at, self.sequence))
    }
}

/// How one tracked write spread: when each node first held it, and the hops it reported.
#[derive(Clone, Debug)]
pub struct Delivery {
    written_at: Instant,
    writer: usize,
    /// Microseconds after the write at which each node first held it; `u32::MAX`: not yet.
    arrivals: Vec<u32>,
    informed: usize,
    complete_at: Option<Instant>,
    hops: Vec<u16>,
}

impl Delivery {
    const NOT_YET: u32 = u32::MAX;

    /// When the write was made.
    pub fn written_at(&self) -> Instant {
        self.written_at
    }

    /// The node that made it.
    pub fn writer(&self) -> usize {
        self.writer
    }

    /// Nodes that hold the write, the writer included.
    pub fn informed(&self) -> usize {
        self.informed
    }

    /// How long after the write every node held it, once they all do.
    pub fn complete_after(&self) -> Option<Duration> {
        self.complete_at.map(|at| at - self.written_at)
    }

    /// How long after the write node `i` first held it.
    pub fn arrival(&self, i: usize) -> Option<Duration> {
        let micros = *self.arrivals.get(i)?;
        (micros != Self::NOT_YET).then(|| Duration::from_micros(u64::from(micros)))
    }

    /// How long after the write at least `fraction` (0–1) of the nodes held it.
    pub fn time_to_fraction(&self, fraction: f64) -> Option<Duration> {
        let mut times: Vec<u32> = self
            .arrivals
            .iter()
            .copied()
            .filter(|&t| t != Self::NOT_YET)
            .collect();
        let needed = ((fraction * self.arrivals.len() as f64).ceil() as usize).max(1);
        if times.len() < needed {
            return None;
        }
        times.sort_unstable();
        Some(Duration::from_micros(u64::from(times[needed - 1])))
    }

    /// The hop counts of [`Event::WriteReceived`], one per node that got the write pushed (not the
    /// writer, and not nodes that got it through anti-entropy).
    pub fn hops(&self) -> &[u16] {
        &self.hops
    }
}

/// A simulated cluster.
pub struct Simulation {
    nodes: Vec<Node>,
    /// Names and addresses never change (a rejoin bumps only the generation).
    names: Vec<MemberName>,
    index: HashMap<MemberName, usize>,
    by_addr: HashMap<SocketAddr, usize>,
    now: Instant,
    network: NetworkModel,
    rng: SmallRng,
    in_flight: BinaryHeap<Envelope>,
    /// Node timers: (when, node). An entry whose node no longer waits for that time is skipped.
    timers: BinaryHeap<Reverse<(Instant, u32)>>,
    /// The earliest timer entry queued for each node, so a drain does not queue it again.
    armed: Vec<Option<Instant>>,
    /// Partitions: each cut XORs a value into the signature of the nodes on one side, so two nodes
    /// can talk iff their signatures are equal (they were on the same side of every cut).
    side: Vec<u64>,
    cuts: u64,
    down: Vec<bool>,
    sequence: u64,
    /// Writes whose spread is recorded, and those not yet everywhere (checked on each delivery).
    tracked: HashMap<Dot, Delivery>,
    incomplete: Vec<Dot>,
    /// Messages delivered so far, and their bytes.
    pub delivered: (u64, u64),
    /// Messages dropped by loss, partitions or crashed receivers.
    pub dropped: u64,
    /// Messages a node refused (malformed, forged, or not applicable).
    pub refused: u64,
    /// Membership events the nodes reported: (up, down, rejoined).
    pub membership_events: (u64, u64, u64),
}

impl Simulation {
    /// `size` nodes named `node-0`…, each knowing every other from the start (no join phase).
    ///
    /// That is `size²` membership entries: use [`Simulation::with_view`] for large clusters.
    pub fn new(
        size: usize,
        config: Config,
        network: NetworkModel,
        seed: u64,
        start: Instant,
    ) -> Self {
        Self::build(size, None, config, network, seed, start)
    }

    /// `size` nodes, each knowing only `view` random others at the start; SWIM spreads the rest
    /// of the membership as it runs. Memory grows with what the nodes have learned, not `size²`.
    pub fn with_view(
        size: usize,
        view: usize,
        config: Config,
        network: NetworkModel,
        seed: u64,
        start: Instant,
    ) -> Self {
        Self::build(size, Some(view), config, network, seed, start)
    }

    fn build(
        size: usize,
        view: Option<usize>,
        config: Config,
        network: NetworkModel,
        seed: u64,
        start: Instant,
    ) -> Self {
        assert!(size <= u32::MAX as usize, "too many simulated nodes");
        let members: Vec<Member> = (0..size).map(member).collect();
        let mut rng = SmallRng::seed_from_u64(seed);
        let mut nodes = Vec::with_capacity(size);
        // Nodes start at random moments within one anti-entropy interval before `start`, as a real
        // cluster's would: were they all started together, every node would probe and open
        // anti-entropy at the same instant, every second, for the whole run.
        let spread = config.anti_entropy_interval;
        for (i, me) in members.iter().enumerate() {
            let replica = Replica::with_config(me.replica, ReplicaConfig::default());
            let born = start
                .checked_sub(spread.mul_f64(rng.random::<f64>()))
                .unwrap_or(start);
            let mut node = Node::new(me.clone(), replica, config.clone(), rng.random(), born)
                .expect("simulation configs are valid");
            // Each node learns the others in its own random order, so push trees differ.
            let others: Vec<Member> = match view {
                None => {
                    let mut others: Vec<Member> = members
                        .iter()
                        .filter(|m| m.name != me.name)
                        .cloned()
                        .collect();
                    shuffle(&mut others, &mut rng);
                    others
                }
                Some(view) => sample_others(size, i, view, &mut rng)
                    .into_iter()
                    .map(|j| members[j].clone())
                    .collect(),
            };
            node.add_members(others, born);
            nodes.push(node);
        }
        let names: Vec<MemberName> = members.iter().map(|m| m.name.clone()).collect();
        let index = names
            .iter()
            .enumerate()
            .map(|(i, name)| (name.clone(), i))
            .collect();
        let by_addr = members
            .iter()
            .enumerate()
            .map(|(i, m)| (m.addr, i))
            .collect();
        let mut simulation = Simulation {
            nodes,
            names,
            index,
            by_addr,
            now: start,
            network,
            rng,
            in_flight: BinaryHeap::new(),
            timers: BinaryHeap::new(),
            armed: vec![None; size],
            side: vec![0; size],
            cuts: 0,
            down: vec![false; size],
            sequence: 0,
            tracked: HashMap::new(),
            incomplete: Vec::new(),
            delivered: (0, 0),
            dropped: 0,
            refused: 0,
            membership_events: (0, 0, 0),
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

    /// Messages in flight.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Every node's [`Stats`] added up.
    pub fn total_stats(&self) -> Stats {
        let mut total = Stats::default();
        for node in &self.nodes {
            let s = node.stats();
            total.messages_sent += s.messages_sent;
            total.bytes_sent += s.bytes_sent;
            for (kind, bytes) in &s.bytes_sent_by_kind {
                *total.bytes_sent_by_kind.entry(kind).or_default() += bytes;
            }
            total.messages_received += s.messages_received;
            total.bytes_received += s.bytes_received;
            total.writes_received += s.writes_received;
            total.duplicate_writes += s.duplicate_writes;
            total.grafts += s.grafts;
            total.anti_entropy_rounds += s.anti_entropy_rounds;
            total.anti_entropy_repairs += s.anti_entropy_repairs;
            total.rejected_messages += s.rejected_messages;
            total.tombstones_collected += s.tombstones_collected;
        }
        total
    }

    /// Makes a local write at node `i` and lets it leave.
    pub fn write(
        &mut self,
        i: usize,
        op: impl FnOnce(&mut Replica) -> Result<Option<Delta>, crdt::Error>,
    ) -> Result<Option<Dot>, crdt::Error> {
        let ((), dot) = self.nodes[i].write_many(self.now, |replica| {
            Ok::<_, crdt::Error>(((), op(replica)?.into_iter().collect()))
        })?;
        self.drain(i);
        Ok(dot)
    }

    /// Records how write `dot` spreads from now on: when each node first holds it (however it got
    /// there: push, graft or anti-entropy) and the hops of each [`Event::WriteReceived`]. Call it
    /// right after [`Simulation::write`], before the simulation runs on.
    pub fn track(&mut self, dot: Dot) {
        if self.tracked.contains_key(&dot) {
            return;
        }
        let writer = self
            .nodes
            .iter()
            .position(|node| node.me().replica == dot.node)
            .unwrap_or(usize::MAX);
        let mut delivery = Delivery {
            written_at: self.now,
            writer,
            arrivals: vec![Delivery::NOT_YET; self.nodes.len()],
            informed: 0,
            complete_at: None,
            hops: Vec::new(),
        };
        for (i, node) in self.nodes.iter().enumerate() {
            if node.replica().knows(dot) {
                delivery.arrivals[i] = 0;
                delivery.informed += 1;
            }
        }
        if delivery.informed == self.nodes.len() {
            delivery.complete_at = Some(self.now);
        } else {
            self.incomplete.push(dot);
        }
        self.tracked.insert(dot, delivery);
    }

    /// How tracked write `dot` spread so far.
    pub fn delivery(&self, dot: Dot) -> Option<&Delivery> {
        self.tracked.get(&dot)
    }

    /// Stops tracking `dot` and returns what was recorded.
    pub fn untrack(&mut self, dot: Dot) -> Option<Delivery> {
        self.incomplete.retain(|d| *d != dot);
        self.tracked.remove(&dot)
    }

    /// Whether every tracked write has reached every node.
    pub fn tracked_complete(&self) -> bool {
        self.incomplete.is_empty()
    }

    /// Cuts every link between `side` and the other nodes.
    pub fn partition(&mut self, side: &[usize]) {
        self.cuts += 1;
        let mark = splitmix64(self.cuts);
        let mut seen = vec![false; self.nodes.len()];
        for &i in side {
            if !std::mem::replace(&mut seen[i], true) {
                self.side[i] ^= mark;
            }
        }
    }

    /// Restores every link.
    pub fn heal(&mut self) {
        self.side.fill(0);
    }

    /// Stops node `i`: it neither receives nor runs timers until [`Simulation::restart`].
    pub fn crash(&mut self, i: usize) {
        self.down[i] = true;
    }

    /// Brings a crashed node back with the state it had (a restart from durable storage).
    pub fn restart(&mut self, i: usize) {
        self.down[i] = false;
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
            let next_message = self.in_flight.peek().map(|envelope| envelope.at);
            let next_timer = self.timers.peek().map(|Reverse((at, _))| *at);
            let next = match (next_message, next_timer) {
                (Some(a), Some(b)) => a.min(b),
                (Some(a), None) | (None, Some(a)) => a,
                (None, None) => {
                    self.now = self.now.max(deadline);
                    return done(self);
                }
            };
            if next > deadline {
                self.now = self.now.max(deadline);
                return done(self);
            }
            // Timers of nodes started before the simulation may be due before its start.
            self.now = self.now.max(next);
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
        let Some(Envelope {
            from, to, payload, ..
        }) = self.in_flight.pop()
        else {
            return;
        };
        let (from, to) = (from as usize, to as usize);
        if self.down[to] || self.side[from] != self.side[to] {
            self.dropped += 1;
            return;
        }
        self.delivered.0 += 1;
        self.delivered.1 += payload.len() as u64;
        let addr = member_addr(from);
        let now = self.now;
        if self.nodes[to]
            .handle_message(&self.names[from], addr, &payload, now)
            .is_err()
        {
            self.refused += 1;
        }
        if !self.incomplete.is_empty() {
            self.note_arrivals(to);
        }
        self.drain(to);
    }

    /// Records which incomplete tracked writes node `i` holds now.
    fn note_arrivals(&mut self, i: usize) {
        let now = self.now;
        let size = self.nodes.len();
        let replica = self.nodes[i].replica();
        let mut finished = false;
        for dot in &self.incomplete {
            let Some(delivery) = self.tracked.get_mut(dot) else {
                continue;
            };
            if delivery.arrivals[i] != Delivery::NOT_YET || !replica.knows(*dot) {
                continue;
            }
            let micros = (now - delivery.written_at).as_micros();
            delivery.arrivals[i] = u32::try_from(micros).unwrap_or(u32::MAX - 1);
            delivery.informed += 1;
            if delivery.informed == size {
                delivery.complete_at = Some(now);
                finished = true;
            }
        }
        if finished {
            let tracked = &self.tracked;
            self.incomplete
                .retain(|dot| tracked.get(dot).is_some_and(|d| d.complete_at.is_none()));
        }
    }

    fn fire_next_timer(&mut self) {
        let Some(Reverse((at, i))) = self.timers.pop() else {
            return;
        };
        let i = i as usize;
        if self.armed[i] == Some(at) {
            self.armed[i] = None;
        }
        if self.down[i] {
            return;
        }
        let now = self.now;
        if self.nodes[i].poll_timeout().is_some_and(|due| due <= now) {
            self.nodes[i].handle_timeout(now);
        }
        self.drain(i);
    }

    /// Moves node `i`'s outputs into the network and its next timeout into the timer queue.
    fn drain(&mut self, i: usize) {
        while let Some(transmit) = self.nodes[i].poll_transmit() {
            self.send(i, transmit);
        }
        while let Some(event) = self.nodes[i].poll_event() {
            match event {
                Event::WriteReceived { dot, hops } => {
                    if let Some(delivery) = self.tracked.get_mut(&dot) {
                        delivery.hops.push(hops);
                    }
                }
                Event::MemberUp(_) => self.membership_events.0 += 1,
                Event::MemberDown(_) => self.membership_events.1 += 1,
                Event::Rejoined(_) => self.membership_events.2 += 1,
                // For events added later.
                #[allow(unreachable_patterns)]
                _ => {}
            }
        }
        if let Some(at) = self.nodes[i].poll_timeout()
            && self.armed[i].is_none_or(|armed| at < armed)
        {
            self.armed[i] = Some(at);
            self.timers.push(Reverse((at, i as u32)));
        }
    }

    fn send(&mut self, from: usize, transmit: Transmit) {
        let to = match &transmit.to.name {
            Some(name) => self.index.get(name).copied(),
            None => self.by_addr.get(&transmit.to.addr).copied(),
        };
        let Some(to) = to else {
            self.dropped += 1;
            return;
        };
        if transmit.channel == Channel::Datagram
            && self.network.datagram_loss > 0.0
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
        self.in_flight.push(Envelope {
            at: self.now + self.network.latency + jitter,
            sequence: self.sequence,
            from: from as u32,
            to: to as u32,
            payload: transmit.payload,
        });
    }
}

/// The `i`-th simulated member.
pub fn member(i: usize) -> Member {
    let name = MemberName::new(format!("node-{i}")).expect("generated names are valid");
    Member::new(name, NodeId(i as u64 + 1), member_addr(i))
}

fn member_addr(i: usize) -> SocketAddr {
    SocketAddr::from((
        Ipv4Addr::new(127, 1 + (i >> 16) as u8, (i >> 8) as u8, i as u8),
        7701,
    ))
}

fn shuffle<T>(items: &mut [T], rng: &mut SmallRng) {
    for i in (1..items.len()).rev() {
        let j = rng.random_range(0..=i);
        items.swap(i, j);
    }
}

/// `view` distinct random indices in `0..size`, none of them `me`, in random order.
fn sample_others(size: usize, me: usize, view: usize, rng: &mut SmallRng) -> Vec<usize> {
    let view = view.min(size.saturating_sub(1));
    if view * 4 >= size {
        let mut others: Vec<usize> = (0..size).filter(|&j| j != me).collect();
        shuffle(&mut others, rng);
        others.truncate(view);
        return others;
    }
    let mut chosen = Vec::with_capacity(view);
    while chosen.len() < view {
        let j = rng.random_range(0..size);
        if j != me && !chosen.contains(&j) {
            chosen.push(j);
        }
    }
    chosen
}

fn splitmix64(n: u64) -> u64 {
    let mut z = n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether every node counts every other one alive (by name, as the application sees it).
    fn everyone_live(sim: &Simulation) -> bool {
        let others = sim.nodes().len() - 1;
        sim.nodes()
            .iter()
            .all(|node| node.members().count() == others)
    }

    /// Runs `sim` through `schedule` (milliseconds after the start: cut off a side, or heal with
    /// an empty side), then returns whether the heal left anything to repair, and whether every
    /// node counted every other one alive within the bound after the last heal.
    fn heals_within_the_bound(sim: &mut Simulation, schedule: &[(u64, &[usize])]) -> (bool, bool) {
        let start = sim.now();
        for &(at, side) in schedule {
            sim.run_until(start + Duration::from_millis(at), |_| false);
            if side.is_empty() {
                sim.heal();
            } else {
                sim.partition(side);
            }
        }
        let broken = !everyone_live(sim);
        let deadline = sim.now() + Config::lan().membership_heal_bound();
        (broken, sim.run_until(deadline, everyone_live))
    }

    /// Regression test: two partitions in a row (the fault schedule that showed it in the
    /// scheduling simulation) left members that each side had declared down out of the other
    /// side's live set for up to a minute, until SWIM's announcement to members counted as down
    /// came round again.
    #[test]
    fn members_declared_down_in_two_partitions_in_a_row_are_live_everywhere_soon_after_the_heal() {
        let schedule: &[(u64, &[usize])] = &[
            (398, &[4, 5]),
            (6_932, &[]),
            (7_369, &[0, 1, 4]),
            (13_921, &[]),
        ];
        let mut repaired = 0;
        for seed in 0..10 {
            let mut sim = Simulation::new(
                6,
                Config::lan(),
                NetworkModel::default(),
                seed,
                Instant::now(),
            );
            let (broken, healed) = heals_within_the_bound(&mut sim, schedule);
            assert!(healed, "seed {seed}: not everyone live within the bound");
            repaired += usize::from(broken);
        }
        assert!(
            repaired > 0,
            "no seed left a member counted down at the heal"
        );
    }

    /// Each side of a long partition declares the other down, so neither probes the other after
    /// the heal; announcements to members counted as down must bridge it.
    #[test]
    fn both_sides_of_a_long_partition_count_each_other_live_soon_after_the_heal() {
        for seed in 0..5 {
            let network = NetworkModel {
                jitter: Duration::from_millis(3),
                datagram_loss: 0.05,
                ..NetworkModel::default()
            };
            let mut sim = Simulation::new(20, Config::lan(), network, seed, Instant::now());
            let side: Vec<usize> = (0..20).filter(|i| i % 3 == 0).collect();
            let (broken, healed) =
                heals_within_the_bound(&mut sim, &[(1_000, &side), (21_000, &[])]);
            assert!(broken, "seed {seed}: the partition declared nobody down");
            assert!(healed, "seed {seed}: not everyone live within the bound");
        }
    }

    /// A member that counts every other one down runs no SWIM timer at all, and these nodes have
    /// no seeds: only its own announcements to the members it counts down can bring it back.
    #[test]
    fn members_that_count_everyone_down_find_each_other_after_the_heal() {
        for seed in 0..5 {
            let mut sim = Simulation::new(
                2,
                Config::lan(),
                NetworkModel::default(),
                seed,
                Instant::now(),
            );
            let (broken, healed) =
                heals_within_the_bound(&mut sim, &[(1_000, &[0]), (21_000, &[])]);
            assert!(broken, "seed {seed}: the partition declared nobody down");
            assert!(healed, "seed {seed}: not everyone live within the bound");
        }
    }
}
