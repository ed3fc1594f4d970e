//! Log shipping. A secondary's receiver thread connects to the primary's TCP port and sends
//! `repl-sync <last_lsn> <last_term> <node>`; that session becomes a sender that streams every
//! record after it (from memory, else from log files, else a full sync of all data), with
//! heartbeats when idle. New records and commit points are usually written to the stream by the
//! thread that made them (`shipping.rs`); the sender thread does the rest. The receiver appends each record to its own log under the same LSN,
//! applies it (notifying local watchers) and acknowledges the LSN once durable: at once where
//! acknowledgements move the commit point (majority writes), else (`ok lazy-acks`) a frame of
//! several records at once and others at most every 50 ms and on every heartbeat, as Redis
//! replicas do.
//!
//! Receiving is not applying: a secondary applies records to memory (and so notifies its
//! watchers) only once the primary reports them committed (`commit <lsn>`), so no watcher ever
//! sees a change a later primary could roll back. A promoted node applies what it inherited
//! before taking writes ([`take_over`]).
//!
//! Lines from the primary: `recs <length>` followed by that many bytes of records exactly as
//! they are in the log (length, checksum, fields: the secondary appends them as they came),
//! `ok` or `ok lazy-acks` (the answer to `repl-sync`), `full <base_lsn>` … `full-end`,
//! `commit <lsn>`, `ping <term> <primary> <last_lsn>`. Lines from the secondary: `ack <lsn>`.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::shipping::{Composed, Outgoing, ACKED_AT_ONCE};
use super::Cluster;
use crate::db::{outbox, Databases, Entry};
use crate::os::spawn_small;
use crate::protocol::Strategy;
use crate::storage::backlog::Tail;
use crate::storage::oplog::OpLog;
use crate::storage::record::{view, Decoded, Op, Record, Viewed};
use crate::storage::Storage;

/// What log shipping works on: the cluster's state, this node's storage and its databases.
#[derive(Debug, Clone)]
pub struct Replica {
    /// Roles, terms, members and the commit point.
    pub cluster: Arc<Cluster>,
    /// The operation log and snapshots.
    pub storage: Arc<Storage>,
    /// The databases records apply to.
    pub dbs: Arc<Databases>,
}

impl Replica {
    fn log(&self) -> &Arc<OpLog> {
        self.storage.log()
    }
}

/// How long a blocking write to a secondary may take before the stream is dropped.
const STREAM_WRITE_TIMEOUT: Duration = Duration::from_secs(60);

/// The primary's answer to `repl-sync` when its commit point does not follow acknowledgements
/// (`NUN_WRITE_QUORUM=1`): the secondary may acknowledge lazily. Older secondaries read any
/// `ok` line alike, and acknowledge every frame.
const LAZY_ACKS_OK: &[u8] = b"ok lazy-acks\n";

/// How often a secondary told to acknowledge lazily acknowledges while records keep coming
/// (it always answers a heartbeat): often enough for lag figures, rarely enough that the
/// primary's acknowledgement readers sleep through a busy stream.
const LAZY_ACK_EVERY: Duration = Duration::from_millis(50);

/// Digits of a `recs` frame's length: a fixed width, so the length is written after the
/// records are.
const FRAME_DIGITS: usize = 10;
/// Bytes of a `recs` frame's header line.
const FRAME_HEADER: usize = b"recs ".len() + FRAME_DIGITS + 1;

/// Starts a `recs <length>` frame at the end of `out`; encoded records go after it, and
/// [`close_frame`] writes its length.
pub(super) fn open_frame(out: &mut Vec<u8>) -> usize {
    let at = out.len();
    out.extend_from_slice(b"recs ");
    out.extend_from_slice(&[b'0'; FRAME_DIGITS]);
    out.push(b'\n');
    at
}

/// Ends the frame opened at `at`: writes its length, or takes it out when it holds nothing.
pub(super) fn close_frame(out: &mut Vec<u8>, at: usize) {
    let mut len = out.len() - at - FRAME_HEADER;
    if len == 0 {
        out.truncate(at);
        return;
    }
    for digit in out[at + 5..at + 5 + FRAME_DIGITS].iter_mut().rev() {
        *digit = b'0' + (len % 10) as u8;
        len /= 10;
    }
}

