//! Snapshots in S3-compatible object storage (NunDB's `NUN_STORAGE_STRATEGY=s3`). The operation
//! log stays on local disk; snapshots go to the bucket as objects first and a manifest last
//! ([`layout`]), and the log is only truncated past what is safely in the bucket. At start-up a
//! node loads each database's newest manifest (or NunDB's own objects) and replays its local
//! log past it.

pub mod client;
pub mod layout;
pub mod sigv4;

use std::collections::BTreeMap;
use std::sync::Mutex;

use client::{BucketClient, S3Error};
use layout::{Layout, Manifest, MANIFEST};

use crate::db::Entry;
use crate::protocol::Strategy;

/// Where snapshots are read from or written to (NunDB's `NUN_STORAGE_*_STRATEGY`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    /// Files in the data directory.
    Disk,
    /// The bucket, keys + values objects.
    S3,
    /// The bucket, partition objects.
    S3Partitioned,
}

impl Place {
    /// Parses NunDB's names: `disk`, `s3`, `s3_patition` (sic) or `s3_partition`.
    pub fn parse(name: &str) -> Option<Place> {
        match name {
            "disk" => Some(Place::Disk),
            "s3" => Some(Place::S3),
            "s3_patition" | "s3_partition" => Some(Place::S3Partitioned),
            _ => None,
        }
    }

    /// True for the bucket.
    pub fn is_s3(self) -> bool {
        self != Place::Disk
    }
}

/// How to reach the bucket (NunDB's NUN_S3_* settings, or the standard AWS ones).
#[derive(Debug, Clone)]
pub struct S3Config {
    /// Endpoint (NUN_S3_API_URL), `http://` or `https://`.
    pub api_url: String,
    /// Bucket name (NUN_S3_BUCKET).
    pub bucket: String,
    /// Folder snapshots are written under (NUN_S3_PREFIX).
    pub prefix: String,
    /// Folder snapshots are read from (NUN_S3_READ_PREFIX, default the prefix).
    pub read_prefix: String,
    /// Access key (NUN_S3_KEY_ID, else AWS_ACCESS_KEY_ID).
    pub key_id: String,
    /// Secret key (NUN_S3_SECRET_KEY, else AWS_SECRET_ACCESS_KEY).
    pub secret_key: String,
    /// Signing region (AWS_REGION, else NunDB's `us-east`).
    pub region: String,
    /// Requests in flight at once (NUN_S3_MAX_INFLIGHT_REQUESTS).
    pub max_inflight: usize,
    /// Partitions of the `s3_patition` layout (NUN_S3_NUMBER_OF_PARTITIONS).
    pub partitions: usize,
    /// Retries of a failed request, with backoff (NUN_S3_RETRY).
    pub retry: u32,
}

impl Default for S3Config {
    fn default() -> Self {
        S3Config {
            api_url: "http://127.0.0.1:9000".into(),
            bucket: "nun-db".into(),
            prefix: "nun-db-base".into(),
            read_prefix: "nun-db-base".into(),
            key_id: "nun-db".into(),
            secret_key: String::new(),
            region: "us-east".into(),
            max_inflight: 10,
            partitions: 10,
            retry: 3,
        }
    }
}

/// One database as found in the bucket.
#[derive(Debug)]
pub struct Loaded {
    /// Database name.
    pub name: String,
    /// Strategy (from our manifest; NunDB's objects do not say).
    pub strategy: Option<Strategy>,
    /// LSN the snapshot covers (0 for NunDB's objects).
    pub lsn: u64,
    /// Entries, tombstones included.
    pub entries: Vec<(String, Entry)>,
    /// True when read from NunDB's objects rather than a manifest of ours.
    pub imported: bool,
    /// Where it came from (for the start-up log line).
    pub source: String,
}

impl Loaded {
    /// A database read from NunDB's objects: no strategy, no LSN, secrets hashed.
    fn from_nundb(name: &str, mut entries: Vec<(String, Entry)>, source: String) -> Loaded {
        layout::hash_plain_secrets(&mut entries);
        Loaded {
            name: name.to_string(),
            strategy: None,
            lsn: 0,
            entries,
            imported: true,
            source,
        }
    }
}

/// The bucket snapshots go to and come from.
#[derive(Debug)]
pub struct Remote {
    client: BucketClient,
    config: S3Config,
    write: Place,
    /// The manifest each database has in the bucket (what old objects can be removed).
    current: Mutex<BTreeMap<String, Manifest>>,
}

impl Remote {
    /// Connects to the bucket and checks that the credentials may list it: a clear error here
    /// (wrong credentials, no such bucket, unreachable) stops the node at start-up.
    pub fn connect(config: S3Config, write: Place) -> Result<Remote, String> {
        let client = BucketClient::new(&config)?;
        client
            .list(&layout::root(&config.prefix))
            .map_err(|e| format!("the S3 bucket cannot be used: {e}"))?;
        Ok(Remote {
            client,
            config,
            write,
            current: Mutex::new(BTreeMap::new()),
        })
    }

