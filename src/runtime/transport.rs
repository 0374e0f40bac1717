//! QUIC transport: one quinn endpoint per node, mutual TLS, one connection per peer pair.
//!
//! Messages travel one per unidirectional stream (reliable) or as a datagram (lossy). Every
//! message is tagged with the sender's name taken from its verified certificate.
//!
//! When two nodes dial each other at once, both keep the connection dialed by the node with the
//! smaller name. The other one is drained before it is closed: each side stops opening streams on
//! it and sends a "bye" on a bidirectional control stream carrying how many message streams it
//! opened there; the receiver answers once it has read that many. A side closes the connection
//! once its own bye is answered and it has answered the peer's, so no message is lost. Shutdown
//! drains every connection the same way.
//!
//! A restarted peer (same name and address, new process) is reachable again at once: its
//! stateless-reset key is derived from its private key, so the packets we send on the connection
//! to its dead predecessor draw a stateless reset we accept and the connection ends; and when the
//! restarted peer dials us while we still hold a connection we dialed to it, which would win the
//! tie, we send on the new connection at once and probe the old one with an empty datagram. A
//! reset ends the old one; one still alive after the probation (both sides dialed at once) wins
//! back, and the new one is drained, losing nothing.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use quinn::{ConnectionError, RecvStream, SendDatagramError, SendStream, VarInt, WriteError};
use rustls::pki_types::CertificateDer;
use tokio::sync::{RwLock, Semaphore, SemaphorePermit, mpsc, watch};
use tracing::{debug, info, warn};

use crate::runtime::tls::{
    MismatchSlot, SEED_SERVER_NAME, TlsConfig, TlsError, node_name_from_cert,
};

/// Capacity of the channel between the connection tasks and the [`Inbox`].
const INBOX_CAPACITY: usize = 4096;
/// Bytes of a message any stream may read on its own; past this it needs a large-read slot.
const SMALL_MESSAGE_BYTES: usize = 64 * 1024;
/// Messages longer than [`SMALL_MESSAGE_BYTES`] read at once, across every connection, so
/// a flood of large messages holds a bounded number of them half-read.
const LARGE_READ_SLOTS: usize = 4;
/// Concurrent message streams a peer may have open towards us.
const MAX_UNI_STREAMS: u32 = 1024;
/// Concurrent control streams a peer may open: one bye per connection is all it needs.
const MAX_CONTROL_STREAMS: u32 = 4;
/// Attempts of one send when the chosen connection turns out to be draining.
const MAX_SEND_ATTEMPTS: usize = 4;

/// Application close code: a duplicate connection, drained.
const CLOSE_SUPERSEDED: VarInt = VarInt::from_u32(1);
/// Application close code: the node is shutting down.
const CLOSE_SHUTDOWN: VarInt = VarInt::from_u32(2);
/// Application close code: the peer broke the control protocol.
const CLOSE_PROTOCOL: VarInt = VarInt::from_u32(3);
/// Application close code: the peer's identity is unusable (no name, our own name, wrong name).
const CLOSE_IDENTITY: VarInt = VarInt::from_u32(4);
/// Stream stop code: the message exceeds the receiver's size limit.
const STOP_TOO_LARGE: VarInt = VarInt::from_u32(1);
/// Stream reset code: the sender gave up before the message was complete.
const RESET_ABANDONED: VarInt = VarInt::from_u32(2);
/// Answer to a bye: every announced stream has been read.
const BYE_ACK: u8 = 1;
/// How long a connection we dialed is probed, beyond three of its round trips, before an incoming
/// connection from the same peer gives way to it (see [`probation`]).
const PROBATION_SLACK: Duration = Duration::from_millis(200);
/// The longest probation, whatever the round-trip time.
const PROBATION_MAX: Duration = Duration::from_secs(1);

/// Tunables of the transport.
#[derive(Debug, Clone)]
pub struct TransportConfig {
    /// Largest message accepted on a stream; larger ones are dropped (default 64 MiB).
    pub max_message_bytes: usize,
    /// Keep-alive ping interval, so idle connections survive the idle timeout (default 5 s).
    pub keep_alive: Duration,
    /// A connection silent for this long is closed (default 30 s).
    pub idle_timeout: Duration,
    /// Largest payload sent as a datagram; larger ones go over a stream (default 1200).
    pub max_datagram_bytes: usize,
    /// How long shutdown waits for peers to confirm they read everything (default 5 s).
    pub drain_timeout: Duration,
    /// Payload bytes of received messages held until the node has handled them (default
    /// 256 MiB). At least `max_message_bytes` and below 4 GiB. Stream readers wait for room,
    /// which slows the sender through QUIC flow control; datagrams over it are dropped.
    pub inbox_bytes: usize,
}

impl Default for TransportConfig {
    fn default() -> Self {
        TransportConfig {
            max_message_bytes: 64 * 1024 * 1024,
            keep_alive: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(30),
            max_datagram_bytes: 1200,
            drain_timeout: Duration::from_secs(5),
            inbox_bytes: 256 * 1024 * 1024,
        }
    }
}

/// How a message travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Channel {
    /// Unreliable and unordered; falls back to a stream when the message is too large.
    Datagram,
    /// Reliable: one unidirectional stream per message.
    Stream,
}

/// A message received from a peer.
///
/// It counts against the inbox budget (`TransportConfig::inbox_bytes`) until it is dropped;
/// clones share that hold, released with the last of them.
#[derive(Debug, Clone)]
pub struct Received {
    /// The sender's node name, from its verified certificate.
    pub from: String,
    /// The sender's address.
    pub addr: SocketAddr,
    /// How the message travelled.
    // Read by tests only (the node does not care): public with the feature `testing`.
    #[cfg_attr(not(feature = "testing"), allow(dead_code))]
    pub channel: Channel,
    /// The message.
    pub bytes: Vec<u8>,
    /// The inbox bytes this message holds, returned when the last clone is dropped.
    _held: Arc<InboxHold>,
}

/// A snapshot of the transport's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TransportStats {
    /// Handshakes that failed verification or were refused by the peer (time-outs excluded).
    pub handshakes_refused: u64,
    /// Messages handed to the network.
    pub messages_sent: u64,
    /// Messages delivered to the inbox.
    pub messages_received: u64,
    /// Payload bytes handed to the network.
    pub bytes_sent: u64,
    /// Payload bytes delivered to the inbox.
    pub bytes_received: u64,
    /// Incoming messages dropped for exceeding `max_message_bytes`.
    pub oversized_dropped: u64,
    /// Incoming datagrams dropped because the inbox was full (in messages or bytes).
    pub datagrams_dropped: u64,
    /// Payload bytes of received messages not yet handled (dropped) by the node.
    pub inbox_bytes: u64,
    /// The highest `inbox_bytes` since the transport started.
    pub inbox_bytes_max: u64,
    /// The most `inbox_bytes` may reach ([`TransportConfig::inbox_bytes`]).
    pub inbox_budget: u64,
    /// Connections this node dialed successfully.
    pub connections_dialed: u64,
    /// Connections this node accepted successfully.
    pub connections_accepted: u64,
}

