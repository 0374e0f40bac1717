//! Deterministic simulation of whole mantissa clusters: real nodes, real QUIC and real mutual TLS
//! over turmoil's simulated network, in simulated time, under a seeded schedule of faults.
//!
//! Each run starts 5 to 8 nodes (turmoil hosts, `node-<k>`) that join through two seeds, and three
//! clients (tasks of one turmoil client) that write and read through the nodes' [`Handle`]s, at a
//! random node for every operation, while the driver runs a seeded fault schedule for
//! `FAULT_PHASE`: partitions (a random minority cut off) and repairs, held links (messages delayed
//! until released), slow and very jittery links, 20 % message loss (`set_fail_rate(0.2)`), and
//! the crash and restart of a node. Then every fault is healed and a checker waits for
//! convergence. Every link has a latency of its own (1–20 ms by seed) plus up to 40 ms of jitter,
//! so messages on one link are reordered too.
//!
//! Checked on every run:
//! - **causality**, on every read anywhere: each client's chain `chain/<c>/<g>` holds a gap-free
//!   prefix `0..=m` (element `n` is added at a node only after that node covered the token of
//!   element `n - 1`), and a key `b/<c>/<n>` — written at a node right after reading `n` in the
//!   set `a/<c>` there — is never visible without `n` in `a/<c>`;
//! - **no acknowledged write is lost**: once converged, the common version vector covers every
//!   acknowledged write that was *durable* (made by a replica that never crashed, or sampled at a
//!   replica that never crashed), and the contents are exactly what the covered writes produce:
//!   sets hold every covered element, counters equal the sum of the covered increments, registers
//!   hold their value unless a covered delete removed them;
//! - **liveness**: after the faults stop, every node reports the same version vector and the same
//!   `list("", usize::MAX)` within `HEAL_BOUND` of simulated time.
//!
//! A crashed node restarts **empty, under a new `NodeId`** (same name, address and certificate):
//! `Handle` exposes no snapshot, so the replica it had cannot be kept. Writes it acknowledged that
//! no surviving replica had received are legitimately gone; they are counted, and the final state
//! must be consistent with their absence.
//!
//! A node must have a peer within `JOIN_BOUND` of (re)starting; the fault schedule pauses while a
//! node joins (a restart first heals every fault), so that bound holds regardless of the faults.
//!
//! Found by this suite and fixed in `src/gossip`, kept as regressions: a node whose one join
//! announcement was lost never joined (`a_node_whose_join_announcement_is_lost_joins_on_a_later_
//! announcement`), and a restarted node lost to its dead incarnation if that one had ever rejoined
//! (`a_restarted_node_wins_over_its_previous_incarnation`).
//!
//! Found here and fixed in `src/runtime/transport.rs`: a restarted node was unreachable until its
//! peers' connections to its dead incarnation timed out (30 s), since each start drew a new
//! stateless-reset key (`a_restarted_node_is_reachable_again_promptly`, which also bounds the
//! rejoin to a second).
//!
//! `MANTISSA_SIM_SEEDS=<n>` runs `n` seeds instead of the default; `MANTISSA_SIM_SEED=<s>` runs
//! exactly seed `s`; a failure names its seed. The runs are exactly reproducible only when built
//! with `RUSTFLAGS="--cfg tokio_unstable"`: only then does turmoil seed each host's tokio runtime,
//! whose RNG drives `tokio::select!` branch order and `tokio::sync::watch` wake-ups. Without it, a
//! seed still fixes the fault schedule, the workload and the network's randomness, but not the
//! interleaving. `MANTISSA_SIM_TRACE=1` prints each run's trace and `MANTISSA_SIM_LOG=debug`
//! mantissa's and quinn's logs with the simulated time and host.

// `tokio_unstable` is not a cfg of this crate: it is set through RUSTFLAGS for exact replays.
#![allow(unexpected_cfgs)]

#[path = "support/rng.rs"]
mod rng;
#[path = "support/turmoil_net.rs"]
mod turmoil_net;
#[path = "support/turmoil_socket.rs"]
mod turmoil_socket;

use std::cell::RefCell;
use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, UNIX_EPOCH};

use mantissa::crdt::{Key, NodeId, Replica, Token, Value, VersionVector};
use mantissa::runtime::{
    ClusterCa, Handle, HandleError, NodeConfig, TlsConfig, Transport, TransportConfig, start_on,
};
use rng::Rng;
use turmoil_net::Network;
use turmoil_socket::TurmoilUdpSocket;

/// Ends a client (or a check) with an error: the run fails with this message and its seed.
macro_rules! fail {
    ($($arg:tt)*) => {
        return Err(format!($($arg)*).into())
    };
}

/// The port every node listens on.
const PORT: u16 = 7946;
/// Simulated time with client traffic and faults (not counting pauses while a node joins).
const FAULT_PHASE: Duration = Duration::from_secs(20);
/// After the faults stop, every replica must be identical within this much simulated time.
const HEAL_BOUND: Duration = Duration::from_secs(60);
/// A node that has no peer this long after it started has failed to join.
const JOIN_BOUND: Duration = Duration::from_secs(10);
/// How long a client waits for a node to cover a token before giving up on that step.
const WAIT: Duration = Duration::from_secs(2);
/// Turmoil's step.
const TICK: Duration = Duration::from_millis(1);
/// Extra random latency on a jittery link (which reorders its messages).
const JITTER: Duration = Duration::from_millis(40);
/// Seeds run by default (see the module docs for the environment variables).
const DEFAULT_SEEDS: u64 = 80;
/// The most nodes a simulated cluster has.
const MAX_NODES: usize = 20;

// ---------------------------------------------------------------------------------------------
// Tests

#[test]
fn many_seeds_keep_acknowledged_writes_and_causality_and_converge() {
    let seeds: Vec<u64> = match (env_u64("MANTISSA_SIM_SEED"), env_u64("MANTISSA_SIM_SEEDS")) {
        (Some(seed), _) => vec![seed],
        (None, count) => (0..count.unwrap_or(DEFAULT_SEEDS)).collect(),
    };
    let started = Instant::now();
    let outcomes = run_seeds(&seeds, Params::for_seed);
    report(&seeds, &outcomes, started);
}

#[test]
fn twenty_nodes() {
    let seeds: Vec<u64> = match env_u64("MANTISSA_SIM_SEED") {
        Some(seed) => vec![seed],
        None => vec![1_000, 1_001],
    };
    let started = Instant::now();
    let outcomes = run_seeds(&seeds, |seed| Params {
        nodes: MAX_NODES,
        ..Params::for_seed(seed)
    });
    report(&seeds, &outcomes, started);
}

