//! The `arbiter` strategy: a stale `set-safe` (or any value write to a key already in conflict)
//! becomes a conflict record `$conflicts_<key>_<opp_id>` holding `<version> <previous> <new>`,
//! where `<previous>` is the key's value or, for a key already in conflict, the previous
//! conflict's record key. Storing that record is what offers it to the arbiters: every node
//! pushes `resolve <opp_id> <db> <version> <key> <previous> <new>` to its arbiters when the record
//! arrives (through a write on the primary or replication elsewhere), and replays the pending
//! ones to an arbiter that registers later. `resolve` writes the key and turns the record into
//! `resolved <value>` under one lock, so a repeated answer changes nothing.

use std::ops::Bound;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::database::{lock, write};
use super::outbox::{Outbox, Push};
use super::shards::Map;
use super::{Database, Entry, WriteError, WriteOp, Written};
use crate::packed::Shared;

/// Prefix of conflict record keys.
pub const CONFLICTS_PREFIX: &str = "$conflicts_";
/// Version reported for a conflict queued behind another one on the same key.
pub const IN_CONFLICT_VERSION: i32 = -2;
const RESOLVED: &str = "resolved ";

/// A fresh conflict id: microseconds since the epoch, strictly increasing in this process.
fn next_opp_id() -> u64 {
    static LAST: AtomicU64 = AtomicU64::new(0);
    let now = u64::try_from(chrono::Utc::now().timestamp_micros()).unwrap_or(0);
    let mut last = LAST.load(Ordering::Relaxed);
    loop {
        let next = now.max(last + 1);
        match LAST.compare_exchange(last, next, Ordering::AcqRel, Ordering::Relaxed) {
            Ok(_) => return next,
            Err(seen) => last = seen,
        }
    }
}

/// The record key of conflict `opp_id` on `key`.
pub fn record_key(key: &str, opp_id: u64) -> String {
    format!("{CONFLICTS_PREFIX}{key}_{opp_id}")
}

/// (key, opp_id) of a conflict record key.
pub(super) fn parse_record_key(record: &str) -> Option<(&str, u64)> {
    let (key, opp) = record.strip_prefix(CONFLICTS_PREFIX)?.rsplit_once('_')?;
    if key.is_empty() || opp.is_empty() || !opp.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((key, opp.parse().ok()?))
}

fn is_pending(entry: &Entry) -> bool {
    !entry.deleted && !entry.value.starts_with(RESOLVED)
}

/// Pending conflict records, oldest first, of `key` (or of every key when `None`) in shard `data`
/// (a key's records are all in its shard).
fn pending(data: &Map, key: Option<&str>) -> Vec<(u64, String)> {
    let prefix = match key {
        Some(k) => format!("{CONFLICTS_PREFIX}{k}_"),
        None => CONFLICTS_PREFIX.to_string(),
    };
    let mut found: Vec<(u64, String)> = data
        .range::<str, _>((Bound::Included(prefix.as_str()), Bound::Unbounded))
        .take_while(|(k, _)| k.starts_with(&prefix))
        .filter(|(_, e)| is_pending(e))
        .filter_map(|(k, _)| {
            let (of, opp) = parse_record_key(k)?;
            key.is_none_or(|want| want == of)
                .then(|| (opp, k.to_string()))
        })
        .collect();
    found.sort();
    found
}

impl Database {
    /// Conflict records waiting for an arbiter's answer.
    pub fn open_conflicts(&self) -> usize {
        self.data
            .read_all()
            .iter()
            .map(|shard| pending(shard, None).len())
            .sum()
    }

