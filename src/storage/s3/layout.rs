//! Object formats in the bucket, without I/O. All integers little-endian.
//!
//! NunDB's layouts (read): `<prefix>/<db>/nun.keys` (`u64 key_len, key, i32 version (-1:
//! deleted), u64 offset into nun.values`) with `nun.values` (`u64 value_len, value, i32
//! status`), or partitions `<prefix>/<db>/<n>.nun` (`u64 key_len, key, u64 value_len, value,
//! i32 status, i32 version`); later records override earlier ones.
//!
//! Ours (written, and read first): a snapshot's objects under `<prefix>/<db>/<lsn>/` in either
//! of those formats (a removed key keeps its version: version -1, status 1 and the version as
//! its value, or status 1 with the version in partitions), then `<prefix>/<db>/nun.manifest`,
//! written last, naming each object with its length and CRC32. A reader follows the manifest,
//! so it never sees half a snapshot.

use std::collections::HashMap;

use crate::db::{security, Entry, TOKEN_KEY, USER_KEY_PREFIX};
use crate::protocol::Strategy;

/// The manifest's object name inside a database's folder.
pub const MANIFEST: &str = "nun.manifest";
const MAGIC: &str = "nun-db-s3-snapshot 1";
const STATUS_LIVE: i32 = 0;
const STATUS_REMOVED: i32 = 1;

/// How a snapshot's entries are split into objects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// `nun.keys` + `nun.values`.
    KeysValues,
    /// `<n>.nun` partitions of the given count.
    Partitions(usize),
}

impl Layout {
    fn name(self) -> &'static str {
        match self {
            Layout::KeysValues => "s3",
            Layout::Partitions(_) => "s3_patition",
        }
    }
}

/// One object of a snapshot: its name inside the snapshot folder and its bytes.
pub type Object = (String, Vec<u8>);

/// What a manifest says about a snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    /// Database name.
    pub db: String,
    /// Every log record up to this LSN is in the snapshot.
    pub lsn: u64,
    /// The database's conflict strategy.
    pub strategy: Strategy,
    /// True for the partition format.
    pub partitioned: bool,
    /// Entries in the snapshot (tombstones included).
    pub keys: u64,
    /// (object key in the bucket, length, CRC32) of every object.
    pub objects: Vec<(String, u64, u32)>,
}

/// The folder every database sits in: `prefix/`, or the bucket's root without a prefix.
pub fn root(prefix: &str) -> String {
    let prefix = prefix.trim_matches('/');
    if prefix.is_empty() {
        String::new()
    } else {
        format!("{prefix}/")
    }
}

/// The folder of `db` under `prefix`.
pub fn db_folder(prefix: &str, db: &str) -> String {
    format!("{}{db}/", root(prefix))
}

/// The folder of the snapshot at `lsn` of `db`.
pub fn snapshot_folder(prefix: &str, db: &str, lsn: u64) -> String {
    format!("{}{lsn:020}/", db_folder(prefix, db))
}

fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_i32(out: &mut Vec<u8>, v: i32) {
    out.extend_from_slice(&v.to_le_bytes());
}

/// A stable partition for `key` (FNV-1a), so a key always lands in the same object.
fn partition_of(key: &str, n: usize) -> usize {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (h % n.max(1) as u64) as usize
}

/// Encodes `entries` into the objects of `layout`.
pub fn encode(entries: &[(String, Entry)], layout: Layout) -> Vec<Object> {
    match layout {
        Layout::KeysValues => {
            let (mut keys, mut values) = (Vec::new(), Vec::new());
            for (key, entry) in entries {
                let addr = values.len() as u64;
                let tombstone;
                let (version, value, status) = if entry.deleted {
                    tombstone = entry.version.to_string();
                    (-1, tombstone.as_str(), STATUS_REMOVED)
                } else {
                    (entry.version, &*entry.value, STATUS_LIVE)
                };
                put_u64(&mut values, value.len() as u64);
                values.extend_from_slice(value.as_bytes());
                put_i32(&mut values, status);
                put_u64(&mut keys, key.len() as u64);
                keys.extend_from_slice(key.as_bytes());
                put_i32(&mut keys, version);
                put_u64(&mut keys, addr);
            }
            vec![("nun.keys".into(), keys), ("nun.values".into(), values)]
        }
        Layout::Partitions(n) => {
            let n = n.max(1);
            let mut parts = vec![Vec::new(); n];
            for (key, entry) in entries {
                let out = &mut parts[partition_of(key, n)];
                let (value, status) = if entry.deleted {
                    ("", STATUS_REMOVED)
                } else {
                    (&*entry.value, STATUS_LIVE)
                };
                put_u64(out, key.len() as u64);
                out.extend_from_slice(key.as_bytes());
                put_u64(out, value.len() as u64);
                out.extend_from_slice(value.as_bytes());
                put_i32(out, status);
                put_i32(out, entry.version);
            }
            parts
                .into_iter()
                .enumerate()
                .map(|(i, p)| (format!("{i}.nun"), p))
                .collect()
        }
    }
}