/// One open connection, as listed by [`Transport::connections`].
// Listed by tests only: public with the feature `testing`.
#[cfg_attr(not(feature = "testing"), allow(dead_code))]
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConnectionInfo {
    /// The peer's authenticated node name.
    pub peer: String,
    /// The peer's address.
    pub addr: SocketAddr,
    /// Whether this node dialed the connection (else the peer did).
    pub dialed_by_us: bool,
    /// Whether the connection is being drained (a duplicate or shutting down).
    pub draining: bool,
}

/// Errors of the transport.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// The transport configuration is unusable.
    #[error("invalid transport configuration: {0}")]
    Config(&'static str),
    /// The UDP socket could not be bound.
    #[error("cannot bind UDP socket {addr}: {source}")]
    Bind {
        /// The requested address.
        addr: SocketAddr,
        /// The OS error.
        source: io::Error,
    },
    /// The QUIC endpoint or its socket failed.
    #[error("QUIC endpoint: {0}")]
    Endpoint(#[source] io::Error),
    /// The TLS configuration could not be used.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The dial could not even start (e.g. an unusable address).
    #[error("cannot dial {addr}: {source}")]
    Connect {
        /// The dialed address.
        addr: SocketAddr,
        /// quinn's reason.
        source: quinn::ConnectError,
    },
    /// The handshake failed: wrong CA, expired certificate, unreachable peer, ...
    #[error("handshake with {addr} failed: {source}")]
    Handshake {
        /// The dialed address.
        addr: SocketAddr,
        /// quinn's reason.
        source: ConnectionError,
    },
    /// The peer's certificate is valid but for another node.
    #[error("peer at {addr} is {found:?}, expected {expected:?}")]
    NameMismatch {
        /// The dialed address.
        addr: SocketAddr,
        /// The name the caller expected.
        expected: String,
        /// The name in the peer's certificate.
        found: String,
    },
    /// The peer's certificate carries no usable node name.
    #[error("peer at {addr} has no usable identity: {source}")]
    PeerIdentity {
        /// The peer's address.
        addr: SocketAddr,
        /// Why its certificate was unusable.
        source: TlsError,
    },
    /// The address is this node's own endpoint.
    #[error("{addr} is this node itself")]
    SelfConnection {
        /// The dialed address.
        addr: SocketAddr,
    },
    /// The connection failed while sending.
    #[error("connection to {peer} lost: {source}")]
    ConnectionLost {
        /// The peer's node name.
        peer: String,
        /// quinn's reason.
        source: ConnectionError,
    },
    /// The peer stopped the stream, e.g. because the message exceeds its size limit.
    #[error("{peer} refused the message (stream stopped with code {code})")]
    Refused {
        /// The peer's node name.
        peer: String,
        /// The stop code.
        code: u64,
    },
    /// Writing the message failed for another reason.
    #[error("writing to {peer} failed: {source}")]
    Write {
        /// The peer's node name.
        peer: String,
        /// quinn's reason.
        source: WriteError,
    },
    /// The message is larger than `max_message_bytes`.
    #[error("message of {len} bytes exceeds the {max}-byte limit")]
    MessageTooLarge {
        /// The message size.
        len: usize,
        /// The configured limit.
        max: usize,
    },
    /// Every connection found for the peer was being drained.
    #[error("no stable connection to {addr}: connections kept being replaced")]
    Unstable {
        /// The destination address.
        addr: SocketAddr,
    },
    /// The transport has been shut down.
    #[error("transport is shut down")]
    Closed,
}

/// The node's QUIC endpoint: dials, accepts and sends. Cheap to clone.
#[derive(Clone)]
pub struct Transport {
    handle: Arc<Handle>,
}

/// Receiving end of the messages of every connection.
#[derive(Debug)]
pub struct Inbox {
    rx: mpsc::Receiver<Received>,
}

impl Inbox {
    /// The next message; `None` once the transport and all its connections are gone.
    pub async fn recv(&mut self) -> Option<Received> {
        self.rx.recv().await
    }

    /// The next message if one is already waiting.
    pub fn try_recv(&mut self) -> Option<Received> {
        self.rx.try_recv().ok()
    }
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transport")
            .field("node_name", &self.node_name())
            .field("local_addr", &self.local_addr().ok())
            .finish_non_exhaustive()
    }
}

impl Transport {
    /// Binds a UDP socket at `addr` and starts accepting connections (needs a tokio runtime).
    pub async fn bind(
        addr: SocketAddr,
        tls: TlsConfig,
        config: TransportConfig,
    ) -> Result<(Transport, Inbox), TransportError> {
        let socket = std::net::UdpSocket::bind(addr)
            .map_err(|source| TransportError::Bind { addr, source })?;
        let runtime: Arc<dyn quinn::Runtime> = Arc::new(quinn::TokioRuntime);
        let socket = runtime
            .wrap_udp_socket(socket)
            .map_err(TransportError::Endpoint)?;
        let mut endpoint = quinn::EndpointConfig::default();
        endpoint.cid_generator(|| Box::new(RandomConnectionIds::default()));
        Self::bind_with_socket(socket, runtime, tls, config, endpoint)
    }

    /// Like [`Transport::bind`] over a caller-provided socket and runtime (e.g. a simulation).
    ///
    /// Every task of the transport is spawned on `runtime`; call it from within that runtime.
    /// `endpoint_config`'s stateless-reset key is replaced by the one derived from the node's
    /// private key, so that a restarted node can reset its peers' connections to its previous
    /// process (see `TlsConfig::stateless_reset_key`). Its connection-id generator must take
    /// the ids of a previous process as possibly its own (quinn's default one, keyed per
    /// process, drops their packets without a reset); [`Transport::bind`]'s does.
    pub fn bind_with_socket(
        socket: Arc<dyn quinn::AsyncUdpSocket>,
        runtime: Arc<dyn quinn::Runtime>,
        tls: TlsConfig,
        config: TransportConfig,
        mut endpoint_config: quinn::EndpointConfig,
    ) -> Result<(Transport, Inbox), TransportError> {
        endpoint_config.reset_key(tls.stateless_reset_key());
        let quic = Arc::new(quic_config(&config)?);
        let inbox_permits = inbox_permits(&config)?;
        let mut server = quinn::ServerConfig::with_crypto(tls.server_crypto());
        server.transport_config(quic.clone());
        let endpoint = quinn::Endpoint::new_with_abstract_socket(
            endpoint_config,
            Some(server),
            socket,
            runtime.clone(),
        )
        .map_err(TransportError::Endpoint)?;
        let (tx, rx) = mpsc::channel(INBOX_CAPACITY);
        let shared = Arc::new(Shared {
            endpoint,
            tls,
            config,
            quic,
            runtime,
            table: Mutex::default(),
            dial_locks: Mutex::default(),
            inbox: tx,
            inbox_budget: Arc::new(InboxBudget::new(inbox_permits)),
            large_reads: Semaphore::new(LARGE_READ_SLOTS),
            counters: Counters::default(),
            closing: AtomicBool::new(false),
        });
        shared.spawn(accept_loop(shared.clone()));
        let handle = Arc::new(Handle { shared });
        Ok((Transport { handle }, Inbox { rx }))
    }

