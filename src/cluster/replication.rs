//! Log shipping. A secondary's receiver thread connects to the primary's TCP port and sends
//! `repl-sync <last_lsn> <last_term> <node>`; that session becomes a sender that streams every
//! record after it (from memory, else from log files, else a full sync of all data), with
//! heartbeats when idle. The receiver appends each record to its own log under the same LSN,
//! applies it (notifying local watchers) and acknowledges the LSN once durable.
//!
//! Lines from the primary: `rec <hex record>`, `full <base_lsn>` … `full-end`,
//! `ping <term> <primary> <last_lsn>`. Lines from the secondary: `ack <lsn>`.

use std::io::{self, BufRead, BufReader, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::node::Node;
use crate::storage::oplog::Tail;
use crate::storage::record::{decode, Decoded, Op, Record};

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    let b = text.as_bytes();
    if !b.len().is_multiple_of(2) {
        return None;
    }
    let val = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    b.chunks(2)
        .map(|p| Some(val(p[0])? << 4 | val(p[1])?))
        .collect()
}

fn record_line(r: &Record, out: &mut Vec<u8>) {
    let mut enc = Vec::with_capacity(r.encoded_len());
    r.encode(&mut enc);
    out.extend_from_slice(b"rec ");
    out.extend_from_slice(hex(&enc).as_bytes());
    out.push(b'\n');
}

fn parse_record(text: &str) -> Option<Record> {
    match decode(&unhex(text)?) {
        Decoded::Record(r, _) => Some(r),
        _ => None,
    }
}

/// The term of the record at `lsn` on this node, from memory or the log files.
fn term_of(node: &Node, lsn: u64) -> Option<u64> {
    let log = node.log()?;
    log.term_at(lsn).or_else(|| {
        log.read_from(lsn)
            .ok()
            .flatten()
            .and_then(|v| v.into_iter().find(|r| r.lsn == lsn).map(|r| r.term))
    })
}

