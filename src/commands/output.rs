//! Human-readable renderings of the API's JSON answers (`--json` prints the answers as they are).
//!
//! Each function takes the server's JSON and returns text; a field the server left out shows as
//! `?` rather than failing, so an older or newer agent still gets a readable answer.

use std::fmt::Write as _;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde_json::Value as Json;

/// The widest key column in a listing; longer keys push their value to the right.
const MAX_KEY_COLUMN: usize = 40;
/// The most characters of a value a one-line summary shows (values reach 1 MiB).
const MAX_SUMMARY: usize = 200;

/// Text for stdout, and notes for stderr (which a script capturing stdout does not get).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Shown {
    /// What goes to stdout.
    pub stdout: String,
    /// Remarks for a person, each printed on stderr.
    pub notes: Vec<String>,
}

/// Bytes the API sent as a UTF-8 string, or as base64 when they were not UTF-8.
#[derive(Debug, PartialEq, Eq)]
enum Bytes {
    Text(String),
    Binary(Vec<u8>),
}

/// One line about a write: what was done, to which key, and the write's token (a write that
/// changed nothing, such as removing absent set elements, has none).
pub fn written(done: &str, reply: &Json) -> String {
    let key = key_of(reply);
    match reply.get("token").and_then(Json::as_str) {
        Some(token) => format!("{done} {key}; token {token}"),
        None => format!("nothing to change in {key}"),
    }
}

/// The value of a key read: the value itself on stdout; for a register with concurrent values, a
/// note about them.
pub fn value(reply: &Json) -> Shown {
    let mut shown = Shown::default();
    let kind = reply.get("type").and_then(Json::as_str).unwrap_or("?");
    match kind {
        "register" => {
            shown.stdout = match bytes(reply, "value", "encoding") {
                Bytes::Text(text) => format!("{text}\n"),
                Bytes::Binary(data) => format!(
                    "(binary value, {} bytes; use --raw to write out the bytes)\n",
                    data.len()
                ),
            };
            let siblings: Vec<String> = reply
                .get("siblings")
                .and_then(Json::as_array)
                .into_iter()
                .flatten()
                .map(|sibling| inline(&bytes(sibling, "value", "encoding")))
                .collect();
            if !siblings.is_empty() {
                shown.notes.push(format!(
                    "{} also holds {} value{} written concurrently: {} (writers raced; the next \
                     write replaces them all)",
                    key_of(reply),
                    siblings.len(),
                    plural(siblings.len()),
                    siblings.join(", ")
                ));
            }
        }
        "counter" => shown.stdout = format!("{}\n", field(reply, "value")),
        "set" => {
            for element in elements(reply) {
                shown.stdout.push_str(&inline(&element));
                shown.stdout.push('\n');
            }
            if shown.stdout.is_empty() {
                shown
                    .notes
                    .push(format!("{} is an empty set", key_of(reply)));
            }
        }
        "document" => {
            let document = reply.get("value").unwrap_or(&Json::Null);
            let pretty =
                serde_json::to_string_pretty(document).expect("a JSON value always serializes");
            shown.stdout = format!("{pretty}\n");
        }
        _ => shown.stdout = format!("{}\n", summary(reply)),
    }
    shown
}

/// A listing: one line per key, `key  value`.
pub fn list(reply: &Json, prefix: &str) -> Shown {
    let items: &[Json] = reply
        .get("items")
        .and_then(Json::as_array)
        .map_or(&[], Vec::as_slice);
    let keys: Vec<String> = items.iter().map(plain_key).collect();
    let width = keys
        .iter()
        .map(|key| key.chars().count())
        .filter(|&width| width <= MAX_KEY_COLUMN)
        .max()
        .unwrap_or(0);
    let mut shown = Shown::default();
    for (key, item) in keys.iter().zip(items) {
        let line = format!("{key:<width$}  {}", summary(item));
        shown.stdout.push_str(line.trim_end());
        shown.stdout.push('\n');
    }
    if items.is_empty() {
        shown.notes.push(format!("no keys under {prefix:?}"));
    }
    if reply.get("more").and_then(Json::as_bool) == Some(true)
        && let Some(last) = items.last()
    {
        shown.notes.push(format!(
            "more keys follow; continue with --start-after {}",
            quote_arg(&plain_key(last))
        ));
    }
    shown
}

