//! The causal delta-CRDT core: pure data, no IO, no clock reads, no randomness.
//!
//! A [`Replica`] holds one node's copy of the keyspace. Local writes return [`Delta`]s; peers'
//! deltas merge in causal order. Time is passed in by the caller, so the same inputs always give the
//! same state. See `docs/architecture.md` for the model and the rules it keeps.

mod blob;
pub(crate) mod codec;
mod delta;
mod document;
mod entry;
mod error;
mod feed;
mod hlc;
mod id;
mod key;
mod name;
mod replica;
mod token;
mod value;
mod version;
mod write;

pub use blob::Blob;
pub use delta::{DELTA_FORMAT, Delta, MAX_DOCUMENT_LEN, MAX_VALUE_LEN, MAX_WRITE_SPAN};
pub use document::{DocumentError, MAX_DEPTH as MAX_DOCUMENT_DEPTH};
pub use entry::Kind;
pub use error::Error;
pub use feed::{Change, Event};
pub use hlc::{Hlc, HlcClock, MAX_HLC_MILLIS};
pub use id::{Dot, NodeId};
pub use key::{Key, MAX_KEY_LEN};
pub use name::{InvalidName, MAX_NAME_LEN, Name};
pub use replica::{Applied, Collected, RegisterRef, Replica, ReplicaConfig, SNAPSHOT_FORMAT};
pub use token::{MAX_TOKEN_LEN, Token};
pub use value::{Register, Sibling, Value};
pub use version::{CausalContext, VersionVector};
pub use write::Write;