#[test]
#[cfg_attr(
    not(tokio_unstable),
    ignore = "exact replay needs RUSTFLAGS=\"--cfg tokio_unstable\" (seeds tokio's RNG)"
)]
fn the_same_seed_gives_the_same_trace() {
    for seed in env_u64("MANTISSA_SIM_SEED").map_or(vec![7, 8], |seed| vec![seed]) {
        let params = Params::for_seed(seed);
        // Failing runs are compared too: a failure must reproduce.
        let first = run(seed, &params);
        let second = run(seed, &params);
        if first.trace != second.trace {
            let line = first
                .trace
                .iter()
                .zip(&second.trace)
                .position(|(a, b)| a != b)
                .unwrap_or(first.trace.len().min(second.trace.len()));
            panic!(
                "seed {seed}: two runs diverged at trace line {line}:\n  first:  {:?}\n  second: {:?}",
                first.trace.get(line),
                second.trace.get(line)
            );
        }
        assert_eq!(
            first.failure, second.failure,
            "seed {seed}: outcomes differ"
        );
        assert_eq!(
            first.digest, second.digest,
            "seed {seed}: final states differ"
        );
    }
}

/// Regression for a liveness bug found here in `src/gossip/node.rs` (fixed): `Node::join`
/// announced to the seeds once, in one SWIM datagram, and nothing retried it, so a node whose
/// announcement was lost never joined. It is lost when it overtakes the dial's last handshake
/// packet on a jittery link (quinn drops 1-RTT packets that arrive before it completes the
/// handshake): with 8 nodes joining over jittery links and no fault at all, most seeds lost one.
/// A node that has no peer `JOIN_BOUND` after it started fails the run.
#[test]
fn a_node_whose_join_announcement_is_lost_joins_on_a_later_announcement() {
    let seeds = env_u64("MANTISSA_SIM_SEED").map_or(vec![7, 8, 9, 10], |seed| vec![seed]);
    run_seeds(&seeds, |seed| Params {
        nodes: 8,
        schedule: Schedule::Quiet,
        ..Params::for_seed(seed)
    });
}

/// Regression for a liveness bug in the transport (`src/runtime/transport.rs`, fixed) when a
/// node restarts: its peers kept their QUIC connection to the dead incarnation until the 30 s
/// idle timeout — `Transport::bind` gave every start a new random stateless-reset key, so the new
/// endpoint could not reset them — and each peer whose name is smaller even drained the new
/// connection as a "duplicate" of the dead one (`Shared::register` prefers the connection dialed
/// by the smaller name). Every answer to the restarted node's announcement went down a dead
/// connection; it had no peer 10 s after it restarted. The node restarted is the seed `node-1`,
/// whose connection with the other seed `node-0` was dialed by `node-0`; every restart draws new
/// quinn keys, as a real process does.
///
/// Fixed by deriving the reset key from the node's private key and by probing a connection we
/// dialed when its peer dials us; the restarted node must now have a peer within a second (it
/// took 123–347 ms over these seeds; a second when a join announcement sent as a datagram was
/// lost to the handshake, fixed by sending datagrams only once the handshake is confirmed).
#[test]
fn a_restarted_node_is_reachable_again_promptly() {
    let seeds = env_u64("MANTISSA_SIM_SEED").map_or((1..=8).collect(), |seed| vec![seed]);
    run_seeds(&seeds, |seed| Params {
        nodes: 5,
        schedule: Schedule::CrashRestart(1),
        join_bound: Duration::from_secs(1),
        ..Params::for_seed(seed)
    });
}

/// Regression for a liveness bug found here in `src/gossip/member.rs` (fixed):
/// `Member::win_addr_conflict` compared the SWIM generation before the replica id, and a new
/// incarnation starts at generation 0. Once a node had rejoined after being declared down
/// (generation 1), its next incarnation lost the address conflict to the dead one: peers ignored
/// it (answering at best with a "you are down" that the transport lost) and kept probing the dead
/// identity, which the restarted node ignored in turn; it never got a peer. The victim is the
/// seed `node-1`, cut off for 8 s so that it is declared down and rejoins before its crash.
#[test]
fn a_restarted_node_wins_over_its_previous_incarnation() {
    let seeds = env_u64("MANTISSA_SIM_SEED").map_or(vec![1, 2], |seed| vec![seed]);
    run_seeds(&seeds, |seed| Params {
        nodes: 5,
        schedule: Schedule::RestartAfterRejoin(1),
        ..Params::for_seed(seed)
    });
}

// ---------------------------------------------------------------------------------------------
// Running seeds

fn env_u64(name: &str) -> Option<u64> {
    let text = std::env::var(name).ok()?;
    Some(
        text.trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={text:?} is not a number")),
    )
}

/// Runs `seeds` on every core; panics naming every failed seed and how to rerun it.
fn run_seeds(seeds: &[u64], params: fn(u64) -> Params) -> Vec<Outcome> {
    let next = AtomicUsize::new(0);
    let results = Mutex::new(Vec::new());
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    std::thread::scope(|scope| {
        for _ in 0..workers.min(seeds.len()) {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    let Some(&seed) = seeds.get(i) else { return };
                    let outcome = run(seed, &params(seed));
                    results.lock().expect("results").push((seed, outcome));
                }
            });
        }
    });
    let mut outcomes = Vec::new();
    let mut failed = Vec::new();
    for (seed, outcome) in results.into_inner().expect("results") {
        match &outcome.failure {
            Some(failure) => failed.push((seed, failure.clone())),
            None => outcomes.push(outcome),
        }
    }
    failed.sort();
    if let Some((seed, failure)) = failed.first() {
        let seeds: Vec<u64> = failed.iter().map(|(seed, _)| *seed).collect();
        let exact = if cfg!(tokio_unstable) {
            "RUSTFLAGS=\"--cfg tokio_unstable\" "
        } else {
            ""
        };
        panic!(
            "{} of {} seeds failed: {seeds:?}\nfirst failure, seed {seed} ({:?}): {failure}\n\
             rerun it with: {exact}MANTISSA_SIM_SEED={seed} cargo test --release --test simulation \
             (add RUSTFLAGS=\"--cfg tokio_unstable\" for an exact replay, MANTISSA_SIM_TRACE=1 or \
             MANTISSA_SIM_LOG=debug for details)",
            failed.len(),
            seeds.len() + outcomes.len(),
            params(*seed),
        );
    }
    outcomes
}

