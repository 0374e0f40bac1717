//! A seeded fuzz test of the HTTP API against real `mantissa agent` processes (a two-node
//! cluster on loopback, started by the `tests/support/agent.rs` harness).
//!
//! 1. Known keys of every type (registers, one of them not UTF-8, a counter, a set, a document)
//!    are written through the API and remembered.
//! 2. For `MANTISSA_HTTP_FUZZ_SECS` seconds (default 20), a few worker threads send:
//!    - well-formed HTTP/1.1 requests to every documented route with mutated methods, paths
//!      (percent-encoding, `%ff`, keys over 4,096 bytes, empty keys, `..`), query strings
//!      (unknown, repeated and malformed parameters, mutated tokens, durations, limits and
//!      cursors), headers (wrong content types, huge values, many headers, duplicates,
//!      `Expect: 100-continue`, chunked bodies) and bodies (wrong JSON types, deep nesting, huge
//!      numbers, truncated JSON, bodies over the size limit);
//!    - raw bytes over TCP: garbage request lines, requests cut short then closed, bodies
//!      shorter than their `Content-Length`, pipelined requests, invalid chunked encoding.
//! 3. After every request: every agent process is alive; a response is never 5xx except a
//!    documented 503, or a 504 `timeout` for a request that carried `after=`; every 4xx body is
//!    the documented `{"error":{"code","message"}}` with a non-empty code (hyper's own bodiless
//!    400/414/431 answers to requests that are not valid HTTP/1.1 are tolerated and counted: they
//!    never reach the router); reads of the known keys give their values; a write cut short
//!    writes nothing. At the end: the known keys read back exactly as written on every node, the
//!    nodes answer `/v1/health` and `/v1/status`, and no agent log holds "panicked".
//!
//! The seed comes from `MANTISSA_HTTP_FUZZ_SEED` (decimal or `0x` hex), else from the clock; it
//! is printed first and in every failure message. Each worker draws its requests from its own
//! stream derived from the seed, so a replay sends the same requests; their interleaving across
//! workers (and so the server's state) follows thread timing.

#![cfg(feature = "cli")]

#[path = "support/agent.rs"]
mod agent;
#[path = "support/rng.rs"]
mod rng;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{self, BufReader, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{Value as Json, json};

use agent::{Cluster, encode_path, encode_query, request_once};

const BINARY: &str = env!("CARGO_BIN_EXE_mantissa");

/// Fuzzing time when `MANTISSA_HTTP_FUZZ_SECS` is not set.
const DEFAULT_SECS: f64 = 20.0;
/// Threads sending requests at once.
const WORKERS: u64 = 4;
/// How long a well-formed request may take to be answered before it counts as a hang. Every
/// session wait the fuzzer asks for is short (see [`Query::cap_waits`]).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(15);
/// How long to wait for an answer to raw, malformed bytes (none may come).
const RAW_TIMEOUT: Duration = Duration::from_secs(3);
/// The documented limits (docs/api.md, "Limits").
const BODY_LIMIT: usize = 1_572_864;
const VALUE_LIMIT: usize = 1 << 20;
const KEY_LIMIT: usize = 4096;
/// Bytes of a request or response shown in a failure message.
const SHOWN_BYTES: usize = 800;

// ---------------------------------------------------------------------------------------------
// The test
// ---------------------------------------------------------------------------------------------

#[test]
fn the_http_api_survives_seeded_fuzzing() {
    let seed = seed_from_env();
    let secs = secs_from_env();
    let replay = format!(
        "MANTISSA_HTTP_FUZZ_SEED={seed:#x} MANTISSA_HTTP_FUZZ_SECS={secs} \
         cargo test --release --test http_fuzz -- --nocapture"
    );
    println!("http_fuzz: seed {seed:#x}, {secs} s; replay with: {replay}");
    let started = Instant::now();

    let cluster = Cluster::start(BINARY, "http-fuzz", 2);
    let nodes: Vec<SocketAddr> = (0..cluster.len()).map(|n| cluster.agent(n).http).collect();
    let nonce = format!("{:016x}", Rng::new(seed ^ 0x6b6e_6f77_6e00).next());
    let (known, last_token) = write_known_keys(&cluster, &nonce, seed);

    let fuzz = Fuzz {
        seed,
        replay: replay.clone(),
        cluster: Mutex::new(cluster),
        nodes,
        known,
        tokens: Mutex::new(vec![last_token.clone()]),
        failure: Mutex::new(None),
        stop: AtomicBool::new(false),
        deadline: Instant::now() + Duration::from_secs_f64(secs),
        stats: Mutex::new(BTreeMap::new()),
        cases: AtomicU64::new(0),
    };
    std::thread::scope(|scope| {
        for worker in 0..WORKERS {
            let fuzz = &fuzz;
            scope.spawn(move || fuzz.work(worker));
        }
    });

    let failure = fuzz
        .failure
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .take();
    let stats = fuzz
        .stats
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .clone();
    let mut summary = format!(
        "http_fuzz: seed {seed:#x}: {} cases in {:.1} s; outcomes:\n",
        fuzz.cases.load(Ordering::Relaxed),
        started.elapsed().as_secs_f64()
    );
    for (outcome, count) in &stats {
        let _ = writeln!(summary, "  {count:>7}  {outcome}");
    }
    println!("{summary}");
    if let Some(failure) = failure {
        panic!("{failure}");
    }

    // The end: every node alive and answering, the known keys intact, no panic in any log.
    let mut cluster = fuzz
        .cluster
        .into_inner()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let fail =
        |what: String| -> ! { panic!("http_fuzz seed {seed:#x}: {what}\n(replay: {replay})") };
    for node in 0..cluster.len() {
        if !cluster.is_running(node) {
            fail(format!("node {node} exited during the run"));
        }
        let addr = cluster.agent(node).http;
        for route in ["/v1/health", "/v1/status", "/v1/members"] {
            match request_once(addr, "GET", route, b"") {
                Ok(response) if response.status == 200 => {
                    if serde_json::from_slice::<Json>(&response.body).is_err() {
                        fail(format!(
                            "{route} on node {node}: not JSON: {}",
                            response.text()
                        ));
                    }
                }
                Ok(response) => fail(format!(
                    "{route} on node {node}: {} {}",
                    response.status,
                    response.text()
                )),
                Err(err) => fail(format!("{route} on node {node}: {err}")),
            }
        }
        for known in &fuzz.known {
            if let Err(problem) = known.check_at(addr, Some(&last_token)) {
                fail(format!("after fuzzing, on node {node}: {problem}"));
            }
        }
        let logs = cluster.logs(node);
        if let Some(line) = logs.lines().find(|line| line.contains("panicked")) {
            fail(format!("node {node} logged a panic: {line}"));
        }
    }
    println!(
        "http_fuzz: seed {seed:#x}: passed in {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

// ---------------------------------------------------------------------------------------------
// Seeds and randomness
// ---------------------------------------------------------------------------------------------

fn seed_from_env() -> u64 {
    match std::env::var("MANTISSA_HTTP_FUZZ_SEED") {
        Ok(text) => {
            let text = text.trim();
            let parsed = match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
                Some(hex) => u64::from_str_radix(hex, 16),
                None => text.parse(),
            };
            parsed.unwrap_or_else(|_| panic!("MANTISSA_HTTP_FUZZ_SEED={text:?} is not a u64"))
        }
        Err(_) => {
            let nanos = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |elapsed| elapsed.as_nanos() as u64);
            Rng::new(nanos ^ (u64::from(std::process::id()) << 40)).next()
        }
    }
}

fn secs_from_env() -> f64 {
    match std::env::var("MANTISSA_HTTP_FUZZ_SECS") {
        Ok(text) => match text.trim().parse::<f64>() {
            Ok(secs) if secs.is_finite() && secs >= 0.0 => secs,
            _ => panic!("MANTISSA_HTTP_FUZZ_SECS={text:?} is not a number of seconds"),
        },
        Err(_) => DEFAULT_SECS,
    }
}

/// SplitMix64: small, fast, and the same on every platform.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    fn next(&mut self) -> u64 {
        rng::splitmix64(&mut self.0)
    }

    /// A number in `0..n` (0 when `n` is 0).
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }

    /// A number in `low..high`.
    fn range(&mut self, low: usize, high: usize) -> usize {
        low + self.below(high.saturating_sub(low))
    }

    /// True `percent` times in a hundred.
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }

    /// Random bytes, a length in `lengths`.
    fn bytes(&mut self, lengths: std::ops::Range<usize>) -> Vec<u8> {
        let n = self.range(lengths.start, lengths.end);
        (0..n).map(|_| self.next() as u8).collect()
    }

    /// Random text from `alphabet`.
    fn text(&mut self, alphabet: &[u8], lengths: std::ops::Range<usize>) -> String {
        let n = self.range(lengths.start, lengths.end);
        (0..n).map(|_| *self.pick(alphabet) as char).collect()
    }
}

