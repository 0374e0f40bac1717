//! A machine's admission round: release what it must, decide the claims made on it, and write
//! its ledger, its quota shares and the removal of the claims it decided.

use std::collections::{BTreeMap, BTreeSet};

use crate::crdt::{Delta, Hlc, Replica};
use crate::sched::cache::{Holdings, ViewCache};
use crate::sched::claim_decision::refit;
use crate::sched::{
    AdmissionContext, Allocation, AllocationId, Claim, ClusterView, Decision, Escrow, Ledger, Name,
    NodeRecord, Put, RejectReason, Rejection, SchedError, TaskId, keys, resolve,
};

/// What [`Cluster::admit`](crate::sched::Cluster::admit) did.
#[derive(Debug)]
pub struct Admitted {
    /// The claims decided this round.
    pub decision: Decision,
    /// Allocations the machine gave up this round: stop these tasks.
    pub released: Vec<Release>,
    /// The writes made, to send to peers.
    pub deltas: Vec<Delta>,
}

/// An allocation a machine gave up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Release {
    /// The allocation.
    pub allocation: Allocation,
    /// Why.
    pub cause: ReleaseCause,
}

/// Why a machine gave up an allocation.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ReleaseCause {
    /// The job was stopped, or its group shrank below this instance.
    JobGone,
    /// Another live machine admitted the same task earlier; its allocation wins.
    LostTieBreak(AllocationId),
    /// The machine's capacity shrank below what it held.
    Evicted,
    /// The machine's node record is gone.
    NodeGone,
}

/// How long a machine remembers refusing a claim for a task another machine holds: several
/// maximal backoffs, so a scheduler that counts the holder dead retries slowly, not in a loop.
const DUPLICATE_REJECTION_KEPT_MILLIS: u64 = 6 * crate::sched::BACKOFF_MAX_MILLIS;

/// The inputs of one admission round on a machine, derived from a view.
struct Round<'v> {
    view: &'v ClusterView,
    record: Option<NodeRecord>,
    previous: Ledger,
    kept: Vec<Allocation>,
    released: Vec<Release>,
    /// Undecided claims for tasks the jobs still ask for.
    claims: Vec<Claim>,
    /// Claims to delete without a decision: already decided, or for tasks nobody asks for.
    obsolete: Vec<Claim>,
    /// The winning allocation of each task this round looks at (held here, claimed here or
    /// rejected here before), among the live machines, this one included.
    winners: BTreeMap<TaskId, AllocationId>,
    context: AdmissionContext,
}

impl<'v> Round<'v> {
    fn new(
        view: &'v ClusterView,
        holdings: &Holdings,
        node: &Name,
        live: &BTreeSet<Name>,
    ) -> Round<'v> {
        let is_live = |member: &Name| {
            view.nodes.contains_key(member) && (member == node || live.contains(member))
        };
        let record = view.nodes.get(node).cloned();
        let previous = view
            .ledgers
            .get(node)
            .cloned()
            .unwrap_or_else(|| Ledger::empty(node.clone()));
        let mine = view.claims.get(node).map_or(&[][..], Vec::as_slice);
        let mut winners = BTreeMap::new();
        let looked_at = (previous.admitted.iter().map(|a| &a.task))
            .chain(previous.rejected.iter().map(|r| &r.task))
            .chain(mine.iter().map(|c| &c.task));
        for task in looked_at {
            if !winners.contains_key(task)
                && let Some(winner) = holdings.winner(task, is_live)
            {
                winners.insert(task.clone(), winner.clone());
            }
        }

        let mut kept = Vec::new();
        let mut released = Vec::new();
        for allocation in &previous.admitted {
            let cause = match winners.get(&allocation.task) {
                _ if record.is_none() => Some(ReleaseCause::NodeGone),
                _ if !view.wants(&allocation.task) => Some(ReleaseCause::JobGone),
                Some(winner) if winner.node != *node => {
                    Some(ReleaseCause::LostTieBreak(winner.clone()))
                }
                _ => None,
            };
            match cause {
                Some(cause) => released.push(Release {
                    allocation: allocation.clone(),
                    cause,
                }),
                None => kept.push(allocation.clone()),
            }
        }
        if let Some(record) = &record {
            let (fitting, evicted) = refit(&record.capacity, kept);
            kept = fitting;
            released.extend(evicted.into_iter().map(|allocation| Release {
                allocation,
                cause: ReleaseCause::Evicted,
            }));
        }

