//! The runtime's vocabulary: a node's settings, what its [`Handle`](super::Handle) answers, and
//! why a call fails. Types only; the logic that produces them is in the host.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::mpsc;

use crate::crdt::{self, Event as ChangeEvent, ReplicaConfig, Token, VersionVector};
use crate::gossip::{self, Member, MemberName};
use crate::runtime::{
    StorageConfig, StorageError, StorageStats, TlsConfig, TransportConfig, TransportError,
    TransportStats,
};
use crate::sched::{Allocation, ClusterView, JobStatus, Name, NodeStatus, ReleaseCause};

/// Where the node gets wall-clock time for its timestamps; injectable so tests can skew it.
pub type WallClock = Arc<dyn Fn() -> u64 + Send + Sync>;

/// Everything needed to start a node.
#[derive(Clone)]
pub struct NodeConfig {
    /// Where the QUIC endpoint listens.
    pub bind: SocketAddr,
    /// The address peers should use, when it differs from `bind` (e.g. `bind` is 0.0.0.0).
    pub advertise: Option<SocketAddr>,
    /// Members to join through. Empty: start a new cluster.
    pub seeds: Vec<SocketAddr>,
    /// The cluster CA and this node's certificate; the node's name comes from the certificate.
    pub tls: TlsConfig,
    /// Protocol settings.
    pub gossip: gossip::Config,
    /// Transport settings.
    pub transport: TransportConfig,
    /// Replica limits.
    pub replica: ReplicaConfig,
    /// Seeds the protocol's random choices; `None` picks one from the clock.
    pub rng_seed: Option<u64>,
    /// Milliseconds since the Unix epoch, for write timestamps.
    pub wall_clock: WallClock,
    /// Durable storage; `None` keeps the replica in memory only.
    pub storage: Option<StorageConfig>,
    /// How long [`Handle::shutdown`](super::Handle::shutdown) may take in all: leaving,
    /// handing what is queued to live peers and waiting for their receipt, the last checkpoint.
    /// Peers known to be down are never waited on. Default 2 s.
    pub shutdown_timeout: Duration,
    /// Byte budgets of the queues the runtime keeps for watchers and peers. Set them, with the
    /// replica's and the protocol's buffers, from one total with
    /// [`NodeConfig::set_memory_budget`].
    pub buffers: Buffers,
}

impl NodeConfig {
    /// A LAN node listening on `bind` with the given credentials, joining through `seeds`.
    pub fn new(bind: SocketAddr, tls: TlsConfig, seeds: Vec<SocketAddr>) -> Self {
        NodeConfig {
            bind,
            advertise: None,
            seeds,
            tls,
            gossip: gossip::Config::lan(),
            transport: TransportConfig::default(),
            replica: ReplicaConfig::default(),
            rng_seed: None,
            wall_clock: Arc::new(system_millis),
            storage: None,
            shutdown_timeout: Duration::from_secs(2),
            buffers: Buffers::from_total(DEFAULT_MEMORY_BUDGET),
        }
        .with_memory_budget(DEFAULT_MEMORY_BUDGET)
    }

    /// Bounds, in bytes, what the node keeps besides its keyspace — the change feed, the recent
    /// writes kept to forward, the writes held back for their causes, received messages not
    /// yet handled, watchers' queues and peers' send queues — by `total`, split among them (in
    /// sixteenths): the change feed 3, all watchers 3 (one watcher 1), recent writes 2, held-back
    /// writes 2, all peers' send queues 2 (one peer 1), received messages 4 (but never less than
    /// the largest message, `transport.max_message_bytes`). Values are shared between these
    /// buffers and the keyspace, so what they hold together is usually well below the sum. The
    /// keyspace itself is not bounded by this: it holds what was written.
    pub fn set_memory_budget(&mut self, total: usize) {
        let sixteenth = total / 16;
        self.replica.feed_bytes = 3 * sixteenth;
        self.replica.buffer_bytes = 2 * sixteenth;
        self.gossip.recent_writes_bytes = 2 * sixteenth;
        self.transport.inbox_bytes = (4 * sixteenth).max(self.transport.max_message_bytes);
        self.buffers = Buffers::from_total(total);
    }

    /// [`NodeConfig::set_memory_budget`], by value.
    pub fn with_memory_budget(mut self, total: usize) -> Self {
        self.set_memory_budget(total);
        self
    }
}

/// The default of [`NodeConfig::set_memory_budget`]: 256 MiB.
pub const DEFAULT_MEMORY_BUDGET: usize = 256 * 1024 * 1024;

/// Byte budgets of the runtime's queues. A queue that is empty takes any one item, however large,
/// so a budget below the largest value never stops traffic; beyond that, the budget holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Buffers {
    /// What one watcher's queue may hold ([`crdt::Event::size`]). A watcher whose reader falls
    /// this far behind is paused: what it misses is replayed from the change feed as its reader
    /// catches up, and it ends with [`WatchError::Compacted`] if the feed no longer holds it.
    pub watcher_bytes: usize,
    /// What all watchers' queues may hold together; past it, watchers are paused likewise.
    pub watchers_bytes: usize,
    /// Message bytes queued towards one peer; past it, messages to that peer are dropped (and
    /// anti-entropy repairs what they carried).
    pub peer_bytes: usize,
    /// Message bytes queued towards all peers together.
    pub peers_bytes: usize,
}