const ALNUM: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";

// ---------------------------------------------------------------------------------------------
// Known keys
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Register,
    Counter,
    Set,
    Document,
}

/// A key written before fuzzing, and what every read of it must show.
struct Known {
    key: String,
    kind: Kind,
    value: Json,
    /// `"base64"` for a register value that is not UTF-8.
    encoding: Option<&'static str>,
}

impl Known {
    fn path(&self) -> String {
        format!("/v1/kv/{}", encode_path(&self.key))
    }

    fn type_name(&self) -> &'static str {
        match self.kind {
            Kind::Register => "register",
            Kind::Counter => "counter",
            Kind::Set => "set",
            Kind::Document => "document",
        }
    }

    /// Whether a `GET /v1/kv/{key}` answer (200, JSON) shows exactly what was written.
    fn matches(&self, json: &Json) -> Result<(), String> {
        let mut problems = Vec::new();
        if json["key"] != self.key.as_str() {
            problems.push("key");
        }
        if json["type"] != self.type_name() {
            problems.push("type");
        }
        if json["value"] != self.value {
            problems.push("value");
        }
        if json.get("encoding").and_then(Json::as_str) != self.encoding {
            problems.push("encoding");
        }
        if self.kind == Kind::Register && json["siblings"] != json!([]) {
            problems.push("siblings");
        }
        match problems.is_empty() {
            true => Ok(()),
            false => Err(format!(
                "known key {:?} reads {json}, which differs in {problems:?} from what was written \
                 (type {}, value {}, encoding {:?})",
                self.key,
                self.type_name(),
                self.value,
                self.encoding
            )),
        }
    }

    /// Reads the key at `addr` (after `token`), through `/v1/kv` and its typed route.
    fn check_at(&self, addr: SocketAddr, token: Option<&str>) -> Result<(), String> {
        let query = token.map_or(String::new(), |token| {
            format!("?after={}&wait=30s", encode_query(token))
        });
        let path = format!("{}{query}", self.path());
        let response =
            request_once(addr, "GET", &path, b"").map_err(|err| format!("GET {path}: {err}"))?;
        if response.status != 200 {
            return Err(format!(
                "GET {path}: {} {}",
                response.status,
                response.text()
            ));
        }
        let json: Json = serde_json::from_slice(&response.body)
            .map_err(|err| format!("GET {path}: not JSON ({err}): {}", response.text()))?;
        self.matches(&json)?;
        let typed = match self.kind {
            Kind::Register => {
                let raw = format!("{}?raw=true", self.path());
                let response = request_once(addr, "GET", &raw, b"")
                    .map_err(|err| format!("GET {raw}: {err}"))?;
                let expected = match self.encoding {
                    Some(_) => known_blob(),
                    None => self.value.as_str().unwrap_or_default().as_bytes().to_vec(),
                };
                if response.status != 200 || response.body != expected {
                    return Err(format!(
                        "GET {raw}: {} {:?}, expected 200 {expected:?}",
                        response.status, response.body
                    ));
                }
                return Ok(());
            }
            Kind::Counter => "counter",
            Kind::Set => "set",
            Kind::Document => "doc",
        };
        let typed_path = format!("/v1/{typed}/{}", encode_path(&self.key));
        let response = request_once(addr, "GET", &typed_path, b"")
            .map_err(|err| format!("GET {typed_path}: {err}"))?;
        let json: Json = serde_json::from_slice(&response.body).unwrap_or(Json::Null);
        if response.status != 200 || json["value"] != self.value {
            return Err(format!(
                "GET {typed_path}: {} {}, expected value {}",
                response.status,
                response.text(),
                self.value
            ));
        }
        Ok(())
    }
}

/// The bytes of the known register that is not UTF-8.
fn known_blob() -> Vec<u8> {
    vec![0x00, 0xff, 0xfe, b'k', 0x80]
}

/// Writes one key of each type (and a register that is not UTF-8, and one whose key needs
/// percent-encoding) on node 0, checks they read back at every node, and returns them with the
/// token of the last write.
fn write_known_keys(cluster: &Cluster, nonce: &str, seed: u64) -> (Vec<Known>, String) {
    let base = format!("keep-{nonce}");
    let key = |name: &str| format!("{base}/{name}");
    let path = |route: &str, name: &str| format!("/v1/{route}/{}", encode_path(&key(name)));
    let odd = "sp ace/%25?#+ü/..";
    cluster.write(0, "PUT", &path("kv", "reg"), b"image=web:1.4");
    cluster.write(0, "PUT", &path("kv", "reg"), b"image=web:1.5");
    cluster.write(0, "PUT", &path("kv", "blob"), &known_blob());
    cluster.write(0, "PUT", &path("kv", odd), "värde".as_bytes());
    cluster.write(0, "POST", &path("counter", "count"), br#"{"add": 5}"#);
    cluster.write(0, "POST", &path("counter", "count"), br#"{"add": -2}"#);
    cluster.write(
        0,
        "POST",
        &path("set", "set"),
        br#"{"add": ["a", "b", "c"]}"#,
    );
    cluster.write(0, "POST", &path("set", "set"), br#"{"remove": ["b"]}"#);
    cluster.write(
        0,
        "PATCH",
        &path("doc", "doc"),
        br#"{"image": "web:1", "ports": [80], "env": {"MODE": "blue", "X": "1"}}"#,
    );
    let last = cluster.write(
        0,
        "PATCH",
        &path("doc", "doc"),
        br#"{"env": {"MODE": null}, "deep": {"a": {"b": [1, 2.5, true, null]}}}"#,
    );
    let known = vec![
        Known {
            key: key("reg"),
            kind: Kind::Register,
            value: json!("image=web:1.5"),
            encoding: None,
        },
        Known {
            key: key("blob"),
            kind: Kind::Register,
            value: json!("AP/+a4A="),
            encoding: Some("base64"),
        },
        Known {
            key: key(odd),
            kind: Kind::Register,
            value: json!("värde"),
            encoding: None,
        },
        Known {
            key: key("count"),
            kind: Kind::Counter,
            value: json!(3),
            encoding: None,
        },
        Known {
            key: key("set"),
            kind: Kind::Set,
            value: json!(["a", "c"]),
            encoding: None,
        },
        Known {
            key: key("doc"),
            kind: Kind::Document,
            value: json!({"image": "web:1", "ports": [80], "env": {"X": "1"},
                          "deep": {"a": {"b": [1, 2.5, true, null]}}}),
            encoding: None,
        },
    ];
    for node in 0..cluster.len() {
        for known in &known {
            if let Err(problem) = known.check_at(cluster.agent(node).http, Some(&last)) {
                panic!("http_fuzz seed {seed:#x}: before fuzzing, on node {node}: {problem}");
            }
        }
    }
    (known, last)
}

// ---------------------------------------------------------------------------------------------
// The fuzzer's shared state and its workers
// ---------------------------------------------------------------------------------------------

struct Fuzz {
    seed: u64,
    replay: String,
    cluster: Mutex<Cluster>,
    nodes: Vec<SocketAddr>,
    known: Vec<Known>,
    /// Tokens from recent answers, to send back (mutated or not) as `after=`.
    tokens: Mutex<Vec<String>>,
    /// The first failure; every worker stops when it is set.
    failure: Mutex<Option<String>>,
    stop: AtomicBool,
    deadline: Instant,
    /// Outcomes counted by kind of case and status.
    stats: Mutex<BTreeMap<String, u64>>,
    cases: AtomicU64,
}

/// What was sent in one request, to judge its answer by.
#[derive(Clone, Debug, Default)]
struct Sent {
    method: String,
    /// `GET /v1/watch`: the answer is a stream; read its head and first chunk only.
    watch: bool,
    /// The request is not valid HTTP/1.1 (or strains the parser's limits): hyper may answer it
    /// itself with a bodiless 400, 414 or 431 before the router sees it.
    bare_ok: bool,
    /// The request may get no answer at all (cut short, oversized, garbage).
    silence_ok: bool,
    /// The query names `after`: a 504 `timeout` is a documented answer.
    has_after: bool,
    /// The route is `/v1/health`: a 503 `unresponsive` is documented there.
    health: bool,
    /// A plain `GET /v1/kv/{key}` of this known key: a 200 must show its value.
    known_read: Option<usize>,
}

/// What to do once a case's bytes are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Then {
    /// Read one answer per request sent.
    Read,
    /// Close the writing half, then read whatever comes until the server closes.
    HalfClose,
    /// Close the connection without reading.
    Close,
}

/// One connection's worth of bytes and what to expect of them.
struct Case {
    label: &'static str,
    node: usize,
    bytes: Vec<u8>,
    then: Then,
    /// One entry per request in `bytes` (several when pipelined).
    sent: Vec<Sent>,
    /// A key that a write cut short must not have written: `GET` must be 404 afterwards.
    absent: Option<String>,
    /// Send on the worker's kept-alive connection to the node, if it has one.
    reuse: bool,
}

/// An answer read from the wire.
#[derive(Debug)]
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(candidate, _)| candidate == name)
            .map(|(_, value)| value.as_str())
    }

    fn closes(&self) -> bool {
        self.header("connection")
            .is_some_and(|value| value.eq_ignore_ascii_case("close"))
    }

    fn describe(&self) -> String {
        format!(
            "{} {:?} body ({} bytes): {}",
            self.status,
            self.headers,
            self.body.len(),
            shown(&self.body)
        )
    }
}

