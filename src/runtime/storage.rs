//! Durable storage of a node's replica in one redb file: a snapshot plus a log of the deltas
//! applied since, written by a dedicated thread with group commit.

use std::path::PathBuf;
use std::time::Duration;

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
}

/// Why the data file could not be opened, read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StorageError {
    /// The data file exists but its content is damaged or not a mantissa data file.
    #[error(
        "data file {path} is corrupted or unreadable ({reason}); nothing was changed. Restore it from a backup, or start with --discard-corrupt-data to move it aside and re-sync from peers"
    )]
    Corrupted { path: PathBuf, reason: String },
    /// Another process holds the data file.
    #[error("data file {path} is in use by another process")]
    Locked { path: PathBuf },
    /// The file system refused an operation.
    #[error("data file {path}: {reason}")]
    Io { path: PathBuf, reason: String },
    /// The storage thread has stopped after an earlier failure.
    #[error("storage has stopped after an earlier failure: {0}")]
    Stopped(String),
}
