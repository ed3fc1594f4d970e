//! Snapshot files of one database, in NunDB's layout so its data dirs can be imported:
//! `<db>-nun.data.keys` (`key_len u64 LE, key, version i32, value_addr u64`, version -1 = removed),
//! `<db>-nun.data.values` (`value_len u64 LE, value, status i32`), `<db>-nun.madadata`
//! (`db_id u64 LE, strategy i32`), plus our manifest `<db>-nun.snapshot` holding the LSN and the
//! length and CRC32 of each file. The manifest's rename is the commit point.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use crate::db::security;
use crate::db::{Entry, TOKEN_KEY, USER_KEY_PREFIX};
use crate::protocol::Strategy;

use super::oplog::sync_dir;
use super::tmp_path as tmp;

const KEYS: &str = "-nun.data.keys";
const VALUES: &str = "-nun.data.values";
const META: &str = "-nun.madadata";
const MANIFEST: &str = "-nun.snapshot";
const MAGIC: &str = "nun-db-snapshot 1";

/// Value status in the values file: a live value.
const STATUS_LIVE: i32 = 0;
/// Value status for a removed key: the value holds the tombstone's version.
const STATUS_REMOVED: i32 = 1;

/// One database as stored on disk.
#[derive(Debug, Clone)]
pub struct DbSnapshot {
    /// Database name.
    pub name: String,
    /// Conflict strategy.
    pub strategy: Strategy,
    /// Every record up to this LSN is included.
    pub lsn: u64,
    /// Keys with their entries (tombstones included).
    pub entries: Vec<(String, Entry)>,
    /// True when read from NunDB files without our manifest (to be re-written as ours).
    pub imported: bool,
}

fn file(dir: &Path, db: &str, suffix: &str) -> PathBuf {
    dir.join(format!("{db}{suffix}"))
}

/// Writes data through a CRC while counting bytes.
struct Checked<W: Write> {
    inner: W,
    crc: crc32fast::Hasher,
    len: u64,
}

impl<W: Write> Checked<W> {
    fn new(inner: W) -> Self {
        Checked {
            inner,
            crc: crc32fast::Hasher::new(),
            len: 0,
        }
    }
    fn put(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.crc.update(bytes);
        self.len += bytes.len() as u64;
        self.inner.write_all(bytes)
    }
}

fn finish(c: Checked<BufWriter<File>>) -> io::Result<(u64, u32)> {
    let file = c.inner.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()?;
    Ok((c.len, c.crc.finalize()))
}

/// Writes `snap` atomically (temp files, fsync, manifest rename, then file renames).
pub fn write(dir: &Path, snap: &DbSnapshot) -> io::Result<()> {
    write_chunks(
        dir,
        &snap.name,
        snap.strategy,
        snap.lsn,
        std::iter::once(snap.entries.clone()),
    )
}

/// Writes a snapshot whose entries arrive in chunks (in key order), atomically. Entries may be
/// newer than `lsn` (a fuzzy snapshot): replaying the log after `lsn` is idempotent.
pub fn write_chunks(
    dir: &Path,
    name: &str,
    strategy: Strategy,
    lsn: u64,
    chunks: impl Iterator<Item = Vec<(String, Entry)>>,
) -> io::Result<()> {
    let keys_path = file(dir, name, KEYS);
    let values_path = file(dir, name, VALUES);
    let meta_path = file(dir, name, META);
    let manifest_path = file(dir, name, MANIFEST);
    let mut keys = Checked::new(BufWriter::with_capacity(
        1 << 20,
        File::create(tmp(&keys_path))?,
    ));
    let mut values = Checked::new(BufWriter::with_capacity(
        1 << 20,
        File::create(tmp(&values_path))?,
    ));
    for (key, entry) in chunks.flatten() {
        let addr = values.len;
        let tombstone;
        let (version, value, status) = if entry.deleted {
            tombstone = entry.version.to_string();
            (-1, tombstone.as_str(), STATUS_REMOVED)
        } else {
            (entry.version, &*entry.value, STATUS_LIVE)
        };
        values.put(&(value.len() as u64).to_le_bytes())?;
        values.put(value.as_bytes())?;
        values.put(&status.to_le_bytes())?;
        keys.put(&(key.len() as u64).to_le_bytes())?;
        keys.put(key.as_bytes())?;
        keys.put(&version.to_le_bytes())?;
        keys.put(&addr.to_le_bytes())?;
    }
    let (keys_len, keys_crc) = finish(keys)?;
    let (values_len, values_crc) = finish(values)?;
    let mut meta = File::create(tmp(&meta_path))?;
    let db_id = crc32fast::hash(name.as_bytes()) as u64;
    meta.write_all(&db_id.to_le_bytes())?;
    meta.write_all(&strategy.code().to_le_bytes())?;
    meta.sync_all()?;
    let body = format!(
        "{MAGIC}\nlsn {lsn}\nstrategy {}\nkeys {keys_len} {keys_crc:08x}\nvalues {values_len} {values_crc:08x}\n",
        strategy.name()
    );
    let manifest = format!("{body}crc {:08x}\n", crc32fast::hash(body.as_bytes()));
    super::write_durably(&manifest_path, &manifest)?;
    roll_forward(dir, name)?;
    Ok(())
}

