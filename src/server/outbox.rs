//! A session's bounded outbound queue. Replies wait for space (back-pressure on the session's own
//! client); watch notifications never wait: a watcher whose queue is full is disconnected.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Condvar, Mutex};

/// One queued item: the messages of one reply, or of one watch notification (shared by watchers).
#[derive(Debug, Clone)]
pub enum Outgoing {
    /// Messages answering the session's own commands, each ending in `\n`, and the log LSN that
    /// must be durable before they are written (0: none).
    Reply(Vec<String>, u64),
    /// A change pushed to watchers, each message ending in `\n`.
    Notify(Arc<Vec<String>>, u64),
}

impl Outgoing {
    /// The messages of this item.
    pub fn messages(&self) -> &[String] {
        match self {
            Outgoing::Reply(m, _) => m,
            Outgoing::Notify(m, _) => m,
        }
    }

    /// The LSN a reply acknowledges: durable (and replicated per the write concern) first.
    pub fn lsn(&self) -> u64 {
        match self {
            Outgoing::Reply(_, lsn) => *lsn,
            Outgoing::Notify(..) => 0,
        }
    }

    /// The LSN of the change a notification reports: durable on this node first.
    pub fn change_lsn(&self) -> u64 {
        match self {
            Outgoing::Reply(..) => 0,
            Outgoing::Notify(_, lsn) => *lsn,
        }
    }

    /// Total bytes of the messages.
    pub fn size(&self) -> usize {
        self.messages().iter().map(String::len).sum()
    }
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// Queue accounting shared by the session, its notifiers and its writer.
#[derive(Debug, Default)]
struct State {
    /// Bytes queued and not yet written.
    bytes: usize,
    /// Someone (the writer thread, or the reader on the direct path) is writing to the socket.
    busy: bool,
}

type CloseHook = Box<dyn Fn() + Send + Sync>;

/// The sending side of a session's queue; shared by the session and by every key it watches.
pub struct Outbox {
    id: u64,
    tx: SyncSender<Outgoing>,
    state: Mutex<State>,
    space: Condvar,
    max_bytes: usize,
    closed: AtomicBool,
    on_close: Mutex<Option<CloseHook>>,
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox").field("id", &self.id).finish()
    }
}

impl Outbox {
    /// A queue holding at most `max_messages` items and about `max_bytes` bytes.
    pub fn new(max_messages: usize, max_bytes: usize) -> (Arc<Outbox>, Receiver<Outgoing>) {
        let (tx, rx) = sync_channel(max_messages.max(1));
        let outbox = Outbox {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            tx,
            state: Mutex::new(State::default()),
            space: Condvar::new(),
            max_bytes: max_bytes.max(1),
            closed: AtomicBool::new(false),
            on_close: Mutex::new(None),
        };
        (Arc::new(outbox), rx)
    }

    /// Unique id of the session owning this queue.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Sets what closing does to the transport (e.g. shut the socket down so its reader wakes up).
    pub fn set_close_hook(&self, hook: impl Fn() + Send + Sync + 'static) {
        if let Ok(mut slot) = self.on_close.lock() {
            *slot = Some(Box::new(hook));
        }
    }

    /// True once the session is closing; nothing more is delivered.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Closes the queue and the transport. Idempotent.
    pub fn close(&self) {
        if self.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        if let Ok(hook) = self.on_close.lock() {
            if let Some(hook) = hook.as_ref() {
                hook();
            }
        }
        if let Ok(_guard) = self.state.lock() {
            self.space.notify_all();
        }
    }

    /// Queues a reply (sent once log record `lsn` is durable), waiting while the queue is over its
    /// byte budget. False if the session closed.
    pub fn reply(&self, messages: Vec<String>, lsn: u64) -> bool {
        let item = Outgoing::Reply(messages, lsn);
        let size = item.size();
        {
            let Ok(mut state) = self.state.lock() else {
                return false;
            };
            while state.bytes > self.max_bytes && !self.is_closed() {
                state = match self.space.wait(state) {
                    Ok(s) => s,
                    Err(_) => return false,
                };
            }
            if self.is_closed() {
                return false;
            }
            state.bytes += size;
        }
        if self.tx.send(item).is_err() {
            self.close();
            return false;
        }
        true
    }

    /// Queues a notification without waiting. A full queue disconnects the session; returns false
    /// when the session is gone so the caller can forget it.
    pub fn notify(&self, messages: &Arc<Vec<String>>, lsn: u64) -> bool {
        if self.is_closed() {
            return false;
        }
        let item = Outgoing::Notify(Arc::clone(messages), lsn);
        let size = item.size();
        {
            let Ok(mut state) = self.state.lock() else {
                return false;
            };
            if state.bytes + size > self.max_bytes && state.bytes > 0 {
                drop(state);
                self.overflow();
                return false;
            }
            state.bytes += size;
        }
        match self.tx.try_send(item) {
            Ok(()) => true,
            Err(TrySendError::Full(_)) => {
                self.overflow();
                false
            }
            Err(TrySendError::Disconnected(_)) => {
                self.close();
                false
            }
        }
    }

    fn overflow(&self) {
        log::warn!(
            "session {}: watcher cannot keep up (outbound queue full), disconnecting it",
            self.id
        );
        self.close();
    }

    /// Called by the transport's writer once it has written `size` bytes taken from the queue.
    pub fn written(&self, size: usize) {
        if let Ok(mut state) = self.state.lock() {
            state.bytes = state.bytes.saturating_sub(size);
            self.space.notify_all();
        }
    }

    /// Direct path: when nothing is queued or being written, the caller may write to the socket
    /// itself (saving a thread hand-off); it must call [`Outbox::release`] afterwards.
    pub fn try_claim_idle(&self) -> bool {
        match self.state.lock() {
            Ok(mut state) if state.bytes == 0 && !state.busy && !self.is_closed() => {
                state.busy = true;
                true
            }
            _ => false,
        }
    }

    /// Waits until no one else writes to the socket, then claims it (the writer thread's path).
    pub fn claim(&self) {
        if let Ok(mut state) = self.state.lock() {
            while state.busy {
                state = match self.space.wait(state) {
                    Ok(s) => s,
                    Err(_) => return,
                };
            }
            state.busy = true;
        }
    }

    /// Gives the socket back after [`Outbox::claim`] or [`Outbox::try_claim_idle`].
    pub fn release(&self) {
        if let Ok(mut state) = self.state.lock() {
            state.busy = false;
            self.space.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slow_watcher_is_disconnected_not_waited_for() {
        let (outbox, rx) = Outbox::new(2, 1 << 20);
        let msg = Arc::new(vec!["changed a 1\n".to_string()]);
        assert!(outbox.notify(&msg, 0));
        assert!(outbox.notify(&msg, 0));
        assert!(!outbox.notify(&msg, 0));
        assert!(outbox.is_closed());
        assert_eq!(rx.try_iter().count(), 2);
    }

    #[test]
    fn byte_budget_disconnects_watcher() {
        let (outbox, _rx) = Outbox::new(100, 10);
        let msg = Arc::new(vec!["changed a 123456\n".to_string()]);
        assert!(outbox.notify(&msg, 0));
        assert!(!outbox.notify(&msg, 0));
        assert!(outbox.is_closed());
    }
}
