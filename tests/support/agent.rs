//! A harness for end-to-end tests with real `mantissa` processes: certificates made by
//! `mantissa tls`, agents on loopback ports in a scratch directory, and a small blocking HTTP/1.1
//! client (Content-Length and chunked bodies, keep-alive, streamed watches).
//!
//! A [`Cluster`] kills its processes and removes its directory when dropped; when the test is
//! panicking it first prints the tail of every agent's log, so a failure shows what the agents
//! said. Set `MANTISSA_E2E_KEEP=1` to keep the directory (its path is printed).
//!
//! The binary's path is a parameter, so the same harness serves the integration tests
//! (`env!("CARGO_BIN_EXE_mantissa")`) and the `http_cluster` bench.

#![allow(dead_code)] // each test binary uses a different subset

use std::collections::HashSet;
use std::fmt::Write as _;
use std::fs;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value as Json;

/// How long an agent gets to answer, a cluster to form, a write to arrive, a process to exit:
/// generous, because test machines are shared and slow.
pub const PATIENCE: Duration = Duration::from_secs(30);
/// What a read with `after=` asks the server to wait for the token (its own cap is 60 s).
pub const READ_WAIT: &str = "30s";
/// Lines of each log printed when a test fails.
const LOG_TAIL_LINES: usize = 60;

/// A scratch directory of agents sharing one cluster CA, each a child process.
pub struct Cluster {
    binary: PathBuf,
    root: PathBuf,
    /// The cluster CA's directory (`ca.pem`, `ca-key.pem`, and every node's certificate).
    ca: PathBuf,
    agents: Vec<Agent>,
    /// CLI runs so far, to give each its own output files.
    runs: usize,
}

/// One agent: where it listens, what it is started with, and its process when running.
pub struct Agent {
    /// The node's name, also its certificate's name.
    pub name: String,
    /// The HTTP API's address.
    pub http: SocketAddr,
    /// The QUIC gossip endpoint's address.
    pub gossip: SocketAddr,
    /// `--data-dir`, when the node is durable.
    pub data_dir: Option<PathBuf>,
    /// The directory holding `ca.pem`, `<name>.pem` and `<name>-key.pem`.
    pub tls_dir: PathBuf,
    /// Gossip addresses passed as `--join`.
    pub join: Vec<SocketAddr>,
    /// Further flags for the next starts (e.g. `--discard-corrupt-data`).
    pub extra_args: Vec<String>,
    child: Option<Child>,
    /// Starts so far; each start logs to its own pair of files.
    starts: usize,
}

/// How to add a node to a [`Cluster`].
#[derive(Clone, Debug)]
pub struct NodeSpec {
    /// Keep the replica in a data directory.
    pub durable: bool,
    /// The CA directory to issue the certificate from; `None` is the cluster's CA.
    pub ca: Option<PathBuf>,
    /// Gossip addresses to join through; `None` joins through every node added before.
    pub join: Option<Vec<SocketAddr>>,
    /// Further agent flags.
    pub extra_args: Vec<String>,
}

/// How a start ended.
enum Started {
    /// The node answers `/v1/health`.
    Yes,
    /// The process exited first.
    Exited(ExitStatus),
}

/// An HTTP response, body read whole.
#[derive(Clone, Debug)]
pub struct Response {
    pub status: u16,
    /// Header names in lower case.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// A keep-alive HTTP/1.1 connection that reconnects after an error or a `Connection: close`.
pub struct HttpConnection {
    addr: SocketAddr,
    reader: Option<BufReader<TcpStream>>,
    /// The request being written, kept to reuse its allocation.
    request: Vec<u8>,
}

/// An open `GET /v1/watch` stream, read one NDJSON line at a time.
pub struct WatchStream {
    reader: BufReader<TcpStream>,
    chunked: bool,
    pending: Vec<u8>,
    ended: bool,
}

impl Cluster {
    /// An empty cluster: a scratch directory and a CA made with `mantissa tls init`.
    /// `label` names the directory, to tell tests apart.
    pub fn new(binary: impl Into<PathBuf>, label: &str) -> Cluster {
        let binary = binary.into();
        assert!(
            binary.is_file(),
            "the mantissa binary is missing at {}",
            binary.display()
        );
        let root = scratch_dir(label);
        let mut cluster = Cluster {
            binary,
            ca: root.join("ca"),
            root,
            agents: Vec::new(),
            runs: 0,
        };
        let ca = cluster.ca.clone();
        cluster.init_ca(&ca);
        cluster
    }