fn report(seeds: &[u64], outcomes: &[Outcome], started: Instant) {
    let writes: usize = outcomes.iter().map(|o| o.acknowledged).sum();
    let lost: usize = outcomes.iter().map(|o| o.lost_in_crash).sum();
    let reads: u64 = outcomes.iter().map(|o| o.reads).sum();
    let crashes: usize = outcomes.iter().map(|o| o.crashes).sum();
    let slowest = outcomes.iter().map(|o| o.converged_after).max();
    eprintln!(
        "{} seeds in {:.1?}: {writes} acknowledged writes ({lost} lost with a crashed replica \
         before reaching another), {reads} checked reads, {crashes} crashes and restarts, slowest \
         convergence {slowest:?} after the faults stopped",
        seeds.len(),
        started.elapsed()
    );
}

/// The shape of one run.
#[derive(Clone, Debug)]
struct Params {
    nodes: usize,
    clients: usize,
    /// Which faults.
    schedule: Schedule,
    /// A (re)started node must have a peer within this much simulated time.
    join_bound: Duration,
}

/// A run's faults.
#[derive(Clone, Copy, Debug)]
enum Schedule {
    /// The seeded schedule of `fault_schedule`.
    Random,
    /// None: only the workload, on a healthy network.
    Quiet,
    /// Crash a node and restart it a second later, on an otherwise healthy network.
    CrashRestart(usize),
    /// Cut a node off until the others declare it down (it rejoins under a new generation once
    /// healed), then crash and restart it.
    RestartAfterRejoin(usize),
}

impl Params {
    fn for_seed(seed: u64) -> Params {
        Params {
            nodes: 5 + (Rng::new(seed ^ 0x0005_1ce5).below(4) as usize),
            clients: 3,
            schedule: Schedule::Random,
            join_bound: JOIN_BOUND,
        }
    }
}

/// What a run produced.
struct Outcome {
    /// Why it failed, if it did.
    failure: Option<String>,
    trace: Vec<String>,
    digest: u64,
    acknowledged: usize,
    lost_in_crash: usize,
    reads: u64,
    crashes: usize,
    converged_after: Duration,
}

// ---------------------------------------------------------------------------------------------
// Randomness: this suite mixes its seed into the shared generator (`tests/support/rng.rs`).

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x9e37_79b9_7f4a_7c15)
    }
}

// ---------------------------------------------------------------------------------------------
// Certificates: generated once per process and shared by every run.

fn certs() -> &'static [TlsConfig] {
    static CERTS: OnceLock<Vec<TlsConfig>> = OnceLock::new();
    CERTS.get_or_init(|| {
        let ca = ClusterCa::generate("simulation").expect("CA");
        (0..MAX_NODES)
            .map(|k| {
                let creds = ca
                    .issue(&node_name(k), Duration::from_secs(24 * 3600))
                    .expect("node certificate");
                TlsConfig::new(ca.cert_pem(), &creds).expect("TLS config")
            })
            .collect()
    })
}

fn node_name(k: usize) -> String {
    format!("node-{k}")
}

/// The replica id of host `k`'s `start`-th start.
fn replica_id(k: usize, start: u64) -> NodeId {
    NodeId(((k as u64 + 1) << 16) | start)
}

// ---------------------------------------------------------------------------------------------
// Shared state of one run (single-threaded: turmoil runs every host on the test's thread).

/// An acknowledged write.
#[derive(Clone, Debug)]
struct Write {
    origin: NodeId,
    seq: u64,
    op: Op,
}

#[derive(Clone, Debug)]
enum Op {
    SetAdd { key: String, element: u64 },
    Counter { key: String, amount: i64 },
    Put { key: String, value: String },
    Delete { key: String },
}

struct State {
    seed: u64,
    nodes: usize,
    /// The running node of each host; `None` while crashed.
    handles: Vec<Option<Handle>>,
    /// How many times each host's software started.
    starts: Vec<u64>,
    /// When each host's software last started, and whether it has had a peer since.
    started_at: Vec<Duration>,
    joined: Vec<bool>,
    /// Replica ids of incarnations that crashed.
    crashed: BTreeSet<NodeId>,
    /// Set by the driver when the fault schedule is over and everything is healed.
    faults_over: bool,
    /// Every acknowledged write.
    writes: Vec<Write>,
    /// Version vectors sampled from live replicas: (replica, version).
    samples: Vec<(NodeId, VersionVector)>,
    /// What happened, in order, with simulated times: compared between runs of one seed.
    trace: Vec<String>,
    /// Set by the checker once converged: (time after the faults stopped, digest).
    result: Option<(Duration, u64)>,
    /// Acknowledged writes missing from the converged state (all of crashed replicas).
    lost: usize,
    reads: u64,
}

type Shared = Rc<RefCell<State>>;

impl State {
    fn log(&mut self, line: String) {
        let now = turmoil::sim_elapsed().unwrap_or_default().as_millis();
        self.trace.push(format!("{now:>6} {line}"));
    }

    fn record(&mut self, client: usize, node: usize, token: &Token, op: Op) {
        let (origin, seq) = dot(token);
        self.log(format!("c{client} @{node} {op:?} -> {}:{seq}", origin.0));
        self.writes.push(Write { origin, seq, op });
    }

    fn crashed_now(&self) -> Vec<usize> {
        (0..self.nodes)
            .filter(|k| self.handles[*k].is_none())
            .collect()
    }

    /// A running node that has not had a peer since it started.
    fn joining(&self) -> Option<usize> {
        (0..self.nodes).find(|k| self.handles[*k].is_some() && !self.joined[*k])
    }

    /// A write must survive if its replica never crashed or a replica that never crashed had it.
    fn durable(&self, write: &Write) -> bool {
        !self.crashed.contains(&write.origin)
            || self.samples.iter().any(|(holder, version)| {
                !self.crashed.contains(holder) && version.get(write.origin) >= write.seq
            })
    }
}

fn dot(token: &Token) -> (NodeId, u64) {
    let mut dots = token.version().iter();
    let dot = dots.next().expect("a write token names its write");
    assert!(dots.next().is_none(), "a write token names one write");
    dot
}

fn handle(state: &Shared, k: usize) -> Option<Handle> {
    state.borrow().handles[k].clone()
}

