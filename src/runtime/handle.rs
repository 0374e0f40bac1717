//! The embedded node: a task that drives the gossip state machine over QUIC, and the cloneable
//! [`Handle`] an orchestrator uses to read, write and watch the cluster state.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::{Notify, mpsc, oneshot};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::crdt::{
    self, Delta, Event as ChangeEvent, Key, NodeId, Replica, ReplicaConfig, Token, Value,
    VersionVector,
};
use crate::gossip::{self, Member, MemberName, Node, Transmit};
use crate::runtime::scheduling::{self, RoundReport, RoundRequest, SchedulingView};
use crate::runtime::storage::{Ack, Storage};
use crate::runtime::{
    Channel, Inbox, StorageConfig, StorageError, StorageStats, TlsConfig, Transport,
    TransportConfig, TransportError, TransportStats,
};

/// Messages queued towards one peer before new ones are dropped (anti-entropy repairs drops).
const PEER_QUEUE: usize = 1024;
/// Payload bytes queued towards one peer before new messages are dropped; raised to the
/// protocol's largest message when that is larger, so every message can be sent.
const PEER_QUEUE_BYTES: usize = 64 * 1024 * 1024;
/// How long shutdown waits for queued messages to be handed to the transport.
const SHUTDOWN_SEND_BOUND: Duration = Duration::from_secs(5);
/// Commands (or peers' messages) handled before the node's outputs are flushed.
const BATCH: usize = 256;
/// Events a watcher may fall behind by before it is cut off with [`WatchError::Lagged`].
const WATCH_QUEUE: usize = 4096;

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
        }
    }
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
    Compacted { requested: u64, oldest: u64 },
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
    events: mpsc::Receiver<Result<ChangeEvent, WatchError>>,
}

impl Watch {
    /// The next event, `None` when the node shut down.
    pub async fn next(&mut self) -> Option<Result<ChangeEvent, WatchError>> {
        self.events.recv().await
    }
}

impl futures_core::Stream for Watch {
    type Item = Result<ChangeEvent, WatchError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.events.poll_recv(cx)
    }
}

pub(super) type Reply<T> = oneshot::Sender<Result<T, HandleError>>;
type WriteOp = Box<dyn FnOnce(&mut Replica, u64) -> Result<Option<Delta>, HandleError> + Send>;
type ReadOp = Box<dyn FnOnce(&Replica) -> Result<ReadResult, crdt::Error> + Send>;

/// A read's result, with a token when the caller asked for one (computing it copies the
/// version vector, which plain reads skip).
pub(super) enum ReadResult {
    One(Option<Value>, Option<Token>),
    Many(Vec<(Key, Value)>, Option<Token>),
}

pub(super) enum Command {
    Write(WriteOp, Reply<Option<Token>>),
    Read(ReadOp, Reply<ReadResult>),
    Wait(Token, Instant, Reply<()>),
    Watch(Vec<u8>, Option<u64>, Reply<Watch>),
    Status(Reply<Status>),
    Digest(Reply<StateDigest>),
    Round(Box<RoundRequest>, Reply<RoundReport>),
    Scheduling(Reply<SchedulingView>),
    Nudge(Arc<Notify>),
    Shutdown(oneshot::Sender<()>),
}

/// A running node. Cheap to clone; every clone talks to the same node. The node stops when
/// [`Handle::shutdown`] is called (or when every handle is dropped).
#[derive(Clone)]
pub struct Handle {
    commands: mpsc::Sender<Command>,
    name: MemberName,
    addr: SocketAddr,
}

impl std::fmt::Debug for Handle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handle")
            .field("name", &self.name)
            .field("addr", &self.addr)
            .finish()
    }
}

/// Starts a node with an empty replica under a new incarnation id: binds its endpoint, joins
/// through the seeds, and returns its handle. Needs a tokio runtime.
///
/// With [`NodeConfig::storage`], the replica is first recovered from the data directory (and
/// continued under a new incarnation id), and every write is acknowledged only once durable.
pub async fn start(config: NodeConfig) -> Result<Handle, StartError> {
    let node = new_incarnation(&config.wall_clock);
    let (replica, storage) = match &config.storage {
        Some(storage) => {
            let storage = storage.clone();
            let replica_config = config.replica.clone();
            let (storage, replica) =
                tokio::task::spawn_blocking(move || Storage::open(&storage, replica_config, node))
                    .await
                    .map_err(|err| {
                        StorageError::Stopped(format!("opening storage panicked: {err}"))
                    })??;
            (replica, Some(storage))
        }
        None => (Replica::with_config(node, config.replica.clone()), None),
    };
    let (transport, inbox) =
        Transport::bind(config.bind, config.tls.clone(), config.transport.clone()).await?;
    launch(config, transport, inbox, replica, storage)
}

