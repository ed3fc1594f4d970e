//! `nun-db bench`: drives set/get load and watch fan-out against our server and, optionally,
//! Redis in the same run, and prints markdown tables with throughput, latency percentiles and
//! the ours/Redis ratio.

pub mod conn;
pub mod stats;
mod watch;

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use conn::{Conn, KvOp, NunTcp, NunWs, Redis};
use stats::Samples;

/// What to measure and against whom.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Our server's TCP address.
    pub tcp: String,
    /// Our server's WebSocket address (`host:port`).
    pub ws: String,
    /// Admin credentials (to create the bench database).
    pub user: String,
    /// Admin password.
    pub pwd: String,
    /// Redis address (`host:port`) to compare against, if any.
    pub redis: Option<String>,
    /// Replicas each Redis SET waits for (`WAIT`), to compare with a replicated write concern.
    pub redis_wait: usize,
    /// Time per load row.
    pub duration: Duration,
    /// Distinct keys used.
    pub keyspace: usize,
    /// Value size in bytes.
    pub value_size: usize,
    /// Connection counts to try.
    pub conns: Vec<usize>,
    /// Pipeline depths to try.
    pub pipelines: Vec<usize>,
    /// Watcher counts to try.
    pub watchers: Vec<usize>,
    /// Writes per watch row.
    pub watch_writes: usize,
    /// Watcher counts for the connections table (empty: skipped).
    pub connections: Vec<usize>,
    /// Our server's pid (memory and threads in the connections table).
    pub server_pid: Option<u32>,
    /// Redis's pid (memory and threads in the connections table).
    pub redis_pid: Option<u32>,
    /// Operations to load (set, get).
    pub ops: Vec<KvOp>,
    /// Our transports to load.
    pub transports: Vec<Transport>,
}

impl BenchOptions {
    /// Shrinks every dimension so the whole suite runs in a few seconds (used by `make test`).
    pub fn quick(mut self) -> BenchOptions {
        self.duration = Duration::from_millis(200);
        self.keyspace = self.keyspace.min(1000);
        self.conns = vec![1, 4];
        self.pipelines = vec![1, 16];
        self.watchers = vec![1, 10];
        self.watch_writes = 20;
        self.connections = self.connections.iter().map(|n| (*n).min(50)).collect();
        self
    }
}

/// Which server and transport a row drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// Our TCP protocol.
    NunTcp,
    /// Our WebSocket protocol.
    NunWs,
    /// Redis RESP.
    Redis,
}

/// Result of one load row.
#[derive(Debug, Clone)]
pub struct LoadRow {
    /// Operation.
    pub op: KvOp,
    /// Transport.
    pub transport: Transport,
    /// Connections.
    pub conns: usize,
    /// Pipeline depth.
    pub pipeline: usize,
    /// Operations per second.
    pub ops_per_sec: f64,
    /// Median latency, µs.
    pub p50: u64,
    /// 99th percentile, µs.
    pub p99: u64,
    /// 99.9th percentile, µs.
    pub p999: u64,
}

const DB: &str = "bench";
const TOKEN: &str = "bench-token";

fn connect(opts: &BenchOptions, t: Transport) -> io::Result<Box<dyn Conn>> {
    Ok(match t {
        Transport::NunTcp => Box::new(NunTcp::connect(&opts.tcp, DB, TOKEN)?),
        Transport::NunWs => Box::new(NunWs::connect(&opts.ws, DB, TOKEN)?),
        Transport::Redis => Box::new(Redis::connect_waiting(
            opts.redis.as_deref().unwrap_or_default(),
            opts.redis_wait,
        )?),
    })
}

/// The `i`-th benchmark key: 16 bytes.
fn key(i: usize) -> String {
    format!("key:{i:012}")
}

/// Fills `n` keys with `value_size`-byte values over 8 pipelined TCP connections; returns the
/// elapsed time.
pub fn fill(opts: &BenchOptions, n: usize) -> io::Result<Duration> {
    drive(opts, Transport::NunTcp, n, key, &[KvOp::Set])
}

/// Sets then removes `n` distinct keys (`churn:<i>`, never used by other rows) on `target`
/// over 8 pipelined connections, each batch of 256 sets followed by their removes; returns
/// the elapsed time. Shows that removed keys give their memory back.
pub fn churn(opts: &BenchOptions, target: Transport, n: usize) -> io::Result<Duration> {
    drive(
        opts,
        target,
        n,
        |i| format!("churn:{i:012}"),
        &[KvOp::Set, KvOp::Remove],
    )
}

