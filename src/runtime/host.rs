//! The node's logic with no IO: the gossip [`Node`] and everything a running node decides on
//! top of it — when a write is acknowledged, which watcher gets which change, when a session
//! waiter is answered, what a scheduling round writes.
//!
//! The host is driven like quinn-proto's connection: inputs are `handle_*` calls that carry
//! `now` (and the wall-clock time for writes), outputs are taken with [`Host::poll_output`] and
//! [`Host::poll_timeout`]. It never reads a clock, opens a socket or touches a disk, so the same
//! code runs under tokio ([`super::driver`]) and under the seeded simulation in its tests, where
//! crashes, losses and partitions are plain function calls.
//!
//! Queries that answer at once (reads, status, a scheduling round) are methods returning their
//! answer. Commands whose answer comes later — a write waits for durability, a session waiter
//! for its token — take a [`RequestId`] chosen by the driver and are answered by an [`Output`].

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::SocketAddr;
use std::time::Instant;

use tracing::{debug, warn};

use crate::crdt::{Delta, Dot, Event as ChangeEvent, Key, Token, Value, Write};
use crate::gossip::{self, MemberName, Node, Transmit};
use crate::runtime::api::{
    BufferUsage, HandleError, Roles, RoundReport, SchedulingView, StateDigest, Status, SyncState,
    WatchError,
};
use crate::runtime::{StorageStats, TransportStats};
use crate::sched::{self, Cluster, JobSpec, Name, NodeRecord, QuotaSpec, SchedError, ViewCache};

/// Events a watcher may fall behind by before it is cut off with [`WatchError::Lagged`].
pub(crate) const WATCH_QUEUE: usize = 4096;

/// Names a command answered later, by an [`Output`]; chosen by the driver, unique among the
/// commands it has not yet had answered.
pub(crate) type RequestId = u64;

/// The driver's queues, for [`Host::status`].
pub(crate) struct Queues {
    /// All watchers' queues together.
    pub(crate) watchers: BufferUsage,
    /// All peers' send queues together.
    pub(crate) peers: BufferUsage,
    /// Received messages not yet handled.
    pub(crate) inbox: BufferUsage,
    /// Watchers paused because their queue was full.
    pub(crate) watchers_paused: usize,
}

/// The room in a paused watcher's queue, for [`Host::resume_watch`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Room {
    /// Events it may take.
    pub(crate) events: usize,
    /// Bytes ([`crate::crdt::Event::size`]) it may take.
    pub(crate) bytes: usize,
    /// Whether the queue is empty: then it takes one event even when that event is larger
    /// than `bytes`, so a value larger than a budget never stops a watcher.
    pub(crate) empty: bool,
}

impl Room {
    /// Whether an event of `size` bytes fits after `sent` events of `bytes` in all.
    pub(crate) fn fits(&self, sent: usize, bytes: usize, size: usize) -> bool {
        sent < self.events && (bytes + size <= self.bytes || (sent == 0 && self.empty))
    }
}

/// Names a watcher; chosen by the host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct WatchId(u64);

/// A command whose answer comes later, as an [`Output`] carrying its [`RequestId`].
#[derive(Debug)]
pub(crate) enum Command {
    /// A client's key-value write; refused under the scheduling prefix. Answered by
    /// [`Output::Written`] — once durable, when the host persists.
    Write(Write),
    /// A write of the scheduling API. Answered like [`Command::Write`].
    Sched(SchedWrite),
    /// Answered by [`Output::Covered`] once the replica covers `token`, or with
    /// [`HandleError::Timeout`] at `deadline`.
    WaitFor { token: Token, deadline: Instant },
}

/// A write of the scheduling API, as data.
#[derive(Debug)]
pub(crate) enum SchedWrite {
    /// Submits or replaces a job.
    SubmitJob(Box<JobSpec>),
    /// Stops a job.
    StopJob(Name),
    /// Publishes this machine's own record (refused for another machine's).
    RegisterNode(Box<NodeRecord>),
    /// Creates a namespace's quota.
    CreateQuota(Box<QuotaSpec>),
}

