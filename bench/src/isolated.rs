//! Scenarios that need a real network between the members: partition and bandwidth.
//!
//! Both start a fresh pair of clusters of their own on a private network: 6 network namespaces
//! joined by a bridge (`tests/support/netns.rs`, the fault suite's), 3 running `mantissa agent`
//! (durable, mutual TLS) and 3 running `etcd`, each member on its own address. Clients run in
//! this process, outside the namespaces, and reach every member over the bridge.
//!
//! * A **partition** is nftables rules in the namespaces that drop every packet between the
//!   isolated member and the other two (both directions, every protocol: mantissa's QUIC and
//!   etcd's TCP peer traffic). Packets from and to this process are never dropped, so clients
//!   keep working on both sides and measure what each side can still do.
//! * **Bandwidth** is an nftables byte counter in each namespace on packets to the other
//!   members (IP packets, headers included; client traffic is not counted).
//!
//! Both need root (network namespaces) and the `ip` and `nft` tools; without them the scenarios
//! report that they were skipped and why.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use etcd_client::{Client, ConnectOptions, GetOptions};
use serde_json::json;

use crate::agent::{self, HttpConnection};
use crate::cleanup;
use crate::netns::{self, Faults, Network};
use crate::progress::Progress;
use crate::report::{Layout, Report, Row};
use crate::scenarios::VALUE_LEN;
use crate::systems::{Connection, Deployment, ReadMode, System};

/// Members per system.
const MEMBERS: usize = 3;
/// Namespaces 0..3 run the agents, 3..6 the etcd members.
const FIRST_ETCD: usize = MEMBERS;
const HTTP_PORT: u16 = 7700;
const GOSSIP_PORT: u16 = 7701;
const ETCD_CLIENT_PORT: u16 = 2379;
const ETCD_PEER_PORT: u16 = 2380;
/// How long the clusters get to form and answer.
const PATIENCE: Duration = Duration::from_secs(60);
/// An etcd request that has no answer within this is counted as failed (gRPC deadline).
const ETCD_TIMEOUT: Duration = Duration::from_secs(1);
/// Each partition client issues one operation per interval (less often when one takes longer).
const PACE: Duration = Duration::from_millis(20);
/// How long the clusters get to converge after a heal before the run gives up on them.
const CONVERGE_PATIENCE: Duration = Duration::from_secs(60);

/// Durations of the two scenarios.
pub struct IsolatedPlan {
    /// Load on the whole cluster before the cut.
    pub before: Duration,
    /// How long the partition lasts, with clients on both sides.
    pub partition: Duration,
    /// Which etcd member is cut off: a follower, and in a full run also the leader.
    pub etcd_cuts: Vec<EtcdCut>,
    /// The window over which idle traffic is counted.
    pub idle: Duration,
    /// Paced writes of the steady bandwidth case, and their interval.
    pub paced_writes: usize,
    pub paced_interval: Duration,
    /// Clients and window of the flat-out bandwidth case.
    pub burst_clients: usize,
    pub burst: Duration,
}

/// Which etcd member a partition case isolates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EtcdCut {
    Follower,
    Leader,
}

impl IsolatedPlan {
    pub fn new(quick: bool) -> IsolatedPlan {
        match quick {
            true => IsolatedPlan {
                before: Duration::from_secs(1),
                partition: Duration::from_secs(4),
                etcd_cuts: vec![EtcdCut::Follower],
                idle: Duration::from_secs(3),
                paced_writes: 200,
                paced_interval: Duration::from_millis(10),
                burst_clients: 16,
                burst: Duration::from_secs(2),
            },
            false => IsolatedPlan {
                before: Duration::from_secs(3),
                partition: Duration::from_secs(10),
                etcd_cuts: vec![EtcdCut::Follower, EtcdCut::Leader],
                idle: Duration::from_secs(10),
                paced_writes: 1000,
                paced_interval: Duration::from_millis(10),
                burst_clients: 16,
                burst: Duration::from_secs(5),
            },
        }
    }
}

/// Why these scenarios cannot run here, if they cannot.
fn unavailable() -> Option<String> {
    crate::requires::unmet(&netns::NEEDS)
}

