//! Durable storage of a node's replica in one redb file: a snapshot plus a log of the deltas
//! applied since, written by a dedicated thread with group commit.
//!
//! The node journals every delta that changes its replica (local writes and peers' deltas). The
//! storage thread takes whatever has queued up since its last commit, appends it to the log in
//! one transaction, commits (one fsync for the whole batch), and only then acknowledges the local
//! writes in it. When the log outgrows the state, the node hands over a snapshot; the snapshot
//! replaces the log it covers in the same transaction. Recovery restores the snapshot and replays
//! the log in order, then continues under a new node id (see [`Replica::reincarnate`]).

use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use tracing::{info, warn};

use crate::crdt::{self, Delta, NodeId, Replica, ReplicaConfig};

/// The data file inside the data directory.
pub const DATA_FILE: &str = "mantissa.redb";
/// The layout of the data file; bumped when it changes incompatibly.
const FORMAT: u8 = 1;
/// How far a restarted node moves its change-feed cursor (see [`Replica::skip_cursor`]): more
/// changes than any process applies between two commits.
const CURSOR_GAP: u64 = 1 << 32;
/// The log may grow to this size, or to the snapshot's size if larger, before a checkpoint.
const MIN_CHECKPOINT_BYTES: u64 = 64 << 20;
/// A commit gathers at most this many queued jobs; the rest waits for the next one.
const MAX_BATCH_JOBS: usize = 4096;

const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");

/// The data file's page cache. redb's default (1 GiB) lets a node's resident memory grow with
/// the file, whose log of deltas grows to 64 MiB (or the snapshot's size) before it is replaced.
/// Reads never go to the file (the replica lives in memory), so the cache only serves commits
/// and recovery.
const PAGE_CACHE_BYTES: usize = 32 * 1024 * 1024;

/// Where and how a node keeps its replica on disk.
#[derive(Clone, Debug)]
pub struct StorageConfig {
    /// The directory holding the data file (`mantissa.redb`); created if missing.
    pub dir: PathBuf,
    /// When the data file is corrupted or unreadable: `false` refuses to start (the default),
    /// `true` moves the file aside (renamed, never deleted) and starts empty, to re-sync from peers.
    pub discard_corrupt: bool,
}

impl StorageConfig {
    /// Storage in `dir`, refusing to start on a corrupted file.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        StorageConfig {
            dir: dir.into(),
            discard_corrupt: false,
        }
    }
}

/// Counters about the data file, reported in [`crate::runtime::Status`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct StorageStats {
    /// The data file.
    pub path: PathBuf,
    /// Transactions committed (each one fsync).
    pub commits: u64,
    /// Deltas written to the log.
    pub deltas_written: u64,
    /// Bytes written to the log.
    pub bytes_written: u64,
    /// Total time spent committing.
    pub sync_time: Duration,
    /// The slowest commit so far.
    pub max_sync: Duration,
    /// Snapshots written (each one replaces the log it covers).
    pub checkpoints: u64,
    /// Bytes in the log since the last snapshot.
    pub log_bytes: u64,
    /// Size of the last snapshot.
    pub snapshot_bytes: u64,
    /// Deltas replayed from the log at start-up.
    pub replayed: u64,
    /// The failure that stopped storage, if any: writes are no longer durable.
    pub failure: Option<String>,
}

/// Why the data file could not be opened, read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StorageError {
    /// The data file exists but its content is damaged or not a mantissa data file.
    #[error(
        "data file {path} is corrupted or unreadable ({reason}). It was left in place: restore it from a backup, or start with --discard-corrupt-data to move it aside and re-sync from peers"
    )]
    Corrupted {
        /// The data file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// Another process holds the data file.
    #[error("data file {path} is in use by another process")]
    Locked {
        /// The data file.
        path: PathBuf,
    },
    /// The file system refused an operation.
    #[error("data file {path}: {reason}")]
    Io {
        /// The file or directory the operation was on.
        path: PathBuf,
        /// What failed, and the operating system's error.
        reason: String,
    },
    /// The storage thread has stopped after an earlier failure.
    #[error("storage has stopped after an earlier failure: {0}")]
    Stopped(String),
}

