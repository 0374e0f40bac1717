//! The scheduler on a running node: the loop that runs a scheduling round whenever scheduling
//! state or membership changes ([`Handle::run_scheduler`]), and the watch that follows this
//! machine's allocations ([`Handle::watch_my_allocations`]).
//!
//! A round itself is the host's ([`super::host`]): it runs [`crate::sched::Cluster`]'s pure
//! rounds over the replica and ships their writes like any other. This file only decides when.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, oneshot};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::runtime::api::{HandleError, Roles, RoundReport, SyncState, WatchError};
use crate::runtime::handle::Handle;
use crate::runtime::host::RoundRequest;
use crate::sched::{Allocation, NodeRecord, SchedError};

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
        self.follow_scheduling(notify.clone()).await?;
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
        match handle.round(request).await {
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
