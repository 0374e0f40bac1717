//! The protocol state machine of one member: membership, dissemination and anti-entropy, sans IO.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::SocketAddr;
use std::time::Instant;

use foca::{Foca, NoCustomBroadcast, Notification, PostcardCodec, Timer};
use rand::SeedableRng;
use rand::rngs::SmallRng;
use rand::seq::IteratorRandom;

use crate::crdt::{self, Applied, Delta, Dot, Replica, VersionVector, Write};
use crate::gossip::message::{MAX_DOTS_PER_MESSAGE, Message, version_hash};
use crate::gossip::recent::RecentWrites;
use crate::gossip::{Config, ConfigError, Member, MemberName};

/// How many members counted as down a member that knows no live one announces itself to, each
/// anti-entropy interval.
const DOWN_MEMBERS_ANNOUNCED: usize = 3;

/// Where a message goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Destination {
    /// The member's certified name; `None` for a seed address whose member is not known yet, where
    /// any certificate of the cluster is accepted.
    pub name: Option<MemberName>,
    /// Where to reach it.
    pub addr: SocketAddr,
}

/// How a message should travel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Channel {
    /// An unreliable datagram: SWIM probes, which tolerate loss.
    Datagram,
    /// A reliable stream: writes, anti-entropy, snapshots.
    Stream,
}

/// A message for the runtime to send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transmit {
    /// The recipient.
    pub to: Destination,
    /// The channel it needs.
    pub channel: Channel,
    /// The encoded message.
    pub payload: Vec<u8>,
    /// When the message is one piece of a larger one (a sync delta sent in pieces), which: the
    /// receiver can use the pieces only all together, so a runtime that must drop messages
    /// should queue all pieces of a transfer or none. They are polled one after another.
    pub part: Option<Part>,
}

/// Which piece of a transfer a [`Transmit`] carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Part {
    /// Names the transfer among this node's transfers.
    pub transfer: u64,
    /// The piece's position, from 0.
    pub index: u32,
    /// How many pieces the transfer has.
    pub count: u32,
}

/// Something the application may want to know about.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// A member joined or came back.
    MemberUp(Member),
    /// A member left or was declared down.
    MemberDown(Member),
    /// This node was declared down by the others and rejoined under a new generation.
    Rejoined(Member),
    /// A peer's write arrived for the first time through dissemination, after `hops` forwards.
    WriteReceived {
        /// The write.
        dot: Dot,
        /// How many members forwarded it before this one (0: straight from its writer).
        hops: u16,
    },
}

/// Why a message from a peer was dropped. Dropping never changes the node's state.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProtocolError {
    /// The bytes are not a valid message.
    #[error("malformed message: {0}")]
    Malformed(#[source] crdt::Error),
    /// A SWIM packet named a sender other than the authenticated peer.
    #[error("peer {authenticated} sent a membership packet claiming to be {claimed}")]
    Impersonation {
        /// The name in the packet.
        claimed: String,
        /// The name its certificate proves.
        authenticated: MemberName,
    },
    /// The membership layer refused the packet.
    #[error("membership packet refused: {0}")]
    Swim(String),
    /// A write could not be applied (for instance, the hold-back buffer is full).
    #[error("write not applied: {0}")]
    Apply(#[source] crdt::Error),
}

/// Counters of what the node sent and received.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Messages handed to the runtime.
    pub messages_sent: u64,
    /// Bytes handed to the runtime.
    pub bytes_sent: u64,
    /// Bytes sent, by message kind (`swim`, `push`, `ihave`, `digest`, …).
    pub bytes_sent_by_kind: BTreeMap<&'static str, u64>,
    /// Messages received from peers.
    pub messages_received: u64,
    /// Bytes received from peers.
    pub bytes_received: u64,
    /// Peers' writes received for the first time through dissemination.
    pub writes_received: u64,
    /// Peers' writes received again: the redundancy the push tree prunes away.
    pub duplicate_writes: u64,
    /// Writes asked for after an announcement because the tree did not deliver them in time.
    pub grafts: u64,
    /// Anti-entropy rounds this node opened.
    pub anti_entropy_rounds: u64,
    /// Anti-entropy rounds that found something to exchange.
    pub anti_entropy_repairs: u64,
    /// Messages dropped because they were malformed or forged.
    pub rejected_messages: u64,
    /// Tombstones collected.
    pub tombstones_collected: u64,
}

/// What the node will do when a timer fires.
#[derive(Clone, Debug)]
enum Task {
    Swim(Timer<Member>),
    Announce,
    Graft,
    AntiEntropy,
    CollectGarbage,
}

