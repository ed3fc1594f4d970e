//! The running node: configuration, databases and counters shared by every session.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use crate::cluster::replication::Replica;
use crate::cluster::{self, Cluster, WriteQuorum};
use crate::config::Config;
use crate::db::outbox::{self, Touched};
use crate::db::Databases;
use crate::metrics::MovingAvg;
use crate::protocol::Strategy;
use crate::storage::oplog::OpLog;
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
    /// Commands executed, for `metrics-state` and `debug process-info` (striped: every
    /// session adds to it).
    commands: crate::metrics::Striped,
    /// Sessions currently open.
    pub sessions: AtomicU64,
    /// The TCP address actually bound (differs from the configured one with port 0).
    pub tcp_bound: OnceLock<SocketAddr>,
    /// How long `get` takes, for `metrics-state`.
    pub get_time: MovingAvg,
    /// How long an acknowledged write waits for its majority, for `metrics-state`.
    pub replication_time: MovingAvg,
    cluster: OnceLock<Arc<Cluster>>,
    cluster_threads: AtomicBool,
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
                read: config.storage_read,
                write: config.storage_write,
                s3: config.s3.clone(),
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
            commands: crate::metrics::Striped::new(1),
            sessions: AtomicU64::new(0),
            tcp_bound: OnceLock::new(),
            get_time: MovingAvg::default(),
            replication_time: MovingAvg::default(),
            cluster: OnceLock::new(),
            cluster_threads: AtomicBool::new(false),
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

    /// Waits until the log record `lsn` may be acknowledged: durable per the fsync policy here
    /// and, in a cluster, on enough members for the write concern. The error is the message
    /// the writer gets.
    pub fn wait_durable(&self, lsn: u64) -> Result<(), String> {
        self.wait_local_durable(lsn)
            .map_err(|e| format!("Storage error: {e}"))?;
        if let Some(c) = self.cluster() {
            let start = Instant::now();
            if c.wait_quorum(lsn)? {
                self.replication_time.record(start.elapsed());
            }
        }
        Ok(())
    }

    /// Waits until log record `lsn` is durable on this node (a primary's commit point may move).
    pub fn wait_local_durable(&self, lsn: u64) -> std::io::Result<()> {
        self.ship_owed();
        let Some(s) = &self.storage else {
            return Ok(());
        };
        s.wait_durable(lsn)?;
        if let Some(c) = self.cluster() {
            if lsn > 0 && c.note_durable(lsn) {
                c.ship(s.log());
            }
        }
        Ok(())
    }

    /// Waits until the change logged as `lsn` may be pushed to watchers: durable here and, in a
    /// cluster, committed (so no later primary can roll it back).
    pub fn wait_committed(&self, lsn: u64) -> std::io::Result<()> {
        self.wait_local_durable(lsn)?;
        match self.cluster() {
            Some(c) if lsn > 0 && !c.wait_commit(lsn) => Err(std::io::Error::other(format!(
                "change {lsn} was not committed before this node stopped being primary"
            ))),
            _ => Ok(()),
        }
    }

    /// Waits until the pushes in `touched` may be shown: their log records durable here and,
    /// in a cluster, committed. False when that failed (the watchers must be disconnected).
    pub fn settle(&self, touched: &Touched) -> bool {
        let lsn = touched.lsn();
        if touched.is_empty() || lsn == 0 {
            return true;
        }
        match self.wait_committed(lsn) {
            Ok(()) => true,
            Err(e) => {
                log::warn!("changes up to {lsn} cannot be shown to watchers: {e}");
                false
            }
        }
    }

    /// Sends the pushes this thread queued (see [`outbox::take_touched`]) once [`Node::settle`]
    /// allows, or disconnects their watchers if it cannot.
    pub fn deliver(&self, touched: Touched) {
        if touched.is_empty() {
            return;
        }
        if self.settle(&touched) {
            touched.release();
        } else {
            touched.abandon();
        }
    }

    /// True when a write is acknowledged as soon as it is durable here: a single node, or a
    /// cluster with `NUN_WRITE_QUORUM=1`. Its replies can then wait in the outbox for the log
    /// write instead of the session waiting for it.
    pub fn acks_locally(&self) -> bool {
        self.storage.is_some()
            && self
                .cluster()
                .is_some_and(|c| c.is_alone() || self.config.write_quorum == WriteQuorum::One)
    }

    /// The cluster, when this node's writes wait for a majority and its acknowledgement
    /// readers run (so a write's reply can be handed to them: [`Cluster::on_commit`]).
    pub fn commit_handoff(&self) -> Option<&Arc<Cluster>> {
        self.cluster().filter(|c| {
            self.storage.is_some()
                && self.cluster_threads.load(Ordering::Acquire)
                && c.waits_for_majority()
                && c.is_primary()
        })
    }

    /// Hands replies and pushes held until `touched.lsn()` to the log: they are released by
    /// whichever thread writes that record (and, here, commits it: [`Node::acks_locally`]), or
    /// their sessions disconnected if that fails. Never waits.
    pub fn deliver_when_durable(&self, touched: Touched) {
        let lsn = touched.lsn();
        let (Some(log), Some(cluster)) = (self.log(), self.cluster()) else {
            self.deliver(touched);
            return;
        };
        let cluster = Arc::clone(cluster);
        log.on_durable(lsn, move |durable, log| {
            // The whole flush at once: the other completions of the group find it noted.
            let moved = durable.is_some_and(|upto| cluster.note_durable(upto));
            if durable.is_some() && cluster.is_visible(lsn) {
                touched.release();
            } else {
                log::warn!("change {lsn} was not committed; disconnecting its watchers");
                touched.abandon();
            }
            // The new commit point goes to the secondaries after the replies.
            if moved {
                cluster.ship(log);
            }
        });
    }

    /// What log shipping needs from this node (a cluster node with storage).
    pub fn replica(&self) -> Option<Replica> {
        Some(Replica {
            cluster: Arc::clone(self.cluster()?),
            storage: Arc::clone(self.storage.as_ref()?),
            dbs: Arc::clone(&self.dbs),
        })
    }

    /// Ships to the secondaries the records this thread appended under a
    /// [`crate::storage::oplog::ShipLater`] scope (a session's batch), if any.
    pub fn ship_owed(&self) {
        if crate::storage::oplog::take_owed_shipping() {
            if let (Some(c), Some(log)) = (self.cluster(), self.log()) {
                c.ship(log);
            }
        }
    }

    /// Makes the replication backlog's next block if it wants one. Called once a batch is
    /// answered (or handed over): the thread holds no lock, and no reply waits for it.
    pub fn refill_backlog(&self) {
        if let Some(log) = self.log() {
            log.refill_backlog();
        }
    }

    /// The cluster, once started.
    pub fn cluster(&self) -> Option<&Arc<Cluster>> {
        self.cluster.get()
    }

    /// The operation log.
    pub fn log(&self) -> Option<&Arc<OpLog>> {
        self.storage.as_ref().map(|s| s.log())
    }

    /// True when this node takes writes itself (single nodes always do, once started). Before
    /// [`Node::start_cluster`] nobody knows the role yet, so the answer is no: a restarted
    /// member whose listeners are already up must not acknowledge writes on its own.
    pub fn is_primary(&self) -> bool {
        self.cluster().is_some_and(|c| c.is_primary())
    }

    /// Joins the configured cluster (after the listeners are bound, so this node's name is
    /// known) and starts the election and replication threads when there are peers.
    pub fn start_cluster(self: &Arc<Self>) -> Result<(), String> {
        let cluster = Arc::new(Cluster::new(
            self.advertised_addr(),
            &self.config.replicate_addr,
            (
                self.config.admin_user.clone(),
                self.config.admin_pwd.clone(),
            ),
            std::time::Duration::from_millis(self.config.election_timeout_ms.max(10)),
            self.config.write_quorum,
            Some(self.config.dbs_dir.join("cluster.term")),
        ));
        if let Some(log) = self.log() {
            log.set_term(log.term().max(cluster.term()));
        }
        let multi = !cluster.peers().is_empty();
        let node = Arc::downgrade(self);
        cluster.set_elected_hook(cluster::ElectedHook(Box::new(move |term| {
            let node = node.upgrade().ok_or("the node is shutting down")?;
            let replica = node.replica().ok_or("a cluster node needs storage")?;
            let started = cluster::replication::take_over(&replica, term);
            // What it inherited may be shown once the term-start record commits, which needs
            // this (election) thread to go on: wait for it elsewhere.
            let touched = outbox::take_touched();
            if !touched.is_empty() {
                let node = Arc::clone(&node);
                if !crate::os::spawn_small("deliver-inherited".into(), move || {
                    node.deliver(touched)
                }) {
                    log::error!("watchers of inherited changes get them on their next change");
                }
            }
            started
        })));
        let _ = self.cluster.set(Arc::clone(&cluster));
        if multi {
            self.start_cluster_threads()?;
            cluster::membership::announce_self(&cluster);
        }
        Ok(())
    }

    /// Starts the election and replication threads, once: at start-up when there are peers,
    /// or when a `join` gives a single node its first peer.
    pub fn start_cluster_threads(self: &Arc<Self>) -> Result<(), String> {
        let Some(cluster) = self.cluster() else {
            return Err("the cluster is not started".to_string());
        };
        if self.cluster_threads.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let log = self
            .log()
            .cloned()
            .ok_or_else(|| "a cluster node needs storage".to_string())?;
        log.enable_backlog(self.config.replication_backlog);
        cluster
            .start_elections(log)
            .map_err(|e| format!("cannot start the election thread: {e}"))?;
        let replica = self.replica().ok_or("a cluster node needs storage")?;
        cluster::replication::start_receiver(&replica)
            .map_err(|e| format!("cannot start replication: {e}"))?;
        log::info!(
            "cluster member {} of {:?}",
            cluster.self_id,
            cluster.members()
        );
        Ok(())
    }

    /// Starts the thread that expires what is kept only for a while: resolved conflict records
    /// (removed on the primary; the removals replicate like any write) and tombstones (each
    /// node folds its own into version floors).
    pub fn start_sweeper(self: &Arc<Self>) -> std::io::Result<()> {
        let node = Arc::downgrade(self);
        let conflicts = self.config.conflict_retention;
        let tombstones = self.config.tombstone_retention;
        let tick = (conflicts.min(tombstones) / 4)
            .clamp(Duration::from_millis(100), Duration::from_secs(60));
        std::thread::Builder::new()
            .name("sweeper".into())
            .spawn(move || loop {
                std::thread::sleep(tick);
                let Some(node) = node.upgrade() else { return };
                let primary = node.is_primary();
                let mut expired_now = 0;
                for db in node.dbs.all() {
                    let expired = db.expire_tombstones(tombstones);
                    if expired > 0 {
                        log::debug!("{expired} tombstones of {} expired", db.name());
                    }
                    expired_now += expired;
                    if primary && db.strategy() == Strategy::Arbiter {
                        let removed = db.sweep_resolved(conflicts);
                        if removed > 0 {
                            log::debug!("{removed} resolved conflicts of {} removed", db.name());
                        }
                    }
                }
                node.deliver(outbox::take_touched());
                // After a burst of removals the freed entries' pages go back to the kernel.
                if expired_now >= 10_000 {
                    crate::os::release_free_heap();
                }
            })?;
        Ok(())
    }

    /// Snapshots every changed database now.
    pub fn snapshot(&self) -> std::io::Result<usize> {
        match &self.storage {
            Some(s) => s.snapshot(&self.dbs),
            None => Ok(0),
        }
    }

    /// Quorum setting in effect.
    pub fn write_quorum(&self) -> WriteQuorum {
        self.config.write_quorum
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

    /// Before a graceful stop: flushes the log and stores pending changes in the bucket when
    /// snapshots go to S3.
    pub fn shutdown(&self) -> std::io::Result<()> {
        match &self.storage {
            Some(s) => s.shutdown(&self.dbs),
            None => Ok(()),
        }
    }

    /// Counts one more executed command.
    pub fn count_command(&self) {
        self.commands.add(0, 1);
    }

    /// Commands executed since start-up.
    pub fn commands(&self) -> u64 {
        self.commands.sum(0)
    }
}