    /// A cluster of `n` durable nodes that all see each other.
    pub fn start(binary: impl Into<PathBuf>, label: &str, n: usize) -> Cluster {
        let mut cluster = Cluster::new(binary, label);
        for _ in 0..n {
            cluster.add_node(NodeSpec::default());
        }
        cluster.wait_formed();
        cluster
    }

    /// The scratch directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The cluster CA's directory.
    pub fn ca_dir(&self) -> &Path {
        &self.ca
    }

    pub fn agent(&self, node: usize) -> &Agent {
        &self.agents[node]
    }

    pub fn agent_mut(&mut self, node: usize) -> &mut Agent {
        &mut self.agents[node]
    }

    pub fn len(&self) -> usize {
        self.agents.len()
    }

    /// Runs `mantissa tls init --dir DIR`, a new CA.
    pub fn init_ca(&mut self, dir: &Path) {
        let dir = dir.display().to_string();
        self.run_ok(&["tls", "init", "--dir", &dir]);
    }

    /// Runs `mantissa tls issue --dir DIR --node NAME`.
    pub fn issue(&mut self, ca_dir: &Path, name: &str) {
        let dir = ca_dir.display().to_string();
        self.run_ok(&["tls", "issue", "--dir", &dir, "--node", name]);
    }

    /// Adds a node named `node-<i>` (certificate, ports, data directory) and starts it, waiting
    /// until it answers `/v1/health`. Returns its index.
    pub fn add_node(&mut self, spec: NodeSpec) -> usize {
        let node = self.agents.len();
        let name = format!("node-{node}");
        let tls_dir = spec.ca.unwrap_or_else(|| self.ca.clone());
        self.issue(&tls_dir, &name);
        let join = spec
            .join
            .unwrap_or_else(|| self.agents.iter().map(|agent| agent.gossip).collect());
        let data_dir = spec.durable.then(|| self.root.join(&name).join("data"));
        self.agents.push(Agent {
            http: free_port(),
            gossip: free_port(),
            name,
            data_dir,
            tls_dir,
            join,
            extra_args: spec.extra_args,
            child: None,
            starts: 0,
        });
        // Another process may take a port between `free_port` and the agent's bind: a first
        // start may then move to fresh ports (a restart may not: peers know its address).
        for _ in 0..3 {
            self.spawn(node);
            match self.wait_started(node) {
                Started::Yes => return node,
                Started::Exited(_) if self.last_stderr(node).contains("in use") => {
                    self.agents[node].http = free_port();
                    self.agents[node].gossip = free_port();
                }
                Started::Exited(status) => self.fail_to_start(node, status),
            }
        }
        panic!(
            "{} found its ports taken three times",
            self.agents[node].name
        );
    }

    /// Starts a stopped node and waits until it answers `/v1/health`.
    pub fn start_node(&mut self, node: usize) {
        self.spawn(node);
        self.wait_healthy(node);
    }

    /// Starts the node's process without waiting for it.
    pub fn spawn(&mut self, node: usize) {
        let binary = self.binary.clone();
        let logs = self.root.join("logs");
        fs::create_dir_all(&logs).expect("create the log directory");
        let agent = &mut self.agents[node];
        assert!(agent.child.is_none(), "{} is already running", agent.name);
        agent.starts += 1;
        let (stdout, stderr) = agent.log_files(&logs, agent.starts);
        let mut command = Command::new(binary);
        command
            .args(agent.args())
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(fs::File::create(stdout).expect("create the stdout log"))
            .stderr(fs::File::create(stderr).expect("create the stderr log"));
        agent.child = Some(command.spawn().expect("spawn mantissa agent"));
    }

    /// Waits until the node answers `GET /v1/health` with 200; panics (with its log) if the
    /// process exits first or the deadline passes.
    pub fn wait_healthy(&mut self, node: usize) {
        if let Started::Exited(status) = self.wait_started(node) {
            self.fail_to_start(node, status);
        }
    }