    /// A value write (`set` or `set-safe`) to a database with the `arbiter` strategy. A stale
    /// `set-safe`, or any value write to a key with pending conflicts, becomes a new conflict
    /// (`WriteError::Unresolved`); with no arbiter `online` it is refused instead.
    pub fn write_arbitrated(
        &self,
        key: &str,
        op: WriteOp<'_>,
        online: bool,
    ) -> Result<Written, WriteError> {
        let mut data = write(self.data.of(key));
        let queued = pending(&data, Some(key));
        let live = data.get(key).filter(|e| !e.deleted).cloned();
        let (stale, value) = match op {
            WriteOp::SetSafe(requested, value) => (
                requested != -1 && live.as_ref().is_some_and(|e| requested < e.version),
                value,
            ),
            WriteOp::Set(value) => (false, value),
            _ => return self.write_locked(&mut data, key, op),
        };
        if queued.is_empty() && !stale {
            return self.write_locked(&mut data, key, op);
        }
        if !online {
            return Err(WriteError::NoArbiter);
        }
        let (version, previous) = match (queued.last(), &live) {
            (Some((_, record)), _) => (IN_CONFLICT_VERSION, record.clone()),
            (None, Some(e)) => (e.version, e.value.to_string()),
            (None, None) => (-1, "<Empty>".to_string()),
        };
        let record = record_key(key, next_opp_id());
        let written = self.write_locked(
            &mut data,
            &record,
            WriteOp::Set(&format!("{version} {previous} {value}")),
        )?;
        Err(WriteError::Unresolved {
            record,
            lsn: written.lsn,
        })
    }

    /// Applies an arbiter's answer to conflict `opp_id` on `key`: the key takes `value` and the
    /// record becomes `resolved <value>`. Answering an already resolved conflict changes nothing.
    pub fn resolve(&self, key: &str, opp_id: &str, value: &str) -> Result<Written, WriteError> {
        let no_conflict = || WriteError::NoConflict(opp_id.chars().take(32).collect());
        let opp: u64 = opp_id.parse().map_err(|_| no_conflict())?;
        let record = record_key(key, opp);
        let mut data = write(self.data.of(key));
        let entry = data
            .get(record.as_str())
            .filter(|e| !e.deleted)
            .cloned()
            .ok_or_else(no_conflict)?;
        if !is_pending(&entry) {
            let version = data.get(key).map_or(-1, |e| e.version);
            return Ok(Written { version, lsn: 0 });
        }
        let written = self.write_locked(&mut data, key, WriteOp::Set(value))?;
        let marked = self.write_locked(
            &mut data,
            &record,
            WriteOp::Set(&format!("{RESOLVED}{value}")),
        )?;
        Ok(Written {
            version: written.version,
            lsn: marked.lsn,
        })
    }

    /// Registers an arbiter session and returns the pending conflicts' `resolve` messages, so
    /// it also gets the ones raised before it connected.
    pub fn add_arbiter(&self, outbox: &Shared<Outbox>) -> Vec<String> {
        {
            let mut arbiters = lock(&self.arbiters);
            if !arbiters.iter().any(|o| o.id() == outbox.id()) {
                arbiters.push(outbox.clone());
            }
        }
        let data = self.data.read_all();
        let mut found: Vec<(u64, String, &Entry)> = data
            .iter()
            .flat_map(|shard| {
                pending(shard, None)
                    .into_iter()
                    .filter_map(|(opp, record)| {
                        let entry = shard.get(record.as_str())?;
                        Some((opp, record, entry))
                    })
            })
            .collect();
        found.sort_unstable_by_key(|(opp, _, _)| *opp);
        found
            .into_iter()
            .filter_map(|(_, record, entry)| resolve_message(self.name(), &record, &entry.value))
            .collect()
    }

    /// Forgets an arbiter session.
    pub fn remove_arbiter(&self, session_id: u64) {
        lock(&self.arbiters).retain(|o| o.id() != session_id);
    }

    /// True when a live arbiter session is registered here.
    pub fn has_arbiter(&self) -> bool {
        let mut arbiters = lock(&self.arbiters);
        arbiters.retain(|o| !o.is_closed());
        !arbiters.is_empty()
    }

    /// Called under its shard's lock when conflict record `record` takes `entry`: offers a new
    /// conflict to the arbiters (once `lsn` is committed), or notes when it was resolved.
    pub(super) fn conflict_stored(&self, record: &str, entry: &Entry, lsn: u64) {
        if entry.deleted {
            lock(&self.resolved_at).remove(record);
        } else if !is_pending(entry) {
            lock(&self.resolved_at).insert(record.to_string(), Instant::now());
        } else if let Some(message) = resolve_message(self.name(), record, &entry.value) {
            let push = Push::new(vec![format!("{message}\n")]);
            let mut arbiters = lock(&self.arbiters);
            arbiters.retain(|o| o.notify(&push, lsn));
            crate::metrics::STATS.pushes.add(0, arbiters.len() as u64);
        }
    }

