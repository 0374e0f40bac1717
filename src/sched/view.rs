//! The scheduling state one replica holds, read from its keyspace, and what follows from it:
//! the tasks the jobs ask for, the winning allocations, the claims not decided yet.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::crdt::{Key, Replica, Value};
use crate::gossip::MemberName;
use crate::sched::{
    Allocation, Claim, Decision, Escrow, JobSpec, Ledger, Name, NodeRecord, QuotaSpec, SchedError,
    Share, Task, TaskId, admit, keys,
};

/// What a scheduler writes under `schedulers/<member>` to take part in placement.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SchedulerRecord {
    /// The scheduler's member name; must match the key.
    pub name: MemberName,
}

/// Every scheduling record of one replica, parsed.
///
/// Values that do not parse, or whose name disagrees with their key, are not mantissa's own
/// writes; they are left out and listed in `ignored`, never a reason to fail.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ClusterView {
    /// Node records, by node.
    pub nodes: BTreeMap<MemberName, NodeRecord>,
    /// Registered schedulers.
    pub schedulers: BTreeSet<MemberName>,
    /// Job specs, by job.
    pub jobs: BTreeMap<Name, JobSpec>,
    /// Ledgers, by node.
    pub ledgers: BTreeMap<MemberName, Ledger>,
    /// Claims, by the node they are made on, in key order.
    pub claims: BTreeMap<MemberName, Vec<Claim>>,
    /// Quotas, by namespace.
    pub quotas: BTreeMap<Name, Escrow>,
    /// Keys under the scheduling prefixes whose value was left out.
    pub ignored: Vec<Key>,
}

impl ClusterView {
    /// Reads the scheduling state of `replica`. Register siblings (concurrent writes) read as
    /// the register's winner.
    pub fn read(replica: &Replica) -> Result<Self, SchedError> {
        let mut view = ClusterView::default();
        for (key, bytes) in registers(replica, keys::NODES, &mut view.ignored)? {
            let name = keys::suffix(&key, keys::NODES).and_then(|s| MemberName::new(s).ok());
            match (name, keys::decode::<NodeRecord>(&bytes)) {
                (Some(name), Some(record)) if record.name == name => {
                    view.nodes.insert(name, record);
                }
                _ => view.ignored.push(key),
            }
        }
        for (key, bytes) in registers(replica, keys::SCHEDULERS, &mut view.ignored)? {
            let name = keys::suffix(&key, keys::SCHEDULERS).and_then(|s| MemberName::new(s).ok());
            match (name, keys::decode::<SchedulerRecord>(&bytes)) {
                (Some(name), Some(record)) if record.name == name => {
                    view.schedulers.insert(name);
                }
                _ => view.ignored.push(key),
            }
        }
        for (key, bytes) in registers(replica, keys::JOBS, &mut view.ignored)? {
            let name = keys::suffix(&key, keys::JOBS).and_then(|s| Name::new(s).ok());
            match (name, keys::decode::<JobSpec>(&bytes)) {
                (Some(name), Some(job)) if job.name == name && job.validate().is_ok() => {
                    view.jobs.insert(name, job);
                }
                _ => view.ignored.push(key),
            }
        }
        for (key, bytes) in registers(replica, keys::ALLOC, &mut view.ignored)? {
            let name = keys::suffix(&key, keys::ALLOC).and_then(|s| MemberName::new(s).ok());
            match (name, keys::decode::<Ledger>(&bytes)) {
                (Some(name), Some(ledger)) if ledger.is_well_formed(&name) => {
                    view.ledgers.insert(name, ledger);
                }
                _ => view.ignored.push(key),
            }
        }
        for (key, bytes) in registers(replica, keys::CLAIMS, &mut view.ignored)? {
            let place = keys::suffix(&key, keys::CLAIMS).and_then(|s| s.split_once('/'));
            let node = place.and_then(|(node, _)| MemberName::new(node).ok());
            let task = place.and_then(|(_, task)| TaskId::parse(task).ok());
            match (node, task, keys::decode::<Claim>(&bytes)) {
                (Some(node), Some(task), Some(claim))
                    if claim.node == node && claim.task == task =>
                {
                    view.claims.entry(node).or_default().push(claim);
                }
                _ => view.ignored.push(key),
            }
        }
        view.read_quotas(replica)?;
        Ok(view)
    }