/// Called once the write it belongs to is durable, or with why it could not be made durable.
pub(crate) type Ack = Box<dyn FnOnce(Result<(), StorageError>) + Send>;

/// Where a node's changes go to become durable: the node's driver hands it each batch its host
/// persists, in order, and tells the host when the store acknowledges it. [`Storage`] keeps them
/// in the data file; tests use an in-memory store ([`memory::MemoryStore`]).
pub(crate) trait Store: Send {
    /// Queues deltas; `ack` runs once they (and everything queued before) are durable.
    fn append(&self, deltas: Vec<Delta>, ack: Ack);
    /// Whether the log has grown enough that a snapshot should replace it.
    fn wants_checkpoint(&self) -> bool;
    /// Queues a snapshot of the replica as it is after everything queued so far; it replaces
    /// the log.
    fn checkpoint(&self, snapshot: Vec<u8>);
    /// The store's counters.
    fn stats(&self) -> StorageStats;
    /// Waits for everything queued to be durable (running its acks) and closes. Blocking.
    fn close(self: Box<Self>);
}

enum Job {
    Append(Vec<Delta>, Vec<Ack>),
    Checkpoint(Vec<u8>),
}

/// The node's side of durable storage: queues work for the storage thread.
pub(crate) struct Storage {
    jobs: Option<Sender<Job>>,
    thread: Option<JoinHandle<()>>,
    stats: Arc<Mutex<StorageStats>>,
}

impl Storage {
    /// Opens (or creates) the data file in `config.dir`, recovers the replica it holds, and
    /// continues it as `node`. Blocking.
    pub(crate) fn open(
        config: &StorageConfig,
        replica_config: ReplicaConfig,
        node: NodeId,
    ) -> Result<(Storage, Replica), StorageError> {
        std::fs::create_dir_all(&config.dir).map_err(|err| StorageError::Io {
            path: config.dir.clone(),
            reason: format!("cannot create the data directory: {err}"),
        })?;
        let path = config.dir.join(DATA_FILE);
        let (db, replica, stats) = match recover(&path, &replica_config) {
            Ok(recovered) => recovered,
            Err(StorageError::Corrupted { path, reason }) if config.discard_corrupt => {
                let aside = move_aside(&path)?;
                warn!(file = %path.display(), moved_to = %aside.display(), %reason,
                    "data file corrupted; moved aside, starting empty to re-sync from peers");
                recover(&path, &replica_config)?
            }
            Err(err) => return Err(err),
        };
        let mut replica = replica;
        replica
            .reincarnate(node)
            .map_err(|err| corrupted(&path, format!("cannot continue the replica: {err}")))?;
        if stats.snapshot_bytes > 0 || stats.log_bytes > 0 {
            replica.skip_cursor(CURSOR_GAP);
        }
        info!(file = %path.display(), keys = replica.len(), replayed = stats.replayed,
            log_bytes = stats.log_bytes, "storage opened");
        let stats = Arc::new(Mutex::new(stats));
        let (jobs, queue) = mpsc::channel();
        let writer = Writer {
            db,
            path,
            stats: stats.clone(),
            failure: None,
        };
        let thread = std::thread::Builder::new()
            .name("mantissa-storage".into())
            .spawn(move || writer.run(queue))
            .map_err(|err| StorageError::Io {
                path: config.dir.clone(),
                reason: format!("cannot start the storage thread: {err}"),
            })?;
        Ok((
            Storage {
                jobs: Some(jobs),
                thread: Some(thread),
                stats,
            },
            replica,
        ))
    }

    /// Queues deltas for the log; each ack runs once they (and everything queued before) are
    /// durable.
    pub(crate) fn append(&self, deltas: Vec<Delta>, acks: Vec<Ack>) {
        self.submit(Job::Append(deltas, acks));
    }

    /// Whether the log has grown enough that a snapshot should replace it.
    pub(crate) fn wants_checkpoint(&self) -> bool {
        let stats = self.stats();
        stats.failure.is_none() && stats.log_bytes > MIN_CHECKPOINT_BYTES.max(stats.snapshot_bytes)
    }

