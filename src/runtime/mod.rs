//! The runtime layer: tokio and quinn drive the protocol state machine.
//!
//! [`start`] runs a node (QUIC with mutual TLS, optionally durable with
//! [`NodeConfig::storage`]) and returns a cloneable [`Handle`] to read, write and watch the
//! keyspace; every node's certificate comes from one cluster CA, and its name is the one its
//! certificate carries. `examples/embedded.rs` runs three nodes in one process.
//!
//! ```no_run
//! use std::time::Duration;
//! use mantissa::runtime::{ClusterCa, NodeConfig, TlsConfig, start};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let ca = ClusterCa::generate("example")?;
//! let credentials = ca.issue("node-a", Duration::from_secs(24 * 3600))?;
//! let tls = TlsConfig::new(ca.cert_pem(), &credentials)?;
//! // Listen on any port of 127.0.0.1, with no seeds: a cluster of one until others join.
//! let node = start(NodeConfig::new("127.0.0.1:0".parse()?, tls, vec![])).await?;
//! let token = node.put("services/web/replicas", "3").await?;
//! // A client that moves to another node carries the token to read its own write there.
//! node.wait_for(&token, Duration::from_secs(5)).await?;
//! assert!(node.get("services/web/replicas").await?.is_some());
//! node.shutdown().await?;
//! # Ok(())
//! # }
//! ```

// `handle` is left out of the docs lint until `WatchError::Compacted`'s fields are documented
// (see lib.rs).
mod handle;
#[deny(missing_docs)]
mod scheduling;
#[deny(missing_docs)]
mod storage;
#[deny(missing_docs)]
mod tls;
#[deny(missing_docs)]
mod transport;

/// Test-only (feature `testing`): starts a node over a transport the caller bound.
#[cfg(feature = "testing")]
pub use handle::start_on;
pub use handle::{
    Handle, HandleError, NodeConfig, StartError, StateDigest, Status, WallClock, Watch, WatchError,
    start, start_with,
};
pub use scheduling::{
    ALLOCATION_RECHECK, AllocationWatch, Roles, RoundReport, Scheduler, SchedulerConfig,
    SchedulingView, SyncState,
};
pub use storage::{StorageConfig, StorageError, StorageStats};
pub use tls::{ClusterCa, NodeCredentials, TlsConfig, TlsError, validate_node_name};
/// Test-only (feature `testing`): the raw QUIC transport, with which the simulation suites run
/// nodes over turmoil's sockets (`Transport::bind_with_socket`, then `start_on`).
#[cfg(feature = "testing")]
pub use transport::{Channel, ConnectionInfo, Inbox, Received, Transport};
pub use transport::{TransportConfig, TransportError, TransportStats};
// Without `testing` the node itself still uses them, through this module as it always has.
#[cfg(not(feature = "testing"))]
use transport::{Channel, Inbox, Received, Transport};

// Without `testing`, `start_on` (in handle.rs, which knows nothing of the feature) has no caller;
// naming it here keeps it compiled and checked, and keeps a plain build free of dead-code warnings.
#[cfg(not(feature = "testing"))]
const _: fn(NodeConfig, Transport, Inbox, crate::crdt::Replica) -> Result<Handle, StartError> =
    handle::start_on;
