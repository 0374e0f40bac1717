//! Placement strategies: which machine a scheduler proposes for a task.
//!
//! Pure functions of the machines' records and loads. A load counts both what a machine admitted
//! and the claims on it it has not decided yet (as Omega's schedulers count each other's
//! optimistic commits), so schedulers do not pile claims onto a machine that looks free only
//! because it has not answered yet.

use std::collections::BTreeMap;

use crate::sched::rendezvous::Weigher;
use crate::sched::{NodeRecord, Resources, Strategy, Task};

/// A machine as placement sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate<'a> {
    /// Its record.
    pub record: &'a NodeRecord,
    /// What its admitted allocations and undecided claims on it hold.
    pub used: Resources,
    /// Tasks of the same group admitted or claimed on it.
    pub group_tasks: u32,
    /// It rejected an earlier claim for this task: tried last.
    pub rejected_before: bool,
    /// It holds enough quota rights for the task, or the namespace has no quota: tried first.
    pub has_rights: bool,
}

/// The candidate `task` should be claimed on, or `None` when it fits on none.
///
/// Among machines whose labels satisfy the constraints and whose free resources hold the task,
/// the best is, in this order: one that has not rejected the task before; one with quota rights
/// for it; one whose value of the `spread_by` label holds the fewest tasks of the group
/// (`spread` counts them per value); then by strategy — bin-pack takes the fullest machine after
/// placement, spread the one with the fewest tasks of the group, then the emptiest; remaining
/// ties go to the highest rendezvous weight of (task, machine), so equal machines share the load.
///
/// ```
/// use mantissa::sched::{choose, Candidate, JobSpec, Name, NodeRecord, Resources, Strategy, TaskGroup};
/// let record = |name: &str| NodeRecord::new(Name::new(name).unwrap(), Resources::new(1_000, 1_000));
/// let (a, b) = (record("a"), record("b"));
/// let candidate = |record, cpu| Candidate {
///     record, used: Resources::new(cpu, 0), group_tasks: 0, rejected_before: false, has_rights: true,
/// };
/// let candidates = [candidate(&a, 500), candidate(&b, 100)];
/// let mut job = JobSpec::new(Name::new("web").unwrap())
///     .group(TaskGroup::new(Name::new("api").unwrap(), 1, Resources::new(200, 0)));
/// let task = job.tasks().next().unwrap();
/// assert_eq!(choose(&task, &candidates, &Default::default()), Some(0)); // bin-pack: fuller
/// job.strategy = Strategy::Spread;
/// let task = job.tasks().next().unwrap();
/// assert_eq!(choose(&task, &candidates, &Default::default()), Some(1)); // spread: emptier
/// ```
pub fn choose(
    task: &Task,
    candidates: &[Candidate<'_>],
    spread: &BTreeMap<String, u32>,
) -> Option<usize> {
    // One pass; the rendezvous weight, the last part of the rank, is only hashed between
    // candidates that tie on everything else.
    let weigher = Weigher::new(&task.id);
    let mut best: Option<(usize, Rank, Option<u64>)> = None;
    for (index, candidate) in candidates.iter().enumerate() {
        if !fits(task, candidate) {
            continue;
        }
        let rank = rank(task, candidate, spread);
        let better = match &mut best {
            None => true,
            Some((_, best_rank, _)) if rank != *best_rank => rank < *best_rank,
            Some((best_index, _, best_weight)) => {
                let best_weight = *best_weight.get_or_insert_with(|| {
                    weigher.weight(candidates[*best_index].record.name.as_str())
                });
                let weight = weigher.weight(candidate.record.name.as_str());
                // The higher weight ranks first; a full tie keeps the earlier candidate.
                if weight > best_weight {
                    best = Some((index, rank, Some(weight)));
                }
                false
            }
        };
        if better {
            best = Some((index, rank, None));
        }
    }
    best.map(|(index, _, _)| index)
}

/// Whether `task` may run on `candidate` and fits what is left there.
pub fn fits(task: &Task, candidate: &Candidate<'_>) -> bool {
    task.constraints.allows(candidate.record)
        && candidate
            .record
            .capacity
            .shortfall(&candidate.used, &task.resources)
            .is_none()
}

/// The sort key of a feasible candidate, smaller is better, before the rendezvous weight that
/// breaks its ties.
type Rank = (bool, bool, u32, (u64, u64));

fn rank(task: &Task, candidate: &Candidate<'_>, spread: &BTreeMap<String, u32>) -> Rank {
    let spread_count = task.constraints.spread_by.as_ref().map_or(0, |label| {
        let value = candidate
            .record
            .labels
            .get(label)
            .map_or("", String::as_str);
        spread.get(value).copied().unwrap_or(0)
    });
    let utilization = candidate
        .record
        .capacity
        .utilization_after_ppm(&candidate.used, &task.resources);
    let by_strategy = match task.strategy {
        Strategy::BinPack => (0, u64::MAX - utilization),
        Strategy::Spread => (u64::from(candidate.group_tasks), utilization),
    };
    (
        candidate.rejected_before,
        !candidate.has_rights,
        spread_count,
        by_strategy,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sched::{Constraints, JobSpec, Name, TaskGroup};

    fn record(name: &str, cpu: u64, zone: &str) -> NodeRecord {
        NodeRecord::new(Name::new(name).expect("valid"), Resources::new(cpu, 1_000))
            .label("zone", zone)
    }

    fn candidate(record: &NodeRecord, used_cpu: u64) -> Candidate<'_> {
        Candidate {
            record,
            used: Resources::new(used_cpu, 0),
            group_tasks: 0,
            rejected_before: false,
            has_rights: true,
        }
    }

    fn task(cpu: u64, strategy: Strategy, constraints: Constraints) -> Task {
        let mut group = TaskGroup::new(Name::new("g").expect("valid"), 1, Resources::new(cpu, 0));
        group.constraints = constraints;
        let mut job = JobSpec::new(Name::new("j").expect("valid")).group(group);
        job.strategy = strategy;
        job.tasks().next().expect("one task")
    }

    #[test]
    fn bin_pack_takes_the_fullest_machine_that_fits() {
        let (a, b, c) = (
            record("a", 1_000, "x"),
            record("b", 1_000, "x"),
            record("c", 1_000, "x"),
        );
        let candidates = [candidate(&a, 300), candidate(&b, 700), candidate(&c, 900)];
        let task = task(200, Strategy::BinPack, Constraints::default());
        assert_eq!(choose(&task, &candidates, &BTreeMap::new()), Some(1));
    }

    #[test]
    fn spread_takes_the_machine_with_the_fewest_tasks_of_the_group_then_the_emptiest() {
        let (a, b, c) = (
            record("a", 1_000, "x"),
            record("b", 1_000, "x"),
            record("c", 1_000, "x"),
        );
        let mut candidates = [candidate(&a, 300), candidate(&b, 100), candidate(&c, 0)];
        candidates[2].group_tasks = 1;
        let task = task(200, Strategy::Spread, Constraints::default());
        assert_eq!(choose(&task, &candidates, &BTreeMap::new()), Some(1));
    }

    #[test]
    fn required_labels_and_free_resources_filter_machines() {
        let (a, b) = (record("a", 1_000, "x"), record("b", 1_000, "y"));
        let candidates = [candidate(&a, 0), candidate(&b, 900)];
        let mut constraints = Constraints::default();
        constraints.labels.insert("zone".into(), "y".into());
        assert_eq!(
            choose(
                &task(100, Strategy::BinPack, constraints.clone()),
                &candidates,
                &BTreeMap::new()
            ),
            Some(1)
        );
        assert_eq!(
            choose(
                &task(101, Strategy::BinPack, constraints),
                &candidates,
                &BTreeMap::new()
            ),
            None
        );
    }

    #[test]
    fn spread_by_label_evens_out_label_values() {
        let (a, b) = (record("a", 1_000, "x"), record("b", 1_000, "y"));
        let candidates = [candidate(&a, 900), candidate(&b, 0)];
        let constraints = Constraints {
            spread_by: Some("zone".into()),
            ..Constraints::default()
        };
        let task = task(100, Strategy::BinPack, constraints);
        let spread = BTreeMap::from([("y".to_string(), 2), ("x".to_string(), 1)]);
        assert_eq!(choose(&task, &candidates, &spread), Some(0));
        let spread = BTreeMap::from([("x".to_string(), 2)]);
        assert_eq!(choose(&task, &candidates, &spread), Some(1));
    }

    #[test]
    fn machines_that_rejected_the_task_or_lack_rights_come_last() {
        let (a, b) = (record("a", 1_000, "x"), record("b", 1_000, "x"));
        let mut candidates = [candidate(&a, 900), candidate(&b, 0)];
        let task = task(100, Strategy::BinPack, Constraints::default());
        assert_eq!(choose(&task, &candidates, &BTreeMap::new()), Some(0));
        candidates[0].rejected_before = true;
        assert_eq!(choose(&task, &candidates, &BTreeMap::new()), Some(1));
        candidates[1].has_rights = false;
        assert_eq!(choose(&task, &candidates, &BTreeMap::new()), Some(1));
        candidates[1].rejected_before = true;
        assert_eq!(choose(&task, &candidates, &BTreeMap::new()), Some(0));
    }

    #[test]
    fn equal_machines_share_tasks_by_rendezvous_weight() {
        let records: Vec<NodeRecord> = (0..4)
            .map(|i| record(&format!("n{i}"), 1_000, "x"))
            .collect();
        let candidates: Vec<Candidate<'_>> = records.iter().map(|r| candidate(r, 0)).collect();
        let mut chosen = std::collections::BTreeSet::new();
        for index in 0..40 {
            let mut task = task(10, Strategy::BinPack, Constraints::default());
            task.id.index = index;
            chosen.insert(choose(&task, &candidates, &BTreeMap::new()).expect("fits"));
        }
        assert_eq!(chosen.len(), 4);
    }
}
