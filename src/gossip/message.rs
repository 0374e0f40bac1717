//! The messages members exchange, and their wire format.

use serde::{Deserialize, Serialize};

use crate::crdt::codec;
use crate::crdt::{Delta, Dot, Error, VersionVector};

/// The format version every message starts with.
pub const PROTOCOL_VERSION: u8 = 1;

/// At most this many dots travel in one announcement or request.
pub(crate) const MAX_DOTS_PER_MESSAGE: usize = 4_096;

/// One protocol message. See `docs/protocol.md` for what each does and when it is sent.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) enum Message {
    /// A SWIM packet (membership and failure detection), opaque to everything but SWIM.
    Swim(#[serde(with = "serde_bytes")] Vec<u8>),
    /// Writes pushed along the dissemination tree; `hops` counts how far they travelled.
    Push { hops: u16, deltas: Vec<Delta> },
    /// "I have these writes": sent to lazy peers instead of the writes themselves.
    IHave(Vec<Dot>),
    /// "Send me these writes, and push to me eagerly from now on."
    Graft(Vec<Dot>),
    /// "You are a redundant path: only announce writes to me from now on."
    Prune,
    /// Anti-entropy opener: a hash of the sender's version vector.
    Digest { hash: u64 },
    /// The reply when the digests match: nothing to exchange.
    InSync { hash: u64 },
    /// The sender's version vector: "send what I lack"; `reply` asks the receiver to send its own
    /// vector back if it lacks something the sender has.
    SyncRequest { version: VersionVector, reply: bool },
    /// What the receiver lacked: a sync delta, or the full state when it fell too far behind.
    Sync(Delta),
    /// One piece of an encoded sync delta too large for one message. The receiver applies the
    /// delta once it holds all `count` pieces of `transfer`, so readers never see half of it.
    SyncChunk {
        transfer: u64,
        index: u32,
        count: u32,
        #[serde(with = "serde_bytes")]
        bytes: Vec<u8>,
    },
}

impl Message {
    pub(crate) fn encode(&self) -> Vec<u8> {
        codec::encode(PROTOCOL_VERSION, self)
    }

    /// Decodes and validates a message from a peer.
    pub(crate) fn decode(bytes: &[u8]) -> Result<Message, Error> {
        let message: Message = codec::decode("message", PROTOCOL_VERSION, bytes)?;
        let invalid = |reason: &str| Error::Invalid {
            what: "message",
            reason: reason.into(),
        };
        match &message {
            Message::Push { deltas, .. } => {
                for delta in deltas {
                    delta.validate()?;
                    if delta.dot().is_none() {
                        return Err(invalid("a push carries write deltas only"));
                    }
                }
            }
            Message::IHave(dots) | Message::Graft(dots) if dots.len() > MAX_DOTS_PER_MESSAGE => {
                return Err(invalid("too many dots"));
            }
            Message::Sync(delta) => delta.validate()?,
            Message::SyncChunk { index, count, .. } if index >= count => {
                return Err(invalid("chunk index beyond its count"));
            }
            _ => {}
        }
        Ok(message)
    }

    /// A short name for logs and statistics.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            Message::Swim(_) => "swim",
            Message::Push { .. } => "push",
            Message::IHave(_) => "ihave",
            Message::Graft(_) => "graft",
            Message::Prune => "prune",
            Message::Digest { .. } => "digest",
            Message::InSync { .. } => "in-sync",
            Message::SyncRequest { .. } => "sync-request",
            Message::Sync(_) => "sync",
            Message::SyncChunk { .. } => "sync-chunk",
        }
    }
}

/// A stable hash of a version vector, for anti-entropy digests.
pub(crate) fn version_hash(version: &VersionVector) -> u64 {
    postcard::to_io(version, codec::Fnv::new())
        .expect("hashing never fails")
        .finish()
}