/// Serves one secondary on a TCP session that sent `repl-sync` (primary side).
pub fn serve_secondary(
    node: &Arc<Node>,
    reader: BufReader<TcpStream>,
    mut out: TcpStream,
    after: u64,
    after_term: u64,
    peer: String,
) {
    let (Some(cluster), Some(log)) = (node.cluster(), node.log()) else {
        let _ = out.write_all(b"error Not a cluster node \n");
        return;
    };
    if !cluster.is_primary() {
        let _ = out.write_all(b"error Not the primary \n");
        return;
    }
    if out.write_all(b"ok \n").is_err() {
        return;
    }
    log::info!("replicating to {peer} from LSN {after}");
    let closed = Arc::new(AtomicBool::new(false));
    {
        let cluster = Arc::clone(cluster);
        let closed = Arc::clone(&closed);
        let peer = peer.clone();
        let shutdown = out.try_clone().ok();
        std::thread::spawn(move || {
            for line in reader.lines() {
                let Ok(line) = line else { break };
                if let Some(lsn) = line
                    .strip_prefix("ack ")
                    .and_then(|n| n.trim().parse().ok())
                {
                    cluster.record_ack(&peer, lsn);
                }
            }
            closed.store(true, Ordering::Release);
            if let Some(s) = shutdown {
                let _ = s.shutdown(Shutdown::Both);
            }
        });
    }
    let consistent = after <= log.last_lsn()
        && if after == 0 {
            matches!(log.read_from(1), Ok(Some(_)))
        } else {
            term_of(node, after) == Some(after_term)
        };
    let mut after = after;
    if !consistent && full_sync(node, &mut out, &mut after).is_err() {
        return;
    }
    let heartbeat = (cluster.timeout / 4).max(Duration::from_millis(10));
    let mut last_ping = Instant::now()
        .checked_sub(heartbeat)
        .unwrap_or_else(Instant::now);
    let mut buf = Vec::with_capacity(64 * 1024);
    while !closed.load(Ordering::Acquire) && cluster.is_primary() {
        buf.clear();
        match log.records_after(after, 1024, heartbeat) {
            Tail::Records(records) => {
                for r in &records {
                    record_line(r, &mut buf);
                    after = r.lsn;
                }
            }
            Tail::TooOld => match log.read_from(after + 1) {
                Ok(Some(records)) => {
                    for r in &records {
                        record_line(r, &mut buf);
                        after = r.lsn;
                    }
                }
                Ok(None) => {
                    if full_sync(node, &mut out, &mut after).is_err() {
                        return;
                    }
                }
                Err(e) => {
                    log::error!("replication to {peer}: {e}");
                    return;
                }
            },
        }
        if buf.is_empty() || last_ping.elapsed() >= heartbeat {
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
        if out.write_all(&buf).is_err() {
            break;
        }
    }
    let _ = out.shutdown(Shutdown::Both);
    log::info!("stopped replicating to {peer}");
}

/// Sends every database as records (a fuzzy copy taken after reading the base LSN; records
/// after the base, streamed next, make it exact).
fn full_sync(node: &Node, out: &mut TcpStream, after: &mut u64) -> io::Result<()> {
    let base = node.log().map_or(0, |l| l.last_lsn());
    log::info!("full sync at LSN {base}");
    out.write_all(format!("full {base}\n").as_bytes())?;
    let mut buf = Vec::with_capacity(1 << 20);
    for db in node.dbs.all() {
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
pub fn start_receiver(node: &Arc<Node>) -> io::Result<()> {
    let node = Arc::clone(node);
    std::thread::Builder::new()
        .name("repl-receiver".into())
        .spawn(move || loop {
            let Some(cluster) = node.cluster() else {
                return;
            };
            let (role, _, primary) = cluster.status();
            match primary {
                Some(p) if role != super::Role::Primary && p != cluster.self_id => {
                    if let Err(e) = follow(&node, &p) {
                        log::debug!("replication from {p} stopped: {e}");
                    }
                    cluster.wait_change(Duration::from_millis(100));
                }
                _ => cluster.wait_change(Duration::from_millis(200)),
            }
        })?;
    Ok(())
}

/// Follows `primary` until the connection fails or the primary changes.
fn follow(node: &Arc<Node>, primary: &str) -> io::Result<()> {
    let (Some(cluster), Some(log)) = (node.cluster(), node.log()) else {
        return Ok(());
    };
    let addr = primary
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| io::Error::other("cannot resolve primary"))?;
    let stream = TcpStream::connect_timeout(&addr, cluster.timeout)?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(cluster.timeout))?;
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
    let mut full: Option<u64> = None;
    let mut applied = last_lsn;
    // `None` forces an ack (answering a heartbeat keeps the primary's majority view fresh).
    let mut acked: Option<u64> = None;
    cluster.set_applied(applied);
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Err(io::Error::other("primary closed the stream"));
        }
        let text = line.trim_end_matches('\n');
        let (verb, rest) = text.split_once(' ').unwrap_or((text, ""));
        match verb {
            "valid" | "ok" => {}
            "error" | "invalid" => return Err(io::Error::other(text.to_string())),
            "full" => {
                let base: u64 = rest.parse().map_err(|_| io::Error::other("bad full"))?;
                node.dbs.clear();
                log.reset(base)?;
                full = Some(base);
            }
            "full-end" => {
                if let Some(base) = full.take() {
                    for db in node.dbs.all() {
                        db.set_last_lsn(base);
                    }
                    node.snapshot()?;
                    applied = base;
                    cluster.set_applied(applied);
                }
            }
            "rec" => {
                let r = parse_record(rest).ok_or_else(|| io::Error::other("bad record"))?;
                if full.is_some() {
                    node.dbs.apply_record(&r);
                } else if r.lsn > applied {
                    node.dbs.apply_logged(&r, Some(log))?;
                    applied = r.lsn;
                }
            }
            "ping" => {
                let mut p = rest.split(' ');
                let term = p.next().and_then(|t| t.parse().ok()).unwrap_or(0);
                let id = p.next().unwrap_or_default();
                if id != primary || !cluster.heard_from_primary(term, id) {
                    return Ok(());
                }
                acked = None;
            }
            _ => return Err(io::Error::other(format!("unexpected line: {text}"))),
        }
        if reader.buffer().is_empty() && full.is_none() && acked != Some(applied) {
            log.wait_durable(applied)?;
            cluster.set_applied(applied);
            out.write_all(format!("ack {applied}\n").as_bytes())?;
            acked = Some(applied);
        }
        if cluster.status().2.as_deref() != Some(primary) {
            return Ok(());
        }
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
    }
}
