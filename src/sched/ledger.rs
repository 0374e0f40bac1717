//! Claims schedulers make, and the ledger in which a machine records what it admitted.

use std::cmp::{Ordering, Reverse};
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::crdt::Hlc;
use crate::sched::{Name, Resource, Resources, TaskId};

/// The most allocations one machine's ledger holds; claims beyond are rejected with
/// [`RejectReason::TooManyTasks`]. Keeps the ledger register well under the value size limit.
pub const MAX_TASKS_PER_NODE: usize = 1_000;

/// The most rejections a ledger remembers (the most recent are kept).
pub const MAX_REJECTIONS_KEPT: usize = 256;

/// A scheduler's proposal "run task instance `task` on `node`", stored under
/// `claims/<node>/<task>` and written by the scheduler. Only `node` decides it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    /// The task instance.
    pub task: TaskId,
    /// The machine asked to run it.
    pub node: Name,
    /// The job's namespace (for quotas).
    pub namespace: Name,
    /// What the task needs.
    pub resources: Resources,
    /// The job's priority.
    pub priority: u32,
    /// The timestamp of the claim's write: names the claim and orders it.
    pub at: Hlc,
    /// Who proposed it.
    pub scheduler: Name,
    /// Its place in the task's attempts: 0 for the first claim, then one more than the latest
    /// rejected attempt. Sets the backoff.
    pub attempt: u32,
}

impl Claim {
    /// The order in which a machine admits claims: priority (highest first), then timestamp,
    /// then scheduler, then task. Total, so every replica sorts a set of claims the same way.
    pub fn admission_order(&self, other: &Claim) -> Ordering {
        let key = |claim: &Claim| {
            (
                Reverse(claim.priority),
                claim.at,
                claim.scheduler.clone(),
                claim.task.clone(),
            )
        };
        key(self).cmp(&key(other))
    }
}

/// Names one admission: the machine and the timestamp at which it admitted the task.
///
/// Ordered by timestamp, then machine: the earlier admission of a task placed twice keeps it.
/// A machine checks that its allocation id still wins before it starts (and while it runs) a
/// task; an id is never reused, so it also serves as a fencing token towards external systems.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct AllocationId {
    /// When the machine admitted it.
    pub admitted_at: Hlc,
    /// The machine.
    pub node: Name,
}

/// A task instance a machine admitted: an entry of its ledger.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Allocation {
    /// The task instance.
    pub task: TaskId,
    /// The machine running it.
    pub node: Name,
    /// The job's namespace.
    pub namespace: Name,
    /// What it reserves on the machine.
    pub resources: Resources,
    /// The job's priority.
    pub priority: u32,
    /// The claim it admitted ([`Claim::at`]).
    pub claim: Hlc,
    /// The scheduler that proposed it.
    pub scheduler: Name,
    /// When the machine admitted it (the timestamp of the ledger write that first held it).
    pub admitted_at: Hlc,
}

impl Allocation {
    /// The admission of `claim` at `admitted_at`.
    pub fn admit(claim: &Claim, admitted_at: Hlc) -> Self {
        Allocation {
            task: claim.task.clone(),
            node: claim.node.clone(),
            namespace: claim.namespace.clone(),
            resources: claim.resources.clone(),
            priority: claim.priority,
            claim: claim.at,
            scheduler: claim.scheduler.clone(),
            admitted_at,
        }
    }

    /// Its id.
    pub fn id(&self) -> AllocationId {
        AllocationId {
            admitted_at: self.admitted_at,
            node: self.node.clone(),
        }
    }
}

/// Why a machine rejected a claim.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum RejectReason {
    /// Not enough CPU left.
    OutOfCpu,
    /// Not enough memory left.
    OutOfMemory,
    /// Not enough of the named custom resource left.
    OutOfResource(String),
    /// The machine holds too few rights of the namespace's quota.
    OutOfQuota(Name),
    /// The machine has no node record (it left, or was never registered).
    NodeGone,
    /// The task is already admitted here or on another live machine, or another claim for it was
    /// admitted first.
    DuplicateTask,
    /// The machine already holds [`MAX_TASKS_PER_NODE`] allocations.
    TooManyTasks,
}

