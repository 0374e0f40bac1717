//! A [`ClusterView`] kept current with a replica: each refresh re-parses only the values written
//! since the last one, and keeps an index of which machines hold each task.
//!
//! A round reads the whole scheduling state, but between two rounds few values change: the claims
//! of one planning round, the ledgers of the machines that admitted. The cache remembers, for
//! every key, the dot of the write whose value it parsed ([`Replica::registers`]); one write gives
//! a key one value, so an unchanged dot means an unchanged value, on any replica.

use std::collections::{BTreeMap, BTreeSet};

use serde::de::DeserializeOwned;

use crate::crdt::{Dot, Key, RegisterRef, Replica};
use crate::sched::{
    AllocationId, Claim, ClusterView, Escrow, JobSpec, Ledger, Name, NodeRecord, QuotaSpec,
    Rejection, Resources, SchedError, SchedulerRecord, Share, TaskId, keys,
};

/// A [`ClusterView`] kept current with a replica, for rounds that run again and again.
///
/// [`ViewCache::view`] brings it up to date and re-parses only the keys whose value changed since
/// the previous call, so a node that keeps one across its rounds pays for what changed, not for
/// the whole state. A cache may follow any replica: values are recognised by the write that made
/// them, which is the same everywhere.
///
/// ```
/// use mantissa::crdt::{NodeId, Replica};
/// use mantissa::sched::{Cluster, Name, NodeRecord, Resources, ViewCache};
/// let mut replica = Replica::new(NodeId(1));
/// let mut cache = ViewCache::default();
/// assert!(cache.view(&replica)?.nodes.is_empty());
/// let node = Name::new("node-a")?;
/// let offer = NodeRecord::new(node.clone(), Resources::new(1_000, 1 << 30));
/// Cluster::new(&mut replica).register_node(&offer, 1)?;
/// assert_eq!(cache.view(&replica)?.nodes[&node], offer);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone, Debug, Default)]
pub struct ViewCache {
    view: ClusterView,
    /// The write each key's parsed value came from; `None` for a key that holds no register.
    seen: BTreeMap<Key, Option<Dot>>,
    /// The keys in `view.ignored`, kept as a set while refreshing.
    ignored: BTreeSet<Key>,
    holdings: Holdings,
    /// What each parsed ledger holds, summed: what placement counts, kept with the ledger.
    loads: BTreeMap<Name, LedgerLoad>,
}

/// What one ledger's allocations hold, summed, for placement.
#[derive(Clone, Debug, Default)]
pub(crate) struct LedgerLoad {
    /// The resources they reserve.
    pub(crate) used: Resources,
    /// How many tasks of each job and group they hold.
    pub(crate) groups: Vec<(Name, Name, u32)>,
}

impl LedgerLoad {
    fn of(ledger: &Ledger) -> LedgerLoad {
        let mut groups: Vec<(Name, Name, u32)> = Vec::new();
        // Allocations are sorted by task, so a group's are consecutive.
        for allocation in &ledger.admitted {
            let task = &allocation.task;
            match groups.last_mut() {
                Some((job, group, count)) if *job == task.job && *group == task.group => {
                    *count += 1;
                }
                _ => groups.push((task.job.clone(), task.group.clone(), 1)),
            }
        }
        LedgerLoad {
            used: ledger.used(),
            groups,
        }
    }
}

/// What a key holds now, compared with what the cache saw.
enum Now<'a> {
    Gone,
    Register(RegisterRef<'a>),
    /// A value of another type: never a scheduling record.
    Other,
}

/// A collection of the view that holds records by name, for [`ViewCache::refresh_named`].
trait ByName<T> {
    fn forget(&mut self, name: &Name);
    fn keep(&mut self, name: Name, record: T);
}

impl<T> ByName<T> for BTreeMap<Name, T> {
    fn forget(&mut self, name: &Name) {
        self.remove(name);
    }

    fn keep(&mut self, name: Name, record: T) {
        self.insert(name, record);
    }
}

