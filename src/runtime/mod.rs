//! The runtime layer: a node's logic as a sans-IO host (`host`), driven by a tokio task that
//! owns the QUIC transport and the storage thread (`driver`); the embedded [`Handle`] talks to
//! that task.

mod api;
mod driver;
mod handle;
mod host;
mod scheduler;
mod storage;
mod tls;
mod transport;

pub use api::{
    HandleError, NodeConfig, Roles, RoundReport, SchedulingView, StartError, StateDigest, Status,
    SyncState, WallClock, Watch, WatchError,
};
pub use handle::{Handle, start, start_on, start_with};
pub use scheduler::{ALLOCATION_RECHECK, AllocationWatch, Scheduler, SchedulerConfig};
pub use storage::{StorageConfig, StorageError, StorageStats};
pub use tls::{ClusterCa, NodeCredentials, TlsConfig, TlsError, validate_node_name};
pub use transport::{
    Channel, ConnectionInfo, Inbox, Received, Transport, TransportConfig, TransportError,
    TransportStats,
};
