//! Listeners. Each transport only moves bytes: it frames commands, runs them through
//! [`crate::exec`] and queues the replies on the session's outbox. Accept loops hand each
//! connection to a worker thread of the [`pool`] over a channel, up to the connection ceiling;
//! past it a client gets one clear refusal. The [`flusher`] finishes writes that a full socket
//! could not take at once.

mod batch;
mod conn;
pub mod flusher;
pub mod http;
pub mod pool;
pub mod prometheus;
mod spin;
pub mod tcp;
pub mod ws;

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use conn::Conn;
use flusher::Flusher;
use pool::Pool;

use crate::node::Node;
use crate::os;
use crate::protocol::wire::{self, Handshake};

/// How long a client may read nothing while output waits for it before it is disconnected.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(60);

/// Pending connections the kernel queues for each listener (capped by `net.core.somaxconn`).
pub const LISTEN_BACKLOG: i32 = 4096;

/// The refusal line a client past the connection ceiling gets.
pub const TOO_MANY: &str = "error too many connections \n";

/// Refused clients waiting for their refusal to be written; past this they are just closed.
const REFUSAL_QUEUE: usize = 256;

/// How long a refused client gets to read its refusal (and, on WebSocket, to shake hands).
const REFUSAL_TIMEOUT: Duration = Duration::from_secs(2);

/// Addresses the listeners actually bound (useful with port 0).
#[derive(Debug, Clone, Copy)]
pub struct Bound {
    /// TCP listener.
    pub tcp: SocketAddr,
    /// WebSocket listener.
    pub ws: SocketAddr,
    /// HTTP listener.
    pub http: SocketAddr,
}

/// Which protocol a listener speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// Line-based TCP.
    Tcp,
    /// WebSocket.
    Ws,
    /// HTTP/1.1 (the CLI, scripts, metrics, console).
    Http,
}

impl Transport {
    fn name(self) -> &'static str {
        match self {
            Transport::Tcp => "tcp",
            Transport::Ws => "ws",
            Transport::Http => "http",
        }
    }
}

/// Everything the listeners share.
pub struct Server {
    /// The node sessions run on.
    pub node: Arc<Node>,
    flusher: Arc<Flusher>,
    pool: Pool,
    /// Gives freed memory back after sessions leave or go idle.
    trimmer: os::Trimmer,
    /// TCP and WebSocket sessions open now.
    open: AtomicUsize,
    /// TCP sessions open now.
    open_tcp: AtomicUsize,
    /// WebSocket sessions open now.
    open_ws: AtomicUsize,
    /// HTTP connections open now.
    open_http: AtomicUsize,
    /// The WebSocket address bound (the console page connects to it).
    ws_bound: std::sync::OnceLock<SocketAddr>,
    /// The connection ceiling (`--max-connections`).
    max: usize,
    refusals: SyncSender<(TcpStream, Transport)>,
    /// Clients refused since the last admitted one; the first refusal of a run is logged.
    refusing: AtomicU64,
    /// A worker could not be started (logged once until one starts again).
    spawn_failing: AtomicBool,
}

impl Server {
    /// Sessions open now on TCP and WebSocket.
    pub fn open_sessions(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Takes an accepted connection: a worker serves it, or it is refused past the ceiling.
    fn admit(self: &Arc<Self>, stream: TcpStream, transport: Transport) {
        let claimed = self
            .open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max).then_some(n + 1)
            })
            .is_ok();
        if !claimed {
            if self.refusing.fetch_add(1, Ordering::Relaxed) == 0 {
                log::warn!(
                    "connection ceiling reached ({} sessions, --max-connections): refusing new clients until some leave",
                    self.max
                );
            }
            self.refuse(stream, transport);
            return;
        }
        let refused = self.refusing.swap(0, Ordering::Relaxed);
        if refused > 0 {
            log::info!("accepting clients again; {refused} were refused meanwhile");
        }
        self.by_transport(transport).fetch_add(1, Ordering::Relaxed);
        let admitted = Admitted {
            server: Arc::clone(self),
            stream: Some(stream),
            transport,
        };
        let job = Box::new(move || {
            let mut admitted = admitted;
            if let Some(stream) = admitted.stream.take() {
                let server = &admitted.server;
                let conn = Conn::new(stream, server.trimmer.clone(), server.node.config.spin);
                match admitted.transport {
                    Transport::Tcp => tcp::serve(server, conn),
                    Transport::Ws => ws::serve(server, conn),
                    Transport::Http => http::serve(server, conn),
                }
            }
        });
        match self.pool.submit(job) {
            Ok(()) => {
                if self.spawn_failing.swap(false, Ordering::Relaxed) {
                    log::info!("session threads start again");
                }
            }
            Err((job, e)) => {
                if !self.spawn_failing.swap(true, Ordering::Relaxed) {
                    log::error!(
                        "cannot start a thread for a new session ({e}): refusing clients until one starts (lower --max-connections)"
                    );
                }
                // Dropping the job unrun refuses its client (see `Admitted`).
                drop(job);
            }
        }
    }

    fn by_transport(&self, transport: Transport) -> &AtomicUsize {
        match transport {
            Transport::Tcp => &self.open_tcp,
            Transport::Ws => &self.open_ws,
            Transport::Http => &self.open_http,
        }
    }

    /// Hands a client to the refusal thread (or closes it when that one is behind).
    fn refuse(&self, stream: TcpStream, transport: Transport) {
        match self.refusals.try_send((stream, transport)) {
            Ok(()) | Err(TrySendError::Disconnected(_)) => {}
            Err(TrySendError::Full((stream, _))) => {
                let _ = stream.shutdown(Shutdown::Both);
            }
        }
    }
}