/// Why no answer was read.
#[derive(Debug)]
enum NoReply {
    /// The server closed the connection before sending anything.
    Closed,
    /// Nothing (or not all of it) within the timeout.
    Timeout,
    /// Bytes that are not an HTTP/1.1 answer, or another IO error.
    Broken(String),
}

impl Fuzz {
    fn work(&self, worker: u64) {
        let mut rng = Rng::new(self.seed ^ (worker + 1).wrapping_mul(0xA076_1D64_78BD_642F));
        let mut kept: Vec<Option<BufReader<TcpStream>>> = self.nodes.iter().map(|_| None).collect();
        let mut serial = 0u64;
        while !self.stop.load(Ordering::Relaxed) && Instant::now() < self.deadline {
            serial += 1;
            let case = self.generate(&mut rng, worker, serial);
            let number = self.cases.fetch_add(1, Ordering::Relaxed);
            let result = self.run_case(&case, &mut kept);
            let result = result.and_then(|()| self.check_alive());
            let result = result.and_then(|()| match &case.absent {
                Some(path) => self.check_absent(case.node, path),
                None => Ok(()),
            });
            if let Err(problem) = result {
                let message = format!(
                    "http_fuzz seed {:#x}: worker {worker}, case {serial} (#{number} overall), \
                     {} on node {}: {problem}\nrequest ({} bytes, then {:?}): {}\n(replay: {})",
                    self.seed,
                    case.label,
                    case.node,
                    case.bytes.len(),
                    case.then,
                    shown(&case.bytes),
                    self.replay
                );
                let mut failure = self
                    .failure
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
                if failure.is_none() {
                    *failure = Some(message);
                }
                self.stop.store(true, Ordering::Relaxed);
                return;
            }
        }
    }

    fn count(&self, outcome: String) {
        *self
            .stats
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .entry(outcome)
            .or_insert(0) += 1;
    }

    fn check_alive(&self) -> Result<(), String> {
        let mut cluster = self
            .cluster
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        for node in 0..cluster.len() {
            if !cluster.is_running(node) {
                return Err(format!(
                    "agent node {node} is no longer running; its log ends with:\n{}",
                    cluster.log_tail(node)
                ));
            }
        }
        Ok(())
    }

    /// A write that was cut short must have written nothing.
    fn check_absent(&self, node: usize, path: &str) -> Result<(), String> {
        let response = request_once(self.nodes[node], "GET", path, b"")
            .map_err(|err| format!("GET {path} after the case: {err}"))?;
        match response.status {
            404 => Ok(()),
            status => Err(format!(
                "a write cut short was applied: GET {path} answers {status} {}",
                response.text()
            )),
        }
    }

    fn remember_token(&self, reply: &Reply) {
        let Ok(json) = serde_json::from_slice::<Json>(&reply.body) else {
            return;
        };
        if let Some(token) = json.get("token").and_then(Json::as_str) {
            let mut tokens = self
                .tokens
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            if tokens.len() >= 64 {
                tokens.remove(0);
            }
            tokens.push(token.to_owned());
        }
    }

    fn some_token(&self, rng: &mut Rng) -> String {
        let tokens = self
            .tokens
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        tokens[rng.below(tokens.len())].clone()
    }

    /// Sends a case and judges every answer.
    fn run_case(
        &self,
        case: &Case,
        kept: &mut [Option<BufReader<TcpStream>>],
    ) -> Result<(), String> {
        let timeout = match case.sent.iter().all(|sent| sent.silence_ok) {
            true => RAW_TIMEOUT,
            false => ANSWER_TIMEOUT,
        };
        let reused = case.reuse && kept[case.node].is_some();
        let mut reader = match kept[case.node].take().filter(|_| case.reuse) {
            Some(reader) => reader,
            None => BufReader::new(
                connect(self.nodes[case.node], timeout)
                    .map_err(|err| format!("cannot connect: {err}"))?,
            ),
        };
        let _ = reader.get_mut().set_read_timeout(Some(timeout));
        let written = reader.get_mut().write_all(&case.bytes);
        match case.then {
            Then::Close => {
                self.count(format!("{}: closed without reading", case.label));
                return Ok(());
            }
            Then::HalfClose => {
                let _ = reader.get_mut().shutdown(Shutdown::Write);
            }
            Then::Read => {}
        }
        let mut keep = case.then == Then::Read;
        for (index, sent) in case.sent.iter().enumerate() {
            let reply = match read_reply(&mut reader, sent) {
                Ok(reply) => reply,
                Err(NoReply::Closed) if reused && index == 0 => {
                    // The server may close a kept-alive connection between requests (it does
                    // after an answer that left the request's body unread): try once more on a
                    // fresh connection.
                    let fresh = Case {
                        label: case.label,
                        node: case.node,
                        bytes: case.bytes.clone(),
                        then: case.then,
                        sent: case.sent.clone(),
                        absent: None,
                        reuse: false,
                    };
                    return self.run_case(&fresh, kept);
                }
                Err(why) => {
                    if sent.silence_ok || case.then == Then::HalfClose {
                        self.count(format!("{}: no answer ({})", case.label, why_name(&why)));
                        return Ok(());
                    }
                    return Err(format!(
                        "request {} of {}: no answer: {why:?} (write: {written:?})",
                        index + 1,
                        case.sent.len()
                    ));
                }
            };
            self.judge(case, sent, &reply)
                .map_err(|problem| format!("request {}: {problem}", index + 1))?;
            let bare = reply.status >= 400
                && reply.body.is_empty()
                && reply.header("content-type").is_none();
            let note = if bare { " (hyper's own, bodiless)" } else { "" };
            self.count(format!("{}: {}{note}", case.label, reply.status));
            if reply.closes() || sent.watch || sent.bare_ok || sent.silence_ok {
                keep = false;
            }
            if reply.closes() {
                // Requests pipelined after a `Connection: close` answer are not served.
                break;
            }
        }
        if case.then == Then::HalfClose {
            // Whatever else arrives must still be an answer, until the server closes.
            let sent = Sent {
                bare_ok: true,
                silence_ok: true,
                ..case.sent.last().cloned().unwrap_or_default()
            };
            while let Ok(reply) = read_reply(&mut reader, &sent) {
                self.judge(case, &sent, &reply)
                    .map_err(|problem| format!("a further answer: {problem}"))?;
                self.count(format!("{}: further {}", case.label, reply.status));
            }
        }
        if keep && case.reuse && written.is_ok() {
            kept[case.node] = Some(reader);
        }
        Ok(())
    }

