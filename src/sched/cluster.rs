//! The scheduling API over one replica: the writes of machines, clients and schedulers, and the
//! reads every replica computes the same way from the same state.

use std::collections::{BTreeMap, BTreeSet};

use crate::crdt::{Delta, Replica};
use crate::sched::{
    Admitted, Allocation, ClusterView, Decision, JobSpec, Name, NodeRecord, Plan, QuotaSpec,
    SchedError, Task, TaskId, ViewCache, admission_round, keys, plan,
};

/// Scheduling over one replica's keyspace.
///
/// Sans-IO like the replica under it: time comes in as `now_millis`, membership as the set of
/// live members, and every write returns the [`Delta`]s the caller ships to peers. Reads take
/// the same inputs on every replica and return the same answers once replicas hold the same
/// writes; [`ClusterView`] offers them over a shared `&Replica` too.
///
/// ```
/// use std::collections::BTreeSet;
/// use mantissa::crdt::{NodeId, Replica};
/// use mantissa::sched::{Cluster, JobSpec, Name, NodeRecord, Resources, TaskGroup};
///
/// let member = |name: &str| Name::new(name).unwrap();
/// let (node, scheduler) = (member("node-a"), member("sched-1"));
/// let live = BTreeSet::from([node.clone(), scheduler.clone()]);
/// let mut at_node = Replica::new(NodeId(1));
/// let mut at_scheduler = Replica::new(NodeId(2));
///
/// // The machine offers itself; a client submits a job at the scheduler's replica.
/// let offer = NodeRecord::new(node.clone(), Resources::new(2_000, 4 << 30));
/// at_scheduler.apply(Cluster::new(&mut at_node).register_node(&offer, 1_000)?)?;
/// let job = JobSpec::new(Name::new("web")?)
///     .group(TaskGroup::new(Name::new("api")?, 3, Resources::new(500, 1 << 30)));
/// at_node.apply(Cluster::new(&mut at_scheduler).submit_job(&job, 1_001)?)?;
///
/// // The scheduler claims the machine for each task; the machine admits the claims.
/// let plan = Cluster::new(&mut at_scheduler).plan(&scheduler, &live, 1_002)?;
/// assert_eq!(plan.claims.len(), 3);
/// for delta in plan.deltas { at_node.apply(delta)?; }
/// let admitted = Cluster::new(&mut at_node).admit(&node, &live, 1_003)?;
/// assert_eq!(admitted.decision.admitted.len(), 3);
/// for delta in admitted.deltas { at_scheduler.apply(delta)?; }
///
/// // Both replicas now compute the same allocations.
/// let here = Cluster::new(&mut at_scheduler).allocations(&live)?;
/// assert_eq!(here.len(), 3);
/// assert_eq!(here, Cluster::new(&mut at_node).allocations(&live)?);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct Cluster<'r> {
    replica: &'r mut Replica,
    /// What the rounds read the replica through: the caller's, kept across rounds, or one for
    /// this value only.
    cache: Cache<'r>,
}

enum Cache<'r> {
    Own(Box<ViewCache>),
    Borrowed(&'r mut ViewCache),
}

impl<'r> Cluster<'r> {
    /// Scheduling over `replica`. Each round reads the scheduling state afresh; see
    /// [`Cluster::with_cache`] for a node that runs round after round.
    pub fn new(replica: &'r mut Replica) -> Self {
        Cluster {
            replica,
            cache: Cache::Own(Box::default()),
        }
    }

    /// Scheduling over `replica`, with rounds that read it through `cache`: they re-parse only
    /// what changed since the cache last looked. Keep one cache per node across its rounds.
    pub fn with_cache(replica: &'r mut Replica, cache: &'r mut ViewCache) -> Self {
        Cluster {
            replica,
            cache: Cache::Borrowed(cache),
        }
    }

    /// Everything the replica holds about scheduling, parsed.
    pub fn view(&self) -> Result<ClusterView, SchedError> {
        ClusterView::read(self.replica)
    }

    // ---- writes of a machine about itself ----

    /// Publishes a machine's offer. Only the machine itself should call this.
    pub fn register_node(
        &mut self,
        record: &NodeRecord,
        now_millis: u64,
    ) -> Result<Delta, SchedError> {
        let value = keys::encode(record);
        Ok(self
            .replica
            .put(keys::node(&record.name), value, now_millis)?)
    }

