//! One database: its keys with values and versions, the sessions watching them, and its arbiters.
//! Every change happens under the write lock of the key's shard and its notifications are
//! queued before the lock is released, so each watcher sees a key's versions in order, without
//! gaps.

use std::collections::{HashMap, VecDeque};
use std::ops::{Bound, Not};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use super::key::Key;
use super::outbox::{Outbox, Push};
use super::shards::{self, Map, Shards};
use crate::packed::Shared;
use crate::protocol::Strategy;
use crate::storage::oplog::OpLog;
use crate::storage::record::{Op, RecordRef, Viewed};

/// The key holding the number of sessions using the database.
pub const CONNECTIONS_KEY: &str = "$connections";
/// The key holding the database's (hashed) token.
pub const TOKEN_KEY: &str = "$$token";

/// Prefix of the version floors that stand in for expired tombstones. A removed key keeps a
/// tombstone (its exact version, so a key recreated soon after continues without a gap) until
/// the tombstone retention has passed; then the tombstone goes and raises the floor of the
/// bucket its name hashes into, and a key created later in that bucket starts above it, so
/// versions never go back for watchers and `set-safe`.
pub const FLOOR_PREFIX: &str = "$$version-floor/";
/// How many version floors a database has at most.
pub(super) const FLOOR_BUCKETS: u64 = 64;

/// The floor entry that `key`'s versions must stay above (the one of its [`shards::bucket`]).
fn floor_key(key: &str) -> &'static str {
    static KEYS: OnceLock<Vec<String>> = OnceLock::new();
    let keys = KEYS.get_or_init(|| {
        (0..FLOOR_BUCKETS)
            .map(|b| format!("{FLOOR_PREFIX}{b:02}"))
            .collect()
    });
    &keys[shards::bucket(key)]
}

/// True for the reserved version-floor keys (never written by clients, never listed).
pub fn is_floor_key(key: &str) -> bool {
    key.starts_with(FLOOR_PREFIX)
}

/// Raises floor entry `floor` to at least `version`.
fn raise_floor(data: &mut Map, floor: &str, version: i32) {
    match data.get_mut(floor) {
        Some(e) => e.version = e.version.max(version),
        None => {
            data.insert(Key::from(floor), Entry::removed(version));
        }
    }
}

/// Puts a snapshot or full-sync entry into its shard of `data`, adding a tombstone to
/// `tombstones` (whose retention then starts). Returns how the number of live keys changed.
fn insert_loaded(
    data: &mut [RwLockWriteGuard<'_, Map>],
    key: String,
    entry: Entry,
    tombstones: &mut Vec<(String, i32)>,
) -> i64 {
    let data = &mut *data[shards::index(&key)];
    if key == CONNECTIONS_KEY {
        return 0;
    }
    if is_floor_key(&key) {
        raise_floor(data, &key, entry.version);
        return 0;
    }
    let now_live = !entry.deleted;
    if entry.deleted {
        tombstones.push((key.clone(), entry.version));
    }
    let was_live = data
        .insert(Key::from(key), entry)
        .is_some_and(|old| !old.deleted);
    i64::from(now_live) - i64::from(was_live)
}

/// A stored value. A removed key stays as a tombstone until the tombstone retention has passed,
/// then leaves only a raised version floor (see `FLOOR_PREFIX`); the floors themselves are
/// stored as removed entries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The value text (shared, so snapshots copy a pointer, not the bytes).
    pub value: Arc<str>,
    /// The key's version (incremented by every change).
    pub version: i32,
    /// True for a removed key.
    pub deleted: bool,
}

impl Entry {
    /// A live entry.
    pub fn live(value: &str, version: i32) -> Entry {
        Entry {
            value: Arc::from(value),
            version,
            deleted: false,
        }
    }

    /// A tombstone: the key was removed at `version`.
    pub fn removed(version: i32) -> Entry {
        static EMPTY: OnceLock<Arc<str>> = OnceLock::new();
        Entry {
            // Shared: a burst of removals allocates no value.
            value: Arc::clone(EMPTY.get_or_init(|| Arc::from(""))),
            version,
            deleted: true,
        }
    }
}

/// The result of a successful write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Written {
    /// The key's new version.
    pub version: i32,
    /// The log record's LSN to wait on before acknowledging (0 if none was written).
    pub lsn: u64,
}

/// A change requested by a write command.
#[derive(Debug, Clone, Copy)]
pub enum WriteOp<'a> {
    /// Plain `set`: always wins.
    Set(&'a str),
    /// `set-safe` with the client's version.
    SetSafe(i32, &'a str),
    /// `increment` by n.
    Increment(i64),
    /// `remove`.
    Remove,
}

/// Why a write was refused; `Display` gives the exact client-facing message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteError {
    /// Stale `set-safe` under the `none` strategy.
    InvalidVersion,
    /// `increment` of a non-numeric value.
    NotNumeric,
    /// Stale `set-safe` under `arbiter` with no arbiter connected.
    NoArbiter,
    /// The write became conflict `record`, queued for the arbiters (logged as `lsn`).
    Unresolved {
        /// The conflict's record key, `$conflicts_<key>_<opp_id>`.
        record: String,
        /// LSN of the conflict record, durable before the writer hears about it.
        lsn: u64,
    },
    /// `resolve` of a conflict that does not exist.
    NoConflict(String),
    /// The operation log could not be written; nothing was changed.
    Storage(String),
    /// The key's version cannot grow any more.
    VersionOverflow,
    /// The key is one of the database's own (a version floor).
    Reserved,
}