/// Appends `records` to `out` as one `recs` frame (nothing if there are none).
fn push_frame<'a>(records: impl IntoIterator<Item = &'a Record>, out: &mut Vec<u8>) {
    let at = open_frame(out);
    for r in records {
        r.encode(out);
    }
    close_frame(out, at);
}

/// Reads the `len` bytes of a frame into `frame` (emptied first). `idle` runs when the read
/// times out: it says whether to keep waiting.
fn read_frame(
    reader: &mut impl Read,
    len: usize,
    frame: &mut Vec<u8>,
    mut idle: impl FnMut() -> io::Result<bool>,
) -> io::Result<bool> {
    frame.clear();
    while frame.len() < len {
        let want = (len - frame.len()) as u64;
        match reader.by_ref().take(want).read_to_end(frame) {
            Ok(0) => return Err(io::Error::other("primary closed the stream")),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if !idle()? {
                    return Ok(false);
                }
            }
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// The term of the record at `lsn` on this node, from memory or the log files.
fn term_of(log: &OpLog, lsn: u64) -> Option<u64> {
    log.term_at(lsn).or_else(|| {
        log.read_from(lsn)
            .ok()
            .flatten()
            .and_then(|v| v.into_iter().find(|r| r.lsn == lsn).map(|r| r.term))
    })
}

/// Serves one secondary on a TCP session that sent `repl-sync` (primary side); `leftover` is
/// what the session had read past that command.
pub fn serve_secondary(
    replica: &Replica,
    stream: Arc<TcpStream>,
    leftover: Vec<u8>,
    after: u64,
    after_term: u64,
    peer: String,
) {
    let (cluster, log) = (&replica.cluster, replica.log());
    let _ = stream.set_read_timeout(None);
    let _ = stream.set_write_timeout(Some(STREAM_WRITE_TIMEOUT));
    let mut out = &*stream;
    if !cluster.is_primary() {
        let _ = out.write_all(b"error Not the primary \n");
        return;
    }
    let every_ack = cluster.commits_on_acks();
    let ok: &[u8] = if every_ack { b"ok \n" } else { LAZY_ACKS_OK };
    if out.write_all(ok).is_err() {
        return;
    }
    log::info!("replicating to {peer} from LSN {after}");
    let outgoing = Arc::new(Outgoing::new(Arc::clone(&stream), !every_ack));
    {
        let cluster = Arc::clone(cluster);
        let log = Arc::clone(log);
        let outgoing = Arc::clone(&outgoing);
        let peer = peer.clone();
        let input = Arc::clone(&stream);
        let started = spawn_small(format!("acks-{peer}"), move || {
            let reader = BufReader::new(io::Cursor::new(leftover).chain(&*input));
            for line in reader.lines() {
                let Ok(line) = line else { break };
                if let Some(lsn) = line
                    .strip_prefix("ack ")
                    .and_then(|n| n.trim().parse::<u64>().ok())
                {
                    let lsn = lsn.min(outgoing.shown());
                    outgoing.note_ack(lsn);
                    // The commit point may have moved (its line goes to every stream), and
                    // records held back for this acknowledgement go now.
                    cluster.record_ack(&peer, lsn);
                    cluster.ship(&log);
                } else if let Some(report) = line.strip_prefix("arbiters ") {
                    let (generation, dbs) = report.split_once(' ').unwrap_or((report, "-"));
                    if let Ok(generation) = generation.parse() {
                        let dbs = dbs
                            .split(',')
                            .filter(|d| !d.is_empty() && *d != "-")
                            .map(str::to_string)
                            .collect();
                        cluster.set_remote_arbiters(&peer, generation, dbs);
                        log.wake();
                    }
                }
            }
            outgoing.close();
            let _ = input.shutdown(Shutdown::Both);
        });
        if !started {
            return;
        }
    }
    let consistent = after <= log.last_lsn()
        && if after == 0 {
            matches!(log.read_from(1), Ok(Some(_)))
        } else {
            term_of(log, after) == Some(after_term)
        };
    let mut after = after;
    if !consistent && full_sync(replica, &mut out, &mut after).is_err() {
        return;
    }
    {
        let mut s = outgoing.lock();
        s.after = after;
        outgoing.show(&s);
    }
    // From here on, writes ship to this stream themselves; this thread sends heartbeats and
    // arbiter confirmations, and takes over when they cannot finish (see shipping.rs).
    let _listed = cluster.streams().list(&outgoing);
    let heartbeat = (cluster.timeout / 4).max(Duration::from_millis(10));
    let mut last_ping = Instant::now()
        .checked_sub(heartbeat)
        .unwrap_or_else(Instant::now);
    let mut buf = Vec::with_capacity(64 * 1024);
    while !outgoing.is_closed() && cluster.is_primary() {
        // Read the wake count first, so a wake-up during this round is not missed.
        let wakes = log.wakes();
        let mut s = outgoing.lock();
        buf.clear();
        if let Some(generation) = cluster.take_arbiter_confirm(&peer) {
            buf.extend_from_slice(format!("arbiters-ok {generation}\n").as_bytes());
        }
        if last_ping.elapsed() >= heartbeat {
            last_ping = Instant::now();
            buf.extend_from_slice(
                format!(
                    "ping {} {} {}\n",
                    cluster.term(),
                    cluster.self_id,
                    log.last_lsn()
                )
                .as_bytes(),
            );
        }
        if !s.unsent.is_empty() && out.write_all(&std::mem::take(&mut s.unsent)).is_err() {
            break;
        }
        let composed = Outgoing::compose(&mut s, log, cluster, &mut buf);
        if composed == Composed::TooOld {
            match log.read_from(s.after + 1) {
                Ok(Some(records)) => {
                    push_frame(&records, &mut buf);
                    let last = records.last().map_or(s.after, |r| r.lsn);
                    s.framed(records.len(), last);
                }
                Ok(None) => {
                    if !buf.is_empty() && out.write_all(&buf).is_err() {
                        break;
                    }
                    buf.clear();
                    if full_sync(replica, &mut out, &mut s.after).is_err() {
                        return;
                    }
                }
                Err(e) => {
                    log::error!("replication to {peer}: {e}");
                    return;
                }
            }
        }
        // Published before the write: an ack for these records can only follow it.
        outgoing.show(&s);
        if !buf.is_empty() && out.write_all(&buf).is_err() {
            break;
        }
        s.stalled = false;
        drop(s);
        if composed != Composed::CaughtUp || outgoing.is_pending() {
            continue;
        }
        log.wait_for_wake(wakes, heartbeat.saturating_sub(last_ping.elapsed()));
    }
    let _ = out.shutdown(Shutdown::Both);
    log::info!("stopped replicating to {peer}");
}

/// Sends every database as records (a fuzzy copy taken after reading the base LSN; records
/// after the base, streamed next, make it exact).
fn full_sync(replica: &Replica, out: &mut impl Write, after: &mut u64) -> io::Result<()> {
    let base = replica.log().last_lsn();
    log::info!("full sync at LSN {base}");
    out.write_all(format!("full {base}\n").as_bytes())?;
    let mut buf = Vec::with_capacity(1 << 20);
    // The member list in force: the log that said so may be gone from this node's files.
    let members = Record::cluster(Op::Members, replica.cluster.members().join(","));
    push_frame([&members], &mut buf);
    for db in replica.dbs.all() {
        let create = Record {
            lsn: 0,
            term: 0,
            op: Op::CreateDb,
            db: db.name().to_string(),
            key: String::new(),
            version: 0,
            value: db.strategy().name().to_string(),
        };
        push_frame([&create], &mut buf);
        let mut last_key: Option<String> = None;
        loop {
            let chunk = db.copy_chunk(last_key.as_deref(), 4096);
            if chunk.is_empty() {
                break;
            }
            last_key = chunk.last().map(|(k, _)| k.clone());
            let frame = open_frame(&mut buf);
            for (key, entry) in chunk {
                let r = Record {
                    lsn: 0,
                    term: 0,
                    op: if entry.deleted { Op::Remove } else { Op::Set },
                    db: db.name().to_string(),
                    key,
                    version: entry.version,
                    value: entry.value.to_string(),
                };
                r.encode(&mut buf);
            }
            close_frame(&mut buf, frame);
            out.write_all(&buf)?;
            buf.clear();
        }
        out.write_all(&buf)?;
        buf.clear();
    }
    out.write_all(b"full-end\n")?;
    *after = base;
    Ok(())
}

/// Starts the receiver thread of a secondary: follows whoever is primary.
pub fn start_receiver(replica: &Replica) -> io::Result<()> {
    let replica = replica.clone();
    std::thread::Builder::new()
        .name("repl-receiver".into())
        .spawn(move || loop {
            let cluster = &replica.cluster;
            let (role, _, primary) = cluster.status();
            match primary {
                Some(p) if role != super::Role::Primary && p != cluster.self_id => {
                    if let Err(e) = follow(&replica, &p) {
                        log::debug!("replication from {p} stopped: {e}");
                        // A primary this node cannot follow is as good as silent.
                        cluster.primary_lost(&p);
                    }
                    cluster.wait_change(Duration::from_millis(100));
                }
                _ => cluster.wait_change(Duration::from_millis(200)),
            }
        })?;
    Ok(())
}

/// A full sync being received: each database's strategy and entries.
type Staged = Vec<crate::db::StagedDb>;

/// Applies logged records up to `upto` that this node has received but not applied yet
/// (they are committed, or this node is taking over as primary), copying them out of the
/// backlog into `logged` (kept by the caller: a buffer that grows and shrinks each time costs
/// page faults). Callers hold [`super::Cluster::replica_guard`].
fn apply_received(replica: &Replica, upto: u64, logged: &mut Vec<u8>) -> io::Result<()> {
    let log = replica.log();
    let Some(from) = replica.dbs.unapplied_from() else {
        return Ok(());
    };
    if upto < from {
        return Ok(());
    }
    let apply = |r: Viewed<'_>| {
        if r.lsn <= upto {
            apply_members(&replica.cluster, r);
            replica.dbs.apply_record(r);
        }
    };
    logged.clear();
    if log.copy_after(from - 1, upto, usize::MAX, logged) == Tail::TooOld {
        let records = log.read_from(from).map_err(io::Error::other)?;
        records
            .unwrap_or_default()
            .iter()
            .for_each(|r| apply(r.viewed()));
    } else {
        let mut rest = &logged[..];
        while let Decoded::Record(r, len) = view(rest) {
            apply(r);
            rest = &rest[len..];
        }
    }
    let last = log.last_lsn();
    replica
        .dbs
        .set_unapplied_from((upto < last).then_some(upto + 1));
    replica.cluster.set_applied(upto.min(last));
    Ok(())
}

/// Applies the member list a committed `members` or term-start record carries.
fn apply_members(cluster: &Cluster, r: Viewed<'_>) {
    if matches!(r.fields.op, Op::Members | Op::TermStart) && !r.fields.value.is_empty() {
        cluster.set_members(member_list(r.fields.value));
    }
}

/// The members named in a record's comma-separated value.
pub fn member_list(value: &str) -> Vec<String> {
    value
        .split(',')
        .filter(|m| !m.is_empty())
        .map(str::to_string)
        .collect()
}

/// Prepares this node to lead `term` (the cluster's elected hook): applies every record it
/// received as a secondary, then logs the term-start record and returns its LSN. The pushes of
/// what it applied are left in this thread's [`outbox::take_touched`] list: they may be shown
/// once the term-start record commits.
pub fn take_over(replica: &Replica, term: u64) -> Result<u64, String> {
    let (cluster, log) = (&replica.cluster, replica.log());
    let _guard = cluster.replica_guard();
    apply_received(replica, log.last_lsn(), &mut Vec::new()).map_err(|e| e.to_string())?;
    // The term starts by stating its member list (with any change it inherited applied), so
    // every follower holds the list this primary counts majorities in.
    let mut start = Record {
        term,
        ..Record::cluster(Op::TermStart, cluster.members().join(","))
    };
    let lsn = log.append(&mut start).map_err(|e| e.to_string())?;
    log.wait_durable(lsn).map_err(|e| e.to_string())?;
    cluster.reset_durable(lsn);
    cluster.set_applied(lsn);
    Ok(lsn)
}

/// Follows `primary` until the connection fails or the primary changes.
fn follow(replica: &Replica, primary: &str) -> io::Result<()> {
    let (cluster, log) = (&replica.cluster, replica.log());
    let addr = primary
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| io::Error::other("cannot resolve primary"))?;
    let following = || cluster.follows(primary);
    // Short attempts, so a primary that changes meanwhile is followed at once.
    let tries = Instant::now();
    let stream = loop {
        match TcpStream::connect_timeout(&addr, cluster.timeout / 4) {
            Ok(s) => break s,
            Err(_) if tries.elapsed() < cluster.timeout && following() => {}
            Err(_) if !following() => return Ok(()),
            Err(e) => return Err(e),
        }
    };
    stream.set_nodelay(true)?;
    // Wakes up to notice a change of primary; the primary itself pings every quarter timeout.
    stream.set_read_timeout(Some(cluster.timeout / 4))?;
    // Acks that the primary stops acknowledging (the link lost this direction) end the stream
    // within half a timeout, and with it this node's trust in the primary.
    crate::os::set_user_timeout(&stream, cluster.timeout / 2)?;
    let mut out = stream.try_clone()?;
    let mut reader = BufReader::with_capacity(1 << 20, stream);
    let (last_term, last_lsn) = log.last_position();
    out.write_all(
        format!(
            "auth {} {}\nrepl-sync {last_lsn} {last_term} {}\n",
            cluster.admin.0, cluster.admin.1, cluster.self_id
        )
        .as_bytes(),
    )?;
    let mut line = String::new();
    let mut last_data = Instant::now();
    let mut full: Option<(u64, Staged)> = None;
    let mut full_members: Option<Vec<String>> = None;
    let mut received = last_lsn;
    let mut applied = replica.dbs.unapplied_from().map_or(last_lsn, |f| f - 1);
    let mut acks = Acks::new(Instant::now());
    let (mut frame, mut logged) = (Vec::new(), Vec::new());
    cluster.set_applied(applied);
    cluster.note_primary_lsn(0);
    // After a read timed out (EAGAIN; an aborted stream fails with ETIMEDOUT instead): false
    // to stop following, an error when the primary has been silent too long.
    let idle = |last_data: Instant| {
        if !following() {
            Ok(false)
        } else if last_data.elapsed() > cluster.timeout {
            Err(io::Error::new(io::ErrorKind::TimedOut, "primary is silent"))
        } else {
            Ok(true)
        }
    };
    loop {
        line.clear();
        // A timed-out read keeps what it got of a line in `line`; the next read completes it.
        let read = loop {
            match reader.read_line(&mut line) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if !idle(last_data)? {
                        return Ok(());
                    }
                }
                other => break other?,
            }
        };
        if read == 0 {
            return Err(io::Error::other("primary closed the stream"));
        }
        last_data = Instant::now();
        let text = line.trim_end_matches('\n');
        let (verb, rest) = text.split_once(' ').unwrap_or((text, ""));
        match verb {
            "valid" => {}
            "ok" => acks.told(line.as_bytes()),
            "error" | "invalid" => return Err(io::Error::other(text.to_string())),
            "full" => {
                let base: u64 = rest.parse().map_err(|_| io::Error::other("bad full"))?;
                full = Some((base, Vec::new()));
            }
            "full-end" => {
                let Some((base, staged)) = full.take() else {
                    return Err(io::Error::other("full-end without full"));
                };
                let _guard = cluster.replica_guard();
                if !following() {
                    return Ok(());
                }
                log.reset(base)?;
                replica.dbs.set_unapplied_from(None);
                replica.dbs.replace_all(staged, base);
                if let Some(members) = full_members.take() {
                    cluster.set_members(members);
                }
                replica.storage.snapshot(&replica.dbs)?;
                received = base;
                applied = base;
                cluster.set_applied(applied);
            }
            "recs" => {
                let len = rest.parse().map_err(|_| io::Error::other("bad recs"))?;
                if !read_frame(&mut reader, len, &mut frame, || idle(last_data))? {
                    return Ok(());
                }
                last_data = Instant::now();
                let guard = full.is_none().then(|| cluster.replica_guard());
                if !following() {
                    return Ok(());
                }
                let (mut rest, mut count) = (&frame[..], 0);
                while !rest.is_empty() {
                    count += 1;
                    let Decoded::Record(r, len) = view(rest) else {
                        return Err(io::Error::other("bad record"));
                    };
                    let bytes = &rest[..len];
                    rest = &rest[len..];
                    if let Some((_, staged)) = full.as_mut() {
                        if r.fields.op == Op::Members {
                            full_members = Some(member_list(r.fields.value));
                        } else {
                            stage(staged, r.fields.to_owned(r.lsn, r.term));
                        }
                    } else if r.lsn > received {
                        if replica.dbs.unapplied_from().is_none() {
                            replica.dbs.set_unapplied_from(Some(applied + 1));
                        }
                        received = log.append_encoded(bytes)?;
                    }
                }
                drop(guard);
                acks.framed(count);
                log.refill_backlog();
            }
            "commit" => {
                let lsn = rest.parse().map_err(|_| io::Error::other("bad commit"))?;
                cluster.set_commit(lsn);
            }
            "arbiters-ok" => {
                if let Ok(generation) = rest.parse() {
                    cluster.confirm_arbiters(generation);
                }
            }
            "ping" => {
                let mut p = rest.split(' ');
                let term = p.next().and_then(|t| t.parse().ok()).unwrap_or(0);
                let id = p.next().unwrap_or_default();
                if id != primary || !cluster.heard_from_primary(term, id) {
                    return Ok(());
                }
                if let Some(lsn) = p.next().and_then(|l| l.parse().ok()) {
                    cluster.note_primary_lsn(lsn);
                }
                acks.heartbeat();
            }
            _ => return Err(io::Error::other(format!("unexpected line: {text}"))),
        }
        if reader.buffer().is_empty() && full.is_none() {
            let upto = cluster.commit().min(received);
            let generation = cluster.arbiter_gen();
            // The clock as read for the data just handled: no second read per frame.
            let ack = acks.due(received, generation, last_data);
            if ack.is_some() || upto > applied {
                log.wait_durable(received)?;
            }
            if let Some(report) = ack {
                // Answering a heartbeat also renews this node's arbiter report.
                let mut reply = format!("ack {received}\n");
                if report {
                    reply.push_str(&arbiter_report(&replica.dbs, generation));
                }
                out.write_all(reply.as_bytes())?;
                acks.sent(received, report.then_some(generation), last_data);
            }
            if upto > applied {
                let _guard = cluster.replica_guard();
                if !following() {
                    return Ok(());
                }
                apply_received(replica, upto, &mut logged)?;
                applied = upto;
                // Committed, and durable here (above): the pushes may go.
                outbox::take_touched().release();
            }
        }
        if !following() {
            return Ok(());
        }
    }
}