    /// The address the endpoint is bound to.
    pub fn local_addr(&self) -> Result<SocketAddr, TransportError> {
        self.shared()
            .endpoint
            .local_addr()
            .map_err(TransportError::Endpoint)
    }

    /// This node's name, from its certificate.
    pub fn node_name(&self) -> &str {
        self.shared().tls.node_name()
    }

    /// Sends one message, reusing the connection to that peer or dialing one.
    ///
    /// `expect` is the peer's node name when known: the peer's certificate must carry it. `None`
    /// (a seed address) accepts any node of the cluster. Returning `Ok` means the message was
    /// handed to QUIC, not that the peer read it.
    pub async fn send(
        &self,
        to: SocketAddr,
        expect: Option<&str>,
        channel: Channel,
        bytes: Vec<u8>,
    ) -> Result<(), TransportError> {
        let shared = self.shared();
        let max = shared.config.max_message_bytes;
        if bytes.len() > max {
            return Err(TransportError::MessageTooLarge {
                len: bytes.len(),
                max,
            });
        }
        let bytes = Bytes::from(bytes);
        for _ in 0..MAX_SEND_ATTEMPTS {
            if shared.closing.load(Ordering::SeqCst) {
                return Err(TransportError::Closed);
            }
            let link = shared.link_to(to, expect).await?;
            match shared.send_on(&link, channel, bytes.clone()).await {
                Ok(()) => {
                    shared.counters.sent(bytes.len());
                    return Ok(());
                }
                // Drained under us: the next lookup finds the winner or dials.
                Err(SendFailure::Draining) => {}
                Err(SendFailure::Failed(e)) => {
                    if link.conn.close_reason().is_some() {
                        shared.forget(&link);
                    }
                    return Err(e);
                }
            }
        }
        Err(TransportError::Unstable { addr: to })
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> TransportStats {
        let shared = self.shared();
        shared.counters.snapshot(&shared.inbox_budget)
    }

    /// Open connections, draining ones included (for tests and metrics).
    // Called by tests only: public with the feature `testing`.
    #[cfg_attr(not(feature = "testing"), allow(dead_code))]
    pub fn connection_count(&self) -> usize {
        let table = self.shared().table();
        table.links.values().filter(|l| l.is_open()).count()
    }

    /// The open connections, draining ones included (for status pages and tests).
    #[cfg_attr(not(feature = "testing"), allow(dead_code))]
    pub fn connections(&self) -> Vec<ConnectionInfo> {
        let table = self.shared().table();
        let mut infos: Vec<ConnectionInfo> = table
            .links
            .values()
            .filter(|l| l.is_open())
            .map(|l| l.info())
            .collect();
        infos.sort_by(|x, y| (&x.peer, x.addr).cmp(&(&y.peer, y.addr)));
        infos
    }

    /// Drains every connection (peers confirm they read our messages), then closes the endpoint.
    ///
    /// Waits at most `drain_timeout` for the peers. Other clones of this transport stop working.
    #[cfg_attr(not(feature = "testing"), allow(dead_code))]
    pub async fn shutdown(self) {
        let bound = self.shared().config.drain_timeout;
        self.shutdown_within(bound, |_| true).await;
    }

    /// Like [`Transport::shutdown`], within `bound` in all (capped by `drain_timeout`), and
    /// waiting for the confirmation only of peers for which `wait_for(name)` holds: a peer known
    /// to be down is told goodbye but never waited on.
    pub async fn shutdown_within(self, bound: Duration, wait_for: impl Fn(&str) -> bool) {
        let deadline = tokio::time::Instant::now() + bound;
        let shared = self.shared().clone();
        shared.closing.store(true, Ordering::SeqCst);
        // Refuse new connections while draining the existing ones.
        shared.endpoint.set_server_config(None);
        let links: Vec<Arc<Link>> = shared.table().links.values().cloned().collect();
        for link in &links {
            shared.start_drain(link.clone());
        }
        let drained = async {
            for link in links.iter().filter(|link| wait_for(&link.peer)) {
                link.wait_drained().await;
            }
        };
        let drain_bound = shared.config.drain_timeout.min(bound);
        if tokio::time::timeout(drain_bound, drained).await.is_err() {
            warn!(node = %shared.tls.node_name(), "shutdown: some peers did not confirm receipt in time");
        }
        shared.endpoint.close(CLOSE_SHUTDOWN, b"shutdown");
        // Closing connections linger for a few round trips; a peer that vanished would make
        // that wait grow with its backed-off timers.
        if tokio::time::timeout_at(deadline, shared.endpoint.wait_idle())
            .await
            .is_err()
        {
            debug!("shutdown: connections still closing when the bound ran out");
        }
    }

    fn shared(&self) -> &Arc<Shared> {
        &self.handle.shared
    }
}

/// Closes the endpoint when the last [`Transport`] clone is dropped without a shutdown.
struct Handle {
    shared: Arc<Shared>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        // Background tasks hold `Shared`; closing the endpoint is what lets them end.
        self.shared.closing.store(true, Ordering::SeqCst);
        self.shared.endpoint.close(CLOSE_SHUTDOWN, b"dropped");
    }
}

/// State shared by the transport handles and its background tasks.
struct Shared {
    endpoint: quinn::Endpoint,
    tls: TlsConfig,
    config: TransportConfig,
    quic: Arc<quinn::TransportConfig>,
    runtime: Arc<dyn quinn::Runtime>,
    table: Mutex<Table>,
    /// One dial at a time per address, so concurrent sends share a connection.
    dial_locks: Mutex<HashMap<SocketAddr, Arc<tokio::sync::Mutex<()>>>>,
    inbox: mpsc::Sender<Received>,
    /// Byte room in the inbox: a message takes its length before it enters the channel.
    inbox_budget: Arc<InboxBudget>,
    /// Slots for reading a message past [`SMALL_MESSAGE_BYTES`].
    large_reads: Semaphore,
    counters: Counters,
    closing: AtomicBool,
}

/// Live connections, indexed for lookups.
#[derive(Default)]
struct Table {
    /// Every open connection, by quinn's stable id.
    links: HashMap<usize, Arc<Link>>,
    /// The connection used for sending to each peer.
    by_name: HashMap<String, Arc<Link>>,
    /// The peer name last seen at each address, so seed addresses reuse connections.
    by_addr: HashMap<SocketAddr, String>,
    /// Connections we dialed that a peer's new dial displaced until a probe shows whether they
    /// are alive (see [`probation`]), by peer.
    suspects: HashMap<String, Arc<Link>>,
}

