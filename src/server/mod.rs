//! Listeners. Each transport only moves bytes: it frames commands, runs them through
//! [`crate::exec`] and writes the session's queue back out.

pub mod http;
pub mod outbox;
pub mod session;
pub mod tcp;
pub mod ws;

use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::thread;

use crate::node::Node;

/// How long a socket write may block before the client is considered gone.
pub const WRITE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// Stack size for per-connection threads: sessions need little, and thousands may be open.
pub const CONNECTION_STACK: usize = 256 * 1024;

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

/// Binds all three listeners and starts serving on background threads.
pub fn start(node: &Arc<Node>) -> io::Result<Bound> {
    let tcp = tcp::listen(node)?;
    let _ = node.tcp_bound.set(tcp);
    let ws = ws::listen(node)?;
    let http = http::listen(node)?;
    Ok(Bound { tcp, ws, http })
}

/// Binds `addr` and accepts connections on a background thread, serving each on its own thread.
pub fn listen_with(
    node: &Arc<Node>,
    addr: &str,
    kind: &'static str,
    serve: fn(&Arc<Node>, TcpStream),
) -> io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr)?;
    let bound = listener.local_addr()?;
    let node = Arc::clone(node);
    thread::Builder::new()
        .name(format!("{kind}-accept"))
        .spawn(move || loop {
            match listener.accept() {
                Ok((stream, peer)) => {
                    let node = Arc::clone(&node);
                    spawn_connection_thread(format!("{kind}-{peer}"), move || serve(&node, stream));
                }
                Err(e) => {
                    // Typically out of file descriptors: back off instead of spinning.
                    log::warn!("{kind} accept failed: {e}");
                    thread::sleep(std::time::Duration::from_millis(50));
                }
            }
        })?;
    Ok(bound)
}

/// Spawns a named thread with the small connection stack; logs instead of panicking on failure.
pub fn spawn_connection_thread(name: String, f: impl FnOnce() + Send + 'static) -> bool {
    match thread::Builder::new()
        .name(name)
        .stack_size(CONNECTION_STACK)
        .spawn(f)
    {
        Ok(_) => true,
        Err(e) => {
            log::error!("cannot start a connection thread: {e}");
            false
        }
    }
}
