//! Scheduling on a running node: the scheduling API of [`Handle`], the rounds the node's task
//! runs over its replica, and the loop that runs a round whenever scheduling state or
//! membership changes.
//!
//! The rounds are those of [`crate::sched::Cluster`]; this layer only supplies what the pure
//! model takes as inputs (the live members from SWIM, the wall clock) and ships what it writes
//! through the node like any other write: pushed to peers, journaled to storage.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, oneshot};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::crdt::Token;
use crate::gossip::{MemberName, Node};
use crate::runtime::handle::Command;
use crate::runtime::{Handle, HandleError, WatchError};
use crate::sched::{
    Allocation, Cluster, ClusterView, JobSpec, JobStatus, Name, NodeRecord, NodeStatus, QuotaSpec,
    ReleaseCause, SchedError, ViewCache,
};

/// This machine's allocations as they change, from [`Handle::watch_my_allocations`]: the first
/// [`AllocationWatch::next`] answers the current list, each later one waits until it differs.
///
/// The list changes when this machine admits or releases a task, and when another machine's
/// ledger or liveness changes which of two machines holding the same task wins, so the watch
/// follows every ledger and also looks again every [`ALLOCATION_RECHECK`]. Start a task when it
/// appears and stop it when it disappears; fence external effects with its
/// [`AllocationId`](crate::sched::AllocationId).
pub struct AllocationWatch {
    node: Handle,
    changes: crate::runtime::Watch,
    last: Option<Vec<Allocation>>,
}

/// How often an [`AllocationWatch`] looks again without a ledger change (for liveness).
pub const ALLOCATION_RECHECK: Duration = Duration::from_secs(1);

impl AllocationWatch {
    /// The allocations, the first time; after that, the next list that differs from the last
    /// one answered. `None` once the node has stopped.
    pub async fn next(&mut self) -> Option<Result<Vec<Allocation>, HandleError>> {
        loop {
            if self.last.is_some() {
                tokio::select! {
                    event = self.changes.next() => {
                        if let Err(stop) = self.absorb(event).await {
                            return stop;
                        }
                        // One re-read covers every change already waiting: each read copies
                        // the node's scheduling state.
                        while let Ok(event) =
                            tokio::time::timeout(Duration::ZERO, self.changes.next()).await
                        {
                            if let Err(stop) = self.absorb(event).await {
                                return stop;
                            }
                        }
                    },
                    () = tokio::time::sleep(ALLOCATION_RECHECK) => {}
                }
            }
            let current = match self.node.my_allocations().await {
                Ok(current) => current,
                Err(HandleError::Stopped) => return None,
                Err(err) => return Some(Err(err)),
            };
            if self.last.as_ref() != Some(&current) {
                self.last = Some(current.clone());
                return Some(Ok(current));
            }
        }
    }

    /// Takes in one event of the ledger watch; `Err` is what [`AllocationWatch::next`] must
    /// answer instead of going on (the node stopped, or the watch could not be reopened).
    async fn absorb(
        &mut self,
        event: Option<Result<crate::crdt::Event, WatchError>>,
    ) -> Result<(), Option<Result<Vec<Allocation>, HandleError>>> {
        match event {
            None => Err(None),
            Some(Ok(_)) => Ok(()),
            Some(Err(err)) => {
                // Lagged or compacted: the list is recomputed all the same; only a stopped node
                // ends the watch.
                debug!(%err, "allocation watch fell behind; re-reading");
                match self.node.watch(crate::sched::ALLOC, None).await {
                    Ok(fresh) => {
                        self.changes = fresh;
                        Ok(())
                    }
                    Err(HandleError::Stopped) => Err(None),
                    Err(err) => Err(Some(Err(err))),
                }
            }
        }
    }
}

/// Which rounds a node takes part in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Roles {
    /// Claim machines for the pending tasks this node is responsible for: run the reference
    /// scheduler.
    pub plan: bool,
    /// Decide the claims made on this machine: it offers itself (it must have registered a
    /// [`NodeRecord`]).
    pub admit: bool,
}

/// How far a node has caught up with its peers. A node makes no scheduling write before it has
/// caught up, so that a machine that lost its data never writes a ledger concurrent with the one
/// it wrote before.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum SyncState {
    /// No live peer, and the node was started without seeds: the first member of a new cluster,
    /// with nobody to catch up from.
    Alone,
    /// No live peer yet, but the node was started with seeds: the cluster exists, and this node
    /// waits for it rather than risk writing a ledger concurrent with one it wrote before.
    NoPeer,
    /// Live peers, but none has yet been seen to hold nothing this node lacks.
    Behind,
    /// A live peer reported a version this node covers.
    CaughtUp,
}