/// One watch event as a line, `cursor  kind  key = value`; `None` for a heartbeat.
pub fn event(line: &Json) -> Option<String> {
    if line.get("heartbeat").is_some() {
        return None;
    }
    let cursor = line
        .get("cursor")
        .map_or_else(|| "?".to_owned(), Json::to_string);
    let key = plain_key(line);
    let kind = line.get("kind").and_then(Json::as_str).unwrap_or("?");
    Some(match kind {
        "put" => format!("{cursor:>6}  put     {key} = {}", summary(line)),
        "delete" => format!("{cursor:>6}  delete  {key}"),
        other => format!("{cursor:>6}  {other:<7} {key}"),
    })
}

/// The members as a table, this node first.
pub fn members(reply: &Json) -> String {
    let rows: Vec<[String; 4]> = reply
        .get("members")
        .and_then(Json::as_array)
        .into_iter()
        .flatten()
        .map(|member| {
            let this = if member.get("self").and_then(Json::as_bool) == Some(true) {
                "  (this node)"
            } else {
                ""
            };
            [
                field(member, "name"),
                field(member, "replica"),
                field(member, "addr"),
                format!("{}{this}", field(member, "generation")),
            ]
        })
        .collect();
    table(&["NAME", "REPLICA", "ADDRESS", "GENERATION"], &rows)
}

/// The node's status, one aspect per line.
pub fn status(reply: &Json) -> String {
    let mut text = String::new();
    let mut line = |label: &str, value: String| {
        writeln!(text, "{label:<13}{value}").expect("writing to a String cannot fail");
    };
    line(
        "node",
        format!(
            "{} (replica {}, generation {})",
            field(reply, "name"),
            field(reply, "replica"),
            field(reply, "generation")
        ),
    );
    line("gossip", field(reply, "addr"));
    line("cursor", field(reply, "cursor"));
    let version = reply.get("version").and_then(Json::as_object);
    let writes: u64 = version
        .into_iter()
        .flat_map(|version| version.values())
        .filter_map(Json::as_u64)
        .sum();
    let replicas = version.map_or(0, serde_json::Map::len);
    line(
        "writes",
        format!(
            "{writes} applied, from {replicas} replica{}",
            plural(replicas)
        ),
    );
    line("peers", peers(reply));
    line(
        "held back",
        format!(
            "{} writes waiting for their causes",
            field(reply, "held_back")
        ),
    );
    line("tombstones", field(reply, "tombstones"));
    let stats = reply.get("stats").unwrap_or(&Json::Null);
    line(
        "traffic",
        format!(
            "sent {} messages ({}), received {} ({})",
            field(stats, "messages_sent"),
            size(stats.get("bytes_sent")),
            field(stats, "messages_received"),
            size(stats.get("bytes_received"))
        ),
    );
    line(
        "anti-entropy",
        format!(
            "{} rounds, {} repairs",
            field(stats, "anti_entropy_rounds"),
            field(stats, "anti_entropy_repairs")
        ),
    );
    line(
        "storage",
        storage(reply.get("storage").unwrap_or(&Json::Null)),
    );
    line(
        "buffers",
        buffers(reply.get("buffers").unwrap_or(&Json::Null)),
    );
    text
}

/// `change feed 12 MiB of 64 MiB, …`: each bounded buffer's use of its budget.
fn buffers(buffers: &Json) -> String {
    let Some(map) = buffers.as_object() else {
        return "-".to_owned();
    };
    let mut parts: Vec<String> = map
        .iter()
        .filter(|(_, buffer)| buffer.is_object())
        .map(|(name, buffer)| {
            format!(
                "{} {} of {}",
                name.replace('_', " "),
                size(buffer.get("bytes")),
                size(buffer.get("budget"))
            )
        })
        .collect();
    if let Some(paused) = map.get("watchers_paused").and_then(Json::as_u64)
        && paused > 0
    {
        parts.push(format!("{paused} watchers paused"));
    }
    parts.join(", ")
}