/// Like [`start`], from an existing replica (for instance one restored from a snapshot), in
/// memory only: fails when `config.storage` is set.
pub async fn start_with(config: NodeConfig, replica: Replica) -> Result<Handle, StartError> {
    refuse_storage(&config)?;
    let (transport, inbox) =
        Transport::bind(config.bind, config.tls.clone(), config.transport.clone()).await?;
    launch(config, transport, inbox, replica, None)
}

/// Like [`start_with`], over a transport the caller bound (for instance over a simulated socket
/// with [`Transport::bind_with_socket`]); `config.bind` and `config.transport` are not used.
pub fn start_on(
    config: NodeConfig,
    transport: Transport,
    inbox: Inbox,
    replica: Replica,
) -> Result<Handle, StartError> {
    refuse_storage(&config)?;
    launch(config, transport, inbox, replica, None)
}

fn refuse_storage(config: &NodeConfig) -> Result<(), StartError> {
    match &config.storage {
        Some(storage) => Err(StartError::Storage(StorageError::Io {
            path: storage.dir.clone(),
            reason: "a node given its replica runs in memory; use `start` to load one from a data directory".into(),
        })),
        None => Ok(()),
    }
}

fn launch(
    config: NodeConfig,
    transport: Transport,
    inbox: Inbox,
    replica: Replica,
    storage: Option<Storage>,
) -> Result<Handle, StartError> {
    let name = MemberName::new(transport.node_name())?;
    config.gossip.validate()?;
    let local = transport.local_addr()?;
    let advertise = config.advertise.unwrap_or(local);
    let me = Member::new(name.clone(), replica.node(), advertise);
    let now = Instant::now().into_std();
    let seed = config
        .rng_seed
        .unwrap_or_else(|| (config.wall_clock)() ^ (u64::from(advertise.port()) << 48));
    let mut node = Node::new(me, replica, config.gossip.clone(), seed, now)?;
    if storage.is_some() {
        node.enable_journal();
    }
    node.join(&config.seeds, now);
    info!(%name, %advertise, replica = %node.replica().node(), seeds = config.seeds.len(), "node started");
    let (commands, receiver) = mpsc::channel(1024);
    let driver = Driver {
        node,
        transport,
        wall_clock: config.wall_clock.clone(),
        peers: HashMap::new(),
        peer_queue_bytes: PEER_QUEUE_BYTES.max(config.gossip.max_message_bytes),
        peer_queue_dropped: 0,
        senders: tokio::task::JoinSet::new(),
        watchers: Vec::new(),
        waiters: Vec::new(),
        cursor: 0,
        storage,
        unsaved: Vec::new(),
        nudges: Vec::new(),
        seeded: config
            .seeds
            .iter()
            .any(|seed| *seed != advertise && *seed != local),
        scheduling: crate::sched::ViewCache::default(),
    };
    tokio::spawn(driver.run(receiver, inbox));
    Ok(Handle {
        commands,
        name,
        addr: advertise,
    })
}

impl Handle {
    /// This node's name.
    pub fn name(&self) -> &MemberName {
        &self.name
    }

    /// The address peers reach this node at.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Writes `value` to the register at `key`. Returns a token that covers the write.
    pub async fn put(
        &self,
        key: impl AsRef<[u8]>,
        value: impl Into<Vec<u8>>,
    ) -> Result<Token, HandleError> {
        let key = Key::new(key)?;
        let value = value.into();
        self.write(&key.clone(), move |replica, now| {
            replica.put(key, value, now).map(Some)
        })
        .await
        .map(expect_token)
    }

    /// Deletes `key`; `None` when it held nothing.
    pub async fn delete(&self, key: impl AsRef<[u8]>) -> Result<Option<Token>, HandleError> {
        let key = Key::new(key)?;
        self.write(&key.clone(), move |replica, now| replica.delete(key, now))
            .await
    }