    /// Withdraws a machine's offer: claims on it are rejected, and it releases what it holds at
    /// its next admission round. `None` when it had no record.
    pub fn deregister_node(
        &mut self,
        node: &Name,
        now_millis: u64,
    ) -> Result<Option<Delta>, SchedError> {
        Ok(self.replica.delete(keys::node(node), now_millis)?)
    }

    // ---- writes of clients ----

    /// Submits (or replaces) a job.
    pub fn submit_job(&mut self, job: &JobSpec, now_millis: u64) -> Result<Delta, SchedError> {
        job.validate()?;
        let value = keys::encode(job);
        Ok(self.replica.put(keys::job(&job.name), value, now_millis)?)
    }

    /// Stops a job: its machines release its tasks at their next admission round. `None` when
    /// there was no such job.
    pub fn stop_job(&mut self, job: &Name, now_millis: u64) -> Result<Option<Delta>, SchedError> {
        Ok(self.replica.delete(keys::job(job), now_millis)?)
    }

    /// Creates a namespace's quota. Refused when this replica already holds one for it: a quota
    /// is created once, before the namespace's first job (see `docs/scheduling.md`).
    pub fn create_quota(
        &mut self,
        quota: &QuotaSpec,
        now_millis: u64,
    ) -> Result<Delta, SchedError> {
        quota.validate()?;
        if self.view()?.quotas.contains_key(&quota.namespace) {
            return Err(SchedError::QuotaExists(quota.namespace.clone()));
        }
        let value = keys::encode(quota);
        Ok(self
            .replica
            .put(keys::quota(&quota.namespace), value, now_millis)?)
    }

    // ---- reads ----

    /// The tasks waiting for a machine, given the `live` members: no live machine holds them or
    /// has an undecided claim for them.
    pub fn pending_tasks(&self, live: &BTreeSet<Name>) -> Result<Vec<Task>, SchedError> {
        Ok(self.view()?.pending_tasks(live))
    }

    /// Every task held by a live machine, with the allocation that wins for it.
    pub fn allocations(
        &self,
        live: &BTreeSet<Name>,
    ) -> Result<BTreeMap<TaskId, Allocation>, SchedError> {
        let view = self.view()?;
        Ok(view.allocations(&view.live_nodes(live)))
    }

    /// The allocations `node` wins, counting `node` as live: what it should run.
    pub fn node_allocations(
        &self,
        node: &Name,
        live: &BTreeSet<Name>,
    ) -> Result<Vec<Allocation>, SchedError> {
        Ok(self.view()?.node_allocations(node, live))
    }

    /// The decision `node` would take on the claims made on it, as this replica sees them: what
    /// it will write, once it holds the same state.
    pub fn predict(&self, node: &Name, live: &BTreeSet<Name>) -> Result<Decision, SchedError> {
        Ok(self.view()?.predict(node, live))
    }

    // ---- rounds ----

    /// One planning round of `scheduler`: claims a machine for every pending task it is
    /// responsible for (rendezvous hashing over the live registered schedulers, itself
    /// included) whose backoff has passed and that fits somewhere, and deletes the task's
    /// claims left on dead machines. Registers the scheduler on its first round.
    pub fn plan(
        &mut self,
        scheduler: &Name,
        live: &BTreeSet<Name>,
        now_millis: u64,
    ) -> Result<Plan, SchedError> {
        let cache = match &mut self.cache {
            Cache::Own(cache) => &mut **cache,
            Cache::Borrowed(cache) => &mut **cache,
        };
        plan::plan(self.replica, cache, scheduler, live, now_millis)
    }

