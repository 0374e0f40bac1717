//! The runtime layer: a node's logic as a sans-IO host (`host`), driven by a tokio task that
//! owns the QUIC transport and the storage thread (`driver`); the embedded [`Handle`] talks to
//! that task.
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

mod api;
mod driver;
mod handle;
mod host;
mod scheduler;
mod storage;
mod tls;
mod transport;

pub use api::{
    BufferUsage, Buffers, DEFAULT_MEMORY_BUDGET, HandleError, NodeConfig, Roles, RoundReport,
    SchedulingView, StartError, StateDigest, Status, SyncState, WallClock, Watch, WatchError,
};
/// Test-only (feature `testing`): starts a node over a transport the caller bound.
#[cfg(feature = "testing")]
pub use handle::start_on;
pub use handle::{Handle, start, start_with};
pub use scheduler::{ALLOCATION_RECHECK, AllocationWatch, Scheduler, SchedulerConfig};
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
