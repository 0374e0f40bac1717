//! The JSON shapes of the API: values with their type, keys, members and status.
//!
//! Bytes (keys, register values, set elements) are JSON strings when they are UTF-8, and base64
//! (standard alphabet, padded) with a sibling `…encoding: "base64"` field when they are not.

use axum::http::StatusCode;
use axum::http::header::{CONTENT_TYPE, HeaderValue};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde_json::{Map, Value as Json, json};

use crate::crdt::{Change, Event, Key, Token, Value, VersionVector};
use crate::gossip::Member;
use crate::runtime::{StateDigest, Status, StorageStats, TransportStats};

/// A JSON response, newline-terminated so it reads well from curl.
pub(super) fn json_response(status: StatusCode, body: &Json) -> Response {
    let mut text = body.to_string();
    text.push('\n');
    let mut response = (status, text).into_response();
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// Puts `bytes` at `field`: a string when UTF-8, else base64 with `encoding_field` set.
fn put_bytes(map: &mut Map<String, Json>, field: &str, encoding_field: &str, bytes: &[u8]) {
    match std::str::from_utf8(bytes) {
        Ok(text) => {
            map.insert(field.to_owned(), Json::from(text));
        }
        Err(_) => {
            map.insert(field.to_owned(), Json::from(BASE64.encode(bytes)));
            map.insert(encoding_field.to_owned(), Json::from("base64"));
        }
    }
}

/// `{"key": …}` (with `"key_encoding": "base64"` when the key is not UTF-8).
pub(super) fn key_object(key: &Key) -> Map<String, Json> {
    let mut map = Map::new();
    put_bytes(&mut map, "key", "key_encoding", key.as_bytes());
    map
}

/// The answer to a write: the key and the write's token (`null` when nothing was written).
pub(super) fn written(key: &Key, token: Option<&Token>) -> Json {
    let mut map = key_object(key);
    map.insert(
        "token".to_owned(),
        token.map_or(Json::Null, |token| Json::from(token.to_string())),
    );
    Json::Object(map)
}

/// Adds `"type"`, `"value"` (and `"encoding"`, and `"siblings"` for a register) for `value`.
pub(super) fn put_value(map: &mut Map<String, Json>, value: &Value) {
    map.insert("type".to_owned(), Json::from(value.kind().name()));
    match value {
        Value::Register(register) => {
            put_bytes(map, "value", "encoding", &register.value);
            let siblings = register
                .siblings
                .iter()
                .map(|sibling| {
                    let mut entry = Map::new();
                    put_bytes(&mut entry, "value", "encoding", &sibling.value);
                    Json::Object(entry)
                })
                .collect();
            map.insert("siblings".to_owned(), Json::Array(siblings));
        }
        Value::Counter(total) => {
            map.insert("value".to_owned(), Json::from(*total));
        }
        Value::Set(elements) => {
            // One encoding for the whole set, so a client decodes every element the same way.
            let texts: Option<Vec<&str>> = elements
                .iter()
                .map(|element| std::str::from_utf8(element).ok())
                .collect();
            let elements = match texts {
                Some(texts) => texts.into_iter().map(Json::from).collect(),
                None => {
                    map.insert("encoding".to_owned(), Json::from("base64"));
                    elements
                        .iter()
                        .map(|element| Json::from(BASE64.encode(element)))
                        .collect()
                }
            };
            map.insert("value".to_owned(), Json::Array(elements));
        }
        Value::Document(document) => {
            map.insert("value".to_owned(), document.clone());
        }
    }
}

/// A key and its value: a list item.
pub(super) fn item(key: &Key, value: &Value) -> Json {
    let mut map = key_object(key);
    put_value(&mut map, value);
    Json::Object(map)
}

/// A key, its value and the read's token: the answer to a GET.
pub(super) fn read(key: &Key, value: &Value, token: &Token) -> Json {
    let mut map = key_object(key);
    put_value(&mut map, value);
    map.insert("token".to_owned(), Json::from(token.to_string()));
    Json::Object(map)
}

/// One line of a watch stream.
pub(super) fn event(event: &Event) -> Json {
    let mut map = Map::new();
    map.insert("cursor".to_owned(), Json::from(event.cursor));
    put_bytes(&mut map, "key", "key_encoding", event.key.as_bytes());
    match &event.change {
        Change::Put(value) => {
            map.insert("kind".to_owned(), Json::from("put"));
            put_value(&mut map, value);
        }
        Change::Delete => {
            map.insert("kind".to_owned(), Json::from("delete"));
        }
    }
    Json::Object(map)
}

/// A member: name, replica id (16 hex digits), address and generation.
pub(super) fn member(member: &Member) -> Map<String, Json> {
    let mut map = Map::new();
    map.insert("name".to_owned(), Json::from(member.name.as_str()));
    map.insert("replica".to_owned(), Json::from(member.replica.to_string()));
    map.insert("addr".to_owned(), Json::from(member.addr.to_string()));
    map.insert("generation".to_owned(), Json::from(member.generation));
    map
}

/// `GET /v1/members`: this node first (`"self": true`), then its live peers by name.
pub(super) fn members(status: &Status) -> Json {
    let mut me = member(&status.me);
    me.insert("self".to_owned(), Json::from(true));
    let mut peers: Vec<&Member> = status.peers.iter().map(|(member, _)| member).collect();
    peers.sort_by(|a, b| a.name.cmp(&b.name));
    let members = std::iter::once(me)
        .chain(peers.into_iter().map(|peer| {
            let mut map = member(peer);
            map.insert("self".to_owned(), Json::from(false));
            map
        }))
        .map(Json::Object)
        .collect();
    json!({ "members": Json::Array(members) })
}

/// `GET /v1/digest`. The digest is hexadecimal text: JSON numbers lose bits above 2^53.
pub(super) fn digest(digest: &StateDigest) -> Json {
    json!({
        "digest": format!("{:016x}", digest.digest),
        "version": version(&digest.version),
    })
}

/// A version vector as a JSON object: replica id → writes applied.
fn version(version: &VersionVector) -> Json {
    Json::Object(
        version
            .iter()
            .map(|(node, seq)| (node.to_string(), Json::from(seq)))
            .collect(),
    )
}

/// `GET /v1/status`.
pub(super) fn status(status: &Status) -> Json {
    let mut peers: Vec<(&Member, Option<u64>)> = status
        .peers
        .iter()
        .map(|(member, lag)| (member, *lag))
        .collect();
    peers.sort_by(|a, b| a.0.name.cmp(&b.0.name));
    let peers: Vec<Json> = peers
        .into_iter()
        .map(|(peer, lag)| {
            let mut map = member(peer);
            map.insert("lag".to_owned(), lag.map_or(Json::Null, Json::from));
            Json::Object(map)
        })
        .collect();
    let stats = &status.stats;
    json!({
        "name": status.me.name.as_str(),
        "replica": status.me.replica.to_string(),
        "addr": status.me.addr.to_string(),
        "generation": status.me.generation,
        "version": version(&status.version),
        "cursor": status.cursor,
        "peers": peers,
        "held_back": status.held_back,
        "tombstones": status.tombstones,
        "stats": {
            "messages_sent": stats.messages_sent,
            "bytes_sent": stats.bytes_sent,
            "bytes_sent_by_kind": stats.bytes_sent_by_kind,
            "messages_received": stats.messages_received,
            "bytes_received": stats.bytes_received,
            "writes_received": stats.writes_received,
            "duplicate_writes": stats.duplicate_writes,
            "grafts": stats.grafts,
            "anti_entropy_rounds": stats.anti_entropy_rounds,
            "anti_entropy_repairs": stats.anti_entropy_repairs,
            "rejected_messages": stats.rejected_messages,
            "tombstones_collected": stats.tombstones_collected,
        },
        "storage": status.storage.as_ref().map_or(Json::Null, storage),
        "transport": transport(&status.transport),
        "buffers": buffers(status),
    })
}

/// Each bounded buffer by name: what it holds and may hold.
fn buffers(status: &Status) -> Json {
    let mut map = Map::new();
    for buffer in &status.buffers {
        map.insert(
            buffer.name.to_owned(),
            json!({ "items": buffer.items, "bytes": buffer.bytes, "budget": buffer.budget }),
        );
    }
    map.insert(
        "watchers_paused".to_owned(),
        Json::from(status.watchers_paused),
    );
    Json::Object(map)
}

fn transport(stats: &TransportStats) -> Json {
    json!({
        "handshakes_refused": stats.handshakes_refused,
        "connections_dialed": stats.connections_dialed,
        "connections_accepted": stats.connections_accepted,
        "oversized_dropped": stats.oversized_dropped,
        "datagrams_dropped": stats.datagrams_dropped,
    })
}

fn storage(storage: &StorageStats) -> Json {
    json!({
        "path": storage.path.display().to_string(),
        "commits": storage.commits,
        "deltas_written": storage.deltas_written,
        "bytes_written": storage.bytes_written,
        "sync_seconds": storage.sync_time.as_secs_f64(),
        "max_sync_seconds": storage.max_sync.as_secs_f64(),
        "checkpoints": storage.checkpoints,
        "log_bytes": storage.log_bytes,
        "snapshot_bytes": storage.snapshot_bytes,
        "replayed": storage.replayed,
        "failure": storage.failure,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crdt::{Hlc, NodeId, Register, Sibling};

    fn hlc() -> Hlc {
        Hlc {
            millis: 1,
            logical: 0,
            node: NodeId(1),
        }
    }

    #[test]
    fn utf8_values_are_strings_and_other_bytes_base64() {
        let register = Value::Register(Register {
            value: vec![0xff, 0x00].into(),
            written_at: hlc(),
            siblings: vec![Sibling {
                value: b"other".into(),
                written_at: hlc(),
            }],
        });
        let json = item(&Key::new("k").unwrap(), &register);
        assert_eq!(
            json,
            json!({
                "key": "k",
                "type": "register",
                "value": "/wA=",
                "encoding": "base64",
                "siblings": [{ "value": "other" }],
            })
        );
        let key = Key::new([0x80u8]).unwrap();
        let json = item(&key, &Value::Counter(-3));
        assert_eq!(
            json,
            json!({ "key": "gA==", "key_encoding": "base64", "type": "counter", "value": -3 })
        );
    }

    #[test]
    fn a_set_with_one_binary_element_is_all_base64() {
        let set = Value::Set(vec![b"a".to_vec(), vec![0xff]]);
        let json = item(&Key::new("s").unwrap(), &set);
        assert_eq!(json["encoding"], "base64");
        assert_eq!(json["value"], json!(["YQ==", "/w=="]));
        let text = Value::Set(vec![b"a".to_vec(), b"b".to_vec()]);
        let json = item(&Key::new("s").unwrap(), &text);
        assert_eq!(json.get("encoding"), None);
        assert_eq!(json["value"], json!(["a", "b"]));
    }
}
