//! The key → entry map of one database. Every command looks a key up, so the entries live in a
//! hash map (one hash and one key comparison, where a sorted tree compares the key with a dozen
//! others, each behind a pointer). What walks the keys in order (`keys`, snapshot chunks,
//! conflict scans) uses a sorted index of them, which changes only when a key enters or leaves
//! the map, not when its value does.

use std::collections::{BTreeSet, HashMap};
use std::ops::Bound;
use std::sync::Arc;

use super::database::Entry;

/// A database's entries by key, plus the keys in order.
#[derive(Debug, Default)]
pub struct Entries {
    /// Each key's entry (the key's bytes are shared with `order`).
    map: HashMap<Arc<str>, Entry>,
    /// Every key of `map`, sorted.
    order: BTreeSet<Arc<str>>,
}

impl Entries {
    /// The entry of `key`.
    pub fn get(&self, key: &str) -> Option<&Entry> {
        self.map.get(key)
    }

    /// The entry of `key`, to change in place.
    pub fn get_mut(&mut self, key: &str) -> Option<&mut Entry> {
        self.map.get_mut(key)
    }

    /// Stores `entry` under `key`; returns the entry it replaced.
    pub fn insert(&mut self, key: &str, entry: Entry) -> Option<Entry> {
        if let Some(slot) = self.map.get_mut(key) {
            return Some(std::mem::replace(slot, entry));
        }
        let key: Arc<str> = Arc::from(key);
        self.order.insert(Arc::clone(&key));
        self.map.insert(key, entry);
        None
    }

    /// Takes `key` out of the map.
    pub fn remove(&mut self, key: &str) -> Option<Entry> {
        let (key, entry) = self.map.remove_entry(key)?;
        self.order.remove(&*key);
        Some(entry)
    }

    /// Number of entries (tombstones and version floors included).
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Every entry, in no particular order.
    pub fn values(&self) -> impl Iterator<Item = &Entry> {
        self.map.values()
    }

    /// Entries in key order, starting after `after` (from the first key when `None`).
    pub fn after<'a>(
        &'a self,
        after: Option<&'a str>,
    ) -> impl Iterator<Item = (&'a str, &'a Entry)> {
        let lower = after.map_or(Bound::Unbounded, Bound::Excluded);
        self.walk(lower)
    }

    /// Entries in key order, starting at `from` (or the first key above it).
    pub fn from<'a>(&'a self, from: &'a str) -> impl Iterator<Item = (&'a str, &'a Entry)> {
        self.walk(Bound::Included(from))
    }

    /// Entries in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Entry)> {
        self.walk(Bound::Unbounded)
    }

    fn walk<'a>(&'a self, lower: Bound<&'a str>) -> impl Iterator<Item = (&'a str, &'a Entry)> {
        self.order
            .range::<str, _>((lower, Bound::Unbounded))
            .filter_map(|key| Some((&**key, self.map.get(&**key)?)))
    }

    /// Keeps only the entries `keep` says yes to.
    pub fn retain(&mut self, mut keep: impl FnMut(&str, &Entry) -> bool) {
        self.map.retain(|key, entry| keep(key, entry));
        let map = &self.map;
        self.order.retain(|key| map.contains_key(&**key));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(e: &Entries) -> Vec<&str> {
        e.iter().map(|(k, _)| k).collect()
    }

    #[test]
    fn walks_follow_key_order_through_inserts_replacements_and_removals() {
        let mut e = Entries::default();
        for k in ["m", "b", "x", "a", "q"] {
            assert!(e.insert(k, Entry::live(k, 1)).is_none());
        }
        let old = e.insert("b", Entry::live("new", 2)).map(|o| o.value);
        assert_eq!(old.as_deref(), Some("b"));
        assert_eq!(e.remove("x").map(|o| o.version), Some(1));
        assert!(e.remove("x").is_none());
        assert_eq!(keys(&e), ["a", "b", "m", "q"]);
        assert_eq!(e.len(), 4);
        assert_eq!(e.get("b").map(|v| &*v.value), Some("new"));
        let after: Vec<&str> = e.after(Some("b")).map(|(k, _)| k).collect();
        assert_eq!(after, ["m", "q"]);
        let from: Vec<&str> = e.from("c").map(|(k, _)| k).collect();
        assert_eq!(from, ["m", "q"]);
        e.retain(|k, _| k != "m");
        assert_eq!(keys(&e), ["a", "b", "q"]);
        assert_eq!(e.values().count(), 3);
    }
}
