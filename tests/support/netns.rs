//! A private network for fault tests: one network namespace per node, all joined by veth pairs to
//! a bridge in a "hub" namespace, and one more veth pair from the hub to the test process's own
//! namespace so that client threads reach every node's HTTP API.
//!
//! Nothing else of the host's network is touched: the only host-side change is the interface
//! `mfx<pid>r<run>` (and the /24 route the kernel adds for its address), which disappears with
//! the hub namespace. Faults are nftables rules inside a node's namespace (table `inet mfx`) that
//! drop UDP, which only gossip (QUIC) uses, or every protocol between the blocked nodes
//! ([`Faults::all_traffic`], for etcd's TCP peer traffic in the benchmarks); packets to and from
//! the host are never dropped, so clients observe both sides of a partition. A second table
//! (`inet mfxbytes`) counts the bytes each node sends to the others.
//!
//! A [`Network`] removes its namespaces when dropped, panicking or not; [`Network::create`] first
//! removes what crashed runs left behind (namespaces and links named `mfx<pid>…` whose process is
//! gone, after killing the processes still inside them).

#![allow(dead_code)] // each test binary uses a different subset

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

use crate::requires::Need;

/// The first two octets of every address the harness assigns; the third is chosen per run among
/// those the host does not route yet.
const PREFIX: [u8; 2] = [10, 77];
/// Node `i` gets `.(FIRST_NODE + i)`; the host side of the hub link gets `.1`.
const FIRST_NODE: u8 = 10;
/// The nftables table the harness owns inside each node namespace.
const TABLE: &str = "mfx";
/// The nftables table that counts bytes sent, inside each node namespace.
const BYTES_TABLE: &str = "mfxbytes";

/// A hub namespace with a bridge, `n` node namespaces wired to it, and a link from the host.
pub struct Network {
    /// `mfx<pid>r<run>`: the host link's name and the prefix of every namespace's name.
    stem: String,
    subnet: u8,
    nodes: usize,
}

/// Faults applied to one node's namespace; `Faults::default()` is none.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Faults {
    /// Peers whose gossip this node neither sends to nor receives from.
    pub blocked: Vec<Ipv4Addr>,
    /// Percentage of incoming gossip packets dropped at random.
    pub loss_percent: u8,
    /// Drop every protocol to and from `blocked` peers, not only UDP: TCP too (etcd's peer
    /// traffic). The host's address is never blocked, so clients still reach both sides.
    pub all_traffic: bool,
}

impl Network {
    /// Builds the network for `nodes` nodes. Needs root (CAP_NET_ADMIN) and `ip`.
    pub fn create(nodes: usize) -> Result<Network, String> {
        static RUNS: AtomicU32 = AtomicU32::new(0);
        remove_stale();
        let pid = std::process::id();
        let run = RUNS.fetch_add(1, Ordering::Relaxed);
        let network = Network {
            stem: format!("mfx{pid}r{run}"),
            subnet: free_subnet(pid + run * 37)?,
            nodes,
        };
        // From here on, Drop cleans up whatever part was built.
        network.build()?;
        Ok(network)
    }

    fn build(&self) -> Result<(), String> {
        let hub = self.hub();
        ip(&["netns", "add", &hub])?;
        ip(&["-n", &hub, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &hub, "link", "set", "br0", "up"])?;
        ip(&["-n", &hub, "link", "set", "lo", "up"])?;
        // The host's end of the hub link.
        let host = self.stem.as_str();
        ip(&[
            "link", "add", host, "type", "veth", "peer", "name", "host", "netns", &hub,
        ])?;
        ip(&[
            "addr",
            "add",
            &format!("{}/24", self.host_addr()),
            "dev",
            host,
        ])?;
        ip(&["link", "set", host, "up"])?;
        self.attach(&hub, "host")?;
        for node in 0..self.nodes {
            let ns = self.namespace(node);
            let port = format!("n{node}");
            ip(&["netns", "add", &ns])?;
            ip(&[
                "-n", &ns, "link", "add", "eth0", "type", "veth", "peer", "name", &port, "netns",
                &hub,
            ])?;
            let addr = format!("{}/24", self.node_addr(node));
            ip(&["-n", &ns, "addr", "add", &addr, "dev", "eth0"])?;
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            self.attach(&hub, &port)?;
        }
        Ok(())
    }

