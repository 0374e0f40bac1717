//! The embedded node: [`start`] launches a node's task, and the cloneable [`Handle`] an
//! orchestrator uses to read, write and watch the cluster state talks to it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, mpsc, oneshot};
use tokio::time::Instant;
use tracing::info;

use crate::crdt::{Key, NodeId, Replica, Token, Value, Write};
use crate::gossip::{Member, MemberName, Node};
use crate::runtime::api::{
    HandleError, NodeConfig, Roles, RoundReport, SchedulingView, StartError, StateDigest, Status,
    WallClock, Watch,
};
use crate::runtime::driver::{Driver, Reply, Request};
use crate::runtime::host::{Command, Host, RoundRequest, SchedWrite};
use crate::runtime::storage::{Storage, Store};
use crate::runtime::{Inbox, StorageError, Transport};
use crate::sched::{Allocation, JobSpec, Name, NodeRecord, QuotaSpec};

/// A running node. Cheap to clone; every clone talks to the same node. The node stops when
/// [`Handle::shutdown`] is called (or when every handle is dropped).
#[derive(Clone)]
pub struct Handle {
    requests: mpsc::Sender<Request>,
    name: MemberName,
    addr: SocketAddr,
}

impl std::fmt::Debug for Handle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handle")
            .field("name", &self.name)
            .field("addr", &self.addr)
            .finish()
    }
}

/// Starts a node with an empty replica under a new incarnation id: binds its endpoint, joins
/// through the seeds, and returns its handle. Needs a tokio runtime.
///
/// With [`NodeConfig::storage`], the replica is first recovered from the data directory (and
/// continued under a new incarnation id), and every write is acknowledged only once durable.
pub async fn start(config: NodeConfig) -> Result<Handle, StartError> {
    let node = new_incarnation(&config.wall_clock);
    let (replica, storage) = match &config.storage {
        Some(storage) => {
            let storage = storage.clone();
            let replica_config = config.replica.clone();
            let (storage, replica) =
                tokio::task::spawn_blocking(move || Storage::open(&storage, replica_config, node))
                    .await
                    .map_err(|err| {
                        StorageError::Stopped(format!("opening storage panicked: {err}"))
                    })??;
            (replica, Some(Box::new(storage) as Box<dyn Store>))
        }
        None => (Replica::with_config(node, config.replica.clone()), None),
    };
    let (transport, inbox) =
        Transport::bind(config.bind, config.tls.clone(), config.transport.clone()).await?;
    launch(config, transport, inbox, replica, storage)
}

/// Like [`start`], from an existing replica (for instance one restored from a snapshot), in
/// memory only: fails when `config.storage` is set.
pub async fn start_with(config: NodeConfig, replica: Replica) -> Result<Handle, StartError> {
    refuse_storage(&config)?;
    let (transport, inbox) =
        Transport::bind(config.bind, config.tls.clone(), config.transport.clone()).await?;
    launch(config, transport, inbox, replica, None)
}

/// Like [`start_with`], over a transport the caller bound (for instance over a simulated socket
/// with [`Transport::bind_with_socket`]); `config.bind` and `config.transport` are not used.
#[cfg_attr(not(feature = "testing"), allow(dead_code))]
pub fn start_on(
    config: NodeConfig,
    transport: Transport,
    inbox: Inbox,
    replica: Replica,
) -> Result<Handle, StartError> {
    refuse_storage(&config)?;
    launch(config, transport, inbox, replica, None)
}

fn refuse_storage(config: &NodeConfig) -> Result<(), StartError> {
    match &config.storage {
        Some(storage) => Err(StartError::Storage(StorageError::Io {
            path: storage.dir.clone(),
            reason: "a node given its replica runs in memory; use `start` to load one from a data directory".into(),
        })),
        None => Ok(()),
    }
}

