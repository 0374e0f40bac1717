//! The tokio task that drives a node's [`Host`]: it owns the sockets (the transport and a
//! sending task per peer), the storage thread and the channels to every [`Handle`](super::Handle),
//! and only moves things between them and the host. What to do with them is decided in the host.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::{Notify, mpsc, oneshot};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::crdt::{Event as ChangeEvent, Key, Token, Value};
use crate::gossip::{self, MemberName, Transmit};
use crate::runtime::api::{
    BufferUsage, Buffers, HandleError, QueuedBytes, RoundReport, SchedulingView, StateDigest,
    Status, WallClock, Watch, WatchError,
};
use crate::runtime::host::{
    Command, Host, Output, Queues, RequestId, Room, RoundRequest, WATCH_QUEUE, WatchId,
};
use crate::runtime::storage::Store;
use crate::runtime::{Channel, Inbox, Received, StorageError, Transport};

/// Messages queued towards one peer before new ones are dropped (anti-entropy repairs drops).
const PEER_QUEUE: usize = 1024;
/// Requests (or peers' messages) handled before the host's outputs are taken.
const BATCH: usize = 256;
/// How often a paused watcher's queue is looked at for room.
const RESUME_INTERVAL: Duration = Duration::from_millis(5);

/// Where a [`Handle`](super::Handle) call's answer goes.
pub(super) type Reply<T> = oneshot::Sender<Result<T, HandleError>>;

/// What a [`Handle`](super::Handle) asks of its node, with where the answer goes.
pub(super) enum Request {
    /// A [`Command::Write`] or [`Command::Sched`].
    Write(Command, Reply<Option<Token>>),
    Get(Key, Reply<Option<Value>>),
    ReadKey(Key, Reply<(Option<Value>, Token)>),
    List {
        prefix: Vec<u8>,
        after: Option<Key>,
        limit: usize,
        reply: Reply<Vec<(Key, Value)>>,
    },
    ListAfter {
        prefix: Vec<u8>,
        after: Option<Key>,
        limit: usize,
        reply: Reply<(Vec<(Key, Value)>, Token)>,
    },
    WaitFor(Token, Instant, Reply<()>),
    Watch(Vec<u8>, Option<u64>, Reply<Watch>),
    Status(Reply<Status>),
    Digest(Reply<StateDigest>),
    Round(Box<RoundRequest>, Reply<RoundReport>),
    Scheduling(Reply<SchedulingView>),
    Nudge(Arc<Notify>),
    Shutdown(oneshot::Sender<()>),
}

/// A saved batch, or why it could not be saved; sent by the storage thread.
pub(super) type Saved = (u64, Result<(), StorageError>);

/// The task that owns the node.
pub(super) struct Driver {
    host: Host,
    transport: Transport,
    wall_clock: WallClock,
    /// A sending task per peer address, so one slow peer never delays the others.
    peers: HashMap<SocketAddr, PeerQueue>,
    /// Payload bytes queued towards all peers.
    peers_queued: Arc<AtomicUsize>,
    /// Byte budgets of the watchers' and peers' queues.
    buffers: Buffers,
    /// How long shutdown may take in all.
    shutdown_timeout: Duration,
    /// Messages dropped at a full peer queue.
    peer_queue_dropped: u64,
    /// The sending tasks, awaited on shutdown so what they hold is handed to the transport.
    senders: tokio::task::JoinSet<()>,
    /// Durable storage, when configured: every batch the host persists goes there.
    storage: Option<Box<dyn Store>>,
    /// Where the storage thread says a batch is durable.
    saved: mpsc::UnboundedSender<Saved>,
    /// Writes and session waiters the host has not answered yet.
    writes: HashMap<RequestId, Reply<Option<Token>>>,
    waits: HashMap<RequestId, Reply<()>>,
    next_request: RequestId,
    /// Each watcher's queue.
    watches: HashMap<WatchId, WatchQueue>,
    /// Bytes queued for all watchers.
    watchers_queued: Arc<AtomicUsize>,
    /// Watchers whose queue was full (or that replay a backlog): the host replays what they
    /// missed from the change feed as their readers make room.
    paused: HashSet<WatchId>,
    /// Woken when scheduling keys or membership change, so scheduler loops run a round.
    nudges: Vec<Arc<Notify>>,
}