/// What the host asks of its driver.
#[derive(Debug)]
pub(crate) enum Output {
    /// Send this message.
    Transmit(Transmit),
    /// Make these deltas durable, in order after every earlier batch, then call
    /// [`Host::handle_saved`] with `batch`. Only when the host was made `durable`.
    Persist { batch: u64, deltas: Vec<Delta> },
    /// The answer to a [`Command::Write`] or [`Command::Sched`]: a token covering the write, or
    /// `None` when it changed nothing.
    Written {
        id: RequestId,
        result: Result<Option<Token>, HandleError>,
    },
    /// The answer to a [`Command::WaitFor`].
    Covered {
        id: RequestId,
        result: Result<(), HandleError>,
    },
    /// The next change for a watcher, in cursor order. After an `Err` the watch is over.
    Event {
        watch: WatchId,
        event: Result<ChangeEvent, WatchError>,
    },
    /// Membership changed (for the log).
    Membership(gossip::Event),
    /// Scheduling state or membership changed: scheduler loops should run a round. Only after
    /// [`Host::follow_scheduling`].
    SchedulingChanged,
}

/// What one scheduling round is asked to do.
#[derive(Clone, Debug)]
pub(crate) struct RoundRequest {
    pub(crate) roles: Roles,
    /// Skip the round unless this node has caught up with a live peer.
    pub(crate) gated: bool,
    /// Publish this record before the round, when it runs.
    pub(crate) register: Option<NodeRecord>,
}

/// A watcher: the keys it follows, and where it stands when it is not served live.
struct Watcher {
    prefix: Vec<u8>,
    /// `Some(cursor)` while paused: its reader's queue was full (or it starts from a past
    /// cursor), and the changes after `cursor` are replayed from the change feed as its reader
    /// makes room ([`Host::resume_watch`]). `None`: served live.
    paused_at: Option<u64>,
}

/// A session waiter: answered once the replica covers its token.
struct Waiter {
    id: RequestId,
    token: Token,
    deadline: Instant,
}

/// A node's logic; see the module documentation.
pub(crate) struct Host {
    node: Node,
    /// Every change to the replica goes out in [`Output::Persist`], and local writes are
    /// answered only once their batch is saved.
    durable: bool,
    outputs: VecDeque<Output>,
    watchers: BTreeMap<WatchId, Watcher>,
    next_watch: u64,
    waiters: Vec<Waiter>,
    /// Local writes applied but not yet in a batch handed out for saving.
    unsaved: Vec<(RequestId, Dot)>,
    /// Batches handed out for saving, oldest first, with the writes each one acknowledges.
    saving: VecDeque<(u64, Vec<(RequestId, Dot)>)>,
    next_batch: u64,
    /// The change feed cursor up to which watchers and waiters have been served.
    cursor: u64,
    /// Started with seeds other than itself: a cluster exists to catch up from.
    seeded: bool,
    /// The scheduling state as parsed at the last round, so the next one re-parses only what
    /// changed.
    scheduling: ViewCache,
    /// Whether anyone listens for [`Output::SchedulingChanged`] (it costs a scan of the
    /// changes for scheduling keys).
    follow_scheduling: bool,
}

impl Host {
    /// A host over `node`. With `durable`, the node journals every change for
    /// [`Output::Persist`].
    pub(crate) fn new(mut node: Node, seeded: bool, durable: bool) -> Host {
        if durable {
            node.enable_journal();
        }
        Host {
            cursor: node.replica().cursor(),
            node,
            durable,
            outputs: VecDeque::new(),
            watchers: BTreeMap::new(),
            next_watch: 0,
            waiters: Vec::new(),
            unsaved: Vec::new(),
            saving: VecDeque::new(),
            next_batch: 0,
            seeded,
            scheduling: ViewCache::default(),
            follow_scheduling: false,
        }
    }

    /// The gossip node, for tests that look inside.
    #[cfg(test)]
    pub(crate) fn node(&self) -> &Node {
        &self.node
    }

    // ---- inputs ----

