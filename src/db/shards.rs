//! A database's map, split by key hash into shards that each have their own lock, so writers of
//! different keys do not queue behind each other. A key, its version floor and its conflict
//! records always hash to the same shard: a write that reads or changes them takes one lock.
//! Whole-map work (listing, snapshots, loading) locks every shard, always in index order.

use std::cmp::Reverse;
use std::collections::{btree_map, BTreeMap, BinaryHeap};
use std::iter::Peekable;
use std::ops::Bound;
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use super::conflicts::parse_record_key;
use super::database::{read, write, Entry, FLOOR_BUCKETS, FLOOR_PREFIX};
use super::key::Key;

/// How many shards a database's map has (a divisor of the 64 version-floor buckets, so a key
/// and its floor share a shard).
pub const SHARDS: usize = 16;
const _: () = assert!((FLOOR_BUCKETS as usize).is_multiple_of(SHARDS));

/// One shard's keys, in order.
pub type Map = BTreeMap<Key, Entry>;

/// A shard's lock on a cache line of its own: writers of neighbouring shards do not bounce
/// each other's lock word between cores.
#[derive(Debug, Default)]
#[repr(align(64))]
struct Padded(RwLock<Map>);

/// The shards of one database.
#[derive(Debug, Default)]
pub struct Shards([Padded; SHARDS]);

/// The version-floor bucket of `key` (FNV-1a of the name, so every node and every restart picks
/// the same one). A floor key is its own bucket and a conflict record is in its key's bucket
/// (even when that key looks like a conflict record itself).
pub fn bucket(key: &str) -> usize {
    let mut named = key;
    while let Some((of, _)) = parse_record_key(named) {
        named = of;
    }
    if let Some(n) = named.strip_prefix(FLOOR_PREFIX) {
        if let Ok(b) = n.parse::<usize>() {
            return b % FLOOR_BUCKETS as usize;
        }
    }
    let hash = named.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    (hash % FLOOR_BUCKETS) as usize
}

/// The shard `key` lives in.
pub fn index(key: &str) -> usize {
    bucket(key) % SHARDS
}

impl Shards {
    /// The lock of the shard holding `key`.
    pub fn of(&self, key: &str) -> &RwLock<Map> {
        &self.0[index(key)].0
    }

    /// Every shard read-locked, in index order (a consistent view of the whole map).
    pub fn read_all(&self) -> Vec<RwLockReadGuard<'_, Map>> {
        self.0.iter().map(|p| read(&p.0)).collect()
    }

    /// Every shard write-locked, in index order.
    pub fn write_all(&self) -> Vec<RwLockWriteGuard<'_, Map>> {
        self.0.iter().map(|p| write(&p.0)).collect()
    }
}

/// The entries of every shard after `from`, in key order: a merge that looks at one entry per
/// shard at a time, so taking the first few of a large map costs only those few.
pub fn merged<'a>(shards: &'a [RwLockReadGuard<'_, Map>], from: Bound<&str>) -> Merged<'a> {
    let mut merged = Merged {
        ranges: shards
            .iter()
            .map(|shard| shard.range::<str, _>((from, Bound::Unbounded)).peekable())
            .collect(),
        heads: BinaryHeap::with_capacity(shards.len()),
    };
    for i in 0..merged.ranges.len() {
        merged.advance(i);
    }
    merged
}

/// Iterator of [`merged`].
pub struct Merged<'a> {
    ranges: Vec<Peekable<btree_map::Range<'a, Key, Entry>>>,
    /// The next key of each shard that has one (and which shard), smallest on top.
    heads: BinaryHeap<Reverse<(&'a Key, usize)>>,
}

impl Merged<'_> {
    /// Puts shard `i`'s next key in the heap.
    fn advance(&mut self, i: usize) {
        if let Some(&(key, _)) = self.ranges[i].peek() {
            self.heads.push(Reverse((key, i)));
        }
    }
}

impl<'a> Iterator for Merged<'a> {
    type Item = (&'a Key, &'a Entry);

    fn next(&mut self) -> Option<Self::Item> {
        let Reverse((_, i)) = self.heads.pop()?;
        let item = self.ranges[i].next();
        self.advance(i);
        item
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::conflicts::record_key;

    #[test]
    fn a_key_its_floor_and_its_conflict_records_share_a_shard() {
        for i in 0..500 {
            let key = format!("key-{i}");
            let floor = format!("{FLOOR_PREFIX}{:02}", bucket(&key));
            assert_eq!(bucket(&floor), bucket(&key), "{key}");
            assert_eq!(
                index(&record_key(&key, 1_700_000_000_000_000 + i)),
                index(&key)
            );
        }
        // A key that looks like a conflict record, and the records of its conflicts.
        for key in ["$conflicts_x_1", "$conflicts_$conflicts_x_1_2", "a_b"] {
            assert_eq!(index(&record_key(key, 7)), index(key), "{key}");
            assert_eq!(
                index(&record_key(&record_key(key, 7), 8)),
                index(key),
                "{key}"
            );
        }
        let used: std::collections::HashSet<usize> =
            (0..500).map(|i| index(&format!("key-{i}"))).collect();
        assert_eq!(used.len(), SHARDS, "keys spread over every shard");
    }
}