/// What one scheduling round did at this node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RoundReport {
    /// `Some` when the round did not run because the node has not caught up yet.
    pub skipped: Option<SyncState>,
    /// Claims this node made as a scheduler.
    pub claims: usize,
    /// Tasks this scheduler is responsible for that still wait (backing off, or fitting
    /// nowhere now).
    pub waiting: usize,
    /// Claims this machine admitted.
    pub admitted: usize,
    /// Claims this machine rejected.
    pub rejected: usize,
    /// Allocations this machine gave up, and why: stop these tasks.
    pub released: Vec<(Allocation, ReleaseCause)>,
    /// Writes the round made.
    pub writes: usize,
}

impl RoundReport {
    /// Whether the round changed anything.
    pub fn is_idle(&self) -> bool {
        self.writes == 0
    }
}

/// The scheduling state as one node sees it now.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct SchedulingView {
    /// Every scheduling record, parsed.
    pub view: ClusterView,
    /// The members SWIM counts alive, this node included.
    pub live: BTreeSet<MemberName>,
    /// This node.
    pub me: MemberName,
    /// Covers everything the view was read from: pass it to another node's
    /// [`Handle::wait_for`] to read there no older state.
    pub token: Token,
}

impl SchedulingView {
    /// Where each task of `job` stands; `None` when there is no such job.
    pub fn job(&self, job: &Name) -> Option<JobStatus> {
        self.view.job_status(job, &self.live)
    }

    /// Every registered machine.
    pub fn nodes(&self) -> Vec<NodeStatus> {
        self.view.node_statuses(&self.live)
    }

    /// Every task a live machine holds, with its winning allocation, in task order.
    pub fn allocations(&self) -> Vec<Allocation> {
        let live_nodes = self.view.live_nodes(&self.live);
        self.view.allocations(&live_nodes).into_values().collect()
    }
}

/// Settings of the loop that runs a node's scheduling rounds ([`Handle::run_scheduler`]).
#[derive(Clone, Debug)]
pub struct SchedulerConfig {
    /// Run the reference scheduler here.
    pub plan: bool,
    /// This machine's offer: registered when the loop starts, after which the loop admits the
    /// claims made on it. `None`: this machine runs no tasks.
    pub offer: Option<NodeRecord>,
    /// A round runs at least this often, even when nothing changed: backoffs expire, machines
    /// are declared dead.
    pub interval: Duration,
    /// How long a round waits after the change that triggered it, so a burst of claims is
    /// decided in one ledger write.
    pub batch_window: Duration,
    /// A node started without seeds that finds no peer for this long is the first member of
    /// a new cluster: it starts scheduling. A node started with seeds never schedules alone.
    pub alone_grace: Duration,
    /// With live peers that have not confirmed this node caught up after this long, schedule
    /// anyway (with a warning). Never applies while no peer is live.
    pub catch_up_limit: Duration,
}

impl SchedulerConfig {
    /// A scheduler (when `plan`) offering `offer` (when given), with the default timings.
    pub fn new(plan: bool, offer: Option<NodeRecord>) -> Self {
        SchedulerConfig {
            plan,
            offer,
            interval: Duration::from_millis(500),
            batch_window: Duration::from_millis(5),
            alone_grace: Duration::from_secs(2),
            catch_up_limit: Duration::from_secs(30),
        }
    }

    fn roles(&self) -> Roles {
        Roles {
            plan: self.plan,
            admit: self.offer.is_some(),
        }
    }
}

/// A running scheduler loop. It ends when the node stops, or on [`Scheduler::stop`].
pub struct Scheduler {
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl Scheduler {
    /// Stops the loop after the round in progress, if any.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
    }
}

impl Handle {
    /// Submits (or replaces) a job: its tasks are placed by the cluster's schedulers.
    pub async fn submit_job(&self, job: &JobSpec) -> Result<Token, HandleError> {
        job.validate()?;
        let job = job.clone();
        let token = self
            .write_any(move |replica, now| Ok(Some(Cluster::new(replica).submit_job(&job, now)?)))
            .await?;
        Ok(token.expect("a job submission always writes"))
    }

    /// Stops a job: its machines release its tasks. `None` when there was no such job.
    pub async fn stop_job(&self, job: &Name) -> Result<Option<Token>, HandleError> {
        let job = job.clone();
        self.write_any(move |replica, now| Ok(Cluster::new(replica).stop_job(&job, now)?))
            .await
    }

    /// Publishes this machine's offer. Refused for another machine's record: each machine is the
    /// single writer of its own. [`Handle::run_scheduler`] does this itself, once caught up.
    pub async fn register_node(&self, record: &NodeRecord) -> Result<Token, HandleError> {
        if record.name != *self.name() {
            return Err(SchedError::NotOwner {
                node: record.name.clone(),
                me: self.name().clone(),
            }
            .into());
        }
        let record = record.clone();
        let token = self
            .write_any(move |replica, now| {
                Ok(Some(Cluster::new(replica).register_node(&record, now)?))
            })
            .await?;
        Ok(token.expect("a registration always writes"))
    }