impl Driver {
    /// A driver, and the receiving end of its storage acknowledgements for [`Driver::run`].
    pub(super) fn new(
        host: Host,
        transport: Transport,
        wall_clock: WallClock,
        storage: Option<Box<dyn Store>>,
        buffers: Buffers,
        shutdown_timeout: Duration,
    ) -> (Driver, mpsc::UnboundedReceiver<Saved>) {
        let (saved, acks) = mpsc::unbounded_channel();
        let driver = Driver {
            host,
            transport,
            wall_clock,
            peers: HashMap::new(),
            peers_queued: Arc::default(),
            buffers,
            shutdown_timeout,
            peer_queue_dropped: 0,
            senders: tokio::task::JoinSet::new(),
            storage,
            saved,
            writes: HashMap::new(),
            waits: HashMap::new(),
            next_request: 0,
            watches: HashMap::new(),
            watchers_queued: Arc::default(),
            paused: HashSet::new(),
            nudges: Vec::new(),
        };
        (driver, acks)
    }

    pub(super) async fn run(
        mut self,
        mut requests: mpsc::Receiver<Request>,
        mut inbox: Inbox,
        mut acks: mpsc::UnboundedReceiver<Saved>,
    ) {
        let shutdown = 'driving: loop {
            // Saved batches first: each answers writes that are waiting on nothing else.
            while let Ok((batch, result)) = acks.try_recv() {
                self.host
                    .handle_saved(batch, result.map_err(|err| err.to_string()));
            }
            self.resume_watches();
            self.flush();
            // A paused watcher's reader may make room at any moment; look again soon.
            let idle = Instant::now()
                + if self.paused.is_empty() {
                    Duration::from_secs(3600)
                } else {
                    RESUME_INTERVAL
                };
            let wake = self
                .host
                .poll_timeout()
                .map_or(idle, |at| idle.min(Instant::from_std(at)));
            tokio::select! {
                request = requests.recv() => {
                    // Take what else is waiting too: one flush then sends their writes in one
                    // push and hands them to storage in one batch.
                    let mut next = request;
                    for handled in 1.. {
                        match next {
                            Some(Request::Shutdown(done)) => break 'driving Some(done),
                            Some(request) => self.on_request(request),
                            None => break 'driving None,
                        }
                        if handled == BATCH {
                            break;
                        }
                        match requests.try_recv() {
                            Ok(request) => next = Some(request),
                            Err(_) => break,
                        }
                    }
                }
                received = inbox.recv() => {
                    let mut next = received;
                    for handled in 1.. {
                        match next {
                            Some(received) => self.on_received(received),
                            None => break 'driving None,
                        }
                        if handled == BATCH {
                            break;
                        }
                        next = inbox.try_recv();
                        if next.is_none() {
                            break;
                        }
                    }
                }
                Some((batch, result)) = acks.recv() => {
                    self.host.handle_saved(batch, result.map_err(|err| err.to_string()));
                }
                () = tokio::time::sleep_until(wake) => {
                    self.host.handle_timeout(Instant::now().into_std());
                }
            }
        };
        self.leave(acks).await;
        if let Some(done) = shutdown {
            let _ = done.send(());
        }
    }

    fn on_request(&mut self, request: Request) {
        let now = Instant::now().into_std();
        match request {
            Request::Write(command, reply) => {
                let id = self.request_id();
                self.writes.insert(id, reply);
                let wall = (self.wall_clock)();
                self.host.handle_command(now, wall, id, command);
            }
            Request::Get(key, reply) => {
                let _ = reply.send(self.host.get(&key));
            }
            Request::ReadKey(key, reply) => {
                let _ = reply.send(self.host.get(&key).map(|value| (value, self.host.token())));
            }
            Request::List {
                prefix,
                after,
                limit,
                reply,
            } => {
                let _ = reply.send(self.host.list(&prefix, after.as_ref(), limit));
            }
            Request::ListAfter {
                prefix,
                after,
                limit,
                reply,
            } => {
                let items = self.host.list(&prefix, after.as_ref(), limit);
                let _ = reply.send(items.map(|items| (items, self.host.token())));
            }
            Request::WaitFor(token, deadline, reply) => {
                let id = self.request_id();
                self.waits.insert(id, reply);
                let deadline = deadline.into_std();
                self.host
                    .handle_command(now, 0, id, Command::WaitFor { token, deadline });
            }
            Request::Watch(prefix, from, reply) => {
                let (sender, receiver) = mpsc::channel(WATCH_QUEUE);
                let queued = QueuedBytes::new(self.watchers_queued.clone());
                let watch = self.host.watch(prefix, from);
                self.watches.insert(
                    watch,
                    WatchQueue {
                        sender,
                        queued: queued.clone(),
                    },
                );
                if from.is_some() {
                    // Its backlog is replayed as the reader takes it.
                    self.paused.insert(watch);
                }
                let _ = reply.send(Ok(Watch {
                    events: receiver,
                    queued,
                }));
            }
            Request::Status(reply) => {
                let queues = self.queues();
                let _ = reply.send(Ok(self.host.status(
                    self.storage.as_ref().map(|storage| storage.stats()),
                    self.transport.stats(),
                    self.peer_queue_dropped,
                    queues,
                )));
            }
            Request::Digest(reply) => {
                let _ = reply.send(Ok(self.host.digest()));
            }
            Request::Round(request, reply) => {
                let wall = (self.wall_clock)();
                let _ = reply.send(self.host.round(now, wall, *request));
            }
            Request::Scheduling(reply) => {
                let _ = reply.send(self.host.scheduling());
            }
            Request::Nudge(notify) => {
                self.host.follow_scheduling();
                self.nudges.push(notify);
            }
            Request::Shutdown(_) => {}
        }
    }

    fn request_id(&mut self) -> RequestId {
        self.next_request = self.next_request.wrapping_add(1);
        self.next_request
    }

    fn on_received(&mut self, received: Received) {
        let now = Instant::now().into_std();
        self.host
            .handle_received(now, &received.from, received.addr, &received.bytes);
    }

    /// Carries out everything the host asks for.
    fn flush(&mut self) {
        let mut delivered = false;
        // Watchers paused during this flush: what is still queued for them is replayed later.
        let mut just_paused = HashSet::new();
        while let Some(output) = self.host.poll_output() {
            match output {
                Output::Transmit(transmit) => self.dispatch(transmit),
                Output::Persist { batch, deltas } => self.persist(batch, deltas),
                Output::Written { .. } | Output::Covered { .. } => self.answer(output),
                Output::Event { watch, event } => {
                    delivered = true;
                    if !just_paused.contains(&watch) && self.deliver(watch, event) {
                        just_paused.insert(watch);
                    }
                }
                Output::Membership(event) => log_membership(&event),
                Output::SchedulingChanged => self.nudge(),
            }
        }
        if delivered {
            // Readers that went away since: stop serving them.
            let closed: Vec<WatchId> = self
                .watches
                .iter()
                .filter(|(_, queue)| queue.sender.is_closed())
                .map(|(watch, _)| *watch)
                .collect();
            for watch in closed {
                self.watches.remove(&watch);
                self.host.cancel_watch(watch);
            }
        }
    }

    /// Sends a write's or a session waiter's answer to its caller; other outputs are ignored.
    fn answer(&mut self, output: Output) {
        match output {
            Output::Written { id, result } => {
                if let Some(reply) = self.writes.remove(&id) {
                    let _ = reply.send(result);
                }
            }
            Output::Covered { id, result } => {
                if let Some(reply) = self.waits.remove(&id) {
                    let _ = reply.send(result);
                }
            }
            _ => {}
        }
    }

    /// Hands a batch to storage; the storage thread says when it is durable. Replaces the log
    /// with a snapshot when it has grown large (the replica now holds exactly what was handed
    /// out: the host persists last among its outputs).
    fn persist(&mut self, batch: u64, deltas: Vec<crate::crdt::Delta>) {
        let Some(storage) = &self.storage else {
            // A host made durable without storage is a bug of this file; answer rather than
            // leave writers waiting.
            self.host.handle_saved(batch, Ok(()));
            return;
        };
        let saved = self.saved.clone();
        let ack = Box::new(move |result: Result<(), StorageError>| {
            let _ = saved.send((batch, result));
        });
        storage.append(deltas, ack);
        if storage.wants_checkpoint() {
            storage.checkpoint(self.host.snapshot());
        }
    }

    /// Queues one change for a watcher. A watcher whose queue is full — in events, in its own
    /// bytes or in all watchers' bytes — is paused rather than allowed to block the node, grow
    /// without bound or lose changes: `true` when this paused it.
    fn deliver(&mut self, watch: WatchId, event: Result<ChangeEvent, WatchError>) -> bool {
        let Some(queue) = self.watches.get(&watch) else {
            return false;
        };
        let (cursor, size) = match &event {
            Ok(event) => (Some(event.cursor), event.size()),
            Err(_) => (None, 0),
        };
        if let Some(cursor) = cursor {
            let room = self.room(queue);
            if !room.fits(0, 0, size) {
                self.host.pause_watch(watch, cursor - 1);
                self.paused.insert(watch);
                return true;
            }
            queue.queued.add(size);
        }
        match queue.sender.try_send(event) {
            Ok(()) if cursor.is_some() => return false,
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) if let Some(cursor) = cursor => {
                queue.queued.sub(size);
                self.host.pause_watch(watch, cursor - 1);
                self.paused.insert(watch);
                return true;
            }
            Err(mpsc::error::TrySendError::Full(last)) => {
                // The error that ends the watch still reaches the reader, after the rest.
                let events = queue.sender.clone();
                tokio::spawn(async move {
                    let _ = events.send(last).await;
                });
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                queue.queued.sub(size);
            }
        }
        self.watches.remove(&watch);
        self.paused.remove(&watch);
        self.host.cancel_watch(watch);
        false
    }

    /// The room left in a watcher's queue, by its own budgets and by all watchers' budget.
    fn room(&self, queue: &WatchQueue) -> Room {
        let own = queue.queued.own();
        let all = queue.queued.all();
        Room {
            events: queue.sender.capacity(),
            bytes: self
                .buffers
                .watcher_bytes
                .saturating_sub(own)
                .min(self.buffers.watchers_bytes.saturating_sub(all)),
            empty: own == 0,
        }
    }

    /// Lets the host replay to paused watchers what fits in their queues now.
    fn resume_watches(&mut self) {
        if self.paused.is_empty() {
            return;
        }
        let paused: Vec<WatchId> = self.paused.iter().copied().collect();
        for watch in paused {
            let Some(queue) = self.watches.get(&watch) else {
                self.paused.remove(&watch);
                continue;
            };
            if queue.sender.is_closed() {
                self.watches.remove(&watch);
                self.paused.remove(&watch);
                self.host.cancel_watch(watch);
                continue;
            }
            // Wait for a useful amount of room (a quarter of the queue's events and half of its
            // bytes), unless the queue is empty.
            let room = self.room(queue);
            let useful =
                room.events >= WATCH_QUEUE / 4 && room.bytes >= self.buffers.watcher_bytes / 2;
            if !room.empty && !useful {
                continue;
            }
            if self.host.resume_watch(watch, room) {
                self.paused.remove(&watch);
            }
        }
    }

    /// What the watchers' and peers' queues hold, for status.
    fn queues(&self) -> Queues {
        let watched: usize = self
            .watches
            .values()
            .map(|queue| queue.sender.max_capacity() - queue.sender.capacity())
            .sum();
        let sent: usize = self
            .peers
            .values()
            .map(|queue| queue.sender.max_capacity() - queue.sender.capacity())
            .sum();
        let inbox = self.transport.stats();
        Queues {
            watchers: BufferUsage {
                name: "watchers",
                items: watched,
                bytes: self.watchers_queued.load(Ordering::SeqCst),
                budget: self.buffers.watchers_bytes,
            },
            peers: BufferUsage {
                name: "peer_queues",
                items: sent,
                bytes: self.peers_queued.load(Ordering::SeqCst),
                budget: self.buffers.peers_bytes,
            },
            inbox: BufferUsage {
                name: "inbox",
                items: 0,
                bytes: usize::try_from(inbox.inbox_bytes).unwrap_or(usize::MAX),
                budget: usize::try_from(inbox.inbox_budget).unwrap_or(usize::MAX),
            },
            watchers_paused: self.paused.len(),
        }
    }

    fn dispatch(&mut self, transmit: Transmit) {
        let addr = transmit.to.addr;
        let queue = self.peers.entry(addr).or_insert_with(|| {
            let (mut queue, receiver) = PeerQueue::new(
                PEER_QUEUE,
                self.buffers.peer_bytes,
                self.peers_queued.clone(),
                self.buffers.peers_bytes,
            );
            queue.sender_task = Some(self.senders.spawn(send_loop(
                self.transport.clone(),
                receiver,
                queue.queued.clone(),
                queue.all.clone(),
            )));
            queue
        });
        // The pieces of a transfer are useful only together: gather them, then queue all or none.
        let messages = match transmit.part {
            None => vec![transmit],
            Some(part) => {
                let pieces = queue.pieces.get_or_insert_with(Vec::new);
                if part.index == 0 {
                    pieces.clear();
                }
                pieces.push(transmit);
                if part.index + 1 < part.count {
                    return;
                }
                let pieces = queue.pieces.take().unwrap_or_default();
                if pieces.len() != part.count as usize {
                    // Pieces are polled one after another; a gap is a bug of the protocol.
                    warn!(%addr, "an incomplete transfer was not sent");
                    return;
                }
                pieces
            }
        };
        let count = messages.len();
        if !queue.offer(messages) {
            self.peer_queue_dropped += count as u64;
            debug!(%addr, count, "peer queue full; messages dropped (anti-entropy will repair)");
        }
    }

    /// Wakes the scheduler loops; forgets those that ended.
    fn nudge(&mut self) {
        self.nudges.retain(|notify| Arc::strong_count(notify) > 1);
        for notify in &self.nudges {
            notify.notify_one();
        }
    }

    async fn leave(mut self, mut acks: mpsc::UnboundedReceiver<Saved>) {
        let started = Instant::now();
        let deadline = started + self.shutdown_timeout;
        self.host.leave(started.into_std());
        self.flush();
        // What is queued for a peer known to be down would only be waited on: drop it. Closing
        // the other queues lets each sending task finish what it holds; a peer that never
        // answers delays shutdown at most until the deadline.
        let live: HashSet<SocketAddr> = self.host.live_peers().map(|member| member.addr).collect();
        for (addr, queue) in self.peers.drain() {
            if !live.contains(&addr)
                && let Some(task) = queue.sender_task
            {
                task.abort();
            }
        }
        let senders = async { while self.senders.join_next().await.is_some() {} };
        if tokio::time::timeout_at(deadline, senders).await.is_err() {
            warn!("messages to unreachable peers were abandoned at shutdown");
            self.senders.abort_all();
        }
        // What the host still holds, then a snapshot so the next start replays nothing.
        self.flush();
        if let Some(storage) = &self.storage {
            storage.checkpoint(self.host.snapshot());
        }
        let live: HashSet<String> = self
            .host
            .live_peers()
            .map(|member| member.name.as_str().to_owned())
            .collect();
        let left = deadline.saturating_duration_since(Instant::now());
        self.transport
            .clone()
            .shutdown_within(left, |peer| live.contains(peer))
            .await;
        if let Some(storage) = self.storage.take()
            && tokio::task::spawn_blocking(move || storage.close())
                .await
                .is_err()
        {
            warn!("storage did not close cleanly");
        }
        // Storage is closed: every batch handed to it has been answered. Answer the writes
        // that waited on them.
        while let Ok((batch, result)) = acks.try_recv() {
            self.host
                .handle_saved(batch, result.map_err(|err| err.to_string()));
        }
        while let Some(output) = self.host.poll_output() {
            self.answer(output);
        }
        info!(took = ?started.elapsed(), "node stopped");
    }
}

