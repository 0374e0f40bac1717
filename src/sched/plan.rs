//! A scheduler's planning round: claim a machine for each pending task it is responsible for.

use std::collections::{BTreeMap, BTreeSet};

use crate::crdt::{Delta, Replica};
use crate::sched::cache::{Holdings, ViewCache};
use crate::sched::{
    Candidate, Claim, ClusterView, MAX_GROUP_COUNT, Name, SchedError, SchedulerRecord, Task,
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
/// updated as it claims. Machines are numbered by their place among the live machines (name
/// order), the order in which placement considers them.
struct Loads<'v> {
    view: &'v ClusterView,
    /// The live machines as placement sees them, kept up to date as the round claims.
    candidates: Vec<Candidate<'v>>,
    /// Where each live machine is in `candidates`.
    slots: BTreeMap<&'v Name, usize>,
    /// Tasks of each job and group admitted or claimed on each machine, by slot.
    groups: BTreeMap<Name, BTreeMap<Name, Vec<u32>>>,
    /// CPU millis of undecided claims per (namespace, machine), for quota rights.
    claimed_cpu: BTreeMap<(Name, Name), u64>,
    /// Rejections of each task, with the machine that rejected it, from every ledger.
    holdings: &'v Holdings,
}

impl<'v> Loads<'v> {
    fn new(cache: &'v ViewCache, live_nodes: &BTreeSet<Name>) -> Self {
        let view = cache.current();
        let mut loads = Loads {
            view,
            candidates: Vec::with_capacity(live_nodes.len()),
            slots: BTreeMap::new(),
            groups: BTreeMap::new(),
            claimed_cpu: BTreeMap::new(),
            holdings: cache.holdings(),
        };
        for (node, record) in &view.nodes {
            if !live_nodes.contains(node) {
                continue;
            }
            let slot = loads.candidates.len();
            loads.slots.insert(node, slot);
            let load = cache.load(node);
            loads.candidates.push(Candidate {
                record,
                used: load.map(|load| load.used.clone()).unwrap_or_default(),
                group_tasks: 0,
                rejected_before: false,
                has_rights: true,
            });
            for (job, group, count) in load.into_iter().flat_map(|load| &load.groups) {
                loads.count_group(job, group, slot, *count);
            }
            for claim in view.undecided_claims(node) {
                loads.add(claim, slot);
            }
        }
        loads
    }

    fn count_group(&mut self, job: &Name, group: &Name, slot: usize, tasks: u32) {
        let machines = self.candidates.len().max(slot + 1);
        let of_job = match self.groups.get_mut(job) {
            Some(of_job) => of_job,
            None => self.groups.entry(job.clone()).or_default(),
        };
        let counts = match of_job.get_mut(group) {
            Some(counts) => counts,
            None => of_job.entry(group.clone()).or_default(),
        };
        if counts.len() < machines {
            counts.resize(machines, 0);
        }
        counts[slot] = counts[slot].saturating_add(tasks);
    }

    /// Counts a claim against its machine, in `slot`.
    fn add(&mut self, claim: &Claim, slot: usize) {
        self.candidates[slot].used.add(&claim.resources);
        self.count_group(&claim.task.job, &claim.task.group, slot, 1);
        if self.view.quotas.contains_key(&claim.namespace) {
            let cpu = self
                .claimed_cpu
                .entry((claim.namespace.clone(), claim.node.clone()))
                .or_insert(0);
            *cpu = cpu.saturating_add(claim.resources.cpu_millis);
        }
    }

    /// Whether `node` holds quota rights for `task` beyond the claims already on it.
    fn has_rights(&self, task: &Task, node: &Name) -> bool {
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
        let spare = self.slots.keys().fold(0u64, |sum, node| {
            let claimed = self
                .claimed_cpu
                .get(&(task.namespace.clone(), (*node).clone()))
                .copied()
                .unwrap_or(0);
            sum.saturating_add(escrow.available(node).saturating_sub(claimed))
        });
        spare < task.resources.cpu_millis
    }

