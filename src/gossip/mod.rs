//! The gossip protocol, sans IO: membership (SWIM), dissemination of writes along a
//! self-pruning push tree, anti-entropy, and causal stability for garbage collection.
//!
//! A [`Node`] is driven by inputs that carry the current time and drained of outputs; the runtime
//! layer moves its [`Transmit`]s over QUIC. See `docs/protocol.md`.
//!
//! Two nodes, with the caller as the network (here: every message delivered at once):
//!
//! ```
//! use std::time::Instant;
//! use mantissa::crdt::{Key, NodeId, Replica, Write};
//! use mantissa::gossip::{Config, Member, MemberName, Node};
//!
//! let now = Instant::now();
//! let member = |name: &str, id: u64, port: u16| {
//!     let name = MemberName::new(name).unwrap();
//!     Member::new(name, NodeId(id), ([127, 0, 0, 1], port).into())
//! };
//! let (a, b) = (member("node-a", 1, 7701), member("node-b", 2, 7702));
//! let mut nodes = [
//!     Node::new(a.clone(), Replica::new(NodeId(1)), Config::lan(), 1, now).unwrap(),
//!     Node::new(b.clone(), Replica::new(NodeId(2)), Config::lan(), 2, now).unwrap(),
//! ];
//! nodes[0].add_members([b], now);
//! nodes[1].add_members([a], now);
//!
//! let key = Key::new("services/web").unwrap();
//! let write = Write::Put { key: key.clone(), value: b"3".to_vec() };
//! nodes[0].write(now, 1, write).unwrap();
//! // Deliver every message, at once and in order, until none is left.
//! while let Some((from, transmit)) = (0..2).find_map(|i| Some((i, nodes[i].poll_transmit()?))) {
//!     let sender = nodes[from].me().clone();
//!     let to = usize::from(transmit.to.addr == nodes[1].me().addr);
//!     nodes[to].handle_message(&sender.name, sender.addr, &transmit.payload, now).unwrap();
//! }
//! assert!(nodes[1].replica().get(&key).unwrap().is_some());
//! ```

mod config;
mod member;
mod message;
mod node;
mod recent;
#[cfg(any(test, feature = "testing"))]
mod simulation;

/// Why a member name was refused: the one name error, under the name the runtime spells.
pub use crate::crdt::InvalidName as InvalidMemberName;
/// A member's name: what its TLS certificate is issued for, and so what identifies it. The one
/// validated name type, kept under this name because the runtime and the HTTP layer spell it so.
pub use crate::crdt::Name as MemberName;
pub use config::{Config, ConfigError};
pub use member::Member;
pub use message::PROTOCOL_VERSION;
pub use node::{Channel, Destination, Event, Node, Part, ProtocolError, Stats, Transmit};
/// Test-only (feature `testing`): the protocol's simulator, for this crate's tests and benches.
#[cfg(any(test, feature = "testing"))]
pub use simulation::{NetworkModel, Simulation, member as simulated_member};
