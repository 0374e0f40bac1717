//! Five real nodes in one process on 127.0.0.1, gossiping over QUIC with mutual TLS: how soon a
//! write is visible everywhere, how many writes per second the cluster acknowledges and how many
//! it can disseminate, and what that costs on the wire. Prints markdown tables.
//!
//! `cargo bench --bench loopback` runs the full set (under 3 minutes); `-- --quick` (or
//! `LOOPBACK_QUICK=1`) a run of about 20-30 s. Other arguments: `--writes N` (spaced writes of
//! the latency phase), `--spacing-ms N` (their spacing), `--rates 500,1000` (offered writes/s of
//! the paced phases), `--load-secs S` (each closed-loop phase), `--converge-secs S` (how long a
//! phase waits for convergence), `--idle-secs S`, `--plain` (start nodes with `runtime::start`
//! instead of over a socket that counts UDP bytes; then the wire columns are empty), and protocol
//! overrides for experiments: `--announce-ms N`, `--graft-ms N`, `--eager N`.
//!
//! Phases, in order:
//! 1. baseline: one node with no peers, 1/16/64 closed-loop writers;
//! 2. a 5-node cluster (one seed, four joiners) and a warm-up, so every connection is dialed and
//!    the push tree has pruned itself; every node gets a `watch("", None)` whose task stamps each
//!    key's first event as it arrives (no polling);
//! 3. visibility latency: spaced writes from rotating writers; latency = the last other node's
//!    stamp − the writer's `put` future returning;
//! 4. idle: a quiet period on the converged cluster, bytes per node per second;
//! 5. paced load: writes offered at fixed rates spread over the nodes (open loop), the same stamps;
//! 6. closed-loop load: 1/16/64 client tasks writing back to back, task j at node j mod 5; then
//!    the time until every node's `status().version` is equal after the last ack.
//!
//! Gossip bytes are the protocol's own count (`Stats::bytes_sent`: encoded messages produced,
//! including any the runtime then drops). Wire bytes are UDP payloads counted under quinn (QUIC
//! headers, TLS records, ACKs, handshakes, keep-alives); add 28 bytes of IPv4 + UDP header per
//! packet for what an IP link carries. Runtime log events (queue-full drops, failed sends,
//! membership changes) are counted by a tracing subscriber installed by the bench.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::io::IoSliceMut;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use mantissa::crdt::{NodeId, Replica, VersionVector};
use mantissa::runtime::{
    ClusterCa, Handle, NodeConfig, TlsConfig, Transport, Watch, start, start_on,
};
use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};

const NODES: usize = 5;
const VALUE_LEN: usize = 100;
const CONCURRENCY: [usize; 3] = [1, 16, 64];
/// The latency target the bench checks.
const TARGET_P99: Duration = Duration::from_millis(10);
/// How long the bench waits for a write to show up everywhere before calling it lost.
const PATIENCE: Duration = Duration::from_secs(15);
/// IPv4 (20) + UDP (8) header bytes per packet.
const IP_UDP_HEADER: u64 = 28;
/// Message kinds listed first in the bytes table (others follow as they appear).
const KINDS: [&str; 4] = ["push", "ihave", "graft", "prune"];

type BoxError = Box<dyn std::error::Error + Send + Sync>;

static STARTED: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();

/// A progress line on stderr, stamped with the time since the bench started.
macro_rules! progress {
    ($($arg:tt)*) => {
        eprintln!(
            "[{:6.1} s] {}",
            STARTED.get_or_init(Instant::now).elapsed().as_secs_f64(),
            format!($($arg)*)
        )
    };
}

struct Options {
    quick: bool,
    plain: bool,
    writes: usize,
    spacing: Duration,
    rates: Vec<f64>,
    paced: Duration,
    load: Duration,
    baseline: Duration,
    idle: Duration,
    /// How long a load phase waits for convergence after its last write.
    converge: Duration,
    /// The protocol settings: `Config::lan()` unless overridden.
    gossip: mantissa::gossip::Config,
}

fn options() -> Options {
    let quick = std::env::var("LOOPBACK_QUICK").is_ok_and(|v| !v.is_empty() && v != "0")
        || std::env::args().any(|a| a == "--quick");
    let secs =
        |full: f64, quick_secs: f64| Duration::from_secs_f64(if quick { quick_secs } else { full });
    let mut options = Options {
        quick,
        plain: false,
        writes: if quick { 1_000 } else { 2_000 },
        spacing: Duration::from_millis(if quick { 2 } else { 3 }),
        rates: if quick {
            vec![500.0, 2_000.0]
        } else {
            vec![250.0, 500.0, 1_000.0, 2_000.0]
        },
        paced: secs(3.0, 1.0),
        load: secs(4.0, 1.0),
        baseline: secs(3.0, 0.5),
        idle: secs(10.0, 2.0),
        converge: secs(10.0, 2.0),
        gossip: mantissa::gossip::Config::lan(),
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut text = |name: &str| -> String {
            args.next()
                .unwrap_or_else(|| panic!("{name} needs a value"))
        };
        let mut number = |name: &str| -> f64 {
            text(name)
                .parse()
                .unwrap_or_else(|_| panic!("{name} needs a number"))
        };
        match arg.as_str() {
            "--plain" => options.plain = true,
            "--writes" => options.writes = number("--writes") as usize,
            "--spacing-ms" => {
                options.spacing = Duration::from_secs_f64(number("--spacing-ms") / 1e3);
            }
            "--rates" => {
                options.rates = text("--rates")
                    .split(',')
                    .filter(|r| !r.trim().is_empty())
                    .map(|r| r.trim().parse().expect("--rates: numbers"))
                    .collect();
            }
            "--paced-secs" => options.paced = Duration::from_secs_f64(number("--paced-secs")),
            "--load-secs" => options.load = Duration::from_secs_f64(number("--load-secs")),
            "--converge-secs" => {
                options.converge = Duration::from_secs_f64(number("--converge-secs"));
            }
            "--announce-ms" => {
                options.gossip.announce_delay =
                    Duration::from_secs_f64(number("--announce-ms") / 1e3);
            }
            "--graft-ms" => {
                options.gossip.graft_timeout = Duration::from_secs_f64(number("--graft-ms") / 1e3);
            }
            "--eager" => options.gossip.eager_peers = number("--eager") as usize,
            "--idle-secs" => options.idle = Duration::from_secs_f64(number("--idle-secs")),
            // `--quick` was read above; `cargo bench` passes `--bench`; ignore anything else.
            _ => {}
        }
    }
    options
}