/// Completes the renames of a committed snapshot (its manifest already names the temp files' CRCs).
fn roll_forward(dir: &Path, db: &str) -> io::Result<()> {
    let mut moved = false;
    for suffix in [KEYS, VALUES, META] {
        let path = file(dir, db, suffix);
        if tmp(&path).exists() {
            fs::rename(tmp(&path), &path)?;
            moved = true;
        }
    }
    if moved {
        sync_dir(dir)?;
    }
    Ok(())
}

/// Deletes every snapshot file of `db`.
pub fn remove(dir: &Path, db: &str) -> io::Result<()> {
    for suffix in [MANIFEST, KEYS, VALUES, META] {
        for path in [file(dir, db, suffix), tmp(&file(dir, db, suffix))] {
            match fs::remove_file(&path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
    }
    sync_dir(dir)
}

struct Manifest {
    lsn: u64,
    strategy: Strategy,
    keys: (u64, u32),
    values: (u64, u32),
}

fn parse_manifest(path: &Path) -> Result<Manifest, String> {
    let bad = |why: &str| format!("corrupted snapshot manifest {}: {why}", path.display());
    let text = fs::read_to_string(path).map_err(|e| bad(&e.to_string()))?;
    let (body, crc_line) = text
        .rsplit_once("crc ")
        .ok_or_else(|| bad("no checksum line"))?;
    let crc = u32::from_str_radix(crc_line.trim(), 16).map_err(|_| bad("bad checksum line"))?;
    if crc32fast::hash(body.as_bytes()) != crc {
        return Err(bad("checksum mismatch"));
    }
    let mut lines = body.lines();
    if lines.next() != Some(MAGIC) {
        return Err(bad("unknown format"));
    }
    let mut field = |name: &str| -> Result<Vec<String>, String> {
        let line = lines.next().ok_or_else(|| bad("truncated"))?;
        let mut parts = line.split(' ');
        if parts.next() != Some(name) {
            return Err(bad(&format!("expected `{name}`")));
        }
        Ok(parts.map(str::to_string).collect())
    };
    let lsn = field("lsn")?
        .first()
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| bad("bad lsn"))?;
    let strategy = field("strategy")?
        .first()
        .and_then(|v| Strategy::parse(v))
        .ok_or_else(|| bad("bad strategy"))?;
    let mut sized = |name: &str| -> Result<(u64, u32), String> {
        let f = field(name)?;
        match f.as_slice() {
            [len, crc] => Ok((
                len.parse().map_err(|_| bad("bad length"))?,
                u32::from_str_radix(crc, 16).map_err(|_| bad("bad crc"))?,
            )),
            _ => Err(bad(&format!("bad `{name}` line"))),
        }
    };
    let keys = sized("keys")?;
    let values = sized("values")?;
    Ok(Manifest {
        lsn,
        strategy,
        keys,
        values,
    })
}

fn matches_expected(path: &Path, expected: (u64, u32)) -> bool {
    fs::read(path)
        .map(|b| b.len() as u64 == expected.0 && crc32fast::hash(&b) == expected.1)
        .unwrap_or(false)
}

fn le_u64(b: &[u8], at: usize) -> Option<u64> {
    let s = b.get(at..at.checked_add(8)?)?;
    let mut a = [0u8; 8];
    a.copy_from_slice(s);
    Some(u64::from_le_bytes(a))
}

fn le_i32(b: &[u8], at: usize) -> Option<i32> {
    let s = b.get(at..at.checked_add(4)?)?;
    Some(i32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

/// Parses keys + values files into entries. NunDB's removed keys (version -1 without our
/// tombstone status) are dropped.
fn parse_entries(
    keys: &[u8],
    values: &[u8],
    keys_path: &Path,
) -> Result<Vec<(String, Entry)>, String> {
    let bad = |at: usize, why: &str| {
        format!(
            "corrupted snapshot file {} at offset {at}: {why}",
            keys_path.display()
        )
    };
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < keys.len() {
        let key_len = le_u64(keys, pos).ok_or_else(|| bad(pos, "truncated key length"))? as usize;
        let key_start = pos + 8;
        let key_end = key_start
            .checked_add(key_len)
            .filter(|e| *e <= keys.len())
            .ok_or_else(|| bad(pos, "key runs past the end"))?;
        let key = std::str::from_utf8(&keys[key_start..key_end])
            .map_err(|_| bad(pos, "key is not UTF-8"))?
            .to_string();
        let version = le_i32(keys, key_end).ok_or_else(|| bad(pos, "truncated version"))?;
        let addr =
            le_u64(keys, key_end + 4).ok_or_else(|| bad(pos, "truncated value address"))? as usize;
        pos = key_end + 12;
        let value_len =
            le_u64(values, addr).ok_or_else(|| bad(pos, "value address out of range"))? as usize;
        let value_end = (addr + 8)
            .checked_add(value_len)
            .filter(|e| *e <= values.len())
            .ok_or_else(|| bad(pos, "value runs past the end"))?;
        let value = std::str::from_utf8(&values[addr + 8..value_end])
            .map_err(|_| bad(pos, "value is not UTF-8"))?;
        let status = le_i32(values, value_end).unwrap_or(STATUS_LIVE);
        if version == -1 {
            if status == STATUS_REMOVED {
                if let Ok(v) = value.parse::<i32>() {
                    out.push((key, Entry::removed(v)));
                }
            }
            continue;
        }
        out.push((key, Entry::live(value, version)));
    }
    Ok(out)
}

fn db_names(dir: &Path) -> io::Result<Vec<(String, bool)>> {
    let mut names: HashMap<String, bool> = HashMap::new();
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if let Some(db) = name.strip_suffix(MANIFEST) {
            names.insert(db.to_string(), true);
        } else if let Some(db) = name.strip_suffix(META) {
            names.entry(db.to_string()).or_insert(false);
        }
    }
    let mut v: Vec<(String, bool)> = names.into_iter().collect();
    v.sort();
    Ok(v)
}

/// Names of the databases with files in `dir`.
pub fn stored_names(dir: &Path) -> io::Result<Vec<String>> {
    Ok(db_names(dir)?.into_iter().map(|(n, _)| n).collect())
}

/// What a loaded snapshot is, without its entries.
#[derive(Debug, Clone)]
pub struct SnapshotInfo {
    /// Database name.
    pub name: String,
    /// Conflict strategy.
    pub strategy: Strategy,
    /// Every record up to this LSN is included.
    pub lsn: u64,
    /// True when read from NunDB files without our manifest (to be re-written as ours).
    pub imported: bool,
}

/// A batch of loaded entries.
pub type Chunk = Vec<(String, Entry)>;

/// Entries handed to the loader at a time (keeps start-up memory flat).
const LOAD_CHUNK: usize = 16 * 1024;

/// Loads every database snapshot in `dir`, ours (checksummed, streamed) and NunDB's (imported),
/// handing entries to `sink` in chunks; the first chunk of each database may be empty.
pub fn load_all(
    dir: &Path,
    sink: &mut dyn FnMut(&SnapshotInfo, Chunk),
) -> Result<Vec<SnapshotInfo>, String> {
    let names = db_names(dir).map_err(|e| format!("cannot list {}: {e}", dir.display()))?;
    let mut out = Vec::new();
    for (name, ours) in names {
        let keys_path = file(dir, &name, KEYS);
        let values_path = file(dir, &name, VALUES);
        if ours {
            let m = parse_manifest(&file(dir, &name, MANIFEST))?;
            // A crash may have stopped the renames after the manifest was committed: finish
            // each file whose temp copy is the one the manifest describes.
            for (path, expected) in [(&keys_path, m.keys), (&values_path, m.values)] {
                if matches_expected(&tmp(path), expected) {
                    fs::rename(tmp(path), path)
                        .map_err(|e| format!("cannot finish snapshot of {name}: {e}"))?;
                }
            }
            let meta_path = file(dir, &name, META);
            if tmp(&meta_path).exists() {
                fs::rename(tmp(&meta_path), &meta_path)
                    .map_err(|e| format!("cannot finish snapshot of {name}: {e}"))?;
            }
            let info = SnapshotInfo {
                name,
                strategy: m.strategy,
                lsn: m.lsn,
                imported: false,
            };
            sink(&info, Vec::new());
            stream_ours(&keys_path, &values_path, &m, &mut |chunk| {
                sink(&info, chunk)
            })?;
            out.push(info);
        } else {
            let snap = import_nundb(dir, &name)?;
            let info = SnapshotInfo {
                name: snap.name,
                strategy: snap.strategy,
                lsn: snap.lsn,
                imported: true,
            };
            sink(&info, snap.entries);
            out.push(info);
        }
    }
    Ok(out)
}

/// A reader that checksums and counts what passes through it.
struct CrcReader<R: Read> {
    inner: R,
    crc: crc32fast::Hasher,
    len: u64,
}

impl<R: Read> Read for CrcReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.crc.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }
}