fn log_membership(event: &gossip::Event) {
    match event {
        gossip::Event::MemberUp(member) => {
            info!(member = %member.name, addr = %member.addr, "member up")
        }
        gossip::Event::MemberDown(member) => warn!(member = %member.name, "member down"),
        gossip::Event::Rejoined(me) => warn!(
            generation = me.generation,
            "declared down by peers; rejoined"
        ),
        _ => {}
    }
}

/// One watcher's queue, and the bytes it holds (given back by the reader's [`Watch`]).
struct WatchQueue {
    sender: mpsc::Sender<Result<ChangeEvent, WatchError>>,
    queued: QueuedBytes,
}

/// The queue towards one peer's sending task, bounded in messages and in payload bytes, its own
/// and all peers' together. Each item is one message or all the pieces of a transfer. An empty
/// queue takes any one item, so every message and transfer can be sent.
struct PeerQueue {
    sender: mpsc::Sender<Vec<Transmit>>,
    /// The pieces of a transfer gathered so far.
    pieces: Option<Vec<Transmit>>,
    /// Payload bytes queued and not yet handed to the transport; the sending task gives them
    /// back once it has written each message.
    queued: Arc<AtomicUsize>,
    /// The most `queued` may reach.
    budget: usize,
    /// Payload bytes queued towards all peers, and the most it may reach.
    all: Arc<AtomicUsize>,
    all_budget: usize,
    /// The sending task, to abandon what it holds for a peer known to be down.
    sender_task: Option<tokio::task::AbortHandle>,
}

