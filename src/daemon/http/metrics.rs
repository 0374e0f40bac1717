//! `GET /metrics`: the HTTP layer's own counters and the node's status, in the Prometheus text
//! exposition format (version 0.0.4).

use std::collections::BTreeMap;
use std::fmt::{Display, Write as _};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::extract::State;
use axum::http::header::{CONTENT_TYPE, HeaderValue};
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::daemon::http::AppState;
use crate::runtime::Status;

/// The content type of the text exposition format.
const CONTENT_TYPE_PROMETHEUS: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Writes through the API, by kind (the label of `mantissa_http_writes_total`).
#[derive(Clone, Copy, Debug)]
pub(super) enum WriteKind {
    Put,
    Delete,
    CounterAdd,
    SetAdd,
    SetRemove,
    DocumentPatch,
}

impl WriteKind {
    const ALL: [WriteKind; 6] = [
        WriteKind::Put,
        WriteKind::Delete,
        WriteKind::CounterAdd,
        WriteKind::SetAdd,
        WriteKind::SetRemove,
        WriteKind::DocumentPatch,
    ];

    fn label(self) -> &'static str {
        match self {
            WriteKind::Put => "put",
            WriteKind::Delete => "delete",
            WriteKind::CounterAdd => "counter_add",
            WriteKind::SetAdd => "set_add",
            WriteKind::SetRemove => "set_remove",
            WriteKind::DocumentPatch => "document_patch",
        }
    }
}

/// Reads through the API, by kind (the label of `mantissa_http_reads_total`).
#[derive(Clone, Copy, Debug)]
pub(super) enum ReadKind {
    Get,
    List,
    Watch,
}

impl ReadKind {
    const ALL: [ReadKind; 3] = [ReadKind::Get, ReadKind::List, ReadKind::Watch];

    fn label(self) -> &'static str {
        match self {
            ReadKind::Get => "get",
            ReadKind::List => "list",
            ReadKind::Watch => "watch",
        }
    }
}

/// The HTTP layer's counters, shared by every request.
#[derive(Debug, Default)]
pub(super) struct Metrics {
    /// Requests by (route template, method, status): bounded, since routes are templates and
    /// unusual methods count as `OTHER`.
    requests: Mutex<BTreeMap<(String, &'static str, u16), u64>>,
    writes: [AtomicU64; WriteKind::ALL.len()],
    reads: [AtomicU64; ReadKind::ALL.len()],
    watches_open: AtomicU64,
    session_waits: AtomicU64,
    session_timeouts: AtomicU64,
}

impl Metrics {
    pub(super) fn request(&self, route: &str, method: &Method, status: StatusCode) {
        let method = match *method {
            Method::GET => "GET",
            Method::HEAD => "HEAD",
            Method::PUT => "PUT",
            Method::POST => "POST",
            Method::PATCH => "PATCH",
            Method::DELETE => "DELETE",
            Method::OPTIONS => "OPTIONS",
            _ => "OTHER",
        };
        let mut requests = self
            .requests
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *requests
            .entry((route.to_owned(), method, status.as_u16()))
            .or_default() += 1;
    }