    fn attach(&self, hub: &str, port: &str) -> Result<(), String> {
        ip(&["-n", hub, "link", "set", port, "master", "br0"])?;
        ip(&["-n", hub, "link", "set", port, "up"])
    }

    /// The namespace node `node` runs in.
    pub fn namespace(&self, node: usize) -> String {
        format!("{}n{node}", self.stem)
    }

    fn hub(&self) -> String {
        format!("{}hub", self.stem)
    }

    /// Node `node`'s address, inside its namespace.
    pub fn node_addr(&self, node: usize) -> Ipv4Addr {
        let last = FIRST_NODE + u8::try_from(node).expect("fewer than 240 nodes");
        Ipv4Addr::new(PREFIX[0], PREFIX[1], self.subnet, last)
    }

    /// The host's address on the hub's bridge.
    pub fn host_addr(&self) -> Ipv4Addr {
        Ipv4Addr::new(PREFIX[0], PREFIX[1], self.subnet, 1)
    }

    /// A command that runs `program` inside node `node`'s namespace (`ip netns exec` execs it,
    /// so the child's pid is the program's).
    pub fn command(&self, node: usize, program: &Path) -> Command {
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", &self.namespace(node)])
            .arg(program);
        command
    }

    /// Replaces node `node`'s faults with `faults` (atomically: one nft transaction).
    pub fn set_faults(&self, node: usize, faults: &Faults) -> Result<(), String> {
        let mut input = String::new();
        let mut output = String::new();
        let protocol = match faults.all_traffic {
            true => "",
            false => " meta l4proto udp",
        };
        for peer in &faults.blocked {
            let _ = writeln!(input, "    ip saddr {peer}{protocol} drop");
            let _ = writeln!(output, "    ip daddr {peer}{protocol} drop");
        }
        if faults.loss_percent > 0 {
            let _ = writeln!(
                input,
                "    meta l4proto udp numgen random mod 100 < {} drop",
                faults.loss_percent
            );
        }
        // Adding the table first makes the delete valid whether or not it existed.
        let script = format!(
            "table inet {TABLE}\ndelete table inet {TABLE}\ntable inet {TABLE} {{\n  \
             chain input {{\n    type filter hook input priority 0; policy accept;\n{input}  }}\n  \
             chain output {{\n    type filter hook output priority 0; policy accept;\n{output}  }}\n}}\n"
        );
        nft(&self.namespace(node), &script)
    }

    /// Starts counting the bytes node `node` sends to the other nodes (IP packets, headers
    /// included; traffic to the host, i.e. to clients, is not counted), from zero. The counter
    /// lives in its own table (`inet mfxbytes`), so faults come and go without resetting it.
    pub fn count_sent(&self, node: usize) -> Result<(), String> {
        let subnet = format!("{}.{}.{}.0/24", PREFIX[0], PREFIX[1], self.subnet);
        let script = format!(
            "table inet {BYTES_TABLE}\ndelete table inet {BYTES_TABLE}\ntable inet {BYTES_TABLE} {{\n  \
             chain output {{\n    type filter hook output priority -10; policy accept;\n    \
             ip daddr {subnet} ip daddr != {} counter\n  }}\n}}\n",
            self.host_addr()
        );
        nft(&self.namespace(node), &script)
    }

    /// Bytes node `node` sent to the other nodes since [`Network::count_sent`].
    pub fn sent_bytes(&self, node: usize) -> Result<u64, String> {
        let namespace = self.namespace(node);
        let listing = output(
            "ip",
            &[
                "netns",
                "exec",
                &namespace,
                "nft",
                "list",
                "table",
                "inet",
                BYTES_TABLE,
            ],
        )?;
        // "... counter packets 12 bytes 3456"
        listing
            .split_once("counter packets")
            .and_then(|(_, rest)| rest.split_whitespace().nth(2))
            .and_then(|bytes| bytes.parse().ok())
            .ok_or_else(|| format!("no byte counter in {namespace}'s table:\n{listing}"))
    }

    /// Every namespace this network made (the nodes' and the hub's): deleting them all removes
    /// the network, the host link included.
    pub fn namespaces(&self) -> Vec<String> {
        let mut names: Vec<String> = (0..self.nodes).map(|node| self.namespace(node)).collect();
        names.push(self.hub());
        names
    }

