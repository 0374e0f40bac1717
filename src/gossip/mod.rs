//! The gossip protocol, sans IO: membership (SWIM), dissemination of writes along a
//! self-pruning push tree, anti-entropy, and causal stability for garbage collection.
//!
//! A [`Node`] is driven by inputs that carry the current time and drained of outputs; the runtime
//! layer moves its [`Transmit`]s over QUIC. See `docs/protocol.md`.

mod config;
mod member;
mod message;
mod node;
mod recent;
mod simulation;

/// Why a member name was refused: the one name error, under the name the runtime spells.
pub use crate::crdt::InvalidName as InvalidMemberName;
/// A member's name: what its TLS certificate is issued for, and so what identifies it. The one
/// validated name type, kept under this name because the runtime and the HTTP layer spell it so.
pub use crate::crdt::Name as MemberName;
pub use config::{Config, ConfigError};
pub use member::Member;
pub use message::PROTOCOL_VERSION;
pub use node::{Channel, Destination, Event, Node, ProtocolError, Stats, Transmit};
pub use simulation::{NetworkModel, Simulation, member as simulated_member};
