//! The `nun-db` binary: `start` a server, `exec` commands over HTTP, `create-db`.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{ArgAction, Parser, Subcommand};
use signal_hook::consts::{SIGINT, SIGTERM};

use nundb::bench::conn::KvOp;
use nundb::bench::{BenchOptions, Transport};
use nundb::client;
use nundb::cluster::WriteQuorum;
use nundb::config::{self, Config};
use nundb::node::Node;
use nundb::server;
use nundb::storage::oplog::FsyncPolicy;
use nundb::storage::s3::{Place, S3Config};

/// A NunDB-compatible realtime database.
#[derive(Parser, Debug)]
#[command(name = "nun-db", version, disable_help_flag = true)]
struct Cli {
    /// Admin user.
    #[arg(short = 'u', long = "user", env = "NUN_USER", global = true)]
    user: Option<String>,
    /// Admin password.
    #[arg(short = 'p', long = "pwd", env = "NUN_PWD", global = true)]
    pwd: Option<String>,
    /// HTTP address of the server, for exec and create-db; several, comma-separated, for a
    /// cluster (the first that accepts a connection is used).
    #[arg(
        short = 'h',
        long = "host",
        env = "NUN_HOST",
        default_value = "http://localhost:3013",
        global = true
    )]
    host: String,
    /// Seconds exec and create-db keep trying the addresses in --host (with exponential
    /// backoff) while none accepts a connection.
    #[arg(
        long = "retry-for",
        env = "NUN_RETRY_FOR",
        default_value_t = 5,
        global = true
    )]
    retry_for: u64,
    /// Print help.
    #[arg(long = "help", action = ArgAction::Help, global = true)]
    help: Option<bool>,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Start a server node.
    Start(Box<StartArgs>),
    /// Run `;`-separated commands over HTTP as admin and print the response.
    Exec {
        /// The commands, e.g. "use-db demo demo-pwd; keys".
        command: String,
    },
    /// Benchmark a running server (and optionally Redis) and print markdown tables.
    Bench(Box<BenchArgs>),
    /// Create a database over HTTP.
    CreateDb {
        /// Database name.
        #[arg(short = 'd', long = "db-name")]
        db_name: String,
        /// Database token.
        #[arg(short = 't', long = "token")]
        token: String,
    },
}

#[derive(clap::Args, Debug)]
struct BenchArgs {
    /// Our server's TCP address.
    #[arg(long = "tcp", default_value = "127.0.0.1:3014")]
    tcp: String,
    /// Our server's WebSocket address.
    #[arg(long = "ws", default_value = "127.0.0.1:3012")]
    ws: String,
    /// Compare against Redis at redis://host:port in the same run.
    #[arg(long = "target")]
    target: Option<String>,
    /// Follow every Redis SET with `WAIT <n> 0` (compare with a replicated write concern).
    #[arg(long = "redis-wait", default_value_t = 0)]
    redis_wait: usize,
    /// Seconds per load row.
    #[arg(long = "duration", default_value_t = 3.0)]
    duration: f64,
    /// Number of distinct keys.
    #[arg(long = "keyspace", default_value_t = 10_000)]
    keyspace: usize,
    /// Value size in bytes.
    #[arg(long = "value-size", default_value_t = 100)]
    value_size: usize,
    /// Connection counts, comma separated.
    #[arg(long = "conns", default_value = "1,50")]
    conns: String,
    /// Pipeline depths, comma separated.
    #[arg(long = "pipeline", default_value = "1,16")]
    pipeline: String,
    /// Watcher counts, comma separated ("none" skips the watch table).
    #[arg(long = "watchers", default_value = "1,100,1000")]
    watchers: String,
    /// Watcher counts for the connections table (server memory and threads per connection),
    /// comma separated; "none" skips it.
    #[arg(long = "connections", default_value = "none")]
    connections: String,
    /// Our server's pid, to read its memory and threads from /proc (connections table).
    #[arg(long = "server-pid")]
    server_pid: Option<u32>,
    /// Redis's pid, to read its memory and threads from /proc (connections table).
    #[arg(long = "redis-pid")]
    redis_pid: Option<u32>,
    /// Operations, comma separated: set, get ("none" skips the load table).
    #[arg(long = "ops", default_value = "set,get")]
    ops: String,
    /// Our transports, comma separated: tcp, ws.
    #[arg(long = "transports", default_value = "tcp,ws")]
    transports: String,
    /// Only fill this many keys (pipelined, over TCP), print the time taken, and exit.
    #[arg(long = "fill")]
    fill: Option<usize>,
    /// Only set then remove this many distinct keys (pipelined, over TCP; on Redis too with
    /// --target), print the times taken, and exit.
    #[arg(long = "churn")]
    churn: Option<usize>,
    /// Writes per watch row.
    #[arg(long = "watch-writes", default_value_t = 300)]
    watch_writes: usize,
    /// A few seconds in all: proves the tool works, measures nothing.
    #[arg(long = "quick")]
    quick: bool,
}

