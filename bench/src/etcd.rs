//! A 3-member etcd cluster of real `etcd` processes on loopback, each with its own ports and
//! data directory under one scratch directory (on the same disk as mantissa's).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use etcd_client::Client;

use crate::agent::free_port;
use crate::cleanup;

/// How long the members get to elect a leader and answer.
const PATIENCE: Duration = Duration::from_secs(30);

/// Running etcd members; killed, and their directory removed, on drop.
pub struct EtcdCluster {
    /// `http://127.0.0.1:PORT` of each member's client API.
    pub endpoints: Vec<String>,
    children: Vec<Child>,
    /// Holds the data directories and the logs; removed on drop.
    dir: tempfile::TempDir,
}

impl EtcdCluster {
    /// Starts three members and waits until each answers a linearizable read (so a leader is
    /// elected).
    pub fn start(binary: &Path, runtime: &tokio::runtime::Handle) -> Result<EtcdCluster, String> {
        let dir = tempfile::Builder::new()
            .prefix("mantissa-bench-etcd-")
            .tempdir()
            .map_err(|err| format!("cannot create a scratch directory: {err}"))?;
        cleanup::register_dir(dir.path());
        let ports: Vec<_> = (0..3).map(|_| (free_port(), free_port())).collect();
        let initial_cluster = ports
            .iter()
            .enumerate()
            .map(|(i, (_, peer))| format!("e{}=http://{peer}", i + 1))
            .collect::<Vec<_>>()
            .join(",");
        let mut cluster = EtcdCluster {
            endpoints: ports
                .iter()
                .map(|(client, _)| format!("http://{client}"))
                .collect(),
            children: Vec::new(),
            dir,
        };
        for (i, (client, peer)) in ports.iter().enumerate() {
            let name = format!("e{}", i + 1);
            let log = fs::File::create(cluster.log_path(&name))
                .map_err(|err| format!("cannot create the etcd log: {err}"))?;
            let child = Command::new(binary)
                .args(["--name", &name])
                .arg("--data-dir")
                .arg(cluster.dir.path().join(&name))
                .args(["--listen-client-urls", &format!("http://{client}")])
                .args(["--advertise-client-urls", &format!("http://{client}")])
                .args(["--listen-peer-urls", &format!("http://{peer}")])
                .args(["--initial-advertise-peer-urls", &format!("http://{peer}")])
                .args(["--initial-cluster", &initial_cluster])
                .args(["--initial-cluster-state", "new"])
                .args([
                    "--initial-cluster-token",
                    &format!("mantissa-bench-{}", std::process::id()),
                ])
                .args(["--logger", "zap", "--log-level", "warn"])
                .stdin(Stdio::null())
                .stdout(log.try_clone().map_err(|err| err.to_string())?)
                .stderr(log)
                .spawn()
                .map_err(|err| format!("cannot start {}: {err}", binary.display()))?;
            cleanup::register_pid(child.id());
            cluster.children.push(child);
        }
        cluster.wait_ready(runtime)?;
        Ok(cluster)
    }

    /// The endpoint of the current leader, for the report.
    pub fn leader(&self, runtime: &tokio::runtime::Handle) -> Option<String> {
        runtime.block_on(async {
            for endpoint in &self.endpoints {
                let mut client = Client::connect([endpoint], None).await.ok()?;
                let status = client.status().await.ok()?;
                let me = status.header()?.member_id();
                if status.leader() == me {
                    return Some(endpoint.clone());
                }
            }
            None
        })
    }

    /// The members whose process has exited, with their logs.
    pub fn exited(&mut self) -> Vec<String> {
        let mut dead = Vec::new();
        for i in 0..self.children.len() {
            if let Ok(Some(status)) = self.children[i].try_wait() {
                let log =
                    fs::read_to_string(self.log_path(&format!("e{}", i + 1))).unwrap_or_default();
                dead.push(format!(
                    "etcd member e{} exited with {status} during the run:\n{log}",
                    i + 1
                ));
            }
        }
        dead
    }

    fn log_path(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.log"))
    }

    fn wait_ready(&mut self, runtime: &tokio::runtime::Handle) -> Result<(), String> {
        let deadline = Instant::now() + PATIENCE;
        for i in 0..self.endpoints.len() {
            loop {
                if let Some(status) = self.children[i].try_wait().map_err(|err| err.to_string())? {
                    return Err(format!(
                        "etcd member e{} exited with {status}:\n{}",
                        i + 1,
                        fs::read_to_string(self.log_path(&format!("e{}", i + 1)))
                            .unwrap_or_default()
                    ));
                }
                let endpoint = self.endpoints[i].clone();
                let answered = runtime.block_on(async move {
                    let attempt = async {
                        let mut client = Client::connect([endpoint], None).await?;
                        client.get("bench/ready", None).await
                    };
                    matches!(
                        tokio::time::timeout(Duration::from_secs(2), attempt).await,
                        Ok(Ok(_))
                    )
                });
                if answered {
                    break;
                }
                if Instant::now() >= deadline {
                    return Err(format!(
                        "etcd member e{} did not answer within {PATIENCE:?}",
                        i + 1
                    ));
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        Ok(())
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
            cleanup::unregister_pid(child.id());
        }
        cleanup::unregister_dir(self.dir.path());
        // The TempDir field removes the directory after this.
    }
}
