//! Identities: who wrote something, and which of its writes it was.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The identity of one replica incarnation: the author of every dot it creates.
///
/// A node that loses its data must come back under a new `NodeId` (a new incarnation), or its new
/// dots would collide with dots the cluster already holds. The runtime derives it when a data
/// directory is created; the CRDT layer only compares it.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct NodeId(pub u64);

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "n{:x}", self.0)
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// One write event: the `seq`-th mutation made by `node` (counting from 1).
///
/// Dots name every value, counter slot, set element and tombstone in the keyspace, so a replica can
/// tell "I have seen this and removed it" from "I have never seen this".
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Dot {
    /// The replica that made the write.
    pub node: NodeId,
    /// Its position in that replica's sequence of writes; the first write is 1.
    pub seq: u64,
}

impl Dot {
    /// The dot of `node`'s `seq`-th write.
    pub fn new(node: NodeId, seq: u64) -> Self {
        Dot { node, seq }
    }
}

impl fmt::Debug for Dot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}.{}", self.node, self.seq)
    }
}

impl fmt::Display for Dot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.node, self.seq)
    }
}