/// A report for a scenario that did not run.
fn skipped(scenario: &'static str, why: String) -> Report {
    Report {
        scenario,
        method: format!("Skipped: {why}."),
        layout: Layout::Throughput,
        rows: Vec::new(),
        failures: Vec::new(),
    }
}

/// The private network and the six members on it; everything is stopped and removed on drop.
struct Isolated {
    net: Network,
    /// The CA, the agents' certificates and data directories (a scratch directory).
    files: agent::Cluster,
    agents: Vec<Child>,
    etcd: Vec<Child>,
    etcd_dir: tempfile::TempDir,
    runtime: tokio::runtime::Handle,
}

impl Isolated {
    fn start(deployment: &Deployment, progress: &Progress, label: &str) -> Result<Self, String> {
        progress.step(&format!(
            "{label}: building 6 network namespaces, starting 3 agents and 3 etcd members"
        ));
        let net = Network::create(2 * MEMBERS)?;
        for namespace in net.namespaces() {
            cleanup::register_namespace(&namespace);
        }
        let mut files = agent::Cluster::new(&deployment.mantissa_bin, "bench-isolated");
        cleanup::register_dir(files.root());
        let ca = files.ca_dir().to_owned();
        for node in 0..MEMBERS {
            files.issue(&ca, &agent_name(node));
        }
        let etcd_dir = tempfile::Builder::new()
            .prefix("mantissa-bench-etcd-isolated-")
            .tempdir()
            .map_err(|err| format!("cannot create a scratch directory: {err}"))?;
        cleanup::register_dir(etcd_dir.path());
        let mut isolated = Isolated {
            net,
            files,
            agents: Vec::new(),
            etcd: Vec::new(),
            etcd_dir,
            runtime: deployment.runtime.clone(),
        };
        for node in 0..MEMBERS {
            let child = isolated.spawn_agent(&deployment.mantissa_bin, node)?;
            isolated.agents.push(child);
        }
        let etcd_bin = crate::etcd_binary()?;
        for member in 0..MEMBERS {
            let child = isolated.spawn_etcd(&etcd_bin, member)?;
            isolated.etcd.push(child);
        }
        isolated.wait_ready()?;
        Ok(isolated)
    }

    fn spawn_agent(&self, mantissa_bin: &Path, node: usize) -> Result<Child, String> {
        let name = agent_name(node);
        let addr = self.net.node_addr(node);
        let tls = |file: String| self.files.ca_dir().join(file).display().to_string();
        let log = self.log_file(&format!("{name}.log"))?;
        let mut command = self.net.command(node, mantissa_bin);
        command
            .args(["agent", "--node-id", &name])
            .args(["--bind", &format!("{addr}:{GOSSIP_PORT}")])
            .args(["--http", &format!("{addr}:{HTTP_PORT}")])
            .arg("--data-dir")
            .arg(self.files.root().join(&name))
            .args(["--tls-ca", &tls("ca.pem".to_owned())])
            .args(["--tls-cert", &tls(format!("{name}.pem"))])
            .args(["--tls-key", &tls(format!("{name}-key.pem"))]);
        for peer in (0..MEMBERS).filter(|&peer| peer != node) {
            let peer = self.net.node_addr(peer);
            command.args(["--join", &format!("{peer}:{GOSSIP_PORT}")]);
        }
        command.env("NO_COLOR", "1");
        launch(command, log, mantissa_bin)
    }