    /// The slot of the machine to claim for `task`, if it fits anywhere.
    fn place(&mut self, task: &Task) -> Option<usize> {
        let rejected_by: Vec<usize> = self
            .holdings
            .rejections(&task.id)
            .iter()
            .filter_map(|(node, _)| self.slots.get(node).copied())
            .collect();
        let group = self
            .groups
            .get(&task.id.job)
            .and_then(|of_job| of_job.get(&task.id.group));
        let quota = self.view.quotas.contains_key(&task.namespace);
        let rights: Vec<bool> = if quota {
            self.slots
                .keys()
                .map(|node| self.has_rights(task, node))
                .collect()
        } else {
            Vec::new()
        };
        for (slot, candidate) in self.candidates.iter_mut().enumerate() {
            candidate.group_tasks = group.and_then(|g| g.get(slot)).copied().unwrap_or(0);
            candidate.rejected_before = false;
            candidate.has_rights = rights.get(slot).copied().unwrap_or(true);
        }
        for &slot in &rejected_by {
            self.candidates[slot].rejected_before = true;
        }
        let mut spread: BTreeMap<String, u32> = BTreeMap::new();
        if let Some(label) = &task.constraints.spread_by {
            for candidate in &self.candidates {
                if candidate.group_tasks == 0 {
                    continue;
                }
                let value = candidate
                    .record
                    .labels
                    .get(label)
                    .map_or("", String::as_str);
                match spread.get_mut(value) {
                    Some(count) => *count += candidate.group_tasks,
                    None => {
                        spread.insert(value.to_owned(), candidate.group_tasks);
                    }
                }
            }
        }
        choose(task, &self.candidates, &spread)
    }

    /// The attempt number of the next claim for `task`, and the earliest time it may be made.
    fn next_attempt(&self, task: &TaskId) -> (u32, u64) {
        let rejections = self.holdings.rejections(task);
        if rejections.is_empty() {
            return (0, 0);
        }
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

/// [`ClusterView::pending_tasks`], from the index of held tasks: walks each group's held tasks
/// in order instead of looking each task up.
pub(crate) fn pending_tasks(
    view: &ClusterView,
    holdings: &Holdings,
    live_nodes: &BTreeSet<Name>,
) -> Vec<Task> {
    let dead: BTreeSet<&Name> = view
        .ledgers
        .keys()
        .filter(|node| !live_nodes.contains(*node))
        .collect();
    let claimed: BTreeSet<(&Name, &Name, u32)> = live_nodes
        .iter()
        .flat_map(|node| view.undecided_claims(node))
        .map(|claim| (&claim.task.job, &claim.task.group, claim.task.index))
        .collect();
    let mut pending = Vec::new();
    for job in view.jobs.values() {
        for group in &job.groups {
            let mut held = holdings
                .of_group(&job.name, &group.name)
                .filter(|(_, ids)| ids.iter().any(|id| !dead.contains(&id.node)))
                .map(|(index, _)| index)
                .peekable();
            for index in 0..group.count.min(MAX_GROUP_COUNT) {
                while held.next_if(|&at| at < index).is_some() {}
                if held.next_if_eq(&index).is_some()
                    || claimed.contains(&(&job.name, &group.name, index))
                {
                    continue;
                }
                pending.push(Task::of(job, group, index));
            }
        }
    }
    pending.sort_by(|a, b| b.priority.cmp(&a.priority).then_with(|| a.id.cmp(&b.id)));
    pending
}

/// Runs one planning round of `scheduler` on its replica, reading it through `cache`.
pub(crate) fn plan(
    replica: &mut Replica,
    cache: &mut ViewCache,
    scheduler: &Name,
    live: &BTreeSet<Name>,
    now_millis: u64,
) -> Result<Plan, SchedError> {
    cache.refresh(replica)?;
    let view = cache.current();
    let mut deltas = Vec::new();
    if !view.schedulers.contains(scheduler) {
        let record = SchedulerRecord {
            name: scheduler.clone(),
        };
        let value = keys::encode(&record);
        deltas.push(replica.put(keys::scheduler(scheduler), value, now_millis)?);
    }
    let mut schedulers: BTreeSet<&Name> = view
        .schedulers
        .iter()
        .filter(|member| live.contains(*member))
        .collect();
    schedulers.insert(scheduler);
    let schedulers: Vec<&Name> = schedulers.into_iter().collect();
    let live_nodes = view.live_nodes(live);
    let mut loads = Loads::new(cache, &live_nodes);
    // Claims left on machines that died would be admitted if they came back.
    let mut on_dead: BTreeMap<&TaskId, Vec<&Name>> = BTreeMap::new();
    for (dead, claims) in &view.claims {
        if !live_nodes.contains(dead) {
            for claim in claims {
                on_dead.entry(&claim.task).or_default().push(dead);
            }
        }
    }

    let mut claims = Vec::new();
    let mut waiting = Vec::new();
    for task in pending_tasks(view, cache.holdings(), &live_nodes) {
        if responsible(&task.id, schedulers.iter().copied()) != Some(scheduler) {
            continue;
        }
        let (attempt, not_before) = loads.next_attempt(&task.id);
        let slot = if now_millis < not_before || loads.quota_exhausted(&task) {
            None
        } else {
            loads.place(&task)
        };
        let Some(slot) = slot else {
            waiting.push(task.id);
            continue;
        };
        let node = loads.candidates[slot].record.name.clone();
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
        loads.add(&claim, slot);
        for dead in on_dead.get(&task.id).into_iter().flatten() {
            if let Some(delta) = replica.delete(keys::claim(dead, &task.id), now_millis)? {
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