    /// Creates a namespace's quota (once, before its first job).
    pub async fn create_quota(&self, quota: &QuotaSpec) -> Result<Token, HandleError> {
        let quota = quota.clone();
        let token = self
            .write_any(move |replica, now| {
                Ok(Some(Cluster::new(replica).create_quota(&quota, now)?))
            })
            .await?;
        Ok(token.expect("a quota creation always writes"))
    }

    /// The scheduling state as this node sees it now.
    pub async fn scheduling(&self) -> Result<SchedulingView, HandleError> {
        self.ask(Command::Scheduling).await
    }

    /// The allocations this machine wins: what it should run. Watch the keys under
    /// `_sched/alloc/<this node>` to learn when they change.
    pub async fn my_allocations(&self) -> Result<Vec<Allocation>, HandleError> {
        let state = self.scheduling().await?;
        Ok(state.view.node_allocations(&state.me, &state.live))
    }

    /// Follows this machine's allocations: what it should run, as it changes. See
    /// [`AllocationWatch`].
    pub async fn watch_my_allocations(&self) -> Result<AllocationWatch, HandleError> {
        let changes = self.watch(crate::sched::ALLOC, None).await?;
        Ok(AllocationWatch {
            node: self.clone(),
            changes,
            last: None,
        })
    }

    /// Runs one scheduling round now: a planning round when `roles.plan`, then an admission
    /// round when `roles.admit`. With `gated`, the round is skipped (and says why) until this
    /// node has caught up with a live peer.
    pub async fn schedule_round(
        &self,
        roles: Roles,
        gated: bool,
    ) -> Result<RoundReport, HandleError> {
        let request = RoundRequest {
            roles,
            gated,
            register: None,
        };
        self.ask(|reply| Command::Round(Box::new(request), reply))
            .await
    }

    /// Starts the loop that runs a round whenever scheduling state or membership changes, and
    /// at least every `config.interval`. The first round waits until this node has caught up
    /// with a live peer (or, started without seeds, found none); it registers the offer.
    pub async fn run_scheduler(&self, config: SchedulerConfig) -> Result<Scheduler, HandleError> {
        if let Some(offer) = &config.offer
            && offer.name != *self.name()
        {
            return Err(SchedError::NotOwner {
                node: offer.name.clone(),
                me: self.name().clone(),
            }
            .into());
        }
        let notify = Arc::new(Notify::new());
        let (sender, receiver) = oneshot::channel();
        self.send(Command::Nudge(notify.clone())).await?;
        let task = tokio::spawn(scheduler_loop(self.clone(), config, notify, receiver));
        Ok(Scheduler { stop: sender, task })
    }
}

async fn scheduler_loop(
    handle: Handle,
    config: SchedulerConfig,
    notify: Arc<Notify>,
    mut stop: oneshot::Receiver<()>,
) {
    let roles = config.roles();
    let started = Instant::now();
    let mut caught_up = false;
    let mut registered = false;
    let mut last_warning = started;
    info!(
        plan = roles.plan,
        admit = roles.admit,
        "scheduler loop started; catching up before the first round"
    );
    loop {
        tokio::select! {
            () = notify.notified() => tokio::time::sleep(config.batch_window).await,
            () = tokio::time::sleep(config.interval) => {}
            _ = &mut stop => break,
        }
        let request = RoundRequest {
            roles,
            gated: !caught_up,
            // The offer goes with the first round that runs, once caught up: written earlier, it
            // could be concurrent with the record this machine wrote before a restart.
            register: if registered {
                None
            } else {
                config.offer.clone()
            },
        };
        match handle
            .ask(|reply| Command::Round(Box::new(request), reply))
            .await
        {
            Ok(report) => match report.skipped {
                None => {
                    if !registered {
                        info!("caught up; scheduling");
                        if let Some(offer) = &config.offer {
                            info!(
                                cpu_millis = offer.capacity.cpu_millis,
                                memory_bytes = offer.capacity.memory_bytes,
                                "offering this machine"
                            );
                        }
                        caught_up = true;
                        registered = true;
                    }
                    log_round(&report);
                }
                Some(state) => {
                    let waited = started.elapsed();
                    let proceed = match state {
                        SyncState::Alone => waited >= config.alone_grace,
                        SyncState::Behind => waited >= config.catch_up_limit,
                        _ => false,
                    };
                    if proceed {
                        if state == SyncState::Behind {
                            warn!(limit = ?config.catch_up_limit, "live peers have not confirmed this node caught up; scheduling anyway");
                        } else {
                            info!("no peer and no seeds: the first member of a new cluster");
                        }
                        // Let the next round through the gate; it registers the offer.
                        caught_up = true;
                        notify.notify_one();
                    } else if last_warning.elapsed() >= WAIT_WARNING {
                        last_warning = Instant::now();
                        warn!(?state, ?waited, "scheduling waits to catch up with a peer");
                    } else {
                        debug!(?state, "scheduling waits to catch up with a peer");
                    }
                }
            },
            Err(HandleError::Stopped) => break,
            Err(err) => warn!(error = %err, "scheduling round failed"),
        }
    }
    debug!("scheduler loop stopped");
}