fn main() -> Result<(), BoxError> {
    STARTED.get_or_init(Instant::now);
    let options = options();
    tracing::subscriber::set_global_default(LogCounter)?;
    let threads = std::thread::available_parallelism().map_or(1, usize::from);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()?;
    runtime.block_on(run(options, threads))
}

// ---------------------------------------------------------------------------------------------
// Counting UDP bytes under quinn

/// UDP payload bytes and packets one endpoint sent.
#[derive(Debug, Default)]
struct Wire {
    bytes: AtomicU64,
    packets: AtomicU64,
}

/// The tokio UDP socket quinn would use, counting what it sends.
#[derive(Debug)]
struct CountingSocket {
    inner: Arc<dyn AsyncUdpSocket>,
    wire: Arc<Wire>,
}

impl AsyncUdpSocket for CountingSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        self.inner.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &Transmit) -> std::io::Result<()> {
        self.inner.try_send(transmit)?;
        let len = transmit.contents.len();
        let packets = transmit
            .segment_size
            .map_or(1, |size| len.div_ceil(size.max(1)));
        self.wire.bytes.fetch_add(len as u64, Ordering::Relaxed);
        self.wire
            .packets
            .fetch_add(packets as u64, Ordering::Relaxed);
        Ok(())
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<std::io::Result<usize>> {
        self.inner.poll_recv(cx, bufs, meta)
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.inner.max_transmit_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}

// ---------------------------------------------------------------------------------------------
// Counting the runtime's log events (drops, failed sends) without printing them

/// How often each `mantissa` log message (debug and above) was emitted, by "LEVEL message".
static LOG_EVENTS: Mutex<BTreeMap<String, u64>> = Mutex::new(BTreeMap::new());

fn log_events() -> BTreeMap<String, u64> {
    LOG_EVENTS
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone()
}

struct LogCounter;

struct MessageField(String);

impl tracing::field::Visit for MessageField {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.0 = format!("{value:?}");
        }
    }
}

impl tracing::Subscriber for LogCounter {
    fn enabled(&self, metadata: &tracing::Metadata<'_>) -> bool {
        metadata.target().starts_with("mantissa") && *metadata.level() <= tracing::Level::DEBUG
    }

    fn max_level_hint(&self) -> Option<tracing::level_filters::LevelFilter> {
        Some(tracing::level_filters::LevelFilter::DEBUG)
    }

    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }

    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}

    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}

    fn event(&self, event: &tracing::Event<'_>) {
        let mut message = MessageField(String::new());
        event.record(&mut message);
        let key = format!("{} {}", event.metadata().level(), message.0);
        *LOG_EVENTS
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(key)
            .or_default() += 1;
    }

    fn enter(&self, _: &tracing::span::Id) {}

    fn exit(&self, _: &tracing::span::Id) {}
}

/// The log events counted between two snapshots, as `message ×n` items.
fn log_delta(after: &BTreeMap<String, u64>, before: &BTreeMap<String, u64>) -> String {
    let items: Vec<String> = after
        .iter()
        .filter_map(|(message, n)| {
            let n = n - before.get(message).unwrap_or(&0);
            (n > 0).then(|| format!("{message} ×{n}"))
        })
        .collect();
    if items.is_empty() {
        "none".into()
    } else {
        items.join("; ")
    }
}

// ---------------------------------------------------------------------------------------------
// Nodes

fn any_port() -> SocketAddr {
    "127.0.0.1:0".parse().expect("valid address")
}

fn tls(ca: &ClusterCa, name: &str) -> Result<TlsConfig, BoxError> {
    let node = ca.issue(name, Duration::from_secs(3600))?;
    Ok(TlsConfig::new(ca.cert_pem(), &node)?)
}

/// Starts a node. With `wire`, exactly what `runtime::start` does (same socket, runtime, QUIC and
/// TLS settings) except that the socket counts the UDP bytes it sends.
async fn start_node(
    ca: &ClusterCa,
    name: &str,
    seeds: Vec<SocketAddr>,
    wire: Option<Arc<Wire>>,
    index: u64,
    gossip: &mantissa::gossip::Config,
) -> Result<Handle, BoxError> {
    let mut config = NodeConfig::new(any_port(), tls(ca, name)?, seeds);
    config.gossip = gossip.clone();
    let Some(wire) = wire else {
        return Ok(start(config).await?);
    };
    let socket = std::net::UdpSocket::bind(config.bind)?;
    let runtime: Arc<dyn quinn::Runtime> = Arc::new(quinn::TokioRuntime);
    let inner = runtime.wrap_udp_socket(socket)?;
    let socket = Arc::new(CountingSocket { inner, wire });
    let (transport, inbox) = Transport::bind_with_socket(
        socket,
        runtime,
        config.tls.clone(),
        config.transport.clone(),
        quinn::EndpointConfig::default(),
    )?;
    // Like the runtime's own incarnation ids: milliseconds in the high bits.
    let millis = SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis() as u64;
    let replica = Replica::new(NodeId((millis << 20) | (index + 1)));
    Ok(start_on(config, transport, inbox, replica)?)
}