    fn read_quotas(&mut self, replica: &Replica) -> Result<(), SchedError> {
        let mut specs = BTreeMap::new();
        for (key, bytes) in registers(replica, keys::QUOTAS, &mut self.ignored)? {
            let name = keys::suffix(&key, keys::QUOTAS).and_then(|s| Name::new(s).ok());
            match (name, keys::decode::<QuotaSpec>(&bytes)) {
                (Some(name), Some(spec)) if spec.namespace == name => {
                    specs.insert(name, spec);
                }
                _ => self.ignored.push(key),
            }
        }
        let mut shares: BTreeMap<Name, BTreeMap<MemberName, Share>> = BTreeMap::new();
        for (key, bytes) in registers(replica, keys::QUOTA_SHARES, &mut self.ignored)? {
            let place = keys::suffix(&key, keys::QUOTA_SHARES).and_then(|s| s.split_once('/'));
            let namespace = place.and_then(|(namespace, _)| Name::new(namespace).ok());
            let member = place.and_then(|(_, member)| MemberName::new(member).ok());
            match (namespace, member, keys::decode::<Share>(&bytes)) {
                (Some(namespace), Some(member), Some(share)) => {
                    shares.entry(namespace).or_default().insert(member, share);
                }
                _ => self.ignored.push(key),
            }
        }
        for (namespace, spec) in specs {
            let shares = shares.remove(&namespace).unwrap_or_default();
            self.quotas.insert(namespace, Escrow::new(spec, shares));
        }
        Ok(())
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
    pub fn live_nodes(&self, live: &BTreeSet<MemberName>) -> BTreeSet<MemberName> {
        self.nodes
            .keys()
            .filter(|node| live.contains(*node))
            .cloned()
            .collect()
    }

    /// For each task admitted on one of `live_nodes`, the winning allocation: the one with the
    /// smallest [`AllocationId`](crate::sched::AllocationId) (the earliest admission). The others
    /// are released by their machines at their next admission round.
    pub fn allocations(&self, live_nodes: &BTreeSet<MemberName>) -> BTreeMap<TaskId, Allocation> {
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
    pub fn node_allocations(
        &self,
        node: &MemberName,
        live: &BTreeSet<MemberName>,
    ) -> Vec<Allocation> {
        let mut live = live.clone();
        live.insert(node.clone());
        self.allocations(&self.live_nodes(&live))
            .into_values()
            .filter(|allocation| allocation.node == *node)
            .collect()
    }

    /// The decision `node` would take on the claims made on it, as this view shows them: the
    /// one it takes when its own replica holds the same writes.
    pub fn predict(&self, node: &MemberName, live: &BTreeSet<MemberName>) -> Decision {
        admit::predict(self, node, live)
    }

    /// The claims on `node` that its ledger has not decided yet.
    pub fn undecided_claims<'a>(&'a self, node: &MemberName) -> impl Iterator<Item = &'a Claim> {
        let ledger = self.ledgers.get(node);
        self.claims
            .get(node)
            .into_iter()
            .flatten()
            .filter(move |claim| ledger.is_none_or(|ledger| !ledger.decided(claim)))
    }

    /// The tasks the jobs ask for that no live node holds and no live node has an undecided
    /// claim for, in placement order (priority, highest first, then task).
    pub fn pending_tasks(&self, live: &BTreeSet<MemberName>) -> Vec<Task> {
        let live_nodes = self.live_nodes(live);
        let held = self.allocations(&live_nodes);
        let claimed: BTreeSet<&TaskId> = live_nodes
            .iter()
            .flat_map(|node| self.undecided_claims(node))
            .map(|claim| &claim.task)
            .collect();
        let mut pending: Vec<Task> = self
            .wanted()
            .into_values()
            .filter(|task| !held.contains_key(&task.id) && !claimed.contains(&task.id))
            .collect();
        pending.sort_by(|a, b| b.priority.cmp(&a.priority).then_with(|| a.id.cmp(&b.id)));
        pending
    }
}

/// The register values under `prefix`; keys holding another type are added to `ignored`.
fn registers(
    replica: &Replica,
    prefix: &str,
    ignored: &mut Vec<Key>,
) -> Result<Vec<(Key, Vec<u8>)>, SchedError> {
    let mut found = Vec::new();
    for (key, value) in replica.range(prefix.as_bytes(), usize::MAX)? {
        match value {
            Value::Register(register) => found.push((key, register.value)),
            _ => ignored.push(key),
        }
    }
    Ok(found)
}