/// When a secondary acknowledges what it received: once it read all that arrived, if it got
/// something new since its last acknowledgement and the primary wants it now (every frame, a
/// heartbeat, a frame of [`ACKED_AT_ONCE`] records, a new arbiter report, or
/// [`LAZY_ACK_EVERY`] passed when acknowledging lazily).
#[derive(Debug)]
struct Acks {
    /// Last LSN acknowledged; `None` forces the next acknowledgement (a heartbeat to answer,
    /// which keeps the primary's majority view fresh).
    acked: Option<u64>,
    /// The arbiter report generation last sent.
    reported: u64,
    /// The primary said acknowledgements may be lazy ([`LAZY_ACKS_OK`]).
    lazy: bool,
    /// When the last acknowledgement went.
    at: Instant,
    /// A frame since then asked for one at once.
    asked: bool,
}

impl Acks {
    /// Nothing acknowledged yet, as of `now`: the first chance acknowledges.
    fn new(now: Instant) -> Acks {
        Acks {
            acked: None,
            reported: 0,
            lazy: false,
            at: now,
            asked: false,
        }
    }

    /// The primary's `ok` line answering `repl-sync`.
    fn told(&mut self, ok_line: &[u8]) {
        self.lazy = ok_line == LAZY_ACKS_OK;
    }