fn launch(
    config: NodeConfig,
    transport: Transport,
    inbox: Inbox,
    replica: Replica,
    storage: Option<Box<dyn Store>>,
) -> Result<Handle, StartError> {
    let name = MemberName::new(transport.node_name())?;
    config.gossip.validate()?;
    let local = transport.local_addr()?;
    let advertise = config.advertise.unwrap_or(local);
    let me = Member::new(name.clone(), replica.node(), advertise);
    let now = Instant::now().into_std();
    let seed = config
        .rng_seed
        .unwrap_or_else(|| (config.wall_clock)() ^ (u64::from(advertise.port()) << 48));
    let mut node = Node::new(me, replica, config.gossip.clone(), seed, now)?;
    node.join(&config.seeds, now);
    info!(%name, %advertise, replica = %node.replica().node(), seeds = config.seeds.len(), "node started");
    let seeded = config
        .seeds
        .iter()
        .any(|seed| *seed != advertise && *seed != local);
    let host = Host::new(node, seeded, storage.is_some());
    let (driver, acks) = Driver::new(
        host,
        transport,
        config.wall_clock.clone(),
        storage,
        config.buffers,
        config.shutdown_timeout,
    );
    let (requests, receiver) = mpsc::channel(1024);
    tokio::spawn(driver.run(receiver, inbox, acks));
    Ok(Handle {
        requests,
        name,
        addr: advertise,
    })
}

impl Handle {
    /// This node's name.
    pub fn name(&self) -> &MemberName {
        &self.name
    }

    /// The address peers reach this node at.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Writes `value` to the register at `key`. Returns a token that covers the write.
    pub async fn put(
        &self,
        key: impl AsRef<[u8]>,
        value: impl Into<Vec<u8>>,
    ) -> Result<Token, HandleError> {
        let key = Key::new(key)?;
        let value = value.into();
        self.write(Write::Put { key, value })
            .await
            .map(expect_token)
    }

    /// Deletes `key`; `None` when it held nothing.
    pub async fn delete(&self, key: impl AsRef<[u8]>) -> Result<Option<Token>, HandleError> {
        let key = Key::new(key)?;
        self.write(Write::Delete { key }).await
    }

    /// Adds `amount` to the counter at `key`.
    pub async fn counter_add(
        &self,
        key: impl AsRef<[u8]>,
        amount: i64,
    ) -> Result<Token, HandleError> {
        let key = Key::new(key)?;
        self.write(Write::CounterAdd { key, amount })
            .await
            .map(expect_token)
    }

    /// Adds elements to the set at `key`.
    pub async fn set_add(
        &self,
        key: impl AsRef<[u8]>,
        elements: Vec<Vec<u8>>,
    ) -> Result<Token, HandleError> {
        let key = Key::new(key)?;
        self.write(Write::SetAdd { key, elements })
            .await
            .map(expect_token)
    }

    /// Removes elements from the set at `key`; `None` when none was present.
    pub async fn set_remove(
        &self,
        key: impl AsRef<[u8]>,
        elements: Vec<Vec<u8>>,
    ) -> Result<Option<Token>, HandleError> {
        let key = Key::new(key)?;
        self.write(Write::SetRemove { key, elements }).await
    }

    /// Applies a JSON merge patch (RFC 7396) to the document at `key`.
    pub async fn document_patch(
        &self,
        key: impl AsRef<[u8]>,
        patch: serde_json::Value,
    ) -> Result<Token, HandleError> {
        let key = Key::new(key)?;
        self.write(Write::DocumentPatch { key, patch })
            .await
            .map(expect_token)
    }

    /// Makes a key-value write; refused under the scheduling prefix. `None` when it changed
    /// nothing.
    pub async fn write(&self, write: Write) -> Result<Option<Token>, HandleError> {
        self.ask(|reply| Request::Write(Command::Write(write), reply))
            .await
    }

    /// The value at `key`, as this node's replica holds it now.
    pub async fn get(&self, key: impl AsRef<[u8]>) -> Result<Option<Value>, HandleError> {
        let key = Key::new(key)?;
        self.ask(|reply| Request::Get(key, reply)).await
    }

    /// Like [`Handle::get`], with a token covering everything this node had applied when it
    /// answered: pass it to another node's [`Handle::wait_for`] to read there no older state.
    pub async fn read_key(
        &self,
        key: impl AsRef<[u8]>,
    ) -> Result<(Option<Value>, Token), HandleError> {
        let key = Key::new(key)?;
        self.ask(|reply| Request::ReadKey(key, reply)).await
    }

    /// Up to `limit` keys under `prefix`, in key order.
    pub async fn list(
        &self,
        prefix: impl AsRef<[u8]>,
        limit: usize,
    ) -> Result<Vec<(Key, Value)>, HandleError> {
        let prefix = prefix.as_ref().to_vec();
        self.ask(|reply| Request::List {
            prefix,
            after: None,
            limit,
            reply,
        })
        .await
    }