/// Runs `ops` in turn on each batch of 256 of the keys `name(0..n)` (split over 8 connections
/// to `target`), creating the bench database first; returns the elapsed time.
fn drive(
    opts: &BenchOptions,
    target: Transport,
    n: usize,
    name: fn(usize) -> String,
    ops: &'static [KvOp],
) -> io::Result<Duration> {
    let mut admin = crate::client::Client::connect_tcp(&opts.tcp).map_err(io::Error::other)?;
    admin
        .auth(&opts.user, &opts.pwd)
        .map_err(io::Error::other)?;
    let _ = admin.call(&format!("create-db {DB} {TOKEN}"));
    let started = Instant::now();
    let workers = 8;
    let value = Arc::new("v".repeat(opts.value_size));
    let handles = (0..workers)
        .map(|w| {
            let mut c = connect(opts, target)?;
            let value = Arc::clone(&value);
            Ok(std::thread::spawn(move || -> io::Result<()> {
                let mine: Vec<String> = (w..n).step_by(workers).map(name).collect();
                for chunk in mine.chunks(256) {
                    for &op in ops {
                        c.batch(op, chunk, &value)?;
                    }
                }
                Ok(())
            }))
        })
        .collect::<io::Result<Vec<_>>>()?;
    for h in handles {
        h.join()
            .map_err(|_| io::Error::other("bench thread panicked"))??;
    }
    Ok(started.elapsed())
}

/// Creates the bench database (if needed) and fills the keyspace on every target.
fn prepare(opts: &BenchOptions) -> io::Result<()> {
    let mut admin = crate::client::Client::connect_tcp(&opts.tcp).map_err(io::Error::other)?;
    admin
        .auth(&opts.user, &opts.pwd)
        .map_err(io::Error::other)?;
    let r = admin
        .call(&format!("create-db {DB} {TOKEN}"))
        .map_err(io::Error::other)?;
    if let Some(e) = r.error {
        if e != "database already exists" {
            return Err(io::Error::other(e));
        }
    }
    let value = "v".repeat(opts.value_size);
    let mut targets = vec![Transport::NunTcp];
    if opts.redis.is_some() {
        targets.push(Transport::Redis);
    }
    for t in targets {
        let mut c = connect(opts, t)?;
        let keys: Vec<String> = (0..opts.keyspace).map(key).collect();
        for chunk in keys.chunks(256) {
            c.batch(KvOp::Set, chunk, &value)?;
        }
    }
    Ok(())
}

/// Longest stretch one target is loaded before the next takes over: a row's time is split into
/// slices of at most this, run in turn on every target, so a machine whose speed drifts during
/// the run (other tenants, frequency changes) weighs on every target alike.
const SLICE: Duration = Duration::from_secs(1);

/// One target's totals over its slices of a row.
#[derive(Default)]
struct Totals {
    ops: u64,
    secs: f64,
    samples: Samples,
}

impl Totals {
    /// The row these totals make.
    fn row(mut self, op: KvOp, transport: Transport, conns: usize, pipeline: usize) -> LoadRow {
        LoadRow {
            op,
            transport,
            conns,
            pipeline,
            ops_per_sec: self.ops as f64 / self.secs.max(f64::MIN_POSITIVE),
            p50: self.samples.percentile(50.0),
            p99: self.samples.percentile(99.0),
            p999: self.samples.percentile(99.9),
        }
    }
}

/// Runs one load row on every target in `transports`: the row's time is cut into slices of at
/// most [`SLICE`], and each slice loads every target in turn (fresh connections each time).
fn load_rows(
    opts: &BenchOptions,
    transports: &[Transport],
    op: KvOp,
    conns: usize,
    pipeline: usize,
) -> io::Result<Vec<LoadRow>> {
    let slices = opts.duration.as_secs_f64() / SLICE.as_secs_f64();
    let slices = (slices.ceil() as u32).max(1);
    let slice = opts.duration / slices;
    let keyspace = opts.keyspace.max(1);
    // Every key, then the first `pipeline` again, so any batch is one slice (no key is
    // formatted while the clock runs); made once for all the row's slices.
    let keys: Arc<Vec<String>> = Arc::new(
        (0..keyspace + pipeline)
            .map(|i| key(i % keyspace))
            .collect(),
    );
    let mut totals: Vec<Totals> = transports.iter().map(|_| Totals::default()).collect();
    for _ in 0..slices {
        for (t, total) in transports.iter().zip(totals.iter_mut()) {
            let load = Load {
                transport: *t,
                op,
                conns,
                pipeline,
                keys: &keys,
            };
            load_slice(opts, &load, slice, total)?;
        }
    }
    Ok(transports
        .iter()
        .zip(totals)
        .map(|(t, total)| total.row(op, *t, conns, pipeline))
        .collect())
}

/// What one slice loads: a target, an operation, how many connections and how deep they
/// pipeline, over which keys (every key, then the first `pipeline` again).
struct Load<'a> {
    transport: Transport,
    op: KvOp,
    conns: usize,
    pipeline: usize,
    keys: &'a Arc<Vec<String>>,
}