impl From<Resource> for RejectReason {
    fn from(resource: Resource) -> Self {
        match resource {
            Resource::Cpu => RejectReason::OutOfCpu,
            Resource::Memory => RejectReason::OutOfMemory,
            Resource::Custom(name) => RejectReason::OutOfResource(name),
        }
    }
}

impl fmt::Display for RejectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RejectReason::OutOfCpu => f.write_str("out of cpu"),
            RejectReason::OutOfMemory => f.write_str("out of memory"),
            RejectReason::OutOfResource(name) => write!(f, "out of {name}"),
            RejectReason::OutOfQuota(namespace) => write!(f, "out of quota for {namespace}"),
            RejectReason::NodeGone => f.write_str("node gone"),
            RejectReason::DuplicateTask => f.write_str("duplicate task"),
            RejectReason::TooManyTasks => f.write_str("too many tasks"),
        }
    }
}

/// A machine's refusal of a claim, kept in its ledger so schedulers back off and look elsewhere.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rejection {
    /// The task instance.
    pub task: TaskId,
    /// The rejected claim ([`Claim::at`]).
    pub claim: Hlc,
    /// The scheduler that proposed it.
    pub scheduler: Name,
    /// The claim's attempt number.
    pub attempt: u32,
    /// Why.
    pub reason: RejectReason,
    /// When the machine decided (the timestamp of its ledger write).
    pub at: Hlc,
}

/// One machine's capacity ledger, stored under `alloc/<node>` and written only by that machine.
///
/// Single writer: no two versions are ever concurrent, so no merge can combine two admissions
/// that were each checked alone. Every version the machine writes holds no more than `capacity`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ledger {
    /// The machine; must match the key.
    pub node: Name,
    /// Incremented by every write of the ledger.
    pub generation: u64,
    /// The capacity the admissions were checked against.
    pub capacity: Resources,
    /// What the machine admitted, sorted by task.
    pub admitted: Vec<Allocation>,
    /// Recent rejections, at most one per task, sorted by task.
    #[serde(default)]
    pub rejected: Vec<Rejection>,
}

impl Ledger {
    /// The ledger of a machine that has admitted nothing yet.
    pub fn empty(node: Name) -> Self {
        Ledger {
            node,
            generation: 0,
            capacity: Resources::default(),
            admitted: Vec::new(),
            rejected: Vec::new(),
        }
    }

    /// The resources its allocations reserve.
    pub fn used(&self) -> Resources {
        Resources::total(self.admitted.iter().map(|allocation| &allocation.resources))
    }

    /// The allocation of `task`, if admitted here.
    pub fn allocation(&self, task: &TaskId) -> Option<&Allocation> {
        self.admitted
            .binary_search_by(|allocation| allocation.task.cmp(task))
            .ok()
            .map(|at| &self.admitted[at])
    }

    /// The rejection of `task`, if one is remembered.
    pub fn rejection(&self, task: &TaskId) -> Option<&Rejection> {
        self.rejected
            .binary_search_by(|rejection| rejection.task.cmp(task))
            .ok()
            .map(|at| &self.rejected[at])
    }

    /// Whether this ledger records a decision on `claim`.
    pub fn decided(&self, claim: &Claim) -> bool {
        self.allocation(&claim.task)
            .is_some_and(|allocation| allocation.claim == claim.at)
            || self
                .rejection(&claim.task)
                .is_some_and(|rejection| rejection.claim == claim.at)
    }