/// Schedulers are known by name only: the record says nothing beyond it.
impl ByName<SchedulerRecord> for BTreeSet<Name> {
    fn forget(&mut self, name: &Name) {
        self.remove(name);
    }

    fn keep(&mut self, name: Name, _: SchedulerRecord) {
        self.insert(name);
    }
}

impl ViewCache {
    /// Brings the view up to date with `replica` and returns it.
    pub fn view(&mut self, replica: &Replica) -> Result<&ClusterView, SchedError> {
        self.refresh(replica)?;
        Ok(&self.view)
    }

    /// Brings the whole view up to date.
    pub(crate) fn refresh(&mut self, replica: &Replica) -> Result<(), SchedError> {
        self.refresh_common(replica);
        self.refresh_schedulers(replica);
        self.refresh_claims(replica, keys::CLAIMS);
        self.finish();
        Ok(())
    }

    /// Brings up to date what an admission round of `node` reads: node records, jobs, ledgers,
    /// quotas and the claims on `node`. Claims on other machines may stay behind until the next
    /// [`ViewCache::refresh`].
    pub(crate) fn refresh_for(&mut self, replica: &Replica, node: &Name) -> Result<(), SchedError> {
        self.refresh_common(replica);
        let prefix = format!("{}{}/", keys::CLAIMS, node.as_str());
        self.refresh_claims(replica, &prefix);
        self.finish();
        Ok(())
    }

    /// The view, as of the last refresh.
    pub(crate) fn current(&self) -> &ClusterView {
        &self.view
    }

    /// Which machines hold each task, as of the last refresh.
    pub(crate) fn holdings(&self) -> &Holdings {
        &self.holdings
    }

    /// What `node`'s ledger holds, as of the last refresh.
    pub(crate) fn load(&self, node: &Name) -> Option<&LedgerLoad> {
        self.loads.get(node)
    }

    /// Gives up the view.
    pub(crate) fn into_view(self) -> ClusterView {
        self.view
    }

    fn refresh_common(&mut self, replica: &Replica) {
        self.refresh_nodes(replica);
        self.refresh_jobs(replica);
        self.refresh_ledgers(replica);
        self.refresh_quotas(replica);
    }

