//! The HTTP client the `mantissa` client commands use to talk to an agent's API.
//!
//! One keep-alive HTTP/1 connection pool per [`Client`]; answers are handed back as the server's
//! JSON bytes ([`Reply`]), so `--json` can print exactly what the server said. Watches stream
//! newline-delimited JSON, read line by line with [`WatchStream::next_line`].
//!
//! ```no_run
//! # async fn example() -> Result<(), mantissa::daemon::client::ClientError> {
//! use mantissa::daemon::client::{Client, ReadOptions};
//!
//! let client = Client::new("http://127.0.0.1:7700")?;
//! let written = client.put("services/web", b"3".to_vec()).await?;
//! let token = written.json()?["token"].as_str().unwrap_or_default().to_owned();
//! let read = ReadOptions { after: Some(token), ..ReadOptions::default() };
//! println!("{}", client.get("services/web", &read).await?.text());
//! # Ok(())
//! # }
//! ```

use std::fmt::Write as _;
use std::io;
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::header::{ACCEPT, CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, StatusCode, Uri};
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

/// The agent's HTTP API address unless told otherwise.
pub const DEFAULT_ADDR: &str = "http://127.0.0.1:7700";
/// How long to wait for a TCP connection to the agent.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a request may take beyond any `wait` the caller asked the server for.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// The largest response body read into memory.
const MAX_RESPONSE_BYTES: usize = 256 * 1024 * 1024;
/// The longest line accepted in a watch stream.
const MAX_WATCH_LINE: usize = 64 * 1024 * 1024;

/// A client of one agent's HTTP API. Cheap to clone; clones share the connection pool.
#[derive(Clone, Debug)]
pub struct Client {
    /// The base URL as given (normalized), e.g. `http://127.0.0.1:7700`; names the agent in errors.
    base: String,
    http: HttpClient<HttpConnector, Full<Bytes>>,
}

/// Read options every read accepts.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReadOptions {
    /// A token from an earlier write or read: the server answers once it has applied everything
    /// the token covers, so the read is never older than what the token saw.
    pub after: Option<String>,
    /// How long the server may wait for `after` to be covered before answering 504.
    pub wait: Option<Duration>,
}

/// A successful answer: the status and the body as the server sent it.
#[derive(Clone, Debug)]
pub struct Reply {
    /// The HTTP status (2xx).
    pub status: StatusCode,
    /// The body, usually JSON.
    pub body: Bytes,
}

/// An open watch: newline-delimited JSON events as the server sends them.
#[derive(Debug)]
pub struct WatchStream {
    base: String,
    body: Incoming,
    buffer: Vec<u8>,
    ended: bool,
}

/// Why a request failed. Each message is one line meant for a person.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The `--addr` value is not an `http://` URL.
    #[error("--addr {addr:?}: {reason}")]
    BadAddress {
        /// The address as given.
        addr: String,
        /// What is wrong with it.
        reason: String,
    },
    /// No connection could be made: the agent is not running, or not at that address.
    #[error("cannot reach mantissa at {addr}: {reason} — is the agent running?")]
    Unreachable {
        /// The agent's base URL.
        addr: String,
        /// E.g. "connection refused".
        reason: String,
    },
    /// The connection failed or timed out after it was made.
    #[error("request to mantissa at {addr} failed: {reason}")]
    Transport {
        /// The agent's base URL.
        addr: String,
        /// What happened.
        reason: String,
    },
    /// The server answered with an error.
    #[error("{message}")]
    Api {
        /// The HTTP status.
        status: StatusCode,
        /// The server's machine-readable code, e.g. `not_found`.
        code: String,
        /// The server's message.
        message: String,
    },
    /// The server's answer could not be understood.
    #[error("unexpected answer from mantissa: {reason}")]
    BadResponse {
        /// What was wrong with it.
        reason: String,
    },
}

impl Client {
    /// A client of the agent at `addr`: `http://host:port` (the scheme may be left off).
    pub fn new(addr: &str) -> Result<Client, ClientError> {
        let base = normalize_base(addr)?;
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
        connector.set_nodelay(true);
        let http = HttpClient::builder(TokioExecutor::new()).build(connector);
        Ok(Client { base, http })
    }

    /// The agent's base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// `PUT /v1/kv/{key}`: writes `value` to the register at `key`.
    pub async fn put(&self, key: &str, value: Vec<u8>) -> Result<Reply, ClientError> {
        let path = format!("/v1/kv/{}", encode_key(key));
        let body = Some(("application/octet-stream", value));
        self.send(Method::PUT, &path, body, None).await
    }