    /// A frame of `count` records arrived.
    fn framed(&mut self, count: usize) {
        self.asked |= count >= ACKED_AT_ONCE;
    }

    /// A heartbeat arrived: it is answered.
    fn heartbeat(&mut self) {
        self.acked = None;
    }

    /// Whether to acknowledge `received` at `now` (with this node's arbiter report generation
    /// `generation`): `Some(true)` with the arbiter report, `Some(false)` without.
    fn due(&self, received: u64, generation: u64, now: Instant) -> Option<bool> {
        let report = self.acked.is_none() || generation != self.reported;
        let now_wanted = !self.lazy
            || self.asked
            || report
            || now.saturating_duration_since(self.at) >= LAZY_ACK_EVERY;
        (self.acked != Some(received) && now_wanted).then_some(report)
    }

    /// The acknowledgement of `received` went at `now`, with the arbiter report of `reported`.
    fn sent(&mut self, received: u64, reported: Option<u64>, now: Instant) {
        self.acked = Some(received);
        self.reported = reported.unwrap_or(self.reported);
        self.at = now;
        self.asked = false;
    }
}

/// The `arbiters <generation> <db,db|->` line telling the primary where this node has arbiters.
fn arbiter_report(dbs: &Databases, generation: u64) -> String {
    let dbs: Vec<String> = dbs
        .all()
        .into_iter()
        .filter(|db| db.has_arbiter())
        .map(|db| db.name().to_string())
        .collect();
    let list = if dbs.is_empty() {
        "-".to_string()
    } else {
        dbs.join(",")
    };
    format!("arbiters {generation} {list}\n")
}