#[derive(clap::Args, Debug)]
struct StartArgs {
    /// TCP address.
    #[arg(long = "tcp-address", env = "NUN_TCP_ADDR", default_value = config::DEFAULT_TCP_ADDR)]
    tcp_address: String,
    /// WebSocket address.
    #[arg(long = "ws-address", env = "NUN_WS_ADDR", default_value = config::DEFAULT_WS_ADDR)]
    ws_address: String,
    /// HTTP address.
    #[arg(long = "http-address", env = "NUN_HTTP_ADDR", default_value = config::DEFAULT_HTTP_ADDR)]
    http_address: String,
    /// Comma-separated cluster members (TCP addresses, may include this node).
    #[arg(
        long = "replicate-address",
        env = "NUN_REPLICATE_ADDR",
        default_value = ""
    )]
    replicate_address: String,
    /// The address this node advertises to its peers.
    #[arg(
        long = "external-address",
        env = "NUN_EXTERNAL_ADDR",
        default_value = ""
    )]
    external_address: String,
    /// Data directory (created if missing).
    #[arg(long = "dbs-dir", env = "NUN_DBS_DIR", default_value = "dbs")]
    dbs_dir: String,
    /// Election timeout in milliseconds.
    #[arg(
        long = "election-timeout",
        env = "NUN_ELECTION_TIMEOUT",
        default_value_t = 1000
    )]
    election_timeout: u64,
    /// Longest accepted command line, frame or HTTP body, in bytes.
    #[arg(long = "max-line", env = "NUN_MAX_LINE", default_value_t = 16 * 1024 * 1024)]
    max_line: usize,
    /// Messages a session may have queued before a slow watcher is disconnected.
    #[arg(long = "outbox-messages", env = "NUN_OUTBOX_MESSAGES", default_value_t = 16 * 1024)]
    outbox_messages: usize,
    /// Bytes a session may have queued before a slow watcher is disconnected.
    #[arg(long = "outbox-bytes", env = "NUN_OUTBOX_BYTES", default_value_t = 64 * 1024 * 1024)]
    outbox_bytes: usize,
    /// Write concern in a cluster: majority or 1.
    #[arg(
        long = "write-quorum",
        env = "NUN_WRITE_QUORUM",
        default_value = "majority"
    )]
    write_quorum: String,
    /// Operation log fsync policy: always, everysec or no.
    #[arg(long = "fsync", env = "NUN_FSYNC", default_value = "everysec")]
    fsync: String,
    /// Seconds between periodic snapshots of changed databases.
    #[arg(
        long = "snapshot-interval",
        env = "NUN_SNAPSHOT_INTERVAL",
        default_value_t = 60
    )]
    snapshot_interval: u64,
    /// Operation log size in bytes that triggers an early snapshot.
    #[arg(long = "max-op-log-size", env = "NUN_MAX_OP_LOG_SIZE", default_value_t = 256 * 1024 * 1024)]
    max_op_log_size: u64,
    /// Seconds a resolved conflict record is kept before it is removed.
    #[arg(
        long = "conflict-retention",
        env = "NUN_CONFLICT_RETENTION",
        default_value_t = 3600
    )]
    conflict_retention: u64,
    /// Seconds a removed key's tombstone is kept (a key recreated sooner continues its versions
    /// exactly; later it starts above a per-bucket floor).
    #[arg(
        long = "tombstone-retention",
        env = "NUN_TOMBSTONE_RETENTION",
        default_value_t = 3600
    )]
    tombstone_retention: u64,
    /// Bytes of recent log records a cluster node keeps in memory to feed secondaries.
    #[arg(
        long = "replication-backlog",
        env = "NUN_REPLICATION_BACKLOG",
        default_value_t = 64 * 1024 * 1024
    )]
    replication_backlog: usize,
    /// Log level: error, warn, info, debug, trace.
    #[arg(long = "log-level", env = "NUN_LOG_LEVEL", default_value = "info")]
    log_level: String,
    /// Most TCP, WebSocket and HTTP connections at once; past it new clients are refused. Default: what
    /// this machine's descriptor, thread and memory limits allow (logged at start-up).
    #[arg(long = "max-connections", env = "NUN_MAX_CONNECTIONS")]
    max_connections: Option<usize>,
    /// Require `Authorization: Bearer <token>` on GET /metrics (default: open, like other
    /// exporters).
    #[arg(long = "metrics-token", env = "NUN_METRICS_TOKEN")]
    metrics_token: Option<String>,
    /// Where snapshots live: disk, s3 or s3_patition (NunDB's spelling; s3_partition too).
    #[arg(
        long = "storage-strategy",
        env = "NUN_STORAGE_STRATEGY",
        default_value = "disk"
    )]
    storage_strategy: String,
    /// Where snapshots are loaded from at start-up (default: the storage strategy).
    #[arg(long = "storage-read-strategy", env = "NUN_STORAGE_READ_STRATEGY")]
    storage_read_strategy: Option<String>,
    /// Where snapshots are written (default: the storage strategy).
    #[arg(long = "storage-write-strategy", env = "NUN_STORAGE_WRITE_STRATEGY")]
    storage_write_strategy: Option<String>,
    /// S3 endpoint, http:// or https:// (path-style requests).
    #[arg(
        long = "s3-api-url",
        env = "NUN_S3_API_URL",
        default_value = "http://127.0.0.1:9000"
    )]
    s3_api_url: String,
    /// S3 bucket.
    #[arg(long = "s3-bucket", env = "NUN_S3_BUCKET", default_value = "nun-db")]
    s3_bucket: String,
    /// Folder in the bucket snapshots are written under.
    #[arg(
        long = "s3-prefix",
        env = "NUN_S3_PREFIX",
        default_value = "nun-db-base"
    )]
    s3_prefix: String,
    /// Folder snapshots are read from (default: the prefix).
    #[arg(long = "s3-read-prefix", env = "NUN_S3_READ_PREFIX")]
    s3_read_prefix: Option<String>,
    /// S3 access key (else AWS_ACCESS_KEY_ID, else `nun-db`).
    #[arg(long = "s3-key-id", env = "NUN_S3_KEY_ID")]
    s3_key_id: Option<String>,
    /// S3 secret key (else AWS_SECRET_ACCESS_KEY).
    #[arg(
        long = "s3-secret-key",
        env = "NUN_S3_SECRET_KEY",
        hide_env_values = true
    )]
    s3_secret_key: Option<String>,
    /// Requests to the bucket in flight at once.
    #[arg(
        long = "s3-max-inflight-requests",
        env = "NUN_S3_MAX_INFLIGHT_REQUESTS",
        default_value_t = 10
    )]
    s3_max_inflight_requests: usize,
    /// Partitions of the s3_patition layout.
    #[arg(
        long = "s3-number-of-partitions",
        env = "NUN_S3_NUMBER_OF_PARTITIONS",
        default_value_t = 10
    )]
    s3_number_of_partitions: usize,
    /// Retries of a failed request to the bucket (with backoff).
    #[arg(long = "s3-retry", env = "NUN_S3_RETRY", default_value_t = 3)]
    s3_retry: u32,
    /// Seconds an HTTP request may take to arrive (head and body); slower clients get 408.
    #[arg(
        long = "http-timeout",
        env = "NUN_HTTP_TIMEOUT",
        default_value_t = 10.0
    )]
    http_timeout: f64,
    /// Microseconds a session polls its socket for the next command before blocking (only while
    /// its client is that quick and no other session is working); 0 turns polling off.
    #[arg(long = "spin-us", env = "NUN_SPIN_US", default_value_t = 50)]
    spin_us: u64,
}