        let (claims, obsolete): (Vec<Claim>, Vec<Claim>) = mine
            .iter()
            .cloned()
            .partition(|claim| !previous.decided(claim) && view.wants(&claim.task));
        let context = AdmissionContext {
            held_elsewhere: claims
                .iter()
                .filter(|claim| {
                    winners
                        .get(&claim.task)
                        .is_some_and(|winner| winner.node != *node)
                })
                .map(|claim| claim.task.clone())
                .collect(),
            quota_rights: view
                .quotas
                .iter()
                .map(|(namespace, escrow)| {
                    let used = usage(&kept, namespace);
                    (namespace.clone(), escrow.rights(node).saturating_sub(used))
                })
                .collect(),
        };
        Round {
            view,
            record,
            previous,
            kept,
            released,
            claims,
            obsolete,
            winners,
            context,
        }
    }

    fn decide(&self) -> Decision {
        resolve(
            self.record.as_ref(),
            &self.claims,
            &self.kept,
            &self.context,
        )
    }

    /// The ledger after `decision`, whose admissions and rejections are stamped `at`.
    fn ledger(&self, decision: &Decision, at: Hlc) -> Ledger {
        let mut admitted = self.kept.clone();
        admitted.extend(
            decision
                .admitted
                .iter()
                .map(|claim| Allocation::admit(claim, at)),
        );
        let fresh: BTreeMap<&TaskId, Rejection> = decision
            .rejected
            .iter()
            .map(|rejected| {
                let claim = &rejected.claim;
                let rejection = Rejection {
                    task: claim.task.clone(),
                    claim: claim.at,
                    scheduler: claim.scheduler.clone(),
                    attempt: claim.attempt,
                    reason: rejected.reason.clone(),
                    at,
                };
                (&claim.task, rejection)
            })
            .collect();
        let admitted_now: BTreeSet<&TaskId> = admitted.iter().map(|a| &a.task).collect();
        // A rejection is remembered while its task still waits for a machine: it steers the
        // next claim elsewhere and sets the backoff.
        let still_waiting = |task: &TaskId| {
            self.view.wants(task)
                && !self.winners.contains_key(task)
                && !admitted_now.contains(task)
        };
        let mut rejected: Vec<Rejection> = self
            .previous
            .rejected
            .iter()
            .filter(|old| !fresh.contains_key(&old.task))
            .cloned()
            .collect();
        rejected.extend(fresh.into_values());
        // A duplicate-task rejection stays a while even though another machine holds the task:
        // the scheduler that claimed it may count that machine dead (membership views differ for
        // a while after a partition), and without the rejection it would claim again at once,
        // round after round, instead of backing off.
        let recent_duplicate = |rejection: &Rejection| {
            rejection.reason == RejectReason::DuplicateTask
                && self.view.wants(&rejection.task)
                && !admitted_now.contains(&rejection.task)
                && at.millis.saturating_sub(rejection.at.millis) <= DUPLICATE_REJECTION_KEPT_MILLIS
        };
        rejected.retain(|rejection| still_waiting(&rejection.task) || recent_duplicate(rejection));
        rejected.sort_by(|a, b| a.task.cmp(&b.task));
        let mut ledger = Ledger {
            node: self.previous.node.clone(),
            generation: self.previous.generation,
            capacity: self
                .record
                .as_ref()
                .map_or_else(Default::default, |record| record.capacity.clone()),
            admitted,
            rejected,
        };
        ledger.normalize();
        ledger
    }
}

/// CPU millis `allocations` hold in `namespace`.
fn usage<'a>(allocations: impl IntoIterator<Item = &'a Allocation>, namespace: &Name) -> u64 {
    allocations
        .into_iter()
        .filter(|allocation| allocation.namespace == *namespace)
        .fold(0, |sum, allocation| {
            sum.saturating_add(allocation.resources.cpu_millis)
        })
}

/// CPU millis `claims` ask for in `namespace`.
fn claimed_cpu(claims: &[Claim], namespace: &Name) -> u64 {
    claims
        .iter()
        .filter(|claim| claim.namespace == *namespace)
        .fold(0, |sum, claim| {
            sum.saturating_add(claim.resources.cpu_millis)
        })
}