    /// The rules every answer must follow.
    fn judge(&self, case: &Case, sent: &Sent, reply: &Reply) -> Result<(), String> {
        let status = reply.status;
        let bad = |what: String| Err(format!("{what}\nresponse: {}", reply.describe()));
        let error_code = || -> Option<String> {
            let json: Json = serde_json::from_slice(&reply.body).ok()?;
            let code = json.get("error")?.get("code")?.as_str()?;
            json["error"].get("message")?.as_str()?;
            (!code.is_empty()).then(|| code.to_owned())
        };
        match status {
            200 => {
                if let Some(index) = sent.known_read {
                    let json: Json = match serde_json::from_slice(&reply.body) {
                        Ok(json) => json,
                        Err(err) => return bad(format!("a known key's read is not JSON: {err}")),
                    };
                    if let Err(problem) = self.known[index].matches(&json) {
                        return bad(problem);
                    }
                }
                if !sent.watch && sent.method != "HEAD" {
                    self.remember_token(reply);
                }
                Ok(())
            }
            400..=499 => {
                let bare = reply.body.is_empty() && reply.header("content-type").is_none();
                if bare && sent.bare_ok && matches!(status, 400 | 414 | 431) {
                    return Ok(());
                }
                if sent.method == "HEAD" {
                    // A HEAD answer has no body to check; its type must still be JSON.
                    return match reply.header("content-type") {
                        Some(kind) if kind.starts_with("application/json") => Ok(()),
                        _ => bad(format!("a {status} to HEAD without a JSON content type")),
                    };
                }
                let json_type = reply
                    .header("content-type")
                    .is_some_and(|kind| kind.starts_with("application/json"));
                match (error_code(), json_type) {
                    (Some(_), true) => Ok(()),
                    _ => bad(format!(
                        "a {status} whose body is not the documented JSON error \
                         {{\"error\":{{\"code\",\"message\"}}}} with a non-empty code"
                    )),
                }
            }
            503 | 504 if sent.method == "HEAD" => {
                // No body to read the code from: a JSON error, and a 504 only after `after=`.
                let json_type = reply
                    .header("content-type")
                    .is_some_and(|kind| kind.starts_with("application/json"));
                match json_type && (status == 503 || sent.has_after) {
                    true => Ok(()),
                    false => bad(format!("a {status} to HEAD that is not a documented error")),
                }
            }
            503 => match error_code().as_deref() {
                Some("stopped" | "shutting_down" | "buffer_full" | "storage") => Ok(()),
                Some("unresponsive") if sent.health => Ok(()),
                _ => bad("a 503 with no documented error code".to_owned()),
            },
            504 if sent.has_after => match error_code().as_deref() {
                Some("timeout") => Ok(()),
                _ => bad("a 504 whose code is not \"timeout\"".to_owned()),
            },
            500..=599 => bad(format!("a server error {status} ({})", case.label)),
            _ => bad(format!("an unexpected status {status}")),
        }
    }
}

fn why_name(why: &NoReply) -> String {
    match why {
        NoReply::Closed => "closed".to_owned(),
        NoReply::Timeout => "timeout".to_owned(),
        NoReply::Broken(what) => {
            // Keep the outcome names few: the kind of breakage, not its bytes.
            let kind: String = what
                .chars()
                .take_while(|c| *c != '"' && *c != ':')
                .collect();
            format!("not HTTP: {}", kind.trim())
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Reading answers
// ---------------------------------------------------------------------------------------------

fn connect(addr: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(Duration::from_secs(10)))?;
    Ok(stream)
}

fn io_reason(err: &io::Error) -> NoReply {
    match err.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => NoReply::Timeout,
        io::ErrorKind::UnexpectedEof
        | io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionAborted
        | io::ErrorKind::BrokenPipe => NoReply::Closed,
        _ => NoReply::Broken(err.to_string()),
    }
}

/// Reads one answer (skipping 1xx) with the harness's strict reader; for a watch, its head and
/// first chunk only.
fn read_reply(reader: &mut BufReader<TcpStream>, sent: &Sent) -> Result<Reply, NoReply> {
    let reason = |err: io::Error| io_reason(&err);
    let (status, headers) = agent::read_head(reader).map_err(reason)?;
    let watching = sent.watch && status == 200;
    let body =
        agent::read_body(reader, status, &headers, &sent.method, watching).map_err(reason)?;
    if watching {
        check_watch_lines(&body)?;
    }
    Ok(Reply {
        status,
        headers,
        body,
    })
}

/// The complete lines of a watch stream's first chunk must be JSON objects.
fn check_watch_lines(body: &[u8]) -> Result<(), NoReply> {
    let text = String::from_utf8_lossy(body);
    for line in text
        .split_inclusive('\n')
        .filter(|line| line.ends_with('\n'))
    {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        if !serde_json::from_str::<Json>(line).is_ok_and(|json| json.is_object()) {
            return Err(NoReply::Broken(format!(
                "a watch line that is not a JSON object: {line:?}"
            )));
        }
    }
    Ok(())
}

/// Bytes for a message: printable ASCII as is, the rest escaped, cut after [`SHOWN_BYTES`].
fn shown(bytes: &[u8]) -> String {
    let mut text = String::new();
    for &byte in bytes.iter().take(SHOWN_BYTES) {
        match byte {
            b'\r' => text.push_str("\\r"),
            b'\n' => text.push_str("\\n"),
            b'\\' => text.push_str("\\\\"),
            0x20..=0x7e => text.push(byte as char),
            _ => {
                let _ = write!(text, "\\x{byte:02x}");
            }
        }
    }
    if bytes.len() > SHOWN_BYTES {
        let _ = write!(text, "… ({} more bytes)", bytes.len() - SHOWN_BYTES);
    }
    text
}

// ---------------------------------------------------------------------------------------------
// Generating requests
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Route {
    Kv,
    List,
    Counter,
    Set,
    Doc,
    Watch,
    Members,
    Status,
    Health,
    Metrics,
    Unknown,
}

impl Route {
    const ALL: [Route; 11] = [
        Route::Kv,
        Route::List,
        Route::Counter,
        Route::Set,
        Route::Doc,
        Route::Watch,
        Route::Members,
        Route::Status,
        Route::Health,
        Route::Metrics,
        Route::Unknown,
    ];

    /// The prefix of a keyed route's path.
    fn keyed(self) -> Option<&'static str> {
        match self {
            Route::Kv => Some("/v1/kv/"),
            Route::Counter => Some("/v1/counter/"),
            Route::Set => Some("/v1/set/"),
            Route::Doc => Some("/v1/doc/"),
            _ => None,
        }
    }

    /// The methods the route takes.
    fn methods(self) -> &'static [&'static str] {
        match self {
            Route::Kv => &["GET", "PUT", "DELETE"],
            Route::Counter | Route::Set => &["GET", "POST"],
            Route::Doc => &["GET", "PATCH"],
            _ => &["GET"],
        }
    }

    /// The query parameters the route takes.
    fn params(self) -> &'static [&'static str] {
        match self {
            Route::Kv => &["raw", "after", "wait"],
            Route::List => &["prefix", "limit", "start_after", "after", "wait"],
            Route::Counter | Route::Set | Route::Doc | Route::Members | Route::Status => {
                &["after", "wait"]
            }
            Route::Watch => &["prefix", "from"],
            _ => &[],
        }
    }

    fn fixed_path(self, rng: &mut Rng) -> String {
        match self {
            Route::List => "/v1/kv".to_owned(),
            Route::Watch => "/v1/watch".to_owned(),
            Route::Members => "/v1/members".to_owned(),
            Route::Status => "/v1/status".to_owned(),
            Route::Health => "/v1/health".to_owned(),
            Route::Metrics => "/metrics".to_owned(),
            _ => rng
                .pick(&[
                    "/",
                    "/v1",
                    "/v1/",
                    "/v2/kv/x",
                    "/v1/kvx/a",
                    "/V1/KV/a",
                    "/v1/health/",
                    "/v1//kv/a",
                    "/v1/%6Bv/a",
                    "/v1/counter",
                    "/v1/doc",
                    "/metrics/",
                    "/v1/watch/x",
                    "/%ff",
                    "/..",
                    "/v1/../v1/health",
                    "*",
                ])
                .to_string(),
        }
    }
}

/// A request line's target, headers and body, before serialising.
struct Request {
    method: String,
    target: String,
    /// Headers besides `Host` and the framing (`Content-Length` or chunked).
    headers: Vec<(Vec<u8>, Vec<u8>)>,
    body: Vec<u8>,
    host: bool,
    /// Frame the body as chunks rather than with a `Content-Length`.
    chunked: bool,
    /// Leave the framing headers out (the extra headers set their own).
    no_framing: bool,
    sent: Sent,
}