impl Buffers {
    /// The split [`NodeConfig::set_memory_budget`] uses.
    pub fn from_total(total: usize) -> Self {
        let sixteenth = total / 16;
        Buffers {
            watcher_bytes: sixteenth,
            watchers_bytes: 3 * sixteenth,
            peer_bytes: sixteenth,
            peers_bytes: 2 * sixteenth,
        }
    }
}

/// One bounded buffer of a node, as [`Status::buffers`] reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BufferUsage {
    /// Which buffer: `change_feed`, `recent_writes`, `held_back`, `watchers`, `peer_queues` or
    /// `inbox` (received messages not yet handled; its items are not counted).
    pub name: &'static str,
    /// The items it holds (events, writes, messages).
    pub items: usize,
    /// The bytes they hold (approximate; values shared between buffers count in each).
    pub bytes: usize,
    /// The most bytes it may hold.
    pub budget: usize,
}

/// Why a [`Handle`] call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HandleError {
    /// The keyspace refused the operation (bad key, wrong type, too large, …); nothing changed.
    #[error(transparent)]
    Crdt(#[from] crdt::Error),
    /// The node has shut down.
    #[error("the node has shut down")]
    Stopped,
    /// The token was not covered within the wait.
    #[error("timed out after {0:?} waiting for the replica to cover the token")]
    Timeout(Duration),
    /// The write was applied in memory (and may reach peers) but could not be made durable here.
    #[error("the write could not be made durable: {0}")]
    Storage(String),
    /// The key lies under the scheduling prefix, where only the scheduling API writes;
    /// nothing changed.
    #[error(
        "key {key:?} is reserved for scheduling (prefix {prefix:?}); use the scheduling API (jobs, nodes) instead"
    )]
    Reserved {
        /// The refused key, as text (invalid UTF-8 replaced).
        key: String,
        /// The reserved prefix.
        prefix: &'static str,
    },
    /// A scheduling request was refused (an invalid job, a record of another machine, …);
    /// nothing changed.
    #[error(transparent)]
    Sched(crate::sched::SchedError),
}

impl From<crate::sched::SchedError> for HandleError {
    fn from(err: crate::sched::SchedError) -> Self {
        match err {
            crate::sched::SchedError::Store(err) => HandleError::Crdt(err),
            other => HandleError::Sched(other),
        }
    }
}

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// The certificate's name is not a valid member name.
    #[error(transparent)]
    Name(#[from] gossip::InvalidMemberName),
    /// The protocol settings are inconsistent.
    #[error(transparent)]
    Config(#[from] gossip::ConfigError),
    /// The endpoint could not be bound.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The data directory could not be opened or read.
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// Why a watch ended.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum WatchError {
    /// The cursor asked for is older than the change feed keeps.
    #[error(
        "events after cursor {requested} are no longer kept (oldest is {oldest}); re-read and watch from the current cursor"
    )]
    Compacted {
        /// The cursor the watch was to start after (or had reached).
        requested: u64,
        /// The oldest cursor the change feed still holds.
        oldest: u64,
    },
    /// The watcher fell too far behind and was cut off; resume from the last cursor it saw.
    #[error("the watcher fell more than {0} events behind; resume from its last cursor")]
    Lagged(usize),
}

/// A node's view of itself and its peers.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Status {
    /// This member.
    pub me: Member,
    /// Every write applied here: also a token covering everything this node has seen.
    pub version: VersionVector,
    /// The change feed's latest cursor.
    pub cursor: u64,
    /// Live peers and how many writes each is known to lack compared to this node (from its
    /// last anti-entropy report; `None` before the first).
    pub peers: Vec<(Member, Option<u64>)>,
    /// Writes held back waiting for their causes.
    pub held_back: usize,
    /// Tombstones not yet collected.
    pub tombstones: usize,
    /// Protocol counters.
    pub stats: gossip::Stats,
    /// The data file's counters, when the node has durable storage.
    pub storage: Option<StorageStats>,
    /// The transport's counters: connections, refused handshakes, dropped messages.
    pub transport: TransportStats,
    /// Outgoing messages dropped because their peer's queue was full (in messages or bytes).
    pub peer_queue_dropped: u64,
    /// The bounded buffers the node keeps for others: what each holds and may hold.
    pub buffers: Vec<BufferUsage>,
    /// Watchers paused because their readers fell behind by their byte or event budget.
    pub watchers_paused: usize,
}

/// What [`Handle::digest`] answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StateDigest {
    /// [`Replica::digest`](crate::crdt::Replica::digest): equal on replicas that applied the same
    /// writes and collected the same tombstones.
    pub digest: u64,
    /// Every write applied here (a token covering this state).
    pub version: VersionVector,
}