    /// `GET /v1/kv/{key}`: the value at `key`, as JSON.
    pub async fn get(&self, key: &str, read: &ReadOptions) -> Result<Reply, ClientError> {
        let path = format!("/v1/kv/{}{}", encode_key(key), read.query(Vec::new()));
        self.send(Method::GET, &path, None, read.wait).await
    }

    /// `GET /v1/kv/{key}?raw=true`: the register's bytes only.
    pub async fn get_raw(&self, key: &str, read: &ReadOptions) -> Result<Reply, ClientError> {
        let query = read.query(vec![("raw", "true".to_owned())]);
        let path = format!("/v1/kv/{}{query}", encode_key(key));
        self.send(Method::GET, &path, None, read.wait).await
    }

    /// `DELETE /v1/kv/{key}`.
    pub async fn delete(&self, key: &str) -> Result<Reply, ClientError> {
        let path = format!("/v1/kv/{}", encode_key(key));
        self.send(Method::DELETE, &path, None, None).await
    }

    /// `GET /v1/kv?prefix=…`: up to `limit` keys under `prefix` that sort after `start_after`.
    pub async fn list(
        &self,
        prefix: &str,
        limit: Option<usize>,
        start_after: Option<&str>,
        read: &ReadOptions,
    ) -> Result<Reply, ClientError> {
        let mut pairs = vec![("prefix", prefix.to_owned())];
        if let Some(limit) = limit {
            pairs.push(("limit", limit.to_string()));
        }
        if let Some(start_after) = start_after {
            pairs.push(("start_after", start_after.to_owned()));
        }
        let path = format!("/v1/kv{}", read.query(pairs));
        self.send(Method::GET, &path, None, read.wait).await
    }

    /// `GET /v1/watch?prefix=…&from=…`: change events under `prefix`, streamed.
    pub async fn watch(&self, prefix: &str, from: Option<u64>) -> Result<WatchStream, ClientError> {
        let mut pairs = vec![("prefix", prefix.to_owned())];
        if let Some(from) = from {
            pairs.push(("from", from.to_string()));
        }
        let path = format!("/v1/watch{}", query(&pairs));
        let response = self.request(Method::GET, &path, None).await?;
        let status = response.status();
        if !status.is_success() {
            let body = self.read_body(response.into_body()).await?;
            return Err(api_error(status, &body));
        }
        Ok(WatchStream {
            base: self.base.clone(),
            body: response.into_body(),
            buffer: Vec::new(),
            ended: false,
        })
    }

    /// `POST /v1/counter/{key}`: adds `amount` (negative to subtract).
    pub async fn counter_add(&self, key: &str, amount: i64) -> Result<Reply, ClientError> {
        let body = serde_json::json!({ "add": amount });
        self.send_json(
            Method::POST,
            &format!("/v1/counter/{}", encode_key(key)),
            &body,
        )
        .await
    }

    /// `GET /v1/counter/{key}`.
    pub async fn counter_get(&self, key: &str, read: &ReadOptions) -> Result<Reply, ClientError> {
        self.read_typed("counter", key, read).await
    }

    /// `POST /v1/set/{key}` `{"add": [...]}`.
    pub async fn set_add(&self, key: &str, elements: &[String]) -> Result<Reply, ClientError> {
        let body = serde_json::json!({ "add": elements });
        self.send_json(Method::POST, &format!("/v1/set/{}", encode_key(key)), &body)
            .await
    }

    /// `POST /v1/set/{key}` `{"remove": [...]}`.
    pub async fn set_remove(&self, key: &str, elements: &[String]) -> Result<Reply, ClientError> {
        let body = serde_json::json!({ "remove": elements });
        self.send_json(Method::POST, &format!("/v1/set/{}", encode_key(key)), &body)
            .await
    }

    /// `GET /v1/set/{key}`.
    pub async fn set_get(&self, key: &str, read: &ReadOptions) -> Result<Reply, ClientError> {
        self.read_typed("set", key, read).await
    }

    /// `PATCH /v1/doc/{key}`: applies a JSON merge patch (RFC 7396).
    pub async fn doc_patch(
        &self,
        key: &str,
        patch: &serde_json::Value,
    ) -> Result<Reply, ClientError> {
        let path = format!("/v1/doc/{}", encode_key(key));
        let body = serde_json::to_vec(patch).expect("a JSON value always serializes");
        let body = Some(("application/merge-patch+json", body));
        self.send(Method::PATCH, &path, body, None).await
    }