impl Request {
    fn bytes(&self, addr: SocketAddr, rng: &mut Rng) -> Vec<u8> {
        let mut out = format!("{} {} HTTP/1.1\r\n", self.method, self.target).into_bytes();
        if self.host {
            out.extend_from_slice(format!("Host: {addr}\r\n").as_bytes());
        }
        for (name, value) in &self.headers {
            out.extend_from_slice(name);
            out.extend_from_slice(b": ");
            out.extend_from_slice(value);
            out.extend_from_slice(b"\r\n");
        }
        if !self.no_framing {
            if self.chunked {
                out.extend_from_slice(b"Transfer-Encoding: chunked\r\n");
            } else if !self.body.is_empty() || !matches!(self.method.as_str(), "GET" | "HEAD") {
                out.extend_from_slice(
                    format!("Content-Length: {}\r\n", self.body.len()).as_bytes(),
                );
            }
        }
        out.extend_from_slice(b"\r\n");
        if self.chunked && !self.no_framing {
            let mut rest = &self.body[..];
            while !rest.is_empty() {
                let size = rng.range(1, rest.len().min(4096) + 1);
                out.extend_from_slice(format!("{size:x}\r\n").as_bytes());
                out.extend_from_slice(&rest[..size]);
                out.extend_from_slice(b"\r\n");
                rest = &rest[size..];
            }
            out.extend_from_slice(b"0\r\n\r\n");
        } else {
            out.extend_from_slice(&self.body);
        }
        out
    }
}

/// A query string being built: encoded names and values, in order.
struct Query {
    pairs: Vec<String>,
}

impl Query {
    fn text(&self) -> String {
        self.pairs.join("&")
    }

    /// Decodes the query the way the server does, for what it will see.
    fn decoded(text: &str) -> Vec<(Vec<u8>, Vec<u8>)> {
        text.split('&')
            .filter(|pair| !pair.is_empty())
            .map(|pair| {
                let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
                (percent_decode(name), percent_decode(value))
            })
            .collect()
    }

    /// Keeps every session wait the server will honour short: a request naming `after` with no
    /// `wait`, or a valid one over a second, gets `wait=100ms` added (a repeated `wait` is then
    /// refused at once). Returns whether the query names `after`.
    fn cap_waits(&mut self) -> bool {
        let decoded = Query::decoded(&self.text());
        let has_after = decoded.iter().any(|(name, _)| name == b"after");
        if !has_after {
            return false;
        }
        let long = decoded
            .iter()
            .filter(|(name, _)| name == b"wait")
            .map(|(_, value)| parse_duration(value))
            .collect::<Vec<_>>();
        if long.is_empty() || long.iter().any(|wait| wait.is_some_and(|wait| wait > 1.0)) {
            self.pairs.push("wait=100ms".to_owned());
        }
        true
    }
}

fn percent_decode(text: &str) -> Vec<u8> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut at = 0;
    while at < bytes.len() {
        let escaped = (bytes[at] == b'%')
            .then(|| bytes.get(at + 1..at + 3))
            .flatten()
            .and_then(|hex| std::str::from_utf8(hex).ok())
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match (escaped, bytes[at]) {
            (Some(byte), _) => {
                out.push(byte);
                at += 3;
                continue;
            }
            (None, b'+') => out.push(b' '),
            (None, byte) => out.push(byte),
        }
        at += 1;
    }
    out
}

/// Seconds in a duration as the server reads it (`500ms`, `5s`, `1.5s`, `1m`, `1h`, `5`); `None`
/// when it is not one (the server refuses it before waiting).
fn parse_duration(value: &[u8]) -> Option<f64> {
    let text = std::str::from_utf8(value).ok()?;
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    if !number.starts_with(|c: char| c.is_ascii_digit()) {
        return None;
    }
    let number: f64 = number.parse().ok()?;
    let seconds = match unit {
        "ms" => number / 1000.0,
        "" | "s" => number,
        "m" => number * 60.0,
        "h" => number * 3600.0,
        _ => return None,
    };
    // Anything the server might read as long counts as long.
    Some(if seconds.is_finite() {
        seconds
    } else {
        f64::MAX
    })
}

impl Fuzz {
    fn generate(&self, rng: &mut Rng, worker: u64, serial: u64) -> Case {
        let node = rng.below(self.nodes.len());
        let addr = self.nodes[node];
        if rng.chance(70) {
            let request = self.http_request(rng, worker, serial);
            let oversized = request.body.len() > 64 * 1024;
            Case {
                label: if oversized { "http-big" } else { "http" },
                node,
                bytes: request.bytes(addr, rng),
                then: Then::Read,
                sent: vec![request.sent],
                absent: None,
                reuse: !oversized && rng.chance(60),
            }
        } else {
            self.raw_case(rng, node, worker, serial)
        }
    }

    /// A key for a fuzzed request, already percent-encoded for a path, and whether it may be
    /// refused by hyper itself (a target too long to parse). Never one of the known keys: those
    /// all start with `keep-`, which no choice below writes.
    fn fuzz_key(&self, rng: &mut Rng, worker: u64) -> (String, bool) {
        match rng.below(16) {
            0 => (String::new(), false),
            1 => (
                rng.pick(&[
                    "..",
                    ".",
                    "%2E%2E",
                    "%2e",
                    "fz/../fz/x",
                    "fz/./x",
                    "fz/%2E%2E/y",
                    "fz//x",
                    "/fz",
                ])
                .to_string(),
                false,
            ),
            2 => {
                let len = rng.range(KEY_LIMIT - 2, KEY_LIMIT + 3);
                (format!("fz/{}", "k".repeat(len - 3)), false)
            }
            3 => {
                let len = rng.range(KEY_LIMIT + 1, 3 * KEY_LIMIT);
                (format!("fz/{}", "x".repeat(len)), false)
            }
            4 => {
                // Over the URI length hyper parses (64 KiB).
                (
                    format!("fz/{}", "y".repeat(rng.range(60_000, 80_000))),
                    true,
                )
            }
            5 => {
                let bytes = rng.bytes(1..40);
                let mut key = b"fz/".to_vec();
                key.extend(bytes);
                let mut encoded = String::new();
                for byte in key {
                    if byte.is_ascii_alphanumeric() && rng.chance(50) {
                        encoded.push(byte as char);
                    } else {
                        let _ = write!(encoded, "%{byte:02x}");
                    }
                }
                (encoded, false)
            }
            6 => (
                format!(
                    "fz/{}",
                    rng.pick(&[
                        "%ff",
                        "%fe%ff",
                        "%c3%28",
                        "%00",
                        "%zz",
                        "%4",
                        "%",
                        "%%41",
                        "%2F%2F",
                        "%ed%a0%80",
                        "a%2",
                        "%F0%9F%92%A9"
                    ])
                ),
                false,
            ),
            7 => (
                format!("fz/{}", encode_path(&"é".repeat(rng.range(1, 1500)))),
                false,
            ),
            _ => (
                format!("fz/{worker}/{}", rng.text(b"abcdefgh-._~/0123", 1..12)),
                false,
            ),
        }
    }

    /// A query for `route`: mostly its own parameters with plausible or mutated values.
    fn query(&self, rng: &mut Rng, route: Route) -> Query {
        let mut pairs = Vec::new();
        let allowed = route.params();
        let count = if rng.chance(30) { 0 } else { rng.range(1, 4) };
        for _ in 0..count {
            let name: String = if allowed.is_empty() || rng.chance(10) {
                rng.pick(&[
                    "foo", "after_", "Prefix", "%ff", "", "a%zz", "raw%00", "limit", "wait",
                ])
                .to_string()
            } else {
                rng.pick(allowed).to_string()
            };
            let name = if rng.chance(5) {
                // The same name, percent-encoded.
                name.bytes().map(|byte| format!("%{byte:02X}")).collect()
            } else {
                name
            };
            let value = self.param_value(rng, &name);
            pairs.push(match value {
                Some(value) => format!("{name}={value}"),
                None => name,
            });
        }
        if rng.chance(8) && !pairs.is_empty() {
            let again = pairs[rng.below(pairs.len())].clone();
            pairs.push(again);
        }
        if rng.chance(5) {
            pairs.push(
                rng.pick(&["", "=", "==", "=x", "&", "%", "a=b=c", "%zz=1"])
                    .to_string(),
            );
        }
        Query { pairs }
    }

