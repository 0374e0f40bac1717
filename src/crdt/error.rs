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
    KeyTooLong {
        /// The key's length in bytes.
        len: usize,
        /// The limit in bytes.
        max: usize,
    },
    /// A value, set element or document was larger than its limit.
    #[error("{what} is {len} bytes long; the limit is {max}")]
    TooLarge {
        /// What was too large (`"value"`, `"set element"`, `"document"`, …).
        what: &'static str,
        /// Its length in bytes.
        len: usize,
        /// The limit in bytes.
        max: usize,
    },
    /// The key holds a value of another type; delete it first to change its type.
    #[error("key {key:?} holds a {found}, not a {expected}", found = found.name(), expected = expected.name())]
    WrongType {
        /// The key, as [`Key`](crate::crdt::Key) displays it.
        key: String,
        /// The type the write or read was for.
        expected: crate::crdt::Kind,
        /// The type the key holds.
        found: Kind,
    },
    /// A counter addition would carry the counter past the range of an `i64`; nothing was
    /// written.
    #[error("counter {key:?} is {value}: adding {amount} would overflow a 64-bit integer")]
    CounterOverflow {
        /// The counter's key, as text.
        key: String,
        /// Its value as this replica sees it.
        value: i64,
        /// The refused addition.
        amount: i64,
    },
    /// The write would change nothing (for instance, a set add without elements).
    #[error("nothing to write")]
    NothingToWrite,
    /// A delta arrived before its causes and the hold-back buffer is full; anti-entropy will
    /// deliver it again once its causes have arrived.
    #[error("the causal hold-back buffer is full ({deltas} deltas, {bytes} bytes)")]
    BufferFull {
        /// Deltas held back.
        deltas: usize,
        /// Bytes held back.
        bytes: usize,
    },
    /// A document could not be read or edited.
    #[error(transparent)]
    Document(#[from] DocumentError),
    /// The change feed no longer holds events after `requested`; resume from a fresh read.
    #[error(
        "change feed compacted: events after cursor {requested} are gone, oldest kept is {oldest}"
    )]
    Compacted {
        /// The cursor asked for.
        requested: u64,
        /// The oldest cursor the feed still holds events after.
        oldest: u64,
    },
    /// Bytes from a peer or the disk could not be decoded.
    #[error("cannot decode {what}: {reason}")]
    Decode {
        /// What was being decoded (`"delta"`, `"snapshot"`, …).
        what: &'static str,
        /// Why decoding failed.
        reason: String,
    },
    /// Decoded bytes were well-formed but broke an invariant of the format.
    #[error("invalid {what}: {reason}")]
    Invalid {
        /// What was being decoded.
        what: &'static str,
        /// The invariant it broke.
        reason: String,
    },
}
