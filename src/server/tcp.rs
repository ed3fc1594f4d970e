//! TCP transport: one command per line, replies in order, pipelining allowed. The session's
//! worker thread reads lines, runs them and writes the replies itself; commands already
//! received run as one batch with one durability wait and one socket write.

use std::sync::Arc;

use super::batch::Batch;
use super::conn::{Conn, SocketSink};
use super::Server;
use crate::cluster::replication;
use crate::db::outbox::Outbox;
use crate::exec::{self, Session};
use crate::protocol::{scan, Framing, Outcome, Takeover};

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
    let mut batch = Batch::new(Framing::Lines);
    // Bytes of an over-long line are dropped until its newline; then it is answered.
    let mut discarding = false;
    let max_line = node.config.max_line;
    loop {
        let data = conn.data();
        let Some(end) = scan::find_newline(data) else {
            if data.len() > max_line || discarding {
                discarding = true;
                let n = data.len();
                conn.consume(n);
            }
            // Everything received has run: answer it before waiting for more.
            if !batch.answer(&session) {
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
            if !batch.answer(&session) {
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
        batch.push(outcome);
        if (batch.len() >= MAX_BATCH || batch.bytes() >= MAX_BATCH_BYTES) && !batch.answer(&session)
        {
            return;
        }
    }
    batch.answer(&session);
}