impl std::fmt::Display for WriteError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WriteError::InvalidVersion => f.write_str("Invalid version!"),
            WriteError::NotNumeric => f.write_str("Key is not numeric"),
            WriteError::NoArbiter => {
                f.write_str("An conflitct happend and there is no arbiter client not connected")
            }
            WriteError::Unresolved { record, .. } => write!(f, "$$conflitct unresolved {record}"),
            WriteError::NoConflict(opp) => write!(f, "No pending conflict {opp}"),
            WriteError::Storage(e) => write!(f, "Storage error: {e}"),
            WriteError::VersionOverflow => f.write_str("Key version overflow"),
            WriteError::Reserved => f.write_str("Key is reserved"),
        }
    }
}

/// A database.
#[derive(Debug)]
pub struct Database {
    name: String,
    /// The conflict strategy's [`Strategy::code`] (read by every write: no lock to share).
    strategy: AtomicU8,
    /// Keys in order in each shard (sorted `keys` through a merge, no over-allocated hash
    /// table).
    pub(super) data: Shards,
    /// Per key, the sessions watching it by outbox id (O(1) watch and unwatch at any scale).
    watchers: Mutex<HashMap<String, HashMap<u64, Shared<Outbox>>>>,
    /// Keys in `watchers`, kept under its lock: a write to a database nobody watches does not
    /// take that lock.
    watched: AtomicUsize,
    pub(super) arbiters: Mutex<Vec<Shared<Outbox>>>,
    /// When each conflict record was seen resolved here (for the retention sweep).
    pub(super) resolved_at: Mutex<HashMap<String, Instant>>,
    /// Tombstones in the order they were made: when, which key, at which version.
    tombstones: Mutex<VecDeque<(Instant, Box<str>, i32)>>,
    dropped: AtomicBool,
    log: OnceLock<Arc<OpLog>>,
    last_lsn: AtomicU64,
    force_snapshot: AtomicBool,
    snapshot_lsn: AtomicU64,
    /// Bumped whenever a `$$` key (token, users, permissions) changes: sessions re-read their
    /// permissions when it moves.
    security_version: AtomicU64,
    /// Live keys (kept up to date under the data lock, so counting them costs nothing).
    live: AtomicU64,
    /// Bumped when a full sync replaces the contents: LSNs read before it belong to a history
    /// this node dropped.
    generation: AtomicU64,
}

/// Reads a lock even if a panicking thread poisoned it (the data itself is always consistent:
/// every change is a single map insert).
pub(super) fn read<T>(lock: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|e| e.into_inner())
}

