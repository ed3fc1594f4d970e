//! The databases map and everything stored in it.

pub mod conflicts;
mod database;
pub mod key;
pub mod outbox;
pub mod pattern;
pub mod security;
pub mod shards;

pub use database::{Database, Entry, WriteError, WriteOp, Written, CONNECTIONS_KEY, TOKEN_KEY};

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, RwLock};

use crate::protocol::Strategy;
use crate::storage::oplog::OpLog;
use crate::storage::record::{Op, Record, Viewed};

/// Prefix of keys holding a user's hashed token.
pub const USER_KEY_PREFIX: &str = "$$user_";
/// Prefix of keys holding a user's permission spec (`$$permission_$<user>`).
pub const PERMISSION_KEY_PREFIX: &str = "$$permission_$";
/// The user a token-only session acts as.
pub const TOKEN_USER: &str = "all";

/// The key holding `user`'s token hash.
pub fn user_key(user: &str) -> String {
    format!("{USER_KEY_PREFIX}{user}")
}

/// The key holding `user`'s permission spec.
pub fn permission_key(user: &str) -> String {
    format!("{PERMISSION_KEY_PREFIX}{user}")
}

/// True for a valid database name: 1–128 ASCII letters, digits, `-`, `_` or `.`, not starting with `.`.
pub fn valid_db_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// One database of a full sync: name, strategy and entries.
pub type StagedDb = (String, Strategy, Vec<(String, Entry)>);

/// All databases by name: the one global RwLock-guarded map. Creating and deleting databases
/// is logged like any other write once a log is attached.
#[derive(Debug, Default)]
pub struct Databases {
    map: RwLock<HashMap<String, Arc<Database>>>,
    log: OnceLock<Arc<OpLog>>,
    /// On a replica holding log records it has not applied yet: the first such LSN (0 when
    /// everything logged is applied). Snapshots keep the log from there.
    unapplied_from: AtomicU64,
}

impl Databases {
    /// An empty map.
    pub fn new() -> Databases {
        Databases::default()
    }

    /// Attaches the operation log: from now on every change is logged before it is applied.
    pub fn attach_log(&self, log: Arc<OpLog>) {
        for db in self.all() {
            db.attach_log(Arc::clone(&log));
        }
        let _ = self.log.set(log);
    }

    /// The attached log.
    pub fn log(&self) -> Option<&Arc<OpLog>> {
        self.log.get()
    }