    /// One admission round of `node`, run by that machine's agent only: releases what it must,
    /// decides the claims made on it, and records the outcome in its ledger.
    pub fn admit(
        &mut self,
        node: &Name,
        live: &BTreeSet<Name>,
        now_millis: u64,
    ) -> Result<Admitted, SchedError> {
        let cache = match &mut self.cache {
            Cache::Own(cache) => &mut **cache,
            Cache::Borrowed(cache) => &mut **cache,
        };
        admission_round::admit(self.replica, cache, node, live, now_millis)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crdt::{Key, NodeId};
    use crate::sched::{
        Constraints, RejectReason, ReleaseCause, Resources, Strategy, TaskGroup, backoff_millis,
    };

    fn member(name: &str) -> Name {
        Name::new(name).expect("valid")
    }

    fn name(text: &str) -> Name {
        Name::new(text).expect("valid")
    }

    fn task(text: &str) -> TaskId {
        TaskId::parse(text).expect("valid")
    }

    /// Replicas named by member: nodes n1, n2, … and schedulers s1, s2, …
    struct World {
        names: Vec<Name>,
        replicas: Vec<Replica>,
    }

    impl World {
        fn new(names: &[&str]) -> World {
            World {
                names: names.iter().map(|n| member(n)).collect(),
                replicas: (1..=names.len() as u64)
                    .map(|i| Replica::new(NodeId(i)))
                    .collect(),
            }
        }

        fn at(&mut self, who: &str) -> Cluster<'_> {
            let index = self
                .names
                .iter()
                .position(|n| n.as_str() == who)
                .expect("known");
            Cluster::new(&mut self.replicas[index])
        }

        /// Full anti-entropy among the replicas named `among`.
        fn sync(&mut self, among: &[&str]) {
            for _ in 0..2 {
                for &from in among {
                    for &to in among {
                        let (i, j) = (self.index(from), self.index(to));
                        if i != j {
                            let delta = self.replicas[i].delta_since(self.replicas[j].version());
                            self.replicas[j].apply(delta).expect("applies");
                        }
                    }
                }
            }
        }

        fn sync_all(&mut self) {
            let names: Vec<String> = self.names.iter().map(|n| n.to_string()).collect();
            let names: Vec<&str> = names.iter().map(String::as_str).collect();
            self.sync(&names);
        }

        fn index(&self, who: &str) -> usize {
            self.names
                .iter()
                .position(|n| n.as_str() == who)
                .expect("known")
        }
    }

    fn live(names: &[&str]) -> BTreeSet<Name> {
        names.iter().map(|n| member(n)).collect()
    }

    fn setup(world: &mut World, nodes: &[(&str, u64)], job: &JobSpec) {
        for (i, &(node, cpu)) in nodes.iter().enumerate() {
            let record = NodeRecord::new(member(node), Resources::new(cpu, 1 << 30));
            world
                .at(node)
                .register_node(&record, 1_000 + i as u64)
                .expect("writes");
        }
        world.at(nodes[0].0).submit_job(job, 1_100).expect("writes");
        world.sync_all();
    }

    fn job(count: u32, cpu: u64) -> JobSpec {
        JobSpec::new(name("web")).group(TaskGroup::new(name("api"), count, Resources::new(cpu, 0)))
    }

    #[test]
    fn a_task_admitted_on_two_machines_is_kept_by_the_earlier_admission() {
        let mut world = World::new(&["n1", "n2", "s1", "s2"]);
        setup(&mut world, &[("n1", 1_000), ("n2", 1_000)], &job(1, 100));
        let everyone = live(&["n1", "n2", "s1", "s2"]);
        // A partition: {n1, s1} | {n2, s2}. Each side thinks the other is dead.
        let left = live(&["n1", "s1"]);
        let right = live(&["n2", "s2"]);
        let plan = world
            .at("s1")
            .plan(&member("s1"), &left, 2_000)
            .expect("plans");
        assert_eq!(plan.claims.len(), 1);
        let plan = world
            .at("s2")
            .plan(&member("s2"), &right, 2_000)
            .expect("plans");
        assert_eq!(plan.claims.len(), 1);
        world.sync(&["n1", "s1"]);
        world.sync(&["n2", "s2"]);
        let admitted = world
            .at("n2")
            .admit(&member("n2"), &right, 2_100)
            .expect("admits");
        assert_eq!(admitted.decision.admitted.len(), 1);
        let admitted = world
            .at("n1")
            .admit(&member("n1"), &left, 2_200)
            .expect("admits");
        assert_eq!(admitted.decision.admitted.len(), 1);

        // The partition heals: every replica picks n2's earlier admission.
        world.sync_all();
        let web = task("web/api/0");
        for who in ["n1", "n2", "s1", "s2"] {
            let allocations = world.at(who).allocations(&everyone).expect("reads");
            assert_eq!(allocations[&web].node, member("n2"), "at {who}");
        }
        assert!(
            world
                .at("n1")
                .node_allocations(&member("n1"), &everyone)
                .expect("reads")
                .is_empty()
        );
        let admitted = world
            .at("n1")
            .admit(&member("n1"), &everyone, 3_000)
            .expect("admits");
        assert_eq!(admitted.released.len(), 1);
        let winner = world.at("n2").allocations(&everyone).expect("reads")[&web].id();
        assert_eq!(
            admitted.released[0].cause,
            ReleaseCause::LostTieBreak(winner)
        );
        world.sync_all();
        let view = world.at("s1").view().expect("reads");
        assert!(view.ledgers[&member("n1")].admitted.is_empty());
        assert_eq!(view.ledgers[&member("n2")].admitted.len(), 1);
    }