/// The writes of `node`'s share of one quota around its ledger write, given the quota CPU its
/// new ledger uses and the quota CPU of the claims it refused for lack of rights: the write to
/// make before the ledger (consumption up, requests, grants) and the one after (consumption
/// down).
fn share_writes(
    escrow: &Escrow,
    node: &Name,
    usage: u64,
    refused: u64,
    live: &BTreeSet<Name>,
) -> Result<(Option<Put>, Option<Put>), SchedError> {
    let mut share = escrow.share(node);
    let before = share.clone();
    if usage > share.consumed {
        escrow.set_consumed(node, &mut share, usage)?;
    }
    // Ask first, so that a machine short of rights this round does not give them away to a
    // member that would then have to give them back.
    let deficit = refused.saturating_sub(escrow.spare(node, &share));
    escrow.request(node, &mut share, deficit, live);
    escrow.answer(node, &mut share, live);
    let first = (share != before).then(|| escrow.put(node, &share));
    let second = (usage < share.consumed).then(|| {
        share.consumed = usage;
        escrow.put(node, &share)
    });
    Ok((first, second))
}

/// The decision `node` would take now, computed from `view`: the same one it takes if its own
/// replica holds the same state.
pub(crate) fn predict(view: &ClusterView, node: &Name, live: &BTreeSet<Name>) -> Decision {
    Round::new(view, &Holdings::of(view.ledgers.values()), node, live).decide()
}

/// Whether the register at `key` holds concurrent versions.
///
/// A machine's ledger only does after the machine lost its data and wrote a new ledger before it
/// received its previous one. Rewriting it replaces every version this replica has seen with the
/// one it reads (the newest); allocations only an older version held are released with it.
fn has_siblings(replica: &Replica, key: &crate::crdt::Key) -> Result<bool, SchedError> {
    Ok(matches!(
        replica.get(key)?,
        Some(crate::crdt::Value::Register(register)) if !register.siblings.is_empty()
    ))
}

/// Runs one admission round of `node` on its own replica, reading it through `cache`.
pub(crate) fn admit(
    replica: &mut Replica,
    cache: &mut ViewCache,
    node: &Name,
    live: &BTreeSet<Name>,
    now_millis: u64,
) -> Result<Admitted, SchedError> {
    cache.refresh_for(replica, node)?;
    let view = cache.current();
    let round = Round::new(view, cache.holdings(), node, live);
    let decision = round.decide();
    let mut deltas = Vec::new();

    // Consumption rises before the ledger that uses it and falls after the ledger that frees it,
    // so any replica that holds a ledger holds a share that covers it.
    let mut after_ledger = Vec::new();
    for (namespace, escrow) in &view.quotas {
        let usage = usage(&round.kept, namespace)
            .saturating_add(claimed_cpu(&decision.admitted, namespace));
        let quota_refused: Vec<Claim> = decision
            .rejected
            .iter()
            .filter(|rejected| rejected.reason == RejectReason::OutOfQuota(namespace.clone()))
            .map(|rejected| rejected.claim.clone())
            .collect();
        let refused = claimed_cpu(&quota_refused, namespace);
        let (before, after) = share_writes(escrow, node, usage, refused, live)?;
        if let Some(put) = before {
            deltas.push(replica.put(put.key, put.value, now_millis)?);
        }
        after_ledger.extend(after);
    }

    let at = keys::next_timestamp(replica, now_millis);
    let mut ledger = round.ledger(&decision, at);
    let changed = Ledger {
        generation: round.previous.generation,
        ..ledger.clone()
    } != round.previous;
    if changed || has_siblings(replica, &keys::ledger(node))? {
        ledger.generation = round.previous.generation + 1;
        let value = keys::encode(&ledger);
        deltas.push(replica.put(keys::ledger(node), value, now_millis)?);
    }
    for put in after_ledger {
        deltas.push(replica.put(put.key, put.value, now_millis)?);
    }

    let decided = decision
        .admitted
        .iter()
        .chain(decision.rejected.iter().map(|rejected| &rejected.claim));
    for claim in decided.chain(&round.obsolete) {
        if let Some(delta) = replica.delete(keys::claim(node, &claim.task), now_millis)? {
            deltas.push(delta);
        }
    }
    Ok(Admitted {
        decision,
        released: round.released,
        deltas,
    })
}