    /// Takes a command; its answer comes as an [`Output`] naming `id`.
    pub(crate) fn handle_command(
        &mut self,
        now: Instant,
        wall_millis: u64,
        id: RequestId,
        command: Command,
    ) {
        match command {
            Command::Write(write) => {
                let result = if sched::is_reserved(write.key().as_bytes()) {
                    Err(HandleError::Reserved {
                        key: String::from_utf8_lossy(write.key().as_bytes()).into_owned(),
                        prefix: sched::RESERVED,
                    })
                } else {
                    self.node
                        .write(now, wall_millis, write)
                        .map_err(HandleError::from)
                };
                self.answer_write(id, result);
            }
            Command::Sched(write) => {
                let result = self.sched_write(now, wall_millis, write);
                self.answer_write(id, result);
            }
            Command::WaitFor { token, deadline } => {
                if token.is_covered_by(self.node.replica().version()) {
                    self.outputs
                        .push_back(Output::Covered { id, result: Ok(()) });
                } else {
                    self.waiters.push(Waiter {
                        id,
                        token,
                        deadline,
                    });
                }
            }
        }
    }

    /// Takes a message from the peer whose certificate names it `from`, reached at `addr`.
    pub(crate) fn handle_received(
        &mut self,
        now: Instant,
        from: &str,
        addr: SocketAddr,
        bytes: &[u8],
    ) {
        let Ok(from) = MemberName::new(from) else {
            warn!(peer = %from, "message from a peer whose certificate name is not a valid member name");
            return;
        };
        if let Err(err) = self.node.handle_message(&from, addr, bytes, now) {
            debug!(peer = %from, error = %err, "message dropped");
        }
    }

    /// Runs what is due at `now`: the protocol's timers, and waiters whose deadline passed.
    pub(crate) fn handle_timeout(&mut self, now: Instant) {
        self.node.handle_timeout(now);
        let (expired, waiting) = std::mem::take(&mut self.waiters)
            .into_iter()
            .partition(|waiter| waiter.deadline <= now);
        self.waiters = waiting;
        for waiter in expired {
            self.outputs.push_back(Output::Covered {
                id: waiter.id,
                result: Err(HandleError::Timeout(std::time::Duration::ZERO)),
            });
        }
    }

    /// The batch of [`Output::Persist`] numbered `batch` (and every earlier one) is durable, or
    /// failed with `result`'s reason: answers the writes that waited on it.
    pub(crate) fn handle_saved(&mut self, batch: u64, result: Result<(), String>) {
        while let Some((oldest, _)) = self.saving.front()
            && *oldest <= batch
        {
            let Some((_, writes)) = self.saving.pop_front() else {
                break;
            };
            for (id, dot) in writes {
                let result = match &result {
                    Ok(()) => Ok(Some(Token::from_dot(dot))),
                    Err(reason) => Err(HandleError::Storage(reason.clone())),
                };
                self.outputs.push_back(Output::Written { id, result });
            }
        }
    }

    /// Starts a watcher of the keys under `prefix`, served as [`Output::Event`]s. With `from`,
    /// it starts paused at that cursor: the driver replays the changes after it with
    /// [`Host::resume_watch`] as the reader makes room, then it is served live. A cursor older
    /// than the change feed holds ends it at once with [`WatchError::Compacted`].
    pub(crate) fn watch(&mut self, prefix: Vec<u8>, from: Option<u64>) -> WatchId {
        let watch = WatchId(self.next_watch);
        self.next_watch += 1;
        if let Some(from) = from
            && let Err(crate::crdt::Error::Compacted { requested, oldest }) =
                self.node.replica().events_since(from).map(|_| ())
        {
            self.outputs.push_back(Output::Event {
                watch,
                event: Err(WatchError::Compacted { requested, oldest }),
            });
            return watch;
        }
        let paused_at = from.filter(|from| *from < self.cursor);
        self.watchers.insert(watch, Watcher { prefix, paused_at });
        watch
    }

    /// Stops serving a watcher live because its reader's queue is full: the changes after
    /// `cursor` (the last one it was given) wait in the change feed until
    /// [`Host::resume_watch`].
    pub(crate) fn pause_watch(&mut self, watch: WatchId, cursor: u64) {
        if let Some(watcher) = self.watchers.get_mut(&watch) {
            watcher.paused_at = Some(cursor);
        }
    }

