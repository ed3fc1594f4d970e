//! Log shipping. A secondary's receiver thread connects to the primary's TCP port and sends
//! `repl-sync <last_lsn> <last_term> <node>`; that session becomes a sender that streams every
//! record after it (from memory, else from log files, else a full sync of all data), with
//! heartbeats when idle. New records and commit points are usually written to the stream by the
//! thread that made them (`shipping.rs`); the sender thread does the rest. The receiver appends each record to its own log under the same LSN,
//! applies it (notifying local watchers) and acknowledges the LSN once durable.
//!
//! Receiving is not applying: a secondary applies records to memory (and so notifies its
//! watchers) only once the primary reports them committed (`commit <lsn>`), so no watcher ever
//! sees a change a later primary could roll back. A promoted node applies what it inherited
//! before taking writes ([`take_over`]).
//!
//! Lines from the primary: `rec <hex record>`, `full <base_lsn>` … `full-end`,
//! `commit <lsn>`, `ping <term> <primary> <last_lsn>`. Lines from the secondary: `ack <lsn>`.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::shipping::{Composed, Outgoing};
use super::Cluster;
use crate::db::{outbox, Databases, Entry};
use crate::os::spawn_small;
use crate::protocol::Strategy;
use crate::storage::oplog::{OpLog, Tail};
use crate::storage::record::{decode, Decoded, Op, Record};
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

/// The lowercase hex digits of every byte value.
const HEX_PAIRS: [[u8; 2]; 256] = {
    let digits = b"0123456789abcdef";
    let mut table = [[0u8; 2]; 256];
    let mut i = 0;
    while i < 256 {
        table[i] = [digits[i >> 4], digits[i & 15]];
        i += 1;
    }
    table
};

/// The value of each lowercase hex digit; 0xff for every other byte.
const HEX_VALUES: [u8; 256] = {
    let mut table = [0xffu8; 256];
    let mut i = 0;
    while i < 16 {
        let digit = if i < 10 {
            b'0' + i as u8
        } else {
            b'a' + i as u8 - 10
        };
        table[digit as usize] = i as u8;
        i += 1;
    }
    table
};

/// Turns the last `n` bytes of `out` into their lowercase hex, in place (from the end, so no
/// byte is overwritten before it is read).
fn hex_tail(out: &mut Vec<u8>, n: usize) {
    let start = out.len() - n;
    out.resize(start + 2 * n, 0);
    let tail = &mut out[start..];
    for i in (0..n).rev() {
        let [hi, lo] = HEX_PAIRS[usize::from(tail[i])];
        tail[2 * i] = hi;
        tail[2 * i + 1] = lo;
    }
}

/// The bytes that lowercase hex `text` stands for; None if it is not such hex.
fn unhex(text: &str) -> Option<Vec<u8>> {
    let b = text.as_bytes();
    if !b.len().is_multiple_of(2) {
        return None;
    }
    let mut out = Vec::with_capacity(b.len() / 2);
    for pair in b.chunks_exact(2) {
        let (hi, lo) = (
            HEX_VALUES[usize::from(pair[0])],
            HEX_VALUES[usize::from(pair[1])],
        );
        if (hi | lo) > 15 {
            return None;
        }
        out.push(hi << 4 | lo);
    }
    Some(out)
}

/// Appends the `rec <hex>` line of `r` to `out`.
pub(super) fn record_line(r: &Record, out: &mut Vec<u8>) {
    out.extend_from_slice(b"rec ");
    let before = out.len();
    out.reserve(2 * r.encoded_len() + 1);
    r.encode(out);
    hex_tail(out, out.len() - before);
    out.push(b'\n');
}