fn crc_reader(path: &Path) -> Result<CrcReader<BufReader<File>>, String> {
    let f =
        File::open(path).map_err(|e| format!("cannot read snapshot {}: {e}", path.display()))?;
    Ok(CrcReader {
        inner: BufReader::with_capacity(1 << 20, f),
        crc: crc32fast::Hasher::new(),
        len: 0,
    })
}

/// Reads `n` bytes, refusing lengths larger than what is left of the file (a flipped length
/// must not become a huge allocation).
fn take_bytes(r: &mut impl Read, n: u64, left: u64) -> Option<Vec<u8>> {
    if n > left {
        return None;
    }
    let mut buf = vec![0u8; n as usize];
    r.read_exact(&mut buf).ok()?;
    Some(buf)
}

fn read_u64(r: &mut impl Read) -> Option<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b).ok()?;
    Some(u64::from_le_bytes(b))
}

fn read_i32(r: &mut impl Read) -> Option<i32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b).ok()?;
    Some(i32::from_le_bytes(b))
}

/// Streams our keys + values files (values are written in key order, so both are read
/// sequentially) and verifies both checksums at the end.
fn stream_ours(
    keys_path: &Path,
    values_path: &Path,
    m: &Manifest,
    sink: &mut dyn FnMut(Chunk),
) -> Result<(), String> {
    let corrupt = |path: &Path, why: &str| {
        format!(
            "corrupted snapshot file {}: {why}; refusing to start (restore or move the file away)",
            path.display()
        )
    };
    let mut keys = crc_reader(keys_path)?;
    let mut values = crc_reader(values_path)?;
    let mut chunk = Vec::with_capacity(LOAD_CHUNK);
    while keys.len < m.keys.0 {
        let bad_key = || corrupt(keys_path, "malformed key record");
        let bad_value = || corrupt(values_path, "malformed value record");
        let key_len = read_u64(&mut keys).ok_or_else(bad_key)?;
        let left = m.keys.0.saturating_sub(keys.len);
        let key = take_bytes(&mut keys, key_len, left)
            .and_then(|b| String::from_utf8(b).ok())
            .ok_or_else(bad_key)?;
        let version = read_i32(&mut keys).ok_or_else(bad_key)?;
        let addr = read_u64(&mut keys).ok_or_else(bad_key)?;
        if addr != values.len {
            return Err(corrupt(keys_path, "value address out of sequence"));
        }
        let value_len = read_u64(&mut values).ok_or_else(bad_value)?;
        let left = m.values.0.saturating_sub(values.len);
        let value = take_bytes(&mut values, value_len, left)
            .and_then(|b| String::from_utf8(b).ok())
            .ok_or_else(bad_value)?;
        let status = read_i32(&mut values).ok_or_else(bad_value)?;
        if version != -1 {
            chunk.push((key, Entry::live(&value, version)));
        } else if status == STATUS_REMOVED {
            let v = value.parse::<i32>().map_err(|_| bad_value())?;
            chunk.push((key, Entry::removed(v)));
        }
        if chunk.len() == LOAD_CHUNK {
            sink(std::mem::replace(
                &mut chunk,
                Vec::with_capacity(LOAD_CHUNK),
            ));
        }
    }
    for (r, path, expected) in [
        (&mut keys, keys_path, m.keys),
        (&mut values, values_path, m.values),
    ] {
        io::copy(r, &mut io::sink()).map_err(|e| corrupt(path, &e.to_string()))?;
        if (r.len, r.crc.clone().finalize()) != expected {
            return Err(corrupt(path, "checksum mismatch"));
        }
    }
    sink(chunk);
    Ok(())
}