    /// Replays to a paused watcher, in cursor order, the changes that fit `room` in its queue;
    /// once it has caught up it is served live again. `true` when it is live (or gone). A
    /// watcher whose place is no longer in the change feed ends with [`WatchError::Compacted`].
    pub(crate) fn resume_watch(&mut self, watch: WatchId, room: Room) -> bool {
        let Some(watcher) = self.watchers.get_mut(&watch) else {
            return true;
        };
        let Some(position) = watcher.paused_at else {
            return true;
        };
        let events = match self.node.replica().events_since(position) {
            Ok(events) => events,
            Err(crate::crdt::Error::Compacted { requested, oldest }) => {
                self.watchers.remove(&watch);
                self.outputs.push_back(Output::Event {
                    watch,
                    event: Err(WatchError::Compacted { requested, oldest }),
                });
                return true;
            }
            Err(_) => return false,
        };
        let mut sent = 0;
        let mut bytes = 0;
        let mut last = position;
        let mut full = false;
        for event in events.take_while(|event| event.cursor <= self.cursor) {
            if event.key.as_bytes().starts_with(&watcher.prefix) {
                let size = event.size();
                if !room.fits(sent, bytes, size) {
                    full = true;
                    break;
                }
                sent += 1;
                bytes += size;
                self.outputs.push_back(Output::Event {
                    watch,
                    event: Ok(event.clone()),
                });
            }
            last = event.cursor;
        }
        // Caught up with what has been served live: from here on it is served live too.
        watcher.paused_at = full.then_some(last);
        !full
    }

    /// Ends a watcher (its reader went away).
    pub(crate) fn cancel_watch(&mut self, watch: WatchId) {
        self.watchers.remove(&watch);
    }

    /// From now on, say when scheduling state or membership changes.
    pub(crate) fn follow_scheduling(&mut self) {
        self.follow_scheduling = true;
    }

    /// Announces that this member leaves the cluster.
    pub(crate) fn leave(&mut self, now: Instant) {
        self.node.leave(now);
    }

    // ---- outputs ----

    /// The next thing for the driver to do.
    pub(crate) fn poll_output(&mut self) -> Option<Output> {
        if self.outputs.is_empty() {
            self.collect();
        }
        self.outputs.pop_front()
    }