/// One authenticated connection and its drain state.
struct Link {
    conn: quinn::Connection,
    peer: String,
    dialed_by_us: bool,
    /// `true` once draining: senders hold a read guard while opening and writing a stream, so
    /// taking the write guard waits for them and freezes `opened`.
    gate: RwLock<bool>,
    /// Message streams we opened.
    opened: AtomicU64,
    /// Message streams from the peer that were fully handled.
    completed: watch::Sender<u64>,
    draining: AtomicBool,
    /// The peer confirmed reading every stream we opened.
    own_bye_acked: watch::Sender<bool>,
    /// The peer can decrypt what we send (see [`Link::handshake_confirmed`]).
    confirmed: AtomicBool,
    /// We confirmed reading every stream the peer opened.
    peer_bye_acked: AtomicBool,
}

/// What registering a new connection decided.
struct Decision {
    /// The connection to send on now.
    winner: Arc<Link>,
    /// A duplicate to drain.
    loser: Option<Arc<Link>>,
    /// Our own dial, displaced only until a probe shows whether it is alive (see [`probation`]).
    suspect: Option<Arc<Link>>,
}

/// Random 8-byte connection ids, every one of which may be ours.
///
/// quinn's default generator tags its ids with a key drawn per process and silently drops
/// packets whose id fails the tag, so a restarted node would never answer its peers' packets on
/// connections to its predecessor with a stateless reset. This one keeps the trait's default
/// `validate` (every id is possibly ours): a packet for an unknown connection gets a reset,
/// which quinn keeps smaller than the packet and rate-limits.
struct RandomConnectionIds(ring::rand::SystemRandom);

impl Default for RandomConnectionIds {
    fn default() -> Self {
        RandomConnectionIds(ring::rand::SystemRandom::new())
    }
}

impl quinn::ConnectionIdGenerator for RandomConnectionIds {
    fn generate_cid(&mut self) -> quinn::ConnectionId {
        let mut id = [0u8; 8];
        ring::rand::SecureRandom::fill(&self.0, &mut id)
            .expect("the operating system provides random bytes");
        quinn::ConnectionId::new(&id)
    }

    fn cid_len(&self) -> usize {
        8
    }

    fn cid_lifetime(&self) -> Option<Duration> {
        None
    }
}

/// Why reading a message stream failed.
enum ReadFailure {
    /// The message exceeds `max_message_bytes`.
    TooLong,
    /// The stream or the connection failed.
    Stream(quinn::ReadError),
}

impl From<quinn::ReadError> for ReadFailure {
    fn from(error: quinn::ReadError) -> Self {
        ReadFailure::Stream(error)
    }
}

/// The inbox's byte budget: permits for the payload bytes of messages not yet handled, and
/// gauges of how much is held.
#[derive(Debug)]
struct InboxBudget {
    permits: Semaphore,
    /// Bytes held now; rises after the permits are taken and falls before they are returned,
    /// so it never exceeds the budget.
    held: AtomicU64,
    /// The highest `held` seen.
    held_max: AtomicU64,
    /// The permits it started with.
    total: u64,
}

/// The inbox bytes one received message holds, returned when it is dropped.
#[derive(Debug)]
struct InboxHold {
    budget: Arc<InboxBudget>,
    permits: u32,
}

/// Why a send on one connection did not go through.
enum SendFailure {
    /// The connection is being drained: pick another.
    Draining,
    /// A real error.
    Failed(TransportError),
}

impl Shared {
    fn spawn(&self, fut: impl Future<Output = ()> + Send + 'static) {
        self.runtime.spawn(Box::pin(fut));
    }

    fn table(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The connection to use for `to`, dialing one if none is cached.
    async fn link_to(
        self: &Arc<Self>,
        to: SocketAddr,
        expect: Option<&str>,
    ) -> Result<Arc<Link>, TransportError> {
        if let Some(link) = self.cached(to, expect) {
            return Ok(link);
        }
        let lock = self.dial_lock(to);
        let guard = lock.lock().await;
        let result = match self.cached(to, expect) {
            Some(link) => Ok(link),
            None => self.dial(to, expect).await,
        };
        drop(guard);
        self.release_dial_lock(to, &lock);
        result
    }

    /// A usable cached connection: by name when expected, else by what was last seen at `to`.
    fn cached(&self, to: SocketAddr, expect: Option<&str>) -> Option<Arc<Link>> {
        let table = self.table();
        let name = match expect {
            Some(name) => name,
            None => table.by_addr.get(&to)?.as_str(),
        };
        let link = table.by_name.get(name)?;
        let at_address = expect.is_some() || link.conn.remote_address() == to;
        (link.is_usable() && at_address).then(|| link.clone())
    }

    fn dial_lock(&self, to: SocketAddr) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self
            .dial_locks
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        locks.entry(to).or_default().clone()
    }

    fn release_dial_lock(&self, to: SocketAddr, lock: &Arc<tokio::sync::Mutex<()>>) {
        let mut locks = self
            .dial_locks
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        // Two references left (the map's and ours) means nobody else waits on it.
        if Arc::strong_count(lock) == 2 {
            locks.remove(&to);
        }
    }

    /// Dials `to`, verifies the peer's identity and registers the connection.
    async fn dial(
        self: &Arc<Self>,
        to: SocketAddr,
        expect: Option<&str>,
    ) -> Result<Arc<Link>, TransportError> {
        let (crypto, mismatch) = self.tls.client_crypto(expect)?;
        let mut client = quinn::ClientConfig::new(crypto);
        client.transport_config(self.quic.clone());
        let server_name = expect.unwrap_or(SEED_SERVER_NAME);
        let connecting = self
            .endpoint
            .connect_with(client, to, server_name)
            .map_err(|source| TransportError::Connect { addr: to, source })?;
        let conn = match connecting.await {
            Ok(conn) => conn,
            Err(source) => return Err(self.dial_failed(to, expect, &mismatch, source)),
        };
        let peer = self.identify(&conn).inspect_err(|e| {
            warn!(%to, error = %e, "refusing connection");
            conn.close(CLOSE_IDENTITY, b"identity");
        })?;
        if let Some(expected) = expect
            && peer != expected
        {
            // Defense in depth: the verifier matched *a* name; the identity is the first one.
            conn.close(CLOSE_IDENTITY, b"identity");
            return Err(TransportError::NameMismatch {
                addr: to,
                expected: expected.to_owned(),
                found: peer,
            });
        }
        if self.closing.load(Ordering::SeqCst) {
            conn.close(CLOSE_SHUTDOWN, b"shutdown");
            return Err(TransportError::Closed);
        }
        Ok(self.adopt(conn, peer, true))
    }