impl PeerQueue {
    fn new(
        messages: usize,
        budget: usize,
        all: Arc<AtomicUsize>,
        all_budget: usize,
    ) -> (PeerQueue, mpsc::Receiver<Vec<Transmit>>) {
        let (sender, receiver) = mpsc::channel(messages);
        let queue = PeerQueue {
            sender,
            pieces: None,
            queued: Arc::new(AtomicUsize::new(0)),
            budget,
            all,
            all_budget,
            sender_task: None,
        };
        (queue, receiver)
    }

    /// Queues `messages` (one, or a transfer's pieces) unless that would exceed the queue's
    /// items or bytes; `false` when they were dropped.
    fn offer(&self, messages: Vec<Transmit>) -> bool {
        let len: usize = messages.iter().map(|transmit| transmit.payload.len()).sum();
        let fits = |queued: usize| {
            let total = queued.checked_add(len)?;
            let all = self.all.load(Ordering::SeqCst).saturating_add(len);
            (queued == 0 || (total <= self.budget && all <= self.all_budget)).then_some(total)
        };
        if self
            .queued
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, fits)
            .is_err()
        {
            return false;
        }
        self.all.fetch_add(len, Ordering::SeqCst);
        if self.sender.try_send(messages).is_err() {
            self.queued.fetch_sub(len, Ordering::SeqCst);
            self.all.fetch_sub(len, Ordering::SeqCst);
            return false;
        }
        true
    }
}