/// The record a `rec` line carries (the text after `rec `).
pub(super) fn parse_record(text: &str) -> Option<Record> {
    match decode(&unhex(text)?) {
        Decoded::Record(r, _) => Some(r),
        _ => None,
    }
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
    if out.write_all(b"ok \n").is_err() {
        return;
    }
    log::info!("replicating to {peer} from LSN {after}");
    let outgoing = Arc::new(Outgoing::new(Arc::clone(&stream)));
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
    outgoing.show(after);
    outgoing.lock().after = after;
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
                    for r in &records {
                        record_line(r, &mut buf);
                        s.after = r.lsn;
                    }
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
        outgoing.show(s.after);
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
    record_line(&members, &mut buf);
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
        record_line(&create, &mut buf);
        let mut last_key: Option<String> = None;
        loop {
            let chunk = db.copy_chunk(last_key.as_deref(), 4096);
            if chunk.is_empty() {
                break;
            }
            last_key = chunk.last().map(|(k, _)| k.clone());
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
                record_line(&r, &mut buf);
            }
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
/// (they are committed, or this node is taking over as primary). Callers hold
/// [`super::Cluster::replica_guard`].
fn apply_received(replica: &Replica, upto: u64) -> io::Result<()> {
    let log = replica.log();
    let Some(from) = replica.dbs.unapplied_from() else {
        return Ok(());
    };
    if upto < from {
        return Ok(());
    }
    let apply = |r: &Record| {
        if r.lsn <= upto {
            apply_members(&replica.cluster, r);
            replica.dbs.apply_record(r);
        }
    };
    match log.records_after(from - 1, usize::MAX) {
        Tail::Records(records) => records.iter().for_each(|r| apply(r)),
        Tail::TooOld => log
            .read_from(from)
            .map_err(io::Error::other)?
            .unwrap_or_default()
            .iter()
            .for_each(apply),
    }
    let last = log.last_lsn();
    replica
        .dbs
        .set_unapplied_from((upto < last).then_some(upto + 1));
    replica.cluster.set_applied(upto.min(last));
    Ok(())
}

/// Applies the member list a committed `members` or term-start record carries.
fn apply_members(cluster: &Cluster, r: &Record) {
    if matches!(r.op, Op::Members | Op::TermStart) && !r.value.is_empty() {
        cluster.set_members(member_list(&r.value));
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
    apply_received(replica, log.last_lsn()).map_err(|e| e.to_string())?;
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
    let following = || cluster.status().2.as_deref() == Some(primary);
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
    // `None` forces an ack (answering a heartbeat keeps the primary's majority view fresh).
    let mut acked: Option<u64> = None;
    let mut reported = 0;
    cluster.set_applied(applied);
    cluster.note_primary_lsn(0);
    loop {
        line.clear();
        // A timed-out read keeps what it got of a line in `line`; the next read completes it.
        let read = loop {
            match reader.read_line(&mut line) {
                // The read timeout (EAGAIN); an aborted stream fails with ETIMEDOUT instead.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if !following() {
                        return Ok(());
                    }
                    if last_data.elapsed() > cluster.timeout {
                        return Err(io::Error::new(io::ErrorKind::TimedOut, "primary is silent"));
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
            "valid" | "ok" => {}
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
            "rec" => {
                let r = parse_record(rest).ok_or_else(|| io::Error::other("bad record"))?;
                if let Some((_, staged)) = full.as_mut() {
                    if r.op == Op::Members {
                        full_members = Some(member_list(&r.value));
                    } else {
                        stage(staged, r);
                    }
                } else if r.lsn > received {
                    let _guard = cluster.replica_guard();
                    if !following() {
                        return Ok(());
                    }
                    if replica.dbs.unapplied_from().is_none() {
                        replica.dbs.set_unapplied_from(Some(applied + 1));
                    }
                    received = log.append_owned(r)?;
                }
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
                acked = None;
            }
            _ => return Err(io::Error::other(format!("unexpected line: {text}"))),
        }
        if reader.buffer().is_empty() && full.is_none() {
            if acked != Some(received) {
                log.wait_durable(received)?;
                // Answering a heartbeat also renews this node's arbiter report.
                let mut reply = format!("ack {received}\n");
                if acked.is_none() || cluster.arbiter_gen() != reported {
                    reported = cluster.arbiter_gen();
                    reply.push_str(&arbiter_report(&replica.dbs, reported));
                }
                out.write_all(reply.as_bytes())?;
                acked = Some(received);
            }
            let upto = cluster.commit().min(received);
            if upto > applied {
                let _guard = cluster.replica_guard();
                if !following() {
                    return Ok(());
                }
                apply_received(replica, upto)?;
                applied = upto;
                // Committed, and durable here since the ack above: the pushes may go.
                outbox::take_touched().release();
            }
        }
        if !following() {
            return Ok(());
        }
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

    #[test]
    fn record_lines_round_trip() {
        let r = Record {
            lsn: 9,
            term: 2,
            op: Op::Set,
            db: "d".into(),
            key: "k".into(),
            version: 3,
            value: "multi word; ü\nline".into(),
        };
        let mut buf = Vec::new();
        record_line(&r, &mut buf);
        let line = String::from_utf8(buf).unwrap();
        assert_eq!(
            parse_record(line.trim_end().strip_prefix("rec ").unwrap()),
            Some(r)
        );
        assert_eq!(parse_record("zz"), None);
        assert_eq!(parse_record("abc"), None);
        // Every byte value survives the hex round trip; only lowercase digits are hex.
        let all: Vec<u8> = (0..=255).collect();
        let mut hex = b"x".to_vec();
        hex.extend_from_slice(&all);
        hex_tail(&mut hex, all.len());
        assert_eq!(&hex[..5], b"x0001");
        assert_eq!(&hex[hex.len() - 4..], b"feff");
        assert_eq!(unhex(std::str::from_utf8(&hex[1..]).unwrap()), Some(all));
        assert_eq!(unhex("0A"), None);
        assert_eq!(unhex("0g"), None);
    }
}