    /// Turns a failed handshake into an error, counting and logging refusals.
    fn dial_failed(
        &self,
        addr: SocketAddr,
        expect: Option<&str>,
        mismatch: &MismatchSlot,
        source: ConnectionError,
    ) -> TransportError {
        if is_refusal(&source) {
            self.counters
                .handshakes_refused
                .fetch_add(1, Ordering::Relaxed);
            warn!(%addr, error = %source, "handshake refused");
        }
        match (expect, mismatch.take()) {
            (Some(expected), Some(found)) => TransportError::NameMismatch {
                addr,
                expected: expected.to_owned(),
                found,
            },
            _ => TransportError::Handshake { addr, source },
        }
    }

    /// The authenticated node name of a connected peer; refuses our own name.
    fn identify(&self, conn: &quinn::Connection) -> Result<String, TransportError> {
        let addr = conn.remote_address();
        let peer =
            peer_name(conn).map_err(|source| TransportError::PeerIdentity { addr, source })?;
        if peer == self.tls.node_name() {
            return Err(TransportError::SelfConnection { addr });
        }
        Ok(peer)
    }

    /// Completes an incoming handshake and registers the connection.
    async fn accept_one(self: Arc<Self>, incoming: quinn::Incoming) {
        let addr = incoming.remote_address();
        if self.closing.load(Ordering::SeqCst) {
            incoming.refuse();
            return;
        }
        let conn = match incoming.await {
            Ok(conn) => conn,
            Err(error) => {
                if is_refusal(&error) {
                    self.counters
                        .handshakes_refused
                        .fetch_add(1, Ordering::Relaxed);
                }
                warn!(%addr, %error, "refused incoming handshake");
                return;
            }
        };
        match self.identify(&conn) {
            Ok(peer) => {
                debug!(%addr, %peer, "accepted connection");
                self.adopt(conn, peer, false);
            }
            Err(error) => {
                self.counters
                    .handshakes_refused
                    .fetch_add(1, Ordering::Relaxed);
                warn!(%addr, %error, "refused incoming connection");
                conn.close(CLOSE_IDENTITY, b"identity");
            }
        }
    }

    /// Registers a new connection, starts its reader and drains the loser of any duplicate.
    ///
    /// Returns the connection to use for sending to that peer.
    fn adopt(
        self: &Arc<Self>,
        conn: quinn::Connection,
        peer: String,
        dialed_by_us: bool,
    ) -> Arc<Link> {
        let counter = if dialed_by_us {
            &self.counters.connections_dialed
        } else {
            &self.counters.connections_accepted
        };
        counter.fetch_add(1, Ordering::Relaxed);
        let link = Arc::new(Link::new(conn, peer, dialed_by_us));
        let Decision {
            winner,
            loser,
            suspect,
        } = self.register(&link);
        self.spawn(drive(self.clone(), link.clone()));
        if let Some(loser) = loser {
            debug!(peer = %loser.peer, "draining duplicate connection");
            self.start_drain(loser);
        }
        if let Some(suspect) = suspect {
            self.spawn(probation(self.clone(), suspect, link));
        }
        if self.closing.load(Ordering::SeqCst) {
            winner.conn.close(CLOSE_SHUTDOWN, b"shutdown");
        }
        winner
    }

    /// Inserts `link` and decides which connection its peer is sent on.
    fn register(&self, link: &Arc<Link>) -> Decision {
        let mut table = self.table();
        table.links.insert(link.id(), link.clone());
        table
            .by_addr
            .insert(link.conn.remote_address(), link.peer.clone());
        let current = table
            .by_name
            .get(&link.peer)
            .filter(|l| l.is_usable())
            .cloned();
        match current {
            // `link` lost the tie and is incoming, so `old` is our own dial. The peer dialed
            // although we had a connection: either we both dialed at once, or the peer is a new
            // process and `old` leads to its dead predecessor. Send on `link` while `old` is
            // probed; never on a connection that may be dead.
            Some(old) if !self.prefers(link, &old) && !link.dialed_by_us => {
                table.by_name.insert(link.peer.clone(), link.clone());
                table.suspects.insert(link.peer.clone(), old.clone());
                Decision {
                    winner: link.clone(),
                    loser: None,
                    suspect: Some(old),
                }
            }
            // Our own dial lost to a connection the peer dialed: both dialed at once.
            Some(old) if !self.prefers(link, &old) => Decision {
                winner: old,
                loser: Some(link.clone()),
                suspect: None,
            },
            old => {
                table.by_name.insert(link.peer.clone(), link.clone());
                Decision {
                    winner: link.clone(),
                    loser: old,
                    suspect: None,
                }
            }
        }
    }

    /// After a probation `old` survived: it is alive, so the tie rule holds again. It goes back to
    /// sending unless a newer connection took over; returns the connection to drain.
    fn reinstate(&self, old: &Arc<Link>, new: &Arc<Link>) -> Option<Arc<Link>> {
        let mut table = self.table();
        let on_probation = table
            .suspects
            .get(&old.peer)
            .is_some_and(|l| l.id() == old.id());
        // Already reinstated (`Table::unlink`) or gone.
        if !on_probation {
            return None;
        }
        table.suspects.remove(&old.peer);
        if !old.is_usable() {
            return None;
        }
        match table.by_name.get(&old.peer) {
            Some(current) if current.id() != new.id() => Some(old.clone()),
            _ => {
                table.by_name.insert(old.peer.clone(), old.clone());
                Some(new.clone())
            }
        }
    }

    /// Whether `new` replaces `old` (same peer). Both nodes must reach the same answer, so the
    /// connection dialed by the node with the smaller name wins; between equals the newest does.
    fn prefers(&self, new: &Link, old: &Link) -> bool {
        let we_are_smaller = self.tls.node_name() < new.peer.as_str();
        let new_preferred = new.dialed_by_us == we_are_smaller;
        let old_preferred = old.dialed_by_us == we_are_smaller;
        new_preferred || !old_preferred
    }

    /// Removes a closed connection from the table.
    fn forget(&self, link: &Link) {
        let mut table = self.table();
        table.links.remove(&link.id());
        table.unlink(link);
    }

    /// Starts draining `link` unless it already is.
    fn start_drain(self: &Arc<Self>, link: Arc<Link>) {
        if link.draining.swap(true, Ordering::SeqCst) {
            return;
        }
        self.table().unlink(&link);
        self.spawn(drain(link));
    }

