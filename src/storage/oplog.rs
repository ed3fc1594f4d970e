//! The operation log (WAL): numbered segment files of [`Record`]s. Appends only encode into a
//! buffer; before a write is acknowledged its record is written to the segment's page cache
//! (small groups copied into a map of it, [`super::segment`]) by whichever waiting thread
//! flushes first, together with everything appended meanwhile (group write). `always` also
//! fsyncs in that flush (group commit), `everysec` leaves the fsync to a background tick once a
//! second, `no` leaves it to the OS. Every policy survives kill -9 of the process.

use std::cell::Cell;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::backlog::{self, Backlog, Tail};
use super::record::{self, decode, Decoded, Record, RecordRef, HEADER};
use super::segment::{Segment, MAX_COPIED};
use crate::sync::Condition;

/// When appended records are forced to disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsyncPolicy {
    /// fsync before acknowledging (group commit).
    Always,
    /// fsync once a second in the background.
    EverySec,
    /// Never fsync explicitly.
    No,
}

impl FsyncPolicy {
    /// Parses `always`, `everysec` or `no`.
    pub fn parse(s: &str) -> Option<FsyncPolicy> {
        match s {
            "always" => Some(FsyncPolicy::Always),
            "everysec" => Some(FsyncPolicy::EverySec),
            "no" => Some(FsyncPolicy::No),
            _ => None,
        }
    }
}

const SEGMENT_SUFFIX: &str = ".oplog";

struct Inner {
    next_lsn: u64,
    /// LSN of the last record encoded into `buf` (or written before it).
    appended_lsn: u64,
    /// Term of that record.
    appended_term: u64,
    /// Encoded records not yet written to `file`.
    buf: Vec<u8>,
    /// The buffer the last flush wrote, kept to take `buf`'s place at the next one, so appends
    /// (under the database locks) never wait for a fresh allocation to grow.
    spare: Vec<u8>,
    /// (first LSN, path) of every live segment, oldest first; the last one is being appended to.
    segments: Vec<(u64, PathBuf)>,
}

struct FlushState {
    written_lsn: u64,
    synced_lsn: u64,
    /// A thread is writing (and maybe syncing) a taken buffer, or rolling the segment.
    busy: bool,
}

impl FlushState {
    /// The LSN durable per the policy: synced when `sync` (`always`), else written.
    fn durable(&self, sync: bool) -> u64 {
        if sync {
            self.synced_lsn
        } else {
            self.written_lsn
        }
    }
}

/// fsync of the log's data, timed for `nundb_fsync_duration_seconds`.
fn timed_sync(file: &File) -> io::Result<()> {
    let started = std::time::Instant::now();
    let result = file.sync_data();
    crate::metrics::STATS
        .fsync_time
        .observe(0, started.elapsed());
    result
}

/// Largest write buffer kept between flushes.
const MAX_SPARE: usize = 4 << 20;

/// Work to run once a log record is durable (with the LSN the log is now durable up to, at
/// least the record's), or when the log failed first (`None`); it is given the log.
type Completion = Box<dyn FnOnce(Option<u64>, &OpLog) + Send>;

/// The log of one node.
pub struct OpLog {
    dir: PathBuf,
    policy: FsyncPolicy,
    inner: Mutex<Inner>,
    /// The segment being appended to: written only by the thread holding the group write's
    /// `busy` flag (or rolling the log), after `inner`'s lock is released.
    tail: Mutex<Segment>,
    flush: Mutex<FlushState>,
    flushed: Condition,
    size: AtomicU64,
    count: AtomicU64,
    term: AtomicU64,
    backlog: Mutex<Backlog>,
    appended: Condition,
    /// Set when a write to the log failed: records may be missing, so nothing more is
    /// acknowledged until the node restarts (and recovery cuts the damaged tail).
    failed: std::sync::atomic::AtomicBool,
    /// Recent records are kept in memory for replication (only cluster members need it):
    /// checked without the backlog's lock, which holds the limit itself.
    keeps_backlog: std::sync::atomic::AtomicBool,
    /// The backlog asked for its next block ([`OpLog::refill_backlog`] makes it).
    block_wanted: std::sync::atomic::AtomicBool,
    /// Bumped by [`OpLog::wake`] so tail readers notice news other than new records.
    wakes: AtomicU64,
    /// Completions waiting for their record to be durable (see [`OpLog::on_durable`]).
    completions: Mutex<Vec<(u64, Completion)>>,
    /// Mirrors `busy` of a group write, for [`OpLog::on_durable`] to wait on without the lock.
    writing: std::sync::atomic::AtomicBool,
    /// How long [`OpLog::on_durable`] waits for a running group write ([`WRITE_WAIT`]).
    write_wait: Duration,
}

/// How long a writer whose record may be in another thread's running group write waits for it
/// to finish (spinning) before handing its completion over: about a few page-cache writes.
/// Each thread then sends its own replies, in parallel, instead of the writing thread sending
/// the whole group's one after another (50 connections × 1 set: +13% in alternating runs).
const WRITE_WAIT: Duration = Duration::from_micros(10);

impl std::fmt::Debug for OpLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpLog").field("dir", &self.dir).finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Opens (creating if needed) a segment file for appending through [`Segment`], which maps it
/// and so needs it readable as well as writable.
fn open_segment(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(path)
}

fn segment_path(dir: &Path, first_lsn: u64) -> PathBuf {
    dir.join(format!("{first_lsn:020}{SEGMENT_SUFFIX}"))
}

