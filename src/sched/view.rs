//! The scheduling state one replica holds, read from its keyspace, and what follows from it:
//! the tasks the jobs ask for, the winning allocations, the claims not decided yet.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::crdt::{Key, Replica};
use crate::sched::cache::ViewCache;
use crate::sched::{
    Allocation, Claim, Decision, Escrow, JobSpec, Ledger, MAX_GROUP_COUNT, Name, NodeRecord,
    SchedError, Task, TaskGroup, TaskId, admission_round,
};

/// What a scheduler writes under `schedulers/<member>` to take part in placement.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SchedulerRecord {
    /// The scheduler's member name; must match the key.
    pub name: Name,
}

/// Every scheduling record of one replica, parsed.
///
/// Values that do not parse, or whose name disagrees with their key, are not mantissa's own
/// writes; they are left out and listed in `ignored`, never a reason to fail.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ClusterView {
    /// Node records, by node.
    pub nodes: BTreeMap<Name, NodeRecord>,
    /// Registered schedulers.
    pub schedulers: BTreeSet<Name>,
    /// Job specs, by job.
    pub jobs: BTreeMap<Name, JobSpec>,
    /// Ledgers, by node.
    pub ledgers: BTreeMap<Name, Ledger>,
    /// Claims, by the node they are made on, in key order.
    pub claims: BTreeMap<Name, Vec<Claim>>,
    /// Quotas, by namespace.
    pub quotas: BTreeMap<Name, Escrow>,
    /// Keys under the scheduling prefixes whose value was left out.
    pub ignored: Vec<Key>,
}

impl ClusterView {
    /// Reads the scheduling state of `replica`. Register siblings (concurrent writes) read as
    /// the register's winner.
    pub fn read(replica: &Replica) -> Result<Self, SchedError> {
        let mut cache = ViewCache::default();
        cache.refresh(replica)?;
        Ok(cache.into_view())
    }

    /// Every task instance the jobs ask for.
    pub fn wanted(&self) -> BTreeMap<TaskId, Task> {
        self.jobs
            .values()
            .flat_map(JobSpec::tasks)
            .map(|task| (task.id.clone(), task))
            .collect()
    }

    /// The registered nodes among `live`.
    pub fn live_nodes(&self, live: &BTreeSet<Name>) -> BTreeSet<Name> {
        self.nodes
            .keys()
            .filter(|node| live.contains(*node))
            .cloned()
            .collect()
    }

    /// For each task admitted on one of `live_nodes`, the winning allocation: the one with the
    /// smallest [`AllocationId`](crate::sched::AllocationId) (the earliest admission). The others
    /// are released by their machines at their next admission round.
    pub fn allocations(&self, live_nodes: &BTreeSet<Name>) -> BTreeMap<TaskId, Allocation> {
        let mut winners: BTreeMap<TaskId, Allocation> = BTreeMap::new();
        for node in live_nodes {
            let Some(ledger) = self.ledgers.get(node) else {
                continue;
            };
            for allocation in &ledger.admitted {
                let better = winners
                    .get(&allocation.task)
                    .is_none_or(|held| allocation.id() < held.id());
                if better {
                    winners.insert(allocation.task.clone(), allocation.clone());
                }
            }
        }
        winners
    }

    /// The allocations `node` wins, counting `node` as live: what it should run.
    pub fn node_allocations(&self, node: &Name, live: &BTreeSet<Name>) -> Vec<Allocation> {
        let mut live = live.clone();
        live.insert(node.clone());
        self.allocations(&self.live_nodes(&live))
            .into_values()
            .filter(|allocation| allocation.node == *node)
            .collect()
    }

    /// The decision `node` would take on the claims made on it, as this view shows them: the
    /// one it takes when its own replica holds the same writes.
    pub fn predict(&self, node: &Name, live: &BTreeSet<Name>) -> Decision {
        admission_round::predict(self, node, live)
    }

    /// The claims on `node` that its ledger has not decided yet.
    pub fn undecided_claims<'a>(&'a self, node: &Name) -> impl Iterator<Item = &'a Claim> {
        let ledger = self.ledgers.get(node);
        self.claims
            .get(node)
            .into_iter()
            .flatten()
            .filter(move |claim| ledger.is_none_or(|ledger| !ledger.decided(claim)))
    }

    /// Whether the jobs ask for `task`: its job exists and its group asks for at least
    /// `index + 1` instances. A lookup, where [`ClusterView::wanted`] lists every task.
    pub fn wants(&self, task: &TaskId) -> bool {
        self.group_of(task)
            .is_some_and(|(_, group)| task.index < group.count.min(MAX_GROUP_COUNT))
    }

    /// The job and group `task` belongs to, when the job exists and has that group.
    fn group_of(&self, task: &TaskId) -> Option<(&JobSpec, &TaskGroup)> {
        let job = self.jobs.get(&task.job)?;
        let group = job.groups.iter().find(|group| group.name == task.group)?;
        Some((job, group))
    }

    /// The tasks the jobs ask for that no live node holds and no live node has an undecided
    /// claim for, in placement order (priority, highest first, then task).
    pub fn pending_tasks(&self, live: &BTreeSet<Name>) -> Vec<Task> {
        let live_nodes = self.live_nodes(live);
        // Tasks are compared as borrowed (job, group, index) so that only pending ones are built.
        let mut taken: BTreeSet<(&Name, &Name, u32)> = BTreeSet::new();
        for node in &live_nodes {
            if let Some(ledger) = self.ledgers.get(node) {
                taken.extend(ledger.admitted.iter().map(|a| borrowed(&a.task)));
            }
            taken.extend(
                self.undecided_claims(node)
                    .map(|claim| borrowed(&claim.task)),
            );
        }
        let mut pending: Vec<Task> = Vec::new();
        for job in self.jobs.values() {
            for group in &job.groups {
                for index in 0..group.count.min(MAX_GROUP_COUNT) {
                    if !taken.contains(&(&job.name, &group.name, index)) {
                        pending.push(Task::of(job, group, index));
                    }
                }
            }
        }
        pending.sort_by(|a, b| b.priority.cmp(&a.priority).then_with(|| a.id.cmp(&b.id)));
        pending
    }
}

/// A task id as a tuple of borrowed parts, ordered as [`TaskId`] is.
fn borrowed(task: &TaskId) -> (&Name, &Name, u32) {
    (&task.job, &task.group, task.index)
}