    #[test]
    fn a_task_whose_machine_died_is_placed_again() {
        let mut world = World::new(&["n1", "n2", "s1"]);
        setup(&mut world, &[("n1", 1_000), ("n2", 500)], &job(1, 100));
        let everyone = live(&["n1", "n2", "s1"]);
        world
            .at("s1")
            .plan(&member("s1"), &everyone, 2_000)
            .expect("plans");
        world.sync_all();
        world
            .at("n1")
            .admit(&member("n1"), &everyone, 2_100)
            .expect("admits");
        world
            .at("n2")
            .admit(&member("n2"), &everyone, 2_100)
            .expect("admits");
        world.sync_all();
        let web = task("web/api/0");
        let first = world.at("s1").allocations(&everyone).expect("reads")[&web]
            .node
            .clone();
        assert!(
            world
                .at("s1")
                .pending_tasks(&everyone)
                .expect("reads")
                .is_empty()
        );

        let survivor = if first.as_str() == "n1" { "n2" } else { "n1" };
        let after = live(&[survivor, "s1"]);
        let pending = world.at("s1").pending_tasks(&after).expect("reads");
        assert_eq!(pending.iter().map(|t| &t.id).collect::<Vec<_>>(), [&web]);
        let plan = world
            .at("s1")
            .plan(&member("s1"), &after, 3_000)
            .expect("plans");
        assert_eq!(plan.claims[0].node, member(survivor));
        world.sync(&[survivor, "s1"]);
        world
            .at(survivor)
            .admit(&member(survivor), &after, 3_100)
            .expect("admits");
        world.sync(&[survivor, "s1"]);
        let allocations = world.at("s1").allocations(&after).expect("reads");
        assert_eq!(allocations[&web].node, member(survivor));
    }

    #[test]
    fn a_rejected_task_backs_off_then_tries_another_machine() {
        let mut world = World::new(&["n1", "n2", "s1"]);
        setup(&mut world, &[("n1", 1_000), ("n2", 1_000)], &job(1, 600));
        let everyone = live(&["n1", "n2", "s1"]);
        // The scheduler has not seen n1's other tenant yet: n1 looks free but is not.
        let plan = world
            .at("s1")
            .plan(&member("s1"), &everyone, 2_000)
            .expect("plans");
        let target = plan.claims[0].node.clone();
        let other = if target.as_str() == "n1" { "n2" } else { "n1" };
        let blocker = JobSpec::new(name("blocker")).group(TaskGroup::new(
            name("g"),
            1,
            Resources::new(900, 0),
        ));
        let mut blocker_claim = plan.claims[0].clone();
        blocker_claim.task = task("blocker/g/0");
        blocker_claim.resources = Resources::new(900, 0);
        blocker_claim.priority = 1;
        world
            .at(target.as_str())
            .submit_job(&blocker, 2_001)
            .expect("writes");
        let key = keys::claim(&target, &blocker_claim.task);
        let index = world.index(target.as_str());
        world.replicas[index]
            .put(key, keys::encode(&blocker_claim), 2_002)
            .expect("writes");
        world.sync_all();
        let admitted = world
            .at(target.as_str())
            .admit(&target, &everyone, 2_100)
            .expect("admits");
        assert_eq!(admitted.decision.admitted[0].task, task("blocker/g/0"));
        assert_eq!(admitted.decision.rejected[0].reason, RejectReason::OutOfCpu);
        let decided_at = 2_100;
        world.sync_all();

        // Too early: the task waits out its backoff.
        let plan = world
            .at("s1")
            .plan(&member("s1"), &everyone, decided_at + 1)
            .expect("plans");
        assert!(plan.claims.is_empty());
        assert_eq!(plan.waiting, [task("web/api/0")]);
        let plan = world
            .at("s1")
            .plan(&member("s1"), &everyone, decided_at + backoff_millis(1))
            .expect("plans");
        assert_eq!(plan.claims.len(), 1);
        assert_eq!(
            (plan.claims[0].node.as_str(), plan.claims[0].attempt),
            (other, 1)
        );
    }

