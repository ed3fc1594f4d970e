//! Watch fan-out latency: M watchers (our WebSocket `watch`, or Redis SUBSCRIBE), one writer; the
//! time from a write being sent to each watcher's push arriving.

use std::io;
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use tungstenite::Message;

use super::conn::{Conn, KvOp, NunTcp, Redis};
use super::stats::Samples;
use super::{BenchOptions, DB, TOKEN};

const KEY: &str = "watched";

/// Shared bookkeeping between the writer and the watcher threads.
struct Board {
    start: Instant,
    sent_at: Vec<AtomicU64>,
    delivered: Vec<AtomicUsize>,
    completed: Mutex<usize>,
    cv: Condvar,
    watchers: usize,
}

impl Board {
    fn arrive(&self, seq: usize) -> Option<u64> {
        let sent = self.sent_at.get(seq)?.load(Ordering::Acquire);
        let now = self.start.elapsed().as_nanos() as u64;
        let n = self.delivered[seq].fetch_add(1, Ordering::AcqRel) + 1;
        if n == self.watchers {
            let mut done = self.completed.lock().unwrap_or_else(|e| e.into_inner());
            *done = (*done).max(seq + 1);
            self.cv.notify_all();
        }
        Some(now.saturating_sub(sent))
    }
}

/// Per-write first and last delivery latency.
struct WatchResult {
    first: Samples,
    last: Samples,
    deliveries_per_sec: f64,
}

type Watcher = (std::thread::JoinHandle<Vec<(usize, u64)>>, TcpStream);

fn nun_watcher(opts: &BenchOptions, board: &Arc<Board>) -> io::Result<Watcher> {
    let stream = TcpStream::connect(&opts.ws)?;
    stream.set_nodelay(true)?;
    let closer = stream.try_clone()?;
    let (mut ws, _) = tungstenite::client(format!("ws://{}/", opts.ws), stream)
        .map_err(|e| io::Error::other(e.to_string()))?;
    let mut ok = 0;
    for cmd in [format!("use-db {DB} {TOKEN}"), format!("watch {KEY}")] {
        ws.send(Message::Text(cmd))
            .map_err(|e| io::Error::other(e.to_string()))?;
    }
    while ok < 2 {
        match ws.read().map_err(|e| io::Error::other(e.to_string()))? {
            Message::Text(t) if t == "ok \n" => ok += 1,
            Message::Text(t) if t.starts_with("error") => return Err(io::Error::other(t)),
            _ => {}
        }
    }
    let board = Arc::clone(board);
    let handle = std::thread::spawn(move || {
        let mut got = Vec::new();
        while let Ok(msg) = ws.read() {
            if let Message::Text(t) = msg {
                // changed-version <key> <version> <seq>
                let mut parts = t.trim_end().splitn(4, ' ');
                if parts.next() == Some("changed-version") {
                    if let Some(seq) = parts.nth(2).and_then(|s| s.parse::<usize>().ok()) {
                        if let Some(lat) = board.arrive(seq) {
                            got.push((seq, lat));
                        }
                    }
                }
            }
        }
        got
    });
    Ok((handle, closer))
}

fn redis_watcher(addr: &str, board: &Arc<Board>) -> io::Result<Watcher> {
    let mut r = Redis::connect(addr)?;
    r.send(&["SUBSCRIBE", KEY])?;
    r.read_reply()?;
    let closer = r.stream_clone()?;
    let board = Arc::clone(board);
    let handle = std::thread::spawn(move || {
        let mut got = Vec::new();
        while let Ok(items) = r.read_reply() {
            if items.len() == 3 && items[0] == b"message" {
                if let Some(seq) = std::str::from_utf8(&items[2])
                    .ok()
                    .and_then(|s| s.parse::<usize>().ok())
                {
                    if let Some(lat) = board.arrive(seq) {
                        got.push((seq, lat));
                    }
                }
            }
        }
        got
    });
    Ok((handle, closer))
}

