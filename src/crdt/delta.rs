//! Deltas: the pieces of state replicas send each other, and the checks that make them safe to apply.

use serde::{Deserialize, Serialize};

use crate::crdt::entry::{Body, Item};
use crate::crdt::{CausalContext, Dot, Error, Key, VersionVector, codec, document};

/// The format version of an encoded [`Delta`].
pub const DELTA_FORMAT: u8 = 1;

/// The largest register value or set element, in bytes.
pub const MAX_VALUE_LEN: usize = 1024 * 1024;

/// The largest saved document, in bytes.
pub const MAX_DOCUMENT_LEN: usize = 4 * 1024 * 1024;

/// A piece of replica state to merge into another replica.
///
/// Two shapes exist. A **write delta** comes from one local mutation: it names the write's dot and
/// the writes it depends on, and a receiver holds it back until those have been applied, so no
/// reader ever sees an effect without its causes. A **sync delta** comes from
/// [`Replica::delta_since`](crate::crdt::Replica::delta_since): the full entries of every key
/// changed since a peer's version vector, which is causally complete by construction and applies
/// at once.
///
/// ```
/// use mantissa::crdt::{Delta, Key, NodeId, Replica};
/// let mut a = Replica::new(NodeId(1));
/// let mut b = Replica::new(NodeId(2));
/// let delta = a.put(Key::new("k").unwrap(), b"v".to_vec(), 1_000).unwrap();
/// let bytes = delta.encode();
/// b.apply(Delta::decode(&bytes).unwrap()).unwrap();
/// assert_eq!(a.digest(), b.digest());
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delta {
    /// Present on write deltas only.
    pub(crate) write: Option<WriteHeader>,
    /// The dots this delta accounts for: one in here but absent from `entries` was removed.
    pub(crate) context: CausalContext,
    /// Whether the delta is the author's whole state (every key not in `entries` is absent there),
    /// sent to a peer that fell behind the author's garbage collection.
    pub(crate) full: bool,
    /// The author's garbage-collection floor: tombstones it covers may be gone from `entries`.
    pub(crate) collected: VersionVector,
    /// Changed keys and their items, sorted by key.
    pub(crate) entries: Vec<(Key, Vec<Item>)>,
}

/// The longest run of dots one write may use (one per set element it adds).
pub const MAX_WRITE_SPAN: u64 = 65_536;

/// What a write delta must wait for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct WriteHeader {
    /// The write's first dot; the writer's previous write is an implicit dependency.
    pub(crate) dot: Dot,
    /// How many consecutive dots the write uses, from `dot` on: one per item it creates, so that
    /// a later write can remove one element of a multi-element set add and keep the others.
    pub(crate) span: u64,
    /// Writes of other nodes the writer had applied since its previous write: the receiver must
    /// cover each before applying this one. Listing only these keeps the header small in a large
    /// cluster; earlier dependencies were carried by the writer's earlier deltas.
    pub(crate) deps: Vec<Dot>,
}

impl Delta {
    /// The write's (first) dot, for a write delta: it names the write. A replica that covers it
    /// has applied the whole write, since writes apply atomically.
    pub fn dot(&self) -> Option<Dot> {
        self.write.as_ref().map(|header| header.dot)
    }

    /// The dots of other nodes that must be applied before this write delta.
    pub fn dependencies(&self) -> &[Dot] {
        self.write.as_ref().map_or(&[], |header| &header.deps)
    }

    /// How many keys the delta carries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Approximately how many bytes the delta keeps alive (its keys and items); what the
    /// buffers that hold deltas count against their byte budgets.
    pub fn size(&self) -> usize {
        self.entries
            .iter()
            .map(|(key, items)| key.as_bytes().len() + items.iter().map(Item::size).sum::<usize>())
            .sum::<usize>()
            + 64
    }