    /// Queues a snapshot of the replica as it is after everything queued so far; it replaces the
    /// log.
    pub(crate) fn checkpoint(&self, snapshot: Vec<u8>) {
        // Counted now so the next flushes do not ask for another one before this one lands.
        if let Ok(mut stats) = self.stats.lock() {
            stats.log_bytes = 0;
            stats.snapshot_bytes = snapshot.len() as u64;
        }
        self.submit(Job::Checkpoint(snapshot));
    }

    pub(crate) fn stats(&self) -> StorageStats {
        self.stats
            .lock()
            .map(|stats| stats.clone())
            .unwrap_or_default()
    }

    /// Waits for everything queued to be written and closes the file. Blocking.
    pub(crate) fn close(mut self) {
        self.jobs = None;
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            warn!("the storage thread panicked");
        }
    }

    fn submit(&self, job: Job) {
        let Some(jobs) = &self.jobs else { return };
        if let Err(mpsc::SendError(job)) = jobs.send(job) {
            fail_job(
                job,
                StorageError::Stopped("the storage thread has exited".into()),
            );
        }
    }
}

impl Store for Storage {
    fn append(&self, deltas: Vec<Delta>, ack: Ack) {
        Storage::append(self, deltas, vec![ack]);
    }

    fn wants_checkpoint(&self) -> bool {
        Storage::wants_checkpoint(self)
    }

    fn checkpoint(&self, snapshot: Vec<u8>) {
        Storage::checkpoint(self, snapshot);
    }

    fn stats(&self) -> StorageStats {
        Storage::stats(self)
    }

    fn close(self: Box<Self>) {
        Storage::close(*self);
    }
}

/// The storage thread.
struct Writer {
    db: Database,
    path: PathBuf,
    stats: Arc<Mutex<StorageStats>>,
    failure: Option<String>,
}

impl Writer {
    fn run(mut self, queue: Receiver<Job>) {
        while let Ok(first) = queue.recv() {
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH_JOBS
                && let Ok(job) = queue.try_recv()
            {
                batch.push(job);
            }
            self.commit(batch);
        }
    }

    fn commit(&mut self, batch: Vec<Job>) {
        if let Some(failure) = &self.failure {
            let err = StorageError::Stopped(failure.clone());
            for job in batch {
                fail_job(job, StorageError::Stopped(err.to_string()));
            }
            return;
        }
        let started = Instant::now();
        let mut acks = Vec::new();
        let mut written = (0u64, 0u64);
        let result = self.write(batch, &mut acks, &mut written);
        let elapsed = started.elapsed();
        match result {
            Ok(checkpoints) => {
                if let Ok(mut stats) = self.stats.lock() {
                    stats.commits += 1;
                    stats.deltas_written += written.0;
                    stats.bytes_written += written.1;
                    stats.log_bytes += written.1;
                    stats.checkpoints += checkpoints;
                    stats.sync_time += elapsed;
                    stats.max_sync = stats.max_sync.max(elapsed);
                }
                for ack in acks {
                    ack(Ok(()));
                }
            }
            Err(reason) => {
                let reason = format!("{}: {reason}", self.path.display());
                tracing::error!(%reason, "storage failed; writes are no longer durable");
                if let Ok(mut stats) = self.stats.lock() {
                    stats.failure = Some(reason.clone());
                }
                self.failure = Some(reason.clone());
                for ack in acks {
                    ack(Err(StorageError::Stopped(reason.clone())));
                }
            }
        }
    }