// ---------------------------------------------------------------------------------------------
// One run

fn run(seed: u64, params: &Params) -> Outcome {
    log::install();
    let certs = certs();
    let mut sim = turmoil::Builder::new()
        .simulation_duration(FAULT_PHASE + HEAL_BOUND + 4 * JOIN_BOUND)
        .tick_duration(TICK)
        .rng_seed(seed)
        .epoch(UNIX_EPOCH + Duration::from_secs(1_750_000_000))
        .min_message_latency(Duration::from_millis(1))
        .max_message_latency(Duration::from_millis(1) + JITTER)
        .udp_capacity(16 * 1024)
        .enable_random_order()
        .build();
    let state: Shared = Rc::new(RefCell::new(State {
        seed,
        nodes: params.nodes,
        handles: vec![None; params.nodes],
        starts: vec![0; params.nodes],
        started_at: vec![Duration::ZERO; params.nodes],
        joined: vec![false; params.nodes],
        crashed: BTreeSet::new(),
        faults_over: false,
        writes: Vec::new(),
        samples: Vec::new(),
        trace: Vec::new(),
        result: None,
        lost: 0,
        reads: 0,
    }));

    for (k, tls) in certs.iter().enumerate().take(params.nodes) {
        let state = state.clone();
        let tls = tls.clone();
        sim.host(node_name(k), move || {
            node_software(state.clone(), k, tls.clone())
        });
    }
    sim.client("clients", clients(state.clone(), params.clients));

    let network = network(&sim, seed, params);
    network.heal(&mut sim);
    let mut schedule = fault_schedule(seed, params);
    // The schedule's clock: stands still while a node joins.
    let mut clock = Duration::ZERO;
    let failure = loop {
        let joining = state.borrow().joining();
        let paused = joining.is_some();
        if let Some(k) = joining {
            let since = state.borrow().started_at[k];
            if sim.elapsed() > since + params.join_bound {
                break Some(format!(
                    "node-{k} has had no peer {:?} after it started (at {since:?})\n{}",
                    params.join_bound,
                    describe(&state, None)
                ));
            }
        }
        if !paused {
            while schedule.front().is_some_and(|f| f.at <= clock) {
                let fault = schedule.pop_front().expect("checked");
                apply(&network, &mut sim, &state, fault.kind);
                if schedule.is_empty() {
                    state.borrow_mut().faults_over = true;
                }
            }
            clock += TICK;
        }
        // Panics in node tasks reach here when tokio_unstable makes turmoil shut down on them.
        match catch_unwind(AssertUnwindSafe(|| sim.step())) {
            Ok(Ok(true)) => break None,
            Ok(Ok(false)) => {}
            // A check failed in a client (its message is in `err`), or a host failed.
            Ok(Err(err)) => break Some(format!("failed at {:?}: {err}", sim.elapsed())),
            Err(panic) => {
                let message = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                    .unwrap_or_default();
                break Some(format!("panicked at {:?}: {message}", sim.elapsed()));
            }
        }
    };
    // Dropping the simulation may panic if it was left mid-step; nothing is left to check then.
    let _ = catch_unwind(AssertUnwindSafe(move || drop(sim)));

    let state = state.borrow();
    if std::env::var_os("MANTISSA_SIM_TRACE").is_some() {
        eprintln!("seed {seed} trace:\n{}", state.trace.join("\n"));
    }
    let (converged_after, final_digest) = state.result.unwrap_or_default();
    let mut hasher = DefaultHasher::new();
    state.trace.hash(&mut hasher);
    final_digest.hash(&mut hasher);
    Outcome {
        failure: failure.map(|f| format!("seed {seed}: {f}")),
        trace: state.trace.clone(),
        digest: hasher.finish(),
        acknowledged: state.writes.len(),
        lost_in_crash: state.lost,
        reads: state.reads,
        crashes: state.crashed.len(),
        converged_after,
    }
}

/// One node's software: (re)started by turmoil, each time empty under a new replica id.
async fn node_software(state: Shared, k: usize, tls: TlsConfig) -> turmoil::Result {
    let (seed, nodes, start) = {
        let mut s = state.borrow_mut();
        s.starts[k] += 1;
        s.started_at[k] = turmoil::sim_elapsed().unwrap_or_default();
        s.joined[k] = false;
        (s.seed, s.nodes, s.starts[k])
    };
    let replica = replica_id(k, start);
    let addr = SocketAddr::new(turmoil::lookup(node_name(k)), PORT);
    let socket = TurmoilUdpSocket::bind(addr).await?;
    let mut rng = Rng::new(seed ^ replica.0);
    // The host key only seeds quinn's stand-in reset key, which the transport replaces with the
    // one it derives from the node's private key: a restart resets dead connections either way.
    let endpoint = endpoint_config(seed ^ ((k as u64) << 32), &mut rng);
    let (transport, inbox) = Transport::bind_with_socket(
        socket,
        Arc::new(quinn::TokioRuntime),
        tls.clone(),
        TransportConfig::default(),
        endpoint,
    )?;
    let seeds: Vec<SocketAddr> = (0..nodes.min(2))
        .map(|s| SocketAddr::new(turmoil::lookup(node_name(s)), PORT))
        .collect();
    let mut config = NodeConfig::new(addr, tls, seeds);
    config.rng_seed = Some(rng.next());
    config.wall_clock = Arc::new(|| {
        turmoil::since_epoch()
            .expect("the node runs inside the simulation")
            .as_millis() as u64
    });
    let handle = start_on(config, transport, inbox, Replica::new(replica))?;
    {
        let mut s = state.borrow_mut();
        s.handles[k] = Some(handle);
        s.log(format!("node-{k} started as replica {}", replica.0));
    }
    std::future::pending::<()>().await;
    Ok(())
}

/// quinn's endpoint settings for a node, drawn from `rng` (see
/// [`turmoil_socket::endpoint_config`]).
fn endpoint_config(host_key: u64, rng: &mut Rng) -> quinn::EndpointConfig {
    let cid_seed = rng.next();
    let mut seed = [0u8; 32];
    for chunk in seed.chunks_mut(8) {
        chunk.copy_from_slice(&rng.next().to_le_bytes());
    }
    turmoil_socket::endpoint_config(host_key, cid_seed, seed)
}

// ---------------------------------------------------------------------------------------------
// Faults

struct Fault {
    at: Duration,
    kind: FaultKind,
}