    fn read_map(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, Arc<Database>>> {
        self.map.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write_map(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, Arc<Database>>> {
        self.map.write().unwrap_or_else(|e| e.into_inner())
    }

    /// The database called `name`.
    pub fn get(&self, name: &str) -> Option<Arc<Database>> {
        self.read_map().get(name).cloned()
    }

    /// Every database.
    pub fn all(&self) -> Vec<Arc<Database>> {
        self.read_map().values().cloned().collect()
    }

    fn log_db_op(&self, op: Op, name: &str, value: &str) -> Result<u64, WriteError> {
        match self.log.get() {
            None => Ok(0),
            Some(log) => log
                .append(&mut Record {
                    lsn: 0,
                    term: 0,
                    op,
                    db: name.to_string(),
                    key: String::new(),
                    version: 0,
                    value: value.to_string(),
                })
                .map_err(|e| WriteError::Storage(e.to_string())),
        }
    }

    /// Creates a database whose `$$token` holds `token_hash`. `Ok(None)` if it already exists;
    /// otherwise the database and the LSN to wait on before acknowledging.
    pub fn create(
        &self,
        name: &str,
        token_hash: &str,
        strategy: Strategy,
    ) -> Result<Option<(Arc<Database>, u64)>, WriteError> {
        let mut map = self.write_map();
        if map.contains_key(name) {
            return Ok(None);
        }
        let created = self.log_db_op(Op::CreateDb, name, strategy.name())?;
        let db = Arc::new(Database::with_log(name, strategy, self.log.get().cloned()));
        let token = db.write(TOKEN_KEY, WriteOp::Set(token_hash))?;
        map.insert(name.to_string(), Arc::clone(&db));
        Ok(Some((db, token.lsn.max(created))))
    }

    /// Removes a database. `Ok(None)` if there was none, else the LSN to wait on.
    pub fn delete(&self, name: &str) -> Result<Option<u64>, WriteError> {
        let mut map = self.write_map();
        if !map.contains_key(name) {
            return Ok(None);
        }
        let lsn = self.log_db_op(Op::DeleteDb, name, "")?;
        if let Some(db) = map.remove(name) {
            db.mark_dropped();
        }
        Ok(Some(lsn))
    }

    /// Adds a database loaded from a snapshot (replacing any of the same name).
    pub fn insert_loaded(
        &self,
        name: &str,
        strategy: Strategy,
        entries: Vec<(String, Entry)>,
        lsn: u64,
    ) {
        let db = Arc::new(Database::with_log(name, strategy, self.log.get().cloned()));
        db.load(entries, lsn);
        self.write_map().insert(name.to_string(), db);
    }

    /// Marks log records from `lsn` on as not applied yet (set before appending them), or
    /// clears the mark with `None` once they are.
    pub fn set_unapplied_from(&self, lsn: Option<u64>) {
        self.unapplied_from
            .store(lsn.unwrap_or(0), Ordering::Release);
    }

    /// The first LSN logged but not applied yet, if any: the log must be kept from there.
    pub fn unapplied_from(&self) -> Option<u64> {
        Some(self.unapplied_from.load(Ordering::Acquire)).filter(|l| *l > 0)
    }

    /// Replaces every database with the staged contents of a full sync taken at `lsn`, keeping
    /// the `Database` objects sessions hold. Watchers are disconnected: what they saw may not
    /// lead to the new contents, so their clients must watch again.
    pub fn replace_all(&self, staged: Vec<StagedDb>, lsn: u64) {
        let mut map = self.write_map();
        let names: HashSet<&str> = staged.iter().map(|(n, _, _)| n.as_str()).collect();
        map.retain(|name, db| {
            let keep = names.contains(name.as_str());
            if !keep {
                db.mark_dropped();
                db.close_watchers();
            }
            keep
        });
        for (name, strategy, entries) in staged {
            match map.get(&name) {
                Some(db) => db.replace(strategy, entries, lsn),
                None => {
                    let db = Arc::new(Database::with_log(&name, strategy, self.log.get().cloned()));
                    db.load(entries, lsn);
                    db.mark_unsnapshotted();
                    map.insert(name, db);
                }
            }
        }
    }

    /// Applies a record already in the log (replay or replication), without logging it again.
    pub fn apply_record(&self, record: Viewed<'_>) {
        let (lsn, r) = (record.lsn, record.fields);
        match r.op {
            Op::CreateDb => {
                let exists = self.get(r.db).is_some_and(|db| db.last_lsn() >= lsn);
                if !exists {
                    let mut map = self.write_map();
                    let strategy = Strategy::parse(r.value).unwrap_or(Strategy::None);
                    let db = Arc::new(Database::with_log(r.db, strategy, self.log.get().cloned()));
                    db.load(Vec::new(), lsn);
                    map.insert(r.db.to_string(), db);
                }
            }
            Op::DeleteDb => {
                let mut map = self.write_map();
                if map.get(r.db).is_some_and(|db| db.last_lsn() < lsn) {
                    if let Some(db) = map.remove(r.db) {
                        db.mark_dropped();
                    }
                }
            }
            // The cluster applies member lists (`cluster::replication`).
            Op::TermStart | Op::Members => {}
            Op::Set | Op::Remove => match self.get(r.db) {
                Some(db) => db.apply_record(record),
                None => log::warn!("log record {lsn} for unknown database {} skipped", r.db),
            },
        }
    }

    /// Sorted database names.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.read_map().keys().cloned().collect();
        names.sort();
        names
    }
}
