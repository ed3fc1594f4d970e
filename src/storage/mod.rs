//! Durability: the operation log (where a byte hits disk first), snapshots, and start-up recovery.
//!
//! Start-up loads every snapshot, replays the log records newer than each snapshot, and imports
//! NunDB data files found in the data dir. The snapshotter thread periodically (or when the log
//! grows past its limit) rolls the log, writes changed databases and drops the covered segments.

pub mod backlog;
pub mod oplog;
pub mod record;
pub mod s3;
pub mod segment;
pub mod snapshot;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use crate::db::Databases;
use crate::metrics::STATS;
use crate::protocol::Strategy;
use oplog::{FsyncPolicy, OpLog};
use s3::{Place, Remote, S3Config};

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
    /// Where snapshots are loaded from at start-up (NUN_STORAGE_READ_STRATEGY).
    pub read: Place,
    /// Where snapshots are written (NUN_STORAGE_WRITE_STRATEGY).
    pub write: Place,
    /// The bucket, when either place is S3.
    pub s3: S3Config,
}

/// The storage engine of one node.
#[derive(Debug)]
pub struct Storage {
    config: StorageConfig,
    /// Holds the data directory's lock for as long as this node runs.
    _dir_lock: std::fs::File,
    log: Arc<OpLog>,
    snapshot_lock: Mutex<()>,
    /// The bucket, when snapshots are read from or written to S3.
    remote: Option<Remote>,
}

/// Entries copied per lock acquisition while snapshotting.
const SNAPSHOT_CHUNK: usize = 4096;

/// Locks the data directory (its `LOCK` file) for this process: two nodes appending to one log
/// would corrupt it, and one cutting the other's reserved log space at start-up would crash it.
fn lock_dir(dir: &Path) -> Result<std::fs::File, String> {
    let path = dir.join("LOCK");
    let err = |e: io::Error| format!("cannot lock data directory {}: {e}", dir.display());
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(err)?;
    if !crate::os::try_lock_exclusive(&file).map_err(err)? {
        return Err(format!(
            "data directory {} is in use by another nun-db process (it holds {}); give each node its own --dbs-dir",
            dir.display(),
            path.display()
        ));
    }
    Ok(file)
}

fn log_dir(dir: &Path) -> PathBuf {
    dir.join("oplog")
}

/// The file naming where the snapshots went that let the log drop its older segments, and the
/// first LSN the log kept: `<lsn> <place>`.
fn covered_path(dir: &Path) -> PathBuf {
    log_dir(dir).join("covered")
}

/// Where snapshots go or come from, as the covered file names it: `disk` or `s3://bucket/prefix`.
fn place_name(place: Place, s3: &S3Config, prefix: &str) -> String {
    if place.is_s3() {
        format!("s3://{}/{}", s3.bucket, prefix)
    } else {
        "disk".to_string()
    }
}

/// Refuses a start whose snapshots (covering the log up to `floor`) end before the log begins,
/// because the snapshots that covered the dropped segments were written somewhere this start
/// does not read (snapshots went to a bucket, and this start reads the data directory, say).
fn check_covered(config: &StorageConfig, floor: u64) -> Result<(), String> {
    let path = covered_path(&config.dir);
    let Ok(text) = std::fs::read_to_string(&path) else {
        return Ok(());
    };
    let Some((first, written_to)) = text
        .trim()
        .split_once(' ')
        .and_then(|(lsn, place)| Some((lsn.parse::<u64>().ok()?, place)))
    else {
        return Err(format!(
            "{} is not `<lsn> <place>`; refusing to start (move it away to start without the check)",
            path.display()
        ));
    };
    let reading = place_name(config.read, &config.s3, &config.s3.read_prefix);
    if written_to == reading || floor.saturating_add(1) >= first {
        return Ok(());
    }
    Err(format!(
        "the operation log in {} starts at LSN {first}: the changes before it are in the snapshots at {written_to}, \
         but this start reads snapshots from {reading}, which cover only up to LSN {floor}. Starting would lose \
         those changes; refusing to start. Read the snapshots from {written_to} (NUN_STORAGE_READ_STRATEGY and the \
         NUN_S3_* settings), or move {} away to start anyway",
        log_dir(&config.dir).display(),
        path.display()
    ))
}

/// Where a new version of `path` is written before it is renamed over it.
fn tmp_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".tmp");
    PathBuf::from(s)
}

/// Replaces `path` with `text` so that a crash leaves the old or the new contents, never a
/// mix: a temporary file, fsynced, renamed over it, and the directory fsynced.
pub fn write_durably(path: &Path, text: &str) -> io::Result<()> {
    let tmp = tmp_path(path);
    std::fs::write(&tmp, text)?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, path)?;
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => oplog::sync_dir(dir),
        _ => Ok(()),
    }
}