    /// Up to `limit` keys under `prefix` that sort after `after` (to page through a large
    /// prefix), in key order, with a token as for [`Handle::read_key`].
    pub async fn list_after(
        &self,
        prefix: impl AsRef<[u8]>,
        after: Option<Key>,
        limit: usize,
    ) -> Result<(Vec<(Key, Value)>, Token), HandleError> {
        let prefix = prefix.as_ref().to_vec();
        self.ask(|reply| Request::ListAfter {
            prefix,
            after,
            limit,
            reply,
        })
        .await
    }

    /// Waits until this node has applied everything `token` covers (e.g. a write made at another
    /// node), so a following read sees it. [`HandleError::Timeout`] after `timeout`.
    pub async fn wait_for(&self, token: &Token, timeout: Duration) -> Result<(), HandleError> {
        let deadline = Instant::now() + timeout;
        let token = token.clone();
        self.ask(|reply| Request::WaitFor(token, deadline, reply))
            .await
            .map_err(|err| match err {
                HandleError::Timeout(_) => HandleError::Timeout(timeout),
                other => other,
            })
    }

    /// Change events for keys starting with `prefix`: those after cursor `from` first (when
    /// given), then every new one as it is applied.
    pub async fn watch(
        &self,
        prefix: impl AsRef<[u8]>,
        from: Option<u64>,
    ) -> Result<Watch, HandleError> {
        let prefix = prefix.as_ref().to_vec();
        self.ask(|reply| Request::Watch(prefix, from, reply)).await
    }

    /// The live members other than this one.
    pub async fn members(&self) -> Result<Vec<Member>, HandleError> {
        Ok(self
            .status()
            .await?
            .peers
            .into_iter()
            .map(|(member, _)| member)
            .collect())
    }

    /// This node's status.
    pub async fn status(&self) -> Result<Status, HandleError> {
        self.ask(Request::Status).await
    }

    /// A hash of this replica's whole state, with the version it covers: members whose digests
    /// are equal hold the same data. Costs a pass over the whole state on the node's task, so it
    /// is for checks (has the cluster converged?), not for every request.
    pub async fn digest(&self) -> Result<StateDigest, HandleError> {
        self.ask(Request::Digest).await
    }

    /// Leaves the cluster, delivers what is in flight, and stops the node.
    pub async fn shutdown(&self) -> Result<(), HandleError> {
        let (reply, answer) = oneshot::channel();
        self.send(Request::Shutdown(reply)).await?;
        answer.await.map_err(|_| HandleError::Stopped)
    }

    // ---- scheduling ----

    /// Submits (or replaces) a job: its tasks are placed by the cluster's schedulers.
    pub async fn submit_job(&self, job: &JobSpec) -> Result<Token, HandleError> {
        job.validate()?;
        let write = SchedWrite::SubmitJob(Box::new(job.clone()));
        self.sched_write(write).await.map(expect_token)
    }

    /// Stops a job: its machines release its tasks. `None` when there was no such job.
    pub async fn stop_job(&self, job: &Name) -> Result<Option<Token>, HandleError> {
        self.sched_write(SchedWrite::StopJob(job.clone())).await
    }

    /// Publishes this machine's offer. Refused for another machine's record: each machine is the
    /// single writer of its own. [`Handle::run_scheduler`] does this itself, once caught up.
    pub async fn register_node(&self, record: &NodeRecord) -> Result<Token, HandleError> {
        let write = SchedWrite::RegisterNode(Box::new(record.clone()));
        self.sched_write(write).await.map(expect_token)
    }

    /// Creates a namespace's quota (once, before its first job).
    pub async fn create_quota(&self, quota: &QuotaSpec) -> Result<Token, HandleError> {
        let write = SchedWrite::CreateQuota(Box::new(quota.clone()));
        self.sched_write(write).await.map(expect_token)
    }

    /// The scheduling state as this node sees it now.
    pub async fn scheduling(&self) -> Result<SchedulingView, HandleError> {
        self.ask(Request::Scheduling).await
    }

    /// The allocations this machine wins: what it should run. Watch the keys under
    /// `_sched/alloc/<this node>` to learn when they change, or use
    /// [`Handle::watch_my_allocations`].
    pub async fn my_allocations(&self) -> Result<Vec<Allocation>, HandleError> {
        let state = self.scheduling().await?;
        Ok(state.view.node_allocations(&state.me, &state.live))
    }

    /// Runs one scheduling round now: a planning round when `roles.plan`, then an admission
    /// round when `roles.admit`. With `gated`, the round is skipped (and says why) until this
    /// node has caught up with a live peer.
    pub async fn schedule_round(
        &self,
        roles: Roles,
        gated: bool,
    ) -> Result<RoundReport, HandleError> {
        self.round(RoundRequest {
            roles,
            gated,
            register: None,
        })
        .await
    }