    /// `GET /v1/doc/{key}`.
    pub async fn doc_get(&self, key: &str, read: &ReadOptions) -> Result<Reply, ClientError> {
        self.read_typed("doc", key, read).await
    }

    /// `GET /v1/members`.
    pub async fn members(&self, read: &ReadOptions) -> Result<Reply, ClientError> {
        let path = format!("/v1/members{}", read.query(Vec::new()));
        self.send(Method::GET, &path, None, read.wait).await
    }

    /// `GET /v1/status`.
    pub async fn status(&self, read: &ReadOptions) -> Result<Reply, ClientError> {
        let path = format!("/v1/status{}", read.query(Vec::new()));
        self.send(Method::GET, &path, None, read.wait).await
    }

    /// `POST /v1/jobs`: submits (or replaces) the job `spec` (a JSON job spec).
    pub async fn job_submit(&self, spec: &serde_json::Value) -> Result<Reply, ClientError> {
        self.send_json(Method::POST, "/v1/jobs", spec).await
    }

    /// `GET /v1/jobs`: every job with its task counts.
    pub async fn jobs(&self, read: &ReadOptions) -> Result<Reply, ClientError> {
        let path = format!("/v1/jobs{}", read.query(Vec::new()));
        self.send(Method::GET, &path, None, read.wait).await
    }

    /// `GET /v1/jobs/{name}`: the job's spec and where each task stands.
    pub async fn job_status(&self, name: &str, read: &ReadOptions) -> Result<Reply, ClientError> {
        let path = format!(
            "/v1/jobs/{}{}",
            encode_component(name),
            read.query(Vec::new())
        );
        self.send(Method::GET, &path, None, read.wait).await
    }

    /// `DELETE /v1/jobs/{name}`: stops the job.
    pub async fn job_stop(&self, name: &str) -> Result<Reply, ClientError> {
        let path = format!("/v1/jobs/{}", encode_component(name));
        self.send(Method::DELETE, &path, None, None).await
    }

    /// `GET /v1/nodes`: the machines that offer themselves.
    pub async fn nodes(&self, read: &ReadOptions) -> Result<Reply, ClientError> {
        let path = format!("/v1/nodes{}", read.query(Vec::new()));
        self.send(Method::GET, &path, None, read.wait).await
    }

    /// `GET /v1/allocations`, optionally of one machine and one job.
    pub async fn allocations(
        &self,
        node: Option<&str>,
        job: Option<&str>,
        read: &ReadOptions,
    ) -> Result<Reply, ClientError> {
        let mut pairs = Vec::new();
        if let Some(node) = node {
            pairs.push(("node", node.to_owned()));
        }
        if let Some(job) = job {
            pairs.push(("job", job.to_owned()));
        }
        let path = format!("/v1/allocations{}", read.query(pairs));
        self.send(Method::GET, &path, None, read.wait).await
    }

    /// `GET /v1/health`.
    pub async fn health(&self) -> Result<Reply, ClientError> {
        self.send(Method::GET, "/v1/health", None, None).await
    }

    async fn read_typed(
        &self,
        kind: &str,
        key: &str,
        read: &ReadOptions,
    ) -> Result<Reply, ClientError> {
        let path = format!("/v1/{kind}/{}{}", encode_key(key), read.query(Vec::new()));
        self.send(Method::GET, &path, None, read.wait).await
    }

    async fn send_json(
        &self,
        method: Method,
        path: &str,
        body: &serde_json::Value,
    ) -> Result<Reply, ClientError> {
        let body = serde_json::to_vec(body).expect("a JSON value always serializes");
        self.send(method, path, Some(("application/json", body)), None)
            .await
    }

    /// Sends a request and reads the whole answer; a non-2xx answer becomes an error.
    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<(&'static str, Vec<u8>)>,
        wait: Option<Duration>,
    ) -> Result<Reply, ClientError> {
        let limit = wait.unwrap_or_default() + REQUEST_TIMEOUT;
        let exchange = async {
            let response = self.request(method, path, body).await?;
            let status = response.status();
            let body = self.read_body(response.into_body()).await?;
            Ok::<_, ClientError>((status, body))
        };
        let (status, body) =
            tokio::time::timeout(limit, exchange)
                .await
                .map_err(|_| ClientError::Transport {
                    addr: self.base.clone(),
                    reason: format!("no answer within {}", format_duration(limit)),
                })??;
        if status.is_success() {
            Ok(Reply { status, body })
        } else {
            Err(api_error(status, &body))
        }
    }