/// Runs `load` for `time`, each connection sending batches of `pipeline` commands, adding what
/// they did to `total`.
fn load_slice(
    opts: &BenchOptions,
    load: &Load<'_>,
    time: Duration,
    total: &mut Totals,
) -> io::Result<()> {
    let &Load {
        transport,
        op,
        conns,
        pipeline,
        keys,
    } = load;
    let stop = Arc::new(AtomicBool::new(false));
    let ops = Arc::new(AtomicU64::new(0));
    let barrier = Arc::new(Barrier::new(conns + 1));
    let value = Arc::new("v".repeat(opts.value_size));
    let keyspace = keys.len() - pipeline;
    let mut handles = Vec::new();
    for c in 0..conns {
        let mut conn = connect(opts, transport)?;
        let (stop, ops, barrier, value, all_keys) = (
            Arc::clone(&stop),
            Arc::clone(&ops),
            Arc::clone(&barrier),
            Arc::clone(&value),
            Arc::clone(keys),
        );
        handles.push(std::thread::spawn(move || -> io::Result<Samples> {
            let mut samples = Samples::default();
            let mut next = c * 7919 % keyspace;
            barrier.wait();
            while !stop.load(Ordering::Relaxed) {
                let keys = &all_keys[next..next + pipeline];
                next = (next + pipeline) % keyspace;
                let t = Instant::now();
                conn.batch(op, keys, &value)?;
                samples.add_n(t.elapsed(), pipeline);
                ops.fetch_add(pipeline as u64, Ordering::Relaxed);
            }
            Ok(samples)
        }));
    }
    barrier.wait();
    let started = Instant::now();
    std::thread::sleep(time);
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        let samples = h
            .join()
            .map_err(|_| io::Error::other("bench thread panicked"))??;
        total.samples.merge(samples);
    }
    total.secs += started.elapsed().as_secs_f64();
    total.ops += ops.load(Ordering::Relaxed);
    Ok(())
}

fn op_name(op: KvOp) -> &'static str {
    match op {
        KvOp::Set => "set",
        KvOp::Get => "get",
        KvOp::Remove => "remove",
    }
}

fn transport_name(t: Transport) -> &'static str {
    match t {
        Transport::NunTcp => "tcp",
        Transport::NunWs => "ws",
        Transport::Redis => "redis",
    }
}

/// Runs the whole suite and returns the markdown report.
pub fn run(opts: &BenchOptions) -> io::Result<String> {
    prepare(opts)?;
    let mut out = String::new();
    if !opts.ops.is_empty() {
        out.push_str(&format!(
            "Load: {} keys, {}-byte values, {:?} per row and target, in slices of at most {:?} taken in turn by each target. Latency is per operation (a pipelined batch's round trip), in µs.\n\n",
            opts.keyspace, opts.value_size, opts.duration, SLICE
        ));
        out.push_str("| op | transport | conns | pipeline | nun-db ops/s | p50 | p99 | p99.9 |");
        if opts.redis.is_some() {
            out.push_str(" redis ops/s | redis p50 | redis p99 | redis p99.9 | ours/redis |");
        }
        out.push('\n');
        out.push_str("|---|---|---|---|---|---|---|---|");
        if opts.redis.is_some() {
            out.push_str("---|---|---|---|---|");
        }
        out.push('\n');
        for &op in &opts.ops {
            for &conns in &opts.conns {
                for &pipeline in &opts.pipelines {
                    let mut targets = Vec::new();
                    if opts.redis.is_some() {
                        targets.push(Transport::Redis);
                    }
                    targets.extend(&opts.transports);
                    let mut rows = load_rows(opts, &targets, op, conns, pipeline)?;
                    let redis = opts.redis.as_ref().map(|_| rows.remove(0));
                    for row in rows {
                        out.push_str(&format!(
                            "| {} | {} | {} | {} | {:.0} | {} | {} | {} |",
                            op_name(op),
                            transport_name(row.transport),
                            conns,
                            pipeline,
                            row.ops_per_sec,
                            row.p50,
                            row.p99,
                            row.p999
                        ));
                        if let Some(r) = &redis {
                            out.push_str(&format!(
                                " {:.0} | {} | {} | {} | {:.2}× |",
                                r.ops_per_sec,
                                r.p50,
                                r.p99,
                                r.p999,
                                row.ops_per_sec / r.ops_per_sec.max(1.0)
                            ));
                        }
                        out.push('\n');
                    }
                }
            }
        }
    }
    if !opts.watchers.is_empty() {
        out.push('\n');
        out.push_str(&watch::report(opts)?);
    }
    if !opts.connections.is_empty() {
        out.push('\n');
        out.push_str(&watch::connections_report(opts)?);
    }
    Ok(out)
}
