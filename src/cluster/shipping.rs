//! Where a secondary gets a record: each secondary's stream ([`Outgoing`]) is written by
//! whichever thread has something new for it and finds it free. A write's session ships the
//! records its batch appended, the thread that moves the commit point ships the `commit` line;
//! neither wakes the stream's sender thread (a wake-up across CPUs costs tens of µs on a small
//! machine, and it was two per write: one for the record, one for its commit). The sender
//! thread ([`super::replication::serve_secondary`]) keeps the slow work: heartbeats, catching
//! up from the log files or a full sync, and finishing a send the socket would not take at once.

use std::io::IoSlice;
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use super::replication::{close_frame, open_frame};
use super::Cluster;
use crate::os::send_now;
use crate::storage::backlog::Tail;
use crate::storage::oplog::OpLog;

/// Records taken from the log's backlog per composition.
const BATCH: usize = 1024;

/// A frame of at least this many records is acknowledged at once even by a secondary that
/// acknowledges lazily: several writes met in one frame, so writes come faster than frames
/// go, and holding the next ones for that acknowledgement batches them (see `Outgoing::ship`).
/// Both ends count the same way.
pub const ACKED_AT_ONCE: usize = 2;

/// Where one secondary's stream stands. Held while its next bytes are composed and written,
/// so the stream stays in LSN order whoever writes it.
#[derive(Debug, Default)]
pub struct Sending {
    /// Last LSN written to the stream.
    pub after: u64,
    /// Last commit point written to the stream.
    pub sent_commit: u64,
    /// Last LSN of a frame the secondary acknowledges at once (every frame, unless it
    /// acknowledges lazily: then those of [`ACKED_AT_ONCE`] records or more).
    pub asked: u64,
    /// The secondary acknowledges lazily (`NUN_WRITE_QUORUM=1`).
    lazy_acks: bool,
    /// Bytes composed but not taken by the socket yet: the sender thread writes them first.
    pub unsent: Vec<u8>,
    /// Only the sender thread may write now (unsent bytes, or records no longer in memory).
    pub stalled: bool,
    /// Reused composition buffer.
    scratch: Vec<u8>,
}

/// How far a composition got.
#[derive(Debug, PartialEq, Eq)]
pub enum Composed {
    /// Everything in the backlog is in the buffer.
    CaughtUp,
    /// A full batch: more records wait.
    More,
    /// The backlog no longer reaches back to the stream's position (read the files).
    TooOld,
}

/// One secondary's replication stream, shared by its sender thread and the threads that ship.
#[derive(Debug)]
pub struct Outgoing {
    stream: Arc<TcpStream>,
    sending: Mutex<Sending>,
    /// Set before a thread tries the stream: whoever holds it then composes again before it
    /// lets go, so nothing appended before the flag was set is left behind.
    pending: AtomicBool,
    /// Highest LSN this stream has shown the secondary (published before the write): an ack
    /// beyond it would count a divergent tail as a copy of ours.
    shown: AtomicU64,
    /// Highest LSN the secondary acknowledged on this stream.
    acked: AtomicU64,
    /// [`Sending::asked`], published with [`Outgoing::show`]: new records wait while an
    /// acknowledgement up to it is due ([`Outgoing::ship`]).
    asked: AtomicU64,
    /// The acknowledgement reader saw the stream end.
    closed: AtomicBool,
}

impl Sending {
    /// Notes a frame of `count` records up to `last` written after the stream's position.
    pub fn framed(&mut self, count: usize, last: u64) {
        if count == 0 {
            return;
        }
        self.after = last;
        if !self.lazy_acks || count >= ACKED_AT_ONCE {
            self.asked = last;
        }
    }
}

impl Outgoing {
    /// A stream over `stream`, not yet positioned (nothing shown); `lazy_acks` when its
    /// secondary was told to acknowledge lazily.
    pub fn new(stream: Arc<TcpStream>, lazy_acks: bool) -> Outgoing {
        Outgoing {
            stream,
            sending: Mutex::new(Sending {
                lazy_acks,
                ..Sending::default()
            }),
            pending: AtomicBool::new(false),
            shown: AtomicU64::new(0),
            acked: AtomicU64::new(0),
            asked: AtomicU64::new(0),
            closed: AtomicBool::new(false),
        }
    }

