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

pub use config::{Config, ConfigError};
pub use member::{InvalidMemberName, MAX_MEMBER_NAME_LEN, Member, MemberName};
pub use message::PROTOCOL_VERSION;
pub use node::{Channel, Destination, Event, Node, ProtocolError, Stats, Transmit};
pub use simulation::{NetworkModel, Simulation, member as simulated_member};