    /// Adds `amount` to the counter at `key`.
    pub async fn counter_add(
        &self,
        key: impl AsRef<[u8]>,
        amount: i64,
    ) -> Result<Token, HandleError> {
        let key = Key::new(key)?;
        self.write(&key.clone(), move |replica, now| {
            replica.counter_add(key, amount, now).map(Some)
        })
        .await
        .map(expect_token)
    }

    /// Adds elements to the set at `key`.
    pub async fn set_add(
        &self,
        key: impl AsRef<[u8]>,
        elements: Vec<Vec<u8>>,
    ) -> Result<Token, HandleError> {
        let key = Key::new(key)?;
        self.write(&key.clone(), move |replica, now| {
            replica.set_add(key, elements, now).map(Some)
        })
        .await
        .map(expect_token)
    }

    /// Removes elements from the set at `key`; `None` when none was present.
    pub async fn set_remove(
        &self,
        key: impl AsRef<[u8]>,
        elements: Vec<Vec<u8>>,
    ) -> Result<Option<Token>, HandleError> {
        let key = Key::new(key)?;
        self.write(&key.clone(), move |replica, now| {
            replica.set_remove(key, &elements, now)
        })
        .await
    }

    /// Applies a JSON merge patch (RFC 7396) to the document at `key`.
    pub async fn document_patch(
        &self,
        key: impl AsRef<[u8]>,
        patch: serde_json::Value,
    ) -> Result<Token, HandleError> {
        let key = Key::new(key)?;
        self.write(&key.clone(), move |replica, now| {
            replica.document_patch(key, &patch, now).map(Some)
        })
        .await
        .map(expect_token)
    }

    /// The value at `key`, as this node's replica holds it now.
    pub async fn get(&self, key: impl AsRef<[u8]>) -> Result<Option<Value>, HandleError> {
        let key = Key::new(key)?;
        match self
            .read(Box::new(move |replica| {
                Ok(ReadResult::One(replica.get(&key)?, None))
            }))
            .await?
        {
            ReadResult::One(value, _) => Ok(value),
            ReadResult::Many(..) => unreachable_read(),
        }
    }

    /// Like [`Handle::get`], with a token covering everything this node had applied when it
    /// answered: pass it to another node's [`Handle::wait_for`] to read there no older state.
    pub async fn read_key(
        &self,
        key: impl AsRef<[u8]>,
    ) -> Result<(Option<Value>, Token), HandleError> {
        let key = Key::new(key)?;
        match self
            .read(Box::new(move |replica| {
                Ok(ReadResult::One(
                    replica.get(&key)?,
                    Some(replica_token(replica)),
                ))
            }))
            .await?
        {
            ReadResult::One(value, Some(token)) => Ok((value, token)),
            _ => unreachable_read(),
        }
    }

    /// Up to `limit` keys under `prefix`, in key order.
    pub async fn list(
        &self,
        prefix: impl AsRef<[u8]>,
        limit: usize,
    ) -> Result<Vec<(Key, Value)>, HandleError> {
        let prefix = prefix.as_ref().to_vec();
        match self
            .read(Box::new(move |replica| {
                Ok(ReadResult::Many(replica.range(&prefix, limit)?, None))
            }))
            .await?
        {
            ReadResult::Many(items, _) => Ok(items),
            ReadResult::One(..) => unreachable_read(),
        }
    }

    /// Up to `limit` keys under `prefix` that sort after `after` (to page through a large
    /// prefix), in key order, with a token as for [`Handle::read_key`].
    pub async fn list_after(
        &self,
        prefix: impl AsRef<[u8]>,
        after: Option<Key>,
        limit: usize,
    ) -> Result<(Vec<(Key, Value)>, Token), HandleError> {
        let prefix = prefix.as_ref().to_vec();
        match self
            .read(Box::new(move |replica| {
                let items = replica.range_after(&prefix, after.as_ref(), limit)?;
                Ok(ReadResult::Many(items, Some(replica_token(replica))))
            }))
            .await?
        {
            ReadResult::Many(items, Some(token)) => Ok((items, token)),
            _ => unreachable_read(),
        }
    }