    /// The keys under `prefix` whose value changed since the cache last looked, with what they
    /// hold now; the cache now remembers them as seen.
    fn changes<'r>(&mut self, replica: &'r Replica, prefix: &'r str) -> Vec<(Key, Now<'r>)> {
        let mut changed = Vec::new();
        let mut seen = self
            .seen
            .range::<[u8], _>((
                std::ops::Bound::Included(prefix.as_bytes()),
                std::ops::Bound::Unbounded,
            ))
            .take_while(|(key, _)| key.as_bytes().starts_with(prefix.as_bytes()))
            .peekable();
        for (key, now) in replica.registers(prefix.as_bytes()) {
            while let Some((old, _)) = seen.next_if(|(old, _)| *old < key) {
                changed.push((old.clone(), Now::Gone));
            }
            let dot = now.map(|register| register.dot);
            let same = seen.next_if(|(old, _)| *old == key).map(|(_, was)| *was);
            if same != Some(dot) {
                let now = now.map_or(Now::Other, Now::Register);
                changed.push((key.clone(), now));
            }
        }
        changed.extend(seen.map(|(old, _)| (old.clone(), Now::Gone)));
        for (key, now) in &changed {
            match now {
                Now::Gone => self.seen.remove(key),
                Now::Register(register) => self.seen.insert(key.clone(), Some(register.dot)),
                Now::Other => self.seen.insert(key.clone(), None),
            };
            self.ignored.remove(key);
        }
        changed
    }

    fn refresh_nodes(&mut self, replica: &Replica) {
        self.refresh_named(
            replica,
            keys::NODES,
            |view| &mut view.nodes,
            |name, record: &NodeRecord| record.name == *name,
        );
    }

    fn refresh_schedulers(&mut self, replica: &Replica) {
        self.refresh_named(
            replica,
            keys::SCHEDULERS,
            |view| &mut view.schedulers,
            |name, record: &SchedulerRecord| record.name == *name,
        );
    }

    fn refresh_jobs(&mut self, replica: &Replica) {
        self.refresh_named(
            replica,
            keys::JOBS,
            |view| &mut view.jobs,
            |name, job: &JobSpec| job.name == *name && job.validate().is_ok(),
        );
    }

    /// Re-reads the changed records under `prefix`, each named by its key's suffix: a record
    /// leaves the view's collection, and comes back if its register decodes to a `T` that is
    /// `valid` under that name. Anything else is remembered as ignored until it changes.
    fn refresh_named<T: DeserializeOwned, C: ByName<T>>(
        &mut self,
        replica: &Replica,
        prefix: &str,
        collection: fn(&mut ClusterView) -> &mut C,
        valid: impl Fn(&Name, &T) -> bool,
    ) {
        for (key, now) in self.changes(replica, prefix) {
            let name = keys::suffix(&key, prefix).and_then(|s| Name::new(s).ok());
            if let Some(name) = &name {
                collection(&mut self.view).forget(name);
            }
            let parsed = match (&now, name) {
                (Now::Register(register), Some(name)) => keys::decode::<T>(register.value)
                    .filter(|record| valid(&name, record))
                    .map(|record| collection(&mut self.view).keep(name, record)),
                _ => None,
            };
            self.ignore_unless(key, &now, parsed.is_some());
        }
    }

    fn refresh_ledgers(&mut self, replica: &Replica) {
        for (key, now) in self.changes(replica, keys::ALLOC) {
            let name = keys::suffix(&key, keys::ALLOC).and_then(|s| Name::new(s).ok());
            let old = name
                .as_ref()
                .and_then(|name| self.view.ledgers.remove(name));
            let new = match (&now, name) {
                (Now::Register(register), Some(name)) => keys::decode::<Ledger>(register.value)
                    .filter(|ledger| ledger.is_well_formed(&name))
                    .map(|ledger| (name, ledger)),
                _ => None,
            };
            self.holdings
                .replace(old.as_ref(), new.as_ref().map(|(_, ledger)| ledger));
            if old.is_some()
                && let Some(name) = keys::suffix(&key, keys::ALLOC).and_then(|s| Name::new(s).ok())
            {
                self.loads.remove(&name);
            }
            let parsed = new.is_some();
            if let Some((name, ledger)) = new {
                self.loads.insert(name.clone(), LedgerLoad::of(&ledger));
                self.view.ledgers.insert(name, ledger);
            }
            self.ignore_unless(key, &now, parsed);
        }
    }

    /// Claims are kept per machine in key order, so a change to any claim on a machine re-reads
    /// that machine's claims.
    fn refresh_claims(&mut self, replica: &Replica, prefix: &str) {
        let mut dirty = BTreeSet::new();
        for (key, now) in self.changes(replica, prefix) {
            let node = keys::suffix(&key, keys::CLAIMS)
                .and_then(|s| s.split_once('/'))
                .and_then(|(node, _)| Name::new(node).ok());
            match node {
                Some(node) => {
                    dirty.insert(node);
                }
                None => self.ignore_unless(key, &now, false),
            }
        }
        for node in dirty {
            let prefix = format!("{}{}/", keys::CLAIMS, node.as_str());
            let mut claims = Vec::new();
            for (key, now) in replica.registers(prefix.as_bytes()) {
                let task = keys::suffix(key, &prefix).and_then(|s| TaskId::parse(s).ok());
                let claim = now
                    .zip(task)
                    .and_then(|(register, task)| {
                        keys::decode::<Claim>(register.value).filter(|c| c.task == task)
                    })
                    .filter(|claim| claim.node == node);
                match claim {
                    Some(claim) => claims.push(claim),
                    None => {
                        self.ignored.insert(key.clone());
                    }
                }
            }
            if claims.is_empty() {
                self.view.claims.remove(&node);
            } else {
                self.view.claims.insert(node, claims);
            }
        }
    }

    /// Quotas and their shares are few: any change re-reads them all.
    fn refresh_quotas(&mut self, replica: &Replica) {
        let specs_changed = !self.changes(replica, keys::QUOTAS).is_empty();
        let shares_changed = !self.changes(replica, keys::QUOTA_SHARES).is_empty();
        if !specs_changed && !shares_changed {
            return;
        }
        for prefix in [keys::QUOTAS, keys::QUOTA_SHARES] {
            self.ignored
                .retain(|key| !key.as_bytes().starts_with(prefix.as_bytes()));
        }
        let mut specs = BTreeMap::new();
        for (key, now) in replica.registers(keys::QUOTAS.as_bytes()) {
            let name = keys::suffix(key, keys::QUOTAS).and_then(|s| Name::new(s).ok());
            let spec = now.and_then(|register| keys::decode::<QuotaSpec>(register.value));
            match (name, spec) {
                (Some(name), Some(spec)) if spec.namespace == name => {
                    specs.insert(name, spec);
                }
                _ => {
                    self.ignored.insert(key.clone());
                }
            }
        }
        let mut shares: BTreeMap<Name, BTreeMap<Name, Share>> = BTreeMap::new();
        for (key, now) in replica.registers(keys::QUOTA_SHARES.as_bytes()) {
            let place = keys::suffix(key, keys::QUOTA_SHARES).and_then(|s| s.split_once('/'));
            let namespace = place.and_then(|(namespace, _)| Name::new(namespace).ok());
            let member = place.and_then(|(_, member)| Name::new(member).ok());
            let share = now.and_then(|register| keys::decode::<Share>(register.value));
            match (namespace, member, share) {
                (Some(namespace), Some(member), Some(share)) => {
                    shares.entry(namespace).or_default().insert(member, share);
                }
                _ => {
                    self.ignored.insert(key.clone());
                }
            }
        }
        self.view.quotas.clear();
        for (namespace, spec) in specs {
            let shares = shares.remove(&namespace).unwrap_or_default();
            self.view
                .quotas
                .insert(namespace, Escrow::new(spec, shares));
        }
    }

    /// Lists `key` as ignored when it holds something that is not a scheduling record.
    fn ignore_unless(&mut self, key: Key, now: &Now<'_>, parsed: bool) {
        if !parsed && !matches!(now, Now::Gone) {
            self.ignored.insert(key);
        }
    }

    /// Lists the ignored keys in the view, prefix by prefix.
    fn finish(&mut self) {
        const ORDER: [&str; 7] = [
            keys::NODES,
            keys::SCHEDULERS,
            keys::JOBS,
            keys::ALLOC,
            keys::CLAIMS,
            keys::QUOTAS,
            keys::QUOTA_SHARES,
        ];
        if self.ignored.len() == self.view.ignored.len()
            && self
                .view
                .ignored
                .iter()
                .all(|key| self.ignored.contains(key))
        {
            return;
        }
        self.view.ignored = ORDER
            .iter()
            .flat_map(|prefix| {
                self.ignored
                    .iter()
                    .filter(move |key| key.as_bytes().starts_with(prefix.as_bytes()))
                    .cloned()
            })
            .collect();
    }
}