    async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<(&'static str, Vec<u8>)>,
    ) -> Result<hyper::Response<Incoming>, ClientError> {
        let uri: Uri =
            format!("{}{path}", self.base)
                .parse()
                .map_err(|err| ClientError::BadAddress {
                    addr: self.base.clone(),
                    reason: format!("cannot build a request URL: {err}"),
                })?;
        let mut request = Request::builder()
            .method(method)
            .uri(uri)
            .header(ACCEPT, HeaderValue::from_static("application/json"));
        let body = match body {
            Some((content_type, bytes)) => {
                request = request.header(CONTENT_TYPE, HeaderValue::from_static(content_type));
                Full::new(Bytes::from(bytes))
            }
            None => Full::new(Bytes::new()),
        };
        let request = request
            .body(body)
            .expect("method, URI and static headers are valid");
        self.http
            .request(request)
            .await
            .map_err(|err| self.connection_error(&err))
    }

    async fn read_body(&self, body: Incoming) -> Result<Bytes, ClientError> {
        match Limited::new(body, MAX_RESPONSE_BYTES).collect().await {
            Ok(collected) => Ok(collected.to_bytes()),
            Err(err) => Err(ClientError::Transport {
                addr: self.base.clone(),
                reason: format!("reading the answer: {}", error_chain(err.as_ref())),
            }),
        }
    }

    fn connection_error(&self, err: &hyper_util::client::legacy::Error) -> ClientError {
        let addr = self.base.clone();
        if err.is_connect() {
            let reason = match find_io_error(err) {
                Some(io) => connect_reason(io),
                None => error_chain(err),
            };
            ClientError::Unreachable { addr, reason }
        } else {
            ClientError::Transport {
                addr,
                reason: error_chain(err),
            }
        }
    }
}

impl ReadOptions {
    /// The query string (with its `?`, or empty) for `pairs` plus these options.
    fn query(&self, mut pairs: Vec<(&'static str, String)>) -> String {
        if let Some(after) = &self.after {
            pairs.push(("after", after.clone()));
        }
        if let Some(wait) = self.wait {
            pairs.push(("wait", format_duration(wait)));
        }
        query(&pairs)
    }
}

impl Reply {
    /// The body parsed as JSON.
    pub fn json(&self) -> Result<serde_json::Value, ClientError> {
        serde_json::from_slice(&self.body).map_err(|err| ClientError::BadResponse {
            reason: format!("invalid JSON: {err}"),
        })
    }

    /// The body as text (invalid UTF-8 replaced).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

impl WatchStream {
    /// The next line of the stream (without its newline); `None` once the server ends it.
    pub async fn next_line(&mut self) -> Result<Option<String>, ClientError> {
        loop {
            if let Some(end) = self.buffer.iter().position(|&b| b == b'\n') {
                let rest = self.buffer.split_off(end + 1);
                let mut line = std::mem::replace(&mut self.buffer, rest);
                line.truncate(end);
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                if line.is_empty() {
                    continue; // keep-alive blank lines
                }
                return Ok(Some(String::from_utf8_lossy(&line).into_owned()));
            }
            if self.ended {
                if self.buffer.is_empty() {
                    return Ok(None);
                }
                let line = std::mem::take(&mut self.buffer);
                return Ok(Some(String::from_utf8_lossy(&line).into_owned()));
            }
            self.fill().await?;
        }
    }

    async fn fill(&mut self) -> Result<(), ClientError> {
        match self.body.frame().await {
            None => self.ended = true,
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    self.buffer.extend_from_slice(&data);
                }
                if self.buffer.len() > MAX_WATCH_LINE {
                    return Err(ClientError::BadResponse {
                        reason: format!("a watch line is longer than {MAX_WATCH_LINE} bytes"),
                    });
                }
            }
            Some(Err(err)) => {
                return Err(ClientError::Transport {
                    addr: self.base.clone(),
                    reason: format!("watch stream broke: {}", error_chain(&err)),
                });
            }
        }
        Ok(())
    }
}