    fn spawn_etcd(&self, etcd_bin: &Path, member: usize) -> Result<Child, String> {
        let name = format!("e{}", member + 1);
        let addr = self.etcd_addr(member);
        let initial_cluster = (0..MEMBERS)
            .map(|m| {
                let peer = self.etcd_addr(m);
                format!("e{}=http://{peer}:{ETCD_PEER_PORT}", m + 1)
            })
            .collect::<Vec<_>>()
            .join(",");
        let client_url = format!("http://{addr}:{ETCD_CLIENT_PORT}");
        let peer_url = format!("http://{addr}:{ETCD_PEER_PORT}");
        let log = self.log_file(&format!("{name}.log"))?;
        let mut command = self.net.command(FIRST_ETCD + member, etcd_bin);
        command
            .args(["--name", &name])
            .arg("--data-dir")
            .arg(self.etcd_dir.path().join(&name))
            .args(["--listen-client-urls", &client_url])
            .args(["--advertise-client-urls", &client_url])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &initial_cluster])
            .args(["--initial-cluster-state", "new"])
            .args(["--initial-cluster-token", "mantissa-bench-isolated"])
            .args(["--logger", "zap", "--log-level", "warn"]);
        launch(command, log, etcd_bin)
    }

    fn log_file(&self, name: &str) -> Result<std::fs::File, String> {
        let path = self.etcd_dir.path().join(name);
        std::fs::File::create(&path)
            .map_err(|err| format!("cannot create {}: {err}", path.display()))
    }

    fn log_tail(&self, name: &str) -> String {
        let text = std::fs::read_to_string(self.etcd_dir.path().join(name)).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    fn etcd_addr(&self, member: usize) -> Ipv4Addr {
        self.net.node_addr(FIRST_ETCD + member)
    }

    fn agent_http(&self, node: usize) -> SocketAddr {
        SocketAddr::from((self.net.node_addr(node), HTTP_PORT))
    }

    fn etcd_endpoint(&self, member: usize) -> String {
        format!("http://{}:{ETCD_CLIENT_PORT}", self.etcd_addr(member))
    }

    /// Waits until every agent lists all three members and every etcd member answers a
    /// linearizable read.
    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + PATIENCE;
        for node in 0..MEMBERS {
            loop {
                if let Ok(Some(status)) = self.agents[node].try_wait() {
                    let name = agent_name(node);
                    return Err(format!(
                        "{name} exited with {status}:\n{}",
                        self.log_tail(&format!("{name}.log"))
                    ));
                }
                let members = agent::request_once(self.agent_http(node), "GET", "/v1/members", b"")
                    .ok()
                    .filter(|response| response.status == 200)
                    .map(|response| agent::member_names(&response.json()).len());
                if members == Some(MEMBERS) {
                    break;
                }
                if Instant::now() >= deadline {
                    return Err(format!(
                        "agent {node} lists {members:?} of {MEMBERS} members after {PATIENCE:?}"
                    ));
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        for member in 0..MEMBERS {
            loop {
                if let Ok(Some(status)) = self.etcd[member].try_wait() {
                    let name = format!("e{}", member + 1);
                    return Err(format!(
                        "etcd member {name} exited with {status}:\n{}",
                        self.log_tail(&format!("{name}.log"))
                    ));
                }
                if self.etcd_revision(member, false).is_ok() {
                    break;
                }
                if Instant::now() >= deadline {
                    return Err(format!(
                        "etcd member e{} did not answer within {PATIENCE:?}",
                        member + 1
                    ));
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        Ok(())
    }

    /// A client connection to member `member` of `system` (agents or etcd).
    fn connect(&self, system: System, member: usize) -> Result<Connection, String> {
        match system {
            System::Agents => Ok(Connection::Agent(HttpConnection::new(
                self.agent_http(member),
            ))),
            System::Etcd => {
                let options = ConnectOptions::new()
                    .with_timeout(ETCD_TIMEOUT)
                    .with_connect_timeout(ETCD_TIMEOUT);
                let endpoint = self.etcd_endpoint(member);
                let client = self
                    .runtime
                    .block_on(Client::connect([endpoint], Some(options)))
                    .map_err(|err| format!("etcd connect: {err}"))?;
                Ok(Connection::Etcd {
                    client,
                    runtime: self.runtime.clone(),
                })
            }
            System::Embedded => Err("embedded nodes do not run in namespaces".to_owned()),
        }
    }

    /// The store revision member `member` reports: from its own state (`serializable`) or
    /// through the leader.
    fn etcd_revision(&self, member: usize, serializable: bool) -> Result<i64, String> {
        let endpoint = self.etcd_endpoint(member);
        self.runtime.block_on(async move {
            let options = ConnectOptions::new()
                .with_timeout(ETCD_TIMEOUT)
                .with_connect_timeout(ETCD_TIMEOUT);
            let mut client = Client::connect([endpoint], Some(options))
                .await
                .map_err(|err| err.to_string())?;
            let get = match serializable {
                true => Some(GetOptions::new().with_serializable()),
                false => None,
            };
            let response = client
                .get("bench/revision", get)
                .await
                .map_err(|err| err.to_string())?;
            response
                .header()
                .map(|header| header.revision())
                .ok_or_else(|| "no response header".to_owned())
        })
    }

    /// The etcd member that leads, if one answers.
    fn etcd_leader(&self) -> Option<usize> {
        (0..MEMBERS).find(|&member| {
            let endpoint = self.etcd_endpoint(member);
            self.runtime.block_on(async move {
                let mut client = Client::connect([endpoint], None).await.ok()?;
                let status = client.status().await.ok()?;
                let me = status.header()?.member_id();
                Some(status.leader() == me)
            }) == Some(true)
        })
    }

    /// Cuts member `member` of `system` off from the other two, both ways, every protocol.
    fn isolate(&self, system: System, member: usize) -> Result<(), String> {
        let node = |m: usize| match system {
            System::Etcd => FIRST_ETCD + m,
            _ => m,
        };
        let cut = node(member);
        let others: Vec<usize> = (0..MEMBERS).filter(|&m| m != member).map(node).collect();
        let faults = |blocked: Vec<Ipv4Addr>| Faults {
            blocked,
            all_traffic: true,
            ..Faults::default()
        };
        let blocked = others.iter().map(|&n| self.net.node_addr(n)).collect();
        self.net.set_faults(cut, &faults(blocked))?;
        for &other in &others {
            self.net
                .set_faults(other, &faults(vec![self.net.node_addr(cut)]))?;
        }
        Ok(())
    }

    /// The agents' state digests (`GET /v1/digest`), `None` for one that did not answer.
    fn digests(&self) -> Vec<Option<String>> {
        (0..MEMBERS)
            .map(|node| {
                agent::request_once(self.agent_http(node), "GET", "/v1/digest", b"")
                    .ok()
                    .filter(|response| response.status == 200)
                    .and_then(|response| response.json()["digest"].as_str().map(str::to_owned))
            })
            .collect()
    }

    /// Starts counting the bytes every member sends to the others.
    fn count_sent(&self) -> Result<(), String> {
        (0..2 * MEMBERS).try_for_each(|node| self.net.count_sent(node))
    }

    /// Bytes sent so far by each member of `system`.
    fn sent(&self, system: System) -> Result<Vec<u64>, String> {
        let first = match system {
            System::Etcd => FIRST_ETCD,
            _ => 0,
        };
        (first..first + MEMBERS)
            .map(|node| self.net.sent_bytes(node))
            .collect()
    }

    /// Fails if a member exited during the scenario.
    fn check_alive(&mut self) -> Result<(), String> {
        let mut dead = Vec::new();
        for (node, child) in self.agents.iter_mut().enumerate() {
            if let Ok(Some(status)) = child.try_wait() {
                dead.push(format!("{} exited with {status}", agent_name(node)));
            }
        }
        for (member, child) in self.etcd.iter_mut().enumerate() {
            if let Ok(Some(status)) = child.try_wait() {
                dead.push(format!("etcd member e{} exited with {status}", member + 1));
            }
        }
        match dead.is_empty() {
            true => Ok(()),
            false => Err(dead.join("; ")),
        }
    }
}

impl Drop for Isolated {
    fn drop(&mut self) {
        for child in self.agents.iter_mut().chain(self.etcd.iter_mut()) {
            let _ = child.kill();
            let _ = child.wait();
            cleanup::unregister_pid(child.id());
        }
        for namespace in self.net.namespaces() {
            cleanup::unregister_namespace(&namespace);
        }
        cleanup::unregister_dir(self.files.root());
        cleanup::unregister_dir(self.etcd_dir.path());
        // The fields remove the namespaces and directories after this.
    }
}

/// Starts `command` with its output in `log`, registered for cleanup on interruption.
fn launch(mut command: Command, log: std::fs::File, program: &Path) -> Result<Child, String> {
    let child = command
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(|err| err.to_string())?)
        .stderr(log)
        .spawn()
        .map_err(|err| format!("cannot start {}: {err}", program.display()))?;
    cleanup::register_pid(child.id());
    Ok(child)
}

fn agent_name(node: usize) -> String {
    format!("node-{node}")
}

fn value() -> Vec<u8> {
    vec![b'v'; VALUE_LEN]
}

/// One kind of client operation in the partition scenario.
#[derive(Clone, Copy)]
enum Op {
    Write,
    Read(ReadKind),
}

#[derive(Clone, Copy)]
enum ReadKind {
    /// mantissa's local read, etcd's serializable read.
    Local,
    /// etcd's default read.
    Linearizable,
}

impl Op {
    fn name(self, system: System) -> &'static str {
        match (self, system) {
            (Op::Write, _) => "write",
            (Op::Read(ReadKind::Local), System::Etcd) => "read (serializable)",
            (Op::Read(ReadKind::Local), _) => "read (local)",
            (Op::Read(ReadKind::Linearizable), _) => "read (linearizable)",
        }
    }
}

/// Scenario 4, partition.
pub fn partition(deployment: &Deployment, plan: &IsolatedPlan, progress: &Progress) -> Report {
    if let Some(why) = unavailable() {
        return skipped("partition", why);
    }
    let mut rows = Vec::new();
    let mut failures = Vec::new();
    for (case, &cut) in plan.etcd_cuts.iter().enumerate() {
        // mantissa has no leader: one case measures it; the leader case is etcd's alone.
        let systems: &[System] = match case {
            0 => &[System::Etcd, System::Agents],
            _ => &[System::Etcd],
        };
        match partition_case(deployment, plan, progress, cut, systems) {
            Ok(case_rows) => rows.extend(case_rows),
            Err(err) => failures.push(err),
        }
    }
    Report {
        scenario: "partition",
        method: format!(
            "Fresh clusters in network namespaces (3 agents, 3 etcd members, one address each). \
             After {:.0} s of load, one member of each is cut off from the other two for {:.0} s \
             (nftables drops every packet between them, both ways; client traffic passes), then \
             healed. Clients on both sides, one per operation, each issuing an operation every \
             {} ms (etcd requests time out after {} ms); rows count the operations started \
             during the partition (count = succeeded, errors = failed). 'minority' is the cut \
             member, 'majority' one of the other two; etcd's cut member is {}. Clients stop at the \
             heal; 'converged' is the time from the heal until mantissa's agents report equal \
             state digests (`GET /v1/digest`) / etcd's cut member reports the majority's revision \
             from its own state.",
            plan.before.as_secs_f64(),
            plan.partition.as_secs_f64(),
            PACE.as_millis(),
            ETCD_TIMEOUT.as_millis(),
            match plan.etcd_cuts.len() {
                1 => "a follower",
                _ => "a follower, then (second case) the leader",
            }
        ),
        layout: Layout::Throughput,
        rows,
        failures,
    }
}

fn partition_case(
    deployment: &Deployment,
    plan: &IsolatedPlan,
    progress: &Progress,
    cut: EtcdCut,
    systems: &[System],
) -> Result<Vec<Row>, String> {
    let label = match cut {
        EtcdCut::Follower => "partition",
        EtcdCut::Leader => "partition (etcd leader cut)",
    };
    let mut isolated = Isolated::start(deployment, progress, label)?;
    let leader = isolated
        .etcd_leader()
        .ok_or("no etcd member says it leads")?;
    // The member each system loses, and one it keeps.
    let minority = |system: System| match (system, cut) {
        (System::Etcd, EtcdCut::Leader) => leader,
        (System::Etcd, EtcdCut::Follower) => (leader + 1) % MEMBERS,
        _ => MEMBERS - 1,
    };
    let majority = |system: System| (minority(system) + 1) % MEMBERS;
    let suffix = match cut {
        EtcdCut::Follower => "",
        EtcdCut::Leader => ", leader cut",
    };

    struct Client {
        system: System,
        side: &'static str,
        member: usize,
        op: Op,
    }
    let mut clients = Vec::new();
    for &system in systems {
        for (side, member) in [
            ("minority", minority(system)),
            ("majority", majority(system)),
        ] {
            let mut ops = vec![Op::Write, Op::Read(ReadKind::Local)];
            if system == System::Etcd {
                ops.push(Op::Read(ReadKind::Linearizable));
            }
            for op in ops {
                clients.push(Client {
                    system,
                    side,
                    member,
                    op,
                });
            }
        }
    }

    let stop = AtomicBool::new(false);
    let began = Instant::now();
    let cut_at = began + plan.before;
    let heal_by = cut_at + plan.partition;
    let (results, cut_done) = std::thread::scope(|scope| {
        let threads: Vec<_> = clients
            .iter()
            .enumerate()
            .map(|(n, client)| {
                let (isolated, stop) = (&isolated, &stop);
                scope.spawn(move || {
                    partition_client(isolated, client.system, client.member, client.op, n, stop)
                })
            })
            .collect();
        while Instant::now() < cut_at {
            progress.tick(&format!("{label}: load on the whole clusters"));
            std::thread::sleep(Duration::from_millis(100));
        }
        let cut_done = systems
            .iter()
            .try_for_each(|&system| isolated.isolate(system, minority(system)))
            .map(|()| Instant::now());
        while Instant::now() < heal_by {
            progress.tick(&format!(
                "{label}: partitioned, {:.1}/{:.0} s",
                (Instant::now() - cut_at).as_secs_f64(),
                plan.partition.as_secs_f64()
            ));
            std::thread::sleep(Duration::from_millis(100));
        }
        stop.store(true, Ordering::Relaxed);
        let results: Vec<Vec<(Instant, Result<Duration, String>)>> = threads
            .into_iter()
            .map(|thread| thread.join().unwrap_or_default())
            .collect();
        (results, cut_done)
    });
    let cut_done = cut_done?;
    let healed_at = Instant::now();
    isolated.net.heal()?;

    let mut rows = Vec::new();
    for (client, samples) in clients.iter().zip(results) {
        let mut row = Row::new(
            client.system.name(),
            format!("{}: {}{suffix}", client.side, client.op.name(client.system)),
            Some(1),
        );
        row.seconds = Some((healed_at - cut_done).as_secs_f64());
        for (started, result) in samples {
            if started < cut_done {
                continue;
            }
            match result {
                Ok(latency) => {
                    row.count += 1;
                    row.millis.push(latency.as_secs_f64() * 1e3);
                }
                Err(err) => row.error(err),
            }
        }
        let attempts = row.count + row.errors;
        row.detail = json!({
            "side": client.side,
            "success_rate": (attempts > 0).then(|| row.count as f64 / attempts as f64),
        });
        rows.push(row);
    }

    progress.step(&format!(
        "{label}: healed, waiting for both systems to converge"
    ));
    // Both at once: each figure is its own system's, from the same heal.
    let converged: Vec<Result<Duration, String>> = std::thread::scope(|scope| {
        let threads: Vec<_> = systems
            .iter()
            .map(|&system| {
                let isolated = &isolated;
                let (cut, kept) = (minority(system), majority(system));
                scope.spawn(move || converge(isolated, system, cut, kept, healed_at))
            })
            .collect();
        threads
            .into_iter()
            .map(|thread| {
                thread
                    .join()
                    .unwrap_or_else(|_| Err("the convergence check panicked".to_owned()))
            })
            .collect()
    });
    for (&system, result) in systems.iter().zip(converged) {
        let mut row = Row::new(
            system.name(),
            format!("converged after the heal{suffix}"),
            None,
        );
        match result {
            Ok(took) => {
                row.count = 1;
                row.millis.push(took.as_secs_f64() * 1e3);
            }
            Err(err) => row.error(err),
        }
        rows.push(row);
    }
    isolated.check_alive()?;
    Ok(rows)
}

/// One partition client: `op` on `member` of `system`, paced, until `stop`; the start and
/// outcome of every operation.
fn partition_client(
    isolated: &Isolated,
    system: System,
    member: usize,
    op: Op,
    client: usize,
    stop: &AtomicBool,
) -> Vec<(Instant, Result<Duration, String>)> {
    let mut samples = Vec::new();
    let mut connection = None;
    let value = value();
    let mut last_written: Option<String> = None;
    let mut next = Instant::now();
    for n in 0u64.. {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let now = Instant::now();
        if now < next {
            std::thread::sleep(next - now);
        }
        next += PACE;
        let started = Instant::now();
        if connection.is_none() {
            match isolated.connect(system, member) {
                Ok(fresh) => connection = Some(fresh),
                Err(err) => {
                    samples.push((started, Err(err)));
                    continue;
                }
            }
        }
        let Some(conn) = connection.as_mut() else {
            continue;
        };
        let result = match op {
            Op::Write => {
                let key = format!("bench/partition/{client}/{n}");
                let result = conn.put(&key, &value).map(drop);
                if result.is_ok() {
                    last_written = Some(key);
                }
                result
            }
            Op::Read(kind) => {
                let key = last_written.get_or_insert_with(|| "bench/partition/absent".to_owned());
                let mode = match kind {
                    ReadKind::Local => ReadMode::Local,
                    ReadKind::Linearizable => ReadMode::Linearizable,
                };
                conn.get(key, &mode).map(drop)
            }
        };
        samples.push((started, result.map(|()| started.elapsed())));
        if next < Instant::now() {
            next = Instant::now();
        }
    }
    samples
}

/// From `healed_at` until the cut member holds what the others hold.
fn converge(
    isolated: &Isolated,
    system: System,
    minority: usize,
    majority: usize,
    healed_at: Instant,
) -> Result<Duration, String> {
    let deadline = healed_at + CONVERGE_PATIENCE;
    // etcd: the revision the majority reached; nothing writes after the heal.
    let target = match system {
        System::Etcd => loop {
            match isolated.etcd_revision(majority, false) {
                Ok(revision) => break Some(revision),
                Err(err) if Instant::now() >= deadline => {
                    return Err(format!("etcd's majority does not answer: {err}"));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        },
        _ => None,
    };
    loop {
        let converged = match target {
            Some(target) => isolated
                .etcd_revision(minority, true)
                .is_ok_and(|revision| revision >= target),
            None => {
                let digests = isolated.digests();
                digests[0].is_some() && digests.iter().all(|digest| *digest == digests[0])
            }
        };
        if converged {
            return Ok(healed_at.elapsed());
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "{} did not converge within {CONVERGE_PATIENCE:?} of the heal",
                system.name()
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Scenario 6, bandwidth.
pub fn bandwidth(deployment: &Deployment, plan: &IsolatedPlan, progress: &Progress) -> Report {
    if let Some(why) = unavailable() {
        return skipped("bandwidth", why);
    }
    let mut rows = Vec::new();
    let mut failures = Vec::new();
    match Isolated::start(deployment, progress, "bandwidth") {
        Err(err) => failures.push(err),
        Ok(mut isolated) => {
            for system in [System::Etcd, System::Agents] {
                match bandwidth_system(&isolated, plan, progress, system) {
                    Ok(system_rows) => rows.extend(system_rows),
                    Err(err) => failures.push(format!("{}: {err}", system.name())),
                }
            }
            if let Err(err) = isolated.check_alive() {
                failures.push(err);
            }
        }
    }
    Report {
        scenario: "bandwidth",
        method: format!(
            "Fresh clusters in network namespaces; an nftables counter in each member's namespace \
             adds up the IP packets (headers included) it sends to the other members; client \
             traffic is not counted. 'idle': nothing written for {:.0} s (bytes/s per member). \
             'paced': {} writes of {VALUE_LEN}-byte values to fresh keys, one every {} ms, at one \
             member; '{} clients': as many writers, flat out for {:.0} s, spread over the members. \
             Each counts until every member serves the last write, minus the idle rate over the \
             same time; bytes per write are for the whole cluster (replicating to 2 peers).",
            plan.idle.as_secs_f64(),
            plan.paced_writes,
            plan.paced_interval.as_millis(),
            plan.burst_clients,
            plan.burst.as_secs_f64(),
        ),
        layout: Layout::Figures(&[
            ("bytes/write", "bytes_per_write"),
            ("idle B/s per member", "idle_bytes_per_second_per_member"),
            ("bytes sent", "bytes"),
            ("seconds", "seconds"),
        ]),
        rows,
        failures,
    }
}

fn bandwidth_system(
    isolated: &Isolated,
    plan: &IsolatedPlan,
    progress: &Progress,
    system: System,
) -> Result<Vec<Row>, String> {
    let total = |bytes: &[u64]| bytes.iter().sum::<u64>();
    isolated.count_sent()?;
    std::thread::sleep(Duration::from_millis(500));

    progress.step(&format!("bandwidth: {} idle", system.name()));
    let before = total(&isolated.sent(system)?);
    let began = Instant::now();
    std::thread::sleep(plan.idle);
    let idle_bytes = total(&isolated.sent(system)?) - before;
    let idle_secs = began.elapsed().as_secs_f64();
    let idle_rate = idle_bytes as f64 / idle_secs;
    let mut idle = Row::new(system.name(), "idle", None);
    idle.seconds = Some(idle_secs);
    idle.detail = json!({
        "bytes": idle_bytes,
        "seconds": idle_secs,
        "idle_bytes_per_second_per_member": idle_rate / MEMBERS as f64,
    });
    let mut rows = vec![idle];

    let cases = [
        (
            format!("paced, {} ms apart", plan.paced_interval.as_millis()),
            1,
        ),
        (
            format!("{} clients", plan.burst_clients),
            plan.burst_clients,
        ),
    ];
    for (case, (name, clients)) in cases.into_iter().enumerate() {
        progress.step(&format!("bandwidth: {} {name}", system.name()));
        let before = total(&isolated.sent(system)?);
        let began = Instant::now();
        let (writes, last_keys) = bandwidth_writes(isolated, plan, system, case, clients)?;
        wait_replicated(isolated, system, &last_keys)?;
        let seconds = began.elapsed().as_secs_f64();
        let bytes = total(&isolated.sent(system)?) - before;
        let extra = (bytes as f64 - idle_rate * seconds).max(0.0);
        let mut row = Row::new(system.name(), name, Some(clients));
        row.count = writes;
        row.seconds = Some(seconds);
        row.detail = json!({
            "bytes": bytes,
            "seconds": seconds,
            "bytes_per_write": (writes > 0).then(|| extra / writes as f64),
        });
        rows.push(row);
    }
    Ok(rows)
}

/// What one bandwidth writer did: its writes, and its last key with the member it wrote to.
type WriterOutcome = Result<(u64, Option<(usize, String)>), String>;

/// Runs one write case; the number of writes and each writer's last key with its member.
fn bandwidth_writes(
    isolated: &Isolated,
    plan: &IsolatedPlan,
    system: System,
    case: usize,
    clients: usize,
) -> Result<(u64, Vec<(usize, String)>), String> {
    let value = value();
    let results: Vec<WriterOutcome> = std::thread::scope(|scope| {
        let threads: Vec<_> = (0..clients)
            .map(|client| {
                let value = &value;
                scope.spawn(move || {
                    let member = client % MEMBERS;
                    let mut connection = isolated.connect(system, member)?;
                    let began = Instant::now();
                    let mut last = None;
                    let mut writes = 0u64;
                    for n in 0u64.. {
                        let key = format!("bench/bandwidth/{case}/{client}/{n}");
                        if clients == 1 {
                            if n as usize == plan.paced_writes {
                                break;
                            }
                            let due = began + plan.paced_interval * n as u32;
                            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                                std::thread::sleep(wait);
                            }
                        } else if began.elapsed() >= plan.burst {
                            break;
                        }
                        connection.put(&key, value)?;
                        writes += 1;
                        last = Some((member, key));
                    }
                    Ok((writes, last))
                })
            })
            .collect();
        threads
            .into_iter()
            .map(|thread| {
                thread
                    .join()
                    .unwrap_or_else(|_| Err("a writer panicked".to_owned()))
            })
            .collect()
    });
    let mut writes = 0;
    let mut last_keys = Vec::new();
    for result in results {
        let (count, last) = result?;
        writes += count;
        last_keys.extend(last);
    }
    Ok((writes, last_keys))
}

/// Waits until every member serves each writer's last key from its own state (both systems
/// apply one writer's writes in order).
fn wait_replicated(
    isolated: &Isolated,
    system: System,
    last_keys: &[(usize, String)],
) -> Result<(), String> {
    let deadline = Instant::now() + CONVERGE_PATIENCE;
    for member in 0..MEMBERS {
        let mut connection = isolated.connect(system, member)?;
        for (_, key) in last_keys {
            while !connection.get(key, &ReadMode::Local).unwrap_or(false) {
                if Instant::now() >= deadline {
                    return Err(format!("member {member} did not get {key}"));
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }
    Ok(())
}