/// Which machines' ledgers hold each task: what the tie-break between two admissions of a task
/// reads, indexed so that a machine asks about its own tasks only.
#[derive(Clone, Debug, Default)]
pub(crate) struct Holdings {
    by_task: BTreeMap<TaskId, Vec<AllocationId>>,
    /// The rejections of each task that ledgers remember, with the machine that rejected it.
    rejections: BTreeMap<TaskId, Vec<(Name, Rejection)>>,
}

impl Holdings {
    /// The index of `ledgers`.
    pub(crate) fn of<'a>(ledgers: impl IntoIterator<Item = &'a Ledger>) -> Holdings {
        let mut holdings = Holdings::default();
        for ledger in ledgers {
            holdings.replace(None, Some(ledger));
        }
        holdings
    }

    /// The tasks of `job`'s `group` that some ledger holds, with the allocations holding each,
    /// by index.
    pub(crate) fn of_group<'a>(
        &'a self,
        job: &'a Name,
        group: &'a Name,
    ) -> impl Iterator<Item = (u32, &'a [AllocationId])> + 'a {
        let first = TaskId::new(job.clone(), group.clone(), 0);
        self.by_task
            .range(first..)
            .take_while(move |(task, _)| task.job == *job && task.group == *group)
            .map(|(task, ids)| (task.index, &ids[..]))
    }

    /// The winning allocation of `task` among the machines `is_live` counts: the smallest id.
    pub(crate) fn winner(
        &self,
        task: &TaskId,
        is_live: impl Fn(&Name) -> bool,
    ) -> Option<&AllocationId> {
        self.by_task
            .get(task)?
            .iter()
            .filter(|id| is_live(&id.node))
            .min()
    }

    /// The rejections of `task` that ledgers remember, with the machine that rejected it.
    pub(crate) fn rejections(&self, task: &TaskId) -> &[(Name, Rejection)] {
        self.rejections.get(task).map_or(&[], Vec::as_slice)
    }

    /// Replaces what `old` recorded with what `new` records (either may be absent).
    fn replace(&mut self, old: Option<&Ledger>, new: Option<&Ledger>) {
        self.replace_rejections(old, new);
        let old = old.map_or(&[][..], |ledger| &ledger.admitted[..]);
        let new = new.map_or(&[][..], |ledger| &ledger.admitted[..]);
        let (mut i, mut j) = (0, 0);
        while i < old.len() || j < new.len() {
            let order = match (old.get(i), new.get(j)) {
                (Some(a), Some(b)) => a.task.cmp(&b.task),
                (Some(_), None) => std::cmp::Ordering::Less,
                _ => std::cmp::Ordering::Greater,
            };
            match order {
                std::cmp::Ordering::Less => {
                    self.remove(&old[i].task, &old[i].id());
                    i += 1;
                }
                std::cmp::Ordering::Greater => {
                    self.add(new[j].task.clone(), new[j].id());
                    j += 1;
                }
                std::cmp::Ordering::Equal => {
                    let (was, is) = (old[i].id(), new[j].id());
                    if was != is {
                        self.remove(&old[i].task, &was);
                        self.add(new[j].task.clone(), is);
                    }
                    i += 1;
                    j += 1;
                }
            }
        }
    }

    /// Both ledgers' rejections are sorted by task, one per task, so only the entries that
    /// differ are touched.
    fn replace_rejections(&mut self, old: Option<&Ledger>, new: Option<&Ledger>) {
        let node = match (old, new) {
            (_, Some(ledger)) | (Some(ledger), None) => &ledger.node,
            (None, None) => return,
        };
        let old = old.map_or(&[][..], |ledger| &ledger.rejected[..]);
        let new = new.map_or(&[][..], |ledger| &ledger.rejected[..]);
        let (mut i, mut j) = (0, 0);
        while i < old.len() || j < new.len() {
            let order = match (old.get(i), new.get(j)) {
                (Some(a), Some(b)) => a.task.cmp(&b.task),
                (Some(_), None) => std::cmp::Ordering::Less,
                _ => std::cmp::Ordering::Greater,
            };
            let (gone, added) = match order {
                std::cmp::Ordering::Less => (Some(&old[i]), None),
                std::cmp::Ordering::Greater => (None, Some(&new[j])),
                std::cmp::Ordering::Equal if old[i] == new[j] => (None, None),
                std::cmp::Ordering::Equal => (Some(&old[i]), Some(&new[j])),
            };
            if let Some(gone) = gone
                && let Some(of_task) = self.rejections.get_mut(&gone.task)
            {
                of_task.retain(|(by, _)| by != node);
                if of_task.is_empty() {
                    self.rejections.remove(&gone.task);
                }
            }
            if let Some(added) = added {
                let of_task = self.rejections.entry(added.task.clone()).or_default();
                of_task.push((node.clone(), added.clone()));
            }
            i += usize::from(order.is_le());
            j += usize::from(order.is_ge());
        }
    }

    fn add(&mut self, task: TaskId, id: AllocationId) {
        self.by_task.entry(task).or_default().push(id);
    }

    fn remove(&mut self, task: &TaskId, id: &AllocationId) {
        if let Some(ids) = self.by_task.get_mut(task) {
            if let Some(at) = ids.iter().position(|held| held == id) {
                ids.swap_remove(at);
            }
            if ids.is_empty() {
                self.by_task.remove(task);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crdt::NodeId;
    use crate::sched::{Cluster, Resources, TaskGroup};

    fn member(name: &str) -> Name {
        Name::new(name).expect("valid")
    }

    /// A cache refreshed after every step reads what a fresh read does.
    #[test]
    fn a_refreshed_cache_equals_a_fresh_read() {
        let mut replica = Replica::new(NodeId(1));
        let mut cache = ViewCache::default();
        let live = BTreeSet::from([member("n1"), member("n2"), member("s1")]);
        let check = |cache: &mut ViewCache, replica: &Replica| {
            let fresh = ClusterView::read(replica).expect("reads");
            assert_eq!(*cache.view(replica).expect("reads"), fresh);
            let index = Holdings::of(fresh.ledgers.values());
            let sorted = |holdings: &Holdings| {
                let mut by_task = holdings.by_task.clone();
                by_task.values_mut().for_each(|ids| ids.sort());
                by_task
            };
            assert_eq!(sorted(&cache.holdings), sorted(&index));
            let rejections = |holdings: &Holdings| {
                let mut all = holdings.rejections.clone();
                all.values_mut()
                    .for_each(|of_task| of_task.sort_by(|a, b| a.0.cmp(&b.0)));
                all
            };
            assert_eq!(rejections(&cache.holdings), rejections(&index));
            let live_nodes = fresh.live_nodes(&live);
            assert_eq!(
                crate::sched::plan::pending_tasks(&fresh, &cache.holdings, &live_nodes),
                fresh.pending_tasks(&live)
            );
        };
        check(&mut cache, &replica);
        for (i, node) in ["n1", "n2"].iter().enumerate() {
            let offer = NodeRecord::new(member(node), Resources::new(1_000, 1 << 30));
            Cluster::new(&mut replica)
                .register_node(&offer, 1 + i as u64)
                .expect("writes");
        }
        let key = |text: &str| Key::new(text).expect("valid");
        replica
            .put(key("_sched/claims/n1/web"), b"{}".to_vec(), 3)
            .expect("writes");
        replica
            .counter_add(key("_sched/jobs/odd"), 1, 3)
            .expect("writes");
        check(&mut cache, &replica);
        let job = JobSpec::new(Name::new("web").expect("valid")).group(TaskGroup::new(
            Name::new("api").expect("valid"),
            5,
            Resources::new(300, 0),
        ));
        Cluster::new(&mut replica)
            .submit_job(&job, 4)
            .expect("writes");
        check(&mut cache, &replica);
        let mut now = 10;
        for _ in 0..3 {
            Cluster::with_cache(&mut replica, &mut cache)
                .plan(&member("s1"), &live, now)
                .expect("plans");
            check(&mut cache, &replica);
            for node in ["n1", "n2"] {
                Cluster::with_cache(&mut replica, &mut cache)
                    .admit(&member(node), &live, now + 1)
                    .expect("admits");
            }
            check(&mut cache, &replica);
            now += 1_000;
        }
        assert_eq!(cache.view(&replica).expect("reads").ledgers.len(), 2);
        Cluster::new(&mut replica)
            .stop_job(&job.name, now)
            .expect("writes");
        replica
            .delete(key("_sched/claims/n1/web"), now)
            .expect("writes");
        check(&mut cache, &replica);
    }
}