/// The manifest text for a snapshot of `db` at `lsn` whose objects were stored at `objects`.
pub fn manifest_text(m: &Manifest) -> String {
    let mut body = format!(
        "{MAGIC}\ndb {}\nlsn {}\nstrategy {}\nlayout {}\nkeys {}\n",
        m.db,
        m.lsn,
        m.strategy.name(),
        if m.partitioned {
            Layout::Partitions(0).name()
        } else {
            Layout::KeysValues.name()
        },
        m.keys
    );
    for (key, len, crc) in &m.objects {
        body.push_str(&format!("object {key} {len} {crc:08x}\n"));
    }
    let crc = crc32fast::hash(body.as_bytes());
    format!("{body}crc {crc:08x}\n")
}

/// Parses a manifest; the error names `object` (the manifest's key).
pub fn parse_manifest(text: &[u8], object: &str) -> Result<Manifest, String> {
    let bad = |why: &str| format!("corrupted snapshot manifest s3 object {object}: {why}");
    let text = std::str::from_utf8(text).map_err(|_| bad("not UTF-8"))?;
    let (body, crc_line) = text.rsplit_once("crc ").ok_or_else(|| bad("no checksum"))?;
    let crc = u32::from_str_radix(crc_line.trim(), 16).map_err(|_| bad("bad checksum line"))?;
    if crc32fast::hash(body.as_bytes()) != crc {
        return Err(bad("checksum mismatch (truncated or altered)"));
    }
    let mut lines = body.lines();
    if lines.next() != Some(MAGIC) {
        return Err(bad("unknown format"));
    }
    let mut field = |name: &str| -> Result<String, String> {
        let line = lines.next().ok_or_else(|| bad("truncated"))?;
        line.strip_prefix(name)
            .and_then(|r| r.strip_prefix(' '))
            .map(str::to_string)
            .ok_or_else(|| bad(&format!("expected `{name}`")))
    };
    let db = field("db")?;
    let lsn = field("lsn")?.parse().map_err(|_| bad("bad lsn"))?;
    let strategy = Strategy::parse(&field("strategy")?).ok_or_else(|| bad("bad strategy"))?;
    let partitioned = match field("layout")?.as_str() {
        "s3" => false,
        "s3_patition" => true,
        _ => return Err(bad("bad layout")),
    };
    let keys = field("keys")?.parse().map_err(|_| bad("bad key count"))?;
    let mut objects = Vec::new();
    for line in lines {
        let parts: Vec<&str> = line.split(' ').collect();
        match parts.as_slice() {
            ["object", key, len, crc] => objects.push((
                key.to_string(),
                len.parse().map_err(|_| bad("bad object length"))?,
                u32::from_str_radix(crc, 16).map_err(|_| bad("bad object crc"))?,
            )),
            _ => return Err(bad("bad object line")),
        }
    }
    Ok(Manifest {
        db,
        lsn,
        strategy,
        partitioned,
        keys,
        objects,
    })
}

