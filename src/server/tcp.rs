//! TCP transport: one command per line, replies in order, pipelining allowed. A reader thread
//! runs commands; a writer thread drains the session queue, batching whatever is ready into one write.

use std::io::{self, BufRead, BufReader, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Weak};

use crate::cluster::replication;
use crate::exec;
use crate::node::Node;
use crate::protocol::{Outcome, Takeover};
use crate::server::outbox::{Outbox, Outgoing};
use crate::server::session::Session;
use crate::server::{listen_with, spawn_connection_thread, WRITE_TIMEOUT};

/// Binds the TCP listener and accepts connections on a background thread.
pub fn listen(node: &Arc<Node>) -> io::Result<SocketAddr> {
    listen_with(node, &node.config.tcp_addr, "tcp", serve)
}

/// Result of reading one line with a length limit.
pub enum Line {
    /// A complete line (without the terminator) is in the buffer.
    Complete,
    /// The line exceeded the limit and was discarded up to its newline.
    TooLong,
    /// The peer closed the connection.
    Eof,
}

/// Reads one `\n`-terminated line into `buf` (cleared first), never holding more than `max` bytes.
pub fn read_line_bounded(
    reader: &mut impl BufRead,
    buf: &mut Vec<u8>,
    max: usize,
) -> io::Result<Line> {
    buf.clear();
    let mut too_long = false;
    loop {
        let available = match reader.fill_buf() {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if available.is_empty() {
            return Ok(if too_long || !buf.is_empty() {
                if too_long {
                    Line::TooLong
                } else {
                    Line::Complete
                }
            } else {
                Line::Eof
            });
        }
        let (chunk, found) = match available.iter().position(|&b| b == b'\n') {
            Some(i) => (&available[..i], Some(i + 1)),
            None => (available, None),
        };
        if !too_long {
            if buf.len() + chunk.len() > max {
                too_long = true;
                buf.clear();
            } else {
                buf.extend_from_slice(chunk);
            }
        }
        let used = found.unwrap_or(available.len());
        reader.consume(used);
        if found.is_some() {
            if buf.last() == Some(&b'\r') {
                buf.pop();
            }
            return Ok(if too_long {
                Line::TooLong
            } else {
                Line::Complete
            });
        }
    }
}

fn serve(node: &Arc<Node>, stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    // A client that stops reading cannot pin a writer thread (and its queue) forever.
    let _ = stream.set_write_timeout(Some(WRITE_TIMEOUT));
    let (Ok(write_half), Ok(shutdown_half), Ok(direct)) =
        (stream.try_clone(), stream.try_clone(), stream.try_clone())
    else {
        return;
    };
    let (outbox, rx) = Outbox::new(node.config.outbox_messages, node.config.outbox_bytes);
    outbox.set_close_hook(move || {
        let _ = shutdown_half.shutdown(Shutdown::Both);
    });
    let weak = Arc::downgrade(&outbox);
    let writer_node = Arc::clone(node);
    if !spawn_connection_thread("tcp-writer".into(), move || {
        write_loop(&writer_node, write_half, &rx, &weak)
    }) {
        return;
    }
    let mut session = Session::new(node, outbox);
    let mut reader = BufReader::with_capacity(64 * 1024, stream);
    let mut buf = Vec::new();
    let mut batch: Vec<Outcome> = Vec::new();
    loop {
        let outcome = match read_line_bounded(&mut reader, &mut buf, node.config.max_line) {
            Ok(Line::Eof) | Err(_) => break,
            Ok(Line::TooLong) => Some(Outcome::error("line too long")),
            Ok(Line::Complete) => match std::str::from_utf8(&buf) {
                Ok(line) if line.trim().is_empty() => None,
                Ok(line) => {
                    let mut outcome = exec::execute_line(&mut session, line);
                    if let Some(Takeover::Replicate {
                        after,
                        after_term,
                        node: peer,
                    }) = outcome.takeover.take()
                    {
                        // This connection now carries the replication stream to a secondary.
                        if !flush_batch(node, &session, &direct, &mut batch) {
                            return;
                        }
                        session.outbox.claim();
                        replication::serve_secondary(node, reader, direct, after, after_term, peer);
                        return;
                    }
                    Some(outcome)
                }
                Err(_) => Some(Outcome::error("Invalid UTF-8 in command")),
            },
        };
        batch.extend(outcome);
        // Pipelined commands already received run as one batch: one durability wait, one write.
        let batch_bytes: usize = batch.iter().map(Outcome::size).sum();
        if reader.buffer().contains(&b'\n') && batch.len() < 1024 && batch_bytes < 1024 * 1024 {
            continue;
        }
        if !flush_batch(node, &session, &direct, &mut batch) {
            return;
        }
    }
    flush_batch(node, &session, &direct, &mut batch);
}

/// Acknowledges a batch and sends its replies: straight to the socket when the session's queue
/// is idle (no hand-off to the writer thread), else through the queue behind what is pending.
fn flush_batch(
    node: &Node,
    session: &Session,
    direct: &TcpStream,
    batch: &mut Vec<Outcome>,
) -> bool {
    if batch.is_empty() {
        return true;
    }
    if !session.outbox.try_claim_idle() {
        // The writer thread is busy: it makes the batch durable and writes it with what is queued.
        let lsn = batch.iter().map(|o| o.lsn).max().unwrap_or(0);
        let messages = batch.iter().flat_map(Outcome::line_messages).collect();
        batch.clear();
        return session.outbox.reply(messages, lsn);
    }
    exec::acknowledge(node, batch);
    let messages: Vec<String> = batch.iter().flat_map(Outcome::line_messages).collect();
    batch.clear();
    {
        let mut bytes = Vec::with_capacity(messages.iter().map(String::len).sum());
        for m in &messages {
            bytes.extend_from_slice(m.as_bytes());
        }
        let ok = (&*direct).write_all(&bytes).is_ok();
        session.outbox.release();
        if !ok {
            session.outbox.close();
        }
        ok
    }
}

/// Waits until the writes acknowledged (`lsn`) by a batch are durable for the write concern
/// and the changes it pushes (`change`) are committed, before the batch is written.
pub fn durable_before_send(node: &Node, lsn: u64, change: u64) -> bool {
    match node
        .wait_durable(lsn)
        .map_err(std::io::Error::other)
        .and_then(|_| node.wait_committed(change))
    {
        Ok(()) => true,
        Err(e) => {
            log::warn!("closing the session: {e}");
            false
        }
    }
}

fn append(buf: &mut Vec<u8>, item: &Outgoing) {
    for m in item.messages() {
        buf.extend_from_slice(m.as_bytes());
    }
}

/// Writes queued items until every sender is gone (session ended) or the socket fails.
pub fn write_loop(
    node: &Node,
    mut stream: TcpStream,
    rx: &Receiver<Outgoing>,
    outbox: &Weak<Outbox>,
) {
    let mut buf: Vec<u8> = Vec::with_capacity(64 * 1024);
    while let Ok(first) = rx.recv() {
        let owner = outbox.upgrade();
        if let Some(o) = &owner {
            o.claim();
        }
        buf.clear();
        append(&mut buf, &first);
        let mut size = first.size();
        let mut lsn = first.lsn();
        let mut change = first.change_lsn();
        while buf.len() < 256 * 1024 {
            match rx.try_recv() {
                Ok(item) => {
                    append(&mut buf, &item);
                    size += item.size();
                    lsn = lsn.max(item.lsn());
                    change = change.max(item.change_lsn());
                }
                Err(_) => break,
            }
        }
        // Acknowledgements and pushed changes go out only once their log records are durable;
        // if that fails the connection is closed rather than telling the client.
        let ok = durable_before_send(node, lsn, change) && stream.write_all(&buf).is_ok();
        if let Some(outbox) = owner {
            outbox.written(size);
            outbox.release();
            if !ok {
                outbox.close();
            }
        }
        if !ok {
            return;
        }
    }
    let _ = stream.flush();
    let _ = stream.shutdown(Shutdown::Write);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(input: &[u8], max: usize) -> Vec<String> {
        let mut r = BufReader::with_capacity(4, input);
        let mut buf = Vec::new();
        let mut out = Vec::new();
        loop {
            match read_line_bounded(&mut r, &mut buf, max).unwrap() {
                Line::Complete => out.push(String::from_utf8_lossy(&buf).to_string()),
                Line::TooLong => out.push("<too long>".into()),
                Line::Eof => return out,
            }
        }
    }

    #[test]
    fn bounded_lines() {
        assert_eq!(lines(b"ab\r\ncd\nlast", 10), vec!["ab", "cd", "last"]);
        assert_eq!(
            lines(b"short\n0123456789abc\nok\n", 10),
            vec!["short", "<too long>", "ok"]
        );
    }
}