/// Adds one full-sync record to the staged contents (each database's create record comes
/// before its entries).
fn stage(staged: &mut Staged, r: Record) {
    match r.op {
        Op::CreateDb => staged.push((
            r.db,
            Strategy::parse(&r.value).unwrap_or(Strategy::None),
            Vec::new(),
        )),
        Op::Set | Op::Remove => {
            if let Some((_, _, entries)) = staged.iter_mut().rev().find(|(n, _, _)| *n == r.db) {
                let entry = if r.op == Op::Set {
                    Entry::live(&r.value, r.version)
                } else {
                    Entry::removed(r.version)
                };
                entries.push((r.key, entry));
            }
        }
        Op::DeleteDb | Op::TermStart | Op::Members => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::record::decode;

    /// Gives its bytes in pieces of `piece`, timing out (WouldBlock) before each piece.
    struct Stutter {
        data: Vec<u8>,
        at: usize,
        piece: usize,
        timed_out: bool,
    }

    impl Read for Stutter {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.timed_out = !self.timed_out;
            if self.timed_out {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let n = buf.len().min(self.piece).min(self.data.len() - self.at);
            buf[..n].copy_from_slice(&self.data[self.at..self.at + n]);
            self.at += n;
            Ok(n)
        }
    }

    #[test]
    fn frames_carry_records_as_logged_across_timed_out_reads() {
        let a = Record {
            lsn: 9,
            term: 2,
            op: Op::Set,
            db: "d".into(),
            key: "k".into(),
            version: 3,
            value: "multi word; ü\nline".into(),
        };
        let b = Record {
            lsn: 10,
            op: Op::Remove,
            value: String::new(),
            ..a.clone()
        };
        let mut logged = Vec::new();
        a.encode(&mut logged);
        b.encode(&mut logged);
        let mut buf = b"commit 8\n".to_vec();
        push_frame([&a, &b], &mut buf);
        // An empty frame is left out.
        push_frame([], &mut buf);
        let header = format!("commit 8\nrecs {:010}\n", logged.len());
        assert_eq!(&buf[..header.len()], header.as_bytes());
        assert_eq!(&buf[header.len()..], &logged[..]);

        // Read back through timeouts: every timeout asks whether to go on, and no byte is lost.
        let mut reader = Stutter {
            data: logged.clone(),
            at: 0,
            piece: 7,
            timed_out: false,
        };
        let (mut frame, mut idles) = (Vec::new(), 0);
        let whole = read_frame(&mut reader, logged.len(), &mut frame, || {
            idles += 1;
            Ok(true)
        });
        assert!(whole.unwrap());
        assert_eq!(frame, logged);
        assert_eq!(idles, logged.len().div_ceil(7));
        let Decoded::Record(first, len) = view(&frame) else {
            panic!("the first record reads back");
        };
        assert_eq!(first.fields.to_owned(first.lsn, first.term), a);
        assert_eq!(decode(&frame[len..]), Decoded::Record(b, frame.len() - len));

        // Told to stop at a timeout, it stops; a stream that ends mid-frame is an error.
        reader.at = 0;
        assert!(!read_frame(&mut reader, logged.len(), &mut frame, || Ok(false)).unwrap());
        let mut short = io::Cursor::new(logged[..5].to_vec());
        assert!(read_frame(&mut short, logged.len(), &mut frame, || Ok(true)).is_err());
    }

    #[test]
    fn a_secondary_acknowledges_every_frame_unless_told_to_be_lazy() {
        let t0 = Instant::now();
        let later = |ms| t0 + Duration::from_millis(ms);

        // Told nothing (`ok`): every new LSN is acknowledged, the first with the arbiter
        // report; nothing new, nothing to say.
        let mut acks = Acks::new(t0);
        acks.told(b"ok \n");
        assert_eq!(acks.due(1, 0, t0), Some(true));
        acks.sent(1, Some(0), t0);
        assert_eq!(acks.due(1, 0, t0), None);
        acks.framed(1);
        assert_eq!(acks.due(2, 0, t0), Some(false));
        acks.sent(2, None, t0);

        // Lazily: the first acknowledgement still goes (it carries the arbiter report).
        let mut acks = Acks::new(t0);
        acks.told(LAZY_ACKS_OK);
        assert_eq!(acks.due(5, 0, t0), Some(true));
        acks.sent(5, Some(0), t0);
        // Single writes wait until LAZY_ACK_EVERY passed since the last acknowledgement.
        acks.framed(1);
        assert_eq!(acks.due(6, 0, later(1)), None);
        acks.framed(1);
        assert_eq!(acks.due(7, 0, later(49)), None);
        assert_eq!(acks.due(7, 0, later(50)), Some(false));
        acks.sent(7, None, later(50));
        // A frame of several records is acknowledged at once, and only that once.
        acks.framed(ACKED_AT_ONCE);
        assert_eq!(acks.due(9, 0, later(51)), Some(false));
        acks.sent(9, None, later(51));
        acks.framed(1);
        assert_eq!(acks.due(10, 0, later(52)), None);
        // So is a heartbeat's answer, and a new arbiter report, each with the report.
        acks.heartbeat();
        assert_eq!(acks.due(10, 0, later(53)), Some(true));
        acks.sent(10, Some(0), later(53));
        acks.framed(1);
        assert_eq!(acks.due(11, 3, later(54)), Some(true));
        acks.sent(11, Some(3), later(54));
        acks.framed(1);
        assert_eq!(acks.due(12, 3, later(55)), None);
    }
}