    /// Waits until the node answers `GET /v1/health` with 200 or its process exits; panics
    /// after [`PATIENCE`].
    fn wait_started(&mut self, node: usize) -> Started {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(status) = self.try_exit_status(node) {
                return Started::Exited(status);
            }
            if self.answers_health(node) {
                return Started::Yes;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not answer /v1/health within {PATIENCE:?}",
                self.agents[node].name
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn fail_to_start(&self, node: usize, status: ExitStatus) -> ! {
        panic!(
            "{} exited with {status} instead of starting:\n{}",
            self.agents[node].name,
            self.log_tail(node)
        );
    }

    /// Whether the node answers `GET /v1/health` with 200 right now.
    pub fn answers_health(&self, node: usize) -> bool {
        request_once(self.agents[node].http, "GET", "/v1/health", b"")
            .is_ok_and(|response| response.status == 200)
    }

    /// The names `/v1/members` of `node` lists (itself included).
    pub fn members(&self, node: usize) -> Vec<String> {
        let json = self.get_json(node, "/v1/members");
        member_names(&json)
    }

    /// Waits until `/v1/members` of `node` lists every name in `names`.
    pub fn wait_members(&self, node: usize, names: &[&str]) {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let members = self.members(node);
            if names.iter().all(|name| members.iter().any(|m| m == name)) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{} lists members {members:?} after {PATIENCE:?}, expected {names:?}",
                self.agents[node].name
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until every running node lists every running node.
    pub fn wait_formed(&self) {
        let running: Vec<usize> = (0..self.agents.len())
            .filter(|&node| self.agents[node].child.is_some())
            .collect();
        let names: Vec<&str> = running
            .iter()
            .map(|&node| self.agents[node].name.as_str())
            .collect();
        for &node in &running {
            self.wait_members(node, &names);
        }
    }

    /// Sends SIGTERM and waits for the process to exit; returns its status.
    pub fn sigterm(&mut self, node: usize) -> ExitStatus {
        let pid = self.running(node).id().to_string();
        let sent = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("run kill");
        assert!(sent.success(), "kill -TERM {pid} failed");
        match self.wait_exit(node, PATIENCE) {
            Some(status) => status,
            None => panic!(
                "{} did not exit within {PATIENCE:?} of SIGTERM:\n{}",
                self.agents[node].name,
                self.log_tail(node)
            ),
        }
    }

    /// Sends SIGTERM and asserts a clean exit (status 0).
    pub fn stop(&mut self, node: usize) {
        let status = self.sigterm(node);
        assert!(
            status.success(),
            "{} exited with {status} after SIGTERM:\n{}",
            self.agents[node].name,
            self.log_tail(node)
        );
    }

    /// Kills the process with SIGKILL and reaps it.
    pub fn kill_9(&mut self, node: usize) {
        let mut child = self.agents[node].child.take().expect("the node is running");
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Stops the node cleanly if it runs, then starts it again and waits until it answers.
    pub fn restart(&mut self, node: usize) {
        if self.agents[node].child.is_some() {
            self.stop(node);
        }
        self.start_node(node);
    }

    /// Waits up to `patience` for the process to exit; `None` if it still runs.
    pub fn wait_exit(&mut self, node: usize, patience: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + patience;
        loop {
            if let Some(status) = self.try_exit_status(node) {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The node's process id, when it runs.
    pub fn pid(&self, node: usize) -> Option<u32> {
        self.agents[node].child.as_ref().map(Child::id)
    }

    /// Whether the node's process runs (reaping it if it has exited).
    pub fn is_running(&mut self, node: usize) -> bool {
        self.agents[node].child.is_some() && self.try_exit_status(node).is_none()
    }

    fn try_exit_status(&mut self, node: usize) -> Option<ExitStatus> {
        let agent = &mut self.agents[node];
        let child = agent.child.as_mut()?;
        match child.try_wait().expect("poll the agent process") {
            Some(status) => {
                agent.child = None;
                Some(status)
            }
            None => None,
        }
    }

    fn running(&mut self, node: usize) -> &mut Child {
        let agent = &mut self.agents[node];
        let name = agent.name.clone();
        agent
            .child
            .as_mut()
            .unwrap_or_else(|| panic!("{name} is not running"))
    }

    /// What the node's process wrote to stderr in its latest start.
    pub fn last_stderr(&self, node: usize) -> String {
        let agent = &self.agents[node];
        let (_, stderr) = agent.log_files(&self.root.join("logs"), agent.starts);
        fs::read_to_string(stderr).unwrap_or_default()
    }

    /// Everything the node wrote to stdout and stderr, over all its starts.
    pub fn logs(&self, node: usize) -> String {
        let agent = &self.agents[node];
        let mut text = String::new();
        for start in 1..=agent.starts {
            for path in <[PathBuf; 2]>::from(agent.log_files(&self.root.join("logs"), start)) {
                text.push_str(&fs::read_to_string(path).unwrap_or_default());
            }
        }
        text
    }

    /// The last lines each start of the node wrote, labelled.
    pub fn log_tail(&self, node: usize) -> String {
        let agent = &self.agents[node];
        let mut text = String::new();
        for start in 1..=agent.starts {
            for path in <[PathBuf; 2]>::from(agent.log_files(&self.root.join("logs"), start)) {
                append_tail(&mut text, &path);
            }
        }
        text
    }

    /// One request on a fresh connection.
    pub fn http(&self, node: usize, method: &str, path: &str, body: &[u8]) -> Response {
        let agent = &self.agents[node];
        request_once(agent.http, method, path, body).unwrap_or_else(|err| {
            panic!("{method} {path} on {}: {err}", agent.name);
        })
    }

    /// `GET path`, which must answer 200 with JSON.
    pub fn get_json(&self, node: usize, path: &str) -> Json {
        let response = self.http(node, "GET", path, b"");
        assert_eq!(
            response.status,
            200,
            "GET {path} on {}: {}",
            self.agents[node].name,
            response.text()
        );
        response.json()
    }

    /// A write (`PUT`, `POST`, `PATCH`, `DELETE`) that must answer 200; returns its token.
    pub fn write(&self, node: usize, method: &str, path: &str, body: &[u8]) -> String {
        let response = self.http(node, method, path, body);
        assert_eq!(
            response.status,
            200,
            "{method} {path} on {}: {}",
            self.agents[node].name,
            response.text()
        );
        token_of(&response.json())
    }

    /// `PUT /v1/kv/{key}`; returns the write's token.
    pub fn put(&self, node: usize, key: &str, value: &str) -> String {
        self.write(
            node,
            "PUT",
            &format!("/v1/kv/{}", encode_path(key)),
            value.as_bytes(),
        )
    }

    /// `GET /v1/kv/{key}`, with `after=` (waiting up to [`READ_WAIT`]) when a token is given.
    /// `None` for 404; panics on any other failure.
    pub fn get(&self, node: usize, key: &str, after: Option<&str>) -> Option<Json> {
        self.read(node, &format!("/v1/kv/{}", encode_path(key)), after)
    }

    /// `GET path`, with `after=` when a token is given: `None` for 404.
    pub fn read(&self, node: usize, path: &str, after: Option<&str>) -> Option<Json> {
        let path = match after {
            Some(token) => format!("{path}?after={}&wait={READ_WAIT}", encode_query(token)),
            None => path.to_owned(),
        };
        let response = self.http(node, "GET", &path, b"");
        match response.status {
            200 => Some(response.json()),
            404 => None,
            status => panic!(
                "GET {path} on {}: {status} {}",
                self.agents[node].name,
                response.text()
            ),
        }
    }

    /// Opens `GET path` (a `/v1/watch?…`) as a stream.
    pub fn watch(&self, node: usize, path: &str) -> WatchStream {
        WatchStream::open(self.agents[node].http, path)
            .unwrap_or_else(|err| panic!("watch {path} on {}: {err}", self.agents[node].name))
    }

    /// `http://127.0.0.1:PORT` of the node's API.
    pub fn url(&self, node: usize) -> String {
        format!("http://{}", self.agents[node].http)
    }

    /// Runs the mantissa binary with `args` (a CLI command) and returns its output; panics if
    /// it does not exit within [`PATIENCE`].
    pub fn run(&mut self, args: &[&str]) -> Output {
        self.runs += 1;
        let dir = self.root.join("runs");
        fs::create_dir_all(&dir).expect("create the runs directory");
        let stdout = dir.join(format!("{}.out", self.runs));
        let stderr = dir.join(format!("{}.err", self.runs));
        let mut child = Command::new(&self.binary)
            .args(args)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(fs::File::create(&stdout).expect("create stdout file"))
            .stderr(fs::File::create(&stderr).expect("create stderr file"))
            .spawn()
            .expect("spawn mantissa");
        let deadline = Instant::now() + PATIENCE;
        let status = loop {
            if let Some(status) = child.try_wait().expect("poll mantissa") {
                break status;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("mantissa {args:?} did not exit within {PATIENCE:?}");
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        Output {
            status,
            stdout: fs::read(stdout).unwrap_or_default(),
            stderr: fs::read(stderr).unwrap_or_default(),
        }
    }

    /// Runs the binary with `args`, which must succeed.
    pub fn run_ok(&mut self, args: &[&str]) -> Output {
        let output = self.run(args);
        assert!(
            output.status.success(),
            "mantissa {args:?} exited with {}:\n{}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        output
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let failed = std::thread::panicking();
        for agent in &mut self.agents {
            if let Some(mut child) = agent.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        if failed {
            let mut text = format!(
                "===== agent logs (scratch directory {})\n",
                self.root.display()
            );
            for node in 0..self.agents.len() {
                text.push_str(&self.log_tail(node));
            }
            eprintln!("{text}");
        }
        if std::env::var_os("MANTISSA_E2E_KEEP").is_some() {
            eprintln!("keeping {}", self.root.display());
        } else {
            let _ = fs::remove_dir_all(&self.root);
        }
    }
}

impl Agent {
    /// The `mantissa agent …` arguments.
    fn args(&self) -> Vec<String> {
        let tls = |file: String| self.tls_dir.join(file).display().to_string();
        let mut args = vec![
            "agent".to_owned(),
            "--node-id".to_owned(),
            self.name.clone(),
            "--bind".to_owned(),
            self.gossip.to_string(),
            "--http".to_owned(),
            self.http.to_string(),
            "--tls-ca".to_owned(),
            tls("ca.pem".to_owned()),
            "--tls-cert".to_owned(),
            tls(format!("{}.pem", self.name)),
            "--tls-key".to_owned(),
            tls(format!("{}-key.pem", self.name)),
        ];
        if let Some(dir) = &self.data_dir {
            args.push("--data-dir".to_owned());
            args.push(dir.display().to_string());
        }
        for seed in &self.join {
            args.push("--join".to_owned());
            args.push(seed.to_string());
        }
        args.extend(self.extra_args.iter().cloned());
        args
    }

    /// The data file, `<data dir>/mantissa.redb`.
    pub fn data_file(&self) -> PathBuf {
        self.data_dir
            .as_ref()
            .expect("the node has a data directory")
            .join("mantissa.redb")
    }

    /// The stdout and stderr files of start number `start`.
    fn log_files(&self, logs: &Path, start: usize) -> (PathBuf, PathBuf) {
        (
            logs.join(format!("{}.{start}.stdout", self.name)),
            logs.join(format!("{}.{start}.stderr", self.name)),
        )
    }
}

impl Response {
    /// The body as JSON; panics (showing the body) if it is not.
    pub fn json(&self) -> Json {
        serde_json::from_slice(&self.body).unwrap_or_else(|err| {
            panic!(
                "status {} with a body that is not JSON ({err}): {}",
                self.status,
                self.text()
            )
        })
    }

    /// The body as text (lossy), for messages.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// A header's value; `name` in lower case.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(candidate, _)| candidate == name)
            .map(|(_, value)| value.as_str())
    }
}

impl HttpConnection {
    /// A connection to `addr`, opened on the first request.
    pub fn new(addr: SocketAddr) -> HttpConnection {
        HttpConnection {
            addr,
            reader: None,
            request: Vec::with_capacity(512),
        }
    }

    /// Sends one request and reads the whole response. After an error the connection is closed
    /// (the next request opens a new one); the request may or may not have been applied.
    pub fn request(&mut self, method: &str, path: &str, body: &[u8]) -> io::Result<Response> {
        let result = self.exchange(method, path, body);
        match &result {
            Ok(response) if !closes(&response.headers) => {}
            _ => self.reader = None,
        }
        result
    }

    fn exchange(&mut self, method: &str, path: &str, body: &[u8]) -> io::Result<Response> {
        if self.reader.is_none() {
            self.reader = Some(BufReader::new(connect(self.addr)?));
        }
        let reader = self.reader.as_mut().expect("connected just above");
        self.request.clear();
        write_head(
            &mut self.request,
            method,
            path,
            self.addr,
            body.len(),
            false,
        );
        // Small bodies go in the same write as the head: one segment, no delayed-ACK stall.
        let inline = body.len() <= 64 * 1024;
        if inline {
            self.request.extend_from_slice(body);
        }
        let sent = reader
            .get_mut()
            .write_all(&self.request)
            .and_then(|()| match inline {
                true => Ok(()),
                false => reader.get_mut().write_all(body),
            });
        // A server may answer (413, say) and close before reading a large body: the answer is
        // still worth reading.
        match (read_response(reader, method), sent) {
            (Ok(response), _) => Ok(response),
            (Err(_), Err(write_error)) => Err(write_error),
            (Err(read_error), Ok(())) => Err(read_error),
        }
    }
}

impl WatchStream {
    /// Sends `GET path` and reads the response head; fails unless the status is 200.
    pub fn open(addr: SocketAddr, path: &str) -> io::Result<WatchStream> {
        let stream = connect(addr)?;
        let mut head = Vec::new();
        write_head(&mut head, "GET", path, addr, 0, true);
        let mut reader = BufReader::new(stream);
        reader.get_mut().write_all(&head)?;
        let (status, headers) = read_head(&mut reader)?;
        if status != 200 {
            let body = read_body(&mut reader, status, &headers, "GET", false).unwrap_or_default();
            return Err(io::Error::other(format!(
                "status {status}: {}",
                String::from_utf8_lossy(&body)
            )));
        }
        let chunked = is_chunked(&headers);
        Ok(WatchStream {
            reader,
            chunked,
            pending: Vec::new(),
            ended: false,
        })
    }

    /// The next non-empty line as JSON, waiting until `deadline`; `None` when the stream ended.
    /// Panics when the deadline passes.
    pub fn next_line(&mut self, deadline: Instant) -> Option<Json> {
        loop {
            if let Some(end) = self.pending.iter().position(|&byte| byte == b'\n') {
                let line: Vec<u8> = self.pending.drain(..=end).collect();
                let line = String::from_utf8_lossy(&line);
                let line = line.trim();
                if line.is_empty() {
                    continue;
                }
                let json = serde_json::from_str(line)
                    .unwrap_or_else(|err| panic!("watch line is not JSON ({err}): {line}"));
                return Some(json);
            }
            if self.ended {
                return None;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "no watch line before the deadline");
            self.reader
                .get_mut()
                .set_read_timeout(Some(left))
                .expect("set a read timeout");
            match self.fill() {
                Ok(()) => {}
                Err(err) if is_timeout(&err) => panic!("no watch line before the deadline"),
                Err(err) => panic!("watch stream failed: {err}"),
            }
        }
    }

    /// The next event line (`"cursor"` and `"kind"`), skipping heartbeats; `None` at the end.
    pub fn next_event(&mut self, deadline: Instant) -> Option<Json> {
        loop {
            let line = self.next_line(deadline)?;
            if line.get("kind").is_some() {
                return Some(line);
            }
            assert!(
                line.get("heartbeat").is_some(),
                "watch line is neither an event nor a heartbeat: {line}"
            );
        }
    }

    /// Reads the next piece of the body into `pending`.
    fn fill(&mut self) -> io::Result<()> {
        if !self.chunked {
            let mut buffer = [0u8; 8192];
            let read = self.reader.read(&mut buffer)?;
            self.ended = read == 0;
            self.pending.extend_from_slice(&buffer[..read]);
            return Ok(());
        }
        let size = read_chunk_size(&mut self.reader)?;
        if size == 0 {
            skip_trailers(&mut self.reader)?;
            self.ended = true;
            return Ok(());
        }
        let start = self.pending.len();
        self.pending.resize(start + size, 0);
        self.reader.read_exact(&mut self.pending[start..])?;
        expect_crlf(&mut self.reader)
    }
}

impl Default for NodeSpec {
    fn default() -> Self {
        NodeSpec {
            durable: true,
            ca: None,
            join: None,
            extra_args: Vec::new(),
        }
    }
}

/// The token of a write's (or read's) answer.
pub fn token_of(json: &Json) -> String {
    json["token"]
        .as_str()
        .unwrap_or_else(|| panic!("no token in {json}"))
        .to_owned()
}

/// The names in a `/v1/members` answer.
pub fn member_names(json: &Json) -> Vec<String> {
    json["members"]
        .as_array()
        .unwrap_or_else(|| panic!("no members array in {json}"))
        .iter()
        .filter_map(|member| member["name"].as_str().map(str::to_owned))
        .collect()
}

/// One request on a new connection, closed afterwards.
pub fn request_once(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &[u8],
) -> io::Result<Response> {
    HttpConnection::new(addr).request(method, path, body)
}

/// Percent-encodes a key for a path, keeping its slashes.
pub fn encode_path(key: &str) -> String {
    encode(key, b"-._~/")
}

/// Percent-encodes a query parameter's value.
pub fn encode_query(value: &str) -> String {
    encode(value, b"-._~")
}

fn encode(text: &str, keep: &[u8]) -> String {
    let mut encoded = String::with_capacity(text.len());
    for &byte in text.as_bytes() {
        if byte.is_ascii_alphanumeric() || keep.contains(&byte) {
            encoded.push(byte as char);
        } else {
            let _ = write!(encoded, "%{byte:02X}");
        }
    }
    encoded
}

/// Polls `probe` every `every` until it gives a value; panics with `what` after `patience`.
pub fn eventually<T>(
    what: &str,
    patience: Duration,
    every: Duration,
    mut probe: impl FnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + patience;
    loop {
        if let Some(value) = probe() {
            return value;
        }
        assert!(Instant::now() < deadline, "{what}: not within {patience:?}");
        std::thread::sleep(every);
    }
}

/// A fresh directory under the system temp dir, unique per process and call.
fn scratch_dir(label: &str) -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.subsec_nanos());
    let dir = std::env::temp_dir().join(format!(
        "mantissa-e2e-{label}-{}-{}-{nanos}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    fs::create_dir_all(&dir).expect("create the scratch directory");
    dir
}

/// A loopback address whose port is free for both TCP and UDP right now.
///
/// Ports come from 20000..32000, below Linux's ephemeral range (32768..), so the kernel does not
/// hand them to outgoing connections while an agent is down between restarts; a process-wide set
/// keeps this process from using one twice. Another process may still take one between this
/// check and the agent's bind: a small race, accepted.
pub fn free_port() -> SocketAddr {
    static TAKEN: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
    static SEED: AtomicU64 = AtomicU64::new(0);
    let mut taken = TAKEN
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let taken = taken.get_or_insert_with(HashSet::new);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_nanos() as u64);
    let mut state = (nanos ^ (u64::from(std::process::id()) << 32))
        .wrapping_add(SEED.fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed))
        | 1;
    for _ in 0..10_000 {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let port = 20_000 + (state % 12_000) as u16;
        if taken.contains(&port) {
            continue;
        }
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        if TcpListener::bind(addr).is_ok() && UdpSocket::bind(addr).is_ok() {
            taken.insert(port);
            return addr;
        }
    }
    panic!("no free loopback port found in 20000..32000");
}

fn connect(addr: SocketAddr) -> io::Result<TcpStream> {
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_nodelay(true)?;
    // Longer than any server-side wait a test asks for (READ_WAIT), so a slow answer is an
    // answer and a dead server is an error rather than a hang.
    stream.set_read_timeout(Some(Duration::from_secs(90)))?;
    stream.set_write_timeout(Some(Duration::from_secs(30)))?;
    Ok(stream)
}

fn write_head(
    out: &mut Vec<u8>,
    method: &str,
    path: &str,
    host: SocketAddr,
    length: usize,
    close: bool,
) {
    let _ = write!(out, "{method} {path} HTTP/1.1\r\nHost: {host}\r\n");
    if length > 0 || !matches!(method, "GET" | "HEAD") {
        let _ = write!(out, "Content-Length: {length}\r\n");
    }
    if close {
        out.extend_from_slice(b"Connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

fn read_response(reader: &mut BufReader<TcpStream>, method: &str) -> io::Result<Response> {
    let (status, headers) = read_head(reader)?;
    let body = read_body(reader, status, &headers, method, false)?;
    Ok(Response {
        status,
        headers,
        body,
    })
}

/// Reads the status line and headers (skipping any 1xx answers), strictly, since the HTTP fuzzer
/// reads every answer with it too: a malformed head is an `InvalidData` error, not a guess.
pub fn read_head(reader: &mut impl BufRead) -> io::Result<(u16, Vec<(String, String)>)> {
    loop {
        let line = read_line(reader)?;
        let status = line
            .strip_prefix("HTTP/1.")
            .and_then(|rest| rest.get(2..5))
            .and_then(|code| code.parse::<u16>().ok())
            .ok_or_else(|| bad_data(format!("a bad status line {line:?}")))?;
        let mut headers = Vec::new();
        loop {
            let line = read_line(reader)?;
            if line.is_empty() {
                break;
            }
            let (name, value) = line
                .split_once(':')
                .ok_or_else(|| bad_data(format!("a bad header line {line:?}")))?;
            headers.push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
        }
        if !(100..200).contains(&status) {
            return Ok((status, headers));
        }
    }
}

/// Reads the body of an answer with `status` to `method`: none for HEAD, 204 and 304; else
/// chunked, by length, or to the end of the stream. With `first_chunk_only` (a watch, which never
/// ends) it stops after the first chunk, and reads nothing from a stream without a length.
pub fn read_body(
    reader: &mut impl BufRead,
    status: u16,
    headers: &[(String, String)],
    method: &str,
    first_chunk_only: bool,
) -> io::Result<Vec<u8>> {
    let mut body = Vec::new();
    if method == "HEAD" || status == 204 || status == 304 {
        return Ok(body);
    }
    if is_chunked(headers) {
        loop {
            let size = read_chunk_size(reader)?;
            if size == 0 {
                skip_trailers(reader)?;
                return Ok(body);
            }
            let start = body.len();
            body.resize(start + size, 0);
            reader.read_exact(&mut body[start..])?;
            expect_crlf(reader)?;
            if first_chunk_only {
                return Ok(body);
            }
        }
    }
    let length = headers
        .iter()
        .find(|(name, _)| name == "content-length")
        .map(|(_, value)| {
            value
                .parse::<usize>()
                .map_err(|_| bad_data(format!("a bad content-length {value:?}")))
        })
        .transpose()?;
    match length {
        Some(length) => {
            body.resize(length, 0);
            reader.read_exact(&mut body)?;
        }
        None if first_chunk_only => {}
        None => {
            reader.read_to_end(&mut body)?;
        }
    }
    Ok(body)
}

fn is_chunked(headers: &[(String, String)]) -> bool {
    headers.iter().any(|(name, value)| {
        name == "transfer-encoding" && value.to_ascii_lowercase().contains("chunked")
    })
}

fn closes(headers: &[(String, String)]) -> bool {
    headers
        .iter()
        .any(|(name, value)| name == "connection" && value.eq_ignore_ascii_case("close"))
}

fn read_chunk_size(reader: &mut impl BufRead) -> io::Result<usize> {
    let line = read_line(reader)?;
    let digits = line.split(';').next().unwrap_or("").trim();
    usize::from_str_radix(digits, 16).map_err(|_| bad_data(format!("a bad chunk size {line:?}")))
}

fn skip_trailers(reader: &mut impl BufRead) -> io::Result<()> {
    while !read_line(reader)?.is_empty() {}
    Ok(())
}

fn expect_crlf(reader: &mut impl BufRead) -> io::Result<()> {
    let line = read_line(reader)?;
    if line.is_empty() {
        Ok(())
    } else {
        Err(bad_data(format!(
            "expected CRLF after a chunk, got {line:?}"
        )))
    }
}

/// One line without its line ending, capped at 64 KiB (far more than any head line): an
/// `UnexpectedEof` error at the end of the stream, `InvalidData` for a line the stream cut off or
/// that is not UTF-8.
fn read_line(reader: &mut impl BufRead) -> io::Result<String> {
    let mut line = Vec::new();
    let read = Read::take(&mut *reader, 64 * 1024).read_until(b'\n', &mut line)?;
    if read == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "connection closed",
        ));
    }
    if line.last() != Some(&b'\n') {
        return Err(bad_data(format!(
            "a line without an end: {:?}",
            String::from_utf8_lossy(&line)
        )));
    }
    while line
        .last()
        .is_some_and(|byte| matches!(byte, b'\r' | b'\n'))
    {
        line.pop();
    }
    String::from_utf8(line).map_err(|err| bad_data(format!("a line not UTF-8: {err}")))
}

fn bad_data(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

fn is_timeout(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// Appends the last lines of the log file at `path` to `text`, under a header naming it; nothing
/// for a missing or empty file.
pub fn append_tail(text: &mut String, path: &Path) {
    let content = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = content.lines().collect();
    if lines.is_empty() {
        return;
    }
    let shown = &lines[lines.len().saturating_sub(LOG_TAIL_LINES)..];
    let _ = writeln!(
        text,
        "----- {} (last {} lines)",
        path.display(),
        shown.len()
    );
    for line in shown {
        let _ = writeln!(text, "{line}");
    }
}