    /// When [`Host::handle_timeout`] should next be called.
    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        let waiter = self.waiters.iter().map(|waiter| waiter.deadline).min();
        [self.node.poll_timeout(), waiter]
            .into_iter()
            .flatten()
            .min()
    }

    /// Gathers what the node produced, serves watchers and waiters, and hands out what must
    /// be saved.
    fn collect(&mut self) {
        while let Some(transmit) = self.node.poll_transmit() {
            self.outputs.push_back(Output::Transmit(transmit));
        }
        let mut membership = false;
        while let Some(event) = self.node.poll_event() {
            membership = true;
            self.outputs.push_back(Output::Membership(event));
        }
        if membership && self.follow_scheduling {
            self.outputs.push_back(Output::SchedulingChanged);
        }
        if self.node.replica().cursor() != self.cursor {
            self.serve_watchers();
            self.serve_waiters();
        }
        self.persist();
    }

    fn serve_watchers(&mut self) {
        let replica = self.node.replica();
        let latest = replica.cursor();
        let Ok(fresh) = replica.events_since(self.cursor) else {
            // More changes than the feed holds arrived at once: every watcher lost some.
            self.cursor = latest;
            if self.follow_scheduling {
                self.outputs.push_back(Output::SchedulingChanged);
            }
            for (watch, _) in std::mem::take(&mut self.watchers) {
                self.outputs.push_back(Output::Event {
                    watch,
                    event: Err(WatchError::Lagged(WATCH_QUEUE)),
                });
            }
            return;
        };
        let mut scheduling = false;
        for event in fresh {
            let key = event.key.as_bytes();
            scheduling |= self.follow_scheduling && sched::is_reserved(key);
            for (watch, watcher) in &self.watchers {
                if watcher.paused_at.is_none() && key.starts_with(&watcher.prefix) {
                    self.outputs.push_back(Output::Event {
                        watch: *watch,
                        event: Ok(event.clone()),
                    });
                }
            }
        }
        self.cursor = latest;
        if scheduling {
            self.outputs.push_back(Output::SchedulingChanged);
        }
    }

    fn serve_waiters(&mut self) {
        let version = self.node.replica().version();
        let (ready, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.waiters)
            .into_iter()
            .partition(|waiter| waiter.token.is_covered_by(version));
        self.waiters = waiting;
        for waiter in ready {
            self.outputs.push_back(Output::Covered {
                id: waiter.id,
                result: Ok(()),
            });
        }
    }

    /// Hands what changed the replica out for saving, with the local writes waiting on it.
    fn persist(&mut self) {
        if !self.durable {
            return;
        }
        let mut deltas = Vec::new();
        while let Some(delta) = self.node.poll_applied() {
            deltas.push(delta);
        }
        if deltas.is_empty() && self.unsaved.is_empty() {
            return;
        }
        let batch = self.next_batch;
        self.next_batch += 1;
        self.saving
            .push_back((batch, std::mem::take(&mut self.unsaved)));
        self.outputs.push_back(Output::Persist { batch, deltas });
    }

    /// Answers a local write at once, or once durable.
    fn answer_write(&mut self, id: RequestId, result: Result<Option<Dot>, HandleError>) {
        match result {
            Ok(Some(dot)) if self.durable => self.unsaved.push((id, dot)),
            result => self.outputs.push_back(Output::Written {
                id,
                result: result.map(|dot| dot.map(Token::from_dot)),
            }),
        }
    }

    fn sched_write(
        &mut self,
        now: Instant,
        wall_millis: u64,
        write: SchedWrite,
    ) -> Result<Option<Dot>, HandleError> {
        let me = self.node.me().name.clone();
        let ((), dot) = self.node.write_many(now, |replica| {
            let mut cluster = Cluster::new(replica);
            let delta = match write {
                SchedWrite::SubmitJob(job) => {
                    job.validate()?;
                    Some(cluster.submit_job(&job, wall_millis)?)
                }
                SchedWrite::StopJob(job) => cluster.stop_job(&job, wall_millis)?,
                SchedWrite::RegisterNode(record) => {
                    if record.name != me {
                        return Err(SchedError::NotOwner {
                            node: record.name.clone(),
                            me,
                        });
                    }
                    Some(cluster.register_node(&record, wall_millis)?)
                }
                SchedWrite::CreateQuota(quota) => Some(cluster.create_quota(&quota, wall_millis)?),
            };
            Ok::<_, SchedError>(((), delta.into_iter().collect()))
        })?;
        Ok(dot)
    }

    // ---- queries, answered at once ----

    /// The value at `key`.
    pub(crate) fn get(&self, key: &Key) -> Result<Option<Value>, HandleError> {
        Ok(self.node.replica().get(key)?)
    }

    /// Up to `limit` keys under `prefix` that sort after `after`, in key order.
    pub(crate) fn list(
        &self,
        prefix: &[u8],
        after: Option<&Key>,
        limit: usize,
    ) -> Result<Vec<(Key, Value)>, HandleError> {
        Ok(self.node.replica().range_after(prefix, after, limit)?)
    }

    /// The peers membership counts alive now.
    pub(crate) fn live_peers(&self) -> impl Iterator<Item = &gossip::Member> {
        self.node.members()
    }

    /// A token covering everything this node has applied.
    pub(crate) fn token(&self) -> Token {
        Token::from_version(self.node.replica().version().clone())
    }

    /// A hash of the replica's whole state, with the version it covers.
    pub(crate) fn digest(&self) -> StateDigest {
        let replica = self.node.replica();
        StateDigest {
            digest: replica.digest(),
            version: replica.version().clone(),
        }
    }

    /// The replica as bytes, for a checkpoint.
    pub(crate) fn snapshot(&self) -> Vec<u8> {
        self.node.replica().snapshot()
    }

    /// This node's status, with the driver's own counters.
    pub(crate) fn status(
        &self,
        storage: Option<StorageStats>,
        transport: TransportStats,
        peer_queue_dropped: u64,
        queues: Queues,
    ) -> Status {
        let replica = self.node.replica();
        let (feed_events, feed_bytes) = replica.feed_usage();
        let (recent_writes, recent_bytes) = self.node.recent_usage();
        let buffers = vec![
            BufferUsage {
                name: "change_feed",
                items: feed_events,
                bytes: feed_bytes,
                budget: replica.config().feed_bytes,
            },
            BufferUsage {
                name: "recent_writes",
                items: recent_writes,
                bytes: recent_bytes,
                budget: self.node.config().recent_writes_bytes,
            },
            BufferUsage {
                name: "held_back",
                items: replica.held_back(),
                bytes: replica.held_back_bytes(),
                budget: replica.config().buffer_bytes,
            },
            queues.watchers,
            queues.peers,
            queues.inbox,
        ];
        let version = replica.version();
        let reports = self.node.reports();
        let peers = self
            .node
            .members()
            .map(|member| {
                let lag = reports.get(&member.name).map(|report| {
                    version
                        .iter()
                        .map(|(node, seq)| seq.saturating_sub(report.get(node)))
                        .sum()
                });
                (member.clone(), lag)
            })
            .collect();
        Status {
            me: self.node.me().clone(),
            version: version.clone(),
            cursor: replica.cursor(),
            peers,
            held_back: replica.held_back(),
            tombstones: replica.tombstones(),
            stats: self.node.stats().clone(),
            storage,
            transport,
            peer_queue_dropped,
            buffers,
            watchers_paused: queues.watchers_paused,
        }
    }

    /// The scheduling state as this node sees it now.
    pub(crate) fn scheduling(&mut self) -> Result<SchedulingView, HandleError> {
        Ok(SchedulingView {
            view: self.scheduling.view(self.node.replica())?.clone(),
            live: self.live(),
            me: self.node.me().name.clone(),
            token: self.token(),
        })
    }

    /// Runs one scheduling round: a planning round when `roles.plan`, then an admission round
    /// when `roles.admit`. Its writes go out like any other.
    pub(crate) fn round(
        &mut self,
        now: Instant,
        wall_millis: u64,
        request: RoundRequest,
    ) -> Result<RoundReport, HandleError> {
        let mut report = RoundReport::default();
        if request.gated {
            let state = self.sync_state();
            if state != SyncState::CaughtUp {
                report.skipped = Some(state);
                return Ok(report);
            }
        }
        if let Some(record) = request.register {
            self.sched_write(now, wall_millis, SchedWrite::RegisterNode(Box::new(record)))?;
            report.writes += 1;
        }
        let me = self.node.me().name.clone();
        let live = self.live();
        let cache = &mut self.scheduling;
        if request.roles.plan {
            let ((plan, writes), _) = self.node.write_many(now, |replica| {
                let mut plan = Cluster::with_cache(replica, cache).plan(&me, &live, wall_millis)?;
                let deltas = std::mem::take(&mut plan.deltas);
                Ok::<_, SchedError>(((plan, deltas.len()), deltas))
            })?;
            report.claims = plan.claims.len();
            report.waiting = plan.waiting.len();
            report.writes += writes;
        }
        if request.roles.admit {
            let ((admitted, writes), _) = self.node.write_many(now, |replica| {
                let mut admitted =
                    Cluster::with_cache(replica, cache).admit(&me, &live, wall_millis)?;
                let deltas = std::mem::take(&mut admitted.deltas);
                Ok::<_, SchedError>(((admitted, deltas.len()), deltas))
            })?;
            report.admitted = admitted.decision.admitted.len();
            report.rejected = admitted.decision.rejected.len();
            report.released = admitted
                .released
                .into_iter()
                .map(|release| (release.allocation, release.cause))
                .collect();
            report.writes += writes;
        }
        Ok(report)
    }

    /// The members SWIM counts alive, this node included.
    fn live(&self) -> BTreeSet<MemberName> {
        self.node
            .members()
            .map(|member| member.name.clone())
            .chain(std::iter::once(self.node.me().name.clone()))
            .collect()
    }

    fn sync_state(&self) -> SyncState {
        let mut peers = self.node.members().peekable();
        if peers.peek().is_none() {
            return if self.seeded {
                SyncState::NoPeer
            } else {
                SyncState::Alone
            };
        }
        let version = self.node.replica().version();
        let reports = self.node.reports();
        let covered = peers.any(|member| {
            reports
                .get(&member.name)
                .is_some_and(|report| version.dominates(report))
        });
        if covered {
            SyncState::CaughtUp
        } else {
            SyncState::Behind
        }
    }
}

#[cfg(test)]
mod tests;
