//! How a machine decides the claims made on it ([`resolve`]): a pure function, so any replica
//! can predict a machine's decision from the same state before the machine confirms it. The round
//! that reads the state and writes the decision is `admission_round.rs`.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet};

use crate::sched::{
    Allocation, Claim, MAX_TASKS_PER_NODE, Name, NodeRecord, RejectReason, Resources, TaskId,
};

/// What a machine knows beyond its own ledger when it admits.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AdmissionContext {
    /// Tasks that another live machine holds (its allocation wins the tie-break).
    pub held_elsewhere: BTreeSet<TaskId>,
    /// For each namespace with a quota, the CPU millis of quota this machine may still consume
    /// beyond its current allocations. A namespace absent here has no quota.
    pub quota_rights: BTreeMap<Name, u64>,
}

/// The outcome of [`resolve`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Decision {
    /// Admitted claims, in admission order.
    pub admitted: Vec<Claim>,
    /// Rejected claims with the reason, in admission order.
    pub rejected: Vec<Rejected>,
}

/// A rejected claim.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejected {
    /// The claim.
    pub claim: Claim,
    /// Why it was rejected.
    pub reason: RejectReason,
}

/// Decides `claims` made on the machine described by `record` (`None`: it has no record), which
/// already holds `admitted`.
///
/// Claims are taken in [`Claim::admission_order`]; each is admitted if its task is not already
/// held (here, by an earlier claim of this round, or by another live machine), the machine holds
/// fewer than [`MAX_TASKS_PER_NODE`] tasks, every resource fits what is left, and the namespace's
/// quota rights cover its CPU. A claim that does not fit does not block smaller ones after it.
///
/// ```
/// use mantissa::crdt::{Hlc, NodeId};
/// use mantissa::sched::{resolve, AdmissionContext, Claim, Name, NodeRecord, RejectReason, Resources, TaskId};
/// let node = Name::new("node-a").unwrap();
/// let record = NodeRecord::new(node.clone(), Resources::new(1_000, 1 << 30));
/// let claim = |task: &str, cpu: u64, millis: u64| Claim {
///     task: TaskId::parse(task).unwrap(),
///     node: node.clone(),
///     namespace: Name::new("default").unwrap(),
///     resources: Resources::new(cpu, 0),
///     priority: 0,
///     at: Hlc { millis, logical: 0, node: NodeId(1) },
///     scheduler: Name::new("s1").unwrap(),
///     attempt: 0,
/// };
/// let decision = resolve(
///     Some(&record),
///     &[claim("web/api/1", 600, 2), claim("web/api/0", 600, 1)],
///     &[],
///     &AdmissionContext::default(),
/// );
/// assert_eq!(decision.admitted[0].task.to_string(), "web/api/0"); // the earlier claim
/// assert_eq!(decision.rejected[0].reason, RejectReason::OutOfCpu);
/// ```
pub fn resolve(
    record: Option<&NodeRecord>,
    claims: &[Claim],
    admitted: &[Allocation],
    context: &AdmissionContext,
) -> Decision {
    let mut ordered: Vec<&Claim> = claims.iter().collect();
    ordered.sort_by(|a, b| a.admission_order(b));
    let mut decision = Decision::default();
    let mut used = Resources::total(admitted.iter().map(|allocation| &allocation.resources));
    let mut held: BTreeSet<&TaskId> = admitted.iter().map(|allocation| &allocation.task).collect();
    let mut rights = context.quota_rights.clone();
    for claim in ordered {
        let verdict = match record {
            None => Err(RejectReason::NodeGone),
            Some(record) => check(claim, record, &used, &held, &rights, context),
        };
        match verdict {
            Ok(()) => {
                used.add(&claim.resources);
                held.insert(&claim.task);
                if let Some(left) = rights.get_mut(&claim.namespace) {
                    *left -= claim.resources.cpu_millis;
                }
                decision.admitted.push(claim.clone());
            }
            Err(reason) => decision.rejected.push(Rejected {
                claim: claim.clone(),
                reason,
            }),
        }
    }
    decision
}

/// Whether one claim may be admitted on top of what this round has admitted so far.
fn check(
    claim: &Claim,
    record: &NodeRecord,
    used: &Resources,
    held: &BTreeSet<&TaskId>,
    rights: &BTreeMap<Name, u64>,
    context: &AdmissionContext,
) -> Result<(), RejectReason> {
    if held.contains(&claim.task) || context.held_elsewhere.contains(&claim.task) {
        return Err(RejectReason::DuplicateTask);
    }
    if held.len() >= MAX_TASKS_PER_NODE {
        return Err(RejectReason::TooManyTasks);
    }
    if let Some(resource) = record.capacity.shortfall(used, &claim.resources) {
        return Err(resource.into());
    }
    match rights.get(&claim.namespace) {
        Some(&left) if claim.resources.cpu_millis > left => {
            Err(RejectReason::OutOfQuota(claim.namespace.clone()))
        }
        _ => Ok(()),
    }
}