    #[test]
    fn every_replica_predicts_the_decision_the_machine_takes() {
        let mut world = World::new(&["n1", "s1", "s2"]);
        setup(&mut world, &[("n1", 1_000)], &job(4, 300));
        let everyone = live(&["n1", "s1", "s2"]);
        // Two schedulers that do not know each other each claim every task.
        world
            .at("s1")
            .plan(&member("s1"), &live(&["n1", "s1"]), 2_000)
            .expect("plans");
        world
            .at("s2")
            .plan(&member("s2"), &live(&["n1", "s2"]), 2_000)
            .expect("plans");
        world.sync_all();
        let predicted = world
            .at("s1")
            .predict(&member("n1"), &everyone)
            .expect("reads");
        assert_eq!(
            predicted,
            world
                .at("s2")
                .predict(&member("n1"), &everyone)
                .expect("reads")
        );
        let admitted = world
            .at("n1")
            .admit(&member("n1"), &everyone, 2_100)
            .expect("admits");
        assert_eq!(admitted.decision, predicted);
        assert_eq!(admitted.decision.admitted.len(), 3, "3 × 300 of 1,000 fit");
        world.sync_all();
        let view = world.at("s2").view().expect("reads");
        assert!(view.claims.is_empty(), "decided claims are deleted");
        assert_eq!(view.ledgers[&member("n1")].used().cpu_millis, 900);
    }

    #[test]
    fn machines_release_tasks_of_stopped_jobs_and_when_they_leave() {
        let mut world = World::new(&["n1", "s1"]);
        let mut spec = job(2, 100);
        spec.groups
            .push(TaskGroup::new(name("db"), 1, Resources::new(100, 0)));
        setup(&mut world, &[("n1", 1_000)], &spec);
        let everyone = live(&["n1", "s1"]);
        world
            .at("s1")
            .plan(&member("s1"), &everyone, 2_000)
            .expect("plans");
        world.sync_all();
        world
            .at("n1")
            .admit(&member("n1"), &everyone, 2_100)
            .expect("admits");
        world.sync_all();
        spec.groups.pop();
        spec.groups[0].count = 1;
        world.at("s1").submit_job(&spec, 2_200).expect("writes");
        world.sync_all();
        let admitted = world
            .at("n1")
            .admit(&member("n1"), &everyone, 2_300)
            .expect("admits");
        let released: Vec<String> = admitted
            .released
            .iter()
            .map(|r| r.allocation.task.to_string())
            .collect();
        assert_eq!(released, ["web/api/1", "web/db/0"]);
        assert!(
            admitted
                .released
                .iter()
                .all(|r| r.cause == ReleaseCause::JobGone)
        );

        world
            .at("n1")
            .deregister_node(&member("n1"), 2_400)
            .expect("writes");
        let admitted = world
            .at("n1")
            .admit(&member("n1"), &everyone, 2_500)
            .expect("admits");
        assert_eq!(admitted.released.len(), 1);
        assert_eq!(admitted.released[0].cause, ReleaseCause::NodeGone);
    }

    #[test]
    fn a_shrunken_machine_evicts_the_lowest_priority_first() {
        let mut world = World::new(&["n1", "s1"]);
        setup(&mut world, &[("n1", 1_000)], &job(3, 300));
        let everyone = live(&["n1", "s1"]);
        world
            .at("s1")
            .plan(&member("s1"), &everyone, 2_000)
            .expect("plans");
        world.sync_all();
        world
            .at("n1")
            .admit(&member("n1"), &everyone, 2_100)
            .expect("admits");
        let smaller = NodeRecord::new(member("n1"), Resources::new(700, 1 << 30));
        world
            .at("n1")
            .register_node(&smaller, 2_200)
            .expect("writes");
        let admitted = world
            .at("n1")
            .admit(&member("n1"), &everyone, 2_300)
            .expect("admits");
        assert_eq!(admitted.released.len(), 1);
        assert_eq!(admitted.released[0].cause, ReleaseCause::Evicted);
        let ledger = &world.at("n1").view().expect("reads").ledgers[&member("n1")];
        assert_eq!(
            (ledger.admitted.len(), ledger.capacity.cpu_millis),
            (2, 700)
        );
    }