/// One member's protocol state machine.
///
/// Inputs are [`Node::handle_message`], [`Node::handle_timeout`] and the local writes of
/// [`Node::write`], each with the current time passed in; outputs are drained with
/// [`Node::poll_transmit`], [`Node::poll_timeout`] and [`Node::poll_event`]. It never touches a
/// socket or a clock, and its randomness comes from the seed it was built with, so a run is
/// reproducible.
pub struct Node {
    me: Member,
    config: Config,
    replica: Replica,
    swim: Foca<Member, PostcardCodec, SmallRng, NoCustomBroadcast>,
    rng: SmallRng,
    /// Members SWIM considers alive, by name.
    members: BTreeMap<MemberName, Member>,
    /// Where to announce this member while it knows no other.
    seeds: Vec<SocketAddr>,
    /// Where each peer was last reached or said it could be.
    addresses: BTreeMap<MemberName, SocketAddr>,
    /// Peers that get new writes pushed in full.
    eager: BTreeSet<MemberName>,
    /// Peers that only get announcements.
    lazy: BTreeSet<MemberName>,
    /// Writes made or received recently, to forward and to answer grafts.
    recent: RecentWrites,
    /// Local writes not yet pushed (pushed together at the next poll).
    outgoing: Vec<Delta>,
    /// Announcements waiting for the next announce task, by peer.
    announcements: BTreeMap<MemberName, Vec<Dot>>,
    /// Announced writes not received yet: who announced them, and when to ask.
    missing: BTreeMap<Dot, Missing>,
    /// The last version vector each member was known to have, for causal stability.
    reports: BTreeMap<MemberName, VersionVector>,
    /// Sync deltas arriving in pieces, by sender.
    transfers: BTreeMap<MemberName, Transfer>,
    /// Numbers this node's outgoing transfers.
    transfer_seq: u64,
    /// The digest this node last opened anti-entropy with: (peer, hash, vector).
    last_digest: Option<(MemberName, u64, VersionVector)>,
    tasks: BTreeMap<(Instant, u64), Task>,
    /// The latest time any input carried.
    now: Instant,
    task_seq: u64,
    announce_scheduled: bool,
    outbox: VecDeque<Transmit>,
    events: VecDeque<Event>,
    /// Deltas that changed the replica, kept for the host to persist; `None` when not asked for.
    journal: Option<VecDeque<Delta>>,
    stats: Stats,
}

/// A sync delta being received in pieces.
#[derive(Debug)]
struct Transfer {
    id: u64,
    pieces: Vec<Option<Vec<u8>>>,
    bytes: usize,
    started: Instant,
}

#[derive(Clone, Debug)]
struct Missing {
    announcers: Vec<MemberName>,
    ask_at: Instant,
}

impl Node {
    /// A node for `me` holding `replica`. `seed` drives every random choice.
    pub fn new(
        me: Member,
        replica: Replica,
        config: Config,
        seed: u64,
        now: Instant,
    ) -> Result<Self, ConfigError> {
        config.validate()?;
        let swim = Foca::new(
            me.clone(),
            config.swim(),
            SmallRng::seed_from_u64(seed),
            PostcardCodec,
        );
        let mut node = Node {
            me,
            recent: RecentWrites::new(config.recent_writes, config.recent_writes_bytes),
            config,
            replica,
            swim,
            rng: SmallRng::seed_from_u64(seed ^ 0x5eed_0f90_551b),
            members: BTreeMap::new(),
            seeds: Vec::new(),
            addresses: BTreeMap::new(),
            eager: BTreeSet::new(),
            lazy: BTreeSet::new(),
            outgoing: Vec::new(),
            announcements: BTreeMap::new(),
            missing: BTreeMap::new(),
            reports: BTreeMap::new(),
            transfers: BTreeMap::new(),
            transfer_seq: 0,
            last_digest: None,
            tasks: BTreeMap::new(),
            now,
            task_seq: 0,
            announce_scheduled: false,
            outbox: VecDeque::new(),
            events: VecDeque::new(),
            journal: None,
            stats: Stats::default(),
        };
        let first_round = now + node.config.anti_entropy_interval;
        node.schedule(first_round, Task::AntiEntropy);
        node.schedule(now + node.config.gc_interval, Task::CollectGarbage);
        Ok(node)
    }

    // ---- views ----

    /// This member.
    pub fn me(&self) -> &Member {
        &self.me
    }

    /// The protocol settings.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// How many recent writes are kept to forward and to answer peers, and their bytes.
    pub fn recent_usage(&self) -> (usize, usize) {
        self.recent.usage()
    }

    /// The replica, for reads.
    pub fn replica(&self) -> &Replica {
        &self.replica
    }

    /// The members SWIM considers alive (without this one).
    pub fn members(&self) -> impl Iterator<Item = &Member> {
        self.members.values()
    }

    /// What the node has sent and received.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// The last version vector each member was known to have.
    pub fn reports(&self) -> &BTreeMap<MemberName, VersionVector> {
        &self.reports
    }

    /// The peers this node pushes writes to eagerly, and those it only announces them to.
    pub fn push_peers(&self) -> (&BTreeSet<MemberName>, &BTreeSet<MemberName>) {
        (&self.eager, &self.lazy)
    }

    // ---- inputs ----

    /// Joins the cluster through members at `seeds`. The announcement is repeated every
    /// anti-entropy interval to every seed while no member is known, since it travels as a
    /// datagram and may be lost, and for good to each seed SWIM has never heard of: members that
    /// found each other while their announcements to a seed were lost would otherwise form a
    /// cluster of their own.
    pub fn join(&mut self, seeds: &[SocketAddr], now: Instant) {
        self.seeds = seeds.to_vec();
        self.announce_to_seeds(now);
    }

    /// Announces this member to a few members SWIM counts as down. SWIM does so itself every
    /// probe period, but only while it knows a live member: a member that counts everyone else as
    /// down, and whose seeds are gone or on its own side, would otherwise wait for the others to
    /// reach it.
    fn announce_to_down_members(&mut self, now: Instant) {
        let down: Vec<Member> = self
            .swim
            .iter_membership_state()
            .filter(|member| member.state() == foca::State::Down)
            .map(|member| member.id().clone())
            .sample(&mut self.rng, DOWN_MEMBERS_ANNOUNCED);
        for member in down {
            let mut runtime = self.swim_runtime(now);
            // Announce fails only for our own identity, which SWIM never lists.
            let _ = self.swim.announce(member, &mut runtime);
            self.absorb_swim(runtime);
        }
    }

