//! Every server setting in one struct, with its default. `main.rs` fills it from flags and NUN_* env.

use std::path::PathBuf;
use std::time::Duration;

use crate::cluster::WriteQuorum;
use crate::storage::oplog::FsyncPolicy;
use crate::storage::s3::{Place, S3Config};

/// Server configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Admin user name (NUN_USER); also used between cluster nodes.
    pub admin_user: String,
    /// Admin password (NUN_PWD).
    pub admin_pwd: String,
    /// Data directory (NUN_DBS_DIR), created if missing.
    pub dbs_dir: PathBuf,
    /// TCP listen address (NUN_TCP_ADDR).
    pub tcp_addr: String,
    /// WebSocket listen address (NUN_WS_ADDR).
    pub ws_addr: String,
    /// HTTP listen address (NUN_HTTP_ADDR).
    pub http_addr: String,
    /// Cluster peers (NUN_REPLICATE_ADDR), comma separated, may include this node.
    pub replicate_addr: Vec<String>,
    /// The name this node advertises to peers (defaults to the TCP address).
    pub external_addr: String,
    /// Election timeout in milliseconds (NUN_ELECTION_TIMEOUT).
    pub election_timeout_ms: u64,
    /// Longest accepted command line / frame / HTTP body in bytes (NUN_MAX_LINE).
    pub max_line: usize,
    /// Messages a session may have queued before a slow watcher is disconnected (NUN_OUTBOX_MESSAGES).
    pub outbox_messages: usize,
    /// Bytes a session may have queued before a slow watcher is disconnected (NUN_OUTBOX_BYTES).
    pub outbox_bytes: usize,
    /// When the operation log is fsynced (NUN_FSYNC).
    pub fsync: FsyncPolicy,
    /// Time between periodic snapshots of changed databases (NUN_SNAPSHOT_INTERVAL, seconds).
    pub snapshot_interval: Duration,
    /// Operation log size that triggers an early snapshot (NUN_MAX_OP_LOG_SIZE, bytes).
    pub max_log_size: u64,
    /// How long resolved conflict records are kept (NUN_CONFLICT_RETENTION, seconds).
    pub conflict_retention: Duration,
    /// How long a removed key's tombstone is kept before it becomes a version floor
    /// (NUN_TOMBSTONE_RETENTION, seconds).
    pub tombstone_retention: Duration,
    /// When a write is acknowledged in a cluster (NUN_WRITE_QUORUM).
    pub write_quorum: WriteQuorum,
    /// Bytes of recent log records kept in memory to feed secondaries (NUN_REPLICATION_BACKLOG).
    pub replication_backlog: usize,
    /// Most TCP, WebSocket and HTTP connections at once (NUN_MAX_CONNECTIONS); past it clients are refused.
    pub max_connections: usize,
    /// When set, `GET /metrics` needs `Authorization: Bearer <token>` (NUN_METRICS_TOKEN).
    pub metrics_token: Option<String>,
    /// Where snapshots are loaded from (NUN_STORAGE_READ_STRATEGY, else NUN_STORAGE_STRATEGY).
    pub storage_read: Place,
    /// Where snapshots are written (NUN_STORAGE_WRITE_STRATEGY, else NUN_STORAGE_STRATEGY).
    pub storage_write: Place,
    /// The S3 bucket (NUN_S3_*), used when either place is S3.
    pub s3: S3Config,
    /// How long an HTTP request may take to arrive, head and body (NUN_HTTP_TIMEOUT, seconds).
    pub http_timeout: Duration,
    /// How long a session polls its socket for the next command before blocking, when its
    /// client is quick and no other session is working (NUN_SPIN_US, microseconds; 0: never).
    pub spin: Duration,
}

/// Default for [`Config::spin`]: longer than a client on the same machine takes to read a reply
/// and send its next command, short enough that a wasted poll costs little.
pub const DEFAULT_SPIN: Duration = Duration::from_micros(50);

/// Default TCP address.
pub const DEFAULT_TCP_ADDR: &str = "0.0.0.0:3014";
/// Default WebSocket address.
pub const DEFAULT_WS_ADDR: &str = "0.0.0.0:3012";
/// Default HTTP address.
pub const DEFAULT_HTTP_ADDR: &str = "0.0.0.0:3013";

impl Default for Config {
    fn default() -> Self {
        Config {
            admin_user: String::new(),
            admin_pwd: String::new(),
            dbs_dir: PathBuf::from("dbs"),
            tcp_addr: DEFAULT_TCP_ADDR.to_string(),
            ws_addr: DEFAULT_WS_ADDR.to_string(),
            http_addr: DEFAULT_HTTP_ADDR.to_string(),
            replicate_addr: Vec::new(),
            external_addr: String::new(),
            election_timeout_ms: 1000,
            max_line: 16 * 1024 * 1024,
            outbox_messages: 16 * 1024,
            outbox_bytes: 64 * 1024 * 1024,
            fsync: FsyncPolicy::EverySec,
            snapshot_interval: Duration::from_secs(60),
            conflict_retention: Duration::from_secs(3600),
            tombstone_retention: Duration::from_secs(3600),
            max_log_size: 256 * 1024 * 1024,
            write_quorum: WriteQuorum::Majority,
            replication_backlog: 64 * 1024 * 1024,
            max_connections: 10_000,
            metrics_token: None,
            storage_read: Place::Disk,
            storage_write: Place::Disk,
            s3: S3Config::default(),
            http_timeout: Duration::from_secs(10),
            spin: DEFAULT_SPIN,
        }
    }
}