    /// Loads every database under the read prefix: our manifests first, else NunDB's objects.
    /// A corrupt or truncated object is an error naming it.
    pub fn load_all(&self) -> Result<Vec<Loaded>, String> {
        let prefix = layout::root(&self.config.read_prefix);
        let objects = self
            .client
            .list(&prefix)
            .map_err(|e| format!("cannot list the S3 snapshots: {e}"))?;
        let mut by_db: BTreeMap<String, Vec<(String, u64)>> = BTreeMap::new();
        for (key, size) in objects {
            if let Some((db, _)) = key[prefix.len()..].split_once('/') {
                by_db.entry(db.to_string()).or_default().push((key, size));
            }
        }
        let mut out = Vec::new();
        for (db, objects) in by_db {
            let folder = layout::db_folder(&self.config.read_prefix, &db);
            let has = |name: &str| objects.iter().any(|(k, _)| *k == format!("{folder}{name}"));
            if has(MANIFEST) {
                out.push(self.load_ours(&db, &folder)?);
            } else if has("nun.keys") {
                out.push(self.load_nundb_keys_values(&db, &folder)?);
            } else {
                let parts: Vec<String> = objects
                    .iter()
                    .map(|(k, _)| k.clone())
                    .filter(|k| {
                        k[folder.len()..]
                            .strip_suffix(".nun")
                            .is_some_and(|n| n.parse::<u64>().is_ok())
                    })
                    .collect();
                if !parts.is_empty() {
                    out.push(self.load_nundb_partitions(&db, &parts)?);
                }
            }
        }
        Ok(out)
    }