fn peers(reply: &Json) -> String {
    let peers: Vec<String> = reply
        .get("peers")
        .and_then(Json::as_array)
        .into_iter()
        .flatten()
        .map(|peer| {
            let lag = match peer.get("lag").and_then(Json::as_u64) {
                Some(0) => "up to date".to_owned(),
                Some(lag) => format!("lacks {lag} write{}", plural(lag as usize)),
                None => "lag not known yet".to_owned(),
            };
            format!("{} at {} ({lag})", field(peer, "name"), field(peer, "addr"))
        })
        .collect();
    if peers.is_empty() {
        "none (a cluster of one)".to_owned()
    } else {
        format!("{} live: {}", peers.len(), peers.join(", "))
    }
}

fn storage(storage: &Json) -> String {
    if storage.is_null() {
        return "in memory (nothing survives a restart)".to_owned();
    }
    format!(
        "{}: {} commits, snapshot {}, log {}",
        field(storage, "path"),
        field(storage, "commits"),
        size(storage.get("snapshot_bytes")),
        size(storage.get("log_bytes"))
    )
}

/// A value on one line, cut at [`MAX_SUMMARY`] characters: registers as their text, other types
/// with their type in brackets.
fn summary(item: &Json) -> String {
    let kind = item.get("type").and_then(Json::as_str).unwrap_or("?");
    let text = match kind {
        "register" => {
            let value = inline(&bytes(item, "value", "encoding"));
            let siblings = item
                .get("siblings")
                .and_then(Json::as_array)
                .map_or(0, Vec::len);
            if siblings > 0 {
                return format!("{}  (+{siblings} concurrent)", truncate(&value));
            }
            value
        }
        "counter" => format!("[counter] {}", field(item, "value")),
        "set" => {
            let shown: Vec<String> = elements(item).iter().map(inline).collect();
            format!("[set] {{{}}}", shown.join(", "))
        }
        "document" => format!("[document] {}", item.get("value").unwrap_or(&Json::Null)),
        other => format!("[{other}] {}", item.get("value").unwrap_or(&Json::Null)),
    };
    truncate(&text)
}

/// `text` cut at [`MAX_SUMMARY`] characters, with `…` when cut.
fn truncate(text: &str) -> String {
    match text.char_indices().nth(MAX_SUMMARY) {
        Some((end, _)) => format!("{}…", &text[..end]),
        None => text.to_owned(),
    }
}

/// A set's elements, decoded.
fn elements(item: &Json) -> Vec<Bytes> {
    let base64 = item.get("encoding").and_then(Json::as_str) == Some("base64");
    item.get("value")
        .and_then(Json::as_array)
        .into_iter()
        .flatten()
        .filter_map(Json::as_str)
        .map(|text| decode(text, base64))
        .collect()
}

/// The bytes at `field`, decoding base64 when `encoding_field` says so.
fn bytes(object: &Json, field: &str, encoding_field: &str) -> Bytes {
    let base64 = object.get(encoding_field).and_then(Json::as_str) == Some("base64");
    match object.get(field).and_then(Json::as_str) {
        Some(text) => decode(text, base64),
        None => Bytes::Text("?".to_owned()),
    }
}

fn decode(text: &str, base64: bool) -> Bytes {
    if !base64 {
        return Bytes::Text(text.to_owned());
    }
    match BASE64.decode(text) {
        Ok(data) => match String::from_utf8(data) {
            Ok(text) => Bytes::Text(text),
            Err(err) => Bytes::Binary(err.into_bytes()),
        },
        Err(_) => Bytes::Text(text.to_owned()),
    }
}