    /// Writes a batch in one transaction; returns how many checkpoints it held.
    fn write(
        &self,
        batch: Vec<Job>,
        acks: &mut Vec<Ack>,
        written: &mut (u64, u64),
    ) -> Result<u64, String> {
        let txn = self.db.begin_write().map_err(|err| err.to_string())?;
        let mut checkpoints = 0;
        {
            let mut log = txn.open_table(LOG).map_err(|err| err.to_string())?;
            let mut meta = txn.open_table(META).map_err(|err| err.to_string())?;
            let mut next = match log.last().map_err(|err| err.to_string())? {
                Some((seq, _)) => seq.value() + 1,
                None => 0,
            };
            for job in batch {
                match job {
                    Job::Append(deltas, job_acks) => {
                        acks.extend(job_acks);
                        for delta in deltas {
                            let bytes = delta.encode();
                            log.insert(next, bytes.as_slice())
                                .map_err(|err| err.to_string())?;
                            next += 1;
                            written.0 += 1;
                            written.1 += bytes.len() as u64;
                        }
                    }
                    Job::Checkpoint(snapshot) => {
                        // Everything logged so far, in this transaction or before, was applied
                        // before the snapshot was taken.
                        log.retain(|_, _| false).map_err(|err| err.to_string())?;
                        meta.insert("snapshot", snapshot.as_slice())
                            .map_err(|err| err.to_string())?;
                        checkpoints += 1;
                    }
                }
            }
        }
        txn.commit().map_err(|err| err.to_string())?;
        Ok(checkpoints)
    }
}

fn fail_job(job: Job, err: StorageError) {
    if let Job::Append(_, acks) = job {
        for ack in acks {
            ack(Err(StorageError::Stopped(err.to_string())));
        }
    }
}

/// Opens the data file and rebuilds the replica it holds (an empty one for a new file).
///
/// The storage engine may panic on a damaged file instead of returning an error; that is
/// reported as corruption too.
fn recover(
    path: &Path,
    config: &ReplicaConfig,
) -> Result<(Database, Replica, StorageStats), StorageError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| read_file(path, config)))
        .unwrap_or_else(|panic| {
            let reason = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("the storage engine failed");
            Err(corrupted(path, format!("unreadable: {reason}")))
        })
}

fn read_file(
    path: &Path,
    config: &ReplicaConfig,
) -> Result<(Database, Replica, StorageStats), StorageError> {
    // An existing file is read without being modified first, so a damaged one is refused as it
    // is. Only a file that was not closed cleanly (a crash) must be opened for writing to be
    // repaired before it can be read.
    // A new data directory is one without the file. A file that is there but empty (truncated
    // to nothing, or a stray `touch`) is damage like any other: starting empty from it would
    // silently lose everything the node held.
    let exists = match std::fs::metadata(path) {
        Ok(meta) if meta.len() == 0 => {
            return Err(corrupted(
                path,
                "the file is empty (0 bytes): whatever it held is gone; a new node starts from \
                 a data directory without the file"
                    .into(),
            ));
        }
        Ok(_) => true,
        Err(_) => false,
    };
    let checked = if exists {
        match redb::Builder::new()
            .set_cache_size(PAGE_CACHE_BYTES)
            .open_read_only(path)
        {
            Ok(db) => {
                // A redb file some other program wrote has tables, none of them ours. (One with
                // no table at all is ours, from a start that stopped before its first commit.)
                let bad = |err: &dyn std::fmt::Display| corrupted(path, err.to_string());
                let txn = db.begin_read().map_err(|err| bad(&err))?;
                let tables: Vec<String> = txn
                    .list_tables()
                    .map_err(|err| bad(&err))?
                    .map(|table| redb::TableHandle::name(&table).to_owned())
                    .collect();
                drop(txn);
                if !tables.is_empty() && !tables.iter().any(|name| name == "meta") {
                    let found = tables.join(", ");
                    return Err(corrupted(
                        path,
                        format!(
                            "not a mantissa data file: it holds the tables {found} and no meta"
                        ),
                    ));
                }
                Some(read_state(&db, path, config)?)
            }
            Err(redb::DatabaseError::RepairAborted) => None,
            Err(err) => return Err(open_error(path, err)),
        }
    } else {
        None
    };
    let db = redb::Builder::new()
        .set_cache_size(PAGE_CACHE_BYTES)
        .create(path)
        .map_err(|err| open_error(path, err))?;
    write_format(&db, path)?;
    let (replica, stats) = match checked {
        Some(state) => state,
        None => read_state(&db, path, config)?,
    };
    Ok((db, replica, stats))
}

