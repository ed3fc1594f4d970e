//! Durability: the operation log (where a byte hits disk first), snapshots, and start-up recovery.
//!
//! Start-up loads every snapshot, replays the log records newer than each snapshot, and imports
//! NunDB data files found in the data dir. The snapshotter thread periodically (or when the log
//! grows past its limit) rolls the log, writes changed databases and drops the covered segments.

pub mod oplog;
pub mod record;
pub mod snapshot;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use crate::db::Databases;
use oplog::{FsyncPolicy, OpLog};

/// Storage settings.
#[derive(Debug, Clone)]
pub struct StorageConfig {
    /// Data directory.
    pub dir: PathBuf,
    /// fsync policy of the log.
    pub fsync: FsyncPolicy,
    /// Seconds between periodic snapshots of changed databases.
    pub snapshot_interval: Duration,
    /// Log size (bytes) that triggers an early snapshot.
    pub max_log_size: u64,
}

/// The storage engine of one node.
#[derive(Debug)]
pub struct Storage {
    config: StorageConfig,
    log: Arc<OpLog>,
    snapshot_lock: Mutex<()>,
}

/// Entries copied per lock acquisition while snapshotting.
const SNAPSHOT_CHUNK: usize = 4096;

fn log_dir(dir: &Path) -> PathBuf {
    dir.join("oplog")
}

impl Storage {
    /// Recovers `dbs` from `config.dir` (snapshots, then log tail) and attaches the log to it.
    pub fn open(config: StorageConfig, dbs: &Databases) -> Result<Arc<Storage>, String> {
        std::fs::create_dir_all(&config.dir)
            .map_err(|e| format!("cannot create data directory {}: {e}", config.dir.display()))?;
        let started = Instant::now();
        let mut current: Option<std::sync::Arc<crate::db::Database>> = None;
        let snapshots = snapshot::load_all(&config.dir, &mut |info, chunk| match &current {
            Some(db) if db.name() == info.name => db.load(chunk, info.lsn),
            _ => {
                dbs.insert_loaded(&info.name, info.strategy, chunk, info.lsn);
                current = dbs.get(&info.name);
            }
        })?;
        let imported: Vec<String> = snapshots
            .iter()
            .filter(|s| s.imported)
            .map(|s| s.name.clone())
            .collect();
        let loaded = snapshots.len();
        let floor = snapshots.iter().map(|s| s.lsn).max().unwrap_or(0);
        let mut replayed = 0u64;
        let log = OpLog::open(&log_dir(&config.dir), config.fsync, floor, &mut |record| {
            dbs.apply_record(&record);
            replayed += 1;
            Ok(())
        })?;
        let log = Arc::new(log);
        dbs.attach_log(Arc::clone(&log));
        log::info!(
            "storage: {loaded} snapshots and {replayed} log records recovered from {} in {:?} (last LSN {})",
            config.dir.display(),
            started.elapsed(),
            log.last_lsn()
        );
        let storage = Arc::new(Storage {
            config,
            log,
            snapshot_lock: Mutex::new(()),
        });
        if !imported.is_empty() {
            for name in &imported {
                if let Some(db) = dbs.get(name) {
                    db.mark_unsnapshotted();
                }
            }
            storage
                .snapshot(dbs)
                .map_err(|e| format!("cannot write imported NunDB databases: {e}"))?;
        }
        Ok(storage)
    }

    /// The operation log.
    pub fn log(&self) -> &Arc<OpLog> {
        &self.log
    }

    /// Waits until `lsn` is durable per the fsync policy (no-op for 0).
    pub fn wait_durable(&self, lsn: u64) -> io::Result<()> {
        if lsn == 0 {
            return Ok(());
        }
        self.log.wait_durable(lsn)
    }

    /// Writes a snapshot of every changed database, removes files of deleted ones and drops the
    /// log segments the snapshots cover. Returns how many databases were written.
    pub fn snapshot(&self, dbs: &Databases) -> io::Result<usize> {
        let _guard = self.snapshot_lock.lock().unwrap_or_else(|e| e.into_inner());
        let started = Instant::now();
        // A replica may have logged records it has not applied yet: the snapshot cannot
        // cover them, so their segments stay (the mark is read after the roll, and is set
        // before such records are appended).
        let boundary = self.log.roll()?;
        let boundary = dbs
            .unapplied_from()
            .map_or(boundary, |from| boundary.min(from));
        let mut written = 0;
        for db in dbs.all() {
            let (changed, lsn) = db.snapshot_point();
            if !changed {
                continue;
            }
            // Fuzzy snapshot: entries are copied chunk by chunk after reading the LSN; any
            // entry newer than it is rewritten identically by replaying the log after it.
            let mut after: Option<String> = None;
            let chunks = std::iter::from_fn(|| {
                let chunk = db.copy_chunk(after.as_deref(), SNAPSHOT_CHUNK);
                after = chunk.last().map(|(k, _)| k.clone());
                (!chunk.is_empty()).then_some(chunk)
            });
            snapshot::write_chunks(&self.config.dir, db.name(), db.strategy(), lsn, chunks)?;
            db.mark_snapshotted(lsn);
            written += 1;
        }
        let live = dbs.names();
        for name in snapshot::stored_names(&self.config.dir)? {
            if !live.contains(&name) {
                snapshot::remove(&self.config.dir, &name)?;
            }
        }
        self.log.drop_before(boundary)?;
        crate::metrics::STATS
            .snapshot_time
            .observe(0, started.elapsed());
        if written > 0 {
            log::info!(
                "snapshot: {written} databases written in {:?}",
                started.elapsed()
            );
        }
        Ok(written)
    }

    /// Starts the snapshotter thread: snapshots changed databases every interval, or sooner when
    /// the log exceeds its size limit. Stops when the databases are dropped.
    pub fn start_snapshotter(self: &Arc<Self>, dbs: Weak<Databases>) -> io::Result<()> {
        let storage = Arc::clone(self);
        std::thread::Builder::new()
            .name("snapshotter".into())
            .spawn(move || {
                let mut last = Instant::now();
                let mut last_sync = Instant::now();
                loop {
                    std::thread::sleep(Duration::from_millis(200));
                    let Some(dbs) = dbs.upgrade() else { return };
                    let result = if storage.log.policy() == FsyncPolicy::EverySec
                        && last_sync.elapsed() >= Duration::from_secs(1)
                    {
                        last_sync = Instant::now();
                        storage.log.sync_now()
                    } else {
                        storage.log.write_now()
                    };
                    if let Err(e) = result {
                        log::error!("flushing the operation log failed: {e}");
                    }
                    let due = last.elapsed() >= storage.config.snapshot_interval;
                    let full = storage.log.size() > storage.config.max_log_size;
                    if due || full {
                        if let Err(e) = storage.snapshot(&dbs) {
                            log::error!("snapshot failed: {e}");
                        }
                        last = Instant::now();
                    }
                }
            })?;
        Ok(())
    }

    /// Flushes the log to disk (used on shutdown).
    pub fn flush(&self) -> io::Result<()> {
        self.log.sync_now()
    }
}