    /// A value for parameter `name`, encoded for a query (`None`: the name alone).
    fn param_value(&self, rng: &mut Rng, name: &str) -> Option<String> {
        if rng.chance(5) {
            return None;
        }
        let value = match name {
            "after" => self.token_value(rng),
            "wait" => rng
                .pick(&[
                    "0",
                    "0ms",
                    "1ms",
                    "50ms",
                    "0.2s",
                    "1",
                    "abc",
                    "-1s",
                    "1e9999s",
                    ".5s",
                    "1..2s",
                    "99999999999999999999h",
                    "",
                    "NaN",
                    "inf",
                    "5%20s",
                    "1.5.5s",
                    "18446744073709551616ms",
                ])
                .to_string(),
            "raw" => rng
                .pick(&[
                    "true", "false", "1", "0", "", "yes", "TRUE", "%ff", "true%00",
                ])
                .to_string(),
            "limit" => rng
                .pick(&[
                    "0",
                    "1",
                    "2",
                    "1000",
                    "10000",
                    "10001",
                    "18446744073709551615",
                    "18446744073709551616",
                    "-1",
                    "abc",
                    "1.5",
                    "+5",
                    "%2B5",
                    "0x10",
                    "",
                ])
                .to_string(),
            "from" => {
                let number = rng.next();
                rng.pick(&[
                    "0".to_owned(),
                    "1".to_owned(),
                    format!("{}", number % 2000),
                    format!("{number}"),
                    "18446744073709551615".to_owned(),
                    "18446744073709551616".to_owned(),
                    "-1".to_owned(),
                    "yesterday".to_owned(),
                    String::new(),
                ])
                .clone()
            }
            "prefix" | "start_after" => match rng.below(5) {
                0 => String::new(),
                1 => "keep-".to_owned(),
                2 => encode_query(&format!("fz/{}", rng.text(ALNUM, 3..4))),
                3 => rng
                    .bytes(1..20)
                    .iter()
                    .map(|byte| format!("%{byte:02x}"))
                    .collect(),
                _ => "x".repeat(rng.range(KEY_LIMIT, KEY_LIMIT + 10)),
            },
            _ => rng.text(ALNUM, 0..6),
        };
        Some(value)
    }

    /// A token for `after=`: a real one, a damaged one, or junk.
    fn token_value(&self, rng: &mut Rng) -> String {
        let real = self.some_token(rng);
        match rng.below(10) {
            0..=2 => real,
            3 | 4 => {
                // One hex digit changed: usually a valid token naming writes nobody made.
                let mut bytes = real.into_bytes();
                if !bytes.is_empty() {
                    let at = rng.below(bytes.len());
                    bytes[at] = *rng.pick(b"0123456789abcdef");
                }
                String::from_utf8(bytes).unwrap_or_default()
            }
            5 => real[..rng.below(real.len() + 1)].to_owned(),
            6 => format!("{real}{}", rng.text(b"0123456789abcdef", 1..9)),
            7 => rng.text(b"0123456789abcdef", 0..120),
            8 => "f".repeat(rng.range(60_000, 70_000)),
            _ => rng
                .pick(&[
                    "",
                    "zz",
                    "%ff",
                    "%00%01",
                    "0x01",
                    "-1",
                    "01",
                    "00",
                    "ffffffffffffffffffffffff",
                    "+",
                ])
                .to_string(),
        }
    }

    /// A JSON value of random shape, `depth` levels deep at most.
    fn json_value(&self, rng: &mut Rng, depth: usize) -> Json {
        match rng.below(if depth == 0 { 6 } else { 8 }) {
            0 => Json::Null,
            1 => json!(rng.chance(50)),
            2 => json!(rng.next() as i64),
            3 => json!((rng.next() as f64) / 7.0),
            4 => json!(rng.text(ALNUM, 0..10)),
            5 => json!(u64::MAX - rng.below(3) as u64),
            6 => Json::Array(
                (0..rng.range(0, 4))
                    .map(|_| self.json_value(rng, depth - 1))
                    .collect(),
            ),
            _ => {
                let mut object = serde_json::Map::new();
                for _ in 0..rng.range(0, 4) {
                    object.insert(rng.text(b"abcxyz", 0..3), self.json_value(rng, depth - 1));
                }
                Json::Object(object)
            }
        }
    }