/// An admitted client: holds its place under the ceiling while it lives, and is refused if
/// dropped before a worker took its socket.
struct Admitted {
    server: Arc<Server>,
    stream: Option<TcpStream>,
    transport: Transport,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.server.open.fetch_sub(1, Ordering::AcqRel);
        self.server
            .by_transport(self.transport)
            .fetch_sub(1, Ordering::Relaxed);
        if let Some(stream) = self.stream.take() {
            self.server.refuse(stream, self.transport);
        }
    }
}

/// Binds all three listeners and starts serving on background threads.
pub fn start(node: &Arc<Node>) -> io::Result<Bound> {
    let (refusals, refused) = sync_channel(REFUSAL_QUEUE);
    os::spawn("refuse".into(), os::SMALL_STACK, move || {
        refuse_loop(&refused)
    })?;
    let trimmer = os::Trimmer::start()?;
    let server = Arc::new(Server {
        node: Arc::clone(node),
        flusher: Flusher::start(WRITE_TIMEOUT)?,
        pool: Pool::new("session", trimmer.clone()),
        trimmer,
        open: AtomicUsize::new(0),
        open_tcp: AtomicUsize::new(0),
        open_ws: AtomicUsize::new(0),
        open_http: AtomicUsize::new(0),
        ws_bound: std::sync::OnceLock::new(),
        max: node.config.max_connections.max(1),
        refusals,
        refusing: AtomicU64::new(0),
        spawn_failing: AtomicBool::new(false),
    });
    let tcp = listen(&server, &node.config.tcp_addr, Transport::Tcp)?;
    let _ = node.tcp_bound.set(tcp);
    let ws = listen(&server, &node.config.ws_addr, Transport::Ws)?;
    let _ = server.ws_bound.set(ws);
    let http = listen(&server, &node.config.http_addr, Transport::Http)?;
    Ok(Bound { tcp, ws, http })
}

/// Binds `addr` with a deep backlog and accepts on a background thread.
fn listen(server: &Arc<Server>, addr: &str, transport: Transport) -> io::Result<SocketAddr> {
    let listener = os::listen(addr, LISTEN_BACKLOG)?;
    let bound = listener.local_addr()?;
    let server = Arc::clone(server);
    os::spawn(
        format!("{}-accept", transport.name()),
        os::SMALL_STACK,
        move || accept_loop(&server, &listener, transport),
    )?;
    Ok(bound)
}

/// Accepts for ever. A failing accept (typically out of descriptors) is logged once, retried
/// with a growing pause, and its recovery logged; pending clients wait in the backlog.
fn accept_loop(server: &Arc<Server>, listener: &TcpListener, transport: Transport) {
    let name = transport.name();
    let mut failures: u64 = 0;
    let mut pause = Duration::from_millis(5);
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                if failures > 0 {
                    log::info!("{name} listener accepts again after {failures} failed attempts");
                    failures = 0;
                    pause = Duration::from_millis(5);
                }
                server.admit(stream, transport);
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted
                ) => {}
            Err(e) => {
                if failures == 0 {
                    log::error!(
                        "{name} listener cannot accept: {e}; retrying until it can (logged once)"
                    );
                }
                failures += 1;
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(200));
            }
        }
    }
}

/// Writes each refused client its refusal, then closes it.
fn refuse_loop(refused: &Receiver<(TcpStream, Transport)>) {
    while let Ok((stream, transport)) = refused.recv() {
        let _ = stream.set_read_timeout(Some(REFUSAL_TIMEOUT));
        let _ = stream.set_write_timeout(Some(REFUSAL_TIMEOUT));
        let sent = match transport {
            Transport::Tcp => (&stream).write_all(TOO_MANY.as_bytes()),
            Transport::Ws => refuse_ws(&stream),
            Transport::Http => (&stream).write_all(&http::too_many()),
        };
        if sent.is_ok() {
            linger(&stream);
        }
    }
}

/// Completes the handshake, then sends the refusal line and a close frame (1013, try again
/// later) with the same reason.
fn refuse_ws(stream: &TcpStream) -> io::Result<()> {
    let mut request = Vec::new();
    let mut chunk = [0u8; 2048];
    let deadline = Instant::now() + REFUSAL_TIMEOUT;
    let response = loop {
        match wire::handshake(&request) {
            Handshake::Accept { response, .. } => break response,
            Handshake::Reject { response } => {
                (&*stream).write_all(&response)?;
                return Ok(());
            }
            Handshake::Partial if request.len() < 16 * 1024 && Instant::now() < deadline => {
                let n = (&*stream).read(&mut chunk)?;
                if n == 0 {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
                request.extend_from_slice(&chunk[..n]);
            }
            Handshake::Partial => return Err(io::ErrorKind::TimedOut.into()),
        }
    };
    let mut out = response;
    wire::ws_frame(wire::OP_TEXT, TOO_MANY.as_bytes(), &mut out);
    wire::ws_close_frame(
        wire::CLOSE_TRY_AGAIN_LATER,
        "too many connections",
        &mut out,
    );
    (&*stream).write_all(&out)
}

/// Closes our side and waits (briefly) for the client to close, so the refusal is read rather
/// than lost to a reset.
fn linger(stream: &TcpStream) {
    let _ = stream.shutdown(Shutdown::Write);
    let mut sink = [0u8; 1024];
    let deadline = Instant::now() + REFUSAL_TIMEOUT;
    while Instant::now() < deadline {
        match (&*stream).read(&mut sink) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
}