    /// The stream's state, waiting for the thread writing it (the sender thread only).
    pub fn lock(&self) -> MutexGuard<'_, Sending> {
        let guard = self.sending.lock().unwrap_or_else(|e| e.into_inner());
        self.pending.store(false, Ordering::SeqCst);
        guard
    }

    /// True when a thread found the stream busy since the holder took it: compose again.
    pub fn is_pending(&self) -> bool {
        self.pending.load(Ordering::SeqCst)
    }

    /// Highest LSN shown to the secondary.
    pub fn shown(&self) -> u64 {
        self.shown.load(Ordering::Acquire)
    }

    /// Publishes that the stream shows everything up to its position, and the acknowledgement
    /// it asks for (call before writing it).
    pub fn show(&self, s: &Sending) {
        self.asked.store(s.asked, Ordering::SeqCst);
        self.shown.store(s.after, Ordering::Release);
    }

    /// The secondary acknowledged `lsn` (at most [`Outgoing::shown`]).
    pub fn note_ack(&self, lsn: u64) {
        self.acked.fetch_max(lsn, Ordering::SeqCst);
    }

    /// The acknowledgement reader saw the stream end.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
    }

    /// True once the stream ended.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Appends to `buf` the commit line (when the commit point moved) and a frame of the
    /// backlog's records after the stream's position, moving the position past them.
    pub fn compose(s: &mut Sending, log: &OpLog, cluster: &Cluster, buf: &mut Vec<u8>) -> Composed {
        let commit = cluster.committed();
        if commit > s.sent_commit {
            s.sent_commit = commit;
            buf.extend_from_slice(format!("commit {commit}\n").as_bytes());
        }
        let frame = open_frame(buf);
        match log.copy_after(s.after, u64::MAX, BATCH, buf) {
            Tail::Copied { count, last } => {
                close_frame(buf, frame);
                s.framed(count, last);
                if count == BATCH {
                    Composed::More
                } else {
                    Composed::CaughtUp
                }
            }
            Tail::TooOld => {
                buf.truncate(frame);
                Composed::TooOld
            }
        }
    }

    /// Writes what is new for this stream if no other thread is writing it, never blocking.
    /// False when the sender thread must take over: the socket would not take it all, or the
    /// records are no longer in memory.
    ///
    /// While a frame sent earlier waits for its acknowledgement, nothing is sent: that
    /// acknowledgement ships everything appended meanwhile in one write (as Nagle's algorithm
    /// does), so a busy primary sends one batch per round trip instead of one per write. A
    /// secondary that acknowledges lazily does not acknowledge single writes: each goes at once,
    /// and only frames that met several writes start holding the next ones.
    fn ship(&self, log: &OpLog, cluster: &Cluster) -> bool {
        // Appended before this check; an acknowledgement stored after it ships them.
        if self.asked.load(Ordering::SeqCst) > self.acked.load(Ordering::SeqCst) {
            return true;
        }
        self.pending.store(true, Ordering::SeqCst);
        loop {
            // Busy: its holder sees the flag when it finishes and composes again.
            let Ok(mut s) = self.sending.try_lock() else {
                return true;
            };
            // Cleared since it was set: a holder composed after this thread's appends.
            if !self.pending.swap(false, Ordering::SeqCst) {
                return true;
            }
            if s.stalled || self.is_closed() {
                return false;
            }
            let mut buf = std::mem::take(&mut s.scratch);
            buf.clear();
            let composed = Self::compose(&mut s, log, cluster, &mut buf);
            self.show(&s);
            let sent = if buf.is_empty() {
                Ok(0)
            } else {
                send_now(self.stream.as_raw_fd(), &[IoSlice::new(&buf)])
            };
            match sent {
                Ok(n) if n == buf.len() => {}
                Ok(n) => {
                    s.unsent = buf[n..].to_vec();
                    s.stalled = true;
                    return false;
                }
                Err(_) => {
                    s.stalled = true;
                    return false;
                }
            }
            s.scratch = buf;
            match composed {
                Composed::TooOld => {
                    s.stalled = true;
                    return false;
                }
                Composed::More => self.pending.store(true, Ordering::SeqCst),
                Composed::CaughtUp => {}
            }
            drop(s);
            if !self.is_pending() {
                return true;
            }
        }
    }
}