    /// Bodies that are broken JSON in the usual ways.
    fn broken_json(&self, rng: &mut Rng) -> Vec<u8> {
        let depth = rng.range(60, 3000);
        let choice: Vec<u8> = match rng.below(12) {
            0 => Vec::new(),
            1 => b"{".to_vec(),
            2 => br#"{"add": 1"#.to_vec(),
            3 => b"null".to_vec(),
            4 => format!("{}{}", "[".repeat(depth), "]".repeat(depth)).into_bytes(),
            5 => format!("{}1{}", r#"{"a":"#.repeat(depth), "}".repeat(depth)).into_bytes(),
            6 => br#"{"add": 1e400}"#.to_vec(),
            7 => b"\xef\xbb\xbf{\"add\": 1}".to_vec(),
            8 => b"{\"add\": \"\xff\xfe\"}".to_vec(),
            9 => br#"{"a": "\ud800"}"#.to_vec(),
            10 => format!(r#"{{"a": {}}}"#, "9".repeat(rng.range(20, 5000))).into_bytes(),
            _ => rng.bytes(1..64),
        };
        if rng.chance(30) && !choice.is_empty() {
            let cut = rng.below(choice.len());
            return choice[..cut].to_vec();
        }
        choice
    }

    fn body_for(&self, rng: &mut Rng, route: Route, method: &str) -> (Vec<u8>, bool) {
        if rng.chance(2) {
            // Over the request body limit; or a value just over the value limit.
            let size = match rng.chance(50) {
                true => BODY_LIMIT + rng.range(1, 100_000),
                false => VALUE_LIMIT + rng.range(1, 10),
            };
            let fill = if route == Route::Set {
                let mut body = br#"{"add": [""#.to_vec();
                body.extend(std::iter::repeat_n(b'e', size));
                body.extend_from_slice(br#""]}"#);
                body
            } else {
                vec![b'x'; size]
            };
            return (fill, true);
        }
        if rng.chance(15) {
            return (self.broken_json(rng), false);
        }
        let body = match (route, method) {
            (Route::Kv, "PUT") => match rng.below(4) {
                0 => Vec::new(),
                1 => rng.bytes(1..300),
                2 => vec![b'v'; rng.range(60_000, 70_000)],
                _ => rng.text(ALNUM, 1..40).into_bytes(),
            },
            (Route::Counter, "POST") => {
                let add: Json = match rng.below(10) {
                    0 => json!(i64::MAX),
                    1 => json!(i64::MIN),
                    2 => json!(u64::MAX),
                    3 => json!(1.5),
                    4 => json!("1"),
                    5 => Json::Null,
                    6 => json!([1]),
                    _ => json!(rng.next() as i64 % 1000),
                };
                match rng.below(8) {
                    0 => json!({"add": add, "remove": 1}),
                    1 => json!({"Add": add}),
                    2 => json!([add]),
                    3 => format!(r#"{{"add": 1, "add": {add}}}"#).into(),
                    4 => json!({"add": "18446744073709551616"}),
                    _ => json!({ "add": add }),
                }
                .to_string()
                .into_bytes()
            }
            (Route::Set, "POST") => {
                let count = match rng.below(20) {
                    0 => rng.range(65_530, 65_540),
                    1 => 0,
                    _ => rng.range(1, 6),
                };
                let base64 = rng.chance(20);
                let elements: Vec<Json> = (0..count)
                    .map(|index| match rng.below(12) {
                        0 => json!(1),
                        1 => Json::Null,
                        2 => json!(""),
                        3 if base64 => json!("not base64!"),
                        4 if base64 => json!("AP8="),
                        _ if count > 1000 => json!(index.to_string()),
                        _ => json!(rng.text(ALNUM, 0..8)),
                    })
                    .collect();
                let op = *rng.pick(&["add", "remove", "add", "remove", "both", "neither"]);
                let mut body = match op {
                    "both" => json!({"add": elements.clone(), "remove": elements}),
                    "neither" => json!({}),
                    op => json!({ op: elements }),
                };
                if base64 {
                    body["encoding"] = json!(*rng.pick(&["base64", "hex", "BASE64", ""]));
                }
                if rng.chance(5) {
                    body["add"] = json!("a");
                }
                body.to_string().into_bytes()
            }
            (Route::Doc, "PATCH") => {
                let patch = match rng.below(10) {
                    0 => {
                        // Nested exactly around the 64-level limit.
                        let depth = rng.range(60, 70);
                        let mut value = json!(1);
                        for _ in 0..depth {
                            value = json!({ "n": value });
                        }
                        value
                    }
                    1 => json!([1, 2]),
                    2 => json!("text"),
                    3 => json!({"big": u64::MAX, "small": i64::MIN, "float": 1.0e308}),
                    4 => json!({"a": null, "b": {"c": null}}),
                    _ => {
                        let mut object = serde_json::Map::new();
                        for _ in 0..rng.range(0, 5) {
                            object.insert(rng.text(b"abcdefxyz", 0..4), self.json_value(rng, 4));
                        }
                        Json::Object(object)
                    }
                };
                patch.to_string().into_bytes()
            }
            _ => match rng.chance(85) {
                true => Vec::new(),
                false => rng.bytes(1..100),
            },
        };
        (body, false)
    }

    /// A well-formed HTTP/1.1 request (or one with mutated headers) to some route.
    fn http_request(&self, rng: &mut Rng, worker: u64, serial: u64) -> Request {
        let route = *rng.pick(&Route::ALL);
        let mut method = rng.pick(route.methods()).to_string();
        let mut bare_ok = false;
        let mut silence_ok = false;
        if rng.chance(15) {
            method = rng
                .pick(&[
                    "GET", "PUT", "POST", "DELETE", "PATCH", "HEAD", "OPTIONS", "TRACE", "FOO",
                    "get", "M-SEARCH", "PROPFIND",
                ])
                .to_string();
        }
        if rng.chance(1) {
            method = "X".repeat(rng.range(100, 5000));
            bare_ok = true;
        }
        let mut known_read = None;
        let path = match route.keyed() {
            Some(prefix) if rng.chance(30) => {
                let index = rng.below(self.known.len());
                let known = &self.known[index];
                let modifies = match (route, method.as_str()) {
                    (Route::Kv, "DELETE") => true,
                    (Route::Kv, "PUT") => known.kind == Kind::Register,
                    (Route::Counter, "POST") => known.kind == Kind::Counter,
                    (Route::Set, "POST") => known.kind == Kind::Set,
                    (Route::Doc, "PATCH") => known.kind == Kind::Document,
                    _ => false,
                };
                if modifies {
                    // Only refused writes may go to known keys (a type the key does not hold);
                    // this one would be accepted, so it goes to a fresh key.
                    format!("{prefix}fz/{worker}/k{serial}")
                } else {
                    let encoded = match rng.chance(20) {
                        // Every byte escaped: the same key.
                        true => known
                            .key
                            .bytes()
                            .map(|byte| format!("%{byte:02x}"))
                            .collect(),
                        false => encode_path(&known.key),
                    };
                    if route == Route::Kv && method == "GET" {
                        known_read = Some(index);
                    }
                    format!("{prefix}{encoded}")
                }
            }
            Some(prefix) => {
                let (key, long) = self.fuzz_key(rng, worker);
                bare_ok |= long;
                format!("{prefix}{key}")
            }
            None => {
                let path = route.fixed_path(rng);
                // `*` is only valid as `OPTIONS *`: hyper refuses the rest itself.
                bare_ok |= path == "*";
                path
            }
        };
        let mut query = self.query(rng, route);
        let has_after = query.cap_waits();
        let query = query.text();
        if !query.is_empty() || rng.chance(3) {
            known_read = None;
        }
        if query.len() > 60_000 {
            bare_ok = true;
        }
        let target = match (query.is_empty(), rng.chance(3)) {
            (true, true) => format!("{path}?"),
            (true, false) => path.clone(),
            (false, _) => format!("{path}?{query}"),
        };
        let (body, oversized) = self.body_for(rng, route, &method);
        silence_ok |= oversized;
        let mut request = Request {
            sent: Sent {
                method: method.clone(),
                watch: route == Route::Watch,
                bare_ok,
                silence_ok,
                has_after,
                health: route == Route::Health,
                known_read,
            },
            method,
            target,
            headers: Vec::new(),
            body,
            host: true,
            chunked: false,
            no_framing: false,
        };
        self.mutate_headers(rng, route, &mut request);
        if request.sent.bare_ok || request.sent.silence_ok {
            request.sent.known_read = None;
        }
        request
    }

    fn mutate_headers(&self, rng: &mut Rng, route: Route, request: &mut Request) {
        let headers = &mut request.headers;
        let content_type: Option<&[u8]> = match (route, rng.below(12)) {
            (Route::Doc, 0..=2) => Some(b"application/merge-patch+json"),
            (Route::Doc, 3) => Some(b"application/json; charset=utf-8"),
            (_, 4) => Some(b"text/plain"),
            (_, 5) => Some(b"APPLICATION/JSON"),
            (_, 6) => Some(b"application/json"),
            (_, 7) => Some(b"\xff\xfe/\xfd"),
            (_, 8) => Some(b""),
            (_, 9) => Some(b";;;"),
            (_, 10) => Some(b"application/merge-patch+json;"),
            _ => None,
        };
        if let Some(kind) = content_type {
            headers.push((b"Content-Type".to_vec(), kind.to_vec()));
        }
        if rng.chance(75) {
            return;
        }
        match rng.below(14) {
            0 => headers.push((b"X-Big".to_vec(), vec![b'a'; rng.range(1000, 16_000)])),
            1 => {
                headers.push((b"X-Huge".to_vec(), vec![b'b'; rng.range(100_000, 600_000)]));
                request.sent.bare_ok = true;
                request.sent.silence_ok = true;
            }
            2 => {
                for index in 0..rng.range(10, 60) {
                    headers.push((format!("X-Many-{index}").into_bytes(), b"1".to_vec()));
                }
            }
            3 => {
                for index in 0..rng.range(100, 200) {
                    headers.push((format!("X-Many-{index}").into_bytes(), b"1".to_vec()));
                }
                request.sent.bare_ok = true;
            }
            4 => {
                headers.push((b"Content-Type".to_vec(), b"text/plain".to_vec()));
                headers.push((b"Content-Type".to_vec(), b"application/json".to_vec()));
            }
            5 => {
                // The same Content-Length twice.
                request.no_framing = true;
                let length = format!("{}", request.body.len()).into_bytes();
                headers.push((b"Content-Length".to_vec(), length.clone()));
                headers.push((b"content-length".to_vec(), length));
                request.sent.bare_ok = true;
            }
            6 => {
                // Two different Content-Lengths, or one that is not a number.
                request.no_framing = true;
                let value = rng
                    .pick(&["-1", "abc", "1, 2", "18446744073709551616", " 0x10", "+0"])
                    .as_bytes()
                    .to_vec();
                headers.push((
                    b"Content-Length".to_vec(),
                    format!("{}", request.body.len()).into_bytes(),
                ));
                headers.push((b"Content-Length".to_vec(), value));
                request.sent.bare_ok = true;
                request.sent.silence_ok = true;
            }
            7 => headers.push((b"Expect".to_vec(), b"100-continue".to_vec())),
            8 => headers.push((b"Connection".to_vec(), b"close".to_vec())),
            9 => request.chunked = true,
            10 => {
                request.host = false;
                request.sent.bare_ok = true;
            }
            11 => {
                headers.push((b"X-Obs".to_vec(), b"caf\xe9 \x80\xff".to_vec()));
                request.sent.bare_ok = true;
            }
            12 => {
                headers.push((b"X-Ctl".to_vec(), b"a\x01b\x7f".to_vec()));
                request.sent.bare_ok = true;
                request.sent.silence_ok = true;
            }
            _ => {
                headers.push((b"Host".to_vec(), b"other.example".to_vec()));
                request.sent.bare_ok = true;
            }
        }
    }

    // -----------------------------------------------------------------------------------------
    // Raw bytes
    // -----------------------------------------------------------------------------------------

    fn raw_case(&self, rng: &mut Rng, node: usize, worker: u64, serial: u64) -> Case {
        let addr = self.nodes[node];
        let garbage = Sent {
            method: "GET".to_owned(),
            bare_ok: true,
            silence_ok: true,
            ..Sent::default()
        };
        let fresh_key = format!("/v1/kv/fz/raw/{worker}/{serial}");
        let mut case = Case {
            label: "raw",
            node,
            bytes: Vec::new(),
            then: Then::Read,
            sent: vec![garbage.clone()],
            absent: None,
            reuse: false,
        };
        match rng.below(8) {
            0 | 1 => {
                case.label = "raw-garbage";
                case.bytes = match rng.below(24) {
                    0 => {
                        let mut bytes = rng.bytes(1..300);
                        bytes.extend_from_slice(b"\r\n\r\n");
                        bytes
                    }
                    1 => b"GET\r\n\r\n".to_vec(),
                    2 => b"GET /\r\n\r\n".to_vec(),
                    3 => b"GET /v1/health HTTP/9.9\r\n\r\n".to_vec(),
                    4 => b"GET /v1/health HTTP/1.1\n\n".to_vec(),
                    5 => b" GET /v1/health HTTP/1.1\r\n\r\n".to_vec(),
                    6 => b"GET  /v1/health  HTTP/1.1\r\n\r\n".to_vec(),
                    7 => b"GET /v1/health HTTP/1.1\r\nHost\r\n\r\n".to_vec(),
                    8 => b"GET /v1/health HTTP/1.1\r\n: x\r\n\r\n".to_vec(),
                    9 => b"GET /v1/health HTTP/1.1\r\nX-A: 1\r\n folded\r\n\r\n".to_vec(),
                    10 => b"\r\n\r\nGET /v1/health HTTP/1.1\r\n\r\n".to_vec(),
                    11 => b"GET /v1/kv/a\x00b HTTP/1.1\r\n\r\n".to_vec(),
                    12 => b"GET /v1/kv/\xff\xfe HTTP/1.1\r\n\r\n".to_vec(),
                    13 => b"GET /v1/kv/a b HTTP/1.1\r\n\r\n".to_vec(),
                    14 => b"GE(T /v1/health HTTP/1.1\r\n\r\n".to_vec(),
                    15 => b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03\x00\x01\x02\x03".to_vec(),
                    16 => b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00".to_vec(),
                    17 => format!("GET /v1/kv/{} HTTP/1.1\r\n\r\n", "z".repeat(rng.range(70_000, 500_000)))
                        .into_bytes(),
                    18 => format!("GET /v1/health HTTP/1.1\r\nX-Big: {}\r\n\r\n", "q".repeat(rng.range(420_000, 600_000)))
                        .into_bytes(),
                    19 => format!("GET http://{addr}/v1/health HTTP/1.1\r\nHost: {addr}\r\n\r\n").into_bytes(),
                    20 => b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
                    21 => format!("CONNECT {addr} HTTP/1.1\r\nHost: {addr}\r\n\r\n").into_bytes(),
                    22 => b"GET /v1/health HTTP/1.0\r\n\r\n".to_vec(),
                    _ => b"GET /v1/health HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n".to_vec(),
                };
                case.then = *rng.pick(&[Then::Read, Then::HalfClose]);
            }
            2 => {
                // A valid write, cut short, then closed.
                case.label = "raw-truncated";
                let body = rng.text(ALNUM, 1..200);
                let full = format!(
                    "PUT {fresh_key} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
                let cut = rng.below(full.len());
                case.bytes = full.as_bytes()[..cut].to_vec();
                case.then = *rng.pick(&[Then::HalfClose, Then::Close]);
                case.absent = Some(fresh_key);
            }
            3 => {
                // A body shorter than its Content-Length.
                case.label = "raw-short-body";
                let declared = rng.range(2, 5000);
                let body = rng.text(ALNUM, 0..declared);
                let (method, path, body) = match rng.below(4) {
                    0 => (
                        "POST",
                        format!("/v1/counter/fz/raw/{worker}/{serial}"),
                        r#"{"add": 1}"#.to_owned(),
                    ),
                    1 => (
                        "PATCH",
                        format!("/v1/doc/fz/raw/{worker}/{serial}"),
                        r#"{"a": 1}"#.to_owned(),
                    ),
                    _ => ("PUT", fresh_key.clone(), body),
                };
                let declared = declared.max(body.len() + 1);
                case.bytes = format!(
                    "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: {declared}\r\n\r\n{body}"
                )
                .into_bytes();
                case.then = *rng.pick(&[Then::HalfClose, Then::Close]);
                case.sent = vec![Sent {
                    method: method.to_owned(),
                    silence_ok: true,
                    ..Sent::default()
                }];
                case.absent = Some(format!("/v1/kv/fz/raw/{worker}/{serial}"));
            }
            4 | 5 => {
                // Pipelining: several requests in one write, answered in order.
                case.label = "raw-pipelined";
                case.sent.clear();
                let count = rng.range(2, 8);
                for index in 0..count {
                    let (request, sent) = match rng.below(6) {
                        0 => {
                            let known = rng.below(self.known.len());
                            let sent = Sent {
                                method: "GET".to_owned(),
                                known_read: Some(known),
                                ..Sent::default()
                            };
                            (
                                format!(
                                    "GET {} HTTP/1.1\r\nHost: {addr}\r\n\r\n",
                                    self.known[known].path()
                                ),
                                sent,
                            )
                        }
                        1 => (
                            format!(
                                "PUT /v1/kv/fz/pipe/{worker}/{serial}/{index} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 5\r\n\r\nhello"
                            ),
                            Sent {
                                method: "PUT".to_owned(),
                                ..Sent::default()
                            },
                        ),
                        2 => (
                            format!(
                                "POST /v1/counter/fz/pipe/{worker}/c HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 9\r\n\r\n{{\"add\":1}}"
                            ),
                            Sent {
                                method: "POST".to_owned(),
                                ..Sent::default()
                            },
                        ),
                        3 => (
                            format!("GET /v1/kv/fz/x?bogus=1 HTTP/1.1\r\nHost: {addr}\r\n\r\n"),
                            Sent {
                                method: "GET".to_owned(),
                                ..Sent::default()
                            },
                        ),
                        4 => (
                            format!(
                                "POST /v1/set/fz/pipe/{worker}/s HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 7\r\n\r\n{{\"add\":"
                            ),
                            Sent {
                                method: "POST".to_owned(),
                                ..Sent::default()
                            },
                        ),
                        _ => (
                            format!("GET /v1/health HTTP/1.1\r\nHost: {addr}\r\n\r\n"),
                            Sent {
                                method: "GET".to_owned(),
                                health: true,
                                ..Sent::default()
                            },
                        ),
                    };
                    case.bytes.extend_from_slice(request.as_bytes());
                    case.sent.push(sent);
                }
                if rng.chance(20) {
                    // Garbage after the valid requests.
                    case.bytes.extend_from_slice(b"\x00\x01garbage\r\n\r\n");
                    case.sent.push(garbage.clone());
                }
                case.then = Then::Read;
            }
            _ => {
                // Chunked bodies, broken in the usual ways.
                case.label = "raw-chunked";
                let (chunks, valid): (&[u8], bool) = match rng.below(10) {
                    0 => (b"zz\r\nabc\r\n0\r\n\r\n", false),
                    1 => (b"ffffffffffffffffffff\r\nabc\r\n0\r\n\r\n", false),
                    2 => (b"3\r\nabcXX\r\n0\r\n\r\n", false),
                    3 => (b"10\r\nabc", false),
                    4 => (b"3\r\nabc\r\n", false),
                    5 => (b"-3\r\nabc\r\n0\r\n\r\n", false),
                    6 => (b"3 \r\nabc\r\n0\r\n\r\n", true),
                    7 => (b"3;ext=\"v\"\r\nabc\r\n0\r\n\r\n", true),
                    8 => (b"3\r\nabc\r\n0\r\nX-Trailer: 1\r\n\r\n", true),
                    _ => (b"0\r\n\r\n", true),
                };
                let encoding = match rng.below(5) {
                    0 => "chunked, gzip",
                    1 => "gzip",
                    2 => "CHUNKED",
                    _ => "chunked",
                };
                let mut bytes = format!(
                    "PUT {fresh_key} HTTP/1.1\r\nHost: {addr}\r\nTransfer-Encoding: {encoding}\r\n\r\n"
                )
                .into_bytes();
                bytes.extend_from_slice(chunks);
                case.bytes = bytes;
                case.then = Then::HalfClose;
                case.sent = vec![Sent {
                    method: "PUT".to_owned(),
                    bare_ok: true,
                    silence_ok: true,
                    ..Sent::default()
                }];
                if !valid && encoding.eq_ignore_ascii_case("chunked") {
                    case.absent = Some(fresh_key);
                }
            }
        }
        case
    }
}