    /// Waits until this node has applied everything `token` covers (e.g. a write made at another
    /// node), so a following read sees it. [`HandleError::Timeout`] after `timeout`.
    pub async fn wait_for(&self, token: &Token, timeout: Duration) -> Result<(), HandleError> {
        let deadline = Instant::now() + timeout;
        let (reply, answer) = oneshot::channel();
        self.send(Command::Wait(token.clone(), deadline, reply))
            .await?;
        answer
            .await
            .map_err(|_| HandleError::Stopped)?
            .map_err(|err| match err {
                HandleError::Timeout(_) => HandleError::Timeout(timeout),
                other => other,
            })
    }

    /// Change events for keys starting with `prefix`: those after cursor `from` first (when
    /// given), then every new one as it is applied.
    pub async fn watch(
        &self,
        prefix: impl AsRef<[u8]>,
        from: Option<u64>,
    ) -> Result<Watch, HandleError> {
        let (reply, answer) = oneshot::channel();
        self.send(Command::Watch(prefix.as_ref().to_vec(), from, reply))
            .await?;
        answer.await.map_err(|_| HandleError::Stopped)?
    }

    /// The live members other than this one.
    pub async fn members(&self) -> Result<Vec<Member>, HandleError> {
        Ok(self
            .status()
            .await?
            .peers
            .into_iter()
            .map(|(member, _)| member)
            .collect())
    }

    /// This node's status.
    pub async fn status(&self) -> Result<Status, HandleError> {
        let (reply, answer) = oneshot::channel();
        self.send(Command::Status(reply)).await?;
        answer.await.map_err(|_| HandleError::Stopped)?
    }

    /// A hash of this replica's whole state, with the version it covers: members whose digests
    /// are equal hold the same data. Costs a pass over the whole state on the node's task, so it
    /// is for checks (has the cluster converged?), not for every request.
    pub async fn digest(&self) -> Result<StateDigest, HandleError> {
        let (reply, answer) = oneshot::channel();
        self.send(Command::Digest(reply)).await?;
        answer.await.map_err(|_| HandleError::Stopped)?
    }

    /// Leaves the cluster, delivers what is in flight, and stops the node.
    pub async fn shutdown(&self) -> Result<(), HandleError> {
        let (reply, answer) = oneshot::channel();
        self.send(Command::Shutdown(reply)).await?;
        answer.await.map_err(|_| HandleError::Stopped)
    }

    /// A key-value write of a client: refused under the scheduling prefix.
    async fn write(
        &self,
        key: &Key,
        op: impl FnOnce(&mut Replica, u64) -> Result<Option<Delta>, crdt::Error> + Send + 'static,
    ) -> Result<Option<Token>, HandleError> {
        if crate::sched::is_reserved(key.as_bytes()) {
            return Err(HandleError::Reserved {
                key: String::from_utf8_lossy(key.as_bytes()).into_owned(),
                prefix: crate::sched::RESERVED,
            });
        }
        self.write_any(move |replica, now| op(replica, now).map_err(HandleError::from))
            .await
    }

    /// Any write, the scheduling API's included.
    pub(super) async fn write_any(
        &self,
        op: impl FnOnce(&mut Replica, u64) -> Result<Option<Delta>, HandleError> + Send + 'static,
    ) -> Result<Option<Token>, HandleError> {
        let (reply, answer) = oneshot::channel();
        self.send(Command::Write(Box::new(op), reply)).await?;
        answer.await.map_err(|_| HandleError::Stopped)?
    }

    /// Sends a command and waits for its answer.
    pub(super) async fn ask<T>(
        &self,
        command: impl FnOnce(Reply<T>) -> Command,
    ) -> Result<T, HandleError> {
        let (reply, answer) = oneshot::channel();
        self.send(command(reply)).await?;
        answer.await.map_err(|_| HandleError::Stopped)?
    }

    async fn read(&self, op: ReadOp) -> Result<ReadResult, HandleError> {
        let (reply, answer) = oneshot::channel();
        self.send(Command::Read(op, reply)).await?;
        answer.await.map_err(|_| HandleError::Stopped)?
    }

    pub(super) async fn send(&self, command: Command) -> Result<(), HandleError> {
        self.commands
            .send(command)
            .await
            .map_err(|_| HandleError::Stopped)
    }
}

fn replica_token(replica: &Replica) -> Token {
    Token::from_version(replica.version().clone())
}

fn expect_token(token: Option<Token>) -> Token {
    token.expect("these writes always produce a delta")
}