    /// Sends one message on `link`: as a datagram when asked and it fits, else on a new stream.
    async fn send_on(
        &self,
        link: &Link,
        channel: Channel,
        bytes: Bytes,
    ) -> Result<(), SendFailure> {
        if channel == Channel::Datagram
            && link.handshake_confirmed()
            && self.fits_datagram(link, bytes.len())
        {
            match link.conn.send_datagram(bytes.clone()) {
                Ok(()) => return Ok(()),
                Err(SendDatagramError::ConnectionLost(source)) => {
                    return Err(SendFailure::Failed(lost(link, source)));
                }
                // The limit changed under us or datagrams are off: a stream still works.
                Err(_) => {}
            }
        }
        let gate = link.gate.read().await;
        if *gate {
            return Err(SendFailure::Draining);
        }
        let stream = link
            .conn
            .open_uni()
            .await
            .map_err(|source| SendFailure::Failed(lost(link, source)))?;
        // Guard the stream before any await point, so a cancelled send resets it.
        let mut stream = ResetOnDrop(Some(stream));
        link.opened.fetch_add(1, Ordering::SeqCst);
        let result = write_message(&mut stream, &bytes).await;
        drop(gate);
        result.map_err(|e| SendFailure::Failed(write_error(link, e)))
    }

    fn fits_datagram(&self, link: &Link, len: usize) -> bool {
        let limit = self.config.max_datagram_bytes;
        link.conn
            .max_datagram_size()
            .is_some_and(|max| len <= max.min(limit))
    }

    /// Hands a stream message to the inbox, waiting while it is full in bytes or messages
    /// (backpressure).
    async fn deliver(&self, link: &Link, bytes: Vec<u8>) {
        let Some(held) = self.inbox_budget.clone().acquire(bytes.len()).await else {
            return;
        };
        // Reserve first so the counter is up to date by the time the message can be read.
        if let Ok(permit) = self.inbox.reserve().await {
            self.counters.received(bytes.len());
            permit.send(link.received(Channel::Stream, bytes, held));
        }
    }

    /// Hands a datagram to the inbox, dropping it when the inbox is full: datagrams are lossy.
    ///
    /// An empty datagram is a liveness probe (see [`probation`]), not a message.
    fn deliver_datagram(&self, link: &Link, bytes: Bytes) {
        if bytes.is_empty() {
            return;
        }
        let Some(held) = self.inbox_budget.clone().try_acquire(bytes.len()) else {
            self.counters
                .datagrams_dropped
                .fetch_add(1, Ordering::Relaxed);
            return;
        };
        match self.inbox.try_reserve() {
            Ok(permit) => {
                self.counters.received(bytes.len());
                permit.send(link.received(Channel::Datagram, bytes.to_vec(), held));
            }
            Err(mpsc::error::TrySendError::Full(())) => {
                self.counters
                    .datagrams_dropped
                    .fetch_add(1, Ordering::Relaxed);
            }
            Err(mpsc::error::TrySendError::Closed(())) => {}
        }
    }

    /// Reads one message: the first [`SMALL_MESSAGE_BYTES`] freely, the rest holding a
    /// large-read slot, which the caller keeps until the message is delivered.
    async fn read_body(
        &self,
        recv: &mut RecvStream,
    ) -> Result<(Vec<u8>, Option<SemaphorePermit<'_>>), ReadFailure> {
        let limit = self.config.max_message_bytes;
        let mut bytes = Vec::new();
        if read_until(recv, &mut bytes, SMALL_MESSAGE_BYTES.min(limit)).await? {
            return Ok((bytes, None));
        }
        let slot = if bytes.len() < limit {
            // The semaphore is never closed; `None` would only mean reading without a slot.
            self.large_reads.acquire().await.ok()
        } else {
            None
        };
        if read_until(recv, &mut bytes, limit).await? {
            return Ok((bytes, slot));
        }
        // Exactly `limit` bytes so far: fine if the stream ends here.
        match recv.read_chunk(1, true).await? {
            None => Ok((bytes, slot)),
            Some(_) => Err(ReadFailure::TooLong),
        }
    }
}

impl Table {
    /// Stops using `link` for new sends to its peer.
    ///
    /// If it had displaced a connection on probation, that one is used again: the peer drained
    /// the newer connection, so it keeps the older one, which is therefore alive.
    fn unlink(&mut self, link: &Link) {
        if self
            .suspects
            .get(&link.peer)
            .is_some_and(|l| l.id() == link.id())
        {
            self.suspects.remove(&link.peer);
        }
        if self
            .by_name
            .get(&link.peer)
            .is_some_and(|l| l.id() == link.id())
        {
            self.by_name.remove(&link.peer);
            if let Some(suspect) = self.suspects.remove(&link.peer)
                && suspect.is_usable()
            {
                self.by_name.insert(link.peer.clone(), suspect);
            }
        }
    }
}

impl Link {
    fn new(conn: quinn::Connection, peer: String, dialed_by_us: bool) -> Link {
        Link {
            conn,
            peer,
            dialed_by_us,
            gate: RwLock::new(false),
            opened: AtomicU64::new(0),
            completed: watch::Sender::new(0),
            draining: AtomicBool::new(false),
            own_bye_acked: watch::Sender::new(false),
            peer_bye_acked: AtomicBool::new(false),
            // The accepting side completes its handshake only after the dialer's last handshake
            // packet, when the dialer already has its keys.
            confirmed: AtomicBool::new(!dialed_by_us),
        }
    }

    /// Whether the peer has confirmed the handshake, so it can decrypt our 1-RTT packets.
    ///
    /// A dial completes one flight before the peer does: a datagram sent at once can overtake
    /// our last handshake packet on a reordering path, and the peer drops it undecryptable. A
    /// stream is retransmitted; a datagram is lost, and with it, e.g., a restarted node's join
    /// announcement (measured in simulation: a second until it is repeated). So datagrams wait
    /// for the peer's HANDSHAKE_DONE, which it sends once it has its keys.
    fn handshake_confirmed(&self) -> bool {
        if self.confirmed.load(Ordering::Relaxed) {
            return true;
        }
        let confirmed = self.conn.stats().frame_rx.handshake_done > 0;
        if confirmed {
            self.confirmed.store(true, Ordering::Relaxed);
        }
        confirmed
    }

    fn id(&self) -> usize {
        self.conn.stable_id()
    }

    fn is_open(&self) -> bool {
        self.conn.close_reason().is_none()
    }

    fn is_usable(&self) -> bool {
        self.is_open() && !self.draining.load(Ordering::SeqCst)
    }

    #[cfg_attr(not(feature = "testing"), allow(dead_code))]
    fn info(&self) -> ConnectionInfo {
        ConnectionInfo {
            peer: self.peer.clone(),
            addr: self.conn.remote_address(),
            dialed_by_us: self.dialed_by_us,
            draining: self.draining.load(Ordering::SeqCst),
        }
    }

    fn received(&self, channel: Channel, bytes: Vec<u8>, held: InboxHold) -> Received {
        Received {
            from: self.peer.clone(),
            addr: self.conn.remote_address(),
            channel,
            bytes,
            _held: Arc::new(held),
        }
    }

    /// Closes the connection once both directions are confirmed read.
    fn close_if_drained(&self) {
        if *self.own_bye_acked.borrow() && self.peer_bye_acked.load(Ordering::SeqCst) {
            self.conn.close(CLOSE_SUPERSEDED, b"drained");
        }
    }