#[derive(Debug)]
enum FaultKind {
    /// Cut these nodes off from the others.
    Partition(Vec<usize>),
    /// Hold every message between two nodes (delivered on release).
    Hold(usize, usize),
    /// Give a link a constant latency of this many milliseconds.
    Slow(usize, usize, u64),
    /// Make a link very jittery (up to `6 * JITTER` more), which reorders its messages a lot.
    Jitter(usize, usize),
    /// Drop messages at this rate (turmoil's random link failures).
    FailRate(f64),
    /// Kill a node's software.
    Crash(usize),
    /// Heal every fault, then start the crashed nodes again.
    Restart,
    /// Repair partitions, release holds, restore latencies, stop dropping, restart crashed nodes.
    HealAll,
}

/// The run's faults over `FAULT_PHASE`, ending with everything healed.
fn fault_schedule(seed: u64, params: &Params) -> VecDeque<Fault> {
    let second = Duration::from_secs(1);
    let mut faults = match params.schedule {
        Schedule::Random => random_faults(seed, params.nodes),
        Schedule::Quiet => Vec::new(),
        Schedule::CrashRestart(k) => vec![
            Fault {
                at: 3 * second,
                kind: FaultKind::Crash(k),
            },
            Fault {
                at: 4 * second,
                kind: FaultKind::Restart,
            },
        ],
        Schedule::RestartAfterRejoin(k) => vec![
            Fault {
                at: second,
                kind: FaultKind::Partition(vec![k]),
            },
            Fault {
                at: 9 * second,
                kind: FaultKind::HealAll,
            },
            Fault {
                at: 13 * second,
                kind: FaultKind::Crash(k),
            },
            Fault {
                at: 14 * second,
                kind: FaultKind::Restart,
            },
        ],
    };
    faults.push(Fault {
        at: FAULT_PHASE,
        kind: FaultKind::HealAll,
    });
    faults.sort_by_key(|f| f.at);
    faults.into()
}

/// A seeded schedule: partitions, message loss, held, slow and jittery links, a crash.
fn random_faults(seed: u64, nodes: usize) -> Vec<Fault> {
    let mut rng = Rng::new(seed ^ 0xfa01_7500);
    let phase = FAULT_PHASE.as_millis() as u64;
    let n = nodes as u64;
    let mut faults = Vec::new();
    let mut add = |at: Duration, kind| faults.push(Fault { at, kind });
    // Partitions, one window after another; each window ends with everything healed.
    let mut t = rng.millis(500, 3_000);
    while t < Duration::from_millis(phase - 4_000) {
        let size = 1 + rng.below(n / 2) as usize;
        let mut side = BTreeSet::new();
        while side.len() < size {
            side.insert(rng.below(n) as usize);
        }
        add(t, FaultKind::Partition(side.into_iter().collect()));
        let end = t + rng.millis(1_000, 6_000);
        add(end, FaultKind::HealAll);
        t = end + rng.millis(500, 4_000);
    }
    // Message loss windows.
    let mut t = rng.millis(0, 2_000);
    while t < Duration::from_millis(phase - 3_000) {
        add(t, FaultKind::FailRate(0.2));
        t += rng.millis(1_000, 5_000);
        add(t, FaultKind::FailRate(0.0));
        t += rng.millis(500, 3_000);
    }
    // Held, slow and jittery links (until the next heal).
    for _ in 0..3 {
        let a = rng.below(n) as usize;
        let b = (a + 1 + rng.below(n - 1) as usize) % nodes;
        let at = rng.millis(500, phase - 3_000);
        let kind = match rng.below(3) {
            0 => FaultKind::Hold(a, b),
            1 => FaultKind::Slow(a, b, 100 + rng.below(400)),
            _ => FaultKind::Jitter(a, b),
        };
        add(at, kind);
    }
    // One crash and restart.
    let victim = rng.below(n) as usize;
    let at = rng.millis(2_000, phase - 8_000);
    add(at, FaultKind::Crash(victim));
    add(at + rng.millis(500, 5_000), FaultKind::Restart);
    faults
}

/// The simulated network of a run: each link's healthy latency drawn from the seed.
fn network(sim: &turmoil::Sim<'_>, seed: u64, params: &Params) -> Network {
    let mut rng = Rng::new(seed ^ 0x1a7e_0c1e);
    let hosts = (0..params.nodes).map(node_name);
    Network::new(sim, hosts, JITTER, || rng.millis(1, 20))
}

/// Applies one fault of the schedule to the network or to a node.
fn apply(network: &Network, sim: &mut turmoil::Sim<'_>, state: &Shared, fault: FaultKind) {
    let now = sim.elapsed().as_millis();
    state
        .borrow_mut()
        .trace
        .push(format!("{now:>6} fault {fault:?}"));
    match fault {
        FaultKind::Partition(side) => network.partition(sim, &side),
        FaultKind::Hold(a, b) => network.hold(sim, a, b),
        FaultKind::Slow(a, b, millis) => network.slow(sim, a, b, Duration::from_millis(millis)),
        FaultKind::Jitter(a, b) => network.jitter(sim, a, b, 6),
        FaultKind::FailRate(rate) => sim.set_fail_rate(rate),
        FaultKind::Crash(k) => {
            let Some(k) = victim(network, state, k) else {
                state
                    .borrow_mut()
                    .trace
                    .push(format!("{now:>6} no node to crash"));
                return;
            };
            sim.crash(node_name(k));
            let mut s = state.borrow_mut();
            s.handles[k] = None;
            let replica = replica_id(k, s.starts[k]);
            s.crashed.insert(replica);
            s.trace.push(format!("{now:>6} crashed node-{k}"));
        }
        FaultKind::Restart | FaultKind::HealAll => {
            network.heal(sim);
            let crashed = state.borrow().crashed_now();
            for k in crashed {
                sim.bounce(node_name(k));
            }
        }
    }
}

/// The node to crash: `k`, or the next running one.
fn victim(network: &Network, state: &Shared, k: usize) -> Option<usize> {
    let s = state.borrow();
    let n = network.nodes();
    (0..n)
        .map(|i| (k + i) % n)
        .find(|&j| s.handles[j].is_some())
}

// ---------------------------------------------------------------------------------------------
// Clients

/// The clients and the checker, as tasks of one turmoil client (every simulated host costs time
/// at every step). The first of them to fail ends the run.
async fn clients(state: Shared, clients: usize) -> turmoil::Result {
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..clients {
        tasks.spawn_local(workload(state.clone(), c));
    }
    tasks.spawn_local(checker(state));
    while let Some(done) = tasks.join_next().await {
        done.map_err(|err| err.to_string())??;
    }
    Ok(())
}

