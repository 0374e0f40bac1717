//! The runtime layer: tokio and quinn drive the protocol state machine.

mod handle;
mod scheduling;
mod storage;
mod tls;
mod transport;

pub use handle::{
    Handle, HandleError, NodeConfig, StartError, StateDigest, Status, WallClock, Watch, WatchError,
    start, start_on, start_with,
};
pub use scheduling::{
    ALLOCATION_RECHECK, AllocationWatch, Roles, RoundReport, Scheduler, SchedulerConfig,
    SchedulingView, SyncState,
};
pub use storage::{StorageConfig, StorageError, StorageStats};
pub use tls::{ClusterCa, NodeCredentials, TlsConfig, TlsError, validate_node_name};
pub use transport::{
    Channel, ConnectionInfo, Inbox, Received, Transport, TransportConfig, TransportError,
    TransportStats,
};