/// Bytes shown on one line: control characters escaped, binary as its length.
fn inline(value: &Bytes) -> String {
    match value {
        Bytes::Text(text) if text.chars().any(char::is_control) => text
            .chars()
            .map(|c| {
                if c.is_control() {
                    c.escape_debug().to_string()
                } else {
                    c.to_string()
                }
            })
            .collect(),
        Bytes::Text(text) => text.clone(),
        Bytes::Binary(data) => format!("<{} binary bytes>", data.len()),
    }
}

/// An item's key as plain text, for tables.
fn plain_key(item: &Json) -> String {
    inline(&bytes(item, "key", "key_encoding"))
}

/// An item's key quoted, for sentences.
fn key_of(item: &Json) -> String {
    match bytes(item, "key", "key_encoding") {
        Bytes::Text(text) => format!("{text:?}"),
        binary => inline(&binary),
    }
}

/// A field as text: strings bare, other JSON as written, absent as `?`.
pub(super) fn field(object: &Json, name: &str) -> String {
    match object.get(name) {
        Some(Json::String(text)) => text.clone(),
        Some(Json::Null) | None => "?".to_owned(),
        Some(other) => other.to_string(),
    }
}

/// A byte count for people: `512 B`, `3.4 KiB`, `12.0 MiB`.
pub(super) fn size(bytes: Option<&Json>) -> String {
    let Some(bytes) = bytes.and_then(Json::as_u64) else {
        return "?".to_owned();
    };
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

pub(super) fn table<const N: usize>(header: &[&str; N], rows: &[[String; N]]) -> String {
    let mut widths = header.map(str::len);
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut text = String::new();
    let header = header.map(str::to_owned);
    for row in std::iter::once(&header).chain(rows) {
        let cells: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        text.push_str(cells.join("  ").trim_end());
        text.push('\n');
    }
    text
}

/// A command-line argument quoted for a shell when it needs it.
fn quote_arg(text: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "/._-+:=@,".contains(c);
    if !text.is_empty() && text.chars().all(plain) {
        text.to_owned()
    } else {
        format!("'{}'", text.replace('\'', r"'\''"))
    }
}

fn plural(count: usize) -> &'static str {
    if count == 1 { "" } else { "s" }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn writes_show_the_key_and_token() {
        let reply = json!({"key": "a", "token": "0102"});
        assert_eq!(written("put", &reply), "put \"a\"; token 0102");
        let reply = json!({"key": "s", "token": null});
        assert_eq!(
            written("removed 1 element from", &reply),
            "nothing to change in \"s\""
        );
    }

    #[test]
    fn a_register_prints_its_value_and_notes_its_siblings() {
        let reply =
            json!({"key": "a", "type": "register", "value": "b", "siblings": [], "token": "01"});
        assert_eq!(
            value(&reply),
            Shown {
                stdout: "b\n".into(),
                notes: vec![]
            }
        );
        let reply = json!({"key": "a", "type": "register", "value": "b",
            "siblings": [{"value": "c"}, {"value": "/w==", "encoding": "base64"}]});
        let shown = value(&reply);
        assert_eq!(shown.stdout, "b\n");
        assert_eq!(
            shown.notes,
            [
                "\"a\" also holds 2 values written concurrently: c, <1 binary bytes> \
              (writers raced; the next write replaces them all)"
            ]
        );
        let reply = json!({"key": "a", "type": "register", "value": "/wA=", "encoding": "base64"});
        assert!(value(&reply).stdout.starts_with("(binary value, 2 bytes;"));
    }

    #[test]
    fn other_types_print_naturally() {
        let counter = json!({"key": "c", "type": "counter", "value": -4});
        assert_eq!(value(&counter).stdout, "-4\n");
        let set = json!({"key": "s", "type": "set", "value": ["a", "b"]});
        assert_eq!(value(&set).stdout, "a\nb\n");
        let doc = json!({"key": "d", "type": "document", "value": {"x": 1}});
        assert_eq!(value(&doc).stdout, "{\n  \"x\": 1\n}\n");
    }

    #[test]
    fn listings_align_keys_and_say_when_more_follow() {
        let reply = json!({"items": [
            {"key": "a", "type": "register", "value": "one\ntwo", "siblings": []},
            {"key": "jobs/web", "type": "set", "value": ["x", "y"]},
            {"key": "n", "type": "counter", "value": 3},
        ], "token": "01", "more": true});
        let shown = list(&reply, "");
        assert_eq!(
            shown.stdout,
            "a         one\\ntwo\njobs/web  [set] {x, y}\nn         [counter] 3\n"
        );
        assert_eq!(
            shown.notes,
            ["more keys follow; continue with --start-after n"]
        );
        let empty = list(&json!({"items": [], "more": false}), "x/");
        assert_eq!(empty.stdout, "");
        assert_eq!(empty.notes, ["no keys under \"x/\""]);
    }

    #[test]
    fn watch_events_are_one_line_each() {
        let put = json!({"cursor": 7, "key": "a", "kind": "put", "type": "register", "value": "b", "siblings": []});
        assert_eq!(event(&put).unwrap(), "     7  put     a = b");
        let delete = json!({"cursor": 8, "key": "a", "kind": "delete"});
        assert_eq!(event(&delete).unwrap(), "     8  delete  a");
        assert_eq!(event(&json!({"heartbeat": 8})), None);
    }

    #[test]
    fn members_are_a_table() {
        let reply = json!({"members": [
            {"name": "n1", "replica": "00000000000000aa", "addr": "10.0.0.1:7701", "generation": 0, "self": true},
            {"name": "node-22", "replica": "00000000000000bb", "addr": "10.0.0.22:7701", "generation": 1, "self": false},
        ]});
        assert_eq!(
            members(&reply),
            "NAME     REPLICA           ADDRESS         GENERATION\n\
             n1       00000000000000aa  10.0.0.1:7701   0  (this node)\n\
             node-22  00000000000000bb  10.0.0.22:7701  1\n"
        );
    }

    #[test]
    fn status_summarizes_the_node() {
        let reply = json!({
            "name": "dev", "replica": "0123", "addr": "127.0.0.1:7701", "generation": 0,
            "version": {"0123": 3, "0456": 2}, "cursor": 5,
            "peers": [{"name": "n2", "addr": "127.0.0.1:7711", "lag": 0}],
            "held_back": 0, "tombstones": 1,
            "stats": {"messages_sent": 10, "bytes_sent": 2048, "messages_received": 9,
                      "bytes_received": 100, "anti_entropy_rounds": 4, "anti_entropy_repairs": 1},
            "storage": null,
        });
        let text = status(&reply);
        assert!(
            text.contains("node         dev (replica 0123, generation 0)\n"),
            "{text}"
        );
        assert!(
            text.contains("writes       5 applied, from 2 replicas\n"),
            "{text}"
        );
        assert!(
            text.contains("peers        1 live: n2 at 127.0.0.1:7711 (up to date)\n"),
            "{text}"
        );
        assert!(
            text.contains("traffic      sent 10 messages (2.0 KiB), received 9 (100 B)\n"),
            "{text}"
        );
        assert!(text.contains("storage      in memory"), "{text}");
    }

    #[test]
    fn long_values_are_cut_in_listings() {
        let long = "x".repeat(MAX_SUMMARY + 10);
        let reply = json!({"items": [{"key": "k", "type": "register", "value": long}]});
        let line = list(&reply, "").stdout;
        assert_eq!(line, format!("k  {}…\n", "x".repeat(MAX_SUMMARY)));
        let binary = json!({"cursor": 1, "key": "b", "kind": "put", "type": "register",
            "value": "/wA=", "encoding": "base64"});
        assert_eq!(
            event(&binary).unwrap(),
            "     1  put     b = <2 binary bytes>"
        );
    }

    #[test]
    fn sizes_are_human() {
        assert_eq!(size(Some(&json!(0))), "0 B");
        assert_eq!(size(Some(&json!(1536))), "1.5 KiB");
        assert_eq!(size(Some(&json!(5u64 << 30))), "5.0 GiB");
        assert_eq!(size(None), "?");
    }
}