/// Percent-encodes a key for a URL path: every byte but unreserved characters and `/`.
///
/// A path segment of only dots is encoded too, so that nothing on the way normalizes it away.
pub fn encode_key(key: &str) -> String {
    key.split('/')
        .map(|segment| {
            if !segment.is_empty() && segment.bytes().all(|b| b == b'.') {
                "%2E".repeat(segment.len())
            } else {
                encode_component(segment)
            }
        })
        .collect::<Vec<_>>()
        .join("/")
}

/// Percent-encodes a query string value: every byte but unreserved characters and `/`.
pub fn encode_component(text: &str) -> String {
    let mut encoded = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~' | b'/') {
            encoded.push(char::from(byte));
        } else {
            write!(encoded, "%{byte:02X}").expect("writing to a String cannot fail");
        }
    }
    encoded
}

/// Parses a duration written as a number and a unit: `500ms`, `5s`, `2m`, `1h` (a bare number
/// means seconds).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let expected = || format!("invalid duration {text:?}: expected e.g. 500ms, 5s, 2m or 1h");
    let number: f64 = number.parse().map_err(|_| expected())?;
    let unit_seconds = match unit.trim() {
        "ms" => 0.001,
        "" | "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        _ => return Err(expected()),
    };
    Duration::try_from_secs_f64(number * unit_seconds).map_err(|_| expected())
}

/// Writes a duration the way [`parse_duration`] reads it, e.g. `5s` or `1500ms`.
pub fn format_duration(duration: Duration) -> String {
    let millis = duration.as_millis();
    if millis.is_multiple_of(1000) {
        format!("{}s", millis / 1000)
    } else {
        format!("{millis}ms")
    }
}

/// The `?a=b&c=d` query string for `pairs`, or empty.
fn query(pairs: &[(&str, String)]) -> String {
    if pairs.is_empty() {
        return String::new();
    }
    let joined: Vec<String> = pairs
        .iter()
        .map(|(name, value)| format!("{name}={}", encode_component(value)))
        .collect();
    format!("?{}", joined.join("&"))
}

fn normalize_base(addr: &str) -> Result<String, ClientError> {
    let bad = |reason: &str| ClientError::BadAddress {
        addr: addr.to_owned(),
        reason: reason.to_owned(),
    };
    let trimmed = addr.trim();
    let with_scheme = if trimmed.contains("://") {
        trimmed.to_owned()
    } else {
        format!("http://{trimmed}")
    };
    let with_scheme = match with_scheme.split_once("://") {
        Some((scheme, rest)) => format!("{scheme}://{}", rest.trim_end_matches('/')),
        None => with_scheme,
    };
    let uri: Uri = with_scheme
        .parse()
        .map_err(|_| bad("expected a URL like http://127.0.0.1:7700"))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => return Err(bad("https is not supported; the agent's API speaks http")),
        _ => return Err(bad("expected a URL like http://127.0.0.1:7700")),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(bad("no host; expected a URL like http://127.0.0.1:7700"));
    }
    if uri.query().is_some() {
        return Err(bad("must not have a query string"));
    }
    Ok(with_scheme)
}

/// The error a non-2xx answer stands for: the server's `{"error":{"code","message"}}` when it
/// sent one.
fn api_error(status: StatusCode, body: &[u8]) -> ClientError {
    let parsed: Option<(String, String)> = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|json| {
            let error = json.get("error")?;
            let code = error.get("code")?.as_str()?.to_owned();
            let message = error.get("message")?.as_str()?.to_owned();
            Some((code, message))
        });
    let (code, message) = parsed.unwrap_or_else(|| {
        let text = String::from_utf8_lossy(body);
        let text = text.trim();
        let message = if text.is_empty() {
            format!("the server answered {status}")
        } else {
            let short: String = text.chars().take(200).collect();
            format!("the server answered {status}: {short}")
        };
        (status.as_str().to_owned(), message)
    });
    ClientError::Api {
        status,
        code,
        message,
    }
}