fn fail(msg: &str) -> ExitCode {
    eprintln!("nun-db: {msg}");
    ExitCode::FAILURE
}

/// Clap errors reduced to one line (help and version are printed as usual).
fn parse_cli() -> Result<Cli, ExitCode> {
    match Cli::try_parse() {
        Ok(cli) => Ok(cli),
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                let _ = e.print();
                return Err(ExitCode::SUCCESS);
            }
            let text = e.to_string();
            let main = text.split("\n\nUsage:").next().unwrap_or(&text);
            let line = main.split_whitespace().collect::<Vec<_>>().join(" ");
            let line = line.strip_prefix("error: ").unwrap_or(&line);
            eprintln!("nun-db: {line} (see nun-db --help)");
            Err(ExitCode::from(2))
        }
    }
}

fn main() -> ExitCode {
    let cli = match parse_cli() {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    match cli.command {
        Cmd::Start(ref args) => start(&cli, args),
        Cmd::Exec { ref command } => exec(&cli, command),
        Cmd::Bench(ref args) => bench(&cli, args),
        Cmd::CreateDb {
            ref db_name,
            ref token,
        } => exec(&cli, &format!("create-db {db_name} {token}")),
    }
}

fn credentials(cli: &Cli) -> Option<(String, String)> {
    match (&cli.user, &cli.pwd) {
        (Some(u), Some(p)) if !u.is_empty() && !p.is_empty() => Some((u.clone(), p.clone())),
        _ => None,
    }
}

fn exec(cli: &Cli, command: &str) -> ExitCode {
    let Some((user, pwd)) = credentials(cli) else {
        return fail("admin credentials are required: pass -u USER -p PWD or set NUN_USER/NUN_PWD");
    };
    let hosts: Vec<&str> = cli.host.split(',').map(str::trim).collect();
    let patience = std::time::Duration::from_secs(cli.retry_for);
    match client::post_to_any(&hosts, &format!("auth {user} {pwd}; {command}"), patience) {
        Ok(body) => {
            println!("Response {body:?}");
            ExitCode::SUCCESS
        }
        Err(e) => fail(&format!("{} ({})", e, cli.host)),
    }
}

fn numbers(list: &str, what: &str) -> Result<Vec<usize>, String> {
    list.split(',')
        .map(|n| {
            n.trim()
                .parse::<usize>()
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| {
                    format!("invalid {what} `{n}`: expected positive numbers separated by commas")
                })
        })
        .collect()
}