    /// Announces this member to every seed while it knows no live member, and otherwise to the
    /// seeds SWIM knows nothing of (those it counts down get the announcements of
    /// [`Config::swim`]).
    fn announce_to_seeds(&mut self, now: Instant) {
        let alone = self.members.is_empty();
        let known: BTreeSet<SocketAddr> = self
            .swim
            .iter_membership_state()
            .map(|member| member.id().addr)
            .collect();
        for addr in self.seeds.clone() {
            if addr == self.me.addr || (!alone && known.contains(&addr)) {
                continue;
            }
            let mut runtime = self.swim_runtime(now);
            // Announce fails only for our own identity, which was skipped above.
            let _ = self.swim.announce(Member::seed(addr), &mut runtime);
            self.absorb_swim(runtime);
        }
    }

    /// Learns members directly (for tests and simulations that skip the join phase).
    pub fn add_members(&mut self, members: impl IntoIterator<Item = Member>, now: Instant) {
        let updates: Vec<_> = members
            .into_iter()
            .filter(|member| member.name != self.me.name)
            .map(foca::Member::alive)
            .collect();
        let mut runtime = self.swim_runtime(now);
        let _ = self
            .swim
            .apply_many(updates.into_iter(), false, &mut runtime);
        self.absorb_swim(runtime);
    }

    /// Announces that this member is leaving; peers stop probing it at once.
    pub fn leave(&mut self, now: Instant) {
        let mut runtime = self.swim_runtime(now);
        let _ = self.swim.leave_cluster(&mut runtime);
        self.absorb_swim(runtime);
    }

    /// Makes a local write, timestamped `wall_millis`, and disseminates its delta.
    ///
    /// Returns the write's dot, or `None` when it changed nothing (a delete of an absent key).
    /// On an error nothing changed.
    pub fn write(
        &mut self,
        now: Instant,
        wall_millis: u64,
        write: Write,
    ) -> Result<Option<Dot>, crdt::Error> {
        self.now = self.now.max(now);
        let Some(delta) = write.apply_to(&mut self.replica, wall_millis)? else {
            return Ok(None);
        };
        Ok(self.disseminate(delta))
    }

    /// Makes several local writes with `op` (a scheduling round, say) and disseminates every
    /// delta it returns, in order. Returns what `op` returned besides the deltas, and the dot of
    /// its last write.
    ///
    /// `op` must return every delta it made: a write it keeps to itself still reaches peers by
    /// anti-entropy, but late, and storage only at the next checkpoint.
    pub fn write_many<T, E>(
        &mut self,
        now: Instant,
        op: impl FnOnce(&mut Replica) -> Result<(T, Vec<Delta>), E>,
    ) -> Result<(T, Option<Dot>), E> {
        self.now = self.now.max(now);
        let (output, deltas) = op(&mut self.replica)?;
        let mut last = None;
        for delta in deltas {
            last = self.disseminate(delta).or(last);
        }
        Ok((output, last))
    }

    /// Journals a local write's delta and queues it for the next push.
    fn disseminate(&mut self, delta: Delta) -> Option<Dot> {
        let dot = delta.dot();
        if let Some(journal) = &mut self.journal {
            journal.push_back(delta.clone());
        }
        if let Some(dot) = dot {
            self.recent.insert(dot, delta.clone());
            self.outgoing.push(delta);
        }
        dot
    }

    /// Handles a message from the peer whose certificate proves it is `from`, reached at `addr`.
    pub fn handle_message(
        &mut self,
        from: &MemberName,
        addr: SocketAddr,
        bytes: &[u8],
        now: Instant,
    ) -> Result<(), ProtocolError> {
        self.now = self.now.max(now);
        self.stats.messages_received += 1;
        self.stats.bytes_received += bytes.len() as u64;
        if bytes.len() > self.config.max_message_bytes {
            self.stats.rejected_messages += 1;
            return Err(ProtocolError::Malformed(crdt::Error::TooLarge {
                what: "message",
                len: bytes.len(),
                max: self.config.max_message_bytes,
            }));
        }
        let message = Message::decode(bytes).map_err(|err| {
            self.stats.rejected_messages += 1;
            ProtocolError::Malformed(err)
        })?;
        self.addresses.insert(from.clone(), addr);
        match message {
            Message::Swim(packet) => self.on_swim(from, &packet, now),
            Message::Push { hops, deltas } => self.on_push(from, hops, deltas),
            Message::IHave(dots) => {
                self.on_ihave(from, dots, now);
                Ok(())
            }
            Message::Graft(dots) => {
                self.on_graft(from, &dots);
                Ok(())
            }
            Message::Prune => {
                if self.eager.remove(from) {
                    self.lazy.insert(from.clone());
                }
                Ok(())
            }
            Message::Digest { hash } => {
                self.on_digest(from, hash);
                Ok(())
            }
            Message::InSync { hash } => {
                if let Some((peer, sent, version)) = self.last_digest.take()
                    && &peer == from
                    && sent == hash
                {
                    self.reports.insert(peer, version);
                }
                Ok(())
            }
            Message::SyncRequest { version, reply } => {
                self.on_sync_request(from, version, reply);
                Ok(())
            }
            Message::SyncChunk {
                transfer,
                index,
                count,
                bytes,
            } => self.on_sync_chunk(from, transfer, index, count, bytes, now),
            Message::Sync(delta) => self
                .apply_remote(delta)
                .map(drop)
                .map_err(ProtocolError::Apply),
        }
    }