    /// Removes every fault from every node.
    pub fn heal(&self) -> Result<(), String> {
        for node in 0..self.nodes {
            self.set_faults(node, &Faults::default())?;
        }
        Ok(())
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        for node in 0..self.nodes {
            remove_namespace(&self.namespace(node));
        }
        // Deleting the hub deletes the host link's peer, hence the host link.
        remove_namespace(&self.hub());
        let _ = quiet("ip", &["link", "del", &self.stem]);
    }
}

/// What building a [`Network`] needs from the machine (check with `requires::suite_can_run`).
pub const NEEDS: [Need; 3] = [
    Need::Root {
        why: "network namespaces and nftables need CAP_NET_ADMIN",
    },
    Need::Program {
        name: "ip",
        package: "iproute2",
    },
    Need::Program {
        name: "nft",
        package: "nftables",
    },
];

/// A third octet for `10.77.x.0/24` that no host route uses yet, starting from `hint`.
fn free_subnet(hint: u32) -> Result<u8, String> {
    let routes = output("ip", &["-4", "route", "show"])?;
    let candidates = (0..250).map(|step| ((hint + step) % 250 + 1) as u8);
    for subnet in candidates {
        let net = format!("{}.{}.{subnet}.", PREFIX[0], PREFIX[1]);
        if !routes.contains(&net) {
            return Ok(subnet);
        }
    }
    Err(format!(
        "every {}.{}.x.0/24 is routed already",
        PREFIX[0], PREFIX[1]
    ))
}

/// Removes namespaces and host links of earlier runs whose test process is gone.
fn remove_stale() {
    let namespaces = output("ip", &["netns", "list"]).unwrap_or_default();
    for name in namespaces
        .lines()
        .filter_map(|line| line.split_whitespace().next())
    {
        if stale(name) {
            remove_namespace(name);
        }
    }
    let links = output("ip", &["-o", "link", "show"]).unwrap_or_default();
    for line in links.lines() {
        // "7: mfx123r0@if6: <...>"
        let Some(name) = line.split(": ").nth(1) else {
            continue;
        };
        let name = name.split('@').next().unwrap_or(name);
        if stale(name) {
            let _ = quiet("ip", &["link", "del", name]);
        }
    }
}

/// Whether `name` is `mfx<pid>…` for a pid that no longer runs.
fn stale(name: &str) -> bool {
    let Some(rest) = name.strip_prefix("mfx") else {
        return false;
    };
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    match digits.parse::<u32>() {
        Ok(pid) => pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists(),
        Err(_) => false,
    }
}

/// Kills whatever still runs in namespace `name`, then deletes it.
fn remove_namespace(name: &str) {
    if let Ok(pids) = output("ip", &["netns", "pids", name]) {
        for pid in pids.split_whitespace() {
            let _ = quiet("kill", &["-KILL", pid]);
        }
    }
    let _ = quiet("ip", &["netns", "del", name]);
}

fn ip(args: &[&str]) -> Result<(), String> {
    output("ip", args).map(drop)
}

fn nft(namespace: &str, script: &str) -> Result<(), String> {
    let mut child = Command::new("ip")
        .args(["netns", "exec", namespace, "nft", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|err| format!("run nft: {err}"))?;
    child
        .stdin
        .take()
        .expect("stdin was piped")
        .write_all(script.as_bytes())
        .map_err(|err| format!("write the nft script: {err}"))?;
    let result = child
        .wait_with_output()
        .map_err(|err| format!("wait for nft: {err}"))?;
    if result.status.success() {
        Ok(())
    } else {
        Err(format!(
            "nft in {namespace} failed ({}): {}\nscript:\n{script}",
            result.status,
            String::from_utf8_lossy(&result.stderr)
        ))
    }
}

/// Runs `program args`, returning its stdout, or an error naming the command and its stderr.
fn output(program: &str, args: &[&str]) -> Result<String, String> {
    let result = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|err| format!("run {program}: {err}"))?;
    if result.status.success() {
        Ok(String::from_utf8_lossy(&result.stdout).into_owned())
    } else {
        Err(format!(
            "`{program} {}` failed ({}): {}",
            args.join(" "),
            result.status,
            String::from_utf8_lossy(&result.stderr).trim()
        ))
    }
}

/// Runs a cleanup command, ignoring its output.
fn quiet(program: &str, args: &[&str]) -> std::io::Result<()> {
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(drop)
}