async fn send_loop(
    transport: Transport,
    mut queue: mpsc::Receiver<Vec<Transmit>>,
    queued: Arc<AtomicUsize>,
    all: Arc<AtomicUsize>,
) {
    while let Some(messages) = queue.recv().await {
        for transmit in messages {
            let len = transmit.payload.len();
            let channel = match transmit.channel {
                gossip::Channel::Datagram => Channel::Datagram,
                _ => Channel::Stream,
            };
            let expect = transmit.to.name.as_ref().map(MemberName::as_str);
            if let Err(err) = transport
                .send(transmit.to.addr, expect, channel, transmit.payload)
                .await
            {
                debug!(addr = %transmit.to.addr, error = %err, "send failed");
            }
            queued.fetch_sub(len, Ordering::SeqCst);
            all.fetch_sub(len, Ordering::SeqCst);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn transmit(len: usize) -> Transmit {
        Transmit {
            to: gossip::Destination {
                name: None,
                addr: SocketAddr::from(([127, 0, 0, 1], 7000)),
            },
            channel: gossip::Channel::Stream,
            payload: vec![0; len],
            part: None,
        }
    }

    #[test]
    fn peer_queue_drops_what_exceeds_its_byte_budget() {
        // A peer that never reads: the receiver is kept but never drained.
        let (queue, mut receiver) = PeerQueue::new(PEER_QUEUE, 1000, Arc::default(), usize::MAX);
        assert!(queue.offer(vec![transmit(600)]));
        assert!(!queue.offer(vec![transmit(600)]), "over the byte budget");
        assert!(queue.offer(vec![transmit(400)]), "exactly fills the budget");
        assert!(!queue.offer(vec![transmit(1)]), "nothing more fits");
        assert_eq!(queue.queued.load(Ordering::SeqCst), 1000);

        // What the sending task does once it has written a message: give its bytes back.
        let sent = receiver.try_recv().expect("queued message");
        queue
            .queued
            .fetch_sub(sent[0].payload.len(), Ordering::SeqCst);
        assert!(queue.offer(vec![transmit(600)]));
        assert_eq!(receiver.len(), 2);
    }

    #[test]
    fn peer_queue_still_bounds_messages() {
        let (queue, _receiver) = PeerQueue::new(2, 1000, Arc::default(), usize::MAX);
        assert!(queue.offer(vec![transmit(1)]));
        assert!(queue.offer(vec![transmit(1)]));
        assert!(!queue.offer(vec![transmit(1)]), "over the message bound");
        // A message refused for the count gives its bytes back.
        assert_eq!(queue.queued.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn a_transfer_is_queued_whole_or_not_at_all_and_an_empty_queue_takes_it_whole() {
        let all = Arc::new(AtomicUsize::new(0));
        let (queue, mut receiver) = PeerQueue::new(PEER_QUEUE, 1000, all.clone(), 1500);
        let transfer = || (0..3).map(|_| transmit(600)).collect::<Vec<_>>();
        // Larger than the budget, but the queue is empty: all of it goes, as one item.
        assert!(queue.offer(transfer()));
        assert_eq!(queue.queued.load(Ordering::SeqCst), 1800);
        assert_eq!(all.load(Ordering::SeqCst), 1800);
        // Nothing fits behind it, not even one piece of another transfer.
        assert!(!queue.offer(transfer()));
        assert!(!queue.offer(vec![transmit(1)]));
        assert_eq!(receiver.len(), 1);
        assert_eq!(receiver.try_recv().expect("queued").len(), 3);
    }

    #[test]
    fn peer_queues_share_one_budget_for_all_peers() {
        let all = Arc::new(AtomicUsize::new(0));
        let (first, _one) = PeerQueue::new(PEER_QUEUE, 1000, all.clone(), 1000);
        let (second, _two) = PeerQueue::new(PEER_QUEUE, 1000, all.clone(), 1000);
        assert!(first.offer(vec![transmit(700)]));
        assert!(
            second.offer(vec![transmit(300)]),
            "its own budget and the total hold it"
        );
        assert!(!second.offer(vec![transmit(1)]), "the total is spent");
        assert!(!first.offer(vec![transmit(1)]));
        assert_eq!(all.load(Ordering::SeqCst), 1000);
    }
}