/// Reads little-endian fields from an object, naming it in errors.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
    object: &'a str,
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8], object: &'a str) -> Self {
        Reader {
            bytes,
            pos: 0,
            object,
        }
    }

    fn done(&self) -> bool {
        self.pos >= self.bytes.len()
    }

    fn fail(&self, why: &str) -> String {
        format!(
            "corrupted s3 object {} at offset {}: {why}",
            self.object, self.pos
        )
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], String> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|e| *e <= self.bytes.len())
            .ok_or_else(|| self.fail(&format!("truncated {what}")))?;
        let s = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn u64(&mut self, what: &str) -> Result<u64, String> {
        let b = self.take(8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }

    fn i32(&mut self, what: &str) -> Result<i32, String> {
        let b = self.take(4, what)?;
        Ok(i32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn text(&mut self, what: &str) -> Result<&'a str, String> {
        let len = usize::try_from(self.u64(&format!("{what} length"))?)
            .map_err(|_| self.fail(&format!("{what} too long")))?;
        let b = self.take(len, what)?;
        std::str::from_utf8(b).map_err(|_| self.fail(&format!("{what} is not UTF-8")))
    }
}

/// Entries in order, later records of a key replacing earlier ones.
#[derive(Debug, Default)]
struct Collected {
    order: Vec<String>,
    entries: HashMap<String, Entry>,
}

impl Collected {
    fn put(&mut self, key: &str, entry: Entry) {
        if self.entries.insert(key.to_string(), entry).is_none() {
            self.order.push(key.to_string());
        }
    }

    fn finish(mut self) -> Vec<(String, Entry)> {
        self.order
            .into_iter()
            .filter_map(|k| self.entries.remove(&k).map(|e| (k, e)))
            .collect()
    }
}

/// Parses `nun.keys` + `nun.values` (NunDB's `s3` layout, and ours).
pub fn parse_keys_values(
    keys: &[u8],
    values: &[u8],
    keys_object: &str,
    values_object: &str,
) -> Result<Vec<(String, Entry)>, String> {
    let mut out = Collected::default();
    let mut k = Reader::new(keys, keys_object);
    while !k.done() {
        let key = k.text("key")?.to_string();
        let version = k.i32("version")?;
        let addr = usize::try_from(k.u64("value offset")?).map_err(|_| k.fail("bad offset"))?;
        if addr > values.len() {
            return Err(k.fail("value offset past the end of the values object"));
        }
        let mut v = Reader::new(values, values_object);
        v.pos = addr;
        let value = v.text("value")?;
        let status = v.i32("status")?;
        let entry = if version == -1 {
            // Ours keep the tombstone's version in the value; NunDB's have none.
            let v = if status == STATUS_REMOVED {
                value.parse().unwrap_or(0)
            } else {
                0
            };
            Entry::removed(v)
        } else {
            Entry::live(value, version)
        };
        out.put(&key, entry);
    }
    Ok(out.finish())
}

/// Parses one `<n>.nun` partition (NunDB's `s3_patition` layout, and ours).
pub fn parse_partition(bytes: &[u8], object: &str) -> Result<Vec<(String, Entry)>, String> {
    let mut out = Collected::default();
    let mut r = Reader::new(bytes, object);
    while !r.done() {
        let key = r.text("key")?.to_string();
        let value = r.text("value")?.to_string();
        let status = r.i32("status")?;
        let version = r.i32("version")?;
        let entry = if status == STATUS_REMOVED || version == -1 {
            Entry::removed(version.max(0))
        } else {
            Entry::live(&value, version)
        };
        out.put(&key, entry);
    }
    Ok(out.finish())
}

/// Hashes plain secrets (NunDB stores tokens and passwords as they are).
pub fn hash_plain_secrets(entries: &mut [(String, Entry)]) {
    for (key, entry) in entries {
        let secret = key == TOKEN_KEY || key.starts_with(USER_KEY_PREFIX);
        if secret && !entry.deleted && !security::is_hashed(&entry.value) {
            entry.value = security::hash_secret(&entry.value).into();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<(String, Entry)> {
        vec![
            ("a".into(), Entry::live("x y", 3)),
            ("gone".into(), Entry::removed(5)),
            ("b".into(), Entry::live("", 0)),
        ]
    }

    #[test]
    fn both_layouts_round_trip_with_tombstone_versions() {
        let objects = encode(&sample(), Layout::KeysValues);
        let parsed = parse_keys_values(&objects[0].1, &objects[1].1, "k", "v").unwrap();
        assert_eq!(parsed, sample());
        let parts = encode(&sample(), Layout::Partitions(3));
        assert_eq!(parts.len(), 3);
        let mut all: Vec<(String, Entry)> = parts
            .iter()
            .flat_map(|(name, bytes)| parse_partition(bytes, name).unwrap())
            .collect();
        all.sort_by(|x, y| x.0.cmp(&y.0));
        let mut want = sample();
        want.sort_by(|x, y| x.0.cmp(&y.0));
        assert_eq!(all, want);
    }

    #[test]
    fn later_records_override_and_truncation_names_the_object() {
        let mut keys = Vec::new();
        let mut values = Vec::new();
        for (key, value, version) in [
            ("k", "old", 1),
            ("k", "new", 2),
            ("d", "x", 0),
            ("d", "", -1),
        ] {
            let addr = values.len() as u64;
            put_u64(&mut values, value.len() as u64);
            values.extend_from_slice(value.as_bytes());
            put_i32(&mut values, 0);
            put_u64(&mut keys, key.len() as u64);
            keys.extend_from_slice(key.as_bytes());
            put_i32(&mut keys, version);
            put_u64(&mut keys, addr);
        }
        let parsed = parse_keys_values(&keys, &values, "p/db/nun.keys", "p/db/nun.values").unwrap();
        assert_eq!(
            parsed,
            vec![
                ("k".into(), Entry::live("new", 2)),
                ("d".into(), Entry::removed(0))
            ]
        );
        let e =
            parse_keys_values(&keys[..keys.len() - 3], &values, "p/db/nun.keys", "v").unwrap_err();
        assert!(e.contains("p/db/nun.keys"), "{e}");
    }

    #[test]
    fn manifests_round_trip_and_detect_damage() {
        let m = Manifest {
            db: "d".into(),
            lsn: 42,
            strategy: Strategy::Arbiter,
            partitioned: false,
            keys: 3,
            objects: vec![("p/d/00000000000000000042/nun.keys".into(), 10, 0xdeadbeef)],
        };
        let text = manifest_text(&m);
        assert_eq!(
            parse_manifest(text.as_bytes(), "p/d/nun.manifest").unwrap(),
            m
        );
        let cut = &text.as_bytes()[..text.len() - 20];
        let e = parse_manifest(cut, "p/d/nun.manifest").unwrap_err();
        assert!(e.contains("p/d/nun.manifest"), "{e}");
        assert_eq!(db_folder("", "d"), "d/");
        assert_eq!(snapshot_folder("p/", "d", 7), "p/d/00000000000000000007/");
    }
}
