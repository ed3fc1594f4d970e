//! TCP transport: one command per line, replies in order, pipelining allowed. The session's
//! worker thread reads lines, runs them and writes the replies itself; commands already
//! received run as one batch with one durability wait and one socket write.

use std::sync::Arc;

use super::conn::{Conn, SocketSink};
use super::Server;
use crate::cluster::replication;
use crate::db::outbox::Outbox;
use crate::exec::{self, Session};
use crate::protocol::{Framing, Outcome, Takeover};

/// Most commands run before their replies are sent when a client pipelines.
const MAX_BATCH: usize = 1024;
/// Most reply bytes held back in a batch.
const MAX_BATCH_BYTES: usize = 1024 * 1024;

/// Serves one TCP session until the client leaves.
pub fn serve(server: &Server, conn: Conn) {
    let node = &server.node;
    let mut conn = conn;
    let outbox = Outbox::new(
        Box::new(SocketSink::new(
            &conn.stream,
            Framing::Lines,
            &server.flusher,
        )),
        node.config.outbox_messages,
        node.config.outbox_bytes,
    );
    let mut session = Session::new(node, outbox);
    let mut batch: Vec<Outcome> = Vec::new();
    let mut batch_bytes = 0;
    // Bytes of an over-long line are dropped until its newline; then it is answered.
    let mut discarding = false;
    let max_line = node.config.max_line;
    loop {
        let data = conn.data();
        let Some(end) = data.iter().position(|&b| b == b'\n') else {
            if data.len() > max_line || discarding {
                discarding = true;
                let n = data.len();
                conn.consume(n);
            }
            // Everything received has run: answer it before waiting for more.
            if !flush(&session, &mut batch, &mut batch_bytes) {
                return;
            }
            match conn.fill(conn.data().len() + 1) {
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) => {
                    log::debug!("tcp session ended: {e}");
                    break;
                }
            }
        };
        let outcome = if discarding || end > max_line {
            discarding = false;
            Some(Outcome::error("line too long"))
        } else {
            let line = data[..end].strip_suffix(b"\r").unwrap_or(&data[..end]);
            match std::str::from_utf8(line) {
                Ok(line) if line.trim().is_empty() => None,
                Ok(line) => Some(exec::execute_line(&mut session, line)),
                Err(_) => Some(Outcome::error("Invalid UTF-8 in command")),
            }
        };
        conn.consume(end + 1);
        let Some(mut outcome) = outcome else { continue };
        if let Some(Takeover::Replicate {
            after,
            after_term,
            node: peer,
        }) = outcome.takeover.take()
        {
            // This connection now carries the replication stream to a secondary.
            if !flush(&session, &mut batch, &mut batch_bytes) {
                return;
            }
            let Some(replica) = node.replica() else {
                let _ = session
                    .outbox
                    .reply(b"error Not a cluster node \n".to_vec());
                return;
            };
            session.await_handoff();
            session.outbox.drain(super::WRITE_TIMEOUT);
            session.outbox.detach();
            drop(session);
            let stream = Arc::clone(&conn.stream);
            let leftover = conn.take_rest();
            replication::serve_secondary(&replica, stream, leftover, after, after_term, peer);
            return;
        }
        batch_bytes += outcome.size();
        batch.push(outcome);
        if (batch.len() >= MAX_BATCH || batch_bytes >= MAX_BATCH_BYTES)
            && !flush(&session, &mut batch, &mut batch_bytes)
        {
            return;
        }
    }
    flush(&session, &mut batch, &mut batch_bytes);
}

/// Acknowledges a batch (durable, and committed in a cluster) and sends its replies.
fn flush(session: &Session, batch: &mut Vec<Outcome>, batch_bytes: &mut usize) -> bool {
    if batch.is_empty() {
        return true;
    }
    let size = *batch_bytes + 16;
    let ok = exec::acknowledge_and_reply(session, batch, move |outcomes| {
        let mut bytes = Vec::with_capacity(size);
        for outcome in outcomes {
            outcome.write_lines(&mut bytes);
        }
        bytes
    });
    batch.clear();
    *batch_bytes = 0;
    ok
}
