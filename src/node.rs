//! The running node: configuration, databases and counters shared by every session.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use crate::config::Config;
use crate::db::Databases;
use crate::storage::{Storage, StorageConfig};

/// Shared state of one server process.
#[derive(Debug)]
pub struct Node {
    /// Settings.
    pub config: Config,
    /// All databases.
    pub dbs: Arc<Databases>,
    /// Durable storage (absent for purely in-memory nodes used in unit tests).
    pub storage: Option<Arc<Storage>>,
    /// When the node started.
    pub started: Instant,
    /// Commands executed, for `metrics-state` and `debug process-info`.
    pub commands: AtomicU64,
    /// Sessions currently open.
    pub sessions: AtomicU64,
    /// The TCP address actually bound (differs from the configured one with port 0).
    pub tcp_bound: OnceLock<SocketAddr>,
}

impl Node {
    /// A purely in-memory node with no databases.
    pub fn new(config: Config) -> Arc<Node> {
        Node::build(config, Arc::new(Databases::new()), None)
    }

    /// Opens the data directory (recovering every database) and starts the snapshotter.
    pub fn open(config: Config) -> Result<Arc<Node>, String> {
        let dbs = Arc::new(Databases::new());
        let storage = Storage::open(
            StorageConfig {
                dir: config.dbs_dir.clone(),
                fsync: config.fsync,
                snapshot_interval: config.snapshot_interval,
                max_log_size: config.max_log_size,
            },
            &dbs,
        )?;
        storage
            .start_snapshotter(Arc::downgrade(&dbs))
            .map_err(|e| format!("cannot start the snapshotter: {e}"))?;
        Ok(Node::build(config, dbs, Some(storage)))
    }

    fn build(config: Config, dbs: Arc<Databases>, storage: Option<Arc<Storage>>) -> Arc<Node> {
        Arc::new(Node {
            config,
            dbs,
            storage,
            started: Instant::now(),
            commands: AtomicU64::new(0),
            sessions: AtomicU64::new(0),
            tcp_bound: OnceLock::new(),
        })
    }

    /// The address this node advertises (external address, else its bound TCP address).
    pub fn advertised_addr(&self) -> String {
        if !self.config.external_addr.is_empty() {
            self.config.external_addr.clone()
        } else if let Some(addr) = self.tcp_bound.get() {
            addr.to_string()
        } else {
            self.config.tcp_addr.clone()
        }
    }

    /// Waits until the log record `lsn` is durable per the fsync policy.
    pub fn wait_durable(&self, lsn: u64) -> std::io::Result<()> {
        match &self.storage {
            Some(s) => s.wait_durable(lsn),
            None => Ok(()),
        }
    }

    /// Snapshots every changed database now.
    pub fn snapshot(&self) -> std::io::Result<usize> {
        match &self.storage {
            Some(s) => s.snapshot(&self.dbs),
            None => Ok(0),
        }
    }

    /// (bytes, records) currently in the operation log.
    pub fn log_stats(&self) -> (u64, u64) {
        match &self.storage {
            Some(s) => (s.log().size(), s.log().count()),
            None => (0, 0),
        }
    }

    /// Flushes the log to disk (on shutdown).
    pub fn flush(&self) -> std::io::Result<()> {
        match &self.storage {
            Some(s) => s.flush(),
            None => Ok(()),
        }
    }

    /// Counts one more executed command.
    pub fn count_command(&self) {
        self.commands.fetch_add(1, Ordering::Relaxed);
    }
}