    fn fetch(&self, key: &str) -> Result<Vec<u8>, String> {
        self.client
            .get(key)
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("s3 object {key} is missing"))
    }

    fn load_ours(&self, db: &str, folder: &str) -> Result<Loaded, String> {
        let manifest_key = format!("{folder}{MANIFEST}");
        let manifest = layout::parse_manifest(&self.fetch(&manifest_key)?, &manifest_key)?;
        let mut bytes = BTreeMap::new();
        for (key, len, crc) in &manifest.objects {
            let body = self.fetch(key)?;
            if body.len() as u64 != *len || crc32fast::hash(&body) != *crc {
                return Err(format!(
                    "corrupted s3 object {key}: {} bytes with CRC {:08x}, the manifest says {len} bytes with CRC {crc:08x}",
                    body.len(),
                    crc32fast::hash(&body)
                ));
            }
            bytes.insert(key.clone(), body);
        }
        let entries = if manifest.partitioned {
            let mut all = Vec::new();
            for (key, body) in &bytes {
                all.extend(layout::parse_partition(body, key)?);
            }
            all
        } else {
            let find = |name: &str| {
                bytes
                    .iter()
                    .find(|(k, _)| k.ends_with(&format!("/{name}")))
                    .ok_or_else(|| format!("{manifest_key} names no {name} object"))
            };
            let (keys_key, keys) = find("nun.keys")?;
            let (values_key, values) = find("nun.values")?;
            layout::parse_keys_values(keys, values, keys_key, values_key)?
        };
        if entries.len() as u64 != manifest.keys {
            return Err(format!(
                "snapshot {manifest_key} holds {} entries, its manifest says {}",
                entries.len(),
                manifest.keys
            ));
        }
        let source = format!("{manifest_key} (LSN {})", manifest.lsn);
        let loaded = Loaded {
            name: db.to_string(),
            strategy: Some(manifest.strategy),
            lsn: manifest.lsn,
            entries,
            imported: false,
            source,
        };
        self.remember(manifest);
        Ok(loaded)
    }

    fn load_nundb_keys_values(&self, db: &str, folder: &str) -> Result<Loaded, String> {
        let keys_key = format!("{folder}nun.keys");
        let values_key = format!("{folder}nun.values");
        let keys = self.fetch(&keys_key)?;
        let values = self.client.get(&values_key).map_err(|e| e.to_string())?;
        let entries =
            layout::parse_keys_values(&keys, &values.unwrap_or_default(), &keys_key, &values_key)?;
        Ok(Loaded::from_nundb(
            db,
            entries,
            format!("NunDB objects {keys_key}"),
        ))
    }

    fn load_nundb_partitions(&self, db: &str, parts: &[String]) -> Result<Loaded, String> {
        let mut entries = Vec::new();
        for key in parts {
            entries.extend(layout::parse_partition(&self.fetch(key)?, key)?);
        }
        Ok(Loaded::from_nundb(
            db,
            entries,
            format!("{} NunDB partitions of {db}", parts.len()),
        ))
    }

    fn remember(&self, manifest: Manifest) {
        self.current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(manifest.db.clone(), manifest);
    }

    /// Stores a snapshot of `db`: its objects (up to NUN_S3_MAX_INFLIGHT_REQUESTS at once), then
    /// the manifest naming them, then removes the previous snapshot's objects. Until the
    /// manifest is written the previous snapshot stays the one readers see.
    pub fn write_snapshot(
        &self,
        db: &str,
        strategy: Strategy,
        lsn: u64,
        entries: &[(String, Entry)],
    ) -> Result<u64, S3Error> {
        let layout = match self.write {
            Place::S3Partitioned => Layout::Partitions(self.config.partitions),
            _ => Layout::KeysValues,
        };
        let folder = layout::snapshot_folder(&self.config.prefix, db, lsn);
        let objects: Vec<(String, Vec<u8>)> = layout::encode(entries, layout)
            .into_iter()
            .map(|(name, bytes)| (format!("{folder}{name}"), bytes))
            .collect();
        let uploaded: u64 = objects.iter().map(|(_, b)| b.len() as u64).sum();
        self.put_all(&objects)?;
        let manifest = Manifest {
            db: db.to_string(),
            lsn,
            strategy,
            partitioned: matches!(layout, Layout::Partitions(_)),
            keys: entries.len() as u64,
            objects: objects
                .iter()
                .map(|(k, b)| (k.clone(), b.len() as u64, crc32fast::hash(b)))
                .collect(),
        };
        let text = layout::manifest_text(&manifest);
        let manifest_key = format!("{}{MANIFEST}", layout::db_folder(&self.config.prefix, db));
        self.client.put(&manifest_key, text.as_bytes())?;
        self.remember(manifest.clone());
        self.remove_stale(db, &manifest);
        Ok(uploaded + text.len() as u64)
    }

    /// Uploads `objects`, several at once.
    fn put_all(&self, objects: &[(String, Vec<u8>)]) -> Result<(), S3Error> {
        let next = Mutex::new(objects.iter());
        let failed: Mutex<Option<S3Error>> = Mutex::new(None);
        let workers = self.config.max_inflight.clamp(1, objects.len().max(1));
        std::thread::scope(|scope| {
            for _ in 0..workers {
                scope.spawn(|| loop {
                    let item = next.lock().unwrap_or_else(|e| e.into_inner()).next();
                    let Some((key, bytes)) = item else { return };
                    if failed.lock().unwrap_or_else(|e| e.into_inner()).is_some() {
                        return;
                    }
                    if let Err(e) = self.client.put(key, bytes) {
                        *failed.lock().unwrap_or_else(|e| e.into_inner()) = Some(e);
                        return;
                    }
                });
            }
        });
        match failed.into_inner().unwrap_or_else(|e| e.into_inner()) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Removes objects of `db`'s older snapshots (ours only; NunDB's objects are left alone).
    /// Failures are logged: leftovers are removed after a later snapshot.
    fn remove_stale(&self, db: &str, keep: &Manifest) {
        let folder = layout::db_folder(&self.config.prefix, db);
        let listed = match self.client.list(&folder) {
            Ok(l) => l,
            Err(e) => {
                log::warn!("cannot list old snapshot objects of {db}: {e}");
                return;
            }
        };
        for (key, _) in listed {
            let ours = key[folder.len()..]
                .split_once('/')
                .is_some_and(|(dir, _)| dir.len() == 20 && dir.bytes().all(|b| b.is_ascii_digit()));
            if ours && !keep.objects.iter().any(|(k, _, _)| *k == key) {
                if let Err(e) = self.client.delete(&key) {
                    log::warn!("cannot remove an old snapshot object: {e}");
                }
            }
        }
    }

    /// Removes every snapshot of a deleted database (manifest first, so it is gone at once).
    pub fn remove_db(&self, db: &str) -> Result<(), S3Error> {
        let folder = layout::db_folder(&self.config.prefix, db);
        self.client.delete(&format!("{folder}{MANIFEST}"))?;
        for (key, _) in self.client.list(&folder)? {
            let ours = key[folder.len()..]
                .split_once('/')
                .is_some_and(|(dir, _)| dir.len() == 20 && dir.bytes().all(|b| b.is_ascii_digit()));
            if ours {
                self.client.delete(&key)?;
            }
        }
        self.current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(db);
        Ok(())
    }

    /// Databases that have a manifest of ours in the bucket.
    pub fn stored_dbs(&self) -> Result<Vec<String>, S3Error> {
        let prefix = layout::root(&self.config.prefix);
        Ok(self
            .client
            .list(&prefix)?
            .into_iter()
            .filter_map(|(key, _)| {
                let (db, rest) = key[prefix.len()..].split_once('/')?;
                (rest == MANIFEST).then(|| db.to_string())
            })
            .collect())
    }
}
