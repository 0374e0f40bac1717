//! The API end to end: real nodes (QUIC with mutual TLS on 127.0.0.1), the API served on a
//! loopback port, and an HTTP client.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::http::header::{ALLOW, CONTENT_TYPE};
use axum::http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value as Json, json};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::{HEARTBEAT, HttpOptions, Shared, serve, serve_shared};
use crate::crdt::{Dot, NodeId, Token};
use crate::runtime::{ClusterCa, Handle, NodeConfig, TlsConfig, start};

/// A bound on waits for things that should happen quickly, generous for a loaded machine.
const PATIENCE: Duration = Duration::from_secs(20);

fn any_port() -> SocketAddr {
    "127.0.0.1:0".parse().expect("valid address")
}

async fn node(ca: &ClusterCa, name: &str, seeds: Vec<SocketAddr>) -> Handle {
    let credentials = ca.issue(name, Duration::from_secs(3600)).expect("issue");
    let tls = TlsConfig::new(ca.cert_pem(), &credentials).expect("tls config");
    start(NodeConfig::new(any_port(), tls, seeds))
        .await
        .expect("start")
}

/// A node with the API served in front of it.
struct Server {
    base: String,
    node: Handle,
    client: Client<HttpConnector, Full<Bytes>>,
    stop: Option<oneshot::Sender<()>>,
    served: JoinHandle<std::io::Result<()>>,
}

/// An answer, read to the end.
struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Reply {
    fn json(&self) -> Json {
        assert_eq!(
            self.headers.get(CONTENT_TYPE).map(|v| v.to_str().unwrap()),
            Some("application/json"),
            "status {}, body {:?}",
            self.status,
            String::from_utf8_lossy(&self.body)
        );
        serde_json::from_slice(&self.body).expect("a JSON body")
    }

    /// Asserts an error answer: its status, its code, and that it is JSON.
    fn assert_error(&self, status: StatusCode, code: &str) {
        let body = self.json();
        assert_eq!(self.status, status, "body {body}");
        assert_eq!(body["error"]["code"], code, "body {body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty())
        );
    }
}

impl Server {
    async fn start(node: Handle, options: HttpOptions, heartbeat: Duration) -> Server {
        let listener = tokio::net::TcpListener::bind(any_port())
            .await
            .expect("bind");
        let base = format!("http://{}", listener.local_addr().expect("address"));
        let (stop, stopped) = oneshot::channel::<()>();
        let shared = Shared::new(node.clone(), options, heartbeat);
        let served = tokio::spawn(serve_shared(listener, shared, async {
            let _ = stopped.await;
        }));
        Server {
            base,
            node,
            client: Client::builder(TokioExecutor::new()).build_http(),
            stop: Some(stop),
            served,
        }
    }

    async fn single(name: &str) -> Server {
        let ca = ClusterCa::generate("test").expect("ca");
        Server::start(
            node(&ca, name, vec![]).await,
            HttpOptions::default(),
            HEARTBEAT,
        )
        .await
    }

    async fn open(
        &self,
        method: Method,
        path: &str,
        content_type: Option<&str>,
        body: impl Into<Bytes>,
    ) -> hyper::Response<Incoming> {
        let mut request = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base));
        if let Some(content_type) = content_type {
            request = request.header(CONTENT_TYPE, content_type);
        }
        let request = request.body(Full::new(body.into())).expect("request");
        tokio::time::timeout(PATIENCE, self.client.request(request))
            .await
            .expect("an answer within the patience")
            .expect("a response")
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        content_type: Option<&str>,
        body: impl Into<Bytes>,
    ) -> Reply {
        let response = self.open(method, path, content_type, body).await;
        let (parts, body) = response.into_parts();
        let body = body.collect().await.expect("the whole body").to_bytes();
        Reply {
            status: parts.status,
            headers: parts.headers,
            body,
        }
    }

    async fn get(&self, path: &str) -> Reply {
        self.send(Method::GET, path, None, Bytes::new()).await
    }

    async fn put(&self, path: &str, value: impl Into<Bytes>) -> Reply {
        self.send(Method::PUT, path, None, value).await
    }

    async fn post_json(&self, path: &str, body: Json) -> Reply {
        self.send(
            Method::POST,
            path,
            Some("application/json"),
            body.to_string(),
        )
        .await
    }

    /// Writes `value` at `key` and returns the write's token.
    async fn write(&self, key: &str, value: &str) -> String {
        let reply = self.put(&format!("/v1/kv/{key}"), value.to_owned()).await;
        assert_eq!(reply.status, StatusCode::OK);
        reply.json()["token"].as_str().expect("a token").to_owned()
    }

    /// Stops serving and returns what `serve` returned.
    async fn stop(mut self) -> std::io::Result<()> {
        let _ = self.stop.take().expect("running").send(());
        tokio::time::timeout(PATIENCE, self.served)
            .await
            .expect("serve returns after shutdown")
            .expect("serve did not panic")
    }
}