/// The primary's streams to its secondaries, and how many there are: every write of a node
/// ships, and a node without secondaries (a single node) reads only that count, where taking
/// the list's lock would move its cache line between the cores of all writers.
#[derive(Debug, Default)]
pub struct Streams(RwLock<Vec<Arc<Outgoing>>>, AtomicUsize);

/// Keeps a stream listed while it is alive; unlists it when dropped.
#[derive(Debug)]
pub struct Listed<'a> {
    streams: &'a Streams,
    stream: Arc<Outgoing>,
}

impl Streams {
    /// Lists `stream` so writes ship to it, until the returned guard is dropped.
    pub fn list<'a>(&'a self, stream: &Arc<Outgoing>) -> Listed<'a> {
        let mut streams = self.0.write().unwrap_or_else(|e| e.into_inner());
        streams.push(Arc::clone(stream));
        self.1.store(streams.len(), Ordering::SeqCst);
        drop(streams);
        Listed {
            streams: self,
            stream: Arc::clone(stream),
        }
    }

    /// Ships to every listed stream that is free; wakes the sender threads (through `log`)
    /// when one must take over.
    pub fn ship(&self, log: &OpLog, cluster: &Cluster) {
        if self.1.load(Ordering::SeqCst) == 0 {
            return;
        }
        let mut wake = false;
        {
            let streams = self.0.read().unwrap_or_else(|e| e.into_inner());
            for s in streams.iter() {
                wake |= !s.ship(log, cluster);
            }
        }
        if wake {
            log.wake();
        }
    }
}

