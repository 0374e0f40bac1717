//! Where each task of a job stands, and what each machine holds: the summaries an operator
//! reads (`mantissa job status`, `mantissa node ls`), computed from a [`ClusterView`].

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use crate::sched::{
    Allocation, Claim, ClusterView, JobSpec, Name, NodeRecord, Rejection, Resources, Task, TaskId,
};

/// Where one task instance stands.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
#[non_exhaustive]
pub enum TaskState {
    /// A live machine admitted it and runs it.
    Admitted {
        /// The winning allocation.
        allocation: Allocation,
    },
    /// A scheduler claimed a live machine for it; the machine has not decided yet.
    Claimed {
        /// The undecided claim (the earliest, when several race).
        claim: Claim,
    },
    /// Waiting for a machine.
    Pending {
        /// The latest rejection of it, if a machine refused it: why it still waits.
        last_rejection: Option<Rejection>,
        /// The machine that refused it.
        rejected_by: Option<Name>,
        /// Why no live machine can take it now, resource by resource and label by label, when
        /// none can; absent when one can (a scheduler has yet to claim it, or is backing off).
        #[serde(skip_serializing_if = "Option::is_none")]
        fits_nowhere: Option<String>,
    },
}

/// One task instance and where it stands.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TaskStatus {
    /// Which instance.
    pub task: TaskId,
    /// Where it stands.
    #[serde(flatten)]
    pub state: TaskState,
}

/// A job's spec and where each of its tasks stands.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct JobStatus {
    /// The spec.
    pub spec: JobSpec,
    /// Every task instance the spec asks for, in task order.
    pub tasks: Vec<TaskStatus>,
    /// How many are admitted.
    pub admitted: usize,
    /// How many are claimed and undecided.
    pub claimed: usize,
    /// How many wait for a machine.
    pub pending: usize,
}

/// A machine: its offer, whether membership counts it live, and what it holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct NodeStatus {
    /// The machine's record.
    pub record: NodeRecord,
    /// Whether membership counts it live.
    pub live: bool,
    /// What its admitted tasks use, from its ledger.
    pub used: Resources,
    /// How many tasks its ledger admits.
    pub allocations: usize,
    /// How many claims on it are undecided.
    pub undecided_claims: usize,
}

impl ClusterView {
    /// Where each task of `job` stands, given the `live` members; `None` when there is no such
    /// job.
    pub fn job_status(&self, job: &Name, live: &BTreeSet<Name>) -> Option<JobStatus> {
        let spec = self.jobs.get(job)?;
        let live_nodes = self.live_nodes(live);
        let held = self.allocations(&live_nodes);
        let mut claimed: BTreeMap<&TaskId, &Claim> = BTreeMap::new();
        for claim in live_nodes.iter().flat_map(|n| self.undecided_claims(n)) {
            let earlier = claimed
                .get(&claim.task)
                .is_none_or(|held| claim.admission_order(held).is_lt());
            if earlier {
                claimed.insert(&claim.task, claim);
            }
        }
        let mut status = JobStatus {
            spec: spec.clone(),
            tasks: Vec::new(),
            admitted: 0,
            claimed: 0,
            pending: 0,
        };
        for task in spec.tasks() {
            let state = if let Some(allocation) = held.get(&task.id) {
                status.admitted += 1;
                TaskState::Admitted {
                    allocation: allocation.clone(),
                }
            } else if let Some(claim) = claimed.get(&task.id) {
                status.claimed += 1;
                TaskState::Claimed {
                    claim: (*claim).clone(),
                }
            } else {
                status.pending += 1;
                let (rejected_by, last_rejection) = self.last_rejection(&task.id).unzip();
                TaskState::Pending {
                    last_rejection,
                    rejected_by,
                    fits_nowhere: self.fits_nowhere(&task, &live_nodes),
                }
            };
            status.tasks.push(TaskStatus {
                task: task.id,
                state,
            });
        }
        Some(status)
    }

