//! Watch fan-out: M watchers (our WebSocket `watch`, or Redis SUBSCRIBE) and one writer; the
//! time from a write being sent to each watcher's push arriving. One client thread reads every
//! watcher socket through epoll, so the client costs the same for both servers and ten thousand
//! watchers do not need ten thousand client threads. The connections table adds the server's
//! memory and threads while the watchers are connected and after they leave.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::conn::{client_frame, resp_command, server_frames, KvOp, NunTcp, Redis};
use super::stats::Samples;
use super::{BenchOptions, DB, TOKEN};

const KEY: &str = "watched";

/// Which server the watchers watch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Server {
    /// Ours, WebSocket watchers and a TCP writer.
    Nun,
    /// Redis, SUBSCRIBE / PUBLISH.
    Redis,
}

/// Shared bookkeeping between the writer and the reader thread.
struct Board {
    start: Instant,
    sent_at: Vec<AtomicU64>,
    first: Vec<AtomicU64>,
    last: Vec<AtomicU64>,
    delivered: Vec<AtomicUsize>,
    total: AtomicUsize,
    completed: Mutex<usize>,
    cv: Condvar,
    watchers: usize,
}

impl Board {
    fn new(writes: usize, watchers: usize) -> Board {
        let zeros = |v: u64| (0..writes).map(|_| AtomicU64::new(v)).collect();
        Board {
            start: Instant::now(),
            sent_at: zeros(0),
            first: zeros(u64::MAX),
            last: zeros(0),
            delivered: (0..writes).map(|_| AtomicUsize::new(0)).collect(),
            total: AtomicUsize::new(0),
            completed: Mutex::new(0),
            cv: Condvar::new(),
            watchers,
        }
    }

    fn arrive(&self, seq: usize) {
        let Some(sent) = self.sent_at.get(seq) else {
            return;
        };
        let lat =
            (self.start.elapsed().as_nanos() as u64).saturating_sub(sent.load(Ordering::Acquire));
        self.first[seq].fetch_min(lat, Ordering::AcqRel);
        self.last[seq].fetch_max(lat, Ordering::AcqRel);
        self.total.fetch_add(1, Ordering::Relaxed);
        if self.delivered[seq].fetch_add(1, Ordering::AcqRel) + 1 == self.watchers {
            let mut done = self.completed.lock().unwrap_or_else(|e| e.into_inner());
            *done = (*done).max(seq + 1);
            self.cv.notify_all();
        }
    }
}

/// Per-write first and last delivery latency.
struct WatchResult {
    first: Samples,
    last: Samples,
    deliveries_per_sec: f64,
}