    #[test]
    fn quota_rights_flow_to_the_machine_that_needs_them() {
        let mut world = World::new(&["n1", "n2", "s1"]);
        let mut spec = job(2, 400);
        spec.namespace = name("team");
        // All of n1's CPU goes to a task outside the quota; the quota's rights start at n1.
        let filler = JobSpec::new(name("filler")).group(TaskGroup::new(
            name("g"),
            1,
            Resources::new(1_000, 0),
        ));
        let quota = QuotaSpec {
            namespace: name("team"),
            cpu_millis: 1_000,
            holders: vec![member("n1")],
        };
        world.at("s1").create_quota(&quota, 900).expect("writes");
        assert!(matches!(
            world.at("s1").create_quota(&quota, 901),
            Err(SchedError::QuotaExists(_))
        ));
        world.at("s1").submit_job(&filler, 950).expect("writes");
        setup(&mut world, &[("n1", 1_000), ("n2", 1_000)], &spec);
        let everyone = live(&["n1", "n2", "s1"]);
        let mut now = 2_000;
        for _ in 0..20 {
            world
                .at("s1")
                .plan(&member("s1"), &everyone, now)
                .expect("plans");
            world.sync_all();
            for node in ["n1", "n2"] {
                world
                    .at(node)
                    .admit(&member(node), &everyone, now + 1)
                    .expect("admits");
            }
            world.sync_all();
            now += 1_000;
        }
        let allocations = world.at("s1").allocations(&everyone).expect("reads");
        assert_eq!(allocations.len(), 3, "{allocations:?}");
        let view = world.at("s1").view().expect("reads");
        let escrow = &view.quotas[&name("team")];
        assert_eq!(escrow.consumed(&member("n2")), 800);
        assert!(escrow.rights(&member("n2")) >= 800);
        assert!(escrow.total_consumed() <= 1_000);
    }

    #[test]
    fn spread_by_label_places_tasks_across_zones() {
        let mut world = World::new(&["n1", "n2", "n3", "s1"]);
        let mut spec = job(4, 100);
        spec.strategy = Strategy::Spread;
        spec.groups[0].constraints = Constraints {
            spread_by: Some("zone".into()),
            ..Constraints::default()
        };
        for (node, zone) in [("n1", "a"), ("n2", "a"), ("n3", "b")] {
            let record =
                NodeRecord::new(member(node), Resources::new(1_000, 1 << 30)).label("zone", zone);
            world
                .at(node)
                .register_node(&record, 1_000)
                .expect("writes");
        }
        world.at("s1").submit_job(&spec, 1_100).expect("writes");
        world.sync_all();
        let everyone = live(&["n1", "n2", "n3", "s1"]);
        let plan = world
            .at("s1")
            .plan(&member("s1"), &everyone, 2_000)
            .expect("plans");
        let on_b = plan
            .claims
            .iter()
            .filter(|c| c.node.as_str() == "n3")
            .count();
        assert_eq!(on_b, 2, "{:?}", plan.claims);
    }

    #[test]
    fn values_that_are_not_scheduling_records_are_ignored() {
        let mut replica = Replica::new(NodeId(1));
        let key = |text: &str| Key::new(text).expect("valid");
        replica
            .put(key("_sched/nodes/n1"), b"not json".to_vec(), 1)
            .expect("writes");
        replica
            .put(key("_sched/nodes/BAD"), b"{}".to_vec(), 1)
            .expect("writes");
        replica
            .counter_add(key("_sched/jobs/web"), 1, 1)
            .expect("writes");
        replica
            .put(
                key("_sched/alloc/n1"),
                br#"{"node":"n2","generation":1,"capacity":{},"admitted":[]}"#.to_vec(),
                1,
            )
            .expect("writes");
        replica
            .put(key("_sched/claims/n1/web"), b"{}".to_vec(), 1)
            .expect("writes");
        let view = Cluster::new(&mut replica).view().expect("reads");
        assert_eq!(view.ignored.len(), 5);
        assert!(view.nodes.is_empty() && view.jobs.is_empty() && view.ledgers.is_empty());
        let plan = Cluster::new(&mut replica)
            .plan(&member("s1"), &live(&["s1"]), 2)
            .expect("plans");
        assert!(plan.claims.is_empty());
    }
}