fn log_round(report: &RoundReport) {
    if report.is_idle() {
        return;
    }
    info!(
        claims = report.claims,
        admitted = report.admitted,
        rejected = report.rejected,
        released = report.released.len(),
        waiting = report.waiting,
        "scheduling round"
    );
    for (allocation, cause) in &report.released {
        info!(task = %allocation.task, ?cause, "released");
    }
}

/// How often a node that waits to catch up says so at warning level.
const WAIT_WARNING: Duration = Duration::from_secs(30);

/// What one [`Command::Round`] asks for.
pub(super) struct RoundRequest {
    roles: Roles,
    /// Skip the round unless this node has caught up with a live peer.
    gated: bool,
    /// Publish this record before the round, when it runs.
    register: Option<NodeRecord>,
}

/// One round over the node's replica; the node's task calls this for [`Command::Round`].
/// `seeded`: the node was started with seeds other than itself.
pub(super) fn round(
    node: &mut Node,
    cache: &mut ViewCache,
    request: RoundRequest,
    seeded: bool,
    wall_millis: u64,
    now: std::time::Instant,
) -> Result<RoundReport, HandleError> {
    let mut report = RoundReport::default();
    if request.gated {
        let state = sync_state(node, seeded);
        if state != SyncState::CaughtUp {
            report.skipped = Some(state);
            return Ok(report);
        }
    }
    let roles = request.roles;
    if let Some(record) = request.register {
        node.write(now, |replica| {
            Cluster::new(replica)
                .register_node(&record, wall_millis)
                .map(Some)
        })?;
        report.writes += 1;
    }
    let me = node.me().name.clone();
    let live = live(node);
    if roles.plan {
        let ((plan, writes), _) = node.write_many(now, |replica| {
            let mut plan = Cluster::with_cache(replica, cache).plan(&me, &live, wall_millis)?;
            let deltas = std::mem::take(&mut plan.deltas);
            Ok::<_, SchedError>(((plan, deltas.len()), deltas))
        })?;
        report.claims = plan.claims.len();
        report.waiting = plan.waiting.len();
        report.writes += writes;
    }
    if roles.admit {
        let (admitted, writes) = node
            .write_many(now, |replica| {
                let mut admitted =
                    Cluster::with_cache(replica, cache).admit(&me, &live, wall_millis)?;
                let deltas = std::mem::take(&mut admitted.deltas);
                let writes = deltas.len();
                Ok::<_, SchedError>(((admitted, writes), deltas))
            })?
            .0;
        report.admitted = admitted.decision.admitted.len();
        report.rejected = admitted.decision.rejected.len();
        report.released = admitted
            .released
            .into_iter()
            .map(|release| (release.allocation, release.cause))
            .collect();
        report.writes += writes;
    }
    Ok(report)
}

/// The scheduling state of the node; the node's task calls this for [`Command::Scheduling`].
pub(super) fn view(node: &Node, cache: &mut ViewCache) -> Result<SchedulingView, HandleError> {
    Ok(SchedulingView {
        view: cache.view(node.replica())?.clone(),
        live: live(node),
        me: node.me().name.clone(),
        token: Token::from_version(node.replica().version().clone()),
    })
}

/// The members SWIM counts alive, this node included.
fn live(node: &Node) -> BTreeSet<MemberName> {
    node.members()
        .map(|member| member.name.clone())
        .chain(std::iter::once(node.me().name.clone()))
        .collect()
}

fn sync_state(node: &Node, seeded: bool) -> SyncState {
    let mut peers = node.members().peekable();
    if peers.peek().is_none() {
        return if seeded {
            SyncState::NoPeer
        } else {
            SyncState::Alone
        };
    }
    let version = node.replica().version();
    let reports = node.reports();
    let covered = peers.any(|member| {
        reports
            .get(&member.name)
            .is_some_and(|report| version.dominates(report))
    });
    if covered {
        SyncState::CaughtUp
    } else {
        SyncState::Behind
    }
}