fn unreachable_read() -> ! {
    unreachable!("each read op returns the shape its caller asked for")
}

/// The task that owns the node.
struct Driver {
    node: Node,
    transport: Transport,
    wall_clock: WallClock,
    /// A sending task per peer address, so one slow peer never delays the others.
    peers: HashMap<SocketAddr, PeerQueue>,
    /// Payload bytes each peer's queue may hold.
    peer_queue_bytes: usize,
    /// Messages dropped at a full peer queue.
    peer_queue_dropped: u64,
    /// The sending tasks, awaited on shutdown so what they hold is handed to the transport.
    senders: tokio::task::JoinSet<()>,
    watchers: Vec<Watcher>,
    waiters: Vec<(Token, Instant, Reply<()>)>,
    /// The change feed cursor up to which watchers have been served.
    cursor: u64,
    /// Durable storage, when configured: every journaled delta goes there.
    storage: Option<Storage>,
    /// Local writes applied but not yet handed to storage, answered once durable.
    unsaved: Vec<Ack>,
    /// Woken when scheduling keys or membership change, so scheduler loops run a round.
    nudges: Vec<Arc<Notify>>,
    /// Started with seeds other than itself: a cluster exists to catch up from.
    seeded: bool,
    /// The scheduling state as parsed at the last round, so the next one re-parses only what
    /// changed.
    scheduling: crate::sched::ViewCache,
}

struct Watcher {
    prefix: Vec<u8>,
    events: mpsc::Sender<Result<ChangeEvent, WatchError>>,
}