fn open_error(path: &Path, err: redb::DatabaseError) -> StorageError {
    match err {
        redb::DatabaseError::DatabaseAlreadyOpen | redb::DatabaseError::LockProtocolMismatch => {
            StorageError::Locked {
                path: path.to_path_buf(),
            }
        }
        redb::DatabaseError::Storage(redb::StorageError::Io(io))
            if io.kind() != std::io::ErrorKind::InvalidData =>
        {
            StorageError::Io {
                path: path.to_path_buf(),
                reason: io.to_string(),
            }
        }
        other => corrupted(path, other.to_string()),
    }
}

/// Marks a new file with the data format and creates the tables.
fn write_format(db: &Database, path: &Path) -> Result<(), StorageError> {
    let bad = |err: &dyn std::fmt::Display| corrupted(path, err.to_string());
    let txn = db.begin_write().map_err(|err| bad(&err))?;
    {
        let mut meta = txn.open_table(META).map_err(|err| bad(&err))?;
        if meta.get("format").map_err(|err| bad(&err))?.is_none() {
            meta.insert("format", [FORMAT].as_slice())
                .map_err(|err| bad(&err))?;
        }
        txn.open_table(LOG).map_err(|err| bad(&err))?;
    }
    txn.commit().map_err(|err| bad(&err))
}

/// The replica a file holds: its snapshot with its log replayed (an empty replica for a new
/// file), checking everything.
fn read_state(
    db: &impl ReadableDatabase,
    path: &Path,
    config: &ReplicaConfig,
) -> Result<(Replica, StorageStats), StorageError> {
    let bad = |err: &dyn std::fmt::Display| corrupted(path, err.to_string());
    let mut stats = StorageStats {
        path: path.to_path_buf(),
        ..StorageStats::default()
    };
    let txn = db.begin_read().map_err(|err| bad(&err))?;
    let meta = match txn.open_table(META) {
        Ok(meta) => meta,
        // A file created but never written to.
        Err(redb::TableError::TableDoesNotExist(_)) => {
            return Ok((Replica::with_config(NodeId(0), config.clone()), stats));
        }
        Err(err) => return Err(bad(&err)),
    };
    match meta.get("format").map_err(|err| bad(&err))? {
        Some(format) if format.value() == [FORMAT] => {}
        Some(format) => {
            let format = format.value().to_vec();
            return Err(corrupted(path, format!("unknown data format {format:?}")));
        }
        None => return Err(corrupted(path, "no data format marker".into())),
    }
    let mut replica = match meta.get("snapshot").map_err(|err| bad(&err))? {
        Some(snapshot) => {
            stats.snapshot_bytes = snapshot.value().len() as u64;
            Replica::restore(snapshot.value(), config.clone())
                .map_err(|err| corrupted(path, format!("snapshot: {err}")))?
        }
        // A replica that never wrote: its id is replaced at once by the caller.
        None => Replica::with_config(NodeId(0), config.clone()),
    };
    let log = txn.open_table(LOG).map_err(|err| bad(&err))?;
    for entry in log.iter().map_err(|err| bad(&err))? {
        let (seq, bytes) = entry.map_err(|err| bad(&err))?;
        let bytes = bytes.value();
        stats.log_bytes += bytes.len() as u64;
        let delta = Delta::decode(bytes)
            .map_err(|err| corrupted(path, format!("log entry {}: {err}", seq.value())))?;
        match replica.apply(delta) {
            Ok(_) => stats.replayed += 1,
            // Held back beyond the limits: anti-entropy delivers it again.
            Err(crdt::Error::BufferFull { .. }) => {}
            Err(err) => {
                return Err(corrupted(path, format!("log entry {}: {err}", seq.value())));
            }
        }
    }
    Ok((replica, stats))
}

fn corrupted(path: &Path, reason: String) -> StorageError {
    StorageError::Corrupted {
        path: path.to_path_buf(),
        reason,
    }
}

