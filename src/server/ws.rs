//! WebSocket transport (tungstenite): one text frame may hold several `;`-separated commands;
//! every reply message goes out as its own text frame. Reads and writes run on separate threads
//! over clones of one socket; writes share a lock so frames never interleave.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tungstenite::protocol::{Role, WebSocketConfig};
use tungstenite::{Message, WebSocket};

use crate::exec;
use crate::node::Node;
use crate::protocol::{split_commands, Outcome};
use crate::server::outbox::{Outbox, Outgoing};
use crate::server::session::Session;
use crate::server::tcp::durable_before_send;
use crate::server::{listen_with, spawn_connection_thread, WRITE_TIMEOUT};

/// Reply bytes buffered while running one frame before they are queued.
const REPLY_CHUNK: usize = 1024 * 1024;

/// How long a client may take to complete the WebSocket handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Binds the WebSocket listener and accepts connections on a background thread.
pub fn listen(node: &Arc<Node>) -> io::Result<SocketAddr> {
    listen_with(node, &node.config.ws_addr, "ws", serve)
}

/// A socket whose reads are private and whose writes go through a shared lock, one whole buffer
/// per call, so the reader's control frames (pong, close) and the writer's frames never interleave.
struct SharedStream {
    read: TcpStream,
    write: Arc<Mutex<TcpStream>>,
    /// Socket reads so far: unchanged across a message means it came from tungstenite's buffer,
    /// i.e. the client is pipelining.
    reads: u64,
}

impl Read for SharedStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.reads += 1;
        self.read.read(buf)
    }
}

impl Write for SharedStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut s = self
            .write
            .lock()
            .map_err(|_| io::Error::other("poisoned socket lock"))?;
        s.write_all(buf)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn ws_config(node: &Node) -> WebSocketConfig {
    let mut config = WebSocketConfig::default();
    config.max_message_size = Some(node.config.max_line);
    config.max_frame_size = Some(node.config.max_line);
    config
}

fn serve(node: &Arc<Node>, stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let _ = stream.set_read_timeout(Some(HANDSHAKE_TIMEOUT));
    let (Ok(read2), Ok(write), Ok(shutdown_half)) =
        (stream.try_clone(), stream.try_clone(), stream.try_clone())
    else {
        return;
    };
    let write = Arc::new(Mutex::new(write));
    let shared = SharedStream {
        read: stream,
        write: Arc::clone(&write),
        reads: 0,
    };
    let mut ws = match tungstenite::accept_with_config(shared, Some(ws_config(node))) {
        Ok(ws) => ws,
        Err(e) => {
            log::debug!("ws handshake failed: {e}");
            let _ = shutdown_half.shutdown(Shutdown::Both);
            return;
        }
    };
    let _ = ws.get_ref().read.set_read_timeout(None);
    // A client that stops reading cannot pin a writer thread (and its queue) forever.
    let _ = ws.get_ref().read.set_write_timeout(Some(WRITE_TIMEOUT));
    let writer_ws = Arc::new(Mutex::new(WebSocket::from_raw_socket(
        SharedStream {
            read: read2,
            write,
            reads: 0,
        },
        Role::Server,
        Some(ws_config(node)),
    )));
    let direct = Arc::clone(&writer_ws);
    let (outbox, rx) = Outbox::new(node.config.outbox_messages, node.config.outbox_bytes);
    outbox.set_close_hook(move || {
        let _ = shutdown_half.shutdown(Shutdown::Both);
    });
    let weak = Arc::downgrade(&outbox);
    let writer_node = Arc::clone(node);
    if !spawn_connection_thread("ws-writer".into(), move || {
        write_loop(&writer_node, writer_ws, &rx, &weak)
    }) {
        return;
    }
    let mut session = Session::new(node, outbox);
    loop {
        let reads_before = ws.get_ref().reads;
        let text = match ws.read() {
            Ok(Message::Text(text)) => text,
            Ok(Message::Binary(bytes)) => match String::from_utf8(bytes) {
                Ok(text) => text,
                Err(_) => {
                    reply(&session, &Outcome::error("Invalid UTF-8 in command"));
                    continue;
                }
            },
            Ok(Message::Close(_)) => {
                // tungstenite answers the close frame on the next read; drain until it reports closed.
                continue;
            }
            Ok(_) => continue,
            Err(tungstenite::Error::Utf8) => {
                reply(&session, &Outcome::error("Invalid UTF-8 in command"));
                continue;
            }
            Err(tungstenite::Error::Capacity(_)) => {
                reply(&session, &Outcome::error("line too long"));
                break;
            }
            Err(e) => {
                log::debug!("ws session ended: {e}");
                break;
            }
        };
        let pipelined = ws.get_ref().reads == reads_before;
        let mut outcomes: Vec<Outcome> = Vec::new();
        let mut pending_bytes = 0;
        for command in split_commands(&text) {
            let outcome = exec::execute_line(&mut session, command);
            pending_bytes += outcome.size();
            outcomes.push(outcome);
            // Replies of a huge frame go out as they accumulate, so memory stays bounded.
            if pending_bytes > REPLY_CHUNK {
                if !send_replies(node, &session, &direct, &mut outcomes, true) {
                    return;
                }
                outcomes.clear();
                pending_bytes = 0;
            }
        }
        if !send_replies(node, &session, &direct, &mut outcomes, pipelined) {
            return;
        }
    }
}