fn words<T>(list: &str, what: &str, f: impl Fn(&str) -> Option<T>) -> Result<Vec<T>, String> {
    list.split(',')
        .map(|w| f(w.trim()).ok_or_else(|| format!("invalid {what} `{w}`")))
        .collect()
}

fn bench(cli: &Cli, args: &BenchArgs) -> ExitCode {
    let Some((user, pwd)) = credentials(cli) else {
        return fail("admin credentials are required to create the bench database: -u USER -p PWD");
    };
    let redis = match &args.target {
        None => None,
        Some(t) => match t.strip_prefix("redis://") {
            Some(addr) if !addr.is_empty() => Some(addr.trim_end_matches('/').to_string()),
            _ => {
                return fail(&format!(
                    "invalid --target `{t}`: expected redis://host:port"
                ))
            }
        },
    };
    let parsed = (|| -> Result<BenchOptions, String> {
        Ok(BenchOptions {
            tcp: args.tcp.clone(),
            ws: args.ws.clone(),
            user,
            pwd,
            redis,
            redis_wait: args.redis_wait,
            duration: Duration::from_secs_f64(args.duration.max(0.05)),
            keyspace: args.keyspace.max(1),
            value_size: args.value_size,
            conns: numbers(&args.conns, "--conns")?,
            pipelines: numbers(&args.pipeline, "--pipeline")?,
            watchers: if args.watchers == "none" {
                Vec::new()
            } else {
                numbers(&args.watchers, "--watchers")?
            },
            watch_writes: args.watch_writes.max(1),
            connections: if args.connections == "none" {
                Vec::new()
            } else {
                numbers(&args.connections, "--connections")?
            },
            server_pid: args.server_pid,
            redis_pid: args.redis_pid,
            ops: if args.ops == "none" {
                Vec::new()
            } else {
                words(&args.ops, "--ops", |w| match w {
                    "set" => Some(KvOp::Set),
                    "get" => Some(KvOp::Get),
                    _ => None,
                })?
            },
            transports: words(&args.transports, "--transports", |w| match w {
                "tcp" => Some(Transport::NunTcp),
                "ws" => Some(Transport::NunWs),
                _ => None,
            })?,
        })
    })();
    let opts = match parsed {
        Ok(o) if args.quick => o.quick(),
        Ok(o) => o,
        Err(e) => return fail(&e),
    };
    if let Some(n) = args.fill {
        return match nundb::bench::fill(&opts, n) {
            Ok(took) => {
                println!(
                    "filled {n} keys of {} bytes in {:.2}s ({:.0} sets/s)",
                    opts.value_size,
                    took.as_secs_f64(),
                    n as f64 / took.as_secs_f64()
                );
                ExitCode::SUCCESS
            }
            Err(e) => fail(&format!("fill failed: {e}")),
        };
    }
    if let Some(n) = args.churn {
        let ours = match nundb::bench::churn(&opts, nundb::bench::Transport::NunTcp, n) {
            Ok(took) => took,
            Err(e) => return fail(&format!("churn failed: {e}")),
        };
        println!(
            "churned {n} keys (set+remove) in {:.2}s ({:.0} ops/s)",
            ours.as_secs_f64(),
            2.0 * n as f64 / ours.as_secs_f64()
        );
        if opts.redis.is_some() {
            match nundb::bench::churn(&opts, nundb::bench::Transport::Redis, n) {
                Ok(took) => println!(
                    "redis churned {n} keys (SET+DEL) in {:.2}s ({:.0} ops/s)",
                    took.as_secs_f64(),
                    2.0 * n as f64 / took.as_secs_f64()
                ),
                Err(e) => return fail(&format!("redis churn failed: {e}")),
            }
        }
        return ExitCode::SUCCESS;
    }
    match nundb::bench::run(&opts) {
        Ok(report) => {
            print!("{report}");
            ExitCode::SUCCESS
        }
        Err(e) => fail(&format!("benchmark failed: {e}")),
    }
}