fn read_until(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    done: impl Fn(&[u8]) -> bool,
) -> io::Result<()> {
    let mut chunk = [0u8; 4096];
    while !done(buf) {
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Err(io::Error::other("server closed the connection"));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Ok(())
}

/// Opens one watcher that is subscribed when this returns.
fn open_watcher(opts: &BenchOptions, server: Server) -> io::Result<TcpStream> {
    let mut buf = Vec::new();
    match server {
        Server::Nun => {
            let mut s = TcpStream::connect(&opts.ws)?;
            s.set_nodelay(true)?;
            s.write_all(format!("GET / HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n", opts.ws).as_bytes())?;
            read_until(&mut s, &mut buf, |b| b.windows(4).any(|w| w == b"\r\n\r\n"))?;
            if !buf.starts_with(b"HTTP/1.1 101") {
                return Err(io::Error::other(String::from_utf8_lossy(&buf).to_string()));
            }
            let end = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap_or(0) + 4;
            buf.drain(..end);
            let mut out = Vec::new();
            client_frame(&format!("use-db {DB} {TOKEN}"), &mut out);
            client_frame(&format!("watch {KEY}"), &mut out);
            s.write_all(&out)?;
            read_until(&mut s, &mut buf, |b| {
                server_frames(b)
                    .0
                    .iter()
                    .filter(|f| f.starts_with(b"ok ") || f.starts_with(b"error"))
                    .count()
                    >= 2
            })?;
            if let Some(e) = server_frames(&buf)
                .0
                .iter()
                .find(|f| f.starts_with(b"error"))
            {
                return Err(io::Error::other(String::from_utf8_lossy(e).to_string()));
            }
            Ok(s)
        }
        Server::Redis => {
            let mut s = TcpStream::connect(opts.redis.as_deref().unwrap_or_default())?;
            s.set_nodelay(true)?;
            let mut out = Vec::new();
            resp_command(&mut out, &["SUBSCRIBE", KEY]);
            s.write_all(&out)?;
            // *3 $9 subscribe $7 watched :1
            read_until(&mut s, &mut buf, |b| b.ends_with(b":1\r\n"))?;
            Ok(s)
        }
    }
}

/// The sequence number a watcher's message reports, if it is a push of the watched key.
fn nun_seq(frame: &[u8]) -> Option<usize> {
    // changed-version <key> <version> <seq>\n
    let text = std::str::from_utf8(frame).ok()?;
    let mut parts = text.trim_end().splitn(4, ' ');
    (parts.next() == Some("changed-version")).then_some(())?;
    parts.nth(2)?.parse().ok()
}

/// Sequence numbers of the complete Redis `message` pushes at the start of `buf`, and the
/// bytes they used.
fn redis_seqs(buf: &[u8], seqs: &mut Vec<usize>) -> usize {
    // *3\r\n$7\r\nmessage\r\n$7\r\nwatched\r\n$<n>\r\n<seq>\r\n
    let mut at = 0;
    loop {
        let rest = &buf[at..];
        let mut lines = 0;
        let mut end = 0;
        let mut last_start = 0;
        while lines < 7 {
            match rest[end..].windows(2).position(|w| w == b"\r\n") {
                Some(i) => {
                    last_start = end;
                    end += i + 2;
                    lines += 1;
                }
                None => return at,
            }
        }
        if let Some(seq) = std::str::from_utf8(&rest[last_start..end - 2])
            .ok()
            .and_then(|s| s.parse().ok())
        {
            seqs.push(seq);
        }
        at += end;
    }
}

/// Open watchers and the thread reading them (which owns their sockets).
struct Watchers {
    stop: Arc<AtomicBool>,
    reader: Option<std::thread::JoinHandle<io::Result<()>>>,
}

impl Watchers {
    fn open(
        opts: &BenchOptions,
        server: Server,
        n: usize,
        board: &Arc<Board>,
    ) -> io::Result<Watchers> {
        let mut streams = Vec::with_capacity(n);
        for _ in 0..n {
            streams.push(open_watcher(opts, server)?);
        }
        // SAFETY: epoll_create1 returns a new descriptor we own (closed by the reader).
        let epoll = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if epoll < 0 {
            return Err(io::Error::last_os_error());
        }
        for (i, s) in streams.iter().enumerate() {
            s.set_nonblocking(true)?;
            let mut ev = libc::epoll_event {
                events: libc::EPOLLIN as u32,
                u64: i as u64,
            };
            // SAFETY: registers a live socket with our epoll instance.
            if unsafe { libc::epoll_ctl(epoll, libc::EPOLL_CTL_ADD, s.as_raw_fd(), &mut ev) } != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        let stop = Arc::new(AtomicBool::new(false));
        let board = Arc::clone(board);
        let stopping = Arc::clone(&stop);
        let reader =
            std::thread::spawn(move || read_all(epoll, streams, server, &board, &stopping));
        Ok(Watchers {
            stop,
            reader: Some(reader),
        })
    }

    fn close(mut self) -> io::Result<()> {
        self.stop.store(true, Ordering::Release);
        match self.reader.take() {
            Some(r) => r.join().map_err(|_| io::Error::other("reader panicked"))?,
            None => Ok(()),
        }
    }
}

fn read_all(
    epoll: i32,
    mut streams: Vec<TcpStream>,
    server: Server,
    board: &Board,
    stop: &AtomicBool,
) -> io::Result<()> {
    let mut bufs: Vec<Vec<u8>> = vec![Vec::new(); streams.len()];
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 1024];
    let mut chunk = vec![0u8; 64 * 1024];
    let mut seqs = Vec::new();
    let result = loop {
        if stop.load(Ordering::Acquire) {
            break Ok(());
        }
        // SAFETY: the kernel writes at most `events.len()` entries into our buffer.
        let n = unsafe { libc::epoll_wait(epoll, events.as_mut_ptr(), events.len() as i32, 100) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            break Err(e);
        }
        for ev in &events[..n as usize] {
            let i = ev.u64 as usize;
            loop {
                match streams[i].read(&mut chunk) {
                    Ok(0) => break,
                    Ok(k) => bufs[i].extend_from_slice(&chunk[..k]),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
            let used = match server {
                Server::Nun => {
                    let (frames, used) = server_frames(&bufs[i]);
                    seqs.extend(frames.into_iter().filter_map(nun_seq));
                    used
                }
                Server::Redis => redis_seqs(&bufs[i], &mut seqs),
            };
            bufs[i].drain(..used);
            for seq in seqs.drain(..) {
                board.arrive(seq);
            }
        }
    };
    streams.clear();
    // SAFETY: closes the epoll descriptor this thread owns.
    unsafe { libc::close(epoll) };
    result
}

/// The one writer of a watch row.
enum Writer {
    /// Sets over our TCP protocol (with the key, made once).
    Nun(NunTcp, [String; 1]),
    /// PUBLISH to Redis.
    Redis(Redis),
}

impl Writer {
    fn connect(opts: &BenchOptions, server: Server) -> io::Result<Writer> {
        Ok(match server {
            Server::Nun => Writer::Nun(NunTcp::connect(&opts.tcp, DB, TOKEN)?, [KEY.to_string()]),
            Server::Redis => {
                Writer::Redis(Redis::connect(opts.redis.as_deref().unwrap_or_default())?)
            }
        })
    }

    /// Sends write `seq` and reads its reply.
    fn write(&mut self, seq: usize) -> io::Result<()> {
        let value = seq.to_string();
        match self {
            Writer::Nun(w, key) => {
                use super::conn::Conn;
                w.batch(KvOp::Set, key, &value)
            }
            Writer::Redis(w) => {
                w.send(&["PUBLISH", KEY, &value])?;
                w.read_reply().map(drop)
            }
        }
    }
}

/// Sends `board`'s writes `seqs` one at a time, each once every watcher got the previous;
/// returns the seconds taken.
fn write_range(
    writer: &mut Writer,
    board: &Board,
    seqs: std::ops::Range<usize>,
) -> io::Result<f64> {
    let started = Instant::now();
    for seq in seqs {
        board.sent_at[seq].store(board.start.elapsed().as_nanos() as u64, Ordering::Release);
        writer.write(seq)?;
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut done = board.completed.lock().unwrap_or_else(|e| e.into_inner());
        while *done <= seq {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::Error::other(format!(
                    "write {seq} reached {} of {} watchers in 30 s",
                    board.delivered[seq].load(Ordering::Relaxed),
                    board.watchers
                )));
            }
            done = board
                .cv
                .wait_timeout(done, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
    Ok(started.elapsed().as_secs_f64())
}

fn results(board: &Board, elapsed: f64) -> WatchResult {
    let mut r = WatchResult {
        first: Samples::default(),
        last: Samples::default(),
        deliveries_per_sec: board.total.load(Ordering::Relaxed) as f64 / elapsed,
    };
    for seq in 0..board.sent_at.len() {
        let first = board.first[seq].load(Ordering::Relaxed);
        if first != u64::MAX {
            r.first.add(Duration::from_nanos(first));
            r.last.add(Duration::from_nanos(
                board.last[seq].load(Ordering::Relaxed),
            ));
        }
    }
    r
}

/// A row's writes go out in this many slices, taken in turn by each server (like the load
/// rows), so a machine whose speed drifts weighs on both alike.
const WATCH_SLICES: usize = 3;

/// One watch row on each of `servers`: all their watchers open at once, the writes sent in
/// [`WATCH_SLICES`] turns per server.
fn measure(
    opts: &BenchOptions,
    servers: &[Server],
    watchers: usize,
) -> io::Result<Vec<WatchResult>> {
    let writes = opts.watch_writes;
    let mut rows = Vec::new();
    for &server in servers {
        let board = Arc::new(Board::new(writes, watchers));
        let open = Watchers::open(opts, server, watchers, &board)?;
        let writer = Writer::connect(opts, server)?;
        rows.push((board, open, writer, 0.0));
    }
    let mut sent = Ok(());
    'slices: for slice in 0..WATCH_SLICES {
        let seqs = slice * writes / WATCH_SLICES..(slice + 1) * writes / WATCH_SLICES;
        for (board, _, writer, elapsed) in rows.iter_mut() {
            match write_range(writer, board, seqs.clone()) {
                Ok(took) => *elapsed += took,
                Err(e) => {
                    sent = Err(e);
                    break 'slices;
                }
            }
        }
    }
    // Every reader stops, whatever happened to the writes.
    let mut results_of = Vec::new();
    for (board, open, _, elapsed) in rows {
        open.close()?;
        results_of.push(results(&board, elapsed));
    }
    sent.map(|()| results_of)
}

/// The watch table.
pub fn report(opts: &BenchOptions) -> io::Result<String> {
    let mut out = format!(
        "Watch fan-out: {} writes per row, one writer (TCP), watchers on WebSocket (Redis: SUBSCRIBE/PUBLISH), one epoll client thread per server reading all its watchers; the writes go in {} slices taken in turn by each server. Latency from write sent to push received, µs.\n\n",
        opts.watch_writes, WATCH_SLICES
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
    let servers: &[Server] = if opts.redis.is_some() {
        &[Server::Nun, Server::Redis]
    } else {
        &[Server::Nun]
    };
    for &m in &opts.watchers {
        let mut rows = measure(opts, servers, m)?.into_iter();
        let Some(mut ours) = rows.next() else {
            continue;
        };
        out.push_str(&format!(
            "| {m} | {} | {} | {} | {} | {:.0} |",
            ours.first.percentile(50.0),
            ours.first.percentile(99.0),
            ours.last.percentile(50.0),
            ours.last.percentile(99.0),
            ours.deliveries_per_sec
        ));
        if let Some(mut r) = rows.next() {
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

/// Resident KiB and threads of process `pid`.
fn proc_status(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<u64> {
        let line = status.lines().find(|l| l.starts_with(name))?;
        line.split_whitespace().nth(1)?.parse().ok()
    };
    Some((field("VmRSS:")?, field("Threads:")?))
}

fn rss(pid: Option<u32>) -> u64 {
    pid.and_then(proc_status).map_or(0, |s| s.0)
}

/// How long watchers stay connected before the "connected" figures are read: longer than the
/// time after which our sessions count as idle and give memory back.
const SETTLE: Duration = Duration::from_secs(3);

/// One row of the connections table.
struct ConnRow {
    idle_kb: u64,
    connected_kb: u64,
    threads: u64,
    after_kb: Vec<u64>,
    result: WatchResult,
}

fn connections_row(
    opts: &BenchOptions,
    server: Server,
    n: usize,
    pid: Option<u32>,
) -> io::Result<ConnRow> {
    let idle_kb = rss(pid);
    let board = Arc::new(Board::new(opts.watch_writes, n));
    let open = Watchers::open(opts, server, n, &board)?;
    std::thread::sleep(SETTLE);
    let (connected_kb, threads) = pid.and_then(proc_status).unwrap_or((0, 0));
    let elapsed = Writer::connect(opts, server)
        .and_then(|mut w| write_range(&mut w, &board, 0..opts.watch_writes));
    open.close()?;
    let elapsed = elapsed?;
    let left = Instant::now();
    let mut after_kb = vec![rss(pid)];
    for s in 1..=10u64 {
        let at = left + Duration::from_secs(s);
        std::thread::sleep(at.saturating_duration_since(Instant::now()));
        after_kb.push(rss(pid));
    }
    Ok(ConnRow {
        idle_kb,
        connected_kb,
        threads,
        after_kb,
        result: results(&board, elapsed),
    })
}

fn mb(kb: u64) -> String {
    format!("{:.1}", kb as f64 / 1024.0)
}

/// The connections table: memory, threads and fan-out with 1,000 and 10,000 watchers.
pub fn connections_report(opts: &BenchOptions) -> io::Result<String> {
    if let Err(e) = crate::os::raise_fd_limit() {
        log::warn!("cannot raise the open files limit: {e}");
    }
    let mut servers = vec![("nun-db (WebSocket)", Server::Nun, opts.server_pid)];
    if opts.redis.is_some() {
        servers.push(("Redis (SUBSCRIBE)", Server::Redis, opts.redis_pid));
    }
    let mut table = String::from(
        "| server | watchers | RSS idle MB | RSS connected MB | per connection KiB | threads | RSS 10 s after they leave MB | kept | deliveries/s | first p50 | first p99 | last p50 | last p99 |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    let mut timeline = String::from("| server | watchers | at leave | 1 s | 2 s | 3 s | 4 s | 5 s | 6 s | 7 s | 8 s | 9 s | 10 s |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    for &n in &opts.connections {
        for (name, server, pid) in &servers {
            let mut row = connections_row(opts, *server, n, *pid)?;
            let taken = row.connected_kb.saturating_sub(row.idle_kb);
            let after = row.after_kb.last().copied().unwrap_or(0);
            let kept = if taken == 0 {
                "-".to_string()
            } else {
                format!(
                    "{:.0}%",
                    100.0 * after.saturating_sub(row.idle_kb) as f64 / taken as f64
                )
            };
            table.push_str(&format!(
                "| {name} | {n} | {} | {} | {:.1} | {} | {} | {kept} | {:.0} | {} | {} | {} | {} |\n",
                mb(row.idle_kb),
                mb(row.connected_kb),
                taken as f64 / n as f64,
                row.threads,
                mb(after),
                row.result.deliveries_per_sec,
                row.result.first.percentile(50.0),
                row.result.first.percentile(99.0),
                row.result.last.percentile(50.0),
                row.result.last.percentile(99.0),
            ));
            timeline.push_str(&format!(
                "| {name} | {n} | {} |\n",
                row.after_kb
                    .iter()
                    .map(|kb| mb(*kb))
                    .collect::<Vec<_>>()
                    .join(" | ")
            ));
        }
    }
    Ok(format!(
        "Connections: N WebSocket sessions (Redis: SUBSCRIBE connections), each watching one key, {} writes from one TCP writer, read by one epoll client thread. Memory is the server's VmRSS from /proc: idle before they connect, {} s after the last one subscribed, and each second after they all leave (MB). Latency µs.\n\n{table}\nRSS after the watchers leave (MB):\n\n{timeline}",
        opts.watch_writes,
        SETTLE.as_secs()
    ))
}
