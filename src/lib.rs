//! Mantissa: a leaderless, CRDT-based cluster state store for container orchestrators.
//!
//! Every node holds a full causal-consistency replica of the cluster state. Writes are local and
//! replicas exchange deltas; concurrent updates merge deterministically without a leader.
//!
//! - [`crdt`]: the replica every node holds — keyspace, value types (registers, counters, sets,
//!   JSON documents), deltas, causal delivery, garbage collection, snapshots. Pure.
//! - [`gossip`]: the protocol as a sans-IO state machine — membership, dissemination,
//!   anti-entropy, causal stability. Pure.
//! - `runtime` (feature `runtime`, on by default): QUIC with mutual TLS and the embedded node,
//!   started with `runtime::start` and used through a cloneable `runtime::Handle`; durable
//!   storage of the replica with `NodeConfig::storage`.
//! - [`sched`]: leaderless scheduling over the keyspace — node records, jobs, claims, admission by
//!   each machine alone, rendezvous re-placement, escrow quotas. Pure.
//! - `daemon` (feature `cli`): the `mantissa agent` daemon, its HTTP/JSON API and client.

#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod crdt;
#[cfg(feature = "cli")]
pub mod daemon;
pub mod gossip;
#[cfg(feature = "runtime")]
pub mod runtime;
pub mod sched;
