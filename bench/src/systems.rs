//! The three systems under test, and one client's connection to one member of each.
//!
//! Every client call is blocking, made from the client's own OS thread, so the load loop and its
//! timing are the same code for all three: mantissa agents through the harness's blocking
//! keep-alive HTTP/1.1 client, etcd through etcd-client (gRPC) and the embedded nodes through
//! their `Handle`, both driven with `block_on` on the shared tokio runtime.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use etcd_client::{Client, GetOptions, WatchOptions};
use mantissa::runtime::{ClusterCa, Handle, NodeConfig, StorageConfig, TlsConfig};
use serde_json::Value as Json;

use crate::agent::{self, HttpConnection, WatchStream};
use crate::cleanup;
use crate::etcd::EtcdCluster;

/// How long a token-waiting read may wait (mantissa's `wait=`, the embedded `wait_for`).
const AFTER_WAIT: Duration = Duration::from_secs(5);
/// How long a watcher waits for its next event before giving up on the stream.
const WATCH_PATIENCE: Duration = Duration::from_secs(30);

/// One system under test.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum System {
    /// etcd 3.4, three `etcd` processes, driven over gRPC.
    Etcd,
    /// Three `mantissa agent` processes, driven over HTTP.
    Agents,
    /// Three mantissa nodes in this process, driven through `Handle`.
    Embedded,
}

impl System {
    pub const ALL: [System; 3] = [System::Etcd, System::Agents, System::Embedded];

    pub fn name(self) -> &'static str {
        match self {
            System::Etcd => "etcd",
            System::Agents => "mantissa",
            System::Embedded => "embedded",
        }
    }
}

/// Everything that runs: three clusters of three members each, and the runtime the gRPC
/// clients and the embedded nodes share.
pub struct Deployment {
    pub runtime: tokio::runtime::Handle,
    /// The `mantissa` binary, for scenarios that start clusters of their own (scheduling).
    pub mantissa_bin: PathBuf,
    pub etcd: EtcdCluster,
    pub agents: agent::Cluster,
    pub embedded: Embedded,
}

/// The three in-process nodes, durable in a scratch directory.
pub struct Embedded {
    pub nodes: Vec<Handle>,
    dir: tempfile::TempDir,
}

/// What a write answers with, to pass to a token-waiting read.
pub enum Token {
    Http(String),
    Embedded(mantissa::crdt::Token),
}

/// How a read is made.
pub enum ReadMode {
    /// Whatever the member holds now: mantissa's plain read, etcd's serializable read.
    Local,
    /// etcd's default read, through the leader's read index; mantissa has none.
    Linearizable,
    /// No older than the write `Token` names: mantissa's `after=`/`wait_for`; for etcd (whose
    /// writes give no token) a linearizable read, which gives the same guarantee.
    After(Token),
}

/// One client's connection to one member.
#[allow(clippy::large_enum_variant)] // one per client thread: size does not matter
pub enum Connection {
    Etcd {
        client: Client,
        runtime: tokio::runtime::Handle,
    },
    Agent(HttpConnection),
    Embedded {
        node: Handle,
        runtime: tokio::runtime::Handle,
    },
}

/// One watch stream on one member, on keys under a prefix.
pub enum Watcher {
    Etcd {
        stream: etcd_client::WatchStream,
        /// Cancels the watch when dropped; kept so it lives as long as the stream.
        _watcher: etcd_client::Watcher,
        runtime: tokio::runtime::Handle,
    },
    Agent(WatchStream),
    Embedded {
        watch: mantissa::runtime::Watch,
        runtime: tokio::runtime::Handle,
    },
}

impl Deployment {
    /// Starts the three clusters: etcd, the agents (`mantissa tls init/issue`, durable data
    /// directories) and the embedded nodes.
    pub fn start(
        mantissa_bin: &Path,
        etcd_bin: &Path,
        runtime: tokio::runtime::Handle,
    ) -> Result<Deployment, String> {
        let etcd = EtcdCluster::start(etcd_bin, &runtime)?;
        let agents = agent::Cluster::start(mantissa_bin, "bench", 3);
        cleanup::register_dir(agents.root());
        for node in 0..agents.len() {
            if let Some(pid) = agents.pid(node) {
                cleanup::register_pid(pid);
            }
        }
        let embedded = runtime.block_on(Embedded::start())?;
        Ok(Deployment {
            runtime,
            mantissa_bin: mantissa_bin.to_path_buf(),
            etcd,
            agents,
            embedded,
        })
    }