/// Renames a damaged data file so a new one can be created; never deletes anything.
fn move_aside(path: &Path) -> Result<PathBuf, StorageError> {
    let millis = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_millis());
    let aside = path.with_extension(format!("redb.corrupt-{millis}"));
    std::fs::rename(path, &aside).map_err(|err| StorageError::Io {
        path: path.to_path_buf(),
        reason: format!("cannot move the corrupted file aside: {err}"),
    })?;
    Ok(aside)
}

/// An in-memory [`Store`] for tests: keeps what it is given, and acknowledges at once or, while
/// held, only when released.
#[cfg(test)]
pub(crate) mod memory {
    use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

    use super::{Ack, StorageError, StorageStats, Store};
    use crate::crdt::Delta;

    #[derive(Default)]
    struct State {
        deltas: Vec<Delta>,
        snapshot: Option<Vec<u8>>,
        /// `Some` while acknowledgements are held back.
        held: Option<Vec<(Vec<Delta>, Ack)>>,
        closed: bool,
    }

    /// Cheap to clone; clones share the same contents.
    #[derive(Clone, Default)]
    pub(crate) struct MemoryStore {
        state: Arc<Mutex<State>>,
    }

    impl MemoryStore {
        fn state(&self) -> MutexGuard<'_, State> {
            self.state.lock().unwrap_or_else(PoisonError::into_inner)
        }

        /// From now on, keep batches and their acknowledgements back until [`Self::release`].
        pub(crate) fn hold(&self) {
            self.state().held.get_or_insert_with(Vec::new);
        }

        /// Batches handed over and not yet released.
        pub(crate) fn held(&self) -> usize {
            self.state().held.as_ref().map_or(0, Vec::len)
        }

        /// Makes the held batches durable (`Ok`) or fails them, and stops holding.
        pub(crate) fn release(&self, result: Result<(), String>) {
            let held = self.state().held.take().unwrap_or_default();
            for (deltas, ack) in held {
                if result.is_ok() {
                    self.state().deltas.extend(deltas);
                }
                ack(result.clone().map_err(StorageError::Stopped));
            }
        }

        /// The deltas made durable, in order.
        pub(crate) fn deltas(&self) -> usize {
            self.state().deltas.len()
        }