impl Drop for Listed<'_> {
    fn drop(&mut self) {
        let mut streams = self.streams.0.write().unwrap_or_else(|e| e.into_inner());
        streams.retain(|s| !Arc::ptr_eq(s, &self.stream));
        self.streams.1.store(streams.len(), Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::WriteQuorum;
    use crate::storage::oplog::{ship_later, take_owed_shipping, FsyncPolicy};
    use crate::storage::record::Record;
    use crate::storage::record::{view, Decoded};
    use std::io::{BufRead, BufReader, ErrorKind, Read};
    use std::net::TcpListener;
    use std::time::Duration;

    fn rec(key: &str) -> Record {
        Record::test_set(key)
    }

    /// What the stream carried: a line, or a frame's records (their LSNs).
    #[derive(Debug, PartialEq)]
    enum Item {
        Line(String),
        Records(Vec<u64>),
    }

    /// Reads one line or frame, waiting for it.
    fn next_item(reader: &mut BufReader<TcpStream>) -> Item {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        let line = line.trim_end();
        let Some(len) = line.strip_prefix("recs ") else {
            return Item::Line(line.to_string());
        };
        let mut frame = vec![0; len.parse().unwrap()];
        reader.read_exact(&mut frame).unwrap();
        let mut lsns = Vec::new();
        let mut rest = &frame[..];
        while let Decoded::Record(r, len) = view(rest) {
            lsns.push(r.lsn);
            rest = &rest[len..];
        }
        assert!(rest.is_empty(), "a frame holds whole records");
        Item::Records(lsns)
    }

    /// The lines and frames already in `reader`'s socket (none if nothing arrived).
    fn arrived(reader: &mut BufReader<TcpStream>) -> Vec<Item> {
        let mut items = Vec::new();
        loop {
            reader.get_ref().set_nonblocking(true).unwrap();
            let ready = match reader.fill_buf() {
                Ok(b) => !b.is_empty(),
                Err(e) if e.kind() == ErrorKind::WouldBlock => false,
                Err(e) => panic!("read: {e}"),
            };
            reader.get_ref().set_nonblocking(false).unwrap();
            if !ready {
                return items;
            }
            items.push(next_item(reader));
        }
    }

    /// A log with a backlog, a cluster of three led by "a" with `quorum`, and one stream to a
    /// secondary (told to acknowledge lazily with `NUN_WRITE_QUORUM=1`), with its far end.
    fn one_stream(
        quorum: WriteQuorum,
    ) -> (
        std::path::PathBuf,
        OpLog,
        Cluster,
        Arc<Outgoing>,
        BufReader<TcpStream>,
    ) {
        let dir = std::env::temp_dir().join(format!("nundb-ship-{}", rand::random::<u32>()));
        let log = OpLog::open(&dir, FsyncPolicy::No, 0, &mut |_| Ok(())).unwrap();
        log.enable_backlog(1 << 20);
        let members = ["a", "b", "c"].map(String::from);
        let cluster = Cluster::new(
            "a".into(),
            &members,
            ("u".into(), "p".into()),
            Duration::from_secs(1),
            quorum,
            None,
        );
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let secondary = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        secondary
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let (primary_side, _) = listener.accept().unwrap();
        let lazy = !cluster.commits_on_acks();
        let outgoing = Arc::new(Outgoing::new(Arc::new(primary_side), lazy));
        (dir, log, cluster, outgoing, BufReader::new(secondary))
    }

    #[test]
    fn a_writer_ships_its_records_and_holds_the_next_ones_until_the_acknowledgement() {
        let (dir, log, cluster, outgoing, mut secondary) = one_stream(WriteQuorum::Majority);
        let _listed = cluster.streams().list(&outgoing);

        // Outside a ShipLater scope an append wakes the sender threads, and nothing is owed.
        let wakes = log.wakes();
        log.append(&mut rec("plain")).unwrap();
        assert_eq!(log.wakes(), wakes + 1);
        assert!(!take_owed_shipping());

        // Inside one it wakes nobody; the writer ships, and the record is on the socket when
        // `ship` returns (the first, LSN 1, comes along: the stream had not shown it).
        {
            let _scope = ship_later();
            log.append(&mut rec("a")).unwrap();
        }
        assert_eq!(log.wakes(), wakes + 1);
        assert!(take_owed_shipping());
        assert!(!take_owed_shipping());
        cluster.ship(&log);
        assert_eq!(arrived(&mut secondary), [Item::Records(vec![1, 2])]);
        assert_eq!(outgoing.shown(), 2);

        // Not acknowledged yet: the next record waits for the acknowledgement.
        {
            let _scope = ship_later();
            log.append(&mut rec("b")).unwrap();
        }
        assert!(take_owed_shipping());
        cluster.ship(&log);
        assert_eq!(arrived(&mut secondary), []);

        // The acknowledgement (and the commit it brought) ships it, commit line first.
        outgoing.note_ack(2);
        cluster.set_commit(2);
        cluster.ship(&log);
        assert_eq!(next_item(&mut secondary), Item::Line("commit 2".into()));
        assert_eq!(next_item(&mut secondary), Item::Records(vec![3]));
        assert_eq!(outgoing.shown(), 3);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_lazily_acknowledged_stream_sends_single_writes_at_once_and_holds_after_a_batch() {
        let (dir, log, cluster, outgoing, mut secondary) = one_stream(WriteQuorum::One);
        let _listed = cluster.streams().list(&outgoing);

        // Single writes are not acknowledged at once: each goes without waiting.
        log.append(&mut rec("a")).unwrap();
        cluster.ship(&log);
        assert_eq!(arrived(&mut secondary), [Item::Records(vec![1])]);
        log.append(&mut rec("b")).unwrap();
        cluster.ship(&log);
        assert_eq!(arrived(&mut secondary), [Item::Records(vec![2])]);

        // A frame that met several writes is acknowledged at once: the next write waits for it.
        log.append(&mut rec("c")).unwrap();
        log.append(&mut rec("d")).unwrap();
        cluster.ship(&log);
        assert_eq!(arrived(&mut secondary), [Item::Records(vec![3, 4])]);
        log.append(&mut rec("e")).unwrap();
        cluster.ship(&log);
        assert_eq!(arrived(&mut secondary), []);

        // An acknowledgement short of the batch keeps holding; the batch's own one ships.
        outgoing.note_ack(3);
        cluster.ship(&log);
        assert_eq!(arrived(&mut secondary), []);
        outgoing.note_ack(4);
        cluster.ship(&log);
        assert_eq!(arrived(&mut secondary), [Item::Records(vec![5])]);
        assert_eq!(outgoing.shown(), 5);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