    /// A new connection to member `node` (0, 1 or 2) of `system`.
    pub fn connect(&self, system: System, node: usize) -> Result<Connection, String> {
        let runtime = self.runtime.clone();
        Ok(match system {
            System::Etcd => {
                let endpoint = self.etcd.endpoints[node].clone();
                let client = runtime
                    .block_on(Client::connect([endpoint], None))
                    .map_err(|err| format!("etcd connect: {err}"))?;
                Connection::Etcd { client, runtime }
            }
            System::Agents => Connection::Agent(HttpConnection::new(self.agents.agent(node).http)),
            System::Embedded => Connection::Embedded {
                node: self.embedded.nodes[node].clone(),
                runtime,
            },
        })
    }

    /// A watch on member `node` of `system`, open (subscribed) when this returns.
    pub fn watch(&self, system: System, node: usize, prefix: &str) -> Result<Watcher, String> {
        let runtime = self.runtime.clone();
        Ok(match system {
            System::Etcd => {
                let endpoint = self.etcd.endpoints[node].clone();
                let prefix = prefix.to_owned();
                let (watcher, stream) = runtime
                    .block_on(async move {
                        let mut client = Client::connect([endpoint], None).await?;
                        client
                            .watch(prefix, Some(WatchOptions::new().with_prefix()))
                            .await
                    })
                    .map_err(|err| format!("etcd watch: {err}"))?;
                Watcher::Etcd {
                    stream,
                    _watcher: watcher,
                    runtime,
                }
            }
            System::Agents => {
                let path = format!("/v1/watch?prefix={}", agent::encode_query(prefix));
                let stream = WatchStream::open(self.agents.agent(node).http, &path)
                    .map_err(|err| format!("mantissa watch: {err}"))?;
                Watcher::Agent(stream)
            }
            System::Embedded => {
                let node = self.embedded.nodes[node].clone();
                let watch = runtime
                    .block_on(node.watch(prefix, None))
                    .map_err(|err| format!("embedded watch: {err}"))?;
                Watcher::Embedded { watch, runtime }
            }
        })
    }

    /// Stops the embedded nodes (the other clusters stop when dropped).
    pub fn shutdown(&self) {
        for node in &self.embedded.nodes {
            let _ = self.runtime.block_on(node.shutdown());
        }
    }
}

