//! A client session: protocol state, not a transport detail. Admin flag, selected database,
//! acting user, watches, arbiter registrations and the outbound queue its replies and pushes go
//! through. Dropping a session undoes everything it registered.

use std::cell::{Cell, RefCell};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use crate::client::Client;
use crate::db::outbox::{self, Outbox};
use crate::db::security::Permissions;
use crate::db::Database;
use crate::node::Node;
use crate::packed::Shared;

/// Per-connection (or per-HTTP-request) state.
#[derive(Debug)]
pub struct Session<'n> {
    /// Borrowed for the session's life, so a command reaches the node without touching its
    /// shared reference count.
    node: &'n Arc<Node>,
    /// Where replies and notifications go.
    pub outbox: Shared<Outbox>,
    /// True after a successful admin `auth`.
    pub admin: bool,
    /// The selected database.
    pub db: Option<Arc<Database>>,
    /// The user whose permissions apply (`all` for token sessions).
    pub user: String,
    /// Keys this session watches.
    pub watching: Vec<(Arc<Database>, String)>,
    /// Databases this session is an arbiter of.
    pub arbiter_of: Vec<Arc<Database>>,
    /// Connection to the primary used to forward this session's writes (on secondaries).
    pub forwarder: Option<(String, Client)>,
    /// True for a session running a write forwarded by a secondary: it never forwards again.
    pub forwarded: bool,
    /// The acting user's permissions as last read, and the database's security version then.
    pub(super) permissions: RefCell<Option<CachedPermissions>>,
    /// A reply of this session that another thread finishes (a write waiting for its commit).
    handoff: RefCell<Option<Arc<Handoff>>>,
    /// When the last command ended, while its batch is not answered yet: the next command of
    /// the batch starts its clock there instead of reading the clock again.
    clock: Cell<Option<Instant>>,
}

/// A session's reply finished by the thread that learns its writes committed: the session
/// queues nothing more until it is in the outbox, so replies leave in order.
#[derive(Debug, Default)]
pub(super) struct Handoff {
    done: Mutex<bool>,
    finished: Condvar,
}

impl Handoff {
    /// The reply is queued.
    pub(super) fn finish(&self) {
        *self.done.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.finished.notify_all();
    }
}

/// A session's permissions, read once and kept until the database's `$$` keys change.
#[derive(Debug, Clone)]
pub(super) struct CachedPermissions {
    /// [`Database::security_version`] when they were read.
    pub version: u64,
    /// The parsed spec (`None`: the user has none; an unparsable spec allows nothing).
    pub spec: Option<Result<Arc<Permissions>, ()>>,
}

impl<'n> Session<'n> {
    /// A fresh, unauthenticated session writing to `outbox`.
    pub fn new(node: &'n Arc<Node>, outbox: Shared<Outbox>) -> Session<'n> {
        node.sessions.fetch_add(1, Ordering::Relaxed);
        Session {
            node,
            outbox,
            admin: false,
            db: None,
            user: String::new(),
            watching: Vec::new(),
            arbiter_of: Vec::new(),
            forwarder: None,
            forwarded: false,
            permissions: RefCell::new(None),
            handoff: RefCell::new(None),
            clock: Cell::new(None),
        }
    }

    /// When the command about to be parsed starts: the end of the previous one of its batch, or
    /// now.
    pub(super) fn command_started(&self) -> Instant {
        self.clock.take().unwrap_or_else(Instant::now)
    }

    /// Notes when a command ended (the next command of the batch starts there).
    pub(super) fn command_ended(&self, at: Instant) {
        self.clock.set(Some(at));
    }

    /// The batch is answered: time spent until the next command (answering, waiting for the
    /// client) is no command's.
    pub fn batch_answered(&self) {
        self.clock.set(None);
    }

    /// The node this session belongs to.
    pub fn node(&self) -> &'n Arc<Node> {
        self.node
    }

    /// Selects `db`, moving this session's `$connections` count to it.
    pub fn select_db(&mut self, db: Arc<Database>, user: String) {
        if let Some(old) = self.db.take() {
            old.add_connections(-1);
        }
        db.add_connections(1);
        self.db = Some(db);
        self.user = user;
        self.permissions.replace(None);
    }

    /// Hands this session's next reply to another thread; later replies wait for it.
    pub(super) fn hand_off(&self) -> Arc<Handoff> {
        let handoff = Arc::new(Handoff::default());
        *self.handoff.borrow_mut() = Some(Arc::clone(&handoff));
        handoff
    }

    /// Waits until a reply handed to another thread is queued (bounded: the commit it waits
    /// for is decided within five election timeouts).
    pub fn await_handoff(&self) {
        let Some(handoff) = self.handoff.borrow_mut().take() else {
            return;
        };
        let mut done = handoff.done.lock().unwrap_or_else(|e| e.into_inner());
        while !*done {
            done = handoff
                .finished
                .wait(done)
                .unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Forgets every watch.
    pub fn unwatch_all(&mut self) {
        let id = self.outbox.id();
        for (db, key) in self.watching.drain(..) {
            db.unwatch(&key, id);
        }
    }
}

impl Drop for Session<'_> {
    fn drop(&mut self) {
        self.unwatch_all();
        let id = self.outbox.id();
        if !self.arbiter_of.is_empty() {
            if let Some(cluster) = self.node.cluster() {
                cluster.arbiters_changed();
            }
        }
        for db in self.arbiter_of.drain(..) {
            db.remove_arbiter(id);
        }
        if let Some(db) = self.db.take() {
            db.add_connections(-1);
        }
        // `$connections` is not logged: its pushes may go out at once.
        self.node.deliver(outbox::take_touched());
        self.node.sessions.fetch_sub(1, Ordering::Relaxed);
    }
}