impl Storage {
    /// Recovers `dbs` from `config.dir` (snapshots, then log tail) and attaches the log to it.
    pub fn open(config: StorageConfig, dbs: &Databases) -> Result<Arc<Storage>, String> {
        std::fs::create_dir_all(&config.dir)
            .map_err(|e| format!("cannot create data directory {}: {e}", config.dir.display()))?;
        let dir_lock = lock_dir(&config.dir)?;
        let started = Instant::now();
        let remote = if config.read.is_s3() || config.write.is_s3() {
            Some(Remote::connect(config.s3.clone(), config.write)?)
        } else {
            None
        };
        let (loaded, floor, imported) = match (&remote, config.read.is_s3()) {
            (Some(remote), true) => Self::load_from_bucket(remote, &config, dbs)?,
            _ => Self::load_from_disk(&config, dbs)?,
        };
        check_covered(&config, floor)?;
        let mut replayed = 0u64;
        let log = OpLog::open(&log_dir(&config.dir), config.fsync, floor, &mut |record| {
            dbs.apply_record(record.viewed());
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
            _dir_lock: dir_lock,
            log,
            snapshot_lock: Mutex::new(()),
            remote,
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

    /// Loads the snapshots in the data directory (and imports NunDB files found there).
    /// Returns (snapshots loaded, highest LSN covered, imported database names).
    fn load_from_disk(
        config: &StorageConfig,
        dbs: &Databases,
    ) -> Result<(usize, u64, Vec<String>), String> {
        let mut current: Option<std::sync::Arc<crate::db::Database>> = None;
        let snapshots = snapshot::load_all(&config.dir, &mut |info, chunk| match &current {
            Some(db) if db.name() == info.name => db.load(chunk, info.lsn),
            _ => {
                dbs.insert_loaded(&info.name, info.strategy, chunk, info.lsn);
                current = dbs.get(&info.name);
            }
        })?;
        let imported = snapshots
            .iter()
            .filter(|s| s.imported)
            .map(|s| s.name.clone())
            .collect();
        let floor = snapshots.iter().map(|s| s.lsn).max().unwrap_or(0);
        Ok((snapshots.len(), floor, imported))
    }

    /// Loads every database of the bucket (its newest snapshot, or NunDB's objects) and says
    /// so in one log line. NunDB's objects do not record a strategy: the data directory's NunDB
    /// metadata is used when present, else `none`.
    fn load_from_bucket(
        remote: &Remote,
        config: &StorageConfig,
        dbs: &Databases,
    ) -> Result<(usize, u64, Vec<String>), String> {
        let started = Instant::now();
        let found = remote.load_all()?;
        let mut imported = Vec::new();
        let mut keys = 0;
        let mut sources = Vec::new();
        for db in &found {
            let strategy = db.strategy.unwrap_or_else(|| {
                snapshot::local_strategy(&config.dir, &db.name).unwrap_or_else(|| {
                    log::warn!(
                        "database {} from {}: no strategy recorded, using none",
                        db.name,
                        db.source
                    );
                    Strategy::None
                })
            });
            keys += db.entries.len();
            sources.push(db.source.clone());
            dbs.insert_loaded(&db.name, strategy, db.entries.clone(), db.lsn);
            if db.imported {
                imported.push(db.name.clone());
            }
        }
        log::info!(
            "restored {} databases, {keys} keys from s3://{}/{} in {:?}: {}",
            found.len(),
            config.s3.bucket,
            config.s3.read_prefix,
            started.elapsed(),
            if sources.is_empty() {
                "nothing there yet".to_string()
            } else {
                sources.join(", ")
            }
        );
        let floor = found.iter().map(|d| d.lsn).max().unwrap_or(0);
        Ok((found.len(), floor, imported))
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
            match &self.remote {
                Some(remote) if self.config.write.is_s3() => {
                    let entries: Vec<_> = chunks.flatten().collect();
                    match remote.write_snapshot(db.name(), db.strategy(), lsn, &entries) {
                        Ok(bytes) => {
                            STATS.s3_uploaded_bytes.fetch_add(bytes, Ordering::Relaxed);
                        }
                        Err(e) => {
                            STATS.s3_failures.fetch_add(1, Ordering::Relaxed);
                            // The log is kept: nothing past the last snapshot in the bucket
                            // may be dropped.
                            return Err(io::Error::other(e.to_string()));
                        }
                    }
                }
                _ => {
                    snapshot::write_chunks(&self.config.dir, db.name(), db.strategy(), lsn, chunks)?
                }
            }
            db.mark_snapshotted(lsn);
            written += 1;
        }
        let live = dbs.names();
        match &self.remote {
            Some(remote) if self.config.write.is_s3() => {
                let stored = remote
                    .stored_dbs()
                    .map_err(|e| io::Error::other(e.to_string()))?;
                for name in stored {
                    if !live.contains(&name) {
                        remote
                            .remove_db(&name)
                            .map_err(|e| io::Error::other(e.to_string()))?;
                    }
                }
            }
            _ => {
                for name in snapshot::stored_names(&self.config.dir)? {
                    if !live.contains(&name) {
                        snapshot::remove(&self.config.dir, &name)?;
                    }
                }
            }
        }
        // Said before the segments go: a start that reads older snapshots than these is refused.
        let place = place_name(self.config.write, &self.config.s3, &self.config.s3.prefix);
        write_durably(
            &covered_path(&self.config.dir),
            &format!("{boundary} {place}\n"),
        )?;
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
                // After a failed snapshot (the bucket down), the next try waits 1, 2, 4... s.
                let mut failures = 0u32;
                let mut retry_at = Instant::now();
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
                    if (due || full) && Instant::now() >= retry_at {
                        match storage.snapshot(&dbs) {
                            Ok(_) => {
                                if failures > 0 {
                                    log::info!("snapshot stored again after {failures} failed tries");
                                }
                                failures = 0;
                            }
                            Err(e) => {
                                failures += 1;
                                let wait = Duration::from_secs(1 << failures.min(6))
                                    .min(storage.config.snapshot_interval);
                                log::error!(
                                    "snapshot failed ({failures} in a row): {e}; the log is kept, retrying in {wait:?}"
                                );
                                retry_at = Instant::now() + wait;
                            }
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

    /// Before a graceful stop: flushes the log and, when snapshots go to a bucket, stores the
    /// changes made since the last one there.
    pub fn shutdown(&self, dbs: &Databases) -> io::Result<()> {
        self.flush()?;
        if self.config.write.is_s3() {
            let stored = self.snapshot(dbs)?;
            log::info!("stopping: {stored} changed databases stored in the bucket");
        }
        Ok(())
    }
}