impl Embedded {
    async fn start() -> Result<Embedded, String> {
        let dir = tempfile::Builder::new()
            .prefix("mantissa-bench-embedded-")
            .tempdir()
            .map_err(|err| format!("cannot create a scratch directory: {err}"))?;
        cleanup::register_dir(dir.path());
        let ca = ClusterCa::generate("bench").map_err(|err| format!("embedded CA: {err}"))?;
        let mut nodes: Vec<Handle> = Vec::new();
        for i in 0..3 {
            let name = format!("embedded-{i}");
            let credentials = ca
                .issue(&name, Duration::from_secs(24 * 3600))
                .map_err(|err| format!("embedded certificate: {err}"))?;
            let tls = TlsConfig::new(ca.cert_pem(), &credentials)
                .map_err(|err| format!("embedded TLS: {err}"))?;
            let seeds = nodes
                .first()
                .map(|first| vec![first.addr()])
                .unwrap_or_default();
            let bind: SocketAddr = "127.0.0.1:0".parse().expect("a literal address");
            let mut config = NodeConfig::new(bind, tls, seeds);
            config.storage = Some(StorageConfig::new(dir.path().join(&name)));
            let node = mantissa::runtime::start(config)
                .await
                .map_err(|err| format!("embedded node {name}: {err}"))?;
            nodes.push(node);
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        for node in &nodes {
            while node.members().await.map_err(|err| err.to_string())?.len() < 2 {
                if Instant::now() >= deadline {
                    return Err(format!(
                        "embedded node {} did not see its 2 peers",
                        node.name()
                    ));
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Ok(Embedded { nodes, dir })
    }
}

impl Drop for Embedded {
    fn drop(&mut self) {
        cleanup::unregister_dir(self.dir.path());
    }
}

impl Connection {
    /// Writes `value` at `key`; the write's token when the system gives one.
    pub fn put(&mut self, key: &str, value: &[u8]) -> Result<Option<Token>, String> {
        match self {
            Connection::Etcd { client, runtime } => runtime
                .block_on(client.put(key, value, None))
                .map(|_| None)
                .map_err(|err| format!("etcd put: {err}")),
            Connection::Agent(connection) => {
                let path = format!("/v1/kv/{}", agent::encode_path(key));
                let response = connection
                    .request("PUT", &path, value)
                    .map_err(|err| format!("PUT: {err}"))?;
                if response.status != 200 {
                    return Err(format!("PUT: {} {}", response.status, response.text()));
                }
                let json: Json = serde_json::from_slice(&response.body)
                    .map_err(|err| format!("PUT answer: {err}"))?;
                Ok(json["token"]
                    .as_str()
                    .map(|token| Token::Http(token.to_owned())))
            }
            Connection::Embedded { node, runtime } => runtime
                .block_on(node.put(key, value.to_vec()))
                .map(|token| Some(Token::Embedded(token)))
                .map_err(|err| format!("embedded put: {err}")),
        }
    }

    /// Reads `key`: whether the member returned a value.
    pub fn get(&mut self, key: &str, mode: &ReadMode) -> Result<bool, String> {
        match self {
            Connection::Etcd { client, runtime } => {
                let options = match mode {
                    ReadMode::Local => Some(GetOptions::new().with_serializable()),
                    ReadMode::Linearizable | ReadMode::After(_) => None,
                };
                runtime
                    .block_on(client.get(key, options))
                    .map(|response| !response.kvs().is_empty())
                    .map_err(|err| format!("etcd get: {err}"))
            }
            Connection::Agent(connection) => {
                let mut path = format!("/v1/kv/{}", agent::encode_path(key));
                if let ReadMode::After(Token::Http(token)) = mode {
                    path.push_str(&format!(
                        "?after={}&wait={}ms",
                        agent::encode_query(token),
                        AFTER_WAIT.as_millis()
                    ));
                }
                let response = connection
                    .request("GET", &path, b"")
                    .map_err(|err| format!("GET: {err}"))?;
                match response.status {
                    200 => Ok(true),
                    404 => Ok(false),
                    status => Err(format!("GET: {status} {}", response.text())),
                }
            }
            Connection::Embedded { node, runtime } => runtime.block_on(async {
                if let ReadMode::After(Token::Embedded(token)) = mode {
                    node.wait_for(token, AFTER_WAIT)
                        .await
                        .map_err(|err| format!("embedded wait_for: {err}"))?;
                }
                node.get(key)
                    .await
                    .map(|value| value.is_some())
                    .map_err(|err| format!("embedded get: {err}"))
            }),
        }
    }
}

impl Watcher {
    /// The keys of the next events to arrive (one or more), as soon as they arrive.
    pub fn next_keys(&mut self) -> Result<Vec<String>, String> {
        match self {
            Watcher::Etcd {
                stream, runtime, ..
            } => {
                let message = runtime.block_on(async {
                    tokio::time::timeout(WATCH_PATIENCE, stream.message()).await
                });
                match message {
                    Ok(Ok(Some(response))) => Ok(response
                        .events()
                        .iter()
                        .filter_map(|event| event.kv())
                        .map(|kv| String::from_utf8_lossy(kv.key()).into_owned())
                        .collect()),
                    Ok(Ok(None)) => Err("etcd watch ended".to_owned()),
                    Ok(Err(err)) => Err(format!("etcd watch: {err}")),
                    Err(_) => Err(format!("no etcd watch event within {WATCH_PATIENCE:?}")),
                }
            }
            Watcher::Agent(stream) => {
                // Panics (caught by the thread's join) when the deadline passes.
                match stream.next_event(Instant::now() + WATCH_PATIENCE) {
                    Some(event) => Ok(event["key"]
                        .as_str()
                        .map(str::to_owned)
                        .into_iter()
                        .collect()),
                    None => Err("mantissa watch ended".to_owned()),
                }
            }
            Watcher::Embedded { watch, runtime } => {
                match runtime
                    .block_on(async { tokio::time::timeout(WATCH_PATIENCE, watch.next()).await })
                {
                    Ok(Some(Ok(event))) => Ok(vec![event.key.to_string()]),
                    Ok(Some(Err(err))) => Err(format!("embedded watch: {err}")),
                    Ok(None) => Err("embedded watch ended".to_owned()),
                    Err(_) => Err(format!("no embedded watch event within {WATCH_PATIENCE:?}")),
                }
            }
        }
    }
}
