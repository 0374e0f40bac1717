//! What reads return: each value type's current value, computed from an entry's items.

use serde::Serialize;

use crate::crdt::entry::{Body, Entry};
use crate::crdt::{Blob, Error, Hlc, Kind, document};

/// The current value of a key.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[non_exhaustive]
pub enum Value {
    /// A register: the winning value and any concurrent siblings.
    Register(Register),
    /// A counter's total.
    Counter(i64),
    /// A set's elements, in byte order, without duplicates.
    Set(Vec<Vec<u8>>),
    /// A document, as a JSON object.
    Document(serde_json::Value),
}

impl Value {
    /// The value's type.
    pub fn kind(&self) -> Kind {
        match self {
            Value::Register(_) => Kind::Register,
            Value::Counter(_) => Kind::Counter,
            Value::Set(_) => Kind::Set,
            Value::Document(_) => Kind::Document,
        }
    }
}

/// A register's value: every replica that holds the same writes picks the same winner.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Register {
    /// The value with the highest timestamp (ties broken by node id), shared with the replica.
    pub value: Blob,
    /// When the winning value was written.
    pub written_at: Hlc,
    /// The other values written concurrently with the winner, highest timestamp first. Empty
    /// unless writers raced; the next write that observes them replaces them all.
    pub siblings: Vec<Sibling>,
}

/// A value written concurrently with a register's winner.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Sibling {
    /// The value, shared with the replica.
    pub value: Blob,
    /// When it was written.
    pub written_at: Hlc,
}

/// Reads an entry; `None` when the key holds nothing (absent or deleted).
pub(crate) fn read(entry: &Entry) -> Result<Option<Value>, Error> {
    // The common case, one register value and no siblings, needs no ranking.
    if let [item] = &entry.items[..]
        && let Body::Register(value) = &item.body
    {
        return Ok(Some(Value::Register(Register {
            value: value.clone(),
            written_at: item.hlc(),
            siblings: Vec::new(),
        })));
    }
    let Some(kind) = entry.kind() else {
        return Ok(None);
    };
    let value = match kind {
        Kind::Register => Value::Register(read_register(entry)),
        Kind::Counter => Value::Counter(read_counter(entry)),
        Kind::Set => Value::Set(read_set(entry)),
        Kind::Document => Value::Document(document::to_json(&document_versions(entry))?),
    };
    Ok(Some(value))
}

fn read_register(entry: &Entry) -> Register {
    let mut ranked = entry.ranked(Kind::Register).into_iter().filter_map(|item| {
        let Body::Register(value) = &item.body else {
            return None;
        };
        Some(Sibling {
            value: value.clone(),
            written_at: item.hlc(),
        })
    });
    let winner = ranked
        .next()
        .expect("an entry whose kind is register has a register item");
    Register {
        value: winner.value,
        written_at: winner.written_at,
        siblings: ranked.collect(),
    }
}

fn read_counter(entry: &Entry) -> i64 {
    counter_total(entry).clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64
}

/// A counter's exact total over every replica's share (it may exceed an `i64`).
pub(crate) fn counter_total(entry: &Entry) -> i128 {
    entry
        .of_kind(Kind::Counter)
        .map(|item| match item.body {
            Body::Counter { up, down } => i128::from(up) - i128::from(down),
            _ => 0,
        })
        .sum()
}

fn read_set(entry: &Entry) -> Vec<Vec<u8>> {
    let mut elements: Vec<Vec<u8>> = entry
        .of_kind(Kind::Set)
        .filter_map(|item| match &item.body {
            Body::SetElement(element) => Some(element.to_vec()),
            _ => None,
        })
        .collect();
    elements.sort();
    elements.dedup();
    elements
}

/// The saved document versions of an entry, in canonical item order.
pub(crate) fn document_versions(entry: &Entry) -> Vec<&[u8]> {
    entry
        .of_kind(Kind::Document)
        .filter_map(|item| match &item.body {
            Body::Document(bytes) => Some(&bytes[..]),
            _ => None,
        })
        .collect()
}