/// A stream of change events for keys under a prefix, in the order this node applied them.
///
/// Implements `futures_core::Stream`; [`Watch::next`] is the same without a combinator crate.
pub struct Watch {
    pub(super) events: mpsc::Receiver<Result<ChangeEvent, WatchError>>,
    /// What its queue holds, given back as events are taken.
    pub(super) queued: QueuedBytes,
}

impl Watch {
    /// The next event, `None` when the node shut down.
    pub async fn next(&mut self) -> Option<Result<ChangeEvent, WatchError>> {
        let item = self.events.recv().await;
        self.taken(&item);
        item
    }

    fn taken(&self, item: &Option<Result<ChangeEvent, WatchError>>) {
        if let Some(Ok(event)) = item {
            self.queued.sub(event.size());
        }
    }
}

impl futures_core::Stream for Watch {
    type Item = Result<ChangeEvent, WatchError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let item = std::task::ready!(self.events.poll_recv(cx));
        self.taken(&item);
        Poll::Ready(item)
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        // What is still queued no longer counts against the watchers' budget.
        self.events.close();
        while let Ok(item) = self.events.try_recv() {
            self.taken(&Some(item));
        }
    }
}

/// The bytes of events queued for one watcher, also counted in the total of all watchers.
#[derive(Clone, Debug, Default)]
pub(super) struct QueuedBytes {
    own: Arc<AtomicUsize>,
    all: Arc<AtomicUsize>,
}

impl QueuedBytes {
    /// A counter for a new watcher, adding to `all`.
    pub(super) fn new(all: Arc<AtomicUsize>) -> Self {
        QueuedBytes {
            own: Arc::default(),
            all,
        }
    }

    pub(super) fn add(&self, bytes: usize) {
        self.own.fetch_add(bytes, Ordering::SeqCst);
        self.all.fetch_add(bytes, Ordering::SeqCst);
    }

    pub(super) fn sub(&self, bytes: usize) {
        self.own.fetch_sub(bytes, Ordering::SeqCst);
        self.all.fetch_sub(bytes, Ordering::SeqCst);
    }

    /// Bytes queued for this watcher.
    pub(super) fn own(&self) -> usize {
        self.own.load(Ordering::SeqCst)
    }

    /// Bytes queued for all watchers.
    pub(super) fn all(&self) -> usize {
        self.all.load(Ordering::SeqCst)
    }
}

/// Which rounds a node takes part in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Roles {
    /// Claim machines for the pending tasks this node is responsible for: run the reference
    /// scheduler.
    pub plan: bool,
    /// Decide the claims made on this machine: it offers itself (it must have registered a
    /// [`NodeRecord`]).
    pub admit: bool,
}

/// How far a node has caught up with its peers. A node makes no scheduling write before it has
/// caught up, so that a machine that lost its data never writes a ledger concurrent with the one
/// it wrote before.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum SyncState {
    /// No live peer, and the node was started without seeds: the first member of a new cluster,
    /// with nobody to catch up from.
    Alone,
    /// No live peer yet, but the node was started with seeds: the cluster exists, and this node
    /// waits for it rather than risk writing a ledger concurrent with one it wrote before.
    NoPeer,
    /// Live peers, but none has yet been seen to hold nothing this node lacks.
    Behind,
    /// A live peer reported a version this node covers.
    CaughtUp,
}

/// What one scheduling round did at this node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RoundReport {
    /// `Some` when the round did not run because the node has not caught up yet.
    pub skipped: Option<SyncState>,
    /// Claims this node made as a scheduler.
    pub claims: usize,
    /// Tasks this scheduler is responsible for that still wait (backing off, or fitting
    /// nowhere now).
    pub waiting: usize,
    /// Claims this machine admitted.
    pub admitted: usize,
    /// Claims this machine rejected.
    pub rejected: usize,
    /// Allocations this machine gave up, and why: stop these tasks.
    pub released: Vec<(Allocation, ReleaseCause)>,
    /// Writes the round made.
    pub writes: usize,
}

impl RoundReport {
    /// Whether the round changed anything.
    pub fn is_idle(&self) -> bool {
        self.writes == 0
    }
}

/// The scheduling state as one node sees it now.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct SchedulingView {
    /// Every scheduling record, parsed.
    pub view: ClusterView,
    /// The members SWIM counts alive, this node included.
    pub live: BTreeSet<MemberName>,
    /// This node.
    pub me: MemberName,
    /// Covers everything the view was read from: pass it to another node's
    /// [`Handle::wait_for`] to read there no older state.
    pub token: Token,
}

impl SchedulingView {
    /// Where each task of `job` stands; `None` when there is no such job.
    pub fn job(&self, job: &Name) -> Option<JobStatus> {
        self.view.job_status(job, &self.live)
    }

    /// Every registered machine.
    pub fn nodes(&self) -> Vec<NodeStatus> {
        self.view.node_statuses(&self.live)
    }

    /// Every task a live machine holds, with its winning allocation, in task order.
    pub fn allocations(&self) -> Vec<Allocation> {
        let live_nodes = self.view.live_nodes(&self.live);
        self.view.allocations(&live_nodes).into_values().collect()
    }
}

pub(super) fn system_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_millis() as u64)
}