    pub(super) async fn round(&self, request: RoundRequest) -> Result<RoundReport, HandleError> {
        self.ask(|reply| Request::Round(Box::new(request), reply))
            .await
    }

    /// Asks the node to wake `notify` whenever scheduling state or membership changes.
    pub(super) async fn follow_scheduling(&self, notify: Arc<Notify>) -> Result<(), HandleError> {
        self.send(Request::Nudge(notify)).await
    }

    async fn sched_write(&self, write: SchedWrite) -> Result<Option<Token>, HandleError> {
        self.ask(|reply| Request::Write(Command::Sched(write), reply))
            .await
    }

    /// Sends a request and waits for its answer.
    async fn ask<T>(&self, request: impl FnOnce(Reply<T>) -> Request) -> Result<T, HandleError> {
        let (reply, answer) = oneshot::channel();
        self.send(request(reply)).await?;
        answer.await.map_err(|_| HandleError::Stopped)?
    }

    async fn send(&self, request: Request) -> Result<(), HandleError> {
        self.requests
            .send(request)
            .await
            .map_err(|_| HandleError::Stopped)
    }
}

fn expect_token(token: Option<Token>) -> Token {
    token.expect("puts, adds, patches and scheduling writes always write a delta")
}

/// A replica id for a new incarnation: milliseconds in the high bits, so a later incarnation of
/// a member compares greater than an earlier one, and random-ish low bits against collisions.
fn new_incarnation(clock: &WallClock) -> NodeId {
    let millis = clock();
    let noise = {
        use std::hash::{BuildHasher, Hasher};
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u64(millis);
        hasher.finish() & 0xf_ffff
    };
    NodeId((millis << 20) | noise)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::host::WATCH_QUEUE;
    use crate::runtime::storage::memory::MemoryStore;
    use crate::runtime::{Buffers, ClusterCa, TlsConfig, TransportConfig, WatchError};

    async fn node_with(store: &MemoryStore) -> Handle {
        node_configured(store, |_| {}).await
    }

    async fn node_configured(
        store: &MemoryStore,
        configure: impl FnOnce(&mut NodeConfig),
    ) -> Handle {
        let ca = ClusterCa::generate("test").expect("a CA");
        let credentials = ca
            .issue("node-a", Duration::from_secs(3600))
            .expect("credentials");
        let tls = TlsConfig::new(ca.cert_pem(), &credentials).expect("TLS config");
        let bind = SocketAddr::from(([127, 0, 0, 1], 0));
        let (transport, inbox) = Transport::bind(bind, tls.clone(), TransportConfig::default())
            .await
            .expect("bind");
        let mut config = NodeConfig::new(bind, tls, vec![]);
        configure(&mut config);
        let replica = Replica::with_config(NodeId(7), config.replica.clone());
        launch(
            config,
            transport,
            inbox,
            replica,
            Some(Box::new(store.clone())),
        )
        .expect("launch")
    }

    /// A put running in the background.
    fn spawn_put(node: &Handle) -> tokio::task::JoinHandle<Result<Token, HandleError>> {
        let node = node.clone();
        tokio::spawn(async move { node.put("config/mode", "blue").await })
    }

    #[tokio::test]
    async fn a_write_is_answered_only_once_its_store_has_made_it_durable() {
        let store = MemoryStore::default();
        store.hold();
        let node = node_with(&store).await;
        let put = spawn_put(&node);
        // Applied (a read sees it) but not answered while the store holds the batch.
        let deadline = Instant::now() + Duration::from_secs(10);
        while node.get("config/mode").await.expect("get").is_none() {
            assert!(Instant::now() < deadline, "the write was never applied");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            !put.is_finished(),
            "answered before the store made it durable"
        );
        assert_eq!(store.held(), 1);
        store.release(Ok(()));
        let token = put.await.expect("task").expect("put");
        assert!(node.wait_for(&token, Duration::ZERO).await.is_ok());
        assert_eq!(store.deltas(), 1);
        node.shutdown().await.expect("shutdown");
        assert_eq!(store.checkpointed_and_closed(), (true, true));
    }

    #[tokio::test]
    async fn a_watch_replays_more_than_its_queue_holds_to_a_reader_that_keeps_up() {
        let store = MemoryStore::default();
        let node = node_with(&store).await;
        let first = node.status().await.expect("status").cursor;
        let writes = WATCH_QUEUE + 2_000;
        for i in 0..writes {
            node.put(format!("w/{i:05}"), "v").await.expect("put");
        }
        let mut watch = node.watch("w/", Some(first)).await.expect("watch");
        for i in 0..writes {
            let event = tokio::time::timeout(Duration::from_secs(10), watch.next())
                .await
                .expect("the replay stalled")
                .expect("the node stopped")
                .unwrap_or_else(|err| panic!("after {i} events: {err}"));
            assert_eq!(event.key.as_bytes(), format!("w/{i:05}").as_bytes());
        }
        // Then live.
        node.put("w/live", "v").await.expect("put");
        let event = watch.next().await.expect("open").expect("event");
        assert_eq!(event.key.as_bytes(), b"w/live");
    }

    #[tokio::test]
    async fn a_watcher_that_stops_reading_holds_no_more_than_its_byte_budget_and_never_slows_others()
     {
        const BUDGET: usize = 16 << 20;
        const VALUE: usize = 100 << 10;
        const WRITES: usize = 120;
        let store = MemoryStore::default();
        let node = node_configured(&store, |config| config.set_memory_budget(BUDGET)).await;
        let buffers = Buffers::from_total(BUDGET);
        let mut stalled = node.watch("big/", None).await.expect("watch");
        let mut reader = node.watch("big/", None).await.expect("watch");
        let reading = tokio::spawn(async move {
            let mut keys = Vec::new();
            while keys.len() < WRITES {
                match tokio::time::timeout(Duration::from_secs(20), reader.next()).await {
                    Ok(Some(Ok(event))) => keys.push(event.key.as_bytes().to_vec()),
                    other => panic!("after {} events: {other:?}", keys.len()),
                }
            }
            keys
        });
        for i in 0..WRITES {
            node.put(format!("big/{i:03}"), vec![i as u8; VALUE])
                .await
                .expect("put");
        }
        // The reader that keeps up gets every change, in order, while the other one stalls.
        let keys = reading.await.expect("the reader got everything");
        let expected: Vec<Vec<u8>> = (0..WRITES)
            .map(|i| format!("big/{i:03}").into_bytes())
            .collect();
        assert_eq!(keys, expected);

        let status = node.status().await.expect("status");
        let usage = |name: &str| {
            status
                .buffers
                .iter()
                .find(|buffer| buffer.name == name)
                .cloned()
                .unwrap_or_else(|| panic!("no {name} in {:?}", status.buffers))
        };
        assert_eq!(status.watchers_paused, 1, "{:?}", status.buffers);
        let watchers = usage("watchers");
        let event_bytes = VALUE + 1024;
        assert!(
            watchers.bytes <= buffers.watcher_bytes + event_bytes,
            "the stalled watcher holds {} bytes, its budget is {}",
            watchers.bytes,
            buffers.watcher_bytes
        );
        let feed = usage("change_feed");
        assert!(feed.bytes <= feed.budget, "{feed:?}");
        assert!(
            feed.items < WRITES,
            "the feed dropped its oldest events: {feed:?}"
        );

        // When the stalled reader comes back it gets what was queued, in order, then is told it
        // fell behind what the feed holds — nothing is skipped silently.
        let mut cursors = Vec::new();
        let end = loop {
            match tokio::time::timeout(Duration::from_secs(20), stalled.next()).await {
                Ok(Some(Ok(event))) => cursors.push(event.cursor),
                Ok(Some(Err(error))) => break error,
                other => panic!("after {} events: {other:?}", cursors.len()),
            }
        };
        assert!(
            matches!(end, WatchError::Compacted { .. }),
            "ended with {end:?}"
        );
        assert!(!cursors.is_empty() && cursors.len() < WRITES);
        assert!(cursors.windows(2).all(|pair| pair[1] == pair[0] + 1));
    }

    #[tokio::test]
    async fn a_write_the_store_fails_is_answered_with_the_storage_error() {
        let store = MemoryStore::default();
        store.hold();
        let node = node_with(&store).await;
        let put = spawn_put(&node);
        let deadline = Instant::now() + Duration::from_secs(10);
        while store.held() == 0 {
            assert!(
                Instant::now() < deadline,
                "the write never reached the store"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        store.release(Err("disk full".into()));
        match put.await.expect("task") {
            Err(HandleError::Storage(reason)) => assert!(reason.contains("disk full"), "{reason}"),
            other => panic!("expected a storage error, got {other:?}"),
        }
    }
}