async fn wait_members(nodes: &[Handle], count: usize) -> Result<Duration, BoxError> {
    let started = Instant::now();
    for node in nodes {
        loop {
            if node.members().await?.len() >= count {
                break;
            }
            if started.elapsed() > PATIENCE {
                return Err(format!("{} never saw {count} members", node.name()).into());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    Ok(started.elapsed())
}

// ---------------------------------------------------------------------------------------------
// Watch-based visibility stamps

/// When each key's first change event reached one node's watcher.
#[derive(Default)]
struct Seen {
    at: Mutex<HashMap<Box<[u8]>, Instant>>,
    /// Times the watcher was cut off for falling behind (it resumes from its last cursor, so the
    /// events it catches up on carry late stamps).
    lagged: AtomicU64,
}

impl Seen {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<Box<[u8]>, Instant>> {
        self.at.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Stamps every event of `watch` into `seen`. A watcher cut off for falling behind resumes from
/// the current cursor, not its last one: the events it missed would carry late stamps (and a
/// backlog larger than the watch queue would cut it off again at once), so those keys stay
/// unstamped at this node and count as incomplete.
async fn record(node: Handle, mut watch: Watch, seen: Arc<Seen>) {
    loop {
        while let Some(event) = watch.next().await {
            match event {
                Ok(event) => {
                    let now = Instant::now();
                    seen.map().entry(event.key.as_bytes().into()).or_insert(now);
                }
                Err(_) => {
                    seen.lagged.fetch_add(1, Ordering::Relaxed);
                    break;
                }
            }
        }
        match node.watch("", None).await {
            Ok(next) => watch = next,
            Err(_) => return,
        }
    }
}

/// A write the bench made: where, and when its `put` returned.
struct Written {
    key: String,
    writer: usize,
    sent: Instant,
    acked: Instant,
}

/// Waits until every write is stamped at every node (or the patience runs out); returns how many
/// (write, node) pairs are still missing.
async fn wait_seen(writes: &[Written], seen: &[Arc<Seen>], patience: Duration) -> usize {
    let deadline = Instant::now() + patience;
    loop {
        let missing: usize = seen
            .iter()
            .map(|s| {
                let map = s.map();
                writes
                    .iter()
                    .filter(|w| !map.contains_key(w.key.as_bytes()))
                    .count()
            })
            .sum();
        if missing == 0 || Instant::now() > deadline {
            return missing;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Visibility per write: at the first peer, at every peer, and the last peer's index.
struct Visibility {
    first: Vec<Duration>,
    all: Vec<Duration>,
    /// [writer][receiver] → latencies.
    pairs: Vec<Vec<Vec<Duration>>>,
    /// The writes slower than the target: (writer, last receiver, latency).
    slow: Vec<(usize, usize, Duration)>,
    missing: usize,
    /// The last stamp of any write at any node.
    last_stamp: Option<Instant>,
}

fn visibility(writes: &[Written], seen: &[Arc<Seen>]) -> Visibility {
    let maps: Vec<_> = seen.iter().map(|s| s.map()).collect();
    let mut result = Visibility {
        first: Vec::new(),
        all: Vec::new(),
        pairs: vec![vec![Vec::new(); NODES]; NODES],
        slow: Vec::new(),
        missing: 0,
        last_stamp: None,
    };
    for write in writes {
        let mut first = None::<Duration>;
        let mut last = None::<(usize, Duration)>;
        let mut complete = true;
        for (node, map) in maps.iter().enumerate() {
            let Some(&at) = map.get(write.key.as_bytes()) else {
                complete = false;
                continue;
            };
            result.last_stamp = Some(result.last_stamp.map_or(at, |l| l.max(at)));
            if node == write.writer {
                continue;
            }
            let latency = at.saturating_duration_since(write.acked);
            result.pairs[write.writer][node].push(latency);
            first = Some(first.map_or(latency, |f| f.min(latency)));
            if last.is_none_or(|(_, l)| latency > l) {
                last = Some((node, latency));
            }
        }
        if !complete {
            result.missing += 1;
            continue;
        }
        if let (Some(first), Some((node, all))) = (first, last) {
            result.first.push(first);
            result.all.push(all);
            if all > TARGET_P99 {
                result.slow.push((write.writer, node, all));
            }
        }
    }
    result
}

// ---------------------------------------------------------------------------------------------
// Counters

/// Cluster-wide counters at one moment.
#[derive(Clone, Default)]
struct Counters {
    gossip_bytes: u64,
    gossip_messages: u64,
    by_kind: BTreeMap<&'static str, u64>,
    grafts: u64,
    duplicates: u64,
    writes_received: u64,
    anti_entropy_repairs: u64,
    wire_bytes: u64,
    wire_packets: u64,
    cpu: Duration,
}

async fn counters(nodes: &[Handle], wires: &[Arc<Wire>]) -> Result<Counters, BoxError> {
    let mut total = Counters {
        cpu: cpu_time(),
        ..Counters::default()
    };
    for node in nodes {
        let stats = node.status().await?.stats;
        total.gossip_bytes += stats.bytes_sent;
        total.gossip_messages += stats.messages_sent;
        for (kind, bytes) in stats.bytes_sent_by_kind {
            *total.by_kind.entry(kind).or_default() += bytes;
        }
        total.grafts += stats.grafts;
        total.duplicates += stats.duplicate_writes;
        total.writes_received += stats.writes_received;
        total.anti_entropy_repairs += stats.anti_entropy_repairs;
    }
    for wire in wires {
        total.wire_bytes += wire.bytes.load(Ordering::Relaxed);
        total.wire_packets += wire.packets.load(Ordering::Relaxed);
    }
    Ok(total)
}

impl Counters {
    fn since(&self, before: &Counters) -> Counters {
        Counters {
            gossip_bytes: self.gossip_bytes - before.gossip_bytes,
            gossip_messages: self.gossip_messages - before.gossip_messages,
            by_kind: self
                .by_kind
                .iter()
                .map(|(kind, bytes)| (*kind, bytes - before.by_kind.get(kind).unwrap_or(&0)))
                .collect(),
            grafts: self.grafts - before.grafts,
            duplicates: self.duplicates - before.duplicates,
            writes_received: self.writes_received - before.writes_received,
            anti_entropy_repairs: self.anti_entropy_repairs - before.anti_entropy_repairs,
            wire_bytes: self.wire_bytes - before.wire_bytes,
            wire_packets: self.wire_packets - before.wire_packets,
            cpu: self.cpu.saturating_sub(before.cpu),
        }
    }

    fn kind(&self, kind: &str) -> u64 {
        self.by_kind.get(kind).copied().unwrap_or(0)
    }
}

/// CPU time (user + system) of this process so far, from `/proc/self/stat` (ticks of 1/100 s).
fn cpu_time() -> Duration {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return Duration::ZERO;
    };
    // Fields after the command name (which may hold spaces) start at field 3; utime is 14.
    let Some(rest) = stat.rsplit_once(')').map(|(_, rest)| rest) else {
        return Duration::ZERO;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    Duration::from_millis((ticks(11) + ticks(12)) * 10)
}

// ---------------------------------------------------------------------------------------------
// Writing

fn value(seed: usize) -> Vec<u8> {
    let mut state = (seed as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..VALUE_LEN)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

/// A 30-byte key: `bench/<tag>/w<writer>/k<n>` with the number padded to fit.
fn key(tag: &str, writer: usize, n: usize) -> String {
    let prefix = format!("bench/{tag}/w{writer:02}/k");
    let width = 30usize.saturating_sub(prefix.len()).max(1);
    format!("{prefix}{n:0width$}")
}

/// Writes issued one at a time, `spacing` apart, from rotating writers.
async fn spaced_writes(
    nodes: &[Handle],
    tag: &str,
    count: usize,
    spacing: Duration,
) -> Result<(Vec<Written>, Duration), BoxError> {
    let mut writes = Vec::with_capacity(count);
    let started = Instant::now();
    let start = tokio::time::Instant::now();
    for i in 0..count {
        tokio::time::sleep_until(start + spacing * i as u32).await;
        let writer = i % nodes.len();
        let key = key(tag, writer, i);
        let sent = Instant::now();
        nodes[writer].put(&key, value(i)).await?;
        writes.push(Written {
            key,
            writer,
            sent,
            acked: Instant::now(),
        });
    }
    Ok((writes, started.elapsed()))
}

/// Writes offered at `rate` per second for `duration`, write k at node k mod 5 at its scheduled
/// time (a node's writes queue behind each other if a put is slower than its interval).
async fn paced_writes(
    nodes: &[Handle],
    tag: &str,
    rate: f64,
    duration: Duration,
) -> Result<(Vec<Written>, Duration), BoxError> {
    let total = (rate * duration.as_secs_f64()).round() as usize;
    let started = Instant::now();
    let start = tokio::time::Instant::now();
    let mut tasks = Vec::new();
    for (writer, node) in nodes.iter().enumerate() {
        let node = node.clone();
        let tag = tag.to_owned();
        let count = nodes.len();
        tasks.push(tokio::spawn(async move {
            let mut writes = Vec::new();
            for k in (writer..total).step_by(count) {
                tokio::time::sleep_until(start + Duration::from_secs_f64(k as f64 / rate)).await;
                let key = key(&tag, writer, k);
                let sent = Instant::now();
                node.put(&key, value(k)).await?;
                writes.push(Written {
                    key,
                    writer,
                    sent,
                    acked: Instant::now(),
                });
            }
            Ok::<_, BoxError>(writes)
        }));
    }
    let mut writes = Vec::new();
    for task in tasks {
        writes.extend(task.await??);
    }
    let last = writes.iter().map(|w| w.acked).max().unwrap_or(started);
    Ok((writes, last.duration_since(started)))
}

/// `concurrency` tasks writing back to back for `duration`, task `j` at node `j % nodes`.
async fn closed_loop(
    nodes: &[Handle],
    tag: &str,
    concurrency: usize,
    duration: Duration,
) -> Result<(Vec<Written>, Duration), BoxError> {
    let started = Instant::now();
    let deadline = started + duration;
    let mut tasks = Vec::new();
    for task in 0..concurrency {
        let writer = task % nodes.len();
        let node = nodes[writer].clone();
        let tag = tag.to_owned();
        tasks.push(tokio::spawn(async move {
            let mut writes = Vec::new();
            let mut n = task << 24;
            while Instant::now() < deadline {
                let key = key(&tag, writer, n);
                let sent = Instant::now();
                node.put(&key, value(n)).await?;
                writes.push(Written {
                    key,
                    writer,
                    sent,
                    acked: Instant::now(),
                });
                n += 1;
            }
            Ok::<_, BoxError>(writes)
        }));
    }
    let mut writes = Vec::new();
    for task in tasks {
        writes.extend(task.await??);
    }
    let last = writes.iter().map(|w| w.acked).max().unwrap_or(started);
    Ok((writes, last.duration_since(started)))
}

/// Time from `since` until every node's version vector is equal; `None` if that takes longer
/// than `patience`.
async fn converge(
    nodes: &[Handle],
    since: Instant,
    patience: Duration,
) -> Result<Option<Duration>, BoxError> {
    loop {
        let mut versions = Vec::with_capacity(nodes.len());
        for node in nodes {
            versions.push(node.status().await?.version);
        }
        if versions.windows(2).all(|pair| pair[0] == pair[1]) {
            return Ok(Some(since.elapsed()));
        }
        if since.elapsed() > patience {
            return Ok(None);
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Waits (up to `patience`) for the cluster to converge, saying so when it does not.
async fn settle(nodes: &[Handle], patience: Duration) -> Result<(), BoxError> {
    let started = Instant::now();
    if converge(nodes, started, patience).await?.is_none() {
        let (lacking, held) = backlog(nodes).await?;
        progress!(
            "warning: not converged after {:.0} s more ({lacking} writes lacking, {held} held back); going on",
            patience.as_secs_f64()
        );
    }
    Ok(())
}

/// Writes the nodes lack compared with the union of all of them, summed over the nodes, and the
/// writes they hold back waiting for causes.
async fn backlog(nodes: &[Handle]) -> Result<(u64, usize), BoxError> {
    let mut statuses = Vec::with_capacity(nodes.len());
    for node in nodes {
        statuses.push(node.status().await?);
    }
    let mut union = VersionVector::new();
    for status in &statuses {
        union.join(&status.version);
    }
    let lacking = statuses
        .iter()
        .map(|status| {
            union
                .iter()
                .map(|(node, seq)| seq.saturating_sub(status.version.get(node)))
                .sum::<u64>()
        })
        .sum();
    let held = statuses.iter().map(|status| status.held_back).sum();
    Ok((lacking, held))
}

// ---------------------------------------------------------------------------------------------
// Phases

struct Cluster {
    nodes: Vec<Handle>,
    seen: Vec<Arc<Seen>>,
    wires: Vec<Arc<Wire>>,
}

/// What one phase of writes measured.
struct Phase {
    label: String,
    writes: usize,
    /// First write issued → last put returned.
    wall: Duration,
    put: Vec<Duration>,
    visibility: Visibility,
    /// (writes lacking summed over nodes, writes held back) when the last put returned.
    backlog_at_end: (u64, usize),
    /// Last put returned → every version vector equal; `None`: not within the patience.
    converge: Option<Duration>,
    /// Writes still lacking when the patience ran out.
    backlog_after: u64,
    /// Last put returned → last change event stamped anywhere.
    watch_tail: Option<Duration>,
    counters: Counters,
    /// Process CPU time from the first write to the last ack.
    cpu: Duration,
    lagged: u64,
    logs: String,
}

impl Phase {
    fn acked_rate(&self) -> f64 {
        self.writes as f64 / self.wall.as_secs_f64().max(1e-9)
    }

    /// Writes per second from the first write until every node had every write.
    fn converged_rate(&self) -> Option<f64> {
        self.converge
            .map(|c| self.writes as f64 / (self.wall + c).as_secs_f64().max(1e-9))
    }
}

/// Runs `writing` (not yet started) and measures it.
async fn measure(
    cluster: &Cluster,
    label: String,
    patience: Duration,
    writing: impl Future<Output = Result<(Vec<Written>, Duration), BoxError>>,
) -> Result<Phase, BoxError> {
    let lagged_before: u64 = cluster
        .seen
        .iter()
        .map(|s| s.lagged.load(Ordering::Relaxed))
        .sum();
    let logs_before = log_events();
    let before = counters(&cluster.nodes, &cluster.wires).await?;
    let started = Instant::now();
    let (writes, wall) = writing.await?;
    let last_ack = started + wall;
    let cpu = cpu_time().saturating_sub(before.cpu);
    let backlog_at_end = backlog(&cluster.nodes).await?;
    let mut converged = converge(&cluster.nodes, last_ack, patience).await?;
    let mut backlog_after = 0;
    if converged.is_none() {
        backlog_after = backlog(&cluster.nodes).await?.0;
        // It may have converged between the last check and the backlog.
        converged = converge(&cluster.nodes, last_ack, Duration::ZERO).await?;
    }
    // Once converged, every node has applied every write and served its watchers; stamps still
    // missing then belong to a watcher that lagged and will not come.
    let stamp_patience = if converged.is_some() {
        Duration::from_secs(2)
    } else {
        Duration::from_secs(1)
    };
    wait_seen(&writes, &cluster.seen, stamp_patience).await;
    let counters = counters(&cluster.nodes, &cluster.wires)
        .await?
        .since(&before);
    let visibility = visibility(&writes, &cluster.seen);
    let watch_tail = visibility
        .last_stamp
        .map(|at| at.saturating_duration_since(last_ack));
    let lagged = cluster
        .seen
        .iter()
        .map(|s| s.lagged.load(Ordering::Relaxed))
        .sum::<u64>()
        - lagged_before;
    let phase = Phase {
        label,
        writes: writes.len(),
        wall,
        put: writes.iter().map(|w| w.acked - w.sent).collect(),
        visibility,
        backlog_at_end,
        converge: converged,
        backlog_after,
        watch_tail,
        counters,
        cpu,
        lagged,
        logs: log_delta(&log_events(), &logs_before),
    };
    progress!(
        "{}: {} writes in {:.2} s; at the last ack the nodes lacked {} writes ({} held back); {}",
        phase.label,
        phase.writes,
        wall.as_secs_f64(),
        backlog_at_end.0,
        backlog_at_end.1,
        converged.map_or_else(
            || format!(
                "not converged within {:.0} s (still lacking {backlog_after})",
                patience.as_secs_f64()
            ),
            |d| format!("converged {} ms after it", ms(d))
        ),
    );
    Ok(phase)
}

// ---------------------------------------------------------------------------------------------
// Reporting

fn ms(d: Duration) -> String {
    let ms = d.as_secs_f64() * 1e3;
    if ms < 10.0 {
        format!("{ms:.2}")
    } else if ms < 100.0 {
        format!("{ms:.1}")
    } else {
        format!("{ms:.0}")
    }
}

/// p50, p90, p99, max and mean of `values` (sorted in place).
fn summary(values: &mut [Duration]) -> Option<[Duration; 5]> {
    if values.is_empty() {
        return None;
    }
    values.sort_unstable();
    let at = |q: f64| values[((values.len() - 1) as f64 * q).round() as usize];
    let mean = values.iter().sum::<Duration>() / values.len() as u32;
    Some([at(0.5), at(0.9), at(0.99), values[values.len() - 1], mean])
}

fn row(label: &str, values: &mut [Duration], missing: usize) -> String {
    match summary(values) {
        Some([p50, p90, p99, max, mean]) => format!(
            "| {label} | {} | {} | {} | {} | {} | {} | {} |",
            values.len(),
            ms(p50),
            ms(p90),
            ms(p99),
            ms(max),
            ms(mean),
            missing
        ),
        None => format!("| {label} | 0 | – | – | – | – | – | {missing} |"),
    }
}

fn per(amount: u64, count: usize) -> String {
    if count == 0 {
        return "–".into();
    }
    format!("{:.0}", amount as f64 / count as f64)
}

fn per_f(amount: u64, count: usize) -> String {
    if count == 0 {
        return "–".into();
    }
    format!("{:.2}", amount as f64 / count as f64)
}

fn cpu_percent(cpu: Duration, wall: Duration) -> String {
    format!(
        "{:.0}",
        100.0 * cpu.as_secs_f64() / wall.as_secs_f64().max(1e-9)
    )
}

fn machine(threads: usize) -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|r| r.trim_start_matches([' ', '\t', ':']))
        })
        .unwrap_or("unknown")
        .to_owned();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into());
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or("unknown".into(), |kib| {
            format!("{:.1} GiB", kib as f64 / 1_048_576.0)
        });
    let load = std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into());
    format!(
        "- nproc: {threads} (tokio worker threads: {threads}; all 5 nodes, their QUIC endpoints and the clients share them)\n- CPU: {model}\n- memory: {memory}\n- kernel: Linux {kernel}; load average at start: {load}\n"
    )
}

/// The message kinds in the order the bytes table lists them.
fn kinds(phases: &[&Counters]) -> Vec<&'static str> {
    let mut kinds: Vec<&'static str> = KINDS.to_vec();
    for counters in phases {
        for kind in counters.by_kind.keys() {
            if !kinds.contains(kind) {
                kinds.push(kind);
            }
        }
    }
    kinds
}

// ---------------------------------------------------------------------------------------------
// The run

async fn run(options: Options, threads: usize) -> Result<(), BoxError> {
    let bench_start = Instant::now();
    let gossip = options.gossip.clone();
    let mut out = String::new();
    writeln!(
        out,
        "## loopback: 5 nodes in one process, QUIC + mTLS on 127.0.0.1 ({} mode)\n",
        if options.quick { "quick" } else { "full" }
    )?;
    out.push_str(&machine(threads));
    writeln!(
        out,
        "- gossip config: {}: eager_peers {}, lazy_peers {}, announce_delay {} ms, graft_timeout {} ms, anti_entropy_interval {} ms",
        if gossip == mantissa::gossip::Config::lan() {
            "`Config::lan()`"
        } else {
            "**`Config::lan()` overridden on the command line**"
        },
        gossip.eager_peers,
        gossip.lazy_peers,
        ms(gossip.announce_delay),
        ms(gossip.graft_timeout),
        ms(gossip.anti_entropy_interval)
    )?;
    writeln!(
        out,
        "- wire counting: {}\n",
        if options.plain {
            "off (`--plain`: nodes started with `runtime::start`)"
        } else {
            "UDP payloads counted under quinn (nodes started with `start_on` over a counting socket, otherwise as `start` does)"
        }
    )?;
    print!("{out}");

    let ca = ClusterCa::generate("loopback")?;

    // ---- 1. baseline: one node, no peers ----
    let mut baseline = BTreeMap::new();
    {
        let solo = start_node(
            &ca,
            "solo",
            vec![],
            Some(Arc::new(Wire::default())),
            99,
            &gossip,
        )
        .await?;
        let seen = Arc::new(Seen::default());
        let watch = solo.watch("", None).await?;
        let recorder = tokio::spawn(record(solo.clone(), watch, seen.clone()));
        for &c in &CONCURRENCY {
            let before = cpu_time();
            let (writes, wall) = closed_loop(
                std::slice::from_ref(&solo),
                &format!("s{c}"),
                c,
                options.baseline,
            )
            .await?;
            let cpu = cpu_time().saturating_sub(before);
            let mut put: Vec<Duration> = writes.iter().map(|w| w.acked - w.sent).collect();
            let put = summary(&mut put);
            progress!(
                "baseline, {c} writers: {} writes in {:.2} s",
                writes.len(),
                wall.as_secs_f64()
            );
            baseline.insert(
                c,
                (writes.len() as f64 / wall.as_secs_f64(), put, cpu, wall),
            );
        }
        let _ = tokio::time::timeout(Duration::from_secs(2), solo.shutdown()).await;
        recorder.abort();
        progress!("baseline node shut down");
    }

    // ---- 2. the cluster ----
    let wires: Vec<Arc<Wire>> = (0..NODES).map(|_| Arc::new(Wire::default())).collect();
    let wire_of = |i: usize| (!options.plain).then(|| wires[i].clone());
    let first = start_node(&ca, "node-0", vec![], wire_of(0), 0, &gossip).await?;
    let seeds = vec![first.addr()];
    let mut nodes = vec![first];
    for i in 1..NODES {
        nodes.push(
            start_node(
                &ca,
                &format!("node-{i}"),
                seeds.clone(),
                wire_of(i),
                i as u64,
                &gossip,
            )
            .await?,
        );
    }
    let joined = wait_members(&nodes, NODES - 1).await?;
    progress!("cluster formed in {} ms", ms(joined));
    let mut seen = Vec::new();
    let mut recorders = Vec::new();
    for node in &nodes {
        let s = Arc::new(Seen::default());
        let watch = node.watch("", None).await?;
        recorders.push(tokio::spawn(record(node.clone(), watch, s.clone())));
        seen.push(s);
    }
    let cluster = Cluster { nodes, seen, wires };
    // Warm-up: dial every connection, let the push tree prune itself.
    let (warm, _) = spaced_writes(&cluster.nodes, "wu", 200, Duration::from_millis(5)).await?;
    wait_seen(&warm, &cluster.seen, PATIENCE).await;
    settle(&cluster.nodes, PATIENCE).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    progress!("warm-up done");

    // ---- 3. visibility latency, spaced writes ----
    let mut spaced = measure(
        &cluster,
        format!("spaced, 1 per {} ms", ms(options.spacing)),
        PATIENCE,
        spaced_writes(&cluster.nodes, "lat", options.writes, options.spacing),
    )
    .await?;
    settle(&cluster.nodes, PATIENCE).await?;

    // ---- 4. idle ----
    tokio::time::sleep(Duration::from_secs(1)).await;
    let logs_before = log_events();
    let before = counters(&cluster.nodes, &cluster.wires).await?;
    let idle_start = Instant::now();
    tokio::time::sleep(options.idle).await;
    let idle_wall = idle_start.elapsed();
    let idle = counters(&cluster.nodes, &cluster.wires)
        .await?
        .since(&before);
    let idle_logs = log_delta(&log_events(), &logs_before);
    progress!("idle: {:.0} s measured", idle_wall.as_secs_f64());

    // ---- 5. paced load ----
    let mut phases = Vec::new();
    for &rate in &options.rates {
        let phase = measure(
            &cluster,
            format!("paced {rate:.0}/s"),
            options.converge,
            paced_writes(&cluster.nodes, &format!("p{rate:.0}"), rate, options.paced),
        )
        .await?;
        if phase.converge.is_none() {
            settle(&cluster.nodes, options.converge).await?;
        }
        phases.push(phase);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    // ---- 6. closed-loop load ----
    let mut closed = Vec::new();
    for &c in &CONCURRENCY {
        let phase = measure(
            &cluster,
            format!("{c} writers"),
            options.converge,
            closed_loop(&cluster.nodes, &format!("c{c}"), c, options.load),
        )
        .await?;
        let last = c == CONCURRENCY[CONCURRENCY.len() - 1];
        if phase.converge.is_none() && !last {
            settle(&cluster.nodes, options.converge).await?;
        }
        closed.push((c, phase));
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    // Shut the nodes down together, bounded: a node still repairing a backlog may wait for its
    // peers' drain confirmations, which is not what this bench measures.
    let shutdowns: Vec<_> = cluster
        .nodes
        .iter()
        .map(|node| {
            let node = node.clone();
            tokio::spawn(async move { node.shutdown().await })
        })
        .collect();
    for shutdown in shutdowns {
        let _ = tokio::time::timeout(Duration::from_secs(2), shutdown).await;
    }
    for recorder in recorders {
        recorder.abort();
    }
    progress!("cluster shut down");

    // ---- report ----
    let mut out = String::new();
    let spaced_missing = spaced.visibility.missing;
    let p99_spaced = summary(&mut spaced.visibility.all).map(|s| s[2]);

    writeln!(
        out,
        "### Visibility latency: `put` returns at the writer → change event at the other 4 nodes (ms)\n"
    )?;
    writeln!(
        out,
        "{} spaced writes, one every {} ms from rotating writers, {VALUE_LEN}-byte values under 30-byte keys; every node watches `\"\"` and stamps each key's first event on arrival. Rows below the first three: the same stamps under paced (open-loop) and closed-loop load.\n",
        spaced.writes,
        ms(options.spacing)
    )?;
    writeln!(
        out,
        "| what | writes | p50 | p90 | p99 | max | mean | incomplete |"
    )?;
    writeln!(
        out,
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    )?;
    writeln!(
        out,
        "{}",
        row(
            "visible at all 4 peers (spaced)",
            &mut spaced.visibility.all,
            spaced_missing
        )
    )?;
    writeln!(
        out,
        "{}",
        row(
            "visible at first peer (spaced)",
            &mut spaced.visibility.first,
            spaced_missing
        )
    )?;
    writeln!(
        out,
        "{}",
        row("put call → future returns (spaced)", &mut spaced.put, 0)
    )?;
    for phase in phases.iter_mut().chain(closed.iter_mut().map(|(_, p)| p)) {
        let label = format!("visible at all peers, {}", phase.label);
        let missing = phase.visibility.missing;
        writeln!(out, "{}", row(&label, &mut phase.visibility.all, missing))?;
    }
    let over = |v: &[Duration], limit: Duration| v.iter().filter(|d| **d > limit).count();
    let slow_path = (gossip.announce_delay + gossip.graft_timeout)
        .saturating_sub(Duration::from_millis(10))
        .max(TARGET_P99);
    let spaced_all = &spaced.visibility.all;
    writeln!(
        out,
        "\nSpaced writes slower than 10 ms: {} of {} ({:.2}%); slower than announce_delay + graft_timeout − 10 ms = {} ms (writes that went the IHave → graft path, or waited in the hold-back buffer behind one that did): {}.",
        over(spaced_all, TARGET_P99),
        spaced_all.len(),
        100.0 * over(spaced_all, TARGET_P99) as f64 / spaced_all.len().max(1) as f64,
        ms(slow_path),
        over(spaced_all, slow_path),
    )?;
    let bounds_ms = [1u64, 10, 50, 150, 250, 1_000];
    let mut header = String::from("| visible at all peers |");
    let mut last = 0;
    for b in bounds_ms {
        write!(header, " {last}–{b} ms |")?;
        last = b;
    }
    write!(header, " > {last} ms | writes > 10 ms by last receiver |")?;
    writeln!(
        out,
        "\nHow the latencies spread (share of complete writes per band):\n\n{header}\n| --- |{}",
        " ---: |".repeat(bounds_ms.len() + 1) + " --- |"
    )?;
    for phase in std::iter::once(&spaced)
        .chain(phases.iter())
        .chain(closed.iter().map(|(_, p)| p))
    {
        let all = &phase.visibility.all;
        let mut line = format!("| {} |", phase.label);
        let mut low = Duration::ZERO;
        for b in bounds_ms
            .iter()
            .map(|b| Duration::from_millis(*b))
            .chain([Duration::MAX])
        {
            let n = all.iter().filter(|d| **d >= low && **d < b).count();
            write!(
                line,
                " {:.1}% |",
                100.0 * n as f64 / all.len().max(1) as f64
            )?;
            low = b;
        }
        let mut receivers = [0usize; NODES];
        for (_, receiver, _) in &phase.visibility.slow {
            receivers[*receiver] += 1;
        }
        let slow = phase.visibility.slow.len();
        let spread: Vec<String> = receivers
            .iter()
            .enumerate()
            .filter(|(_, n)| **n > 0)
            .map(|(r, n)| format!("node-{r} {:.0}%", 100.0 * *n as f64 / slow as f64))
            .collect();
        write!(
            line,
            " {} |",
            if spread.is_empty() {
                "–".into()
            } else {
                spread.join(", ")
            }
        )?;
        writeln!(out, "{line}")?;
    }
    if !spaced.visibility.slow.is_empty() {
        let mut by_pair: BTreeMap<(usize, usize), usize> = BTreeMap::new();
        for (writer, receiver, _) in &spaced.visibility.slow {
            *by_pair.entry((*writer, *receiver)).or_default() += 1;
        }
        let pairs: Vec<String> = by_pair
            .iter()
            .map(|((w, r), n)| format!("{w}→{r} ×{n}"))
            .collect();
        writeln!(
            out,
            "Those writes by writer → last receiver: {}.",
            pairs.join(", ")
        )?;
    }
    writeln!(
        out,
        "\nSpaced writes, p50 / p99 ms per writer (row) → receiver (column):\n"
    )?;
    let header: Vec<String> = (0..NODES).map(|r| format!("node-{r}")).collect();
    writeln!(out, "| writer | {} |", header.join(" | "))?;
    writeln!(out, "| --- |{}", " ---: |".repeat(NODES))?;
    for (writer, receivers) in spaced.visibility.pairs.iter_mut().enumerate() {
        let cells: Vec<String> = receivers
            .iter_mut()
            .map(|v| match summary(v) {
                Some(s) => format!("{} / {}", ms(s[0]), ms(s[2])),
                None => "–".into(),
            })
            .collect();
        writeln!(out, "| node-{writer} | {} |", cells.join(" | "))?;
    }

    writeln!(out, "\n### Throughput with gossip on\n")?;
    writeln!(
        out,
        "Paced: writes offered at a fixed rate, spread over the 5 nodes, for {:.0} s. Closed loop: N client tasks writing back to back for {:.0} s, task j at node j mod 5; 1 node: the same against one node without peers ({:.1} s each), same process, before the cluster started. Acked w/s: writes / (first write → last `put` returned). Lacking: writes missing at some node when the last put returned, summed over nodes (held back: buffered waiting for causes). Converge: last put returned → all five `status().version` equal; last event: last put returned → the last change event stamped at any node. Converged w/s: writes / (first write → converged).\n",
        options.paced.as_secs_f64(),
        options.load.as_secs_f64(),
        options.baseline.as_secs_f64()
    )?;
    writeln!(
        out,
        "| phase | writes | acked w/s | 1-node w/s | acked ratio | converged w/s | converged ratio | put p50 / p99 ms | lacking at last ack (held back) | converge ms | last event ms | CPU % (of {}00) |",
        threads
    )?;
    writeln!(
        out,
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    )?;
    let pair = |s: Option<[Duration; 5]>| {
        s.map_or("–".into(), |s| format!("{} / {}", ms(s[0]), ms(s[2])))
    };
    let converge_cell = |phase: &Phase| {
        phase.converge.map_or_else(
            || {
                format!(
                    "> {:.0} s (still lacking {})",
                    options.converge.as_secs_f64(),
                    phase.backlog_after
                )
            },
            ms,
        )
    };
    let mut spaced_and_paced: Vec<&mut Phase> = vec![&mut spaced];
    spaced_and_paced.extend(phases.iter_mut());
    for phase in spaced_and_paced {
        let put = summary(&mut phase.put);
        writeln!(
            out,
            "| {} | {} | {:.0} | – | – | {} | – | {} | {} ({}) | {} | {} | {} |",
            phase.label,
            phase.writes,
            phase.acked_rate(),
            phase
                .converged_rate()
                .map_or("–".into(), |r| format!("{r:.0}")),
            pair(put),
            phase.backlog_at_end.0,
            phase.backlog_at_end.1,
            converge_cell(phase),
            phase.watch_tail.map_or("–".into(), ms),
            cpu_percent(phase.cpu, phase.wall),
        )?;
    }
    for (c, phase) in &mut closed {
        let (solo_rate, solo_put, solo_cpu, solo_wall) = baseline[c];
        let put = summary(&mut phase.put);
        writeln!(
            out,
            "| {} (1 node: put {}, CPU {}%) | {} | {:.0} | {:.0} | {:.3} | {} | {} | {} | {} ({}) | {} | {} | {} |",
            phase.label,
            pair(solo_put),
            cpu_percent(solo_cpu, solo_wall),
            phase.writes,
            phase.acked_rate(),
            solo_rate,
            phase.acked_rate() / solo_rate,
            phase
                .converged_rate()
                .map_or("–".into(), |r| format!("{r:.0}")),
            phase
                .converged_rate()
                .map_or("–".into(), |r| format!("{:.3}", r / solo_rate)),
            pair(put),
            phase.backlog_at_end.0,
            phase.backlog_at_end.1,
            converge_cell(phase),
            phase.watch_tail.map_or("–".into(), ms),
            cpu_percent(phase.cpu, phase.wall),
        )?;
    }

    let all: Vec<&Phase> = std::iter::once(&spaced)
        .chain(phases.iter())
        .chain(closed.iter().map(|(_, p)| p))
        .collect();
    let counter_refs: Vec<&Counters> = all
        .iter()
        .map(|p| &p.counters)
        .chain(std::iter::once(&idle))
        .collect();
    let kinds = kinds(&counter_refs);

    writeln!(
        out,
        "\n### Bytes per update (sent by all 5 nodes during the phase, divided by its writes)\n"
    )?;
    writeln!(
        out,
        "Gossip = encoded protocol messages (`Stats::bytes_sent`, counted when produced, so including messages the runtime later drops); wire = UDP payloads under quinn (+{IP_UDP_HEADER} B IPv4/UDP header per packet on a real link). Includes what SWIM and anti-entropy sent meanwhile. Kind columns: gossip bytes per update.\n"
    )?;
    let mut header = String::from(
        "| phase | gossip B/update | gossip msgs/update | wire B/update | wire pkts/update | wire/gossip |",
    );
    for kind in &kinds {
        write!(header, " {kind} |")?;
    }
    writeln!(out, "{header}")?;
    writeln!(out, "| --- |{}", " ---: |".repeat(5 + kinds.len()))?;
    for phase in &all {
        let c = &phase.counters;
        let n = phase.writes;
        let mut line = format!(
            "| {} | {} | {} | {} | {} | {} |",
            phase.label,
            per(c.gossip_bytes, n),
            per_f(c.gossip_messages, n),
            if options.plain {
                "–".into()
            } else {
                per(c.wire_bytes, n)
            },
            if options.plain {
                "–".into()
            } else {
                per_f(c.wire_packets, n)
            },
            if options.plain || c.gossip_bytes == 0 {
                "–".into()
            } else {
                format!("{:.2}", c.wire_bytes as f64 / c.gossip_bytes as f64)
            },
        );
        for kind in &kinds {
            write!(line, " {} |", per(c.kind(kind), n))?;
        }
        writeln!(out, "{line}")?;
    }

    writeln!(
        out,
        "\nDissemination counters, cluster-wide per phase (writes received: first receipts through dissemination; 4 per write means every peer got it by push or graft; duplicates: redundant receipts the push tree prunes):\n"
    )?;
    writeln!(
        out,
        "| phase | writes | writes received | duplicates/write | grafted dots | anti-entropy repairs | watcher lags | runtime log events |"
    )?;
    writeln!(
        out,
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"
    )?;
    for phase in &all {
        let c = &phase.counters;
        writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            phase.label,
            phase.writes,
            c.writes_received,
            per_f(c.duplicates, phase.writes),
            c.grafts,
            c.anti_entropy_repairs,
            phase.lagged,
            phase.logs
        )?;
    }

    let idle_secs = idle_wall.as_secs_f64();
    let per_node_s = |bytes: u64| bytes as f64 / NODES as f64 / idle_secs;
    writeln!(
        out,
        "\n### Idle: a quiet {idle_secs:.0} s on the converged cluster, per node per second\n"
    )?;
    writeln!(
        out,
        "| gossip B/s | gossip msgs/s | wire B/s | wire pkts/s | wire B/s incl. IP/UDP headers | CPU % (whole process) |"
    )?;
    writeln!(out, "| ---: | ---: | ---: | ---: | ---: | ---: |")?;
    let wire_cell = |v: f64, digits: usize| {
        if options.plain {
            "–".to_owned()
        } else {
            format!("{v:.digits$}")
        }
    };
    writeln!(
        out,
        "| {:.0} | {:.1} | {} | {} | {} | {} |",
        per_node_s(idle.gossip_bytes),
        per_node_s(idle.gossip_messages),
        wire_cell(per_node_s(idle.wire_bytes), 0),
        wire_cell(per_node_s(idle.wire_packets), 1),
        wire_cell(
            per_node_s(idle.wire_bytes + IP_UDP_HEADER * idle.wire_packets),
            0
        ),
        cpu_percent(idle.cpu, idle_wall),
    )?;
    let by_kind: Vec<String> = idle
        .by_kind
        .iter()
        .filter(|(_, b)| **b > 0)
        .map(|(k, b)| format!("{k} {:.1}", per_node_s(*b)))
        .collect();
    writeln!(
        out,
        "\nIdle gossip bytes by kind (B/node/s): {}. Runtime log events: {idle_logs}.",
        by_kind.join(", ")
    )?;

    writeln!(out, "\n### Ratios and verdict\n")?;
    match p99_spaced {
        Some(p99) => writeln!(
            out,
            "- Target p99 ≤ {} ms (spaced writes, visible at all peers): p99 = {} ms → **{}**.",
            ms(TARGET_P99),
            ms(p99),
            if p99 <= TARGET_P99 { "met" } else { "not met" }
        )?,
        None => writeln!(out, "- Target p99: no complete writes measured.")?,
    }
    for phase in &mut phases {
        let p99 = summary(&mut phase.visibility.all).map(|s| s[2]);
        writeln!(
            out,
            "- {}: p99 visibility {} ms ({} incomplete) → target {}.",
            phase.label,
            p99.map_or("–".into(), ms),
            phase.visibility.missing,
            if p99.is_some_and(|p| p <= TARGET_P99) && phase.visibility.missing == 0 {
                "met"
            } else {
                "not met"
            }
        )?;
    }
    for (c, phase) in &closed {
        let (solo_rate, ..) = baseline[c];
        writeln!(
            out,
            "- {c} writers: the cluster acknowledges {:.3}× the writes/s of one node without peers ({:.0} vs {solo_rate:.0}); counted until every node has them, {}.",
            phase.acked_rate() / solo_rate,
            phase.acked_rate(),
            phase.converged_rate().map_or_else(
                || format!(
                    "it had not converged {:.0} s after the last write",
                    options.converge.as_secs_f64()
                ),
                |r| format!("{r:.0} w/s = {:.3}×", r / solo_rate)
            )
        )?;
    }
    if !options.plain && spaced.counters.gossip_bytes > 0 {
        writeln!(
            out,
            "- Spaced writes: {:.2} wire bytes per gossip byte, {:.1} UDP packets per update.",
            spaced.counters.wire_bytes as f64 / spaced.counters.gossip_bytes as f64,
            spaced.counters.wire_packets as f64 / spaced.writes.max(1) as f64
        )?;
    }
    let load = std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into());
    writeln!(
        out,
        "\nTotal bench time: {:.0} s; load average at the end: {load}.",
        bench_start.elapsed().as_secs_f64()
    )?;
    print!("\n{out}");
    Ok(())
}
