//! A scheduler's planning round: claim a machine for each pending task it is responsible for.

use std::collections::{BTreeMap, BTreeSet};

use crate::crdt::{Delta, Replica};
use crate::gossip::MemberName;
use crate::sched::{
    Candidate, Claim, ClusterView, Name, Rejection, Resources, SchedError, SchedulerRecord, Task,
    TaskId, backoff_millis, choose, keys, responsible,
};

/// What [`Cluster::plan`](crate::sched::Cluster::plan) did.
#[derive(Debug)]
pub struct Plan {
    /// The claims made, in the order they were made.
    pub claims: Vec<Claim>,
    /// Tasks this scheduler is responsible for that it left pending: backing off after a
    /// rejection, fitting on no live machine now, or beyond what the live machines hold of
    /// their namespace's quota.
    pub waiting: Vec<TaskId>,
    /// The writes made, to send to peers.
    pub deltas: Vec<Delta>,
}

/// The load of the live machines as one scheduler counts it: admitted plus undecided claims,
/// updated as it claims.
struct Loads<'v> {
    view: &'v ClusterView,
    live_nodes: BTreeSet<MemberName>,
    used: BTreeMap<MemberName, Resources>,
    /// Tasks of each (job, group) admitted or claimed on each machine.
    groups: BTreeMap<(Name, Name), BTreeMap<MemberName, u32>>,
    /// CPU millis of undecided claims per (namespace, machine), for quota rights.
    claimed_cpu: BTreeMap<(Name, MemberName), u64>,
    /// Rejections of each task, with the machine that rejected it, from every ledger.
    rejections: BTreeMap<TaskId, Vec<(&'v MemberName, &'v Rejection)>>,
}

impl<'v> Loads<'v> {
    fn new(view: &'v ClusterView, live_nodes: BTreeSet<MemberName>) -> Self {
        let mut loads = Loads {
            view,
            used: BTreeMap::new(),
            groups: BTreeMap::new(),
            claimed_cpu: BTreeMap::new(),
            rejections: BTreeMap::new(),
            live_nodes,
        };
        for (node, ledger) in &view.ledgers {
            for rejection in &ledger.rejected {
                let of_task = loads.rejections.entry(rejection.task.clone()).or_default();
                of_task.push((node, rejection));
            }
        }
        for node in loads.live_nodes.clone() {
            if let Some(ledger) = view.ledgers.get(&node) {
                loads.used.insert(node.clone(), ledger.used());
                for allocation in &ledger.admitted {
                    loads.count_group(&allocation.task, &node);
                }
            }
            for claim in view.undecided_claims(&node) {
                loads.add(claim);
            }
        }
        loads
    }

    fn count_group(&mut self, task: &TaskId, node: &MemberName) {
        let group = (task.job.clone(), task.group.clone());
        *self
            .groups
            .entry(group)
            .or_default()
            .entry(node.clone())
            .or_insert(0) += 1;
    }

    /// Counts a claim against its machine.
    fn add(&mut self, claim: &Claim) {
        self.used
            .entry(claim.node.clone())
            .or_default()
            .add(&claim.resources);
        self.count_group(&claim.task, &claim.node);
        let cpu = self
            .claimed_cpu
            .entry((claim.namespace.clone(), claim.node.clone()))
            .or_insert(0);
        *cpu = cpu.saturating_add(claim.resources.cpu_millis);
    }

    /// Whether `node` holds quota rights for `task` beyond the claims already on it.
    fn has_rights(&self, task: &Task, node: &MemberName) -> bool {
        let Some(escrow) = self.view.quotas.get(&task.namespace) else {
            return true;
        };
        let claimed = self
            .claimed_cpu
            .get(&(task.namespace.clone(), node.clone()))
            .copied()
            .unwrap_or(0);
        escrow.available(node).saturating_sub(claimed) >= task.resources.cpu_millis
    }

    /// Whether the live machines together hold too few rights of the task's quota: no move of
    /// rights could let any of them admit it.
    fn quota_exhausted(&self, task: &Task) -> bool {
        let Some(escrow) = self.view.quotas.get(&task.namespace) else {
            return false;
        };
        let spare = self.live_nodes.iter().fold(0u64, |sum, node| {
            let claimed = self
                .claimed_cpu
                .get(&(task.namespace.clone(), node.clone()))
                .copied()
                .unwrap_or(0);
            sum.saturating_add(escrow.available(node).saturating_sub(claimed))
        });
        spare < task.resources.cpu_millis
    }