/// Reads a watch stream line by line.
struct Lines {
    body: Incoming,
    buffer: Vec<u8>,
}

impl Lines {
    fn new(response: hyper::Response<Incoming>) -> Lines {
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(
            response.headers().get(CONTENT_TYPE).unwrap(),
            "application/x-ndjson"
        );
        Lines {
            body: response.into_body(),
            buffer: Vec::new(),
        }
    }

    /// The next line as JSON; `None` when the stream ended.
    async fn next(&mut self) -> Option<Json> {
        loop {
            if let Some(end) = self.buffer.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buffer.drain(..=end).collect();
                return Some(serde_json::from_slice(&line).expect("each line is JSON"));
            }
            let frame = tokio::time::timeout(PATIENCE, self.body.frame())
                .await
                .expect("a line within the patience");
            match frame {
                Some(frame) => {
                    if let Ok(data) = frame.expect("a frame").into_data() {
                        self.buffer.extend_from_slice(&data);
                    }
                }
                None => {
                    assert!(self.buffer.is_empty(), "a partial last line");
                    return None;
                }
            }
        }
    }

    /// The next line that is not a heartbeat.
    async fn next_event(&mut self) -> Option<Json> {
        loop {
            let line = self.next().await?;
            if line.get("heartbeat").is_none() {
                return Some(line);
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_value_round_trips_as_text_base64_or_raw_bytes() {
    let server = Server::single("node-a").await;
    let reply = server.put("/v1/kv/jobs/web%2F1", "v1").await;
    assert_eq!(reply.status, StatusCode::OK);
    let written = reply.json();
    assert_eq!(written["key"], "jobs/web/1");
    let token: Token = written["token"].as_str().unwrap().parse().expect("a token");

    let read = server.get("/v1/kv/jobs/web/1").await.json();
    assert_eq!(read["key"], "jobs/web/1");
    assert_eq!(read["type"], "register");
    assert_eq!(read["value"], "v1");
    assert_eq!(read["siblings"], json!([]));
    assert_eq!(read.get("encoding"), None);
    let read_token: Token = read["token"].as_str().unwrap().parse().expect("a token");
    assert!(token.is_covered_by(read_token.version()));

    let binary = vec![0u8, 0xff, 0xfe, b'x'];
    assert_eq!(
        server.put("/v1/kv/bin", binary.clone()).await.status,
        StatusCode::OK
    );
    let read = server.get("/v1/kv/bin").await.json();
    assert_eq!(read["encoding"], "base64");
    assert_eq!(read["value"], "AP/+eA==");

    let raw = server.get("/v1/kv/bin?raw=true").await;
    assert_eq!(raw.status, StatusCode::OK);
    assert_eq!(raw.headers[CONTENT_TYPE], "application/octet-stream");
    assert_eq!(raw.body.to_vec(), binary);
    let raw_token = raw.headers["mantissa-token"].to_str().unwrap();
    assert!(raw_token.parse::<Token>().is_ok());

    let empty = server.put("/v1/kv/empty", Bytes::new()).await;
    assert_eq!(empty.status, StatusCode::OK);
    assert_eq!(server.get("/v1/kv/empty").await.json()["value"], "");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absent_and_deleted_keys_are_404() {
    let server = Server::single("node-a").await;
    server
        .get("/v1/kv/nothing")
        .await
        .assert_error(StatusCode::NOT_FOUND, "not_found");
    server
        .send(Method::DELETE, "/v1/kv/nothing", None, Bytes::new())
        .await
        .assert_error(StatusCode::NOT_FOUND, "not_found");
    server.write("gone", "soon").await;
    let deleted = server
        .send(Method::DELETE, "/v1/kv/gone", None, Bytes::new())
        .await;
    assert_eq!(deleted.status, StatusCode::OK);
    let deleted = deleted.json();
    assert_eq!(deleted["key"], "gone");
    assert!(deleted["token"].as_str().unwrap().parse::<Token>().is_ok());
    server
        .get("/v1/kv/gone")
        .await
        .assert_error(StatusCode::NOT_FOUND, "not_found");
    server
        .get("/v1/counter/gone")
        .await
        .assert_error(StatusCode::NOT_FOUND, "not_found");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_page_through_a_prefix_in_key_order() {
    let server = Server::single("node-a").await;
    for key in ["svc/e", "svc/a", "svc/c", "svc/b", "svc/d", "svd/x", "svb"] {
        server.write(key, &format!("value of {key}")).await;
    }
    let keys = |page: &Json| -> Vec<String> {
        page["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|item| item["key"].as_str().unwrap().to_owned())
            .collect()
    };
    let first = server.get("/v1/kv?prefix=svc/&limit=2").await.json();
    assert_eq!(keys(&first), ["svc/a", "svc/b"]);
    assert_eq!(first["more"], true);
    assert!(first["token"].as_str().unwrap().parse::<Token>().is_ok());
    assert_eq!(first["items"][0]["value"], "value of svc/a");
    assert_eq!(first["items"][0]["type"], "register");

    let second = server
        .get("/v1/kv?prefix=svc%2F&limit=2&start_after=svc/b")
        .await
        .json();
    assert_eq!(keys(&second), ["svc/c", "svc/d"]);
    assert_eq!(second["more"], true);
    let last = server
        .get("/v1/kv?prefix=svc/&limit=2&start_after=svc/d")
        .await
        .json();
    assert_eq!(keys(&last), ["svc/e"]);
    assert_eq!(last["more"], false);

    let all = server.get("/v1/kv").await.json();
    assert_eq!(all["items"].as_array().unwrap().len(), 7);
    assert_eq!(all["more"], false);
    let none = server.get("/v1/kv?prefix=zzz").await.json();
    assert_eq!(none["items"], json!([]));

    server
        .get("/v1/kv?limit=0")
        .await
        .assert_error(StatusCode::BAD_REQUEST, "bad_request");
    server
        .get("/v1/kv?limit=x")
        .await
        .assert_error(StatusCode::BAD_REQUEST, "bad_request");
    server
        .get("/v1/kv?after_key=a")
        .await
        .assert_error(StatusCode::BAD_REQUEST, "bad_request");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_sets_and_documents_have_their_own_routes() {
    let server = Server::single("node-a").await;
    let added = server
        .post_json("/v1/counter/hits", json!({ "add": 5 }))
        .await;
    assert_eq!(added.status, StatusCode::OK);
    assert_eq!(added.json()["key"], "hits");
    server
        .post_json("/v1/counter/hits", json!({ "add": -2 }))
        .await;
    let counter = server.get("/v1/counter/hits").await.json();
    assert_eq!(counter["type"], "counter");
    assert_eq!(counter["value"], 3);
    assert!(counter["token"].is_string());
    assert_eq!(server.get("/v1/kv/hits").await.json()["value"], 3);

    server
        .post_json("/v1/set/tags", json!({ "add": ["b", "a", "c"] }))
        .await;
    let removed = server
        .post_json("/v1/set/tags", json!({ "remove": ["a"] }))
        .await
        .json();
    assert!(removed["token"].is_string());
    let absent = server
        .post_json("/v1/set/tags", json!({ "remove": ["zz"] }))
        .await;
    assert_eq!(absent.status, StatusCode::OK);
    assert_eq!(absent.json()["token"], Json::Null);
    let set = server.get("/v1/set/tags").await.json();
    assert_eq!(set["type"], "set");
    assert_eq!(set["value"], json!(["b", "c"]));
    server
        .post_json("/v1/set/empty", json!({ "add": ["x"] }))
        .await;
    server
        .post_json("/v1/set/empty", json!({ "remove": ["x"] }))
        .await;
    server
        .get("/v1/set/empty")
        .await
        .assert_error(StatusCode::NOT_FOUND, "not_found");
    server
        .post_json(
            "/v1/set/bytes",
            json!({ "add": ["/w=="], "encoding": "base64" }),
        )
        .await;
    let bytes = server.get("/v1/set/bytes").await.json();
    assert_eq!(
        (bytes["value"].clone(), bytes["encoding"].clone()),
        (json!(["/w=="]), json!("base64"))
    );

    let patch = |body: Json| {
        server.send(
            Method::PATCH,
            "/v1/doc/spec",
            Some("application/merge-patch+json"),
            body.to_string(),
        )
    };
    assert_eq!(
        patch(json!({ "image": "web:1", "env": { "A": "1", "B": "2" } }))
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(
        patch(json!({ "env": { "A": null } })).await.status,
        StatusCode::OK
    );
    let document = server.get("/v1/doc/spec").await.json();
    assert_eq!(document["type"], "document");
    assert_eq!(
        document["value"],
        json!({ "image": "web:1", "env": { "B": "2" } })
    );

    server
        .get("/v1/counter/tags")
        .await
        .assert_error(StatusCode::CONFLICT, "wrong_type");
    server
        .get("/v1/doc/hits")
        .await
        .assert_error(StatusCode::CONFLICT, "wrong_type");
    server
        .get("/v1/kv/hits?raw=true")
        .await
        .assert_error(StatusCode::CONFLICT, "wrong_type");
    server
        .post_json("/v1/counter/tags", json!({ "add": 1 }))
        .await
        .assert_error(StatusCode::CONFLICT, "wrong_type");
    server
        .put("/v1/kv/tags", "x")
        .await
        .assert_error(StatusCode::CONFLICT, "wrong_type");
    patch(json!([1, 2]))
        .await
        .assert_error(StatusCode::BAD_REQUEST, "invalid_document");
    server
        .send(Method::PATCH, "/v1/doc/spec", Some("text/plain"), "{}")
        .await
        .assert_error(StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type");
    server
        .post_json("/v1/counter/hits", json!({ "add": 1.5 }))
        .await
        .assert_error(StatusCode::BAD_REQUEST, "invalid_json");
    server
        .post_json("/v1/counter/hits", json!({ "add": 1, "extra": true }))
        .await
        .assert_error(StatusCode::BAD_REQUEST, "invalid_json");
    server
        .post_json("/v1/set/tags", json!({ "add": ["x"], "remove": ["y"] }))
        .await
        .assert_error(StatusCode::BAD_REQUEST, "invalid_json");
    server
        .post_json("/v1/set/tags", json!({ "add": [] }))
        .await
        .assert_error(StatusCode::BAD_REQUEST, "nothing_to_write");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_after_a_token_wait_for_it_or_time_out() {
    let server = Server::single("node-a").await;
    let token = server.write("k", "v").await;
    let started = Instant::now();
    let read = server.get(&format!("/v1/kv/k?after={token}")).await;
    assert_eq!(read.status, StatusCode::OK);
    assert!(started.elapsed() < PATIENCE);
    let list = server
        .get(&format!("/v1/kv?prefix=k&after={token}&wait=1s"))
        .await;
    assert_eq!(list.status, StatusCode::OK);

    let unseen = Token::from_dot(Dot::new(NodeId(0xdead), 1)).to_string();
    let started = Instant::now();
    let late = server
        .get(&format!("/v1/kv/k?after={unseen}&wait=200ms"))
        .await;
    late.assert_error(StatusCode::GATEWAY_TIMEOUT, "timeout");
    assert!(started.elapsed() >= Duration::from_millis(200));
    server
        .post_json(
            &format!("/v1/counter/c?after={unseen}&wait=50ms"),
            json!({ "add": 1 }),
        )
        .await
        .assert_error(StatusCode::GATEWAY_TIMEOUT, "timeout");
    server
        .get("/v1/counter/c")
        .await
        .assert_error(StatusCode::NOT_FOUND, "not_found");

    server
        .get("/v1/kv/k?after=zz")
        .await
        .assert_error(StatusCode::BAD_REQUEST, "invalid_token");
    server
        .get("/v1/kv/k?after=abcd")
        .await
        .assert_error(StatusCode::BAD_REQUEST, "invalid_token");
    server
        .get(&format!("/v1/kv/k?after={token}&wait=5x"))
        .await
        .assert_error(StatusCode::BAD_REQUEST, "invalid_duration");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_from_one_node_makes_another_wait_until_it_has_the_write() {
    let ca = ClusterCa::generate("test").expect("ca");
    let first = node(&ca, "node-a", vec![]).await;
    let second = node(&ca, "node-b", vec![first.addr()]).await;
    let a = Server::start(first, HttpOptions::default(), HEARTBEAT).await;
    let b = Server::start(second, HttpOptions::default(), HEARTBEAT).await;
    let token = a.write("config/mode", "blue").await;
    let read = b
        .get(&format!("/v1/kv/config/mode?after={token}&wait=20s"))
        .await;
    assert_eq!(read.status, StatusCode::OK, "{:?}", read.body);
    assert_eq!(read.json()["value"], "blue");
    let members = b.get(&format!("/v1/members?after={token}")).await.json();
    let names: Vec<&str> = members["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    assert_eq!(names[0], "node-b");
    assert_eq!(members["members"][0]["self"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_json_errors_never_plain_text() {
    let ca = ClusterCa::generate("test").expect("ca");
    let options = HttpOptions {
        max_body_bytes: 1024,
        ..HttpOptions::default()
    };
    let server = Server::start(node(&ca, "node-a", vec![]).await, options, HEARTBEAT).await;
    server
        .put("/v1/kv/big", vec![b'x'; 1025])
        .await
        .assert_error(StatusCode::PAYLOAD_TOO_LARGE, "body_too_large");
    assert_eq!(
        server.put("/v1/kv/big", vec![b'x'; 1024]).await.status,
        StatusCode::OK
    );
    server
        .send(
            Method::POST,
            "/v1/counter/c",
            Some("application/json"),
            "{\"add\":",
        )
        .await
        .assert_error(StatusCode::BAD_REQUEST, "invalid_json");
    let long_key = "k".repeat(4097);
    server
        .put(&format!("/v1/kv/{long_key}"), "v")
        .await
        .assert_error(StatusCode::BAD_REQUEST, "invalid_key");
    server
        .put("/v1/kv/", "v")
        .await
        .assert_error(StatusCode::BAD_REQUEST, "invalid_key");
    server
        .get("/v1/set/")
        .await
        .assert_error(StatusCode::BAD_REQUEST, "invalid_key");
    server
        .get("/v1/kv/a%zz")
        .await
        .assert_error(StatusCode::BAD_REQUEST, "bad_request");
    server
        .get("/v1/nothing/here")
        .await
        .assert_error(StatusCode::NOT_FOUND, "no_route");
    server
        .get("/")
        .await
        .assert_error(StatusCode::NOT_FOUND, "no_route");
    let wrong_method = server.send(Method::POST, "/v1/kv/x", None, "v").await;
    wrong_method.assert_error(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed");
    let allow = wrong_method.headers[ALLOW].to_str().unwrap();
    assert!(allow.contains("PUT") && allow.contains("DELETE"), "{allow}");
    server
        .send(Method::DELETE, "/v1/members", None, Bytes::new())
        .await
        .assert_error(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed");
    server
        .get("/v1/kv/x?bogus=1")
        .await
        .assert_error(StatusCode::BAD_REQUEST, "bad_request");
}

#[tokio::test]
async fn bodies_without_a_length_are_limited_as_they_stream() {
    let body = Body::from(vec![b'x'; 100]);
    let error = super::request::read_body(&HeaderMap::new(), body, 99)
        .await
        .expect_err("over the limit");
    assert_eq!(
        (error.status, error.code),
        (StatusCode::PAYLOAD_TOO_LARGE, "body_too_large")
    );
    let body = Body::from(vec![b'x'; 99]);
    let read = super::request::read_body(&HeaderMap::new(), body, 99).await;
    assert_eq!(read.expect("within the limit").len(), 99);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_streams_changes_and_resumes_from_a_cursor_without_loss_or_repeats() {
    let server = Server::single("node-a").await;
    server.write("w/before", "0").await;
    let mut stream = Lines::new(
        server
            .open(Method::GET, "/v1/watch?prefix=w/", None, Bytes::new())
            .await,
    );
    let start = stream.next().await.expect("a first line");
    let start = start["heartbeat"]
        .as_u64()
        .expect("the stream starts with a heartbeat");
    assert!(start >= 1, "the earlier write is before the start");

    server.write("w/a", "1").await;
    server.write("other", "x").await;
    server
        .post_json("/v1/counter/w/n", json!({ "add": 2 }))
        .await;
    server
        .send(Method::DELETE, "/v1/kv/w/a", None, Bytes::new())
        .await;
    let put = stream.next_event().await.expect("an event");
    assert_eq!(
        (
            put["key"].clone(),
            put["kind"].clone(),
            put["type"].clone(),
            put["value"].clone()
        ),
        (json!("w/a"), json!("put"), json!("register"), json!("1"))
    );
    let counter = stream.next_event().await.expect("an event");
    assert_eq!(
        (counter["key"].clone(), counter["value"].clone()),
        (json!("w/n"), json!(2))
    );
    let deleted = stream.next_event().await.expect("an event");
    assert_eq!(deleted["kind"], "delete");
    assert_eq!(deleted.get("value"), None);
    let cursors: Vec<u64> = [&put, &counter, &deleted]
        .iter()
        .map(|e| e["cursor"].as_u64().unwrap())
        .collect();
    assert!(cursors[0] > start && cursors[0] < cursors[1] && cursors[1] < cursors[2]);
    drop(stream);

    // Written while nobody watches; the resumed stream must deliver exactly these and the delete.
    server.write("w/b", "2").await;
    server.write("w/c", "3").await;
    let resume = cursors[1];
    let mut resumed = Lines::new(
        server
            .open(
                Method::GET,
                &format!("/v1/watch?prefix=w/&from={resume}"),
                None,
                Bytes::new(),
            )
            .await,
    );
    assert_eq!(resumed.next().await.expect("a line")["heartbeat"], resume);
    let mut seen = Vec::new();
    for _ in 0..3 {
        let event = resumed.next_event().await.expect("an event");
        seen.push((
            event["cursor"].as_u64().unwrap(),
            event["key"].as_str().unwrap().to_owned(),
        ));
    }
    assert_eq!(seen[0], (cursors[2], "w/a".to_owned()));
    assert_eq!(seen[1].1, "w/b");
    assert_eq!(seen[2].1, "w/c");
    assert!(seen.windows(2).all(|pair| pair[0].0 < pair[1].0));
    server.write("w/d", "4").await;
    assert_eq!(resumed.next_event().await.expect("an event")["key"], "w/d");

    server
        .get("/v1/watch?from=999999")
        .await
        .assert_error(StatusCode::BAD_REQUEST, "invalid_cursor");
    server
        .get("/v1/watch?from=x")
        .await
        .assert_error(StatusCode::BAD_REQUEST, "bad_request");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_watches_get_heartbeats_and_end_with_a_line_on_shutdown() {
    let ca = ClusterCa::generate("test").expect("ca");
    let node = node(&ca, "node-a", vec![]).await;
    let server = Server::start(node, HttpOptions::default(), Duration::from_millis(50)).await;
    server.write("q/x", "1").await;
    let mut stream = Lines::new(
        server
            .open(Method::GET, "/v1/watch?prefix=q/", None, Bytes::new())
            .await,
    );
    let first = stream.next().await.expect("a line")["heartbeat"]
        .as_u64()
        .expect("a heartbeat");
    let second = stream.next().await.expect("a line");
    assert_eq!(second, json!({ "heartbeat": first }));

    // A read waiting for a token nobody will write must not hold the shutdown open either.
    let unseen = Token::from_dot(Dot::new(NodeId(0xdead), 1)).to_string();
    let client = server.client.clone();
    let url = format!("{}/v1/kv/q/x?after={unseen}&wait=60s", server.base);
    let waiting = tokio::spawn(async move {
        let response = client.get(url.parse().unwrap()).await.expect("a response");
        response.status()
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    server.stop().await.expect("serve ends cleanly");
    let last = loop {
        let line = stream.next().await.expect("a last line before the end");
        if line.get("heartbeat").is_none() {
            break line;
        }
    };
    assert_eq!(last["error"]["code"], "shutting_down");
    assert_eq!(stream.next().await, None);
    assert_eq!(waiting.await.unwrap(), StatusCode::SERVICE_UNAVAILABLE);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_public_serve_shuts_down_when_asked() {
    let ca = ClusterCa::generate("test").expect("ca");
    let node = node(&ca, "node-a", vec![]).await;
    let listener = tokio::net::TcpListener::bind(any_port())
        .await
        .expect("bind");
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let served = tokio::spawn(serve(listener, node, HttpOptions::default(), async {
        let _ = stopped.await;
    }));
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let response = client
        .get(format!("http://{addr}/v1/health").parse().unwrap())
        .await
        .expect("a response");
    assert_eq!(response.status(), StatusCode::OK);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let health: Json = serde_json::from_slice(&body).unwrap();
    assert_eq!(health, json!({ "status": "ok", "name": "node-a" }));
    stop.send(()).unwrap();
    tokio::time::timeout(PATIENCE, served)
        .await
        .expect("serve returns")
        .unwrap()
        .expect("no IO error");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn digests_are_equal_once_two_nodes_hold_the_same_writes() {
    let ca = ClusterCa::generate("test").expect("ca");
    let first = node(&ca, "node-a", vec![]).await;
    let second = node(&ca, "node-b", vec![first.addr()]).await;
    let a = Server::start(first, HttpOptions::default(), HEARTBEAT).await;
    let b = Server::start(second, HttpOptions::default(), HEARTBEAT).await;
    let empty = a.get("/v1/digest").await.json();
    assert_eq!(empty["digest"].as_str().unwrap().len(), 16);
    assert_eq!(empty["version"], json!({}));

    let token = a.write("config/mode", "blue").await;
    let written = a.get("/v1/digest").await.json();
    assert_ne!(written["digest"], empty["digest"]);
    let replica = a.get("/v1/status").await.json()["replica"].clone();
    assert_eq!(written["version"][replica.as_str().unwrap()], 1);
    // The token makes node-b answer only once it holds the write: then both hold one write.
    let other = b
        .get(&format!("/v1/digest?after={token}&wait=20s"))
        .await
        .json();
    assert_eq!(other["digest"], written["digest"]);
    assert_eq!(other["version"], written["version"]);
    a.get("/v1/digest?wait=oops")
        .await
        .assert_error(StatusCode::BAD_REQUEST, "invalid_duration");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_members_and_metrics_describe_the_node() {
    let server = Server::single("node-a").await;
    server.write("m/a", "1").await;
    server.get("/v1/kv/m/a").await;
    server.get("/v1/kv/nope").await;

    let status = server.get("/v1/status").await.json();
    assert_eq!(status["name"], "node-a");
    assert_eq!(status["replica"].as_str().unwrap().len(), 16);
    assert_eq!(status["version"][status["replica"].as_str().unwrap()], 1);
    assert!(status["cursor"].as_u64().unwrap() >= 1);
    assert_eq!(status["peers"], json!([]));
    assert_eq!(status["storage"], Json::Null);
    assert!(status["stats"]["messages_sent"].is_u64());
    assert!(status["stats"]["bytes_sent_by_kind"].is_object());

    let members = server.get("/v1/members").await.json();
    assert_eq!(members["members"].as_array().unwrap().len(), 1);
    assert_eq!(members["members"][0]["name"], "node-a");
    assert_eq!(members["members"][0]["replica"], status["replica"]);

    let metrics = server.get("/metrics").await;
    assert_eq!(metrics.status, StatusCode::OK);
    assert!(
        metrics.headers[CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("text/plain; version=0.0.4")
    );
    let text = String::from_utf8(metrics.body.to_vec()).unwrap();
    for expected in [
        "mantissa_up 1\n",
        "# TYPE mantissa_http_requests_total counter\n",
        "mantissa_http_requests_total{route=\"/v1/kv/{*key}\",method=\"PUT\",status=\"200\"} 1\n",
        "mantissa_http_requests_total{route=\"/v1/kv/{*key}\",method=\"GET\",status=\"404\"} 1\n",
        "mantissa_http_writes_total{kind=\"put\"} 1\n",
        "mantissa_http_reads_total{kind=\"get\"} 2\n",
        "# TYPE mantissa_peers gauge\nmantissa_peers 0\n",
        "# TYPE mantissa_messages_sent_total counter\n",
        "# TYPE mantissa_anti_entropy_rounds_total counter\n",
        "# TYPE mantissa_held_back_deltas gauge\n",
        "# TYPE mantissa_tombstones gauge\n",
        "# TYPE mantissa_tombstones_collected_total counter\n",
        "# HELP mantissa_bytes_sent_by_kind_total ",
    ] {
        assert!(
            text.contains(expected),
            "{expected:?} missing from:\n{text}"
        );
    }
    for line in text.lines().filter(|line| !line.starts_with('#')) {
        let (name, value) = line.rsplit_once(' ').expect("name and value");
        assert!(name.starts_with("mantissa_"), "{line}");
        assert!(value.parse::<f64>().is_ok(), "{line}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_node_is_unhealthy_and_its_requests_are_503() {
    let server = Server::single("node-a").await;
    assert_eq!(server.get("/v1/health").await.json()["status"], "ok");
    server.node.shutdown().await.expect("shutdown");
    server
        .get("/v1/health")
        .await
        .assert_error(StatusCode::SERVICE_UNAVAILABLE, "stopped");
    server
        .get("/v1/kv/k")
        .await
        .assert_error(StatusCode::SERVICE_UNAVAILABLE, "stopped");
    server
        .put("/v1/kv/k", "v")
        .await
        .assert_error(StatusCode::SERVICE_UNAVAILABLE, "stopped");
    let metrics = server.get("/metrics").await;
    assert_eq!(metrics.status, StatusCode::OK);
    assert!(String::from_utf8_lossy(&metrics.body).contains("mantissa_up 0\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_beyond_the_watch_queue_reaches_a_reader_that_keeps_up_whole() {
    // More than a watcher's queue holds: the node replays the rest from its change feed as the
    // reader makes room, instead of cutting it off.
    const WRITES: usize = 5000;
    let server = Server::single("node-a").await;
    for index in 0..WRITES {
        server
            .node
            .put(format!("b/{index:05}"), "x")
            .await
            .expect("put");
    }
    let mut keys = Vec::new();
    let mut from = 0;
    let path = format!("/v1/watch?prefix=b/&from={from}");
    let mut stream = Lines::new(server.open(Method::GET, &path, None, Bytes::new()).await);
    assert_eq!(stream.next().await.expect("a line")["heartbeat"], from);
    while keys.len() < WRITES {
        let line = stream.next_event().await.expect("a line");
        assert!(
            line.get("error").is_none(),
            "after {} events: {line}",
            keys.len()
        );
        let cursor = line["cursor"].as_u64().expect("a cursor");
        assert!(
            cursor > from,
            "cursor {cursor} repeats or goes back from {from}"
        );
        from = cursor;
        keys.push(line["key"].as_str().expect("a key").to_owned());
    }
    let expected: Vec<String> = (0..WRITES).map(|index| format!("b/{index:05}")).collect();
    assert_eq!(keys, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_spec_with_unknown_fields_is_refused_naming_them() {
    let server = Server::single("node-a").await;
    let group = |extra: Json| {
        let mut group = json!({
            "name": "api", "count": 1,
            "resources": { "cpu_millis": 100, "memory_bytes": 1024 }
        });
        group
            .as_object_mut()
            .expect("an object")
            .extend(extra.as_object().expect("an object").clone());
        group
    };
    let typo_at_top = json!({ "name": "web", "prority": 10, "groups": [group(json!({}))] });
    let typo_in_group = json!({
        "name": "web", "groups": [group(json!({ "constrains": { "labels": { "zone": "mars" } } }))]
    });
    let typo_in_resources = json!({
        "name": "web",
        "groups": [{ "name": "api", "count": 1, "resources": { "cpu": 100 } }]
    });
    for (spec, field) in [
        (typo_at_top, "prority"),
        (typo_in_group, "constrains"),
        (typo_in_resources, "cpu"),
    ] {
        let reply = server.post_json("/v1/jobs", spec).await;
        reply.assert_error(StatusCode::BAD_REQUEST, "invalid_json");
        let message = reply.json()["error"]["message"].to_string();
        assert!(message.contains(&format!("`{field}`")), "{message}");
    }
    server
        .get("/v1/jobs/web")
        .await
        .assert_error(StatusCode::NOT_FOUND, "not_found");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_spec_takes_memory_as_a_size_like_the_memory_flag() {
    let server = Server::single("node-a").await;
    let spec = json!({
        "name": "web",
        "groups": [{ "name": "api", "count": 1,
                     "resources": { "cpu_millis": 100, "memory_bytes": "1GiB" } }]
    });
    let reply = server.post_json("/v1/jobs", spec).await;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    let status = server.get("/v1/jobs/web").await.json();
    assert_eq!(
        status["spec"]["groups"][0]["resources"]["memory_bytes"],
        1u64 << 30
    );
    let bad_unit = json!({
        "name": "web",
        "groups": [{ "name": "api", "count": 1,
                     "resources": { "cpu_millis": 100, "memory_bytes": "1 parsec" } }]
    });
    let reply = server.post_json("/v1/jobs", bad_unit).await;
    reply.assert_error(StatusCode::BAD_REQUEST, "invalid_json");
    let message = reply.json()["error"]["message"].to_string();
    assert!(message.contains("1 parsec"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_counter_at_the_top_of_its_range_refuses_to_overflow() {
    let server = Server::single("node-a").await;
    let add = |amount: i64| server.post_json("/v1/counter/c", json!({ "add": amount }));
    assert_eq!(add(i64::MAX).await.status, StatusCode::OK);
    add(1)
        .await
        .assert_error(StatusCode::CONFLICT, "counter_overflow");
    assert_eq!(server.get("/v1/counter/c").await.json()["value"], i64::MAX);
    assert_eq!(add(-1).await.status, StatusCode::OK);
    assert_eq!(
        server.get("/v1/counter/c").await.json()["value"],
        i64::MAX - 1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_spec_is_taken_whatever_content_type_curl_declares() {
    let server = Server::single("node-a").await;
    let spec = json!({
        "name": "web",
        "groups": [{ "name": "api", "count": 1, "resources": { "cpu_millis": 100 } }]
    });
    // `curl -d` declares application/x-www-form-urlencoded unless told otherwise.
    let reply = server
        .send(
            Method::POST,
            "/v1/jobs",
            Some("application/x-www-form-urlencoded"),
            spec.to_string(),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    assert_eq!(reply.json()["job"], "web");
    let not_json = server
        .send(Method::POST, "/v1/jobs", Some("text/plain"), "name=web")
        .await;
    not_json.assert_error(StatusCode::BAD_REQUEST, "invalid_json");
}