impl Driver {
    async fn run(
        mut self,
        mut commands: mpsc::Receiver<Command>,
        mut inbox: crate::runtime::Inbox,
    ) {
        self.cursor = self.node.replica().cursor();
        let shutdown = 'driving: loop {
            self.flush();
            let wake = self.next_wake();
            tokio::select! {
                command = commands.recv() => {
                    // Take what else is waiting too: one flush then sends their writes in one
                    // push and hands them to storage in one batch.
                    let mut next = command;
                    for handled in 1.. {
                        match next {
                            Some(Command::Shutdown(done)) => break 'driving Some(done),
                            Some(command) => self.on_command(command),
                            None => break 'driving None,
                        }
                        if handled == BATCH {
                            break;
                        }
                        match commands.try_recv() {
                            Ok(command) => next = Some(command),
                            Err(_) => break,
                        }
                    }
                }
                received = inbox.recv() => {
                    let mut next = received;
                    for handled in 1.. {
                        match next {
                            Some(received) => self.on_received(received),
                            None => break 'driving None,
                        }
                        if handled == BATCH {
                            break;
                        }
                        next = inbox.try_recv();
                        if next.is_none() {
                            break;
                        }
                    }
                }
                () = tokio::time::sleep_until(wake) => {
                    self.node.handle_timeout(Instant::now().into_std());
                    self.expire_waiters();
                }
            }
        };
        self.leave().await;
        if let Some(done) = shutdown {
            let _ = done.send(());
        }
    }

    fn next_wake(&self) -> Instant {
        let protocol = self.node.poll_timeout().map(Instant::from_std);
        let waiter = self.waiters.iter().map(|(_, deadline, _)| *deadline).min();
        let idle = Instant::now() + Duration::from_secs(3600);
        [protocol, waiter]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(idle)
    }

    fn on_command(&mut self, command: Command) {
        let now = Instant::now().into_std();
        match command {
            Command::Write(op, reply) => {
                let wall = (self.wall_clock)();
                let result = self.node.write(now, |replica| op(replica, wall));
                match result {
                    Ok(Some(dot)) if self.storage.is_some() => {
                        self.unsaved
                            .push(Box::new(move |saved: Result<(), StorageError>| {
                                let answer = saved
                                    .map(|()| Some(Token::from_dot(dot)))
                                    .map_err(|err| HandleError::Storage(err.to_string()));
                                let _ = reply.send(answer);
                            }));
                    }
                    result => {
                        let _ = reply.send(result.map(|dot| dot.map(Token::from_dot)));
                    }
                }
            }
            Command::Read(op, reply) => {
                let _ = reply.send(op(self.node.replica()).map_err(HandleError::from));
            }
            Command::Wait(token, deadline, reply) => {
                if token.is_covered_by(self.node.replica().version()) {
                    let _ = reply.send(Ok(()));
                } else {
                    self.waiters.push((token, deadline, reply));
                }
            }
            Command::Watch(prefix, from, reply) => {
                let _ = reply.send(Ok(self.add_watcher(prefix, from)));
            }
            Command::Status(reply) => {
                let _ = reply.send(Ok(self.status()));
            }
            Command::Digest(reply) => {
                let replica = self.node.replica();
                let _ = reply.send(Ok(StateDigest {
                    digest: replica.digest(),
                    version: replica.version().clone(),
                }));
            }
            Command::Round(request, reply) => {
                let wall = (self.wall_clock)();
                let round = scheduling::round(
                    &mut self.node,
                    &mut self.scheduling,
                    *request,
                    self.seeded,
                    wall,
                    now,
                );
                let _ = reply.send(round);
            }
            Command::Scheduling(reply) => {
                let _ = reply.send(scheduling::view(&self.node, &mut self.scheduling));
            }
            Command::Nudge(notify) => self.nudges.push(notify),
            Command::Shutdown(_) => {}
        }
    }

    fn on_received(&mut self, received: crate::runtime::Received) {
        let Ok(from) = MemberName::new(received.from.clone()) else {
            warn!(peer = %received.from, "message from a peer whose certificate name is not a valid member name");
            return;
        };
        let now = Instant::now().into_std();
        if let Err(err) = self
            .node
            .handle_message(&from, received.addr, &received.bytes, now)
        {
            debug!(peer = %from, error = %err, "message dropped");
        }
    }

    /// Sends what the node produced, serves watchers and waiters, and logs membership changes.
    fn flush(&mut self) {
        while let Some(transmit) = self.node.poll_transmit() {
            self.dispatch(transmit);
        }
        while let Some(event) = self.node.poll_event() {
            self.nudge();
            match event {
                gossip::Event::MemberUp(member) => {
                    info!(member = %member.name, addr = %member.addr, "member up")
                }
                gossip::Event::MemberDown(member) => warn!(member = %member.name, "member down"),
                gossip::Event::Rejoined(me) => warn!(
                    generation = me.generation,
                    "declared down by peers; rejoined"
                ),
                _ => {}
            }
        }
        if self.node.replica().cursor() != self.cursor {
            self.serve_watchers();
            self.serve_waiters();
        }
        self.save();
    }

    /// Hands what changed the replica to storage, with the local writes waiting on it, and
    /// replaces the log with a snapshot when it has grown large.
    fn save(&mut self) {
        let Some(storage) = &self.storage else { return };
        let mut deltas = Vec::new();
        while let Some(delta) = self.node.poll_applied() {
            deltas.push(delta);
        }
        if deltas.is_empty() && self.unsaved.is_empty() {
            return;
        }
        storage.append(deltas, std::mem::take(&mut self.unsaved));
        if storage.wants_checkpoint() {
            storage.checkpoint(self.node.replica().snapshot());
        }
    }

    fn dispatch(&mut self, transmit: Transmit) {
        let addr = transmit.to.addr;
        let queue = self.peers.entry(addr).or_insert_with(|| {
            let (queue, receiver) = PeerQueue::new(PEER_QUEUE, self.peer_queue_bytes);
            self.senders.spawn(send_loop(
                self.transport.clone(),
                receiver,
                queue.queued.clone(),
            ));
            queue
        });
        if !queue.offer(transmit) {
            self.peer_queue_dropped += 1;
            debug!(%addr, "peer queue full; message dropped (anti-entropy will repair)");
        }
    }

    fn add_watcher(&mut self, prefix: Vec<u8>, from: Option<u64>) -> Watch {
        let (events, receiver) = mpsc::channel(WATCH_QUEUE);
        if let Some(from) = from {
            match self.node.replica().events_since(from) {
                Ok(backlog) => {
                    let mut room = WATCH_QUEUE - 1;
                    for event in backlog.filter(|event| {
                        event.cursor <= self.cursor && event.key.as_bytes().starts_with(&prefix)
                    }) {
                        // One slot stays free for the error that tells the watcher to resume.
                        if room == 0 {
                            let _ = events.try_send(Err(WatchError::Lagged(WATCH_QUEUE)));
                            return Watch { events: receiver };
                        }
                        room -= 1;
                        let _ = events.try_send(Ok(event.clone()));
                    }
                }
                Err(crdt::Error::Compacted { requested, oldest }) => {
                    let _ = events.try_send(Err(WatchError::Compacted { requested, oldest }));
                    return Watch { events: receiver };
                }
                Err(_) => {}
            }
        }
        self.watchers.push(Watcher { prefix, events });
        Watch { events: receiver }
    }

    /// Wakes the scheduler loops; forgets those that ended.
    fn nudge(&mut self) {
        self.nudges.retain(|notify| Arc::strong_count(notify) > 1);
        for notify in &self.nudges {
            notify.notify_one();
        }
    }

    fn serve_watchers(&mut self) {
        let replica = self.node.replica();
        let latest = replica.cursor();
        let fresh: Option<Vec<ChangeEvent>> = replica
            .events_since(self.cursor)
            .ok()
            .map(|events| events.cloned().collect());
        self.cursor = latest;
        let Some(fresh) = fresh else {
            // More changes than the feed holds arrived at once: every watcher lost some.
            self.nudge();
            for watcher in self.watchers.drain(..) {
                let _ = watcher
                    .events
                    .try_send(Err(WatchError::Lagged(WATCH_QUEUE)));
            }
            return;
        };
        if !self.nudges.is_empty()
            && fresh
                .iter()
                .any(|event| crate::sched::is_reserved(event.key.as_bytes()))
        {
            self.nudge();
        }
        self.watchers.retain(|watcher| {
            for event in fresh
                .iter()
                .filter(|event| event.key.as_bytes().starts_with(&watcher.prefix))
            {
                match watcher.events.try_send(Ok(event.clone())) {
                    Ok(()) => {}
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        // Cut off rather than block the node; the watcher resumes from its cursor.
                        let events = watcher.events.clone();
                        tokio::spawn(async move {
                            let _ = events.send(Err(WatchError::Lagged(WATCH_QUEUE))).await;
                        });
                        return false;
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => return false,
                }
            }
            !watcher.events.is_closed()
        });
    }

    fn serve_waiters(&mut self) {
        let version = self.node.replica().version().clone();
        let (ready, waiting): (Vec<_>, Vec<_>) = self
            .waiters
            .drain(..)
            .partition(|(token, _, _)| token.is_covered_by(&version));
        self.waiters = waiting;
        for (_, _, reply) in ready {
            let _ = reply.send(Ok(()));
        }
    }

    fn expire_waiters(&mut self) {
        let now = Instant::now();
        let (expired, waiting): (Vec<_>, Vec<_>) = self
            .waiters
            .drain(..)
            .partition(|(_, deadline, _)| *deadline <= now);
        self.waiters = waiting;
        for (_, _, reply) in expired {
            let _ = reply.send(Err(HandleError::Timeout(Duration::ZERO)));
        }
    }

    fn status(&self) -> Status {
        let replica = self.node.replica();
        let version = replica.version();
        let reports = self.node.reports();
        let peers = self
            .node
            .members()
            .map(|member| {
                let lag = reports.get(&member.name).map(|report| lag(version, report));
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
            storage: self.storage.as_ref().map(Storage::stats),
            transport: self.transport.stats(),
            peer_queue_dropped: self.peer_queue_dropped,
        }
    }

    async fn leave(mut self) {
        self.node.leave(Instant::now().into_std());
        while let Some(transmit) = self.node.poll_transmit() {
            self.dispatch(transmit);
        }
        // Closing the queues lets each sending task finish what it holds; then the transport
        // drains its connections. A peer that never answers delays shutdown by at most a bound.
        self.peers.clear();
        let senders = async { while self.senders.join_next().await.is_some() {} };
        if tokio::time::timeout(SHUTDOWN_SEND_BOUND, senders)
            .await
            .is_err()
        {
            warn!("messages to unreachable peers were abandoned at shutdown");
        }
        // What arrived while leaving, then a snapshot so the next start replays nothing.
        self.save();
        if let Some(storage) = &self.storage {
            storage.checkpoint(self.node.replica().snapshot());
        }
        self.transport.shutdown().await;
        if let Some(storage) = self.storage
            && tokio::task::spawn_blocking(move || storage.close())
                .await
                .is_err()
        {
            warn!("storage did not close cleanly");
        }
        info!("node stopped");
    }
}