    /// Removes conflict records resolved more than `retention` ago (on the primary; the
    /// removals replicate). Returns how many were removed.
    pub fn sweep_resolved(&self, retention: Duration) -> usize {
        let expired: Vec<String> = {
            let data = self.data.read_all();
            let mut seen = lock(&self.resolved_at);
            // Records loaded from disk or a full sync start their retention now.
            for (k, e) in data.iter().flat_map(|shard| {
                shard
                    .range::<str, _>((Bound::Included(CONFLICTS_PREFIX), Bound::Unbounded))
                    .take_while(|(k, _)| k.starts_with(CONFLICTS_PREFIX))
            }) {
                if !e.deleted && !is_pending(e) && !seen.contains_key(&**k) {
                    seen.insert(k.to_string(), Instant::now());
                }
            }
            seen.iter()
                .filter(|(_, at)| at.elapsed() >= retention)
                .map(|(k, _)| k.clone())
                .collect()
        };
        expired
            .iter()
            .filter(|k| self.write(k, WriteOp::Remove).is_ok())
            .count()
    }
}

/// The `resolve` message offering conflict `record` (stored value `<version> <previous> <new>`).
fn resolve_message(db: &str, record: &str, value: &str) -> Option<String> {
    let (key, opp) = parse_record_key(record)?;
    let (version, rest) = value.split_once(' ')?;
    Some(format!("resolve {opp} {db} {version} {key} {rest}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::Strategy;

    fn db() -> Database {
        Database::new("d", Strategy::Arbiter)
    }

    #[test]
    fn record_keys_round_trip() {
        assert_eq!(parse_record_key(&record_key("a_b", 17)), Some(("a_b", 17)));
        assert_eq!(parse_record_key("$conflicts_k_x"), None);
        assert_eq!(parse_record_key("$conflicts__1"), None);
        assert!(next_opp_id() < next_opp_id());
    }

    #[test]
    fn stale_writes_queue_behind_each_other_until_resolved() {
        let d = db();
        assert_eq!(d.write("k", WriteOp::SetSafe(0, "a")).unwrap().version, 1);
        assert_eq!(
            d.write_arbitrated("k", WriteOp::SetSafe(0, "b"), false),
            Err(WriteError::NoArbiter)
        );
        let Err(WriteError::Unresolved { record: first, .. }) =
            d.write_arbitrated("k", WriteOp::SetSafe(0, "b"), true)
        else {
            panic!("expected a conflict");
        };
        // A fresh write to a key in conflict queues too, referencing the previous conflict.
        let Err(WriteError::Unresolved { record: second, .. }) =
            d.write_arbitrated("k", WriteOp::SetSafe(5, "c"), true)
        else {
            panic!("expected a queued conflict");
        };
        let (outbox, _got) = super::super::outbox::Collect::outbox(10, 1 << 20);
        let messages = d.add_arbiter(&outbox);
        let (_, opp1) = parse_record_key(&first).unwrap();
        let (_, opp2) = parse_record_key(&second).unwrap();
        assert_eq!(
            messages,
            vec![
                format!("resolve {opp1} d 1 k a b"),
                format!("resolve {opp2} d -2 k {first} c"),
            ]
        );
        assert_eq!(d.get("k"), Some(("a".into(), 1)));
        assert_eq!(d.resolve("k", &opp1.to_string(), "ab").unwrap().version, 2);
        assert_eq!(d.get(&first), Some(("resolved ab".into(), 1)));
        // Exactly once: a repeated answer changes nothing.
        assert_eq!(d.resolve("k", &opp1.to_string(), "zz").unwrap().lsn, 0);
        assert_eq!(d.get("k"), Some(("ab".into(), 2)));
        d.resolve("k", &opp2.to_string(), "abc").unwrap();
        assert_eq!(d.get("k"), Some(("abc".into(), 3)));
        assert!(matches!(
            d.resolve("k", "12", "x"),
            Err(WriteError::NoConflict(_))
        ));
        // No conflict left: writes go through again.
        assert_eq!(
            d.write_arbitrated("k", WriteOp::SetSafe(3, "d"), false)
                .unwrap()
                .version,
            4
        );
        assert_eq!(d.sweep_resolved(Duration::ZERO), 2);
        assert_eq!(d.get(&first), None);
        // Expired records leave no tombstone behind.
        assert_eq!(d.keys(|_| true), vec!["$connections", "k"]);
        assert_eq!(d.stored_entries(), 2);
    }
}