fn list_segments(dir: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if let Some(num) = name.strip_suffix(SEGMENT_SUFFIX) {
            if let Ok(first) = num.parse::<u64>() {
                out.push((first, path));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Fsyncs a directory so renames and new files in it survive a crash.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

thread_local! {
    /// How many [`ShipLater`] guards this thread holds, and whether it appended under one.
    static SHIP_LATER: Cell<(u32, bool)> = const { Cell::new((0, false)) };
}

/// While alive, records this thread appends do not wake the replication senders: the thread
/// ships them itself once its batch is executed ([`take_owed_shipping`], then
/// `Cluster::ship`), which saves a sender thread's wake-up per write. A thread that never
/// ships leaves its records to the senders' next heartbeat.
#[derive(Debug)]
pub struct ShipLater(());

/// Starts a [`ShipLater`] scope on this thread (scopes nest).
pub fn ship_later() -> ShipLater {
    SHIP_LATER.with(|c| {
        let (depth, owed) = c.get();
        c.set((depth + 1, owed));
    });
    ShipLater(())
}

impl Drop for ShipLater {
    fn drop(&mut self) {
        SHIP_LATER.with(|c| {
            let (depth, owed) = c.get();
            c.set((depth.saturating_sub(1), owed));
        });
    }
}

/// True (once) when this thread appended records under a [`ShipLater`] scope that it has not
/// shipped yet.
pub fn take_owed_shipping() -> bool {
    SHIP_LATER.with(|c| {
        let (depth, owed) = c.get();
        c.set((depth, false));
        owed
    })
}

/// Inside a [`ShipLater`] scope, notes that this thread owes a shipment and says so.
fn defer_shipping() -> bool {
    SHIP_LATER.with(|c| {
        let (depth, _) = c.get();
        if depth > 0 {
            c.set((depth, true));
        }
        depth > 0
    })
}

/// Reads one segment (its first `limit` bytes, when given), calling `apply` for each valid
/// record. Returns the length of the valid prefix and the records in it. In the last segment,
/// a record length of zero ends the records (space reserved ahead, or a copied group write cut
/// short, [`super::segment`]), and a record cut short or damaged with nothing but zeros after
/// it is a torn tail (reported, not an error); any other damage is an error naming the file.
fn read_segment(
    path: &Path,
    is_last: bool,
    limit: Option<u64>,
    apply: &mut dyn FnMut(Record) -> Result<(), String>,
) -> Result<(u64, u64), String> {
    let err = |e: io::Error| format!("cannot read operation log {}: {e}", path.display());
    let file = File::open(path).map_err(err)?;
    let file_len = file.metadata().map_err(err)?.len();
    let file_len = limit.map_or(file_len, |l| l.min(file_len));
    let mut reader = BufReader::with_capacity(1 << 20, file.take(file_len));
    let mut offset: u64 = 0;
    let mut count = 0;
    let mut buf = Vec::new();
    loop {
        buf.clear();
        let mut header = [0u8; HEADER];
        let got = read_up_to(&mut reader, &mut header).map_err(err)?;
        if got == 0 {
            return Ok((offset, count));
        }
        if got < HEADER {
            return torn(path, is_last, offset, file_len, count, "incomplete header");
        }
        let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as u64;
        if len == 0 && is_last {
            return end_of_records(path, &mut reader, offset, file_len, count);
        }
        if offset + HEADER as u64 + len > file_len {
            return torn(path, is_last, offset, file_len, count, "incomplete record");
        }
        buf.extend_from_slice(&header);
        buf.resize(HEADER + len as usize, 0);
        reader.read_exact(&mut buf[HEADER..]).map_err(err)?;
        match decode(&buf) {
            Decoded::Record(record, n) => {
                apply(record)?;
                offset += n as u64;
                count += 1;
            }
            Decoded::Incomplete => {
                return torn(path, is_last, offset, file_len, count, "incomplete record")
            }
            Decoded::Corrupt(why) => {
                if is_last && only_zeros(&mut reader).map_err(err)? {
                    return torn(path, is_last, offset, file_len, count, &why);
                }
                return Err(format!(
                    "corrupted operation log {} at offset {offset}: {why}; refusing to start (move the file away to start without it)",
                    path.display()
                ));
            }
        }
    }
}

/// The records of the last segment end at `offset`, where a record length of zero was read
/// (`rest` follows that record header). After it comes reserved space (all zeros, cut
/// quietly), or a copied group write cut short (bytes within [`MAX_COPIED`] of `offset`, cut
/// as a torn tail). Anything further is damage to records that were written: an error.
fn end_of_records(
    path: &Path,
    rest: &mut impl Read,
    offset: u64,
    file_len: u64,
    count: u64,
) -> Result<(u64, u64), String> {
    let err = |e: io::Error| format!("cannot read operation log {}: {e}", path.display());
    let mut copied = [0u8; MAX_COPIED - HEADER];
    let n = read_up_to(rest, &mut copied).map_err(err)?;
    if !only_zeros(rest).map_err(err)? {
        return Err(format!(
            "corrupted operation log {} at offset {offset}: a record length of zero with records after it; refusing to start (move the file away to start without it)",
            path.display()
        ));
    }
    if copied[..n].iter().any(|&b| b != 0) {
        log::warn!(
            "operation log {}: torn tail at offset {offset} (a group write cut short); cutting {} bytes",
            path.display(),
            file_len - offset
        );
    } else {
        log::debug!(
            "operation log {}: records end at offset {offset}; cutting {} reserved bytes",
            path.display(),
            file_len - offset
        );
    }
    Ok((offset, count))
}

/// True when nothing but zeros is left to read.
fn only_zeros(r: &mut impl Read) -> io::Result<bool> {
    let mut buf = [0u8; 8192];
    loop {
        let n = read_up_to(r, &mut buf)?;
        if buf[..n].iter().any(|&b| b != 0) {
            return Ok(false);
        }
        if n < buf.len() {
            return Ok(true);
        }
    }
}

fn torn(
    path: &Path,
    is_last: bool,
    offset: u64,
    file_len: u64,
    count: u64,
    why: &str,
) -> Result<(u64, u64), String> {
    if !is_last {
        return Err(format!(
            "corrupted operation log {} at offset {offset}: {why} in a sealed segment; refusing to start",
            path.display()
        ));
    }
    log::warn!(
        "operation log {}: torn tail at offset {offset} ({why}); cutting {} bytes",
        path.display(),
        file_len - offset
    );
    Ok((offset, count))
}

fn read_up_to(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

impl OpLog {
    /// Opens (creating if needed) the log in `dir`, replaying every record through `apply`.
    /// New LSNs continue after the last record, the newest segment's first LSN and `floor`
    /// (the highest LSN already covered by snapshots), so they never go backwards.
    pub fn open(
        dir: &Path,
        policy: FsyncPolicy,
        floor: u64,
        apply: &mut dyn FnMut(Record) -> Result<(), String>,
    ) -> Result<OpLog, String> {
        let err = |e: io::Error| format!("operation log {}: {e}", dir.display());
        fs::create_dir_all(dir).map_err(err)?;
        let mut segments = list_segments(dir).map_err(err)?;
        let mut last_lsn = 0;
        let mut last_term = 0;
        let mut size = 0;
        let mut count = 0;
        let n = segments.len();
        for (i, (_, path)) in segments.iter().enumerate() {
            let is_last = i + 1 == n;
            let mut check = |r: Record| {
                if r.lsn <= last_lsn {
                    return Err(format!(
                        "operation log {}: LSN {} after {last_lsn}; refusing to start",
                        path.display(),
                        r.lsn
                    ));
                }
                last_lsn = r.lsn;
                last_term = r.term;
                apply(r)
            };
            let (valid, records) = read_segment(path, is_last, None, &mut check)?;
            if is_last {
                let file = OpenOptions::new().write(true).open(path).map_err(err)?;
                if file.metadata().map_err(err)?.len() != valid {
                    file.set_len(valid).map_err(err)?;
                    file.sync_all().map_err(err)?;
                }
            }
            size += valid;
            count += records;
        }
        let segment_floor = segments
            .last()
            .map_or(0, |(first, _)| first.saturating_sub(1));
        let last_lsn = last_lsn.max(segment_floor).max(floor);
        if segments.is_empty() {
            let path = segment_path(dir, last_lsn + 1);
            File::create(&path).map_err(err)?;
            sync_dir(dir).map_err(err)?;
            segments.push((last_lsn + 1, path));
        }
        let current = &segments[segments.len() - 1].1;
        let tail = Segment::open(open_segment(current).map_err(err)?).map_err(err)?;
        Ok(OpLog {
            dir: dir.to_path_buf(),
            policy,
            inner: Mutex::new(Inner {
                next_lsn: last_lsn + 1,
                appended_lsn: last_lsn,
                appended_term: last_term,
                buf: Vec::with_capacity(64 * 1024),
                spare: Vec::with_capacity(64 * 1024),
                segments,
            }),
            tail: Mutex::new(tail),
            flush: Mutex::new(FlushState {
                written_lsn: last_lsn,
                synced_lsn: last_lsn,
                busy: false,
            }),
            flushed: Condition::new(),
            size: AtomicU64::new(size),
            count: AtomicU64::new(count),
            term: AtomicU64::new(last_term.max(1)),
            backlog: Mutex::new(Backlog::default()),
            appended: Condition::new(),
            failed: std::sync::atomic::AtomicBool::new(false),
            keeps_backlog: std::sync::atomic::AtomicBool::new(false),
            block_wanted: std::sync::atomic::AtomicBool::new(false),
            wakes: AtomicU64::new(0),
            completions: Mutex::new(Vec::new()),
            writing: std::sync::atomic::AtomicBool::new(false),
            write_wait: WRITE_WAIT,
        })
    }

    /// The fsync policy.
    pub fn policy(&self) -> FsyncPolicy {
        self.policy
    }

    /// Current election term stamped on new records.
    pub fn term(&self) -> u64 {
        self.term.load(Ordering::Acquire)
    }

    /// Sets the term stamped on new records.
    pub fn set_term(&self, term: u64) {
        self.term.store(term, Ordering::Release);
    }

    /// LSN of the last appended record.
    pub fn last_lsn(&self) -> u64 {
        lock(&self.inner).appended_lsn
    }

    /// (term, LSN) of the last appended record: how up to date this log is.
    pub fn last_position(&self) -> (u64, u64) {
        let inner = lock(&self.inner);
        (inner.appended_term, inner.appended_lsn)
    }

    /// Discards the whole log and continues numbering after `base` (a replica's full sync).
    pub fn reset(&self, base: u64) -> io::Result<()> {
        let mut state = self.exclusive();
        let mut inner = lock(&self.inner);
        inner.buf.clear();
        let mut tail = lock(&self.tail);
        // Cut first: the new segment may be this one, and must start after its records.
        tail.trim()?;
        let path = segment_path(&self.dir, base + 1);
        let new = Segment::open(open_segment(&path)?)?;
        for (_, old) in inner.segments.drain(..) {
            if old != path {
                fs::remove_file(&old)?;
            }
        }
        sync_dir(&self.dir)?;
        *tail = new;
        drop(tail);
        inner.segments.push((base + 1, path));
        inner.next_lsn = base + 1;
        inner.appended_lsn = base;
        state.written_lsn = base;
        state.synced_lsn = base;
        self.size.store(0, Ordering::Relaxed);
        self.count.store(0, Ordering::Relaxed);
        let mut backlog = lock(&self.backlog);
        backlog.clear();
        drop((backlog, inner, state));
        // Records still awaited were replaced by the primary's: they will never be durable here.
        let orphans = std::mem::take(&mut *lock(&self.completions));
        for (_, done) in orphans {
            done(None, self);
        }
        Ok(())
    }

    /// Bytes in live segments (including records not yet flushed).
    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Relaxed)
    }

    /// Records in live segments.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Appends `record` to the log buffer, giving it the next LSN (and the current term) when
    /// its `lsn` is 0; a replica passes the primary's LSN, which must be greater than the last.
    /// Nothing is on disk until [`OpLog::wait_durable`] (or a background tick) flushes it.
    pub fn append(&self, record: &mut Record) -> io::Result<u64> {
        self.check_failed()?;
        let mut inner = lock(&self.inner);
        self.number(&inner, record)?;
        let before = inner.buf.len();
        record.encode(&mut inner.buf);
        self.appended(&mut inner, record.lsn, record.term, before);
        Ok(record.lsn)
    }

    /// Appends a record another node encoded (a secondary's copy of the primary's record,
    /// checked with [`record::view`]) byte for byte, under the LSN and term it carries.
    pub fn append_encoded(&self, bytes: &[u8]) -> io::Result<u64> {
        self.check_failed()?;
        let (lsn, term) = record::position(bytes);
        let mut inner = lock(&self.inner);
        Self::check_after(&inner, lsn)?;
        let before = inner.buf.len();
        inner.buf.extend_from_slice(bytes);
        self.appended(&mut inner, lsn, term, before);
        Ok(lsn)
    }

    /// Gives `record` the next LSN and the current term when its `lsn` is 0; otherwise checks
    /// that its LSN comes after the last one.
    fn number(&self, inner: &Inner, record: &mut Record) -> io::Result<()> {
        if record.lsn == 0 {
            record.lsn = inner.next_lsn;
            record.term = self.term();
            Ok(())
        } else {
            Self::check_after(inner, record.lsn)
        }
    }

    /// An error unless `lsn` comes after the last appended record.
    fn check_after(inner: &Inner, lsn: u64) -> io::Result<()> {
        if lsn < inner.next_lsn {
            return Err(io::Error::other(format!(
                "LSN {lsn} is not after {}",
                inner.appended_lsn
            )));
        }
        Ok(())
    }

    /// Appends a new record (next LSN, current term) encoded straight from borrowed fields:
    /// a write copies its key and value only into the log buffer.
    pub fn append_new(&self, record: RecordRef<'_>) -> io::Result<u64> {
        self.check_failed()?;
        let mut inner = lock(&self.inner);
        let (lsn, term) = (inner.next_lsn, self.term());
        let before = inner.buf.len();
        record.encode(lsn, term, &mut inner.buf);
        self.appended(&mut inner, lsn, term, before);
        Ok(lsn)
    }

    /// Bookkeeping after a record was encoded at `inner.buf[before..]`: positions, counters,
    /// the replication backlog (a copy of those bytes, only when there is a backlog) and its
    /// waiters.
    fn appended(&self, inner: &mut Inner, lsn: u64, term: u64, before: usize) {
        let encoded = inner.buf.len() - before;
        inner.next_lsn = lsn + 1;
        inner.appended_lsn = lsn;
        inner.appended_term = term;
        self.size.fetch_add(encoded as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
        if self.keeps_backlog.load(Ordering::Relaxed) {
            {
                let mut backlog = lock(&self.backlog);
                backlog.push(lsn, &inner.buf[before..]);
                if backlog.wants_block() {
                    self.block_wanted.store(true, Ordering::Relaxed);
                }
            }
            // After the lock is released: a sender woken while it is held would only block on
            // it and need a second wake-up. A thread that ships its own records wakes no one.
            if !defer_shipping() {
                self.wake();
            }
        }
    }

    /// Starts keeping about `bytes` of recent records in memory, so secondaries catch up
    /// without reading the files (older positions read the log, or get a full sync).
    pub fn enable_backlog(&self, bytes: usize) {
        lock(&self.backlog).set_limit(bytes.max(1));
        self.keeps_backlog.store(true, Ordering::Relaxed);
        self.block_wanted.store(true, Ordering::Relaxed);
    }

    /// Makes the backlog's next block when it asked for one, touching its pages here rather
    /// than under the log's locks. Writers call it once they hold no lock (a primary's session
    /// after its batch, a secondary after each frame); without it the backlog allocates the
    /// block itself, under the lock.
    pub fn refill_backlog(&self) {
        // Read before the swap: every batch of every session calls this, and a read leaves the
        // flag's cache line shared where a swap would move it between cores each time.
        if !self.block_wanted.load(Ordering::Relaxed)
            || !self.block_wanted.swap(false, Ordering::Relaxed)
        {
            return;
        }
        let size = lock(&self.backlog).block_size();
        let block = backlog::new_block(size);
        lock(&self.backlog).give_block(block);
    }

    /// Wakes every [`OpLog::wait_for_wake`] waiter (replication senders).
    pub fn wake(&self) {
        {
            let _backlog = lock(&self.backlog);
            self.wakes.fetch_add(1, Ordering::AcqRel);
        }
        self.appended.notify_all();
    }

    /// How many times [`OpLog::wake`] ran; pass it to [`OpLog::wait_for_wake`].
    pub fn wakes(&self) -> u64 {
        self.wakes.load(Ordering::Acquire)
    }

    /// Waits up to `wait` for an [`OpLog::wake`] after `seen_wakes` (appends outside a
    /// [`ShipLater`] scope wake too).
    pub fn wait_for_wake(&self, seen_wakes: u64, wait: std::time::Duration) {
        let backlog = lock(&self.backlog);
        if self.wakes() == seen_wakes && !wait.is_zero() {
            drop(self.appended.wait_timeout(backlog, wait));
        }
    }

    /// Appends to `out` the encoded records with `after` < LSN <= `through` from the in-memory
    /// backlog (at most `max`), exactly as they are in the log. `TooOld` when the backlog no
    /// longer reaches back to `after`.
    pub fn copy_after(&self, after: u64, through: u64, max: usize, out: &mut Vec<u8>) -> Tail {
        // Read before taking the backlog lock (append takes inner, then backlog); a record
        // appended since then is visible in the backlog itself.
        let last = self.last_lsn();
        lock(&self.backlog).copy_after(after, through, max, last, out)
    }

    /// The term of the record at `lsn`, if it is still in the backlog.
    pub fn term_at(&self, lsn: u64) -> Option<u64> {
        lock(&self.backlog).term_at(lsn)
    }

    /// Returns once `lsn` is written to the file (and fsynced, for `always`).
    pub fn wait_durable(&self, lsn: u64) -> io::Result<()> {
        self.flush_to(lsn, self.policy == FsyncPolicy::Always)
    }

    /// Writes and fsyncs everything appended so far. The fsync runs outside the group-write
    /// turn, so writers waiting only for the write (`everysec`, `no`) are not held up by it.
    pub fn sync_now(&self) -> io::Result<()> {
        let target = self.last_lsn();
        if lock(&self.flush).synced_lsn >= target {
            return Ok(());
        }
        self.flush_to(target, false)?;
        let file = Arc::clone(lock(&self.tail).file());
        if let Err(e) = timed_sync(&file) {
            log::error!("fsync of the operation log failed: {e}; refusing further writes");
            self.failed.store(true, Ordering::Release);
            return Err(e);
        }
        let mut state = lock(&self.flush);
        state.synced_lsn = state.synced_lsn.max(target);
        self.flushed.notify_all();
        Ok(())
    }

    /// Writes (without fsync) everything appended so far.
    pub fn write_now(&self) -> io::Result<()> {
        let target = self.last_lsn();
        self.flush_to(target, false)
    }

    fn check_failed(&self) -> io::Result<()> {
        if self.failed.load(Ordering::Acquire) {
            Err(io::Error::other(
                "the operation log failed earlier; restart the node to recover",
            ))
        } else {
            Ok(())
        }
    }

    /// Group flush: the first waiter takes the whole buffer and writes (and maybe fsyncs) it for
    /// everyone; the others wait for it and return if it covered them.
    fn flush_to(&self, lsn: u64, sync: bool) -> io::Result<()> {
        let mut state = lock(&self.flush);
        loop {
            if let Err(e) = self.check_failed() {
                drop(state);
                self.complete();
                return Err(e);
            }
            if state.written_lsn >= lsn && (!sync || state.synced_lsn >= lsn) {
                return Ok(());
            }
            if !state.busy {
                // Completions that found this flush under way wait for its thread to run them.
                match self.flush_turn(state, sync) {
                    Ok(s) => drop(s),
                    Err(e) => {
                        self.complete();
                        return Err(e);
                    }
                }
                self.complete();
                state = lock(&self.flush);
                continue;
            }
            state = self.flushed.wait(state);
        }
    }

    /// Runs `done` (given the LSN now durable and the log) once log record `lsn` is durable
    /// per the policy, on whichever thread makes it so. If a flush is under way, the caller
    /// first waits for it up to 10 µs (not with `always`: an fsync takes far longer). With
    /// nobody flushing, the caller flushes (if the record still needs it) and runs `done`
    /// itself, without queueing it; otherwise the flushing thread runs `done` (flushing again
    /// if it must) when it finishes. A failed log runs it with `None`. Lets a session hand its
    /// reply over instead of sleeping until someone else's write finishes.
    pub fn on_durable(&self, lsn: u64, done: impl FnOnce(Option<u64>, &OpLog) + Send + 'static) {
        let sync = self.policy == FsyncPolicy::Always;
        if !sync {
            self.wait_for_running_write();
        }
        let state = lock(&self.flush);
        if !state.busy && !self.failed.load(Ordering::Acquire) {
            let durable = if state.durable(sync) >= lsn {
                let durable = state.durable(sync);
                drop(state);
                Some(durable)
            } else {
                self.flush_turn(state, sync).ok().map(|s| s.durable(sync))
            };
            done(durable, self);
            // Completions queued while this thread flushed found it busy: they are its to run.
            self.complete();
            return;
        }
        drop(state);
        lock(&self.completions).push((lsn, Box::new(done)));
        self.complete();
    }

    /// Spins while another thread's group write runs, for at most `write_wait`.
    fn wait_for_running_write(&self) {
        if !self.writing.load(Ordering::Acquire) {
            return;
        }
        let started = Instant::now();
        let mut spins = 0u32;
        while self.writing.load(Ordering::Acquire) {
            std::hint::spin_loop();
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(32) && started.elapsed() >= self.write_wait {
                return;
            }
        }
    }

    /// Flushes and runs completions until none waits for a record already appended, unless
    /// another thread is flushing: that thread does the same when it finishes (it clears
    /// `busy` before looking at the completions, and `on_durable` adds one before looking at
    /// `busy`, so none is left behind).
    fn complete(&self) {
        // Nothing queued (the usual case): a completion queued after this look is run by its own
        // thread, which looks at `busy` only after queueing it.
        if lock(&self.completions).is_empty() {
            return;
        }
        let sync = self.policy == FsyncPolicy::Always;
        loop {
            let durable = {
                let state = lock(&self.flush);
                if self.failed.load(Ordering::Acquire) {
                    None
                } else if state.busy {
                    return;
                } else {
                    let now = state.durable(sync);
                    let behind = lock(&self.completions).iter().any(|(l, _)| *l > now);
                    if behind && self.last_lsn() > now {
                        self.flush_turn(state, sync).ok().map(|s| s.durable(sync))
                    } else {
                        Some(now)
                    }
                }
            };
            // Taken out in place: the waiting list keeps its buffer for the next writes.
            let ready: Vec<(u64, Completion)> = lock(&self.completions)
                .extract_if(.., |(l, _)| durable.is_none_or(|d| *l <= d))
                .collect();
            for (_, done) in ready {
                done(durable, self);
            }
            let Some(durable) = durable else { return };
            let last = self.last_lsn();
            let flushable = lock(&self.completions)
                .iter()
                .any(|(l, _)| *l > durable && *l <= last);
            if !flushable {
                return;
            }
        }
    }

    /// Writes (and, for `always`, fsyncs) everything appended so far unless another thread is
    /// doing so; never waits for it. Returns the LSN now durable per the policy, or `None` when
    /// a flush is under way: its thread looks for more work when it finishes.
    pub fn try_flush(&self) -> io::Result<Option<u64>> {
        let sync = self.policy == FsyncPolicy::Always;
        let mut state = lock(&self.flush);
        self.check_failed()?;
        if state.busy {
            return Ok(None);
        }
        let appended = self.last_lsn();
        if state.written_lsn < appended || (sync && state.synced_lsn < appended) {
            state = self.flush_turn(state, sync)?;
        }
        Ok(Some(state.durable(sync)))
    }

    /// One group flush by the caller (who found nobody flushing): takes the buffer, writes it
    /// outside the lock, records how far the log is written and wakes the waiters.
    fn flush_turn<'a>(
        &'a self,
        state: MutexGuard<'a, FlushState>,
        sync: bool,
    ) -> io::Result<MutexGuard<'a, FlushState>> {
        self.begin_flush(state);
        let result = self.flush_once(sync);
        self.end_flush(result, sync)
    }

    /// Takes the busy flag for a group write.
    fn begin_flush(&self, mut state: MutexGuard<'_, FlushState>) {
        state.busy = true;
        self.writing.store(true, Ordering::Release);
    }

    /// Ends a group write that covered `result` (the LSN written, or the failure): records how
    /// far the log is written and wakes the waiters.
    fn end_flush(
        &self,
        result: io::Result<u64>,
        sync: bool,
    ) -> io::Result<MutexGuard<'_, FlushState>> {
        if let Err(e) = &result {
            log::error!("writing the operation log failed: {e}; refusing further writes");
            self.failed.store(true, Ordering::Release);
        }
        let mut state = lock(&self.flush);
        state.busy = false;
        if let Ok(upto) = result {
            state.written_lsn = state.written_lsn.max(upto);
            if sync {
                state.synced_lsn = state.synced_lsn.max(upto);
            }
        }
        self.writing.store(false, Ordering::Release);
        self.flushed.notify_all();
        result.map(|_| state)
    }

    /// Takes the buffer and writes it (caller holds the busy flag). Returns the LSN covered.
    fn flush_once(&self, sync: bool) -> io::Result<u64> {
        let (mut buf, upto) = {
            let mut inner = lock(&self.inner);
            let spare = std::mem::take(&mut inner.spare);
            (std::mem::replace(&mut inner.buf, spare), inner.appended_lsn)
        };
        let file = {
            let mut tail = lock(&self.tail);
            tail.write(&buf)?;
            // Cloned only to fsync: the count's cache line is shared by every flushing core.
            sync.then(|| Arc::clone(tail.file()))
        };
        if let Some(file) = file {
            timed_sync(&file)?;
        }
        // Kept for the next flush, unless a burst grew it past what is worth keeping.
        if buf.capacity() <= MAX_SPARE {
            buf.clear();
            lock(&self.inner).spare = buf;
        }
        Ok(upto)
    }

    /// Takes the busy flag (waiting for a running flush), so the segment can be switched.
    fn exclusive(&self) -> MutexGuard<'_, FlushState> {
        let mut state = lock(&self.flush);
        while state.busy {
            state = self.flushed.wait(state);
        }
        state
    }

    /// Seals the current segment (written and fsynced) and starts a new one; returns the new
    /// segment's first LSN: every record below it is in older segments.
    pub fn roll(&self) -> io::Result<u64> {
        let mut state = self.exclusive();
        let mut inner = lock(&self.inner);
        let buf = std::mem::take(&mut inner.buf);
        let mut tail = lock(&self.tail);
        tail.write(&buf)?;
        // The sealed segment ends at its last record: recovery reads sealed ones strictly.
        tail.trim()?;
        timed_sync(tail.file())?;
        state.written_lsn = inner.appended_lsn;
        state.synced_lsn = inner.appended_lsn;
        let first = inner.next_lsn;
        if inner.segments.last().map(|(f, _)| *f) == Some(first) {
            return Ok(first);
        }
        let path = segment_path(&self.dir, first);
        let new = Segment::open(open_segment(&path)?)?;
        sync_dir(&self.dir)?;
        *tail = new;
        inner.segments.push((first, path));
        Ok(first)
    }

    /// Deletes every segment that holds only records below `lsn`.
    pub fn drop_before(&self, lsn: u64) -> io::Result<()> {
        let mut inner = lock(&self.inner);
        while inner.segments.len() > 1 && inner.segments[1].0 <= lsn {
            let next_first = inner.segments[1].0;
            let (first, path) = inner.segments.remove(0);
            let len = fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            // LSNs are dense within the log, so a sealed segment holds this many records.
            let records = next_first.saturating_sub(first);
            fs::remove_file(&path)?;
            self.size.fetch_sub(len.min(self.size()), Ordering::Relaxed);
            self.count
                .fetch_sub(records.min(self.count()), Ordering::Relaxed);
        }
        sync_dir(&self.dir)
    }

    /// Reads every record with LSN ≥ `from` still in the log (for replication catch-up);
    /// `None` when `from` was already truncated away.
    pub fn read_from(&self, from: u64) -> Result<Option<Vec<Record>>, String> {
        self.write_now()
            .map_err(|e| format!("cannot flush the operation log: {e}"))?;
        // The live segment is read only as far as its records reached after that flush: space
        // reserved after them, and later group writes, may be half copied. Both are taken
        // together, so a roll cannot slip between them.
        let (segments, written) = {
            let inner = lock(&self.inner);
            let written = lock(&self.tail).len();
            (inner.segments.clone(), written)
        };
        if segments.first().map(|(f, _)| *f > from).unwrap_or(true) {
            return Ok(None);
        }
        let mut out = Vec::new();
        let n = segments.len();
        for (i, (first, path)) in segments.iter().enumerate() {
            let next_first = segments.get(i + 1).map(|(f, _)| *f);
            if next_first.is_some_and(|nf| nf <= from) {
                continue;
            }
            let _ = first;
            let is_last = i + 1 == n;
            read_segment(path, is_last, is_last.then_some(written), &mut |r| {
                if r.lsn >= from {
                    out.push(r);
                }
                Ok(())
            })?;
        }
        Ok(Some(out))
    }
}