        /// Whether a snapshot was taken, and the store closed.
        pub(crate) fn checkpointed_and_closed(&self) -> (bool, bool) {
            let state = self.state();
            (state.snapshot.is_some(), state.closed)
        }
    }

    impl Store for MemoryStore {
        fn append(&self, deltas: Vec<Delta>, ack: Ack) {
            let mut state = self.state();
            if let Some(held) = &mut state.held {
                held.push((deltas, ack));
                return;
            }
            state.deltas.extend(deltas);
            drop(state);
            ack(Ok(()));
        }

        fn wants_checkpoint(&self) -> bool {
            false
        }

        fn checkpoint(&self, snapshot: Vec<u8>) {
            let mut state = self.state();
            state.snapshot = Some(snapshot);
            state.deltas.clear();
        }

        fn stats(&self) -> StorageStats {
            StorageStats::default()
        }

        fn close(self: Box<Self>) {
            self.release(Ok(()));
            self.state().closed = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crdt::{Key, Value};

    fn scratch(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("mantissa-storage-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    fn acked(count: &Arc<Mutex<u64>>) -> Ack {
        let count = count.clone();
        Box::new(move |saved| {
            saved.expect("durable");
            *count.lock().expect("lock") += 1;
        })
    }

    fn open(dir: &Path, node: u64) -> (Storage, Replica) {
        Storage::open(
            &StorageConfig::new(dir),
            ReplicaConfig::default(),
            NodeId(node),
        )
        .expect("open")
    }

    #[test]
    fn the_log_is_replayed_after_a_stop_without_snapshot() {
        let dir = scratch("replay");
        let (storage, mut replica) = open(&dir, 1);
        let acks = Arc::new(Mutex::new(0));
        for i in 0..50u64 {
            let key = Key::new(format!("k{i}")).expect("key");
            let delta = replica.put(key, i.to_le_bytes().to_vec(), i).expect("put");
            storage.append(vec![delta], vec![acked(&acks)]);
        }
        storage.close();
        assert_eq!(*acks.lock().expect("lock"), 50, "every write acknowledged");

        let (storage, replica) = open(&dir, 2);
        assert_eq!(storage.stats().replayed, 50);
        assert_eq!(replica.node(), NodeId(2));
        assert_eq!(replica.version().get(NodeId(1)), 50);
        let key = Key::new("k49").expect("key");
        let Some(Value::Register(register)) = replica.get(&key).expect("get") else {
            panic!("k49 lost");
        };
        assert_eq!(register.value, 49u64.to_le_bytes());
        assert!(
            replica.cursor() >= CURSOR_GAP,
            "cursors of the previous process are never reused"
        );
        storage.close();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_checkpoint_replaces_the_log_it_covers() {
        let dir = scratch("checkpoint");
        let (storage, mut replica) = open(&dir, 1);
        let acks = Arc::new(Mutex::new(0));
        let first = replica
            .put(Key::new("a").expect("key"), b"1".to_vec(), 1)
            .expect("put");
        storage.append(vec![first], vec![acked(&acks)]);
        storage.checkpoint(replica.snapshot());
        let second = replica
            .put(Key::new("b").expect("key"), b"2".to_vec(), 2)
            .expect("put");
        storage.append(vec![second], vec![acked(&acks)]);
        storage.close();

        let (storage, replica) = open(&dir, 2);
        let stats = storage.stats();
        assert_eq!(
            stats.replayed, 1,
            "only the write after the snapshot is in the log"
        );
        assert!(stats.snapshot_bytes > 0);
        for key in ["a", "b"] {
            assert!(
                replica
                    .get(&Key::new(key).expect("key"))
                    .expect("get")
                    .is_some()
            );
        }
        storage.close();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_second_opener_is_told_the_file_is_in_use() {
        let dir = scratch("locked");
        let (storage, _) = open(&dir, 1);
        let second = Storage::open(
            &StorageConfig::new(&dir),
            ReplicaConfig::default(),
            NodeId(2),
        );
        assert!(
            matches!(second, Err(StorageError::Locked { .. })),
            "{:?}",
            second.err()
        );
        storage.close();
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Opens the data file in `dir` after `damage` wrote it, without and then with
    /// `discard_corrupt`: refused first, moved aside second.
    fn refused_then_moved_aside(name: &str, damage: impl FnOnce(&Path)) -> String {
        let dir = scratch(name);
        std::fs::create_dir_all(&dir).expect("create the directory");
        damage(&dir.join(DATA_FILE));
        let refused = Storage::open(
            &StorageConfig::new(&dir),
            ReplicaConfig::default(),
            NodeId(1),
        );
        let Err(StorageError::Corrupted { reason, .. }) = refused else {
            panic!("{name}: expected Corrupted, got {:?}", refused.map(|_| ()));
        };
        let mut config = StorageConfig::new(&dir);
        config.discard_corrupt = true;
        let (storage, _) =
            Storage::open(&config, ReplicaConfig::default(), NodeId(1)).expect("moved aside");
        storage.close();
        let _ = std::fs::remove_dir_all(&dir);
        reason
    }

    #[test]
    fn an_empty_data_file_is_refused_like_other_damage() {
        let reason = refused_then_moved_aside("empty", |file| {
            std::fs::write(file, b"").expect("write");
        });
        assert!(reason.contains("empty"), "{reason}");
    }

    #[test]
    fn a_foreign_file_is_refused_like_other_damage() {
        refused_then_moved_aside("foreign-bytes", |file| {
            std::fs::write(file, b"# not a database\n".repeat(500)).expect("write");
        });
        let reason = refused_then_moved_aside("foreign-redb", |file| {
            let db = Database::create(file).expect("create");
            let txn = db.begin_write().expect("begin");
            let table: TableDefinition<&str, &str> = TableDefinition::new("accounts");
            txn.open_table(table)
                .expect("open")
                .insert("alice", "10")
                .expect("insert");
            txn.commit().expect("commit");
        });
        assert!(reason.contains("not a mantissa data file"), "{reason}");
    }
}