async fn workload(state: Shared, client: usize) -> turmoil::Result {
    let (seed, nodes) = {
        let s = state.borrow();
        (s.seed, s.nodes)
    };
    let mut rng = Rng::new(seed ^ (0xc11e_0000 + client as u64));
    // The causal chain: its generation, next element and the last element's token.
    let mut chain_gen = 0u64;
    let mut chain_next = 0u64;
    let mut chain_last: Option<Token> = None;
    let mut pairs = 0u64;
    let mut registers = 0u64;
    let mut live_registers: Vec<(String, Token)> = Vec::new();
    while !state.borrow().faults_over {
        tokio::time::sleep(rng.millis(5, 150)).await;
        let x = rng.below(nodes as u64) as usize;
        let Some(node) = handle(&state, x) else {
            continue;
        };
        match rng.below(100) {
            // Extend the chain at `x`, once `x` has the previous element.
            0..=24 => {
                if let Some(last) = &chain_last {
                    match node.wait_for(last, WAIT).await {
                        Ok(()) => {}
                        Err(HandleError::Timeout(_)) => {
                            // Its writer crashed before passing it on: start a new chain.
                            let (origin, _) = dot(last);
                            if state.borrow().crashed.contains(&origin) {
                                chain_gen += 1;
                                chain_next = 0;
                                chain_last = None;
                            }
                            continue;
                        }
                        Err(HandleError::Stopped) => continue,
                        Err(err) => fail!("wait_for: {err}"),
                    }
                }
                let key = format!("chain/{client}/{chain_gen}");
                let element = chain_next;
                match node
                    .set_add(&key, vec![element.to_string().into_bytes()])
                    .await
                {
                    Ok(token) => {
                        state
                            .borrow_mut()
                            .record(client, x, &token, Op::SetAdd { key, element });
                        chain_next += 1;
                        chain_last = Some(token);
                    }
                    Err(HandleError::Stopped) => {}
                    Err(err) => fail!("set_add: {err}"),
                }
            }
            // Add `n` to `a/<c>` at `x`; at `y`, wait for it, read it, then write `b/<c>/<n>`.
            25..=44 => {
                let n = pairs;
                pairs += 1;
                let key = format!("a/{client}");
                let token = match node.set_add(&key, vec![n.to_string().into_bytes()]).await {
                    Ok(token) => token,
                    Err(HandleError::Stopped) => continue,
                    Err(err) => fail!("set_add: {err}"),
                };
                state.borrow_mut().record(
                    client,
                    x,
                    &token,
                    Op::SetAdd {
                        key: key.clone(),
                        element: n,
                    },
                );
                let y = rng.below(nodes as u64) as usize;
                let Some(other) = handle(&state, y) else {
                    continue;
                };
                if other.wait_for(&token, WAIT).await.is_err() {
                    continue;
                }
                let seen = match other.get(&key).await {
                    Ok(value) => value,
                    Err(HandleError::Stopped) => continue,
                    Err(err) => fail!("get: {err}"),
                };
                let has = matches!(&seen, Some(Value::Set(elements))
                    if elements.contains(&n.to_string().into_bytes()));
                if !has {
                    fail!("node-{y} covers the token of {key} += {n} but reads {seen:?}");
                }
                let b = format!("b/{client}/{n}");
                match other.put(&b, "after").await {
                    Ok(token) => state.borrow_mut().record(
                        client,
                        y,
                        &token,
                        Op::Put {
                            key: b,
                            value: "after".into(),
                        },
                    ),
                    Err(HandleError::Stopped) => {}
                    Err(err) => fail!("put: {err}"),
                }
            }
            // Counters shared by every client.
            45..=64 => {
                let key = format!("ctr/{}", rng.below(3));
                let amount = rng.below(16) as i64 - 5;
                match node.counter_add(&key, amount).await {
                    Ok(token) => {
                        state
                            .borrow_mut()
                            .record(client, x, &token, Op::Counter { key, amount })
                    }
                    Err(HandleError::Stopped) => {}
                    Err(err) => fail!("counter_add: {err}"),
                }
            }
            // A register of this client's own.
            65..=74 => {
                let key = format!("reg/{client}/{registers}");
                let value = format!("v{registers}");
                registers += 1;
                match node.put(&key, value.clone()).await {
                    Ok(token) => {
                        state.borrow_mut().record(
                            client,
                            x,
                            &token,
                            Op::Put {
                                key: key.clone(),
                                value,
                            },
                        );
                        live_registers.push((key, token));
                    }
                    Err(HandleError::Stopped) => {}
                    Err(err) => fail!("put: {err}"),
                }
            }
            // Delete one of them at `x`, once `x` has it.
            75..=82 => {
                if live_registers.is_empty() {
                    continue;
                }
                let i = rng.below(live_registers.len() as u64) as usize;
                let (key, token) = live_registers[i].clone();
                if node.wait_for(&token, WAIT).await.is_err() {
                    continue;
                }
                match node.delete(&key).await {
                    Ok(Some(token)) => {
                        live_registers.swap_remove(i);
                        state
                            .borrow_mut()
                            .record(client, x, &token, Op::Delete { key });
                    }
                    Ok(None) => {
                        fail!("node-{x} covers the put of {key} but deleting it found nothing")
                    }
                    Err(HandleError::Stopped) => {}
                    Err(err) => fail!("delete: {err}"),
                }
            }
            // Read everything at `x` and check causality.
            _ => match node.list("", usize::MAX).await {
                Ok(listing) => {
                    if let Err(violation) = check_causality(&listing) {
                        fail!("causality violated in a read at node-{x}: {violation}");
                    }
                    let mut s = state.borrow_mut();
                    s.reads += 1;
                    s.log(format!("c{client} @{x} read {} keys", listing.len()));
                }
                Err(HandleError::Stopped) => {}
                Err(err) => fail!("list: {err}"),
            },
        }
    }
    Ok(())
}