fn find_io_error<'a>(err: &'a (dyn std::error::Error + 'static)) -> Option<&'a io::Error> {
    let mut current = Some(err);
    while let Some(err) = current {
        if let Some(io) = err.downcast_ref::<io::Error>() {
            return Some(io);
        }
        current = err.source();
    }
    None
}

fn connect_reason(err: &io::Error) -> String {
    match err.kind() {
        io::ErrorKind::ConnectionRefused => "connection refused".to_owned(),
        io::ErrorKind::TimedOut => "connection timed out".to_owned(),
        _ => super::config::io_reason(err),
    }
}

/// An error and its causes, as one line.
fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_percent_encoded_but_keep_their_slashes() {
        assert_eq!(encode_key("services/web/replicas"), "services/web/replicas");
        assert_eq!(encode_key("a b/ü?#%"), "a%20b/%C3%BC%3F%23%25");
        assert_eq!(encode_key("x/../y/./z"), "x/%2E%2E/y/%2E/z");
        assert_eq!(encode_key("a..b/.hidden"), "a..b/.hidden");
        assert_eq!(encode_key("a//b/"), "a//b/");
    }

    #[test]
    fn query_values_are_encoded() {
        assert_eq!(
            query(&[("prefix", "jobs/a&b=c".into()), ("limit", "10".into())]),
            "?prefix=jobs/a%26b%3Dc&limit=10"
        );
        assert_eq!(query(&[]), "");
        let read = ReadOptions {
            after: Some("0a1b".into()),
            wait: Some(Duration::from_millis(2500)),
        };
        assert_eq!(read.query(Vec::new()), "?after=0a1b&wait=2500ms");
        assert_eq!(
            read.query(vec![("raw", "true".into())]),
            "?raw=true&after=0a1b&wait=2500ms"
        );
    }

    #[test]
    fn durations_parse_and_print() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("5"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("").is_err());
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("s").is_err());
        assert_eq!(format_duration(Duration::from_secs(5)), "5s");
        assert_eq!(format_duration(Duration::from_millis(1500)), "1500ms");
        assert_eq!(format_duration(Duration::ZERO), "0s");
    }

    #[test]
    fn base_addresses_are_normalized() {
        assert_eq!(
            normalize_base("http://127.0.0.1:7700/").unwrap(),
            "http://127.0.0.1:7700"
        );
        assert_eq!(
            normalize_base("10.0.0.1:7700").unwrap(),
            "http://10.0.0.1:7700"
        );
        let err = normalize_base("https://x:7700").unwrap_err().to_string();
        assert!(err.contains("https is not supported"), "{err}");
        assert!(normalize_base("http://").is_err());
        assert!(normalize_base("http://x:1?a=b").is_err());
    }

    #[test]
    fn server_errors_carry_the_servers_message() {
        let body = br#"{"error":{"code":"not_found","message":"key \"x\" not found"}}"#;
        match api_error(StatusCode::NOT_FOUND, body) {
            ClientError::Api { code, message, .. } => {
                assert_eq!(code, "not_found");
                assert_eq!(message, "key \"x\" not found");
            }
            other => panic!("{other:?}"),
        }
        let err = api_error(StatusCode::BAD_GATEWAY, b"upstream down");
        assert_eq!(
            err.to_string(),
            "the server answered 502 Bad Gateway: upstream down"
        );
    }

    #[tokio::test]
    async fn refused_connection_says_so() {
        // Bind then drop a listener: its port is then (almost certainly) closed.
        let port = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap().port()
        };
        let client = Client::new(&format!("http://127.0.0.1:{port}")).unwrap();
        let err = client.health().await.unwrap_err().to_string();
        assert_eq!(
            err,
            format!(
                "cannot reach mantissa at http://127.0.0.1:{port}: connection refused — is the \
                 agent running?"
            )
        );
    }

    #[tokio::test]
    async fn watch_lines_are_split_across_frames() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut request = [0u8; 4096];
            let _ = socket.read(&mut request).await.unwrap();
            let head = "HTTP/1.1 200 OK\r\ncontent-type: application/x-ndjson\r\n\
                        transfer-encoding: chunked\r\n\r\n";
            socket.write_all(head.as_bytes()).await.unwrap();
            for chunk in [
                "{\"cursor\":1,",
                "\"key\":\"a\"}\n\n{\"cursor\":2}\n",
                "{\"tail\":1}",
            ] {
                let framed = format!("{:x}\r\n{chunk}\r\n", chunk.len());
                socket.write_all(framed.as_bytes()).await.unwrap();
                socket.flush().await.unwrap();
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            socket.write_all(b"0\r\n\r\n").await.unwrap();
        });
        let client = Client::new(&format!("http://{addr}")).unwrap();
        let mut watch = client.watch("", Some(3)).await.unwrap();
        let mut lines = Vec::new();
        while let Some(line) = watch.next_line().await.unwrap() {
            lines.push(line);
        }
        assert_eq!(
            lines,
            [
                "{\"cursor\":1,\"key\":\"a\"}",
                "{\"cursor\":2}",
                "{\"tail\":1}"
            ]
        );
    }
}
