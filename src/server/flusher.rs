//! The one thread that finishes writes the socket could not take at once. Sessions write their
//! own replies and pushes without blocking; when a client's socket is full, its outbox is handed
//! here, and this thread waits (`poll`) until the socket drains, then resumes the outbox. A
//! client that reads nothing for the write timeout is disconnected.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

use crate::packed::Shared;
use std::time::Duration;

use crate::db::outbox::Outbox;
use crate::os::{self, EventFd};

/// Waits for stalled sockets on behalf of their sessions.
pub struct Flusher {
    added: Mutex<Vec<(Shared<Outbox>, i32)>>,
    wake: EventFd,
    write_timeout: Duration,
}

impl Flusher {
    /// Starts the flusher thread; clients that read nothing for `write_timeout` are dropped.
    pub fn start(write_timeout: Duration) -> std::io::Result<Arc<Flusher>> {
        let flusher = Arc::new(Flusher {
            added: Mutex::new(Vec::new()),
            wake: EventFd::new()?,
            write_timeout,
        });
        let weak = Arc::downgrade(&flusher);
        os::spawn("flusher".into(), os::SMALL_STACK, move || run(&weak))?;
        Ok(flusher)
    }

    /// Waits for socket `fd` to drain, then resumes `outbox`.
    pub fn add(&self, outbox: &Shared<Outbox>, fd: i32) {
        self.added
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((outbox.clone(), fd));
        self.wake.wake();
    }
}

fn run(flusher: &Weak<Flusher>) {
    let mut waiting: HashMap<usize, (Shared<Outbox>, i32)> = HashMap::new();
    let mut fds: Vec<os::PollFd> = Vec::new();
    let mut keys: Vec<usize> = Vec::new();
    loop {
        let Some(f) = flusher.upgrade() else { return };
        for (outbox, fd) in f.added.lock().unwrap_or_else(|e| e.into_inner()).drain(..) {
            waiting.insert(outbox.as_ptr() as usize, (outbox, fd));
        }
        fds.clear();
        keys.clear();
        fds.push(os::poll_fd(f.wake.fd(), false));
        // A closed session's outbox is let go here (holding it keeps its socket's descriptor
        // from being reused meanwhile).
        waiting.retain(|key, (o, fd)| {
            if o.is_closed() || !o.is_stalled() {
                return false;
            }
            if o.stalled_for() > f.write_timeout {
                log::warn!(
                    "session {}: client read nothing for {:?}, disconnecting it",
                    o.id(),
                    f.write_timeout
                );
                crate::metrics::STATS
                    .slow_consumers
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                o.close();
                return false;
            }
            fds.push(os::poll_fd(*fd, true));
            keys.push(*key);
            true
        });
        let timeout = if waiting.is_empty() { -1 } else { 1000 };
        let wake_fd = f.wake.fd();
        drop(f);
        if let Err(e) = os::poll(&mut fds, timeout) {
            log::error!("flusher: poll failed: {e}");
            std::thread::sleep(Duration::from_millis(100));
            continue;
        }
        if os::poll_ready(&fds[0]) {
            if let Some(f) = flusher.upgrade() {
                debug_assert_eq!(f.wake.fd(), wake_fd);
                f.wake.clear();
            }
        }
        for (p, key) in fds[1..].iter().zip(&keys) {
            if !os::poll_ready(p) {
                continue;
            }
            if let Some((o, _)) = waiting.remove(key) {
                // Still full: the outbox calls `add` again and comes back.
                o.resume();
            }
        }
    }
}
