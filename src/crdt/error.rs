//! The errors of the CRDT layer.

use crate::crdt::Kind;
use crate::crdt::document::DocumentError;

/// Why a keyspace operation failed. No failing operation changes the replica.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Error {
    /// A key must have at least one byte.
    #[error("key is empty")]
    EmptyKey,
    /// A key was longer than [`MAX_KEY_LEN`](crate::crdt::MAX_KEY_LEN).
    #[error("key is {len} bytes long; the limit is {max}")]
    KeyTooLong { len: usize, max: usize },
    /// A value, set element or document was larger than its limit.
    #[error("{what} is {len} bytes long; the limit is {max}")]
    TooLarge {
        what: &'static str,
        len: usize,
        max: usize,
    },
    /// The key holds a value of another type; delete it first to change its type.
    #[error("key {key:?} holds a {found}, not a {expected}", found = found.name(), expected = expected.name())]
    WrongType {
        key: String,
        expected: crate::crdt::Kind,
        found: Kind,
    },
    /// A counter addition would carry the counter past the range of an `i64`; nothing was
    /// written.
    #[error("counter {key:?} is {value}: adding {amount} would overflow a 64-bit integer")]
    CounterOverflow {
        key: String,
        value: i64,
        amount: i64,
    },
    /// The write would change nothing (for instance, a set add without elements).
    #[error("nothing to write")]
    NothingToWrite,
    /// A delta arrived before its causes and the hold-back buffer is full; anti-entropy will
    /// deliver it again once its causes have arrived.
    #[error("the causal hold-back buffer is full ({deltas} deltas, {bytes} bytes)")]
    BufferFull { deltas: usize, bytes: usize },
    /// A document could not be read or edited.
    #[error(transparent)]
    Document(#[from] DocumentError),
    /// The change feed no longer holds events after `requested`; resume from a fresh read.
    #[error(
        "change feed compacted: events after cursor {requested} are gone, oldest kept is {oldest}"
    )]
    Compacted { requested: u64, oldest: u64 },
    /// Bytes from a peer or the disk could not be decoded.
    #[error("cannot decode {what}: {reason}")]
    Decode { what: &'static str, reason: String },
    /// Decoded bytes were well-formed but broke an invariant of the format.
    #[error("invalid {what}: {reason}")]
    Invalid { what: &'static str, reason: String },
}