    /// Waits until the peer confirmed reading our streams, or the connection is gone.
    async fn wait_drained(&self) {
        let mut acked = self.own_bye_acked.subscribe();
        tokio::select! {
            _ = acked.wait_for(|acked| *acked) => {}
            _ = self.conn.closed() => {}
        }
    }
}

/// Accepts incoming connections until the endpoint closes.
async fn accept_loop(shared: Arc<Shared>) {
    while let Some(incoming) = shared.endpoint.accept().await {
        // Handshakes run concurrently so a slow peer cannot hold up the others.
        shared.spawn(shared.clone().accept_one(incoming));
    }
}

/// Probes `old`, the connection we dialed to a peer that has just dialed us (`new`), and gives
/// sending back to `old` if it is alive after a few round trips.
///
/// If the peer restarted, `old` leads to its dead process: the probe reaches the new process,
/// which answers with a stateless reset (its reset key is derived from the same private key),
/// and quinn closes `old`. An empty datagram is ack-eliciting, so a lost probe or reset is
/// followed by quinn's own probes within the window. If both sides dialed at once instead,
/// `old` stays open and wins again, as the peer decided already; `new` is drained.
async fn probation(shared: Arc<Shared>, old: Arc<Link>, new: Arc<Link>) {
    let window = (old.conn.rtt() * 3 + PROBATION_SLACK).min(PROBATION_MAX);
    // Fails only if the connection is already gone or takes no datagrams; then it ends anyway
    // or is an old peer's, and the window decides.
    let _ = old.conn.send_datagram(Bytes::new());
    if tokio::time::timeout(window, old.conn.closed())
        .await
        .is_ok()
    {
        debug!(peer = %old.peer, "previous connection ended: the peer restarted");
        return;
    }
    if let Some(loser) = shared.reinstate(&old, &new) {
        debug!(peer = %loser.peer, "draining duplicate connection after probation");
        shared.start_drain(loser);
    }
}

/// Reads everything a peer sends on one connection until the connection ends.
async fn drive(shared: Arc<Shared>, link: Arc<Link>) {
    let reason = loop {
        tokio::select! {
            stream = link.conn.accept_uni() => match stream {
                Ok(recv) => shared.spawn(read_message(shared.clone(), link.clone(), recv)),
                Err(e) => break e,
            },
            control = link.conn.accept_bi() => match control {
                Ok((send, recv)) => shared.spawn(answer_bye(shared.clone(), link.clone(), send, recv)),
                Err(e) => break e,
            },
            datagram = link.conn.read_datagram() => match datagram {
                Ok(bytes) => shared.deliver_datagram(&link, bytes),
                Err(e) => break e,
            },
        }
    };
    shared.forget(&link);
    log_close(&link.peer, &reason);
}

/// Reads one message stream to its end, within the size limit, and delivers it.
async fn read_message(shared: Arc<Shared>, link: Arc<Link>, mut recv: RecvStream) {
    let limit = shared.config.max_message_bytes;
    match shared.read_body(&mut recv).await {
        Ok((bytes, slot)) => {
            shared.deliver(&link, bytes).await;
            // Until delivered, the message is held here and not yet counted in the inbox.
            drop(slot);
        }
        Err(ReadFailure::TooLong) => {
            shared
                .counters
                .oversized_dropped
                .fetch_add(1, Ordering::Relaxed);
            warn!(peer = %link.peer, limit, "dropped a message over the size limit");
            // Tell the sender to stop; the connection itself stays up.
            let _ = recv.stop(STOP_TOO_LARGE);
        }
        Err(ReadFailure::Stream(error)) => {
            debug!(peer = %link.peer, %error, "message stream failed")
        }
    }
    link.completed.send_modify(|n| *n += 1);
}

/// Appends the stream's data to `bytes` until the stream ends (`true`) or `bytes` holds `cap`
/// bytes (`false`).
async fn read_until(
    recv: &mut RecvStream,
    bytes: &mut Vec<u8>,
    cap: usize,
) -> Result<bool, quinn::ReadError> {
    while bytes.len() < cap {
        match recv.read_chunk(cap - bytes.len(), true).await? {
            Some(chunk) => bytes.extend_from_slice(&chunk.bytes),
            None => return Ok(true),
        }
    }
    Ok(false)
}

/// Our half of draining: freeze sends, announce our stream count, await the peer's answer.
async fn drain(link: Arc<Link>) {
    *link.gate.write().await = true;
    let count = link.opened.load(Ordering::SeqCst);
    match send_bye(&link.conn, count).await {
        Ok(()) => {
            link.own_bye_acked.send_replace(true);
            link.close_if_drained();
        }
        Err(error) => debug!(peer = %link.peer, %error, "drain: bye not answered"),
    }
}

/// Sends a bye carrying `count` and waits for the acknowledgement.
async fn send_bye(conn: &quinn::Connection, count: u64) -> Result<(), String> {
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    send.write_all(&count.to_be_bytes())
        .await
        .map_err(|e| e.to_string())?;
    send.finish().map_err(|e| e.to_string())?;
    let answer = recv.read_to_end(1).await.map_err(|e| e.to_string())?;
    match answer.as_slice() {
        [BYE_ACK] => Ok(()),
        other => Err(format!("unexpected bye answer {other:?}")),
    }
}

/// The peer's half of draining: stop using the connection, read what was announced, confirm.
async fn answer_bye(
    shared: Arc<Shared>,
    link: Arc<Link>,
    mut send: SendStream,
    mut recv: RecvStream,
) {
    let count = match recv
        .read_to_end(8)
        .await
        .ok()
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
    {
        Some(bytes) => u64::from_be_bytes(bytes),
        None => {
            warn!(peer = %link.peer, "malformed control stream; closing the connection");
            link.conn.close(CLOSE_PROTOCOL, b"protocol");
            return;
        }
    };
    // The peer is leaving this connection: stop sending on it too.
    shared.start_drain(link.clone());
    let mut completed = link.completed.subscribe();
    // The connection may die first; then there is nothing left to confirm.
    let all_read = tokio::select! {
        read = completed.wait_for(|n| *n >= count) => read.is_ok(),
        _ = link.conn.closed() => false,
    };
    if !all_read {
        return;
    }
    if send.write_all(&[BYE_ACK]).await.is_ok() && send.finish().is_ok() {
        link.peer_bye_acked.store(true, Ordering::SeqCst);
        link.close_if_drained();
    }
}

/// Writes a whole message and finishes the stream.
async fn write_message(stream: &mut ResetOnDrop, bytes: &[u8]) -> Result<(), WriteError> {
    let send = stream.0.as_mut().ok_or(WriteError::ClosedStream)?;
    send.write_all(bytes).await?;
    send.finish()?;
    // Finished: dropping the stream now lets quinn deliver it in the background.
    stream.0 = None;
    Ok(())
}

