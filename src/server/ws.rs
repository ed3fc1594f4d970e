//! WebSocket transport: the upgrade handshake, then client frames decoded in the session's own
//! input buffer (no per-session codec objects). One text frame may hold several `;`-separated
//! commands; every reply message goes out as its own text frame. Frames already received run
//! as one batch with one durability wait and one socket write.

use std::io::Write;
use std::time::Duration;

use super::batch::Batch;
use super::conn::{Conn, SocketSink};
use super::Server;
use crate::db::outbox::Outbox;
use crate::exec::{self, Session};
use crate::protocol::wire::{self, Decoded, FrameError, Handshake};
use crate::protocol::{for_each_command, Framing, Outcome};

/// How long a client may take to complete the WebSocket handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The longest upgrade request accepted.
const MAX_HANDSHAKE: usize = 16 * 1024;

/// Reply bytes held back before they are sent while a long frame runs.
const REPLY_CHUNK: usize = 1024 * 1024;

/// Most frames run before their replies are sent when a client pipelines.
const MAX_BATCH: usize = 1024;

/// Reads the upgrade request and answers it. `Ok(false)` when the client is not a WebSocket
/// client (it got an HTTP error) or left.
pub fn handshake(conn: &mut Conn) -> std::io::Result<bool> {
    conn.stream.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
    conn.stream.set_write_timeout(Some(HANDSHAKE_TIMEOUT))?;
    conn.idles = false;
    loop {
        match wire::handshake(conn.data()) {
            Handshake::Partial if conn.data().len() < MAX_HANDSHAKE => {
                if !conn.fill(conn.data().len() + 1)? {
                    return Ok(false);
                }
            }
            Handshake::Partial => {
                let _ = (&*conn.stream).write_all(b"HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
                return Ok(false);
            }
            Handshake::Reject { response } => {
                let _ = (&*conn.stream).write_all(&response);
                return Ok(false);
            }
            Handshake::Accept { response, len } => {
                (&*conn.stream).write_all(&response)?;
                conn.consume(len);
                conn.stream
                    .set_read_timeout(Some(super::conn::IDLE_AFTER))?;
                conn.idles = true;
                return Ok(true);
            }
        }
    }
}

/// A message being reassembled from fragments: its opcode and bytes so far.
type Fragments = Option<(u8, Vec<u8>)>;

/// Serves one WebSocket session until the client leaves.
pub fn serve(server: &Server, conn: Conn) {
    let node = &server.node;
    let mut conn = conn;
    match handshake(&mut conn) {
        Ok(true) => {}
        Ok(false) => return,
        Err(e) => {
            log::debug!("ws handshake failed: {e}");
            return;
        }
    }
    let outbox = Outbox::new(
        Box::new(SocketSink::new(
            &conn.stream,
            Framing::WebSocket,
            &server.flusher,
        )),
        node.config.outbox_messages,
        node.config.outbox_bytes,
    );
    let mut session = Session::new(node, outbox);
    let max = node.config.max_line;
    let mut batch = Batch::new(Framing::WebSocket);
    let mut fragments: Fragments = None;
    loop {
        let decoded = wire::decode_frame(conn.data_mut(), max);
        let frame = match decoded {
            Ok(Decoded::Frame(frame)) => frame,
            Ok(Decoded::Need(n)) => {
                if !batch.answer(&session) {
                    return;
                }
                match conn.fill(n) {
                    Ok(true) => continue,
                    Ok(false) => break,
                    Err(e) => {
                        log::debug!("ws session ended: {e}");
                        break;
                    }
                }
            }
            Err(FrameError::TooBig(_)) => {
                batch.push(Outcome::error("line too long"));
                batch.answer(&session);
                close(&session, wire::CLOSE_TOO_BIG, "message too big");
                return;
            }
            Err(FrameError::Protocol(why)) => {
                batch.answer(&session);
                close(&session, wire::CLOSE_PROTOCOL_ERROR, why);
                return;
            }
        };
        let payload = &conn.data()[frame.payload.clone()];
        let message: Option<Vec<u8>> = match frame.opcode {
            wire::OP_TEXT | wire::OP_BINARY if fragments.is_some() => {
                batch.answer(&session);
                close(
                    &session,
                    wire::CLOSE_PROTOCOL_ERROR,
                    "expected a continuation",
                );
                return;
            }
            wire::OP_TEXT | wire::OP_BINARY if frame.fin => {
                run_message(&mut session, payload, &mut batch);
                None
            }
            wire::OP_TEXT | wire::OP_BINARY => {
                fragments = Some((frame.opcode, payload.to_vec()));
                None
            }
            wire::OP_CONTINUATION => {
                let Some((_, bytes)) = fragments.as_mut() else {
                    batch.answer(&session);
                    close(
                        &session,
                        wire::CLOSE_PROTOCOL_ERROR,
                        "unexpected continuation",
                    );
                    return;
                };
                if bytes.len() + payload.len() > max {
                    batch.push(Outcome::error("line too long"));
                    batch.answer(&session);
                    close(&session, wire::CLOSE_TOO_BIG, "message too big");
                    return;
                }
                bytes.extend_from_slice(payload);
                if frame.fin {
                    fragments.take().map(|(_, bytes)| bytes)
                } else {
                    None
                }
            }
            wire::OP_PING => {
                let mut pong = Vec::with_capacity(payload.len() + 2);
                wire::ws_frame(wire::OP_PONG, payload, &mut pong);
                conn.consume(frame.len);
                if !batch.answer(&session) || !session.outbox.reply(pong) {
                    return;
                }
                continue;
            }
            wire::OP_CLOSE => {
                // Echo the status code, as RFC 6455 asks, and end the session.
                let code =
                    (payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]]));
                batch.answer(&session);
                close(&session, code.unwrap_or(1000), "");
                return;
            }
            _ => None,
        };
        conn.consume(frame.len);
        if let Some(message) = message {
            run_message(&mut session, &message, &mut batch);
        }
        // Replies of a huge frame, or of many pipelined ones, go out as they accumulate.
        if (batch.bytes() > REPLY_CHUNK || batch.len() >= MAX_BATCH) && !batch.answer(&session) {
            return;
        }
    }
    batch.answer(&session);
}

/// Runs every command of one message, adding their replies to `batch`.
fn run_message(session: &mut Session, payload: &[u8], batch: &mut Batch) {
    let Ok(text) = std::str::from_utf8(payload) else {
        batch.push(Outcome::error("Invalid UTF-8 in command"));
        return;
    };
    for_each_command(text, |command| {
        batch.push(exec::execute_line(session, command))
    });
}

/// Sends a close frame with `code` and `reason`, lets it drain, and shuts the session down.
fn close(session: &Session, code: u16, reason: &str) {
    session.await_handoff();
    let mut frame = Vec::new();
    wire::ws_close_frame(code, reason, &mut frame);
    if session.outbox.reply(frame) {
        session.outbox.drain(Duration::from_secs(5));
    }
    session.outbox.close();
}