    /// Whether the delta carries no key (a sync delta to a peer that lacks nothing).
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty() && !self.full
    }

    /// Whether this is a full-state delta (see [`Replica::delta_since`](crate::crdt::Replica::delta_since)).
    pub fn is_full(&self) -> bool {
        self.full
    }

    /// The keys the delta touches.
    pub fn keys(&self) -> impl Iterator<Item = &Key> {
        self.entries.iter().map(|(key, _)| key)
    }

    /// The delta as bytes: a format version byte, then postcard.
    pub fn encode(&self) -> Vec<u8> {
        codec::encode(DELTA_FORMAT, self)
    }

    /// Decodes and validates bytes from [`Delta::encode`]. Never panics; allocates in proportion
    /// to `bytes.len()`.
    pub fn decode(bytes: &[u8]) -> Result<Delta, Error> {
        let delta: Delta = codec::decode("delta", DELTA_FORMAT, bytes)?;
        delta.validate()?;
        Ok(delta)
    }

    /// Checks the invariants every delta satisfies, whoever built it.
    pub(crate) fn validate(&self) -> Result<(), Error> {
        let invalid = |reason: String| Error::Invalid {
            what: "delta",
            reason,
        };
        if !self.entries.windows(2).all(|pair| pair[0].0 < pair[1].0) {
            return Err(invalid("keys are not sorted and unique".into()));
        }
        for (key, items) in &self.entries {
            validate_items(items, &self.context)
                .map_err(|reason| invalid(format!("key {key:?}: {reason}")))?;
        }
        if let Some(header) = &self.write {
            if self.full || self.entries.len() != 1 {
                return Err(invalid("a write delta carries exactly one key".into()));
            }
            let first = header.dot;
            if first.seq == 0 || header.span == 0 || header.span > MAX_WRITE_SPAN {
                return Err(invalid(
                    "a write delta needs a dot and a span of 1 to 65,536".into(),
                ));
            }
            let Some(last) = first.seq.checked_add(header.span - 1) else {
                return Err(invalid("a write delta's span overflows".into()));
            };
            let own = |dot: Dot| dot.node == first.node && (first.seq..=last).contains(&dot.seq);
            if !(first.seq..=last).all(|seq| self.context.contains(Dot::new(first.node, seq))) {
                return Err(invalid(
                    "a write delta's context must contain its dots".into(),
                ));
            }
            let (_, items) = &self.entries[0];
            if items.iter().any(|item| !own(item.dot)) {
                return Err(invalid(
                    "a write delta only carries items of its own dots".into(),
                ));
            }
        } else if self.context.cloud().next().is_some() {
            return Err(invalid(
                "a sync delta's context must be a version vector".into(),
            ));
        }
        Ok(())
    }
}

/// Checks one entry's items: canonical order, sizes, dots within `context`, valid documents.
pub(crate) fn validate_items(items: &[Item], context: &CausalContext) -> Result<(), String> {
    if !items
        .windows(2)
        .all(|pair| pair[0].identity_cmp(&pair[1]).is_lt())
    {
        return Err("items are not in canonical order".into());
    }
    for item in items {
        if !context.contains(item.dot) {
            return Err(format!(
                "item {:?} lies outside the delta's context",
                item.dot
            ));
        }
        match &item.body {
            Body::Register(bytes) | Body::SetElement(bytes) if bytes.len() > MAX_VALUE_LEN => {
                return Err(format!(
                    "value of {} bytes exceeds {MAX_VALUE_LEN}",
                    bytes.len()
                ));
            }
            Body::Document(bytes) => {
                if bytes.len() > MAX_DOCUMENT_LEN {
                    return Err(format!(
                        "document of {} bytes exceeds {MAX_DOCUMENT_LEN}",
                        bytes.len()
                    ));
                }
                document::validate(bytes).map_err(|err| err.to_string())?;
            }
            Body::Counter { up, down } if *up > i64::MAX as u64 || *down > i64::MAX as u64 => {
                return Err("counter slot out of range".into());
            }
            _ => {}
        }
    }
    Ok(())
}