/// The queue towards one peer's sending task, bounded in messages and in payload bytes.
struct PeerQueue {
    sender: mpsc::Sender<Transmit>,
    /// Payload bytes queued and not yet handed to the transport; the sending task gives them
    /// back once it has written each message.
    queued: Arc<AtomicUsize>,
    /// The most `queued` may reach.
    budget: usize,
}

impl PeerQueue {
    fn new(messages: usize, budget: usize) -> (PeerQueue, mpsc::Receiver<Transmit>) {
        let (sender, receiver) = mpsc::channel(messages);
        let queue = PeerQueue {
            sender,
            queued: Arc::new(AtomicUsize::new(0)),
            budget,
        };
        (queue, receiver)
    }

    /// Queues `transmit` unless that would exceed the queue's messages or bytes; `false` when
    /// the message was dropped.
    fn offer(&self, transmit: Transmit) -> bool {
        let len = transmit.payload.len();
        let fits = |queued: usize| {
            queued
                .checked_add(len)
                .filter(|total| *total <= self.budget)
        };
        if self
            .queued
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, fits)
            .is_err()
        {
            return false;
        }
        if self.sender.try_send(transmit).is_err() {
            self.queued.fetch_sub(len, Ordering::SeqCst);
            return false;
        }
        true
    }
}