    /// Whether the ledger keeps the rules its writer follows: it belongs to `node`, entries are
    /// sorted and unique, allocations name this machine, and they fit the recorded capacity.
    /// A value that breaks them was not written by mantissa and is ignored.
    pub(crate) fn is_well_formed(&self, node: &Name) -> bool {
        let sorted_allocations = self.admitted.windows(2).all(|w| w[0].task < w[1].task);
        let sorted_rejections = self.rejected.windows(2).all(|w| w[0].task < w[1].task);
        self.node == *node
            && sorted_allocations
            && sorted_rejections
            && self.admitted.iter().all(|a| a.node == *node)
            && self.capacity.holds(&self.used())
    }

    /// Sorts entries by task and keeps the most recent [`MAX_REJECTIONS_KEPT`] rejections.
    pub(crate) fn normalize(&mut self) {
        self.admitted.sort_by(|a, b| a.task.cmp(&b.task));
        if self.rejected.len() > MAX_REJECTIONS_KEPT {
            self.rejected.sort_by_key(|rejection| Reverse(rejection.at));
            self.rejected.truncate(MAX_REJECTIONS_KEPT);
        }
        self.rejected.sort_by(|a, b| a.task.cmp(&b.task));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crdt::NodeId;

    fn hlc(millis: u64, node: u64) -> Hlc {
        Hlc {
            millis,
            logical: 0,
            node: NodeId(node),
        }
    }

    fn claim(task: &str, priority: u32, at: Hlc, scheduler: &str) -> Claim {
        Claim {
            task: TaskId::parse(task).expect("valid"),
            node: Name::new("n1").expect("valid"),
            namespace: Name::new("default").expect("valid"),
            resources: Resources::new(1, 1),
            priority,
            at,
            scheduler: Name::new(scheduler).expect("valid"),
            attempt: 0,
        }
    }

    #[test]
    fn admission_order_is_priority_then_time_then_scheduler_then_task() {
        let high = claim("j/g/9", 5, hlc(9, 9), "s9");
        let early = claim("j/g/8", 1, hlc(1, 1), "s9");
        let late = claim("j/g/7", 1, hlc(2, 1), "s1");
        let tied_time_s1 = claim("j/g/6", 0, hlc(3, 1), "s1");
        let tied_time_s2 = claim("j/g/5", 0, hlc(3, 1), "s2");
        let tied_all_a = claim("j/g/1", 0, hlc(3, 1), "s2");
        let mut claims = vec![
            tied_time_s2.clone(),
            late.clone(),
            tied_all_a.clone(),
            high.clone(),
            tied_time_s1.clone(),
            early.clone(),
        ];
        claims.sort_by(Claim::admission_order);
        assert_eq!(
            claims,
            [high, early, late, tied_time_s1, tied_all_a, tied_time_s2]
        );
    }

    #[test]
    fn the_earlier_admission_has_the_smaller_id() {
        let a = AllocationId {
            admitted_at: hlc(5, 2),
            node: Name::new("z").expect("valid"),
        };
        let b = AllocationId {
            admitted_at: hlc(6, 1),
            node: Name::new("a").expect("valid"),
        };
        assert!(a < b);
    }

    #[test]
    fn a_ledger_knows_which_claims_it_decided() {
        let first = claim("j/g/0", 0, hlc(1, 1), "s1");
        let second = claim("j/g/0", 0, hlc(2, 1), "s1");
        let mut ledger = Ledger::empty(first.node.clone());
        ledger.capacity = Resources::new(10, 10);
        ledger.admitted.push(Allocation::admit(&first, hlc(3, 7)));
        assert!(ledger.decided(&first));
        assert!(!ledger.decided(&second));
        assert!(ledger.is_well_formed(&first.node));
        ledger.capacity = Resources::new(0, 0);
        assert!(!ledger.is_well_formed(&first.node), "over capacity");
    }

    #[test]
    fn reasons_travel_as_snake_case_json() {
        let json =
            serde_json::to_string(&RejectReason::OutOfResource("gpu".into())).expect("serializes");
        assert_eq!(json, r#"{"out_of_resource":"gpu"}"#);
        let json = serde_json::to_string(&RejectReason::NodeGone).expect("serializes");
        assert_eq!(json, r#""node_gone""#);
    }
}