fn start(cli: &Cli, args: &StartArgs) -> ExitCode {
    let Some((user, pwd)) = credentials(cli) else {
        return fail(
            "refusing to start without admin credentials: set NUN_USER and NUN_PWD (or -u/-p)",
        );
    };
    let level = match args.log_level.parse::<log::LevelFilter>() {
        Ok(l) => l,
        Err(_) => return fail(&format!("invalid log level `{}`", args.log_level)),
    };
    let _ = simple_logger::SimpleLogger::new()
        .with_level(level)
        .with_utc_timestamps()
        .init();
    let Some(fsync) = FsyncPolicy::parse(&args.fsync) else {
        return fail(&format!(
            "invalid NUN_FSYNC `{}`: use always, everysec or no",
            args.fsync
        ));
    };
    let write_quorum = match args.write_quorum.as_str() {
        "majority" => WriteQuorum::Majority,
        "1" => WriteQuorum::One,
        other => {
            return fail(&format!(
                "invalid NUN_WRITE_QUORUM `{other}`: use majority or 1"
            ))
        }
    };
    nundb::os::tune_allocator();
    // One descriptor per session: the default soft limit (often 1024) would cap the node early.
    match nundb::os::raise_fd_limit() {
        Ok(limit) => log::debug!("open files limit: {limit}"),
        Err(e) => log::warn!("cannot raise the open files limit: {e}"),
    }
    let max_connections = match args.max_connections {
        Some(0) => return fail("--max-connections must be at least 1"),
        Some(n) => n,
        None => {
            let (n, why) = nundb::os::default_max_connections();
            log::info!("max connections {n}: {why}; set NUN_MAX_CONNECTIONS to change it");
            n
        }
    };
    let place = |name: &str, what: &str| {
        Place::parse(name)
            .ok_or_else(|| format!("invalid {what} `{name}`: use disk, s3 or s3_patition"))
    };
    let places = place(&args.storage_strategy, "NUN_STORAGE_STRATEGY").and_then(|both| {
        let read = match &args.storage_read_strategy {
            Some(r) => place(r, "NUN_STORAGE_READ_STRATEGY")?,
            None => both,
        };
        let write = match &args.storage_write_strategy {
            Some(w) => place(w, "NUN_STORAGE_WRITE_STRATEGY")?,
            None => both,
        };
        Ok((read, write))
    });
    let (storage_read, storage_write) = match places {
        Ok(p) => p,
        Err(e) => return fail(&e),
    };
    let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let s3 = S3Config {
        api_url: args.s3_api_url.clone(),
        bucket: args.s3_bucket.clone(),
        prefix: args.s3_prefix.clone(),
        read_prefix: args
            .s3_read_prefix
            .clone()
            .unwrap_or_else(|| args.s3_prefix.clone()),
        key_id: args
            .s3_key_id
            .clone()
            .or_else(|| env("AWS_ACCESS_KEY_ID"))
            .unwrap_or_else(|| "nun-db".to_string()),
        secret_key: args
            .s3_secret_key
            .clone()
            .or_else(|| env("AWS_SECRET_ACCESS_KEY"))
            .unwrap_or_default(),
        region: env("AWS_REGION").unwrap_or_else(|| "us-east".to_string()),
        max_inflight: args.s3_max_inflight_requests.max(1),
        partitions: args.s3_number_of_partitions.max(1),
        retry: args.s3_retry,
    };
    let config = Config {
        http_timeout: Duration::from_secs_f64(args.http_timeout.max(0.05)),
        spin: Duration::from_micros(args.spin_us.min(10_000)),
        storage_read,
        storage_write,
        s3,
        max_connections,
        metrics_token: args.metrics_token.clone().filter(|t| !t.is_empty()),
        fsync,
        write_quorum,
        snapshot_interval: Duration::from_secs(args.snapshot_interval.max(1)),
        max_log_size: args.max_op_log_size,
        conflict_retention: Duration::from_secs(args.conflict_retention),
        tombstone_retention: Duration::from_secs(args.tombstone_retention),
        replication_backlog: args.replication_backlog,
        admin_user: user,
        admin_pwd: pwd,
        dbs_dir: args.dbs_dir.clone().into(),
        tcp_addr: args.tcp_address.clone(),
        ws_addr: args.ws_address.clone(),
        http_addr: args.http_address.clone(),
        replicate_addr: args
            .replicate_address
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect(),
        external_addr: args.external_address.clone(),
        election_timeout_ms: args.election_timeout,
        max_line: args.max_line,
        outbox_messages: args.outbox_messages,
        outbox_bytes: args.outbox_bytes,
    };
    let mut signals = match ShutdownSignals::install() {
        Ok(s) => s,
        Err(e) => return fail(&format!("cannot install signal handlers: {e}")),
    };
    let node: Arc<Node> = match Node::open(config) {
        Ok(n) => n,
        Err(e) => return fail(&e),
    };
    let bound = match server::start(&node) {
        Ok(b) => b,
        Err(e) => return fail(&format!("cannot listen: {e}")),
    };
    if let Err(e) = node.start_cluster() {
        return fail(&e);
    }
    if let Err(e) = node.start_sweeper() {
        return fail(&format!("cannot start the conflict sweeper: {e}"));
    }
    log::info!(
        "nun-db ready: tcp {} ws {} http {} data {}",
        bound.tcp,
        bound.ws,
        bound.http,
        node.config.dbs_dir.display()
    );
    // Machine-readable readiness line (tests and scripts wait for it).
    println!(
        "ready tcp={} ws={} http={}",
        bound.tcp, bound.ws, bound.http
    );
    signals.wait();
    log::info!("SIGINT or SIGTERM received, flushing and shutting down");
    match node.shutdown() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&format!("flushing the operation log failed: {e}")),
    }
}

/// The read end of a socket pair that SIGINT and SIGTERM write a byte to (signal-hook's
/// self-pipe), so the main thread can sleep until one arrives.
struct ShutdownSignals(std::os::unix::net::UnixStream);

impl ShutdownSignals {
    /// Registers SIGINT and SIGTERM.
    fn install() -> std::io::Result<ShutdownSignals> {
        use std::os::fd::IntoRawFd;
        let (read, write) = std::os::unix::net::UnixStream::pair()?;
        // One descriptor for both signals: the registrations are never removed, so it stays
        // open for the life of the process.
        let write = write.into_raw_fd();
        for signal in [SIGINT, SIGTERM] {
            signal_hook::low_level::pipe::register_raw(signal, write)?;
        }
        Ok(ShutdownSignals(read))
    }

    /// Blocks until a signal arrives. An unexpected read error (a debugger attaching can cause
    /// one) is logged and waited out: the node keeps serving rather than dying without its
    /// final flush.
    fn wait(&mut self) {
        use std::io::Read;
        let mut byte = [0u8; 1];
        loop {
            match self.0.read(&mut byte) {
                Ok(n) if n > 0 => return,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                other => {
                    log::warn!("waiting for a shutdown signal: {other:?}");
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
            }
        }
    }
}