impl Drop for OpLog {
    fn drop(&mut self) {
        if let Err(e) = self.write_now() {
            log::error!("flushing the operation log on close failed: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "nundb-oplog-{tag}-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        let _ = fs::remove_dir_all(&d);
        d
    }

    fn rec(key: &str) -> Record {
        Record::test_set(key)
    }

    fn replay(dir: &Path) -> Result<Vec<Record>, String> {
        let mut out = Vec::new();
        OpLog::open(dir, FsyncPolicy::Always, 0, &mut |r| {
            out.push(r);
            Ok(())
        })?;
        Ok(out)
    }

    #[test]
    fn append_replay_roll_truncate() {
        let dir = tmp("a");
        let log = OpLog::open(&dir, FsyncPolicy::Always, 0, &mut |_| Ok(())).unwrap();
        for k in ["a", "b", "c"] {
            let lsn = log.append(&mut rec(k)).unwrap();
            log.wait_durable(lsn).unwrap();
        }
        let first = log.roll().unwrap();
        assert_eq!(first, 4);
        log.append(&mut rec("d")).unwrap();
        assert_eq!(log.read_from(2).unwrap().unwrap().len(), 3);
        log.drop_before(first).unwrap();
        assert!(log.read_from(2).unwrap().is_none());
        let second = log.roll().unwrap();
        log.drop_before(second).unwrap();
        drop(log);
        // Only an empty segment is left: LSNs still continue after it.
        assert!(replay(&dir).unwrap().is_empty());
        let log = OpLog::open(&dir, FsyncPolicy::No, 0, &mut |_| Ok(())).unwrap();
        assert_eq!(log.append(&mut rec("e")).unwrap(), 5);
        drop(log);
        let log = OpLog::open(&dir, FsyncPolicy::No, 9, &mut |_| Ok(())).unwrap();
        assert_eq!(log.append(&mut rec("f")).unwrap(), 10);
        let _ = fs::remove_dir_all(&dir);
    }

    /// Runs `on_durable` for a fresh record while another thread holds a group write for
    /// `hold`; returns the thread that ran the completion and what it was told.
    fn completion_during_a_write(
        policy: FsyncPolicy,
        wait: Duration,
        hold: Duration,
    ) -> (std::thread::ThreadId, Option<u64>) {
        let dir = tmp("wait");
        let mut log = OpLog::open(&dir, policy, 0, &mut |_| Ok(())).unwrap();
        log.write_wait = wait;
        let log = Arc::new(log);
        let lsn = log.append(&mut rec("a")).unwrap();
        // Another thread's group write, taking the buffer with the record in it.
        log.begin_flush(lock(&log.flush));
        let writer = {
            let log = Arc::clone(&log);
            std::thread::spawn(move || {
                std::thread::sleep(hold);
                let sync = policy == FsyncPolicy::Always;
                let written = log.flush_once(sync);
                drop(log.end_flush(written, sync).unwrap());
                log.complete();
            })
        };
        let (tx, rx) = std::sync::mpsc::channel();
        log.on_durable(lsn, move |durable, _| {
            tx.send((std::thread::current().id(), durable)).unwrap();
        });
        writer.join().unwrap();
        let ran = rx.recv().unwrap();
        let _ = fs::remove_dir_all(&dir);
        ran
    }

    #[test]
    fn a_writer_waits_briefly_for_a_running_group_write_then_hands_over() {
        let me = std::thread::current().id();
        // The write ends within the wait: the writer's own thread completes its record.
        let (ran_on, durable) = completion_during_a_write(
            FsyncPolicy::EverySec,
            Duration::from_secs(60),
            Duration::from_millis(50),
        );
        assert_eq!((ran_on, durable), (me, Some(1)));
        // The write outlasts the wait: the writing thread completes it.
        let (ran_on, durable) = completion_during_a_write(
            FsyncPolicy::EverySec,
            Duration::from_millis(1),
            Duration::from_millis(200),
        );
        assert_ne!(ran_on, me);
        assert_eq!(durable, Some(1));
        // With `always` (an fsync per group) nobody waits.
        let (ran_on, durable) = completion_during_a_write(
            FsyncPolicy::Always,
            Duration::from_secs(60),
            Duration::from_millis(200),
        );
        assert_ne!(ran_on, me);
        assert_eq!(durable, Some(1));
    }

    #[test]
    fn a_writer_alone_flushes_and_answers_on_its_own_thread() {
        for policy in [FsyncPolicy::EverySec, FsyncPolicy::Always] {
            let dir = tmp("alone");
            let log = OpLog::open(&dir, policy, 0, &mut |_| Ok(())).unwrap();
            let lsn = log.append(&mut rec("a")).unwrap();
            let ran = Arc::new(Mutex::new(None));
            let seen = Arc::clone(&ran);
            log.on_durable(lsn, move |durable, log| {
                *seen.lock().unwrap() =
                    Some((std::thread::current().id(), durable, log.last_lsn()));
            });
            let me = std::thread::current().id();
            assert_eq!(*ran.lock().unwrap(), Some((me, Some(1), 1)), "{policy:?}");
            assert!(lock(&log.completions).is_empty());
            // Already durable: answered at once, nothing written again.
            log.on_durable(lsn, |durable, _| assert_eq!(durable, Some(1)));
            drop(log);
            assert_eq!(keys(&replay(&dir).unwrap()), ["a"]);
            let _ = fs::remove_dir_all(&dir);
        }
    }

    #[test]
    fn an_encoded_record_keeps_its_bytes_in_the_backlog_and_the_file() {
        let dir = tmp("encoded");
        let log = OpLog::open(&dir, FsyncPolicy::No, 0, &mut |_| Ok(())).unwrap();
        log.enable_backlog(1 << 20);
        let mut r = rec("a");
        r.lsn = 7;
        r.term = 3;
        let mut bytes = Vec::new();
        r.encode(&mut bytes);
        assert_eq!(log.append_encoded(&bytes).unwrap(), 7);
        assert_eq!(log.last_position(), (3, 7));
        assert_eq!(log.term_at(7), Some(3));
        let mut stale = rec("b");
        stale.lsn = 7;
        let mut stale_bytes = Vec::new();
        stale.encode(&mut stale_bytes);
        assert!(
            log.append_encoded(&stale_bytes).is_err(),
            "an LSN must come after the last"
        );
        // A record this node numbers follows it, and both are copied out as they were logged.
        let mut next = rec("c");
        assert_eq!(log.append(&mut next).unwrap(), 8);
        let mut copied = b"x".to_vec();
        assert_eq!(
            log.copy_after(6, u64::MAX, 10, &mut copied),
            Tail::Copied { count: 2, last: 8 }
        );
        let mut expected = b"x".to_vec();
        expected.extend_from_slice(&bytes);
        next.encode(&mut expected);
        assert_eq!(copied, expected);
        assert_eq!(
            log.copy_after(7, u64::MAX, 10, &mut Vec::new()),
            Tail::Copied { count: 1, last: 8 }
        );
        assert_eq!(
            log.copy_after(8, u64::MAX, 10, &mut Vec::new()),
            Tail::Copied { count: 0, last: 0 }
        );
        assert_eq!(
            log.copy_after(5, u64::MAX, 10, &mut Vec::new()),
            Tail::TooOld
        );
        let mut first = Vec::new();
        log.copy_after(6, u64::MAX, 1, &mut first);
        assert_eq!(first, bytes);
        let mut through_7 = Vec::new();
        assert_eq!(
            log.copy_after(6, 7, 10, &mut through_7),
            Tail::Copied { count: 1, last: 7 }
        );
        assert_eq!(through_7, bytes);
        log.write_now().unwrap();
        assert_eq!(log.read_from(7).unwrap().unwrap(), [r, next]);
        let _ = fs::remove_dir_all(&dir);
    }

    /// Keys of replayed records, in order.
    fn keys(records: &[Record]) -> Vec<String> {
        records.iter().map(|r| r.key.clone()).collect()
    }

    /// A log with `keys` written (each its own group write), left as kill -9 leaves it: never
    /// closed, so its segment still ends in reserved zeros. Returns the segment and the bytes
    /// of its records.
    fn killed_log(dir: &Path, keys: &[&str]) -> (PathBuf, Vec<u8>) {
        let log = OpLog::open(dir, FsyncPolicy::EverySec, 0, &mut |_| Ok(())).unwrap();
        let mut expected = Vec::new();
        for k in keys {
            let mut r = rec(k);
            log.append(&mut r).unwrap();
            log.write_now().unwrap();
            r.encode(&mut expected);
        }
        std::mem::forget(log);
        let seg = list_segments(dir).unwrap().pop().unwrap().1;
        let mut bytes = fs::read(&seg).unwrap();
        if super::super::segment::mappable(&File::open(&seg).unwrap()) {
            assert!(bytes.len() > expected.len(), "no space was reserved");
        } else {
            // A filesystem the log writes with pwrite: reserve as a mapped log would have.
            bytes.resize(expected.len() + (64 << 10), 0);
            fs::write(&seg, &bytes).unwrap();
        }
        assert_eq!(&bytes[..expected.len()], &expected[..]);
        assert!(bytes[expected.len()..].iter().all(|&b| b == 0));
        (seg, expected)
    }

    /// Encoded records `first..first + n` of keys `k<lsn>` with 100-byte values, term 1.
    fn encoded(first: u64, n: u64) -> Vec<u8> {
        let mut out = Vec::new();
        for lsn in first..first + n {
            let mut r = rec(&format!("k{lsn}"));
            r.value = "x".repeat(100);
            r.lsn = lsn;
            r.term = 1;
            r.encode(&mut out);
        }
        out
    }

    #[test]
    fn a_zero_length_with_records_past_one_copied_group_is_corruption() {
        let dir = tmp("zero-mid");
        let (seg, _) = killed_log(&dir, &["a"]);
        let mut bytes = fs::read(&seg).unwrap();
        // Twenty records (over 2 KiB, well past one copied group) after a, then a's length
        // zeroed: records that were written would be lost by a cut there.
        let more = encoded(2, 20);
        assert!(more.len() > MAX_COPIED * 2);
        let end = bytes.iter().rposition(|&b| b != 0).unwrap() + 1;
        bytes[end..end + more.len()].copy_from_slice(&more);
        bytes[..4].fill(0);
        fs::write(&seg, &bytes).unwrap();
        let e = replay(&dir).unwrap_err();
        assert!(
            e.contains("corrupted operation log") && e.contains("length of zero"),
            "{e}"
        );
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_written_group_cut_short_in_reserved_space_is_a_torn_tail() {
        let dir = tmp("cut-pwrite");
        let (seg, records) = killed_log(&dir, &["a"]);
        // A group too large to copy (written with pwrite) cut short by the kill: its first
        // 1,500 bytes landed in the reserved zeros.
        let group = encoded(2, 20);
        assert!(group.len() >= MAX_COPIED);
        let mut bytes = fs::read(&seg).unwrap();
        bytes[records.len()..records.len() + 1500].copy_from_slice(&group[..1500]);
        fs::write(&seg, &bytes).unwrap();
        let whole = (0..)
            .scan(0usize, |at, _| {
                let len = u32::from_le_bytes(group[*at..*at + 4].try_into().unwrap()) as usize;
                *at += HEADER + len;
                Some(*at)
            })
            .take_while(|end| *end <= 1500)
            .count();
        let replayed = replay(&dir).unwrap();
        assert_eq!(replayed.len(), 1 + whole);
        assert_eq!(replayed.last().unwrap().lsn, 1 + whole as u64);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_log_killed_after_a_roll_keeps_its_sealed_segment_exact() {
        let dir = tmp("killed-roll");
        let log = OpLog::open(&dir, FsyncPolicy::EverySec, 0, &mut |_| Ok(())).unwrap();
        let mut sealed = Vec::new();
        for k in ["a", "b"] {
            let mut r = rec(k);
            log.append(&mut r).unwrap();
            log.write_now().unwrap();
            r.encode(&mut sealed);
        }
        assert_eq!(log.roll().unwrap(), 3);
        log.append(&mut rec("c")).unwrap();
        log.write_now().unwrap();
        std::mem::forget(log);
        let segments = list_segments(&dir).unwrap();
        assert_eq!(segments.len(), 2);
        assert_eq!(fs::read(&segments[0].1).unwrap(), sealed);
        assert_eq!(keys(&replay(&dir).unwrap()), ["a", "b", "c"]);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_killed_log_ends_at_its_last_record_and_appends_after_it() {
        let dir = tmp("killed");
        let (seg, records) = killed_log(&dir, &["a", "b", "c"]);
        // The reserved zeros are cut at start-up, and nothing else.
        assert_eq!(keys(&replay(&dir).unwrap()), ["a", "b", "c"]);
        assert_eq!(fs::read(&seg).unwrap(), records);
        let log = OpLog::open(&dir, FsyncPolicy::No, 0, &mut |_| Ok(())).unwrap();
        assert_eq!(log.append(&mut rec("d")).unwrap(), 4);
        assert_eq!(
            keys(&log.read_from(1).unwrap().unwrap()),
            ["a", "b", "c", "d"]
        );
        drop(log);
        // Closed, the segment ends at its last record.
        let mut expected = records;
        let mut d = rec("d");
        d.lsn = 4;
        d.term = 1;
        d.encode(&mut expected);
        assert_eq!(fs::read(&seg).unwrap(), expected);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_group_write_cut_short_ends_the_log_where_the_group_began() {
        let dir = tmp("cut-group");
        let (seg, records) = killed_log(&dir, &["a", "b"]);
        // A group of two records killed mid-copy: its first length (copied last) is still zero.
        let mut group = Vec::new();
        for (lsn, k) in [(3, "c"), (4, "d")] {
            let mut r = rec(k);
            r.lsn = lsn;
            r.term = 1;
            r.encode(&mut group);
        }
        group[..4].fill(0);
        let mut bytes = fs::read(&seg).unwrap();
        bytes[records.len()..records.len() + group.len()].copy_from_slice(&group);
        fs::write(&seg, &bytes).unwrap();
        assert_eq!(keys(&replay(&dir).unwrap()), ["a", "b"]);
        assert_eq!(fs::read(&seg).unwrap(), records);
        let log = OpLog::open(&dir, FsyncPolicy::No, 0, &mut |_| Ok(())).unwrap();
        assert_eq!(log.append(&mut rec("e")).unwrap(), 3);
        drop(log);
        assert_eq!(keys(&replay(&dir).unwrap()), ["a", "b", "e"]);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_damaged_last_record_before_reserved_zeros_is_a_torn_tail() {
        let dir = tmp("torn-zeros");
        let (seg, records) = killed_log(&dir, &["a", "b", "c"]);
        let mut bytes = fs::read(&seg).unwrap();
        // The last record's value byte, with nothing but zeros after it.
        bytes[records.len() - 1] ^= 0x40;
        fs::write(&seg, &bytes).unwrap();
        assert_eq!(keys(&replay(&dir).unwrap()), ["a", "b"]);
        let _ = fs::remove_dir_all(&dir);
        // The same damage with a record after it is corruption, not a torn tail.
        let dir = tmp("mid-zeros");
        let (seg, records) = killed_log(&dir, &["a", "b", "c"]);
        let mut bytes = fs::read(&seg).unwrap();
        let first = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as usize;
        bytes[HEADER + first - 1] ^= 0x40;
        fs::write(&seg, &bytes).unwrap();
        let e = replay(&dir).unwrap_err();
        assert!(e.contains("corrupted operation log"), "{e}");
        assert!(records.len() > HEADER + first);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn torn_tail_is_cut_and_mid_log_corruption_refused() {
        let dir = tmp("b");
        let log = OpLog::open(&dir, FsyncPolicy::No, 0, &mut |_| Ok(())).unwrap();
        for k in ["a", "b", "c"] {
            log.append(&mut rec(k)).unwrap();
        }
        drop(log);
        let seg = list_segments(&dir).unwrap()[0].1.clone();
        let bytes = fs::read(&seg).unwrap();
        fs::write(&seg, &bytes[..bytes.len() - 3]).unwrap();
        assert_eq!(replay(&dir).unwrap().len(), 2);
        // The cut is permanent and appends continue after the last valid record.
        let log = OpLog::open(&dir, FsyncPolicy::No, 0, &mut |_| Ok(())).unwrap();
        assert_eq!(log.append(&mut rec("z")).unwrap(), 3);
        drop(log);
        let mut bytes = fs::read(&seg).unwrap();
        bytes[HEADER + 3] ^= 0x40;
        fs::write(&seg, &bytes).unwrap();
        let e = replay(&dir).unwrap_err();
        assert!(
            e.contains("corrupted operation log") && e.contains(".oplog"),
            "{e}"
        );
        let _ = fs::remove_dir_all(&dir);
    }
}