fn reply(session: &Session, outcome: &Outcome) -> bool {
    session.outbox.reply(outcome.wire_messages(), 0)
}

type SharedWs = Arc<Mutex<WebSocket<SharedStream>>>;

fn lock_ws(ws: &SharedWs) -> std::sync::MutexGuard<'_, WebSocket<SharedStream>> {
    ws.lock().unwrap_or_else(|e| e.into_inner())
}

/// Sends replies straight to the socket when the session's queue is idle and the client is not
/// pipelining; otherwise queues them for the writer thread, which batches durability waits and
/// socket writes across frames.
fn send_replies(
    node: &Node,
    session: &Session,
    direct: &SharedWs,
    outcomes: &mut [Outcome],
    pipelined: bool,
) -> bool {
    if pipelined || !session.outbox.try_claim_idle() {
        let lsn = outcomes.iter().map(|o| o.lsn).max().unwrap_or(0);
        let messages = outcomes.iter().flat_map(Outcome::wire_messages).collect();
        return session.outbox.reply(messages, lsn);
    }
    exec::acknowledge(node, outcomes);
    let messages: Vec<String> = outcomes.iter().flat_map(Outcome::wire_messages).collect();
    let ok = {
        let mut ws = lock_ws(direct);
        messages
            .into_iter()
            .all(|m| ws.write(Message::Text(m)).is_ok())
            && ws.flush().is_ok()
    };
    session.outbox.release();
    if !ok {
        session.outbox.close();
    }
    ok
}

fn write_item(ws: &mut WebSocket<SharedStream>, item: &Outgoing) -> bool {
    item.messages()
        .iter()
        .all(|m| ws.write(Message::Text(m.clone())).is_ok())
}

fn write_loop(node: &Node, shared: SharedWs, rx: &Receiver<Outgoing>, outbox: &Weak<Outbox>) {
    while let Ok(first) = rx.recv() {
        let owner = outbox.upgrade();
        if let Some(o) = &owner {
            o.claim();
        }
        let mut items = vec![first];
        let mut size = items[0].size();
        while size < 256 * 1024 {
            match rx.try_recv() {
                Ok(item) => {
                    size += item.size();
                    items.push(item);
                }
                Err(_) => break,
            }
        }
        let lsn = items.iter().map(Outgoing::lsn).max().unwrap_or(0);
        let change = items.iter().map(Outgoing::change_lsn).max().unwrap_or(0);
        let mut ws = lock_ws(&shared);
        let ok = durable_before_send(node, lsn, change)
            && items.iter().all(|item| write_item(&mut ws, item))
            && ws.flush().is_ok();
        drop(ws);
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
    let mut ws = lock_ws(&shared);
    let _ = ws.close(None);
    let _ = ws.flush();
}