async fn send_loop(
    transport: Transport,
    mut queue: mpsc::Receiver<Transmit>,
    queued: Arc<AtomicUsize>,
) {
    while let Some(transmit) = queue.recv().await {
        let len = transmit.payload.len();
        let channel = match transmit.channel {
            gossip::Channel::Datagram => Channel::Datagram,
            _ => Channel::Stream,
        };
        let expect = transmit.to.name.as_ref().map(MemberName::as_str);
        if let Err(err) = transport
            .send(transmit.to.addr, expect, channel, transmit.payload)
            .await
        {
            debug!(addr = %transmit.to.addr, error = %err, "send failed");
        }
        queued.fetch_sub(len, Ordering::SeqCst);
    }
}

/// How many writes `report` lacks compared to `version`.
fn lag(version: &VersionVector, report: &VersionVector) -> u64 {
    version
        .iter()
        .map(|(node, seq)| seq.saturating_sub(report.get(node)))
        .sum()
}

fn system_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_millis() as u64)
}

/// A replica id for a new incarnation: milliseconds in the high bits, so a later incarnation of
/// a member compares greater than an earlier one, and random-ish low bits against collisions.
fn new_incarnation(clock: &WallClock) -> NodeId {
    let millis = clock();
    let noise = {
        use std::hash::{BuildHasher, Hasher};
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u64(millis);
        hasher.finish() & 0xf_ffff
    };
    NodeId((millis << 20) | noise)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn transmit(len: usize) -> Transmit {
        Transmit {
            to: gossip::Destination {
                name: None,
                addr: SocketAddr::from(([127, 0, 0, 1], 7000)),
            },
            channel: gossip::Channel::Stream,
            payload: vec![0; len],
        }
    }

    #[test]
    fn peer_queue_drops_what_exceeds_its_byte_budget() {
        // A peer that never reads: the receiver is kept but never drained.
        let (queue, mut receiver) = PeerQueue::new(PEER_QUEUE, 1000);
        assert!(queue.offer(transmit(600)));
        assert!(!queue.offer(transmit(600)), "over the byte budget");
        assert!(queue.offer(transmit(400)), "exactly fills the budget");
        assert!(!queue.offer(transmit(1)), "nothing more fits");
        assert_eq!(queue.queued.load(Ordering::SeqCst), 1000);

        // What the sending task does once it has written a message: give its bytes back.
        let sent = receiver.try_recv().expect("queued message");
        queue.queued.fetch_sub(sent.payload.len(), Ordering::SeqCst);
        assert!(queue.offer(transmit(600)));
        assert_eq!(receiver.len(), 2);
    }

    #[test]
    fn peer_queue_still_bounds_messages() {
        let (queue, _receiver) = PeerQueue::new(2, 1000);
        assert!(queue.offer(transmit(1)));
        assert!(queue.offer(transmit(1)));
        assert!(!queue.offer(transmit(1)), "over the message bound");
        // A message refused for the count gives its bytes back.
        assert_eq!(queue.queued.load(Ordering::SeqCst), 2);
    }
}
