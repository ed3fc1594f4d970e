//! A session's outbound queue, kept beside the databases that push into it. Replies and watch
//! pushes queue here in the order they happen; whichever thread makes an item sendable writes
//! the queue straight to the socket without blocking (no writer thread per session). A push
//! waits in the queue until its log record is durable and committed: the thread that made the
//! change releases it once it knows (see [`take_touched`]). When the socket is full the rest
//! waits for the transport's [`Sink::stalled`] hook to call [`Shared::resume`]; a watcher whose
//! queue outgrows its limits is disconnected rather than waited for.
//!
//! A push is encoded once per framing and shared by every watcher ([`Push`]), so fanning a
//! change out to N watchers costs N queue inserts and N socket writes.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use crate::os;
use crate::packed::{Counted, Pool, Shared};
use crate::protocol::Framing;

/// Where an outbox's bytes go: a socket written without blocking, or nowhere.
pub trait Sink: Send + Sync {
    /// How messages are framed on this transport.
    fn framing(&self) -> Framing;
    /// Writes as much of `parts` as the transport takes now, without blocking (0 when full).
    fn try_send(&self, parts: &[IoSlice<'_>]) -> io::Result<usize>;
    /// The transport is full with output still queued: call `outbox.resume()` once it drains.
    fn stalled(&self, outbox: &Shared<Outbox>);
    /// Shuts the transport down, so the session's reader wakes up and ends.
    fn close(&self);
    /// The socket behind this sink, if any: the outbox then writes to it with non-blocking
    /// sends itself, reading nothing but its own packed state (see [`crate::packed`]).
    fn fd(&self) -> Option<RawFd> {
        None
    }
}

/// A sink that drops everything: sessions with no client socket (HTTP requests, forwarded
/// writes) still have an outbox.
#[derive(Debug)]
pub struct Discard;

impl Sink for Discard {
    fn framing(&self) -> Framing {
        Framing::Lines
    }

    fn try_send(&self, parts: &[IoSlice<'_>]) -> io::Result<usize> {
        Ok(parts.iter().map(|p| p.len()).sum())
    }

    fn stalled(&self, _outbox: &Shared<Outbox>) {}

    fn close(&self) {}
}

/// A change pushed to watchers: its messages (each ending in `\n`), encoded once per framing on
/// first use and shared by every watcher's queue.
#[derive(Debug)]
pub struct Push {
    messages: Vec<String>,
    lines: OnceLock<Box<[u8]>>,
    frames: OnceLock<Box<[u8]>>,
}

impl Push {
    /// A push of `messages`.
    pub fn new(messages: Vec<String>) -> Arc<Push> {
        Arc::new(Push {
            messages,
            lines: OnceLock::new(),
            frames: OnceLock::new(),
        })
    }

    /// The messages.
    pub fn messages(&self) -> &[String] {
        &self.messages
    }

    /// The bytes for a transport framing `framing`.
    pub fn encoded(&self, framing: Framing) -> &[u8] {
        let cell = match framing {
            Framing::Lines => &self.lines,
            Framing::WebSocket => &self.frames,
        };
        cell.get_or_init(|| encode(framing, &self.messages).into_boxed_slice())
    }
}

/// `messages` framed for `framing`, concatenated.
pub fn encode(framing: Framing, messages: &[String]) -> Vec<u8> {
    let len = messages
        .iter()
        .map(|m| m.len() + framing.overhead(m.len()))
        .sum();
    let mut out = Vec::with_capacity(len);
    for m in messages {
        framing.encode(m.as_bytes(), &mut out);
    }
    out
}

#[derive(Debug)]
enum Data {
    Push(Arc<Push>),
    Bytes(Vec<u8>),
}

/// One queued item: bytes to send once log record `lsn` may be shown (0: at once).
#[derive(Debug)]
struct Item {
    data: Data,
    lsn: u64,
    /// Bytes already written (after a partial write).
    sent: usize,
}

impl Item {
    fn bytes(&self, framing: Framing) -> &[u8] {
        match &self.data {
            Data::Push(p) => p.encoded(framing),
            Data::Bytes(b) => b,
        }
    }

    fn remaining(&self, framing: Framing) -> &[u8] {
        &self.bytes(framing)[self.sent..]
    }
}

/// Items in order. The first lives inline, so the usual queue of one (a push or a reply on its
/// way out) touches no memory beyond the outbox itself.
#[derive(Debug, Default)]
struct Queue {
    first: Option<Item>,
    rest: VecDeque<Item>,
}

impl Queue {
    fn len(&self) -> usize {
        usize::from(self.first.is_some()) + self.rest.len()
    }

    fn is_empty(&self) -> bool {
        self.first.is_none() && self.rest.is_empty()
    }

    fn front(&self) -> Option<&Item> {
        self.first.as_ref().or_else(|| self.rest.front())
    }

    fn push_back(&mut self, item: Item) {
        if self.is_empty() {
            self.first = Some(item);
        } else {
            self.rest.push_back(item);
        }
    }

    fn pop_front(&mut self) -> Option<Item> {
        self.first.take().or_else(|| self.rest.pop_front())
    }

    fn push_front(&mut self, item: Item) {
        if let Some(old) = self.first.replace(item) {
            self.rest.push_front(old);
        }
    }

    fn iter(&self) -> impl Iterator<Item = &Item> {
        self.first.iter().chain(self.rest.iter())
    }

    fn clear(&mut self) {
        self.first = None;
        self.rest = VecDeque::new();
    }
}

/// Queue state, under one mutex.
#[derive(Debug, Default)]
struct State {
    queue: Queue,
    /// Bytes queued and not written yet.
    bytes: usize,
    /// Every log record up to this LSN is durable and committed: items up to it may go.
    released: u64,
    /// A thread is writing to the socket (items it took are out of the queue meanwhile).
    writing: bool,
    /// The socket was full; the transport calls [`Outbox::resume`] when it drains.
    stalled: bool,
    /// While stalled: when the stall began or the socket last took bytes (slow-reader timeout).
    progress: Option<Instant>,
    /// Threads waiting for the queue to shrink (replies over the byte budget).
    waiting: usize,
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// Items written per socket call.
const MAX_PARTS: usize = 64;
/// Bytes written per socket call (more items wait for the next one).
const MAX_WRITE: usize = 256 * 1024;

/// The outbound queue of one session. Outboxes live packed in one [`Pool`]: a fan-out visits
/// thousands of them, one socket write apart, and each cold page it touches costs.
pub struct Outbox {
    id: u64,
    state: Mutex<State>,
    space: Condvar,
    closed: AtomicBool,
    framing: Framing,
    /// The sink's socket, written directly (see [`Sink::fd`]).
    fd: Option<RawFd>,
    max_messages: usize,
    max_bytes: usize,
    /// The [`Touched`] round that last listed this outbox (so a round lists it once).
    touched_in: AtomicU64,
    sink: Box<dyn Sink>,
}

/// Where every outbox lives.
static OUTBOXES: Pool<Counted<Outbox>> = Pool::new();

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox").field("id", &self.id).finish()
    }
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Outbox {
    /// A queue writing to `sink`, holding at most `max_messages` items and about `max_bytes`.
    pub fn new(sink: Box<dyn Sink>, max_messages: usize, max_bytes: usize) -> Shared<Outbox> {
        let outbox = Outbox {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            state: Mutex::new(State::default()),
            space: Condvar::new(),
            closed: AtomicBool::new(false),
            framing: sink.framing(),
            fd: sink.fd(),
            max_messages: max_messages.max(1),
            max_bytes: max_bytes.max(1),
            touched_in: AtomicU64::new(0),
            sink,
        };
        Shared::new(&OUTBOXES, outbox)
    }

    /// An outbox that drops what it is given (a session without a client socket).
    pub fn discard() -> Shared<Outbox> {
        Outbox::new(Box::new(Discard), 1, 1)
    }

    /// Unique id of the session owning this queue.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// How this outbox's transport frames messages.
    pub fn framing(&self) -> Framing {
        self.framing
    }

    /// True once the session is closing; nothing more is delivered.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Closes the queue and shuts the transport down. Idempotent.
    pub fn close(&self) {
        if self.mark_closed() {
            self.sink.close();
        }
    }

    /// Stops queueing without touching the transport: the connection is handed to something
    /// else (a replication stream). Idempotent.
    pub fn detach(&self) {
        self.mark_closed();
    }

    fn mark_closed(&self) -> bool {
        if self.closed.swap(true, Ordering::AcqRel) {
            return false;
        }
        let mut s = lock(&self.state);
        s.queue.clear();
        s.bytes = 0;
        self.space.notify_all();
        true
    }
}

impl Shared<Outbox> {
    /// Queues reply bytes (already framed, and acknowledged: they go out as soon as everything
    /// queued before them has) and writes what it can. While the queue is over its byte budget
    /// the caller waits for the client to read: back-pressure on the session's own client.
    /// False when the session is closed.
    pub fn reply(&self, bytes: Vec<u8>) -> bool {
        self.queue(bytes, 0) && self.wait_for_room()
    }

    /// Queues reply bytes to send once log record `lsn` may be shown (0: at once), remembering
    /// this outbox in the calling thread's [`take_touched`] list when it must wait. Does not
    /// wait for room (see [`Shared::wait_for_room`]). False when the session is closed.
    pub fn queue(&self, bytes: Vec<u8>, lsn: u64) -> bool {
        if bytes.is_empty() {
            return !self.is_closed();
        }
        {
            let mut s = lock(&self.state);
            if self.is_closed() {
                return false;
            }
            s.bytes += bytes.len();
            s.queue.push_back(Item {
                data: Data::Bytes(bytes),
                lsn,
                sent: 0,
            });
        }
        if lsn > 0 {
            touch(self, lsn);
        }
        self.pump();
        true
    }

    /// Waits while the queue is over its byte budget (the client is not reading). False when
    /// the session closed meanwhile.
    pub fn wait_for_room(&self) -> bool {
        let mut s = lock(&self.state);
        while s.bytes > self.max_bytes && !self.is_closed() {
            s.waiting += 1;
            s = self.space.wait(s).unwrap_or_else(|e| e.into_inner());
            s.waiting -= 1;
        }
        !self.is_closed()
    }

    /// Queues a push of the change logged as `lsn` (0: not logged, sendable at once) without
    /// waiting, and remembers this outbox in the calling thread's [`take_touched`] list. A queue
    /// over its limits disconnects the session; false when the session is gone, so the caller
    /// can forget it.
    pub fn notify(&self, push: &Arc<Push>, lsn: u64) -> bool {
        if self.is_closed() {
            return false;
        }
        let size = push.encoded(self.framing).len();
        {
            let mut s = lock(&self.state);
            if self.is_closed() {
                return false;
            }
            let full = s.queue.len() >= self.max_messages
                || (s.bytes + size > self.max_bytes && s.bytes > 0);
            if full {
                drop(s);
                log::warn!(
                    "session {}: watcher cannot keep up (outbound queue full), disconnecting it",
                    self.id
                );
                crate::metrics::STATS
                    .slow_consumers
                    .fetch_add(1, Ordering::Relaxed);
                self.close();
                return false;
            }
            s.bytes += size;
            s.queue.push_back(Item {
                data: Data::Push(Arc::clone(push)),
                lsn,
                sent: 0,
            });
        }
        touch(self, lsn);
        true
    }

    /// Everything logged up to `lsn` is durable and committed: sends what that unblocks.
    pub fn release(&self, lsn: u64) {
        let mut s = lock(&self.state);
        if lsn > s.released {
            s.released = lsn;
        }
        self.pump_locked(s);
    }

    /// The transport can take more bytes (after [`Sink::stalled`]): writes what is queued.
    pub fn resume(&self) {
        lock(&self.state).stalled = false;
        self.pump();
    }

    /// True while queued bytes wait for the transport to drain.
    pub fn is_stalled(&self) -> bool {
        lock(&self.state).stalled
    }

    /// How long queued bytes have waited for the client to read anything (zero if nothing waits).
    pub fn stalled_for(&self) -> Duration {
        let s = lock(&self.state);
        match s.progress {
            Some(t) if s.stalled => t.elapsed(),
            _ => Duration::ZERO,
        }
    }

    /// Waits up to `timeout` until nothing is queued or being written; true if so.
    pub fn drain(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut s = lock(&self.state);
        while (!s.queue.is_empty() || s.writing) && !self.is_closed() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            s.waiting += 1;
            s = self
                .space
                .wait_timeout(s, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
            s.waiting -= 1;
        }
        s.queue.is_empty()
    }

    /// Closes the session when something queued waits for a log record beyond what has been
    /// released: that change could not be confirmed, so it must not be shown.
    fn abandon(&self) {
        let holding = {
            let s = lock(&self.state);
            let holding = s.queue.iter().any(|i| i.lsn > s.released);
            holding
        };
        if holding {
            log::warn!(
                "session {}: a change it watches was not committed; disconnecting it",
                self.id
            );
            self.close();
        }
    }

    /// Writes the sendable head of the queue until the queue is empty, the head waits for its
    /// log record, or the socket is full. Only one thread writes at a time; the others return
    /// at once, since the writer goes on until nothing sendable is left.
    fn pump(&self) {
        self.pump_locked(lock(&self.state));
    }

    /// Writes to the socket itself when there is one, else through the sink.
    fn send(&self, parts: &[IoSlice<'_>]) -> io::Result<usize> {
        match self.fd {
            Some(fd) => os::send_now(fd, parts),
            None => self.sink.try_send(parts),
        }
    }

    fn pump_locked<'a>(&'a self, mut s: MutexGuard<'a, State>) {
        // Most pumps send one item: no allocation for them.
        let mut batch: SmallBatch = SmallBatch::default();
        loop {
            if s.writing || s.stalled || self.closed.load(Ordering::Acquire) {
                return;
            }
            let released = s.released;
            let mut size = 0;
            while let Some(front) = s.queue.front() {
                if front.lsn > released || batch.len() >= MAX_PARTS || size >= MAX_WRITE {
                    break;
                }
                size += front.remaining(self.framing).len();
                if let Some(item) = s.queue.pop_front() {
                    batch.push(item);
                }
            }
            if batch.is_empty() {
                return;
            }
            s.writing = true;
            drop(s);
            let result = if let SmallBatch::One(item) = &batch {
                self.send(&[IoSlice::new(item.remaining(self.framing))])
            } else {
                let mut parts = [IoSlice::new(&[]); MAX_PARTS];
                for (part, item) in parts.iter_mut().zip(batch.iter()) {
                    *part = IoSlice::new(item.remaining(self.framing));
                }
                self.send(&parts[..batch.len()])
            };
            s = lock(&self.state);
            s.writing = false;
            let mut written = match result {
                Ok(n) => n,
                Err(e) => {
                    drop(s);
                    log::debug!("session {}: write failed: {e}", self.id);
                    self.close();
                    return;
                }
            };
            s.bytes = s.bytes.saturating_sub(written);
            let took = written > 0;
            if s.waiting > 0 {
                self.space.notify_all();
            }
            let mut unsent: SmallBatch = SmallBatch::default();
            batch.take_each(|mut item| {
                let len = item.remaining(self.framing).len();
                if written >= len {
                    written -= len;
                } else {
                    item.sent += written;
                    written = 0;
                    unsent.push(item);
                }
            });
            if unsent.is_empty() {
                s.progress = None;
                continue;
            }
            if self.closed.load(Ordering::Acquire) {
                return;
            }
            // The clock is read only when the socket is full, not on every write.
            if took || s.progress.is_none() {
                s.progress = Some(Instant::now());
            }
            unsent.take_each_rev(|item| s.queue.push_front(item));
            s.stalled = true;
            drop(s);
            self.sink.stalled(self);
            return;
        }
    }
}

/// Items taken from the queue for one socket write: inline for one, a vector for more.
#[derive(Default)]
enum SmallBatch {
    #[default]
    Empty,
    One(Item),
    Many(Vec<Item>),
}

impl SmallBatch {
    fn len(&self) -> usize {
        match self {
            SmallBatch::Empty => 0,
            SmallBatch::One(_) => 1,
            SmallBatch::Many(v) => v.len(),
        }
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn push(&mut self, item: Item) {
        *self = match std::mem::take(self) {
            SmallBatch::Empty => SmallBatch::One(item),
            SmallBatch::One(first) => SmallBatch::Many(vec![first, item]),
            SmallBatch::Many(mut v) => {
                v.push(item);
                SmallBatch::Many(v)
            }
        };
    }

    fn iter(&self) -> std::slice::Iter<'_, Item> {
        match self {
            SmallBatch::Empty => [].iter(),
            SmallBatch::One(item) => std::slice::from_ref(item).iter(),
            SmallBatch::Many(v) => v.iter(),
        }
    }

    /// Takes the items out in order, leaving the batch empty.
    fn take_each(&mut self, mut f: impl FnMut(Item)) {
        match std::mem::take(self) {
            SmallBatch::Empty => {}
            SmallBatch::One(item) => f(item),
            SmallBatch::Many(v) => v.into_iter().for_each(f),
        }
    }

    /// Takes the items out last first, leaving the batch empty.
    fn take_each_rev(&mut self, mut f: impl FnMut(Item)) {
        match std::mem::take(self) {
            SmallBatch::Empty => {}
            SmallBatch::One(item) => f(item),
            SmallBatch::Many(v) => v.into_iter().rev().for_each(f),
        }
    }
}

/// How many outboxes ahead a fan-out asks the CPU to load.
const PREFETCH_AHEAD: usize = 4;

/// A fan-out to more outboxes than this yields the CPU once after its first write, so the first
/// watcher's reader does not wait behind the other writes when it was woken onto this core.
const YIELD_BEFORE: usize = 8;

/// Outboxes this thread queued pushes into since it last called [`take_touched`], and the
/// highest LSN among those pushes. The thread that made the changes must wait until that LSN
/// is durable and committed, then [`Touched::release`] them (or [`Touched::abandon`] them if
/// that failed): nobody else knows when they may be shown.
#[derive(Debug, Default)]
pub struct Touched {
    outboxes: Vec<Shared<Outbox>>,
    lsn: u64,
    /// Identifies this list; an outbox remembers the last round that listed it.
    round: u64,
}

static NEXT_ROUND: AtomicU64 = AtomicU64::new(1);

fn new_round() -> Touched {
    Touched {
        round: NEXT_ROUND.fetch_add(1, Ordering::Relaxed),
        ..Touched::default()
    }
}

thread_local! {
    static TOUCHED: RefCell<Touched> = RefCell::new(new_round());
}

fn touch(outbox: &Shared<Outbox>, lsn: u64) {
    TOUCHED.with(|t| {
        let mut t = t.borrow_mut();
        t.lsn = t.lsn.max(lsn);
        // Listed once per round however many changes it gets (another thread listing it in
        // between only costs a repeated, harmless release).
        if outbox.touched_in.swap(t.round, Ordering::Relaxed) != t.round {
            t.outboxes.push(outbox.clone());
        }
    });
}

/// Takes this thread's [`Touched`] list, leaving a new empty one.
pub fn take_touched() -> Touched {
    TOUCHED.with(|t| std::mem::replace(&mut *t.borrow_mut(), new_round()))
}

impl Touched {
    /// The highest LSN of the pushes (0: none was logged).
    pub fn lsn(&self) -> u64 {
        self.lsn
    }

    /// True when no push was queued.
    pub fn is_empty(&self) -> bool {
        self.outboxes.is_empty()
    }

    /// Everything up to [`Touched::lsn`] is durable and committed: sends the pushes.
    pub fn release(self) {
        for (i, outbox) in self.outboxes.iter().enumerate() {
            // A large fan-out walks thousands of outboxes, one socket write apart: ask for the
            // ones ahead early.
            if let Some(ahead) = self.outboxes.get(i + PREFETCH_AHEAD) {
                ahead.prefetch();
            }
            outbox.release(self.lsn);
            if i == 0 && self.outboxes.len() > YIELD_BEFORE {
                // The first write woke its reader, and the kernel may have queued that reader
                // on this core expecting the waker to sleep soon (a socket wakeup is a "sync"
                // one). This thread has many writes left: let it run first.
                std::thread::yield_now();
            }
        }
    }

    /// Sends `first`'s pushes before the others' (the session that made the change gets its
    /// own pushes, then its reply, before the fan-out to everyone else). Same contract as
    /// [`Touched::release`].
    pub fn release_first(&self, first: &Shared<Outbox>) {
        if self.outboxes.iter().any(|o| Shared::ptr_eq(o, first)) {
            first.release(self.lsn);
        }
    }

    /// The changes could not be confirmed: disconnects every session still waiting for one.
    pub fn abandon(self) {
        for outbox in &self.outboxes {
            outbox.abandon();
        }
    }
}

/// A sink that keeps what it is sent, for tests.
#[derive(Debug, Default)]
pub struct Collect {
    bytes: Mutex<Vec<u8>>,
}

impl Collect {
    /// An outbox writing into a new collector, with the given limits.
    pub fn outbox(max_messages: usize, max_bytes: usize) -> (Shared<Outbox>, Arc<Collect>) {
        let collect = Arc::new(Collect::default());
        let sink = CollectSink(Arc::clone(&collect));
        (
            Outbox::new(Box::new(sink), max_messages, max_bytes),
            collect,
        )
    }

    /// The lines received so far (each with its `\n`), clearing them.
    pub fn take_lines(&self) -> Vec<String> {
        let bytes = std::mem::take(&mut *self.bytes.lock().unwrap_or_else(|e| e.into_inner()));
        String::from_utf8_lossy(&bytes)
            .split_inclusive('\n')
            .map(str::to_string)
            .collect()
    }
}

struct CollectSink(Arc<Collect>);

impl Sink for CollectSink {
    fn framing(&self) -> Framing {
        Framing::Lines
    }

    fn try_send(&self, parts: &[IoSlice<'_>]) -> io::Result<usize> {
        let mut bytes = self.0.bytes.lock().unwrap_or_else(|e| e.into_inner());
        let mut n = 0;
        for p in parts {
            bytes.extend_from_slice(p);
            n += p.len();
        }
        Ok(n)
    }

    fn stalled(&self, _outbox: &Shared<Outbox>) {}

    fn close(&self) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A socket that takes `capacity` bytes, then reports itself full.
    struct Tight {
        taken: Mutex<Vec<u8>>,
        capacity: usize,
        stalls: AtomicU64,
    }

    impl Sink for Arc<Tight> {
        fn framing(&self) -> Framing {
            Framing::Lines
        }
        fn try_send(&self, parts: &[IoSlice<'_>]) -> io::Result<usize> {
            let mut taken = self.taken.lock().unwrap();
            let mut n = 0;
            for p in parts {
                let room = self.capacity.saturating_sub(taken.len());
                let k = room.min(p.len());
                taken.extend_from_slice(&p[..k]);
                n += k;
                if k < p.len() {
                    break;
                }
            }
            Ok(n)
        }
        fn stalled(&self, _outbox: &Shared<Outbox>) {
            self.stalls.fetch_add(1, Ordering::Relaxed);
        }
        fn close(&self) {}
    }

    /// An outbox writing to a socket with room for `capacity` bytes.
    fn tight_outbox(capacity: usize) -> (Arc<Tight>, Shared<Outbox>) {
        let tight = Arc::new(Tight {
            taken: Mutex::new(Vec::new()),
            capacity,
            stalls: AtomicU64::new(0),
        });
        let outbox = Outbox::new(Box::new(Arc::clone(&tight)), 100, 1 << 20);
        (tight, outbox)
    }

    fn push(text: &str) -> Arc<Push> {
        Push::new(vec![format!("{text}\n")])
    }

    #[test]
    fn slow_watcher_is_disconnected_not_waited_for() {
        let (outbox, _) = Collect::outbox(2, 1 << 20);
        let p = push("changed a 1");
        // Held back (LSN 5 not released), so they stay queued.
        assert!(outbox.notify(&p, 5));
        assert!(outbox.notify(&p, 5));
        assert!(!outbox.notify(&p, 5));
        assert!(outbox.is_closed());
        take_touched();
    }

    #[test]
    fn byte_budget_disconnects_watcher() {
        let (outbox, _) = Collect::outbox(100, 10);
        let p = push("changed a 123456");
        assert!(outbox.notify(&p, 7));
        assert!(!outbox.notify(&p, 7));
        assert!(outbox.is_closed());
        take_touched();
    }

    #[test]
    fn pushes_wait_for_their_release_and_replies_keep_their_place() {
        let (outbox, got) = Collect::outbox(100, 1 << 20);
        assert!(outbox.notify(&push("changed a 1"), 3));
        assert!(outbox.reply(b"ok \n".to_vec()));
        assert!(
            got.take_lines().is_empty(),
            "nothing before LSN 3 is released"
        );
        let touched = take_touched();
        assert_eq!(touched.lsn(), 3);
        touched.release();
        assert_eq!(got.take_lines(), vec!["changed a 1\n", "ok \n"]);
    }

    #[test]
    fn abandoned_changes_close_only_sessions_waiting_for_them() {
        let (waiting, _) = Collect::outbox(100, 1 << 20);
        let (done, got) = Collect::outbox(100, 1 << 20);
        waiting.notify(&push("changed a 1"), 9);
        done.notify(&push("changed $connections 1"), 0);
        take_touched().abandon();
        assert!(waiting.is_closed());
        assert!(!done.is_closed());
        done.release(0);
        assert_eq!(got.take_lines(), vec!["changed $connections 1\n"]);
    }

    #[test]
    fn a_full_socket_keeps_the_rest_in_order_until_resumed() {
        let (tight, outbox) = tight_outbox(10);
        for i in 0..3 {
            outbox.notify(&push(&format!("changed k {i}")), 0);
        }
        take_touched().release();
        assert_eq!(tight.stalls.load(Ordering::Relaxed), 1);
        assert!(outbox.is_stalled());
        assert_eq!(&*tight.taken.lock().unwrap(), b"changed k ");
        // More pushes queue behind, nothing is written while stalled.
        outbox.notify(&push("changed k 3"), 0);
        take_touched().release();
        assert_eq!(tight.taken.lock().unwrap().len(), 10);
        // The client reads what was sent: the next 10 bytes go out, in order.
        tight.taken.lock().unwrap().clear();
        outbox.resume();
        assert_eq!(&*tight.taken.lock().unwrap(), b"0\nchanged ");
        assert_eq!(tight.stalls.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn a_stall_is_timed_from_its_own_start() {
        let (tight, outbox) = tight_outbox(10);
        assert_eq!(outbox.stalled_for(), Duration::ZERO);
        // 12 bytes into room for 10: stalled, and the clock runs while the client reads nothing.
        outbox.notify(&push("changed k 0"), 0);
        take_touched().release();
        assert!(outbox.is_stalled());
        let pause = Duration::from_millis(200);
        std::thread::sleep(pause);
        assert!(outbox.stalled_for() >= pause);
        // The client reads: the rest goes out and nothing is stalled any more.
        tight.taken.lock().unwrap().clear();
        outbox.resume();
        assert!(!outbox.is_stalled());
        assert_eq!(outbox.stalled_for(), Duration::ZERO);
        // A later stall in which the socket takes nothing starts its own clock.
        tight.taken.lock().unwrap().resize(10, b'.');
        outbox.notify(&push("changed k 1"), 0);
        take_touched().release();
        assert!(outbox.is_stalled());
        assert!(outbox.stalled_for() < pause, "{:?}", outbox.stalled_for());
    }

    #[test]
    fn shared_pushes_are_encoded_once_per_framing() {
        let p = push("changed a 1");
        assert_eq!(p.encoded(Framing::Lines), b"changed a 1\n");
        assert_eq!(p.encoded(Framing::WebSocket), b"\x81\x0cchanged a 1\n");
        assert!(std::ptr::eq(
            p.encoded(Framing::Lines),
            p.encoded(Framing::Lines)
        ));
    }
}