fn measure(opts: &BenchOptions, watchers: usize, redis: bool) -> io::Result<WatchResult> {
    let writes = opts.watch_writes;
    let board = Arc::new(Board {
        start: Instant::now(),
        sent_at: (0..writes).map(|_| AtomicU64::new(0)).collect(),
        delivered: (0..writes).map(|_| AtomicUsize::new(0)).collect(),
        completed: Mutex::new(0),
        cv: Condvar::new(),
        watchers,
    });
    let mut ws = Vec::with_capacity(watchers);
    for _ in 0..watchers {
        ws.push(match (redis, &opts.redis) {
            (true, Some(addr)) => redis_watcher(addr, &board)?,
            _ => nun_watcher(opts, &board)?,
        });
    }
    let mut nun_writer = if redis {
        None
    } else {
        Some(NunTcp::connect(&opts.tcp, DB, TOKEN)?)
    };
    let mut redis_writer = match (redis, &opts.redis) {
        (true, Some(addr)) => Some(Redis::connect(addr)?),
        _ => None,
    };
    let started = Instant::now();
    for seq in 0..writes {
        board.sent_at[seq].store(board.start.elapsed().as_nanos() as u64, Ordering::Release);
        let value = seq.to_string();
        if let Some(w) = nun_writer.as_mut() {
            w.batch(KvOp::Set, &[KEY.to_string()], &value)?;
        }
        if let Some(w) = redis_writer.as_mut() {
            w.send(&["PUBLISH", KEY, &value])?;
            w.read_reply()?;
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut done = board.completed.lock().unwrap_or_else(|e| e.into_inner());
        while *done <= seq {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::Error::other(format!(
                    "watch delivery of write {seq} to {watchers} watchers timed out"
                )));
            }
            done = board
                .cv
                .wait_timeout(done, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let mut first = vec![u64::MAX; writes];
    let mut last = vec![0u64; writes];
    let mut deliveries = 0usize;
    for (handle, closer) in ws {
        let _ = closer.shutdown(Shutdown::Both);
        let got = handle
            .join()
            .map_err(|_| io::Error::other("watcher thread panicked"))?;
        deliveries += got.len();
        for (seq, lat) in got {
            first[seq] = first[seq].min(lat);
            last[seq] = last[seq].max(lat);
        }
    }
    let mut r = WatchResult {
        first: Samples::default(),
        last: Samples::default(),
        deliveries_per_sec: deliveries as f64 / elapsed,
    };
    for seq in 0..writes {
        if first[seq] != u64::MAX {
            r.first.add(Duration::from_nanos(first[seq]));
            r.last.add(Duration::from_nanos(last[seq]));
        }
    }
    Ok(r)
}

/// The watch table.
pub fn report(opts: &BenchOptions) -> io::Result<String> {
    let mut out = format!(
        "Watch fan-out: {} writes per row, one writer (TCP), watchers on WebSocket (Redis: SUBSCRIBE/PUBLISH). Latency from write sent to push received, µs.\n\n",
        opts.watch_writes
    );
    out.push_str("| watchers | first p50 | first p99 | last p50 | last p99 | deliveries/s |");
    if opts.redis.is_some() {
        out.push_str(" redis first p50 | redis first p99 | redis last p50 | redis last p99 | redis deliveries/s | first-p99 ours/redis |");
    }
    out.push('\n');
    out.push_str("|---|---|---|---|---|---|");
    if opts.redis.is_some() {
        out.push_str("---|---|---|---|---|---|");
    }
    out.push('\n');
    for &m in &opts.watchers {
        let mut ours = measure(opts, m, false)?;
        out.push_str(&format!(
            "| {m} | {} | {} | {} | {} | {:.0} |",
            ours.first.percentile(50.0),
            ours.first.percentile(99.0),
            ours.last.percentile(50.0),
            ours.last.percentile(99.0),
            ours.deliveries_per_sec
        ));
        if opts.redis.is_some() {
            let mut r = measure(opts, m, true)?;
            let ratio = ours.first.percentile(99.0) as f64 / r.first.percentile(99.0).max(1) as f64;
            out.push_str(&format!(
                " {} | {} | {} | {} | {:.0} | {:.2}× |",
                r.first.percentile(50.0),
                r.first.percentile(99.0),
                r.last.percentile(50.0),
                r.last.percentile(99.0),
                r.deliveries_per_sec,
                ratio
            ));
        }
        out.push('\n');
    }
    Ok(out)
}