    /// Every registered machine, in name order, given the `live` members.
    pub fn node_statuses(&self, live: &BTreeSet<Name>) -> Vec<NodeStatus> {
        self.nodes
            .values()
            .map(|record| {
                let ledger = self.ledgers.get(&record.name);
                NodeStatus {
                    record: record.clone(),
                    live: live.contains(&record.name),
                    used: ledger.map(|l| l.used()).unwrap_or_default(),
                    allocations: ledger.map_or(0, |l| l.admitted.len()),
                    undecided_claims: self.undecided_claims(&record.name).count(),
                }
            })
            .collect()
    }

    /// Why `task` fits on none of `live_nodes` as their ledgers stand, counting the machines
    /// per reason (`"fits on no live machine: no label zone=mars (2 machines); too little gpu
    /// offered (1 machine)"`); `None` when one fits.
    fn fits_nowhere(&self, task: &Task, live_nodes: &BTreeSet<Name>) -> Option<String> {
        let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
        for record in live_nodes.iter().filter_map(|node| self.nodes.get(node)) {
            let missing = task
                .constraints
                .labels
                .iter()
                .find(|(key, value)| record.labels.get(*key) != Some(*value));
            let reason = if let Some((key, value)) = missing {
                format!("no label {key}={value}")
            } else {
                let used = self
                    .ledgers
                    .get(&record.name)
                    .map(|ledger| ledger.used())
                    .unwrap_or_default();
                let short = record.capacity.shortfall(&used, &task.resources)?;
                let at_all = record
                    .capacity
                    .shortfall(&Resources::default(), &task.resources)
                    .is_some();
                if at_all {
                    format!("too little {short} offered")
                } else {
                    format!("too little {short} free")
                }
            };
            *reasons.entry(reason).or_default() += 1;
        }
        if reasons.is_empty() {
            return Some("no live machine offers itself".to_owned());
        }
        let reasons: Vec<String> = reasons
            .into_iter()
            .map(|(reason, machines)| match machines {
                1 => format!("{reason} (1 machine)"),
                _ => format!("{reason} ({machines} machines)"),
            })
            .collect();
        Some(format!("fits on no live machine: {}", reasons.join("; ")))
    }