    pub(super) fn wrote(&self, kind: WriteKind) {
        self.writes[kind as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn read(&self, kind: ReadKind) {
        self.reads[kind as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn session_waited(&self) {
        self.session_waits.fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn session_timed_out(&self) {
        self.session_timeouts.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts an open watch stream until the guard is dropped.
    pub(super) fn watch_opened(&self) -> OpenWatch<'_> {
        self.watches_open.fetch_add(1, Ordering::Relaxed);
        OpenWatch(self)
    }

    fn render(&self, out: &mut Exposition) {
        out.family(
            "mantissa_http_requests_total",
            "counter",
            "HTTP requests answered, by route template, method and status code.",
        );
        let requests = self
            .requests
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for ((route, method, status), count) in requests.iter() {
            let status = status.to_string();
            let labels = [
                ("route", route.as_str()),
                ("method", method),
                ("status", &status),
            ];
            out.sample("mantissa_http_requests_total", &labels, count);
        }
        drop(requests);
        out.family(
            "mantissa_http_writes_total",
            "counter",
            "Writes made through the HTTP API, by kind.",
        );
        for kind in WriteKind::ALL {
            let count = self.writes[kind as usize].load(Ordering::Relaxed);
            out.sample(
                "mantissa_http_writes_total",
                &[("kind", kind.label())],
                count,
            );
        }
        out.family(
            "mantissa_http_reads_total",
            "counter",
            "Reads served through the HTTP API, by kind (watch counts streams opened).",
        );
        for kind in ReadKind::ALL {
            let count = self.reads[kind as usize].load(Ordering::Relaxed);
            out.sample(
                "mantissa_http_reads_total",
                &[("kind", kind.label())],
                count,
            );
        }
        out.single(
            "mantissa_http_watches_open",
            "gauge",
            "Watch streams open now.",
            self.watches_open.load(Ordering::Relaxed),
        );
        out.single(
            "mantissa_http_session_waits_total",
            "counter",
            "Requests that carried an after= token to wait for.",
            self.session_waits.load(Ordering::Relaxed),
        );
        out.single(
            "mantissa_http_session_timeouts_total",
            "counter",
            "Requests whose after= token was not covered within the wait (504).",
            self.session_timeouts.load(Ordering::Relaxed),
        );
    }
}

/// Keeps `mantissa_http_watches_open` counting one stream while alive.
pub(super) struct OpenWatch<'a>(&'a Metrics);

impl Drop for OpenWatch<'_> {
    fn drop(&mut self) {
        self.0.watches_open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// `GET /metrics`. Still answers when the node has stopped, with `mantissa_up 0`.
pub(super) async fn metrics(State(shared): State<AppState>) -> Response {
    let status = shared.handle.status().await.ok();
    let mut out = Exposition::default();
    out.single(
        "mantissa_up",
        "gauge",
        "1 when the node answered this scrape, 0 when it has stopped.",
        u8::from(status.is_some()),
    );
    shared.metrics.render(&mut out);
    if let Some(status) = &status {
        render_status(status, &mut out);
    }
    let mut response = (StatusCode::OK, out.text).into_response();
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static(CONTENT_TYPE_PROMETHEUS),
    );
    response
}

fn render_status(status: &Status, out: &mut Exposition) {
    let stats = &status.stats;
    let counters: [(&str, &str, u64); 12] = [
        (
            "mantissa_messages_sent_total",
            "Protocol messages sent.",
            stats.messages_sent,
        ),
        (
            "mantissa_messages_received_total",
            "Protocol messages received.",
            stats.messages_received,
        ),
        (
            "mantissa_bytes_sent_total",
            "Protocol bytes sent.",
            stats.bytes_sent,
        ),
        (
            "mantissa_bytes_received_total",
            "Protocol bytes received.",
            stats.bytes_received,
        ),
        (
            "mantissa_writes_received_total",
            "Peers' writes (deltas) received for the first time.",
            stats.writes_received,
        ),
        (
            "mantissa_duplicate_writes_total",
            "Peers' writes (deltas) received again.",
            stats.duplicate_writes,
        ),
        (
            "mantissa_grafts_total",
            "Writes requested after an announcement because the push tree did not deliver them in time.",
            stats.grafts,
        ),
        (
            "mantissa_anti_entropy_rounds_total",
            "Anti-entropy rounds this node opened.",
            stats.anti_entropy_rounds,
        ),
        (
            "mantissa_anti_entropy_repairs_total",
            "Anti-entropy rounds that found something to exchange.",
            stats.anti_entropy_repairs,
        ),
        (
            "mantissa_rejected_messages_total",
            "Messages dropped because they were malformed or forged.",
            stats.rejected_messages,
        ),
        (
            "mantissa_tombstones_collected_total",
            "Tombstones collected once every live member had seen them.",
            stats.tombstones_collected,
        ),
        (
            "mantissa_change_cursor",
            "The change feed's latest cursor (watch positions).",
            status.cursor,
        ),
    ];
    for (name, help, value) in counters {
        let kind = if name.ends_with("_total") {
            "counter"
        } else {
            "gauge"
        };
        out.single(name, kind, help, value);
    }
    out.family(
        "mantissa_bytes_sent_by_kind_total",
        "counter",
        "Protocol bytes sent, by message kind.",
    );
    for (kind, bytes) in &stats.bytes_sent_by_kind {
        out.sample(
            "mantissa_bytes_sent_by_kind_total",
            &[("kind", kind)],
            bytes,
        );
    }
    out.single(
        "mantissa_peers",
        "gauge",
        "Live peers (other members).",
        status.peers.len(),
    );
    out.single(
        "mantissa_held_back_deltas",
        "gauge",
        "Peers' writes held back waiting for their causes.",
        status.held_back,
    );
    out.single(
        "mantissa_tombstones",
        "gauge",
        "Tombstones not yet collected.",
        status.tombstones,
    );
    out.family(
        "mantissa_peer_lag_writes",
        "gauge",
        "Writes a peer lacked compared to this node at its last anti-entropy report.",
    );
    for (peer, lag) in &status.peers {
        if let Some(lag) = lag {
            out.sample(
                "mantissa_peer_lag_writes",
                &[("peer", peer.name.as_str())],
                lag,
            );
        }
    }
    let transport = &status.transport;
    let transport_metrics = [
        (
            "mantissa_handshakes_refused_total",
            "TLS handshakes refused: a peer with a certificate from another CA, expired, or for another name.",
            transport.handshakes_refused,
        ),
        (
            "mantissa_connections_dialed_total",
            "QUIC connections this node opened.",
            transport.connections_dialed,
        ),
        (
            "mantissa_connections_accepted_total",
            "QUIC connections this node accepted.",
            transport.connections_accepted,
        ),
        (
            "mantissa_oversized_messages_dropped_total",
            "Incoming messages dropped for exceeding the size limit.",
            transport.oversized_dropped,
        ),
        (
            "mantissa_datagrams_dropped_total",
            "Incoming datagrams dropped because the node was behind.",
            transport.datagrams_dropped,
        ),
    ];
    for (name, help, value) in transport_metrics {
        out.single(name, "counter", help, value);
    }
    out.single(
        "mantissa_peer_queue_dropped_total",
        "counter",
        "Outgoing messages dropped because a peer's queue was full (in messages or bytes).",
        status.peer_queue_dropped,
    );
    for (family, help) in [
        (
            "mantissa_buffer_bytes",
            "Bytes held by each bounded buffer the node keeps for others (values shared between buffers count in each).",
        ),
        (
            "mantissa_buffer_budget_bytes",
            "The most bytes each bounded buffer may hold (see --buffer-memory).",
        ),
        (
            "mantissa_buffer_items",
            "Items held by each bounded buffer.",
        ),
    ] {
        out.family(family, "gauge", help);
        for buffer in &status.buffers {
            let value = match family {
                "mantissa_buffer_bytes" => buffer.bytes,
                "mantissa_buffer_budget_bytes" => buffer.budget,
                _ => buffer.items,
            };
            out.sample(family, &[("buffer", buffer.name)], value);
        }
    }
    out.single(
        "mantissa_watchers_paused",
        "gauge",
        "Watchers paused because their reader fell a queue's budget behind.",
        status.watchers_paused,
    );
    out.single(
        "mantissa_inbox_bytes",
        "gauge",
        "Payload bytes of received messages not yet handled.",
        transport.inbox_bytes,
    );
    out.single(
        "mantissa_inbox_bytes_max",
        "gauge",
        "The most payload bytes of received messages held at once.",
        transport.inbox_bytes_max,
    );
    let Some(storage) = &status.storage else {
        return;
    };
    let storage_metrics: [(&str, &str, &str, String); 10] = [
        (
            "mantissa_storage_commits_total",
            "counter",
            "Storage transactions committed (one fsync each).",
            storage.commits.to_string(),
        ),
        (
            "mantissa_storage_deltas_written_total",
            "counter",
            "Deltas written to the log.",
            storage.deltas_written.to_string(),
        ),
        (
            "mantissa_storage_bytes_written_total",
            "counter",
            "Bytes written to the log.",
            storage.bytes_written.to_string(),
        ),
        (
            "mantissa_storage_sync_seconds_total",
            "counter",
            "Time spent committing.",
            storage.sync_time.as_secs_f64().to_string(),
        ),
        (
            "mantissa_storage_sync_seconds_max",
            "gauge",
            "The slowest commit so far.",
            storage.max_sync.as_secs_f64().to_string(),
        ),
        (
            "mantissa_storage_checkpoints_total",
            "counter",
            "Snapshots written.",
            storage.checkpoints.to_string(),
        ),
        (
            "mantissa_storage_log_bytes",
            "gauge",
            "Bytes in the log since the last snapshot.",
            storage.log_bytes.to_string(),
        ),
        (
            "mantissa_storage_snapshot_bytes",
            "gauge",
            "Size of the last snapshot.",
            storage.snapshot_bytes.to_string(),
        ),
        (
            "mantissa_storage_failed",
            "gauge",
            "1 once a commit has failed: writes are no longer durable (see /v1/status).",
            u8::from(storage.failure.is_some()).to_string(),
        ),
        (
            "mantissa_storage_replayed_deltas",
            "gauge",
            "Deltas replayed from the log when the node started.",
            storage.replayed.to_string(),
        ),
    ];
    for (name, kind, help, value) in storage_metrics {
        out.single(name, kind, help, value);
    }
}

/// A text exposition being written.
#[derive(Default)]
struct Exposition {
    text: String,
}

impl Exposition {
    /// The HELP and TYPE lines of a metric family.
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.text, "# HELP {name} {help}");
        let _ = writeln!(self.text, "# TYPE {name} {kind}");
    }

    /// One sample.
    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl Display) {
        self.text.push_str(name);
        if !labels.is_empty() {
            self.text.push('{');
            for (index, (label, value)) in labels.iter().enumerate() {
                if index > 0 {
                    self.text.push(',');
                }
                let _ = write!(self.text, "{label}=\"{}\"", escape(value));
            }
            self.text.push('}');
        }
        let _ = writeln!(self.text, " {value}");
    }

    /// A family with one unlabelled sample.
    fn single(&mut self, name: &str, kind: &str, help: &str, value: impl Display) {
        self.family(name, kind, help);
        self.sample(name, &[], value);
    }
}

/// Escapes a label value: backslash, double quote and newline.
fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_have_escaped_labels() {
        let mut out = Exposition::default();
        out.family("mantissa_x_total", "counter", "X.");
        out.sample("mantissa_x_total", &[("a", "q\"b\\\n"), ("b", "c")], 3);
        assert_eq!(
            out.text,
            "# HELP mantissa_x_total X.\n# TYPE mantissa_x_total counter\nmantissa_x_total{a=\"q\\\"b\\\\\\n\",b=\"c\"} 3\n"
        );
    }

    #[test]
    fn request_counts_group_by_route_method_and_status() {
        let metrics = Metrics::default();
        metrics.request("/v1/kv/{*key}", &Method::GET, StatusCode::OK);
        metrics.request("/v1/kv/{*key}", &Method::GET, StatusCode::OK);
        metrics.request(
            "/v1/kv/{*key}",
            &Method::from_bytes(b"BREW").unwrap(),
            StatusCode::METHOD_NOT_ALLOWED,
        );
        let mut out = Exposition::default();
        metrics.render(&mut out);
        assert!(out.text.contains(
            "mantissa_http_requests_total{route=\"/v1/kv/{*key}\",method=\"GET\",status=\"200\"} 2\n"
        ));
        assert!(out.text.contains("method=\"OTHER\",status=\"405\"} 1\n"));
    }
}