    /// Runs every task due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.now = self.now.max(now);
        while let Some(entry) = self.tasks.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let task = entry.remove();
            self.run(task, now);
        }
    }

    // ---- outputs ----

    /// The next message to send.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        if !self.outgoing.is_empty() {
            self.push_local_writes();
        }
        self.outbox.pop_front()
    }

    /// When [`Node::handle_timeout`] should next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.tasks.keys().next().map(|(at, _)| *at)
    }

    /// The next event for the application.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Asks the node to keep every delta that changes its replica — local writes and peers'
    /// deltas, including those held back for their causes — for [`Node::poll_applied`]. Replaying
    /// them in order onto the replica as it was when journaling started rebuilds its state.
    pub fn enable_journal(&mut self) {
        self.journal.get_or_insert_with(VecDeque::new);
    }

    /// The next delta that changed the replica, when the journal is enabled.
    pub fn poll_applied(&mut self) -> Option<Delta> {
        self.journal.as_mut()?.pop_front()
    }

    /// Applies a peer's delta, journaling it when it changed the replica or was held back.
    fn apply_remote(&mut self, delta: Delta) -> Result<Applied, crdt::Error> {
        let Some(journal) = &mut self.journal else {
            return self.replica.apply(delta);
        };
        let applied = self.replica.apply(delta.clone())?;
        if !matches!(applied, Applied::Duplicate) {
            journal.push_back(delta);
        }
        Ok(applied)
    }

    // ---- dissemination ----

    fn push_local_writes(&mut self) {
        let deltas = std::mem::take(&mut self.outgoing);
        self.push(None, 0, deltas);
    }

    fn on_push(
        &mut self,
        from: &MemberName,
        hops: u16,
        deltas: Vec<Delta>,
    ) -> Result<(), ProtocolError> {
        let mut fresh = Vec::new();
        let mut duplicate = false;
        let mut failure = None;
        for delta in deltas {
            let Some(dot) = delta.dot() else { continue };
            if self.replica.knows(dot) {
                if self.recent.get(dot).is_none() {
                    // Known through anti-entropy, not the tree: this push is the tree's first
                    // delivery here. Keep the link and forward it down the tree, or every node
                    // below would wait for an announcement and a graft.
                    self.missing.remove(&dot);
                    self.recent.insert(dot, delta.clone());
                    fresh.push(delta);
                    continue;
                }
                duplicate = true;
                self.stats.duplicate_writes += 1;
                continue;
            }
            match self.apply_remote(delta.clone()) {
                Ok(Applied::Duplicate) => {
                    duplicate = true;
                    self.stats.duplicate_writes += 1;
                }
                Ok(_) => {
                    self.stats.writes_received += 1;
                    self.events.push_back(Event::WriteReceived { dot, hops });
                    self.missing.remove(&dot);
                    self.recent.insert(dot, delta.clone());
                    fresh.push(delta);
                }
                Err(err) => failure = Some(ProtocolError::Apply(err)),
            }
        }
        if duplicate && fresh.is_empty() && self.eager.remove(from) {
            // A redundant path: keep the link, but only for announcements.
            self.lazy.insert(from.clone());
            self.send(from, &Message::Prune);
        }
        if !fresh.is_empty() {
            if self.lazy.remove(from) || !self.eager.contains(from) {
                self.eager.insert(from.clone());
            }
            self.push(Some(from), hops.saturating_add(1), fresh);
        }
        failure.map_or(Ok(()), Err)
    }

    /// Pushes writes to the eager peers and announces them to the lazy ones, except to the peer
    /// they came from. The message is encoded once for all eager peers.
    fn push(&mut self, from: Option<&MemberName>, hops: u16, deltas: Vec<Delta>) {
        let dots: Vec<Dot> = deltas.iter().filter_map(Delta::dot).collect();
        let others = |peers: &BTreeSet<MemberName>| -> Vec<MemberName> {
            peers.iter().filter(|p| Some(*p) != from).cloned().collect()
        };
        let eager = others(&self.eager);
        let lazy = others(&self.lazy);
        if !eager.is_empty() {
            let message = Message::Push { hops, deltas };
            let payload = message.encode();
            for peer in &eager {
                self.send_encoded(peer, message.kind(), payload.clone(), None);
            }
        }
        self.announce(&lazy, &dots);
    }

    /// Queues announcements of `dots` to `peers`, sent together by the next announce task.
    fn announce(&mut self, peers: &[MemberName], dots: &[Dot]) {
        if peers.is_empty() || dots.is_empty() {
            return;
        }
        for peer in peers {
            self.announcements
                .entry(peer.clone())
                .or_default()
                .extend_from_slice(dots);
        }
        if !self.announce_scheduled {
            self.announce_scheduled = true;
            self.schedule(self.now + self.config.announce_delay, Task::Announce);
        }
    }

    fn send_announcements(&mut self) {
        self.announce_scheduled = false;
        for (peer, mut dots) in std::mem::take(&mut self.announcements) {
            dots.sort();
            dots.dedup();
            for chunk in dots.chunks(MAX_DOTS_PER_MESSAGE) {
                self.send(&peer, &Message::IHave(chunk.to_vec()));
            }
        }
    }

    fn on_ihave(&mut self, from: &MemberName, dots: Vec<Dot>, now: Instant) {
        let ask_at = now + self.config.graft_timeout;
        let mut new = false;
        for dot in dots {
            if self.replica.knows(dot) {
                continue;
            }
            let missing = self.missing.entry(dot).or_insert_with(|| {
                new = true;
                Missing {
                    announcers: Vec::new(),
                    ask_at,
                }
            });
            if !missing.announcers.contains(from) && missing.announcers.len() < 8 {
                missing.announcers.push(from.clone());
            }
        }
        if new {
            self.schedule(ask_at, Task::Graft);
        }
    }

    fn send_grafts(&mut self, now: Instant) {
        let mut requests: BTreeMap<MemberName, Vec<Dot>> = BTreeMap::new();
        let mut next = None::<Instant>;
        let known: Vec<Dot> = self
            .missing
            .keys()
            .copied()
            .filter(|dot| self.replica.knows(*dot))
            .collect();
        for dot in known {
            self.missing.remove(&dot);
        }
        self.missing.retain(|dot, missing| {
            if missing.ask_at > now {
                next = Some(next.map_or(missing.ask_at, |at| at.min(missing.ask_at)));
                return true;
            }
            if missing.announcers.is_empty() {
                // Every announcer was asked; anti-entropy will repair it.
                return false;
            }
            let announcer = missing.announcers.remove(0);
            requests.entry(announcer).or_default().push(*dot);
            missing.ask_at = now + self.config.graft_timeout;
            next = Some(next.map_or(missing.ask_at, |at| at.min(missing.ask_at)));
            true
        });
        for (peer, dots) in requests {
            self.stats.grafts += dots.len() as u64;
            self.lazy.remove(&peer);
            self.eager.insert(peer.clone());
            for chunk in dots.chunks(MAX_DOTS_PER_MESSAGE) {
                self.send(&peer, &Message::Graft(chunk.to_vec()));
            }
        }
        if let Some(at) = next {
            self.schedule(at, Task::Graft);
        }
    }

    fn on_graft(&mut self, from: &MemberName, dots: &[Dot]) {
        self.lazy.remove(from);
        self.eager.insert(from.clone());
        let deltas: Vec<Delta> = dots
            .iter()
            .filter_map(|dot| self.recent.get(*dot).cloned())
            .collect();
        if !deltas.is_empty() {
            self.send(from, &Message::Push { hops: 0, deltas });
        }
    }

    // ---- anti-entropy and stability ----

    fn open_anti_entropy(&mut self) {
        let Some(peer) = self.members.keys().choose(&mut self.rng).cloned() else {
            return;
        };
        self.stats.anti_entropy_rounds += 1;
        let version = self.replica.version().clone();
        let hash = version_hash(&version);
        self.last_digest = Some((peer.clone(), hash, version));
        self.send(&peer, &Message::Digest { hash });
    }

    fn on_digest(&mut self, from: &MemberName, hash: u64) {
        if version_hash(self.replica.version()) == hash {
            self.reports
                .insert(from.clone(), self.replica.version().clone());
            self.send(from, &Message::InSync { hash });
        } else {
            let version = self.replica.version().clone();
            self.send(
                from,
                &Message::SyncRequest {
                    version,
                    reply: true,
                },
            );
        }
    }

    fn on_sync_request(&mut self, from: &MemberName, theirs: VersionVector, reply: bool) {
        self.stats.anti_entropy_repairs += u64::from(reply);
        let delta = self.replica.delta_since(&theirs);
        if !delta.is_empty() {
            self.send_sync(from, delta);
        }
        let they_have_more = !self.replica.version().dominates(&theirs);
        self.reports.insert(from.clone(), theirs);
        if reply && they_have_more {
            let version = self.replica.version().clone();
            self.send(
                from,
                &Message::SyncRequest {
                    version,
                    reply: false,
                },
            );
        }
    }

    /// Sends a sync delta, in pieces when it is larger than one message should be.
    fn send_sync(&mut self, to: &MemberName, delta: Delta) {
        let bytes = delta.encode();
        if bytes.len() <= self.config.sync_chunk_bytes {
            self.send(to, &Message::Sync(delta));
            return;
        }
        self.transfer_seq += 1;
        let pieces = bytes.chunks(self.config.sync_chunk_bytes);
        let count = u32::try_from(pieces.len()).unwrap_or(u32::MAX);
        for (index, piece) in pieces.enumerate() {
            let message = Message::SyncChunk {
                transfer: self.transfer_seq,
                index: index as u32,
                count,
                bytes: piece.to_vec(),
            };
            let part = Part {
                transfer: self.transfer_seq,
                index: index as u32,
                count,
            };
            self.send_encoded(to, message.kind(), message.encode(), Some(part));
        }
    }

    /// Stores one piece of a sync delta; applies the delta when the last piece is in. A sender
    /// starting a new transfer abandons its previous one.
    fn on_sync_chunk(
        &mut self,
        from: &MemberName,
        id: u64,
        index: u32,
        count: u32,
        piece: Vec<u8>,
        now: Instant,
    ) -> Result<(), ProtocolError> {
        let too_large = |len| {
            ProtocolError::Malformed(crdt::Error::TooLarge {
                what: "sync transfer",
                len,
                max: self.config.max_sync_bytes,
            })
        };
        let most_pieces = self.config.max_sync_bytes / self.config.sync_chunk_bytes.max(1) + 1;
        if count as usize > most_pieces {
            self.stats.rejected_messages += 1;
            return Err(too_large(count as usize * self.config.sync_chunk_bytes));
        }
        let transfer = self
            .transfers
            .entry(from.clone())
            .or_insert_with(|| Transfer {
                id,
                pieces: vec![None; count as usize],
                bytes: 0,
                started: now,
            });
        if transfer.id != id || transfer.pieces.len() != count as usize {
            *transfer = Transfer {
                id,
                pieces: vec![None; count as usize],
                bytes: 0,
                started: now,
            };
        }
        let slot = &mut transfer.pieces[index as usize];
        if slot.is_none() {
            transfer.bytes += piece.len();
            *slot = Some(piece);
        }
        if transfer.bytes > self.config.max_sync_bytes {
            let len = transfer.bytes;
            self.transfers.remove(from);
            self.stats.rejected_messages += 1;
            return Err(too_large(len));
        }
        if transfer.pieces.iter().any(Option::is_none) {
            return Ok(());
        }
        let transfer = self.transfers.remove(from).expect("present: just updated");
        // Each piece is freed as soon as it is copied, and the whole is freed once decoded: a
        // large transfer costs about twice its size at its peak, not four times.
        let mut bytes = Vec::with_capacity(transfer.bytes);
        for piece in transfer.pieces.into_iter().flatten() {
            bytes.extend_from_slice(&piece);
        }
        let delta = Delta::decode(&bytes).map_err(|err| {
            self.stats.rejected_messages += 1;
            ProtocolError::Malformed(err)
        })?;
        drop(bytes);
        self.apply_remote(delta)
            .map(drop)
            .map_err(ProtocolError::Apply)
    }

    /// Collects tombstones every live member has seen. A member without a report blocks
    /// collection until its first anti-entropy exchange; a member declared down stops counting.
    fn collect_garbage(&mut self) {
        let mut stable = self.replica.version().clone();
        for name in self.members.keys() {
            let Some(report) = self.reports.get(name) else {
                return;
            };
            stable = stable.meet(report);
        }
        let collected = self.replica.collect_garbage(&stable);
        self.stats.tombstones_collected += collected.tombstones as u64;
    }

    // ---- membership ----

    fn on_swim(
        &mut self,
        from: &MemberName,
        packet: &[u8],
        now: Instant,
    ) -> Result<(), ProtocolError> {
        use foca::Codec;
        let header: foca::Header<Member> = PostcardCodec
            .decode_header(packet)
            .map_err(|err| ProtocolError::Swim(err.to_string()))?;
        if &header.src.name != from {
            self.stats.rejected_messages += 1;
            return Err(ProtocolError::Impersonation {
                claimed: header.src.name.to_string(),
                authenticated: from.clone(),
            });
        }
        let mut runtime = self.swim_runtime(now);
        if addresses_predecessor(&header, self.swim.identity()) {
            // The sender still knows only this process's predecessor (we restarted), and SWIM
            // drops everything but announcements addressed to it: tell the sender who we are
            // now rather than wait for it to count the old identity down, which takes seconds
            // and is all a restarted node without seeds could otherwise do. Announce fails only
            // for our own identity, which the sender's is not.
            let _ = self.swim.announce(header.src.clone(), &mut runtime);
        }
        let result = self.swim.handle_data(packet, &mut runtime);
        self.absorb_swim(runtime);
        result.map_err(|err| ProtocolError::Swim(err.to_string()))
    }

    fn swim_runtime(&self, now: Instant) -> SwimRuntime {
        SwimRuntime {
            now,
            sends: Vec::new(),
            timers: Vec::new(),
            notifications: Vec::new(),
        }
    }

    /// Turns what SWIM asked for into transmissions, tasks and membership changes.
    fn absorb_swim(&mut self, runtime: SwimRuntime) {
        for (to, packet) in runtime.sends {
            let name = (!to.is_seed()).then(|| to.name.clone());
            self.transmit(
                Destination {
                    name,
                    addr: to.addr,
                },
                Channel::Datagram,
                &Message::Swim(packet),
            );
        }
        for (at, timer) in runtime.timers {
            self.schedule(at, Task::Swim(timer));
        }
        for notification in runtime.notifications {
            match notification {
                Change::Up(member) => self.member_up(member),
                Change::Down(member) => self.member_down(&member),
                Change::Renamed { old, new } => {
                    // SWIM reports a new identity under a known address whether it is alive or
                    // down (a member declared down again after its rejoin, say), and adds
                    // `MemberUp` or `MemberDown` only when the address's liveness changed.
                    if self.swim.iter_members().any(|member| member.id() == &new) {
                        self.member_up(new);
                    } else {
                        self.member_down(&old);
                    }
                }
                Change::Rejoined(member) => {
                    self.me = member.clone();
                    self.events.push_back(Event::Rejoined(member));
                }
            }
        }
    }

    fn member_up(&mut self, member: Member) {
        if self.members.get(&member.name) == Some(&member) {
            return;
        }
        let name = member.name.clone();
        self.addresses.insert(name.clone(), member.addr);
        self.members.insert(name.clone(), member.clone());
        if self.eager.len() < self.config.eager_peers {
            self.make_eager(name);
        } else if self.lazy.len() < self.config.lazy_peers && !self.eager.contains(&name) {
            self.lazy.insert(name);
        }
        self.events.push_back(Event::MemberUp(member));
    }

    fn member_down(&mut self, member: &Member) {
        let name = &member.name;
        if self.members.get(name) != Some(member) {
            return;
        }
        self.members.remove(name);
        self.reports.remove(name);
        self.eager.remove(name);
        self.lazy.remove(name);
        self.refill_peers();
        self.events.push_back(Event::MemberDown(member.clone()));
    }

    /// Tops the push peers back up from the live members after one went away.
    fn refill_peers(&mut self) {
        while self.eager.len() < self.config.eager_peers {
            let Some(name) = self.lazy.iter().choose(&mut self.rng).cloned() else {
                break;
            };
            self.lazy.remove(&name);
            self.make_eager(name);
        }
        let candidates: Vec<MemberName> = self
            .members
            .keys()
            .filter(|name| !self.eager.contains(*name) && !self.lazy.contains(*name))
            .cloned()
            .collect();
        let room = self.config.eager_peers.saturating_sub(self.eager.len())
            + self.config.lazy_peers.saturating_sub(self.lazy.len());
        for name in candidates.into_iter().sample(&mut self.rng, room) {
            if self.eager.len() < self.config.eager_peers {
                self.make_eager(name);
            } else {
                self.lazy.insert(name);
            }
        }
    }

    /// Adds an eager push link, and asks the peer (with an empty graft) to push to us too: the
    /// tree needs links in both directions, or a node nobody picked would get writes only through
    /// announcements.
    fn make_eager(&mut self, name: MemberName) {
        if self.eager.insert(name.clone()) {
            self.send(&name, &Message::Graft(Vec::new()));
        }
    }

    // ---- plumbing ----

    fn run(&mut self, task: Task, now: Instant) {
        match task {
            Task::Swim(timer) => {
                let mut runtime = self.swim_runtime(now);
                let _ = self.swim.handle_timer(timer, &mut runtime);
                self.absorb_swim(runtime);
            }
            Task::Announce => self.send_announcements(),
            Task::Graft => self.send_grafts(now),
            Task::AntiEntropy => {
                self.announce_to_seeds(now);
                if self.members.is_empty() {
                    self.announce_to_down_members(now);
                }
                self.open_anti_entropy();
                self.schedule(now + self.config.anti_entropy_interval, Task::AntiEntropy);
            }
            Task::CollectGarbage => {
                self.collect_garbage();
                // A transfer whose sender went quiet is abandoned; anti-entropy starts over.
                let horizon = self.config.gc_interval * 6;
                self.transfers.retain(|_, transfer| {
                    now.saturating_duration_since(transfer.started) < horizon
                });
                self.schedule(now + self.config.gc_interval, Task::CollectGarbage);
            }
        }
    }

    fn schedule(&mut self, at: Instant, task: Task) {
        self.task_seq += 1;
        self.tasks.insert((at, self.task_seq), task);
    }

    fn send(&mut self, peer: &MemberName, message: &Message) {
        self.send_encoded(peer, message.kind(), message.encode(), None);
    }

    fn send_encoded(
        &mut self,
        peer: &MemberName,
        kind: &'static str,
        payload: Vec<u8>,
        part: Option<Part>,
    ) {
        let Some(&addr) = self.addresses.get(peer) else {
            return;
        };
        let to = Destination {
            name: Some(peer.clone()),
            addr,
        };
        self.transmit_encoded(to, Channel::Stream, kind, payload, part);
    }

    fn transmit(&mut self, to: Destination, channel: Channel, message: &Message) {
        self.transmit_encoded(to, channel, message.kind(), message.encode(), None);
    }

    fn transmit_encoded(
        &mut self,
        to: Destination,
        channel: Channel,
        kind: &'static str,
        payload: Vec<u8>,
        part: Option<Part>,
    ) {
        self.stats.messages_sent += 1;
        self.stats.bytes_sent += payload.len() as u64;
        *self.stats.bytes_sent_by_kind.entry(kind).or_default() += payload.len() as u64;
        self.outbox.push_back(Transmit {
            to,
            channel,
            payload,
            part,
        });
    }
}