/// The strategy recorded in `db`'s metadata file in `dir` (ours or NunDB's), if any.
pub fn local_strategy(dir: &Path, db: &str) -> Option<Strategy> {
    let meta = fs::read(file(dir, db, META)).ok()?;
    le_i32(&meta, 8).and_then(Strategy::from_code)
}

/// Reads a NunDB database (no checksums exist); secrets are re-hashed.
fn import_nundb(dir: &Path, name: &str) -> Result<DbSnapshot, String> {
    let meta_path = file(dir, name, META);
    let meta =
        fs::read(&meta_path).map_err(|e| format!("cannot read {}: {e}", meta_path.display()))?;
    let strategy = le_i32(&meta, 8)
        .and_then(Strategy::from_code)
        .ok_or_else(|| format!("corrupted NunDB metadata file {}", meta_path.display()))?;
    let keys_path = file(dir, name, KEYS);
    let read = |p: &Path| match fs::read(p) {
        Ok(b) => Ok(b),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(format!("cannot read {}: {e}", p.display())),
    };
    let keys = read(&keys_path)?;
    let values = read(&file(dir, name, VALUES))?;
    let mut entries = parse_entries(&keys, &values, &keys_path)?;
    for (key, entry) in &mut entries {
        let secret = key == TOKEN_KEY || key.starts_with(USER_KEY_PREFIX);
        if secret && !entry.deleted && !security::is_hashed(&entry.value) {
            entry.value = security::hash_secret(&entry.value).into();
        }
    }
    log::info!(
        "importing NunDB database {name} ({} keys) from {}",
        entries.len(),
        dir.display()
    );
    Ok(DbSnapshot {
        name: name.to_string(),
        strategy,
        lsn: 0,
        entries,
        imported: true,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir() -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "nundb-snap-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        fs::create_dir_all(&d).unwrap();
        d
    }

    fn entry(value: &str, version: i32, deleted: bool) -> Entry {
        if deleted {
            Entry::removed(version)
        } else {
            Entry::live(value, version)
        }
    }

    #[test]
    fn round_trip_and_corruption() {
        let dir = tmpdir();
        let snap = DbSnapshot {
            name: "d".into(),
            strategy: Strategy::Newer,
            lsn: 77,
            entries: vec![
                ("a".into(), entry("x y", 3, false)),
                ("gone".into(), entry("", 5, true)),
            ],
            imported: false,
        };
        write(&dir, &snap).unwrap();
        let mut entries = Vec::new();
        let loaded = load_all(&dir, &mut |_, chunk| entries.extend(chunk)).unwrap();
        assert_eq!(loaded.len(), 1);
        assert_eq!(loaded[0].lsn, 77);
        assert_eq!(loaded[0].strategy, Strategy::Newer);
        assert_eq!(entries, snap.entries);
        let values = file(&dir, "d", VALUES);
        let mut bytes = fs::read(&values).unwrap();
        bytes[9] ^= 1;
        fs::write(&values, bytes).unwrap();
        let e = load_all(&dir, &mut |_, _| {}).unwrap_err();
        assert!(e.contains("d-nun.data.values"), "{e}");
        let _ = fs::remove_dir_all(&dir);
    }
}