pub(super) fn write<T>(lock: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(|e| e.into_inner())
}

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Database {
    /// An empty database with its `$connections` counter at 0 (in memory only).
    pub fn new(name: &str, strategy: Strategy) -> Database {
        Database::with_log(name, strategy, None)
    }

    /// An empty database whose changes are appended to `log`.
    pub fn with_log(name: &str, strategy: Strategy, log: Option<Arc<OpLog>>) -> Database {
        let data = Shards::default();
        write(data.of(CONNECTIONS_KEY)).insert(Key::from(CONNECTIONS_KEY), Entry::live("0", 0));
        Database {
            name: name.to_string(),
            strategy: AtomicU8::new(strategy_code(strategy)),
            data,
            watchers: Mutex::new(HashMap::new()),
            watched: AtomicUsize::new(0),
            arbiters: Mutex::new(Vec::new()),
            resolved_at: Mutex::new(HashMap::new()),
            tombstones: Mutex::new(VecDeque::new()),
            dropped: AtomicBool::new(false),
            log: log.map(OnceLock::from).unwrap_or_default(),
            last_lsn: AtomicU64::new(0),
            force_snapshot: AtomicBool::new(false),
            snapshot_lsn: AtomicU64::new(0),
            security_version: AtomicU64::new(0),
            live: AtomicU64::new(1),
            generation: AtomicU64::new(0),
        }
    }

    /// The database name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The conflict strategy.
    pub fn strategy(&self) -> Strategy {
        Strategy::from_code(i32::from(self.strategy.load(Ordering::Acquire)))
            .unwrap_or(Strategy::None)
    }

    /// Marks the database deleted; sessions still holding it get `no-db-selected`.
    pub fn mark_dropped(&self) {
        self.dropped.store(true, Ordering::Release);
    }

    /// True after `delete-db`.
    pub fn is_dropped(&self) -> bool {
        self.dropped.load(Ordering::Acquire)
    }

    /// Changes whenever a `$$` key (token, users, permissions) is written, loaded or replaced.
    pub fn security_version(&self) -> u64 {
        self.security_version.load(Ordering::Acquire)
    }

    fn security_changed(&self) {
        self.security_version.fetch_add(1, Ordering::AcqRel);
    }

    /// The live value and version of `key`.
    pub fn get(&self, key: &str) -> Option<(String, i32)> {
        self.get_with(key, |value, version| (value.to_string(), version))
    }

    /// Calls `f` with the live value and version of `key` under the read lock (no copy of the
    /// value is made unless `f` makes one).
    pub fn get_with<T>(&self, key: &str, f: impl FnOnce(&str, i32) -> T) -> Option<T> {
        read(self.data.of(key))
            .get(key)
            .filter(|e| !e.deleted)
            .map(|e| f(&e.value, e.version))
    }

    /// Sorted live keys matching `filter`.
    pub fn keys(&self, filter: impl Fn(&str) -> bool) -> Vec<String> {
        let data = self.data.read_all();
        shards::merged(&data, Bound::Unbounded)
            .filter(|(k, e)| !e.deleted && filter(k))
            .map(|(k, _)| k.to_string())
            .collect()
    }

    /// Number of live keys.
    pub fn len(&self) -> usize {
        self.live.load(Ordering::Relaxed) as usize
    }

    /// Recounts the live keys after the map was filled wholesale (load, full sync).
    fn recount(&self, data: &[RwLockWriteGuard<'_, Map>]) {
        let live = data
            .iter()
            .flat_map(|shard| shard.values())
            .filter(|e| !e.deleted)
            .count() as u64;
        self.live.store(live, Ordering::Relaxed);
    }

    /// Number of stored entries, version floors included (what the map holds in memory).
    pub fn stored_entries(&self) -> usize {
        self.data.read_all().iter().map(|shard| shard.len()).sum()
    }

    /// True when the database holds no live key.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Applies a write: computes the new entry, appends it to the operation log (if any), stores
    /// it and notifies watchers, all under the lock of the key's shard. Returns the new version
    /// and the LSN to wait on before acknowledging (0 when nothing was logged).
    pub fn write(&self, key: &str, op: WriteOp<'_>) -> Result<Written, WriteError> {
        let mut data = write(self.data.of(key));
        self.write_locked(&mut data, key, op)
    }

    /// [`Database::write`] with the lock of the key's shard already held (`data` is that shard).
    pub(super) fn write_locked(
        &self,
        data: &mut Map,
        key: &str,
        op: WriteOp<'_>,
    ) -> Result<Written, WriteError> {
        if is_floor_key(key) {
            return Err(WriteError::Reserved);
        }
        // An existing key is found once and replaced in place (the map is searched once per
        // write, not twice), unless the write removes a conflict record, which leaves the map.
        if let Some(slot) = data.get_mut(key) {
            let live = (!slot.deleted).then_some(&*slot);
            let Some(entry) = self.next_entry(op, live, Some(slot.version))? else {
                return Ok(Written {
                    version: slot.version,
                    lsn: 0,
                });
            };
            let lsn = self.log_entry(key, &entry)?;
            let version = entry.version;
            if entry.deleted && key.starts_with(super::conflicts::CONFLICTS_PREFIX) {
                self.store(data, key, entry, lsn);
            } else {
                self.announce(key, &entry, lsn);
                let now_live = !entry.deleted;
                let was_live = !std::mem::replace(slot, entry).deleted;
                self.count_live(was_live, now_live);
            }
            return Ok(Written { version, lsn });
        }
        let floor = data.get(floor_key(key)).map(|e| e.version);
        let Some(entry) = self.next_entry(op, None, floor)? else {
            return Ok(Written {
                version: floor.unwrap_or(-1),
                lsn: 0,
            });
        };
        let lsn = self.log_entry(key, &entry)?;
        let version = entry.version;
        self.store(data, key, entry, lsn);
        Ok(Written { version, lsn })
    }

    /// The entry `op` makes of the key's current `live` entry, the key's last version being
    /// `floor` (its own, or its floor's when absent). None: nothing to write (removing an
    /// absent key).
    fn next_entry(
        &self,
        op: WriteOp<'_>,
        live: Option<&Entry>,
        floor: Option<i32>,
    ) -> Result<Option<Entry>, WriteError> {
        let entry = match op {
            WriteOp::Set(value) => Entry::live(value, next_version(floor, -1)?),
            // -1 is plain `set`'s request version: the JS driver's `setValue` sends
            // `set-safe <key> -1 <value>` and expects it to win like `set`.
            WriteOp::SetSafe(-1, value) => Entry::live(value, next_version(floor, -1)?),
            WriteOp::SetSafe(requested, value) => match live {
                Some(e) if requested < e.version => match self.strategy() {
                    Strategy::None => return Err(WriteError::InvalidVersion),
                    Strategy::Newer => Entry::live(value, next_version(Some(e.version), -1)?),
                    Strategy::Arbiter => return Err(WriteError::NoArbiter),
                },
                _ => Entry::live(value, next_version(floor, requested)?),
            },
            WriteOp::Increment(by) => {
                let current = match live {
                    Some(e) => e
                        .value
                        .trim()
                        .parse::<i64>()
                        .map_err(|_| WriteError::NotNumeric)?,
                    None => 0,
                };
                Entry::live(
                    &current.saturating_add(by).to_string(),
                    next_version(floor, -1)?,
                )
            }
            WriteOp::Remove => match live {
                Some(e) => Entry::removed(next_version(Some(e.version), -1)?),
                None => return Ok(None),
            },
        };
        Ok(Some(entry))
    }

    /// Appends `entry` for `key` to the log (when there is one); its LSN, or 0 if not logged.
    fn log_entry(&self, key: &str, entry: &Entry) -> Result<u64, WriteError> {
        match self.log.get() {
            Some(log) if key != CONNECTIONS_KEY => {
                let lsn = log
                    .append_new(RecordRef {
                        op: if entry.deleted { Op::Remove } else { Op::Set },
                        db: &self.name,
                        key,
                        version: entry.version,
                        value: &entry.value,
                    })
                    .map_err(|e| WriteError::Storage(e.to_string()))?;
                // Writers of other shards append concurrently: the highest LSN wins.
                self.last_lsn.fetch_max(lsn, Ordering::AcqRel);
                Ok(lsn)
            }
            _ => Ok(0),
        }
    }

    /// Applies a record that is already in the log (start-up replay, replication): stores the
    /// entry it describes and notifies watchers. Records at or below the last LSN are skipped.
    pub fn apply_record(&self, record: Viewed<'_>) {
        let fields = record.fields;
        let mut data = write(self.data.of(fields.key));
        if record.lsn != 0 && record.lsn <= self.last_lsn.load(Ordering::Acquire) {
            return;
        }
        let entry = match fields.op {
            Op::Set => Entry::live(fields.value, fields.version),
            Op::Remove => Entry::removed(fields.version),
            Op::CreateDb | Op::DeleteDb | Op::TermStart | Op::Members => return,
        };
        self.last_lsn.fetch_max(record.lsn, Ordering::AcqRel);
        self.store(&mut data, fields.key, entry, record.lsn);
    }

    /// Inserts `entry` and queues its notification (sent once log record `lsn` is durable) to
    /// the key's watchers.
    fn store(&self, data: &mut Map, key: &str, entry: Entry, lsn: u64) {
        let conflict_record = self.announce(key, &entry, lsn);
        let now_live = !entry.deleted;
        let was_live = if conflict_record && entry.deleted {
            // A conflict record key names a fresh opp_id and is never written again, so it
            // needs no floor either.
            data.remove(key).is_some_and(|e| !e.deleted)
        } else if let Some(slot) = data.get_mut(key) {
            std::mem::replace(slot, entry).deleted.not()
        } else {
            data.insert(Key::from(key), entry);
            false
        };
        self.count_live(was_live, now_live);
    }

    /// What storing `entry` under `key` sets off besides the map change: security and
    /// conflict bookkeeping, the watchers' notification, the tombstone of a removal. True if
    /// `key` is a conflict record.
    fn announce(&self, key: &str, entry: &Entry, lsn: u64) -> bool {
        if key.starts_with("$$") && !is_floor_key(key) {
            self.security_changed();
        }
        let conflict_record = key.starts_with(super::conflicts::CONFLICTS_PREFIX);
        if conflict_record {
            self.conflict_stored(key, entry, lsn);
        }
        self.notify(key, entry, lsn);
        if entry.deleted && !conflict_record {
            lock(&self.tombstones).push_back((Instant::now(), Box::from(key), entry.version));
        }
        conflict_record
    }

    /// Keeps the live-key count as a key goes from `was_live` to `now_live`.
    fn count_live(&self, was_live: bool, now_live: bool) {
        match (was_live, now_live) {
            (false, true) => self.live.fetch_add(1, Ordering::Relaxed),
            (true, false) => self.live.fetch_sub(1, Ordering::Relaxed),
            _ => 0,
        };
    }

    /// Adds snapshot entries taken at `lsn` (a snapshot comes in chunks: the live count follows
    /// each entry instead of a recount of the whole map per chunk).
    pub fn load(&self, entries: Vec<(String, Entry)>, lsn: u64) {
        let mut data = self.data.write_all();
        let mut tombstones = Vec::new();
        let mut live = 0;
        for (key, entry) in entries {
            live += insert_loaded(&mut data, key, entry, &mut tombstones);
        }
        self.retain_tombstones(tombstones);
        self.last_lsn.store(lsn, Ordering::Release);
        self.snapshot_lsn.store(lsn, Ordering::Release);
        self.security_changed();
        // Two's complement: adding a negative change wraps to the subtraction.
        self.live.fetch_add(live as u64, Ordering::Relaxed);
    }

    /// Replaces the contents (a full sync taken at `lsn`) and disconnects the watchers, whose
    /// clients must watch again: the jump may skip versions they would otherwise have seen.
    pub fn replace(&self, strategy: Strategy, entries: Vec<(String, Entry)>, lsn: u64) {
        {
            let mut data = self.data.write_all();
            for shard in data.iter_mut() {
                shard.retain(|k, _| &**k == CONNECTIONS_KEY);
            }
            let mut tombstones = Vec::new();
            for (key, entry) in entries {
                insert_loaded(&mut data, key, entry, &mut tombstones);
            }
            self.retain_tombstones(tombstones);
            self.strategy
                .store(strategy_code(strategy), Ordering::Release);
            self.generation.fetch_add(1, Ordering::AcqRel);
            self.last_lsn.store(lsn, Ordering::Release);
            self.force_snapshot.store(true, Ordering::Release);
            self.security_changed();
            self.recount(&data);
        }
        self.close_watchers();
    }

    /// Starts the retention of tombstones that came from a snapshot or a full sync (their
    /// removal time is not kept, so it counts from now).
    fn retain_tombstones(&self, loaded: Vec<(String, i32)>) {
        let now = Instant::now();
        let mut queue = lock(&self.tombstones);
        queue.extend(
            loaded
                .into_iter()
                .map(|(k, v)| (now, k.into_boxed_str(), v)),
        );
    }

    /// Replaces tombstones older than `retention` with their bucket's version floor (each node
    /// on its own clock: floors only ever raise the versions a primary hands out). Returns how
    /// many were dropped. Works in slices so writers wait for one slice at most.
    pub fn expire_tombstones(&self, retention: Duration) -> usize {
        let mut dropped = 0;
        loop {
            let mut data = self.data.write_all();
            let mut queue = lock(&self.tombstones);
            let mut slice = 0;
            while slice < 4096 {
                match queue.front() {
                    Some((at, _, _)) if at.elapsed() >= retention => {}
                    _ => {
                        // A burst of removals must not keep its queue's memory.
                        if queue.capacity() > 4 * queue.len() + 1024 {
                            queue.shrink_to_fit();
                        }
                        return dropped;
                    }
                }
                let Some((_, key, version)) = queue.pop_front() else {
                    return dropped;
                };
                slice += 1;
                // Only the tombstone made then: the key may have been written since.
                let data = &mut *data[shards::index(&key)];
                if data
                    .get(&*key)
                    .is_some_and(|e| e.deleted && e.version == version)
                {
                    data.remove(&*key);
                    raise_floor(data, floor_key(&key), version);
                    dropped += 1;
                }
            }
        }
    }

    /// Tombstones waiting for their retention to pass.
    pub fn tombstone_count(&self) -> usize {
        lock(&self.tombstones).len()
    }

    /// Disconnects every session watching a key of this database.
    pub fn close_watchers(&self) {
        let watchers = {
            let mut watchers = lock(&self.watchers);
            self.watched.store(0, Ordering::Release);
            std::mem::take(&mut *watchers)
        };
        for outbox in watchers.values().flat_map(HashMap::values) {
            outbox.close();
        }
    }

    /// How many times a full sync replaced the contents.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// LSN of the last logged change.
    pub fn last_lsn(&self) -> u64 {
        self.last_lsn.load(Ordering::Acquire)
    }

    /// Whether a snapshot is needed and the LSN it would cover, read with every shard locked so
    /// a write that has appended its record is also visible (its `last_lsn` is stored before
    /// its shard's lock is released).
    pub fn snapshot_point(&self) -> (bool, u64) {
        let _data = self.data.read_all();
        (self.changed_since_snapshot(), self.last_lsn())
    }

    /// True when changes were logged since the last snapshot.
    pub fn changed_since_snapshot(&self) -> bool {
        self.force_snapshot.load(Ordering::Acquire)
            || self.last_lsn() > self.snapshot_lsn.load(Ordering::Acquire)
    }

    /// Copies up to `max` entries (version floors included, `$connections` excluded) ordered after
    /// `after`. Snapshots stream a database in such chunks, so writers wait only for one chunk.
    pub fn copy_chunk(&self, after: Option<&str>, max: usize) -> Vec<(String, Entry)> {
        let data = self.data.read_all();
        let from = after.map_or(Bound::Unbounded, Bound::Excluded);
        shards::merged(&data, from)
            .filter(|(k, _)| &***k != CONNECTIONS_KEY)
            .take(max)
            .map(|(k, e)| (k.to_string(), e.clone()))
            .collect()
    }

    /// Forces the next snapshot to include this database.
    pub fn mark_unsnapshotted(&self) {
        self.force_snapshot.store(true, Ordering::Release);
    }

    /// Attaches the operation log (once, after start-up replay).
    pub fn attach_log(&self, log: Arc<OpLog>) {
        let _ = self.log.set(log);
    }

    /// Records that a snapshot now covers everything up to `lsn`.
    pub fn mark_snapshotted(&self, lsn: u64) {
        self.snapshot_lsn.fetch_max(lsn, Ordering::AcqRel);
        self.force_snapshot.store(false, Ordering::Release);
    }

    /// Adds `delta` to `$connections` and notifies its watchers.
    pub fn add_connections(&self, delta: i64) {
        // `$connections` always holds a number, so the increment cannot fail.
        let _ = self.write(CONNECTIONS_KEY, WriteOp::Increment(delta));
    }

    /// Registers `outbox` as a watcher of `key` (once per session).
    pub fn watch(&self, key: &str, outbox: &Shared<Outbox>) {
        let mut watchers = lock(&self.watchers);
        watchers
            .entry(key.to_string())
            .or_default()
            .insert(outbox.id(), outbox.clone());
        self.watched.store(watchers.len(), Ordering::Release);
    }

    /// Removes the session's watcher of `key`.
    pub fn unwatch(&self, key: &str, session_id: u64) {
        let mut watchers = lock(&self.watchers);
        if let Some(list) = watchers.get_mut(key) {
            list.remove(&session_id);
            if list.is_empty() {
                watchers.remove(key);
                self.watched.store(watchers.len(), Ordering::Release);
            }
        }
    }

    /// Watch registrations on every key (a session watching three keys counts three times).
    pub fn watch_count(&self) -> usize {
        lock(&self.watchers).values().map(HashMap::len).sum()
    }

    /// Number of sessions watching `key`.
    pub fn watcher_count(&self, key: &str) -> usize {
        lock(&self.watchers).get(key).map_or(0, HashMap::len)
    }

    /// Queues the push for `entry` to every watcher of `key`, dropping watchers that are gone
    /// or too slow. The push is only built when someone watches.
    fn notify(&self, key: &str, entry: &Entry, lsn: u64) {
        if self.watched.load(Ordering::Acquire) == 0 {
            return;
        }
        let mut watchers = lock(&self.watchers);
        let Some(list) = watchers.get_mut(key) else {
            return;
        };
        let messages = if entry.deleted {
            vec![format!("removed {key}\n")]
        } else {
            vec![
                format!("changed {key} {}\n", entry.value),
                format!("changed-version {key} {} {}\n", entry.version, entry.value),
            ]
        };
        let push = Push::new(messages);
        list.retain(|_, o| o.notify(&push, lsn));
        crate::metrics::STATS.pushes.add(0, list.len() as u64);
        if list.is_empty() {
            watchers.remove(key);
            self.watched.store(watchers.len(), Ordering::Release);
        }
    }
}

/// How a strategy is kept in [`Database`] (its `.madadata` code, which fits a byte).
fn strategy_code(strategy: Strategy) -> u8 {
    strategy.code() as u8
}

/// Version of a key after a write requested at `requested`, given the stored version (if any).
fn next_version(stored: Option<i32>, requested: i32) -> Result<i32, WriteError> {
    stored
        .map_or(requested, |v| v.max(requested))
        .checked_add(1)
        .ok_or(WriteError::VersionOverflow)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn version(r: Result<Written, WriteError>) -> Result<i32, WriteError> {
        r.map(|w| w.version)
    }

    #[test]
    fn versions_follow_nundb_rules() {
        let db = Database::new("t", Strategy::None);
        assert_eq!(version(db.write("a", WriteOp::Set("1"))), Ok(0));
        assert_eq!(version(db.write("a", WriteOp::Set("2"))), Ok(1));
        assert_eq!(
            version(db.write("a", WriteOp::SetSafe(0, "x"))),
            Err(WriteError::InvalidVersion)
        );
        assert_eq!(version(db.write("a", WriteOp::SetSafe(1, "y"))), Ok(2));
        assert_eq!(version(db.write("b", WriteOp::SetSafe(5, "y"))), Ok(6));
        // -1 is plain set's version: it always wins.
        assert_eq!(version(db.write("a", WriteOp::SetSafe(-1, "z"))), Ok(3));
        assert_eq!(db.get("a"), Some(("z".to_string(), 3)));
    }

    #[test]
    fn keys_and_snapshot_chunks_come_in_key_order_whatever_the_write_order() {
        let db = Database::new("t", Strategy::None);
        for k in ["k9", "a", "k10", "b", "k1", "zz"] {
            db.write(k, WriteOp::Set("v")).unwrap();
        }
        db.write("b", WriteOp::Remove).unwrap();
        db.write("a", WriteOp::Set("again")).unwrap();
        assert_eq!(
            db.keys(|_| true),
            ["$connections", "a", "k1", "k10", "k9", "zz"]
        );
        let first = db.copy_chunk(None, 3);
        let names = |c: &[(String, Entry)]| c.iter().map(|(k, _)| k.clone()).collect::<Vec<_>>();
        // The tombstone of `b` is stored (and snapshotted); `$connections` never is.
        assert_eq!(names(&first), ["a", "b", "k1"]);
        let rest = db.copy_chunk(Some("k1"), 10);
        assert_eq!(names(&rest), ["k10", "k9", "zz"]);
    }

    #[test]
    fn snapshot_chunks_page_through_every_shard_in_key_order() {
        let db = Database::new("t", Strategy::None);
        let mut want: Vec<String> = (0..300)
            .map(|i| format!("key-{}", i * 7919 % 1000))
            .collect();
        for k in &want {
            db.write(k, WriteOp::Set("v")).unwrap();
        }
        want.sort();
        assert_eq!(db.keys(|k| k.starts_with("key-")), want);
        let mut paged = Vec::new();
        loop {
            let chunk = db.copy_chunk(paged.last().map(String::as_str), 7);
            if chunk.is_empty() {
                break;
            }
            assert!(chunk.len() == 7 || paged.len() + chunk.len() == want.len());
            paged.extend(chunk.into_iter().map(|(k, _)| k));
        }
        assert_eq!(paged, want);
        assert_eq!(db.stored_entries(), want.len() + 1, "and $connections");
    }

    #[test]
    fn newer_strategy_accepts_stale() {
        let db = Database::new("t", Strategy::Newer);
        db.write("a", WriteOp::Set("1")).unwrap();
        db.write("a", WriteOp::Set("2")).unwrap();
        assert_eq!(version(db.write("a", WriteOp::SetSafe(0, "z"))), Ok(2));
        assert_eq!(db.get("a"), Some(("z".to_string(), 2)));
    }

    #[test]
    fn remove_keeps_versions_monotonic() {
        let db = Database::new("t", Strategy::None);
        db.write("a", WriteOp::Set("1")).unwrap();
        assert_eq!(version(db.write("a", WriteOp::Remove)), Ok(1));
        assert_eq!(db.get("a"), None);
        assert_eq!(version(db.write("a", WriteOp::Set("2"))), Ok(2));
        assert_eq!(
            version(db.write("a", WriteOp::SetSafe(0, "3"))),
            Err(WriteError::InvalidVersion)
        );
    }

    #[test]
    fn version_overflow_is_an_error() {
        let db = Database::new("t", Strategy::None);
        assert_eq!(
            version(db.write("a", WriteOp::SetSafe(i32::MAX - 1, "x"))),
            Ok(i32::MAX)
        );
        assert_eq!(
            version(db.write("a", WriteOp::Remove)),
            Err(WriteError::VersionOverflow)
        );
        assert_eq!(
            version(db.write("a", WriteOp::Set("y"))),
            Err(WriteError::VersionOverflow)
        );
        assert_eq!(db.get("a"), Some(("x".to_string(), i32::MAX)));
    }

    #[test]
    fn increment_rules() {
        let db = Database::new("t", Strategy::None);
        assert_eq!(version(db.write("n", WriteOp::Increment(5))), Ok(0));
        assert_eq!(version(db.write("n", WriteOp::Increment(-2))), Ok(1));
        assert_eq!(db.get("n"), Some(("3".to_string(), 1)));
        db.write("s", WriteOp::Set("abc")).unwrap();
        assert_eq!(
            version(db.write("s", WriteOp::Increment(1))),
            Err(WriteError::NotNumeric)
        );
    }

    #[test]
    fn concurrent_writers_of_many_shards_keep_each_keys_versions_in_order() {
        use crate::storage::oplog::FsyncPolicy;
        let dir = std::env::temp_dir().join(format!(
            "nundb-shards-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        let log = Arc::new(OpLog::open(&dir, FsyncPolicy::No, 0, &mut |_| Ok(())).unwrap());
        let db = Arc::new(Database::with_log("t", Strategy::None, Some(log.clone())));
        let keys: Vec<String> = (0..64).map(|i| format!("k{i}")).collect();
        let (outbox, got) = super::super::outbox::Collect::outbox(1 << 20, 1 << 30);
        for k in &keys {
            db.watch(k, &outbox);
        }
        let (threads, rounds) = (4, 100);
        let writers: Vec<_> = (0..threads)
            .map(|t| {
                let (db, keys) = (db.clone(), keys.clone());
                std::thread::spawn(move || {
                    for round in 0..rounds {
                        for k in &keys {
                            db.write(k, WriteOp::Set(&format!("{t}.{round}"))).unwrap();
                            super::super::outbox::take_touched().release();
                        }
                    }
                })
            })
            .collect();
        for w in writers {
            w.join().unwrap();
        }
        let writes = threads * rounds * keys.len();
        assert_eq!(
            db.last_lsn(),
            writes as u64,
            "the last LSN is the highest one"
        );
        for k in &keys {
            assert_eq!(
                db.get(k).map(|(_, v)| v),
                Some(threads as i32 * rounds as i32 - 1)
            );
        }
        // The watcher saw every version of every key, each key's in order.
        let mut seen: HashMap<String, i32> = HashMap::new();
        for line in got.take_lines() {
            let Some(rest) = line.strip_prefix("changed-version ") else {
                continue;
            };
            let mut parts = rest.split(' ');
            let (key, version) = (parts.next().unwrap(), parts.next().unwrap());
            let last = seen.entry(key.to_string()).or_insert(-1);
            assert_eq!(version.parse::<i32>().unwrap(), *last + 1, "{key}");
            *last += 1;
        }
        assert_eq!(
            seen.values().map(|v| *v as usize + 1).sum::<usize>(),
            writes
        );
        // The log holds each key's versions in LSN order too.
        log.sync_now().unwrap();
        drop((db, log));
        let mut logged: HashMap<String, i32> = HashMap::new();
        OpLog::open(&dir, FsyncPolicy::No, 0, &mut |r| {
            let last = logged.entry(r.key.clone()).or_insert(-1);
            if r.version != *last + 1 {
                return Err(format!("{} at version {} after {last}", r.key, r.version));
            }
            *last += 1;
            Ok(())
        })
        .unwrap();
        assert_eq!(logged, seen);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn watchers_get_changes_in_order() {
        let db = Database::new("t", Strategy::None);
        let (outbox, got) = super::super::outbox::Collect::outbox(100, 1 << 20);
        db.watch("a", &outbox);
        db.write("a", WriteOp::Set("1")).unwrap();
        db.write("a", WriteOp::Remove).unwrap();
        super::super::outbox::take_touched().release();
        let got = got.take_lines();
        assert_eq!(
            got,
            vec!["changed a 1\n", "changed-version a 0 1\n", "removed a\n"]
        );
    }

    #[test]
    fn watching_again_after_every_watcher_left_gets_pushes() {
        let db = Database::new("t", Strategy::None);
        let (first, first_got) = super::super::outbox::Collect::outbox(100, 1 << 20);
        let (second, second_got) = super::super::outbox::Collect::outbox(100, 1 << 20);
        db.write("a", WriteOp::Set("0")).unwrap();
        db.watch("a", &first);
        db.watch("b", &second);
        db.write("a", WriteOp::Set("1")).unwrap();
        db.unwatch("a", first.id());
        db.write("a", WriteOp::Set("2")).unwrap();
        db.unwatch("b", second.id());
        assert_eq!(db.watch_count(), 0);
        db.write("b", WriteOp::Set("1")).unwrap();
        db.watch("b", &second);
        db.write("b", WriteOp::Set("2")).unwrap();
        super::super::outbox::take_touched().release();
        assert_eq!(
            first_got.take_lines(),
            vec!["changed a 1\n", "changed-version a 1 1\n"]
        );
        assert_eq!(
            second_got.take_lines(),
            vec!["changed b 2\n", "changed-version b 1 2\n"]
        );
    }

    #[test]
    fn a_full_sync_changes_the_strategy() {
        let db = Database::new("t", Strategy::None);
        db.write("a", WriteOp::Set("1")).unwrap();
        db.write("a", WriteOp::Set("2")).unwrap();
        assert_eq!(
            version(db.write("a", WriteOp::SetSafe(0, "x"))),
            Err(WriteError::InvalidVersion)
        );
        db.replace(Strategy::Newer, vec![("a".into(), Entry::live("1", 5))], 9);
        assert_eq!(db.strategy(), Strategy::Newer);
        assert_eq!(version(db.write("a", WriteOp::SetSafe(0, "x"))), Ok(6));
    }

    #[test]
    fn tombstones_expire_into_floors_and_keys_come_back_above_them() {
        let db = Database::new("t", Strategy::None);
        // Within the retention a recreated key continues exactly after its removal.
        db.write("a", WriteOp::Set("1")).unwrap();
        assert_eq!(version(db.write("a", WriteOp::Remove)), Ok(1));
        assert_eq!(version(db.write("a", WriteOp::Set("2"))), Ok(2));
        let mut removed_at = HashMap::new();
        for i in 0..1000 {
            let key = format!("k{i}");
            assert_eq!(version(db.write(&key, WriteOp::Set("v"))), Ok(0));
            assert_eq!(version(db.write(&key, WriteOp::Remove)), Ok(1));
            removed_at.insert(key, 1);
        }
        assert_eq!(
            db.stored_entries(),
            1002,
            "$connections, a and 1000 tombstones"
        );
        assert_eq!(db.expire_tombstones(Duration::from_secs(3600)), 0);
        assert_eq!(db.expire_tombstones(Duration::ZERO), 1000);
        assert_eq!(db.tombstone_count(), 0);
        assert_eq!(db.len(), 2, "$connections and a are live");
        // `$connections`, `a` and at most one floor per bucket.
        assert!(db.stored_entries() <= 2 + FLOOR_BUCKETS as usize);
        assert_eq!(
            db.keys(|_| true),
            vec![CONNECTIONS_KEY.to_string(), "a".to_string()]
        );
        // After expiry a recreated key starts above its removal, whatever the request version.
        assert!(version(db.write("k7", WriteOp::Set("again"))).unwrap() > removed_at["k7"]);
        assert!(version(db.write("k8", WriteOp::SetSafe(0, "again"))).unwrap() > removed_at["k8"]);
        assert!(version(db.write("k9", WriteOp::Increment(1))).unwrap() > removed_at["k9"]);
        // A tombstone already overwritten is left alone.
        let b = version(db.write("b", WriteOp::Set("1"))).unwrap();
        db.write("b", WriteOp::Remove).unwrap();
        db.write("b", WriteOp::Set("back")).unwrap();
        assert_eq!(db.expire_tombstones(Duration::ZERO), 0);
        assert_eq!(db.get("b"), Some(("back".to_string(), b + 2)));
        // The floors are the database's own.
        let floor = floor_key("k7");
        assert_eq!(
            db.write(floor, WriteOp::Set("x")),
            Err(WriteError::Reserved)
        );
        assert_eq!(db.get(floor), None);
    }

    #[test]
    fn loaded_tombstones_start_their_retention() {
        let db = Database::new("t", Strategy::None);
        let chunk = |entries: Vec<(&str, Entry)>| {
            let entries = entries.into_iter().map(|(k, e)| (k.to_string(), e));
            db.load(entries.collect(), 10);
        };
        chunk(vec![
            ("gone", Entry::removed(41)),
            ("kept", Entry::live("x", 3)),
        ]);
        assert_eq!(db.stored_entries(), 3, "$connections, kept, the tombstone");
        assert_eq!(db.len(), 2);
        // A later chunk counts its own keys only (a key seen again replaces its entry).
        chunk(vec![
            ("kept", Entry::removed(4)),
            ("more", Entry::live("y", 0)),
        ]);
        assert_eq!(db.len(), 2, "$connections and more");
        assert_eq!(db.keys(|_| true), ["$connections", "more"]);
        chunk(vec![("kept", Entry::live("z", 5))]);
        assert_eq!(db.len(), 3);
        db.write("kept", WriteOp::Remove).unwrap();
        db.write("more", WriteOp::Remove).unwrap();
        assert_eq!(db.expire_tombstones(Duration::ZERO), 3);
        let floors: std::collections::HashSet<&str> =
            ["gone", "kept", "more"].map(floor_key).into();
        assert_eq!(
            db.stored_entries(),
            1 + floors.len(),
            "$connections and floors"
        );
        assert_eq!(db.len(), 1);
        assert_eq!(version(db.write("gone", WriteOp::Set("back"))), Ok(42));
    }
}