/// A membership change SWIM reported.
enum Change {
    Up(Member),
    Down(Member),
    /// A member came back under a new identity with the same address; alive or not.
    Renamed {
        old: Member,
        new: Member,
    },
    Rejoined(Member),
}

/// Collects what SWIM asks for during one call, to be absorbed after it.
struct SwimRuntime {
    now: Instant,
    sends: Vec<(Member, Vec<u8>)>,
    timers: Vec<(Instant, Timer<Member>)>,
    notifications: Vec<Change>,
}

impl foca::Runtime<Member> for SwimRuntime {
    fn notify(&mut self, notification: Notification<'_, Member>) {
        match notification {
            Notification::MemberUp(member) => self.notifications.push(Change::Up(member.clone())),
            Notification::MemberDown(member) => {
                self.notifications.push(Change::Down(member.clone()));
            }
            Notification::Rename(old, new) => self.notifications.push(Change::Renamed {
                old: old.clone(),
                new: new.clone(),
            }),
            Notification::Rejoin(me) => self.notifications.push(Change::Rejoined(me.clone())),
            _ => {}
        }
    }

    fn send_to(&mut self, to: Member, data: &[u8]) {
        self.sends.push((to, data.to_vec()));
    }

    fn submit_after(&mut self, event: Timer<Member>, after: std::time::Duration) {
        self.timers.push((self.now + after, event));
    }
}