/// Splits `allocations` into those that still fit `capacity` and those that must be evicted: the
/// highest priority and earliest admitted are kept first. Only a shrunken capacity evicts.
pub(crate) fn refit(
    capacity: &Resources,
    mut allocations: Vec<Allocation>,
) -> (Vec<Allocation>, Vec<Allocation>) {
    if capacity.holds(&Resources::total(allocations.iter().map(|a| &a.resources))) {
        return (allocations, Vec::new());
    }
    allocations.sort_by_key(|a| (Reverse(a.priority), a.id()));
    let mut used = Resources::default();
    let (mut kept, mut evicted) = (Vec::new(), Vec::new());
    for allocation in allocations {
        if capacity.shortfall(&used, &allocation.resources).is_none() {
            used.add(&allocation.resources);
            kept.push(allocation);
        } else {
            evicted.push(allocation);
        }
    }
    kept.sort_by(|a, b| a.task.cmp(&b.task));
    (kept, evicted)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crdt::{Hlc, NodeId};

    fn member(name: &str) -> Name {
        Name::new(name).expect("valid")
    }

    fn hlc(millis: u64) -> Hlc {
        Hlc {
            millis,
            logical: 0,
            node: NodeId(1),
        }
    }

    fn node(cpu: u64, memory: u64) -> NodeRecord {
        NodeRecord::new(member("n1"), Resources::new(cpu, memory).with("gpu", 1))
    }

    fn claim(task: &str, resources: Resources, priority: u32, millis: u64) -> Claim {
        Claim {
            task: TaskId::parse(task).expect("valid"),
            node: member("n1"),
            namespace: Name::new("default").expect("valid"),
            resources,
            priority,
            at: hlc(millis),
            scheduler: member("s1"),
            attempt: 0,
        }
    }

    fn tasks(claims: &[Claim]) -> Vec<String> {
        claims.iter().map(|claim| claim.task.to_string()).collect()
    }

    fn reasons(decision: &Decision) -> Vec<(String, RejectReason)> {
        decision
            .rejected
            .iter()
            .map(|r| (r.claim.task.to_string(), r.reason.clone()))
            .collect()
    }

    #[test]
    fn higher_priority_is_admitted_first_even_when_later() {
        let low = claim("j/low/0", Resources::new(800, 0), 0, 1);
        let high = claim("j/high/0", Resources::new(800, 0), 9, 2);
        let decision = resolve(
            Some(&node(1_000, 1_000)),
            &[low, high],
            &[],
            &AdmissionContext::default(),
        );
        assert_eq!(tasks(&decision.admitted), ["j/high/0"]);
        assert_eq!(
            reasons(&decision),
            [("j/low/0".into(), RejectReason::OutOfCpu)]
        );
    }

    #[test]
    fn a_large_claim_that_does_not_fit_does_not_block_a_small_one() {
        let claims = [
            claim("j/a/0", Resources::new(600, 0), 0, 1),
            claim("j/b/0", Resources::new(600, 0), 0, 2),
            claim("j/c/0", Resources::new(400, 0), 0, 3),
        ];
        let decision = resolve(
            Some(&node(1_000, 1_000)),
            &claims,
            &[],
            &AdmissionContext::default(),
        );
        assert_eq!(tasks(&decision.admitted), ["j/a/0", "j/c/0"]);
    }

    #[test]
    fn each_resource_has_its_reason() {
        let existing = Allocation::admit(&claim("j/old/0", Resources::new(500, 500), 0, 0), hlc(0));
        let claims = [
            claim("j/cpu/0", Resources::new(600, 0), 0, 1),
            claim("j/mem/0", Resources::new(0, 600), 0, 2),
            claim("j/gpu/0", Resources::new(0, 0).with("gpu", 2), 0, 3),
            claim("j/tpu/0", Resources::new(0, 0).with("tpu", 1), 0, 4),
        ];
        let decision = resolve(
            Some(&node(1_000, 1_000)),
            &claims,
            &[existing],
            &AdmissionContext::default(),
        );
        assert!(decision.admitted.is_empty());
        assert_eq!(
            reasons(&decision),
            [
                ("j/cpu/0".into(), RejectReason::OutOfCpu),
                ("j/mem/0".into(), RejectReason::OutOfMemory),
                ("j/gpu/0".into(), RejectReason::OutOfResource("gpu".into())),
                ("j/tpu/0".into(), RejectReason::OutOfResource("tpu".into())),
            ]
        );
    }

    #[test]
    fn a_machine_without_a_record_rejects_everything() {
        let decision = resolve(
            None,
            &[claim("j/a/0", Resources::new(1, 1), 0, 1)],
            &[],
            &AdmissionContext::default(),
        );
        assert!(decision.admitted.is_empty());
        assert_eq!(
            reasons(&decision),
            [("j/a/0".into(), RejectReason::NodeGone)]
        );
    }

    #[test]
    fn a_task_is_admitted_once() {
        let here = claim("j/here/0", Resources::new(1, 1), 0, 0);
        let existing = Allocation::admit(&here, hlc(0));
        let mut context = AdmissionContext::default();
        context
            .held_elsewhere
            .insert(TaskId::parse("j/there/0").expect("valid"));
        let claims = [
            claim("j/here/0", Resources::new(1, 1), 0, 5),
            claim("j/there/0", Resources::new(1, 1), 0, 6),
            claim("j/twice/0", Resources::new(1, 1), 0, 7),
            claim("j/twice/0", Resources::new(1, 1), 0, 8),
        ];
        let decision = resolve(Some(&node(1_000, 1_000)), &claims, &[existing], &context);
        assert_eq!(tasks(&decision.admitted), ["j/twice/0"]);
        assert_eq!(decision.admitted[0].at, hlc(7), "the earlier claim wins");
        assert!(
            decision
                .rejected
                .iter()
                .all(|r| r.reason == RejectReason::DuplicateTask)
        );
        assert_eq!(decision.rejected.len(), 3);
    }

    #[test]
    fn quota_rights_bound_the_cpu_admitted_per_namespace() {
        let mut context = AdmissionContext::default();
        let tenant = Name::new("tenant").expect("valid");
        context.quota_rights.insert(tenant.clone(), 500);
        let mut claims = vec![
            claim("j/a/0", Resources::new(300, 0), 0, 1),
            claim("j/b/0", Resources::new(300, 0), 0, 2),
            claim("j/c/0", Resources::new(200, 0), 0, 3),
            claim("j/free/0", Resources::new(300, 0), 0, 4),
        ];
        for claim in &mut claims[..3] {
            claim.namespace = tenant.clone();
        }
        let decision = resolve(Some(&node(10_000, 1_000)), &claims, &[], &context);
        assert_eq!(tasks(&decision.admitted), ["j/a/0", "j/c/0", "j/free/0"]);
        assert_eq!(
            reasons(&decision),
            [("j/b/0".into(), RejectReason::OutOfQuota(tenant))]
        );
    }

    #[test]
    fn the_task_limit_rejects_beyond_it() {
        let existing: Vec<Allocation> = (0..MAX_TASKS_PER_NODE)
            .map(|i| {
                Allocation::admit(
                    &claim(&format!("j/g/{i}"), Resources::default(), 0, 0),
                    hlc(0),
                )
            })
            .collect();
        let decision = resolve(
            Some(&node(1, 1)),
            &[claim("j/h/0", Resources::default(), 0, 1)],
            &existing,
            &AdmissionContext::default(),
        );
        assert_eq!(
            reasons(&decision),
            [("j/h/0".into(), RejectReason::TooManyTasks)]
        );
    }

    #[test]
    fn every_order_of_the_same_claims_gives_the_same_decision() {
        let claims = vec![
            claim("j/a/0", Resources::new(400, 0), 1, 5),
            claim("j/b/0", Resources::new(400, 0), 0, 1),
            claim("j/c/0", Resources::new(400, 0), 1, 3),
            claim("j/d/0", Resources::new(100, 0), 0, 2),
        ];
        let record = node(1_000, 1_000);
        let expected = resolve(Some(&record), &claims, &[], &AdmissionContext::default());
        let mut reversed = claims.clone();
        reversed.reverse();
        let mut rotated = claims.clone();
        rotated.rotate_left(2);
        for order in [reversed, rotated] {
            let decision = resolve(Some(&record), &order, &[], &AdmissionContext::default());
            assert_eq!(decision, expected);
        }
        assert_eq!(tasks(&expected.admitted), ["j/c/0", "j/a/0", "j/d/0"]);
    }

    #[test]
    fn refit_evicts_the_lowest_priority_latest_admissions_first() {
        let admit = |task: &str, priority: u32, millis: u64| {
            Allocation::admit(
                &claim(task, Resources::new(400, 0), priority, 0),
                hlc(millis),
            )
        };
        let allocations = vec![
            admit("j/a/0", 0, 1),
            admit("j/b/0", 0, 2),
            admit("j/c/0", 5, 3),
        ];
        let (kept, evicted) = refit(&Resources::new(800, 0), allocations.clone());
        assert_eq!(
            kept.iter().map(|a| a.task.to_string()).collect::<Vec<_>>(),
            ["j/a/0", "j/c/0"]
        );
        assert_eq!(evicted.len(), 1);
        assert_eq!(evicted[0].task.to_string(), "j/b/0");
        let (kept, evicted) = refit(&Resources::new(1_200, 0), allocations);
        assert_eq!((kept.len(), evicted.len()), (3, 0));
    }
}