/// Resets a stream dropped before it was finished.
///
/// quinn *finishes* a dropped `SendStream`, which would deliver a truncated message if a send
/// were cancelled or failed mid-write; a reset makes the receiver discard it instead.
struct ResetOnDrop(Option<SendStream>);

impl Drop for ResetOnDrop {
    fn drop(&mut self) {
        if let Some(stream) = self.0.as_mut() {
            let _ = stream.reset(RESET_ABANDONED);
        }
    }
}

/// The node name in a connected peer's verified certificate.
fn peer_name(conn: &quinn::Connection) -> Result<String, TlsError> {
    let missing = || TlsError::BadInput {
        what: "peer certificate",
        reason: "none presented".to_owned(),
    };
    let identity = conn.peer_identity().ok_or_else(missing)?;
    let certs = identity
        .downcast::<Vec<CertificateDer<'static>>>()
        .map_err(|_| missing())?;
    node_name_from_cert(certs.first().ok_or_else(missing)?)
}

/// The inbox budget in semaphore permits (one per byte), checked against the message limit so
/// that any accepted message fits once the inbox has drained.
fn inbox_permits(config: &TransportConfig) -> Result<u32, TransportError> {
    let permits = u32::try_from(config.inbox_bytes)
        .ok()
        .filter(|permits| *permits < u32::MAX)
        .ok_or(TransportError::Config("inbox_bytes must be below 4 GiB"))?;
    if config.inbox_bytes < config.max_message_bytes {
        return Err(TransportError::Config(
            "inbox_bytes must be at least max_message_bytes",
        ));
    }
    Ok(permits)
}

/// quinn's transport settings derived from ours.
fn quic_config(config: &TransportConfig) -> Result<quinn::TransportConfig, TransportError> {
    if config.max_message_bytes == 0 {
        return Err(TransportError::Config("max_message_bytes must be positive"));
    }
    if config.keep_alive.is_zero() || config.keep_alive >= config.idle_timeout {
        return Err(TransportError::Config(
            "keep_alive must be positive and shorter than idle_timeout",
        ));
    }
    let idle = quinn::IdleTimeout::try_from(config.idle_timeout)
        .map_err(|_| TransportError::Config("idle_timeout too large"))?;
    let mut quic = quinn::TransportConfig::default();
    quic.max_idle_timeout(Some(idle))
        .keep_alive_interval(Some(config.keep_alive))
        .max_concurrent_uni_streams(VarInt::from_u32(MAX_UNI_STREAMS))
        .max_concurrent_bidi_streams(VarInt::from_u32(MAX_CONTROL_STREAMS));
    Ok(quic)
}

/// Whether a failed handshake is a refusal (bad certificate, rejected by the peer) rather than
/// an unreachable peer or our own close.
fn is_refusal(error: &ConnectionError) -> bool {
    !matches!(
        error,
        ConnectionError::TimedOut | ConnectionError::LocallyClosed
    )
}

fn lost(link: &Link, source: ConnectionError) -> TransportError {
    TransportError::ConnectionLost {
        peer: link.peer.clone(),
        source,
    }
}

fn write_error(link: &Link, error: WriteError) -> TransportError {
    let peer = link.peer.clone();
    match error {
        WriteError::Stopped(code) => TransportError::Refused {
            peer,
            code: code.into_inner(),
        },
        WriteError::ConnectionLost(source) => TransportError::ConnectionLost { peer, source },
        source => TransportError::Write { peer, source },
    }
}

/// Logs why a connection ended, quietly for the expected reasons.
fn log_close(peer: &str, reason: &ConnectionError) {
    match reason {
        ConnectionError::LocallyClosed => debug!(%peer, "connection closed"),
        ConnectionError::ApplicationClosed(close)
            if close.error_code == CLOSE_SUPERSEDED || close.error_code == CLOSE_SHUTDOWN =>
        {
            debug!(%peer, reason = %reason, "connection closed by peer")
        }
        _ => info!(%peer, reason = %reason, "connection ended"),
    }
}

impl InboxBudget {
    fn new(permits: u32) -> InboxBudget {
        InboxBudget {
            permits: Semaphore::new(permits as usize),
            held: AtomicU64::new(0),
            held_max: AtomicU64::new(0),
            total: u64::from(permits),
        }
    }

    /// Waits until `len` bytes fit; `None` for a length the budget can never hold.
    async fn acquire(self: Arc<Self>, len: usize) -> Option<InboxHold> {
        let permits = u32::try_from(len).ok()?;
        self.permits.acquire_many(permits).await.ok()?.forget();
        Some(self.hold(permits))
    }

    /// Takes `len` bytes if they fit now.
    fn try_acquire(self: Arc<Self>, len: usize) -> Option<InboxHold> {
        let permits = u32::try_from(len).ok()?;
        self.permits.try_acquire_many(permits).ok()?.forget();
        Some(self.hold(permits))
    }

    fn hold(self: Arc<Self>, permits: u32) -> InboxHold {
        let held = self.held.fetch_add(u64::from(permits), Ordering::SeqCst) + u64::from(permits);
        self.held_max.fetch_max(held, Ordering::SeqCst);
        InboxHold {
            budget: self,
            permits,
        }
    }
}

impl Drop for InboxHold {
    fn drop(&mut self) {
        self.budget
            .held
            .fetch_sub(u64::from(self.permits), Ordering::SeqCst);
        self.budget.permits.add_permits(self.permits as usize);
    }
}

/// The live counters behind [`TransportStats`].
#[derive(Default)]
struct Counters {
    handshakes_refused: AtomicU64,
    messages_sent: AtomicU64,
    messages_received: AtomicU64,
    bytes_sent: AtomicU64,
    bytes_received: AtomicU64,
    oversized_dropped: AtomicU64,
    datagrams_dropped: AtomicU64,
    connections_dialed: AtomicU64,
    connections_accepted: AtomicU64,
}

impl Counters {
    fn sent(&self, len: usize) {
        self.messages_sent.fetch_add(1, Ordering::Relaxed);
        self.bytes_sent.fetch_add(len as u64, Ordering::Relaxed);
    }

    fn received(&self, len: usize) {
        self.messages_received.fetch_add(1, Ordering::Relaxed);
        self.bytes_received.fetch_add(len as u64, Ordering::Relaxed);
    }

    fn snapshot(&self, inbox: &InboxBudget) -> TransportStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        TransportStats {
            handshakes_refused: get(&self.handshakes_refused),
            messages_sent: get(&self.messages_sent),
            messages_received: get(&self.messages_received),
            bytes_sent: get(&self.bytes_sent),
            bytes_received: get(&self.bytes_received),
            oversized_dropped: get(&self.oversized_dropped),
            datagrams_dropped: get(&self.datagrams_dropped),
            connections_dialed: get(&self.connections_dialed),
            connections_accepted: get(&self.connections_accepted),
            inbox_bytes: get(&inbox.held),
            inbox_bytes_max: get(&inbox.held_max),
            inbox_budget: inbox.total,
        }
    }
}