    /// The machine to claim for `task`, if it fits anywhere.
    fn place(&self, task: &Task) -> Option<MemberName> {
        let rejected_by: BTreeSet<&MemberName> = self
            .rejections
            .get(&task.id)
            .into_iter()
            .flatten()
            .map(|(node, _)| *node)
            .collect();
        let group = self
            .groups
            .get(&(task.id.job.clone(), task.id.group.clone()));
        let on = |node: &MemberName| group.and_then(|g| g.get(node)).copied().unwrap_or(0);
        let candidates: Vec<Candidate<'_>> = self
            .live_nodes
            .iter()
            .map(|node| Candidate {
                record: &self.view.nodes[node],
                used: self.used.get(node).cloned().unwrap_or_default(),
                group_tasks: on(node),
                rejected_before: rejected_by.contains(node),
                has_rights: self.has_rights(task, node),
            })
            .collect();
        let mut spread: BTreeMap<String, u32> = BTreeMap::new();
        if let Some(label) = &task.constraints.spread_by {
            for candidate in &candidates {
                let value = candidate
                    .record
                    .labels
                    .get(label)
                    .cloned()
                    .unwrap_or_default();
                *spread.entry(value).or_insert(0) += candidate.group_tasks;
            }
        }
        choose(task, &candidates, &spread).map(|index| candidates[index].record.name.clone())
    }

    /// The attempt number of the next claim for `task`, and the earliest time it may be made.
    fn next_attempt(&self, task: &TaskId) -> (u32, u64) {
        let Some(rejections) = self.rejections.get(task) else {
            return (0, 0);
        };
        let attempt = rejections
            .iter()
            .map(|(_, rejection)| rejection.attempt.saturating_add(1))
            .max()
            .unwrap_or(0);
        let last = rejections
            .iter()
            .map(|(_, rejection)| rejection.at.millis)
            .max()
            .unwrap_or(0);
        (attempt, last.saturating_add(backoff_millis(attempt)))
    }
}

/// Runs one planning round of `scheduler` on its replica.
pub(crate) fn plan(
    replica: &mut Replica,
    scheduler: &MemberName,
    live: &BTreeSet<MemberName>,
    now_millis: u64,
) -> Result<Plan, SchedError> {
    let view = ClusterView::read(replica)?;
    let mut deltas = Vec::new();
    if !view.schedulers.contains(scheduler) {
        let record = SchedulerRecord {
            name: scheduler.clone(),
        };
        let value = keys::encode(&record);
        deltas.push(replica.put(keys::scheduler(scheduler), value, now_millis)?);
    }
    let mut schedulers: BTreeSet<&MemberName> = view
        .schedulers
        .iter()
        .filter(|member| live.contains(*member))
        .collect();
    schedulers.insert(scheduler);
    let live_nodes = view.live_nodes(live);
    let mut loads = Loads::new(&view, live_nodes.clone());

    let mut claims = Vec::new();
    let mut waiting = Vec::new();
    for task in view.pending_tasks(live) {
        if responsible(&task.id, schedulers.iter().copied()) != Some(scheduler) {
            continue;
        }
        let (attempt, not_before) = loads.next_attempt(&task.id);
        let node = if now_millis < not_before || loads.quota_exhausted(&task) {
            None
        } else {
            loads.place(&task)
        };
        let Some(node) = node else {
            waiting.push(task.id);
            continue;
        };
        let claim = Claim {
            task: task.id.clone(),
            node: node.clone(),
            namespace: task.namespace.clone(),
            resources: task.resources.clone(),
            priority: task.priority,
            at: keys::next_timestamp(replica, now_millis),
            scheduler: scheduler.clone(),
            attempt,
        };
        let value = keys::encode(&claim);
        deltas.push(replica.put(keys::claim(&node, &task.id), value, now_millis)?);
        loads.add(&claim);
        // Claims left on machines that died would be admitted if they came back.
        for (dead, on_dead) in &view.claims {
            if !live_nodes.contains(dead)
                && on_dead.iter().any(|c| c.task == task.id)
                && let Some(delta) = replica.delete(keys::claim(dead, &task.id), now_millis)?
            {
                deltas.push(delta);
            }
        }
        claims.push(claim);
    }
    Ok(Plan {
        claims,
        waiting,
        deltas,
    })
}
