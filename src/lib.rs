//! Mantissa: a leaderless, CRDT-based cluster state store for container orchestrators.
//!
//! Every node holds a full causal-consistency replica of the cluster state. Writes are local and
//! replicas exchange deltas; concurrent updates merge deterministically without a leader.
//!
//! Today the crate provides the replica itself, [`crdt::Replica`]: the keyspace, its value
//! types (registers, counters, sets, JSON documents), deltas, causal delivery, garbage collection
//! and snapshots. Gossip, the embedded node handle and the daemon are built on top of it.

#![forbid(unsafe_code)]

pub mod crdt;
pub mod gossip;
#[cfg(feature = "runtime")]
pub mod runtime;