/// Samples versions (and who has joined) during the faults, then waits for convergence and
/// checks the final state.
async fn checker(state: Shared) -> turmoil::Result {
    let nodes = state.borrow().nodes;
    while !state.borrow().faults_over {
        tokio::time::sleep(Duration::from_millis(100)).await;
        sample(&state, nodes).await;
    }
    let healed = turmoil::sim_elapsed().unwrap_or_default();
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        sample(&state, nodes).await;
        let now = turmoil::sim_elapsed().unwrap_or_default();
        let views = snapshot(&state, nodes).await?;
        if let Some(views) = &views
            && converged(&state, views)
        {
            let (digest, lost) = final_check(&state, views)?;
            let after = now - healed;
            let mut s = state.borrow_mut();
            s.log(format!(
                "converged {after:?} after the faults stopped: digest {digest:x}, \
                 {lost} writes lost with a crashed replica"
            ));
            s.result = Some((after, digest));
            s.lost = lost;
            return Ok(());
        }
        if now - healed > HEAL_BOUND {
            fail!(
                "not converged {HEAL_BOUND:?} after the faults stopped\n{}",
                describe(&state, views.as_deref())
            );
        }
    }
}

/// Records every running node's version, and whether it has a peer.
async fn sample(state: &Shared, nodes: usize) {
    for k in 0..nodes {
        let Some(node) = handle(state, k) else {
            continue;
        };
        if let Ok(status) = node.status().await {
            let mut s = state.borrow_mut();
            // The node may have crashed and restarted while we waited.
            if status.me.replica == replica_id(k, s.starts[k])
                && !s.joined[k]
                && !status.peers.is_empty()
            {
                s.joined[k] = true;
                let after = turmoil::sim_elapsed().unwrap_or_default() - s.started_at[k];
                s.log(format!("node-{k} has a peer {after:?} after it started"));
            }
            s.samples.push((status.me.replica, status.version));
        }
    }
}

/// One node's state as the checker sees it.
struct View {
    replica: NodeId,
    version: VersionVector,
    listing: Vec<(Key, Value)>,
    peers: Vec<String>,
    held_back: usize,
    stats: String,
}

/// Every node's view, `None` while one is not running.
async fn snapshot(state: &Shared, nodes: usize) -> Result<Option<Vec<View>>, String> {
    let mut views = Vec::new();
    for k in 0..nodes {
        let Some(node) = handle(state, k) else {
            return Ok(None);
        };
        let (status, listing) = match (node.status().await, node.list("", usize::MAX).await) {
            (Ok(status), Ok(listing)) => (status, listing),
            (Err(err), _) | (_, Err(err)) => {
                fail!("node-{k} is not crashed but does not answer: {err}")
            }
        };
        if let Err(violation) = check_causality(&listing) {
            fail!("causality violated at node-{k}: {violation}");
        }
        views.push(View {
            replica: status.me.replica,
            version: status.version,
            listing,
            peers: status
                .peers
                .iter()
                .map(|(member, _)| member.name.to_string())
                .collect(),
            held_back: status.held_back,
            stats: format!(
                "sent {} received {} rejected {}",
                status.stats.messages_sent,
                status.stats.messages_received,
                status.stats.rejected_messages,
            ),
        });
    }
    Ok(Some(views))
}

/// Whether every node holds the same writes and contents, including every durable write.
fn converged(state: &Shared, views: &[View]) -> bool {
    let first = &views[0];
    let same = views
        .iter()
        .all(|v| v.version == first.version && v.listing == first.listing);
    let s = state.borrow();
    same && s
        .writes
        .iter()
        .all(|w| !s.durable(w) || first.version.get(w.origin) >= w.seq)
}

/// Checks the converged state against the acknowledged writes; returns its digest and how many
/// acknowledged writes it lacks.
fn final_check(state: &Shared, views: &[View]) -> Result<(u64, usize), String> {
    let s = state.borrow();
    let version = &views[0].version;
    let covered = |w: &Write| version.get(w.origin) >= w.seq;
    let mut lost = 0;
    let mut sets: BTreeMap<String, BTreeSet<u64>> = BTreeMap::new();
    let mut counters: BTreeMap<String, i64> = BTreeMap::new();
    let mut registers: BTreeMap<String, Option<String>> = BTreeMap::new();
    for write in &s.writes {
        if !covered(write) {
            lost += 1;
            if s.durable(write) {
                fail!("acknowledged write lost: {write:?}");
            }
            continue;
        }
        match &write.op {
            Op::SetAdd { key, element } => {
                sets.entry(key.clone()).or_default().insert(*element);
            }
            Op::Counter { key, amount } => *counters.entry(key.clone()).or_default() += amount,
            // Each register is put once, and deleted (if at all) after its put.
            Op::Put { key, value } => {
                registers.entry(key.clone()).or_insert(Some(value.clone()));
            }
            Op::Delete { key } => {
                registers.insert(key.clone(), None);
            }
        }
    }
    let mut expected: BTreeMap<String, Value> = BTreeMap::new();
    for (key, elements) in sets {
        let elements = elements
            .into_iter()
            .map(|e| e.to_string().into_bytes())
            .collect::<BTreeSet<_>>();
        expected.insert(key, Value::Set(elements.into_iter().collect()));
    }
    for (key, total) in counters {
        expected.insert(key, Value::Counter(total));
    }
    let mut expected_registers = BTreeMap::new();
    for (key, value) in registers {
        if let Some(value) = value {
            expected_registers.insert(key, value);
        }
    }
    let mut actual_registers = BTreeMap::new();
    let mut actual: BTreeMap<String, Value> = BTreeMap::new();
    for (key, value) in &views[0].listing {
        let key = key.to_string();
        match value {
            Value::Register(register) => {
                if !register.siblings.is_empty() {
                    fail!("{key} has siblings but was written once: {register:?}");
                }
                actual_registers.insert(key, String::from_utf8_lossy(&register.value).into_owned());
            }
            other => {
                actual.insert(key, other.clone());
            }
        }
    }
    // Counters that sum to zero still exist; sets and counters are never removed.
    if expected != actual {
        let keys: BTreeSet<&String> = expected.keys().chain(actual.keys()).collect();
        let diff: Vec<String> = keys
            .into_iter()
            .filter(|k| expected.get(*k) != actual.get(*k))
            .map(|k| {
                format!(
                    "{k}: expected {:?}, found {:?}",
                    expected.get(k),
                    actual.get(k)
                )
            })
            .collect();
        fail!(
            "the converged state does not match the acknowledged writes:\n  {}",
            diff.join("\n  ")
        );
    }
    if expected_registers != actual_registers {
        fail!(
            "registers do not match the acknowledged puts and deletes:\n  expected {expected_registers:?}\n  found    {actual_registers:?}"
        );
    }
    let mut hasher = DefaultHasher::new();
    format!("{version:?} {:?}", views[0].listing).hash(&mut hasher);
    Ok((hasher.finish(), lost))
}