    /// The most recent rejection of `task` by any machine, with that machine.
    fn last_rejection(&self, task: &TaskId) -> Option<(Name, Rejection)> {
        self.ledgers
            .iter()
            .filter_map(|(node, ledger)| Some((node, ledger.rejection(task)?)))
            .max_by_key(|(_, rejection)| rejection.at)
            .map(|(node, rejection)| (node.clone(), rejection.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crdt::{NodeId, Replica};
    use crate::sched::{Cluster, RejectReason, TaskGroup};

    fn member(name: &str) -> Name {
        Name::new(name).expect("valid")
    }

    fn name(text: &str) -> Name {
        Name::new(text).expect("valid")
    }

    /// Machine n1 (1 CPU) offers itself, job `web` asks for `count` tasks of 0.4 CPU, and
    /// scheduler s1 plans once.
    fn planned(replica: &mut Replica, count: u32) -> (Name, BTreeSet<Name>) {
        let (node, scheduler) = (member("n1"), member("s1"));
        let live = BTreeSet::from([node.clone(), scheduler.clone()]);
        let mut cluster = Cluster::new(replica);
        let offer = NodeRecord::new(node.clone(), Resources::new(1_000, 1 << 30));
        cluster.register_node(&offer, 1).expect("registers");
        let job = JobSpec::new(name("web")).group(TaskGroup::new(
            name("api"),
            count,
            Resources::new(400, 1 << 20),
        ));
        cluster.submit_job(&job, 2).expect("submits");
        cluster.plan(&scheduler, &live, 3).expect("plans");
        (node, live)
    }

    #[test]
    fn a_job_reports_admitted_claimed_and_pending_tasks() {
        let mut replica = Replica::new(NodeId(1));
        let (node, live) = planned(&mut replica, 3);
        let mut cluster = Cluster::new(&mut replica);
        let view = cluster.view().expect("reads");
        let claimed = view.job_status(&name("web"), &live).expect("known job");
        assert_eq!(
            (claimed.admitted, claimed.claimed, claimed.pending),
            (0, 2, 1)
        );

        let admitted = cluster.admit(&node, &live, 4).expect("admits");
        assert_eq!(admitted.decision.admitted.len(), 2);
        let view = cluster.view().expect("reads");
        let status = view.job_status(&name("web"), &live).expect("known job");
        assert_eq!((status.admitted, status.claimed, status.pending), (2, 0, 1));
        assert!(matches!(
            &status.tasks[0].state,
            TaskState::Admitted { allocation } if allocation.node == node
        ));
        let nodes = view.node_statuses(&live);
        assert_eq!(nodes.len(), 1);
        assert_eq!((nodes[0].allocations, nodes[0].used.cpu_millis), (2, 800));
        assert!(nodes[0].live);
        assert!(view.job_status(&name("db"), &live).is_none());
    }

    #[test]
    fn a_pending_task_shows_why_a_machine_refused_it() {
        let mut replica = Replica::new(NodeId(1));
        let (node, live) = planned(&mut replica, 1);
        let mut cluster = Cluster::new(&mut replica);
        // The machine shrank before it decided: the claim no longer fits.
        let smaller = NodeRecord::new(node.clone(), Resources::new(100, 1 << 30));
        cluster.register_node(&smaller, 4).expect("registers");
        cluster.admit(&node, &live, 5).expect("admits");
        let view = cluster.view().expect("reads");
        let status = view.job_status(&name("web"), &live).expect("known job");
        assert_eq!(status.pending, 1);
        let TaskState::Pending {
            last_rejection: Some(rejection),
            rejected_by: Some(by),
            ..
        } = &status.tasks[0].state
        else {
            panic!("expected a pending task with its rejection: {status:?}");
        };
        assert_eq!(rejection.reason, RejectReason::OutOfCpu);
        assert_eq!(*by, node);
    }

    #[test]
    fn a_pending_task_that_fits_nowhere_says_why() {
        let mut replica = Replica::new(NodeId(1));
        let (node, scheduler) = (member("n1"), member("s1"));
        let live = BTreeSet::from([node.clone(), scheduler]);
        let mut cluster = Cluster::new(&mut replica);
        let offer = NodeRecord::new(node, Resources::new(1_000, 1 << 30)).label("zone", "eu-1");
        cluster.register_node(&offer, 1).expect("registers");
        let mut mars = TaskGroup::new(name("mars"), 1, Resources::new(100, 1 << 20));
        mars.constraints.labels.insert("zone".into(), "mars".into());
        let job = JobSpec::new(name("web"))
            .group(TaskGroup::new(
                name("big"),
                1,
                Resources::new(100, 1 << 20).with("gpu", 1),
            ))
            .group(mars)
            .group(TaskGroup::new(
                name("small"),
                1,
                Resources::new(100, 1 << 20),
            ));
        cluster.submit_job(&job, 2).expect("submits");
        let view = cluster.view().expect("reads");
        let status = view.job_status(&name("web"), &live).expect("known job");
        let why: Vec<Option<&str>> = status
            .tasks
            .iter()
            .map(|task| match &task.state {
                TaskState::Pending { fits_nowhere, .. } => fits_nowhere.as_deref(),
                other => panic!("expected pending: {other:?}"),
            })
            .collect();
        assert_eq!(
            why,
            [
                Some("fits on no live machine: too little gpu offered (1 machine)"),
                Some("fits on no live machine: no label zone=mars (1 machine)"),
                None,
            ]
        );
    }
}