/// Whether a SWIM message is addressed to an earlier identity of this member (same name, another
/// incarnation) and is not an announcement, which SWIM accepts at any identity of ours.
fn addresses_predecessor(header: &foca::Header<Member>, me: &Member) -> bool {
    header.dst.name == me.name
        && header.dst != *me
        && !matches!(header.message, foca::Message::Announce)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gossip::simulated_member;

    fn node(i: usize, now: Instant) -> Node {
        let me = simulated_member(i);
        Node::new(
            me.clone(),
            Replica::new(me.replica),
            Config::lan(),
            i as u64,
            now,
        )
        .expect("valid")
    }

    /// Delivers every pending message between the nodes until none is left (or a round limit).
    fn pump(nodes: &mut [Node], now: Instant) {
        for _ in 0..50 {
            let mut moved = false;
            for i in 0..nodes.len() {
                while let Some(transmit) = nodes[i].poll_transmit() {
                    moved = true;
                    let Some(to) = nodes.iter().position(|n| n.me().addr == transmit.to.addr)
                    else {
                        continue;
                    };
                    let from = nodes[i].me().clone();
                    let result =
                        nodes[to].handle_message(&from.name, from.addr, &transmit.payload, now);
                    assert!(result.is_ok(), "{result:?}");
                }
            }
            if !moved {
                return;
            }
        }
    }

    #[test]
    fn a_node_joins_through_a_seed_address() {
        let now = Instant::now();
        let mut nodes = vec![node(0, now), node(1, now), node(2, now)];
        let seed = nodes[0].me().addr;
        nodes[1].join(&[seed], now);
        pump(&mut nodes, now);
        nodes[2].join(&[seed], now);
        pump(&mut nodes, now);
        for node in &nodes[..2] {
            assert!(
                node.members().count() >= 1,
                "{} knows nobody",
                node.me().name
            );
        }
        assert_eq!(nodes[0].members().count(), 2);
    }

    /// Members that found each other while their announcements to a seed were lost keep
    /// announcing to it, or they would stay a cluster of their own.
    #[test]
    fn groups_that_formed_apart_merge_through_the_seeds() {
        let start = Instant::now();
        let mut nodes: Vec<Node> = (0..4).map(|i| node(i, start)).collect();
        let seeds = [nodes[0].me().addr, nodes[1].me().addr];
        let members: Vec<Member> = nodes.iter().map(|node| node.me().clone()).collect();
        for (i, peer) in [(0, 2), (2, 0), (1, 3), (3, 1)] {
            nodes[i].join(&seeds, start);
            nodes[i].add_members([members[peer].clone()], start);
            // Lost: the groups {0, 2} and {1, 3} never hear of each other.
            while nodes[i].poll_transmit().is_some() {}
        }
        let later = start + Config::lan().anti_entropy_interval;
        for node in &mut nodes {
            node.handle_timeout(later);
        }
        pump(&mut nodes, later);
        for node in &nodes {
            let known: Vec<&str> = node.members().map(|m| m.name.as_str()).collect();
            assert_eq!(known.len(), 3, "{} knows only {known:?}", node.me().name);
        }
    }

    /// A SWIM gossip packet from `from` to `to` carrying `updates`, as a message.
    fn gossip(from: &Member, to: &Member, updates: &[foca::Member<Member>]) -> Vec<u8> {
        use foca::Codec;
        let header = foca::Header {
            src: from.clone(),
            src_incarnation: 0,
            dst: to.clone(),
            message: foca::Message::Gossip,
        };
        let mut packet = Vec::new();
        PostcardCodec
            .encode_header(&header, &mut packet)
            .expect("a header encodes");
        let count = u16::try_from(updates.len()).expect("a few updates");
        packet.extend_from_slice(&count.to_be_bytes());
        for update in updates {
            PostcardCodec
                .encode_member(update, &mut packet)
                .expect("a member encodes");
        }
        Message::Swim(packet).encode()
    }

    /// SWIM reports a member's new generation as a rename whether that generation is alive or
    /// down; a down one must not count as live.
    #[test]
    fn a_member_counted_down_stays_down_under_its_next_generation() {
        use foca::Identity;
        let now = Instant::now();
        let mut a = node(0, now);
        let (b, c) = (simulated_member(1), simulated_member(2));
        a.add_members([b.clone(), c.clone()], now);
        let tell = |a: &mut Node, update| {
            let bytes = gossip(&c, a.me(), &[update]);
            let result = a.handle_message(&c.name, c.addr, &bytes, now);
            assert!(result.is_ok(), "{result:?}");
        };
        let live = |a: &Node| a.members().find(|m| m.name == b.name).cloned();

        tell(&mut a, foca::Member::down(b.clone()));
        assert_eq!(live(&a), None);
        let renewed = b.renew().expect("a next generation");
        tell(&mut a, foca::Member::down(renewed.clone()));
        assert_eq!(live(&a), None, "a down generation counted live");

        while a.poll_event().is_some() {}
        let back = renewed.renew().expect("a next generation");
        tell(&mut a, foca::Member::alive(back.clone()));
        assert_eq!(live(&a), Some(back.clone()));
        let ups = std::iter::from_fn(|| a.poll_event())
            .filter(|event| event == &Event::MemberUp(back.clone()))
            .count();
        assert_eq!(ups, 1, "one member came back, one event");
    }

    #[test]
    fn a_membership_packet_claiming_another_sender_is_refused() {
        let now = Instant::now();
        let mut nodes = [node(0, now), node(1, now)];
        let seed = nodes[0].me().addr;
        nodes[1].join(&[seed], now);
        let transmit = nodes[1].poll_transmit().expect("an announce");
        let liar = simulated_member(7);
        let result = nodes[0].handle_message(&liar.name, liar.addr, &transmit.payload, now);
        assert!(
            matches!(result, Err(ProtocolError::Impersonation { .. })),
            "{result:?}"
        );
        assert_eq!(nodes[0].members().count(), 0);
        assert_eq!(nodes[0].stats().rejected_messages, 1);
    }
}