/// Causality on one read: chains are gap-free and `b/<c>/<n>` implies `n` in `a/<c>`.
fn check_causality(listing: &[(Key, Value)]) -> Result<(), String> {
    let elements = |value: &Value| -> Result<BTreeSet<u64>, String> {
        match value {
            Value::Set(elements) => elements
                .iter()
                .map(|e| {
                    std::str::from_utf8(e)
                        .ok()
                        .and_then(|e| e.parse().ok())
                        .ok_or_else(|| format!("bad element {e:?}"))
                })
                .collect(),
            other => Err(format!("expected a set, found {other:?}")),
        }
    };
    let mut a_sets: BTreeMap<&str, BTreeSet<u64>> = BTreeMap::new();
    for (key, value) in listing {
        let key = std::str::from_utf8(key.as_bytes()).map_err(|e| e.to_string())?;
        if key.starts_with("chain/") {
            let chain = elements(value)?;
            let len = chain.len() as u64;
            if chain.iter().copied().ne(0..len) {
                return Err(format!("{key} has a gap: {chain:?}"));
            }
        } else if let Some(client) = key.strip_prefix("a/") {
            a_sets.insert(client, elements(value)?);
        }
    }
    for (key, _) in listing {
        let key = std::str::from_utf8(key.as_bytes()).map_err(|e| e.to_string())?;
        if let Some(rest) = key.strip_prefix("b/") {
            let (client, n) = rest.split_once('/').ok_or("bad b key")?;
            let n: u64 = n.parse().map_err(|_| "bad b key")?;
            if !a_sets.get(client).is_some_and(|a| a.contains(&n)) {
                return Err(format!(
                    "{key} is visible but a/{client} lacks {n}: {:?}",
                    a_sets.get(client)
                ));
            }
        }
    }
    Ok(())
}

/// Everything useful to diagnose a run that did not converge.
fn describe(state: &Shared, views: Option<&[View]>) -> String {
    let s = state.borrow();
    let mut out = String::new();
    let views = views.unwrap_or_default();
    if views.is_empty() {
        out += &format!("nodes not running: {:?}\n", s.crashed_now());
    }
    for (k, view) in views.iter().enumerate() {
        out += &format!(
            "node-{k} (replica {}): version {:?}, {} keys, {} held back, peers {:?}, {}\n",
            view.replica.0,
            view.version,
            view.listing.len(),
            view.held_back,
            view.peers,
            view.stats
        );
    }
    let missing: Vec<&Write> = s
        .writes
        .iter()
        .filter(|w| s.durable(w) && views.iter().any(|v| v.version.get(w.origin) < w.seq))
        .take(10)
        .collect();
    out += &format!("durable writes missing somewhere (first 10): {missing:?}\n");
    let lines = if std::env::var_os("MANTISSA_SIM_TRACE").is_some() {
        s.trace.len()
    } else {
        20
    };
    out += "last trace lines (MANTISSA_SIM_TRACE=1 shows all):\n";
    for line in s.trace.iter().rev().take(lines).rev() {
        out += &format!("  {line}\n");
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Logs: `MANTISSA_SIM_LOG=debug` (or info, trace) prints mantissa's and quinn's events with the
// simulated time, for investigating a seed. A minimal subscriber: no extra dependency.

mod log {
    use std::cell::RefCell;
    use std::collections::HashMap;
    use std::fmt::Write as _;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicU64, Ordering};

    use tracing::field::{Field, Visit};
    use tracing::span::{Attributes, Id, Record};
    use tracing::{Event, Level, Metadata, Subscriber};

    pub fn install() {
        let Ok(level) = std::env::var("MANTISSA_SIM_LOG") else {
            return;
        };
        let level = match level.as_str() {
            "trace" => Level::TRACE,
            "debug" => Level::DEBUG,
            "warn" => Level::WARN,
            _ => Level::INFO,
        };
        let _ = tracing::subscriber::set_global_default(Printer {
            level,
            next: AtomicU64::new(1),
            hosts: Mutex::default(),
        });
    }

    thread_local! {
        /// The turmoil host being ticked, from turmoil's `node` span.
        static HOST: RefCell<Vec<String>> = const { RefCell::new(Vec::new()) };
    }

    struct Printer {
        level: Level,
        next: AtomicU64,
        /// turmoil's `node` spans and their host names.
        hosts: Mutex<HashMap<u64, String>>,
    }

    struct Fields(String);

    impl Visit for Fields {
        fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
            if field.name() == "message" {
                let _ = write!(self.0, " {value:?}");
            } else {
                let _ = write!(self.0, " {}={value:?}", field.name());
            }
        }
    }

    impl Subscriber for Printer {
        fn enabled(&self, metadata: &Metadata<'_>) -> bool {
            *metadata.level() <= self.level
                && (metadata.target().starts_with("mantissa")
                    || metadata.target().starts_with("quinn")
                    || metadata.target().starts_with("turmoil"))
        }
        fn new_span(&self, attributes: &Attributes<'_>) -> Id {
            let id = self.next.fetch_add(1, Ordering::Relaxed);
            if attributes.metadata().name() == "node" {
                let mut fields = Fields(String::new());
                attributes.record(&mut fields);
                let name = fields.0.trim().trim_start_matches("name=").replace('"', "");
                self.hosts.lock().expect("hosts").insert(id, name);
            }
            Id::from_u64(id)
        }
        fn record(&self, _: &Id, _: &Record<'_>) {}
        fn record_follows_from(&self, _: &Id, _: &Id) {}
        fn event(&self, event: &Event<'_>) {
            let mut fields = Fields(String::new());
            event.record(&mut fields);
            let now = turmoil::sim_elapsed().unwrap_or_default().as_millis();
            let host = HOST.with(|h| h.borrow().last().cloned().unwrap_or_default());
            eprintln!(
                "{now:>6} {host:>8} {:5} {}:{}",
                event.metadata().level(),
                event.metadata().target(),
                fields.0
            );
        }
        fn enter(&self, id: &Id) {
            let name = self
                .hosts
                .lock()
                .expect("hosts")
                .get(&id.into_u64())
                .cloned();
            HOST.with(|h| h.borrow_mut().push(name.unwrap_or_default()));
        }
        fn exit(&self, _: &Id) {
            HOST.with(|h| h.borrow_mut().pop());
        }
    }
}
