//! Leaderless scheduling, as data in the keyspace and pure functions over it: no IO, no clock, no
//! randomness.
//!
//! Over-committing a machine cannot be prevented by replicas that do not coordinate, so each
//! machine is the single writer of its own capacity ledger. Schedulers anywhere propose
//! [`Claim`]s; only the machine admits or rejects the claims made on it, in a deterministic order
//! ([`resolve`]), and records the outcome in its [`Ledger`]. Every replica computes the same
//! allocations from the same writes ([`ClusterView::allocations`]), including the tie-break for a
//! task admitted on two machines across a partition. Quotas are escrow: rights split among
//! members ([`Escrow`]). [`Cluster`] is the API over a [`Replica`](crate::crdt::Replica); see
//! `docs/scheduling.md` for the model, the keys and the guarantees.

mod admission_round;
mod cache;
mod claim_decision;
mod cluster;
mod keys;
mod ledger;
mod placement;
mod plan;
mod quota;
mod rendezvous;
mod resources;
mod spec;
mod status;
mod task_id;
mod view;

pub use admission_round::{Admitted, Release, ReleaseCause};
pub use cache::ViewCache;
pub use claim_decision::{AdmissionContext, Decision, Rejected, resolve};
pub use cluster::Cluster;
pub use keys::{
    ALLOC, CLAIMS, JOBS, NODES, QUOTA_SHARES, QUOTAS, RESERVED, SCHEDULERS, is_reserved,
};
pub use ledger::{
    Allocation, AllocationId, Claim, Ledger, MAX_REJECTIONS_KEPT, MAX_TASKS_PER_NODE, RejectReason,
    Rejection,
};
pub use placement::{Candidate, choose, fits};
pub use plan::Plan;
pub use quota::{Escrow, Grant, QuotaSpec, Request, Share};
pub use rendezvous::{
    BACKOFF_BASE_MILLIS, BACKOFF_MAX_MILLIS, backoff_millis, responsible, weight,
};
pub use resources::{Resource, Resources, parse_size};
pub use spec::{Constraints, JobSpec, MAX_GROUP_COUNT, NodeRecord, Strategy, Task, TaskGroup};
pub use status::{JobStatus, NodeStatus, TaskState, TaskStatus};
pub use task_id::TaskId;
pub use view::{ClusterView, SchedulerRecord};

/// Jobs, task groups, namespaces, machines and schedulers all go by the one validated name.
pub use crate::crdt::Name;

use crate::crdt::{InvalidName, Key};

/// Why a scheduling operation failed. No failing operation changes the replica, except that a
/// round ([`Cluster::plan`], [`Cluster::admit`]) keeps the writes it made before the failure.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SchedError {
    /// The keyspace refused a read or a write.
    #[error(transparent)]
    Store(#[from] crate::crdt::Error),
    /// A name or task id was invalid.
    #[error(transparent)]
    Name(#[from] InvalidName),
    /// A job spec broke a rule its type cannot express.
    #[error("invalid job: {0}")]
    InvalidJob(String),
    /// A quota spec broke a rule its type cannot express.
    #[error("invalid quota: {0}")]
    InvalidQuota(String),
    /// A machine's record can only be written by that machine.
    #[error("the record of node {node} can only be written by {node} itself, not by {me}")]
    NotOwner {
        /// The machine whose record it is.
        node: Name,
        /// The member that tried to write it.
        me: Name,
    },
    /// The namespace already has a quota.
    #[error("namespace {0} already has a quota")]
    QuotaExists(Name),
    /// A member tried to consume more of a quota than it holds rights for.
    #[error("{wanted} CPU millis of quota {namespace} wanted, {rights} held")]
    InsufficientRights {
        /// The quota's namespace.
        namespace: Name,
        /// The rights the member holds.
        rights: u64,
        /// The consumption it asked for.
        wanted: u64,
    },
}

/// A register write for the caller to make: `replica.put(put.key, put.value, now_millis)`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Put {
    /// The key.
    pub key: Key,
    /// The value (JSON).
    pub value: Vec<u8>,
}
