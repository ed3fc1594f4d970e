//! Waiting for a session's next command by polling its socket for a moment before blocking.
//! A thread that blocks in `read` is descheduled, and its core may halt; waking both costs more
//! than a command (on a virtual machine, where a halted core is woken through the host, several
//! times more). A client that sends its next command right after reading a reply (a loop of
//! requests, a writer feeding watchers) is better met by a thread still running.
//!
//! Polling only pays when it finds something, and it takes a core others may need, so a session
//! polls only when all of these hold: polling is on (`--spin-us`), the last wait was shorter
//! than the window (a client that paused longer is not polled for until it is quick again), and
//! no other session is working (under load the cores are busy and nobody needs waking up).

use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::os;

/// CPUs that get a stripe of [`WORKING`] of their own (beyond, they share).
const STRIPES: usize = 64;

/// One CPU's share of the working count, on a cache line of its own. A thread may block on one
/// CPU and wake on another, so a stripe can wrap below zero: only the sum means anything.
#[repr(align(64))]
struct Stripe(AtomicUsize);

/// Sessions not blocked in a read, counted per CPU: every session updates the count around each
/// blocking read, and a single shared cache line moved between cores each time (1.4% of the
/// server under 50 connections, on two cores).
struct Working([Stripe; STRIPES]);

static WORKING: Working = Working([const { Stripe(AtomicUsize::new(0)) }; STRIPES]);

impl Working {
    /// The stripe of the CPU this thread runs on.
    fn here(&self) -> &AtomicUsize {
        &self.0[os::current_cpu() % STRIPES].0
    }

    /// One more session working.
    fn add(&self) {
        self.here().fetch_add(1, Ordering::Relaxed);
    }

    /// One session fewer working.
    fn sub(&self) {
        self.here().fetch_sub(1, Ordering::Relaxed);
    }

    /// Sessions working, summed over the stripes CPUs use.
    fn count(&self) -> usize {
        static USED: OnceLock<usize> = OnceLock::new();
        let used = *USED.get_or_init(|| os::configured_cpus().min(STRIPES));
        self.0[..used]
            .iter()
            .fold(0, |sum, s| sum.wrapping_add(s.0.load(Ordering::Relaxed)))
    }
}

/// True when a session other than the caller is working (not blocked waiting for its client).
fn others_working() -> bool {
    WORKING.count() > 1
}

/// A session's share of [`WORKING`] (counted while it exists, except inside [`blocked`]) and
/// what it knows about its client's pace.
#[derive(Debug)]
pub struct Spin {
    window: Duration,
    /// The last wait for the client was within the window.
    quick: bool,
    /// This session is in [`WORKING`] (until its socket is handed over).
    counted: bool,
}

impl Spin {
    /// A session that polls for up to `window` (zero: never) before blocking.
    pub fn new(window: Duration) -> Spin {
        WORKING.add();
        Spin {
            window,
            quick: false,
            counted: true,
        }
    }

    /// The socket was handed over to something else (a replication stream), which waits on it
    /// its own way: this session no longer counts as working, nor polls.
    pub fn hand_over(&mut self) {
        if std::mem::take(&mut self.counted) {
            WORKING.sub();
        }
        self.window = Duration::ZERO;
    }

    /// Reads what the client sends next into `buf`: polls `fd` first when that is likely to
    /// pay, then calls `block` (a blocking read) as [`blocked`].
    pub fn wait(
        &mut self,
        fd: RawFd,
        buf: &mut [u8],
        block: impl FnOnce(&mut [u8]) -> io::Result<usize>,
    ) -> io::Result<usize> {
        let started = Instant::now();
        if self.quick && !self.window.is_zero() && !others_working() {
            if let Some(got) = poll(fd, buf, started, self.window) {
                return got;
            }
        }
        let got = blocked(|| block(buf));
        self.quick = started.elapsed() <= self.window;
        got
    }
}

/// Runs `f`, a blocking wait for the client, with this session out of the working count.
pub fn blocked<R>(f: impl FnOnce() -> R) -> R {
    WORKING.sub();
    let r = f();
    WORKING.add();
    r
}

impl Drop for Spin {
    fn drop(&mut self) {
        if self.counted {
            WORKING.sub();
        }
    }
}

/// Non-blocking reads of `fd` until something arrives (or the end of stream, or an error), the
/// window since `started` passes, or another session starts working. `None`: nothing came.
fn poll(
    fd: RawFd,
    buf: &mut [u8],
    started: Instant,
    window: Duration,
) -> Option<io::Result<usize>> {
    loop {
        if let Some(got) = os::recv_now(fd, buf).transpose() {
            return Some(got);
        }
        if started.elapsed() >= window || others_working() {
            return None;
        }
        // Anything else runnable on this core (a client's thread woken by the reply or a push
        // just sent) runs first: polling only uses time nobody else wants.
        std::thread::yield_now();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::AsRawFd;

    fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        (client, server)
    }

    #[test]
    fn a_poll_returns_bytes_already_there_the_end_of_stream_or_nothing() {
        let (mut client, server) = pair();
        let mut buf = [0u8; 16];
        let fd = server.as_raw_fd();
        let window = Duration::from_millis(1);
        assert!(poll(fd, &mut buf, Instant::now(), window).is_none());
        client.write_all(b"get k\n").unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let got = loop {
            if let Some(got) = poll(fd, &mut buf, Instant::now(), window) {
                break got.unwrap();
            }
            assert!(Instant::now() < deadline, "the bytes never arrived");
        };
        assert_eq!(&buf[..got], b"get k\n");
        drop(client);
        let end = loop {
            if let Some(got) = poll(fd, &mut buf, Instant::now(), window) {
                break got.unwrap();
            }
            assert!(Instant::now() < deadline, "the end of stream never arrived");
        };
        assert_eq!(end, 0);
    }

    #[test]
    fn a_session_polls_only_after_a_quick_wait_and_reads_the_same_bytes() {
        let (mut client, server) = pair();
        let fd = server.as_raw_fd();
        let mut spin = Spin::new(Duration::from_secs(5));
        let mut buf = [0u8; 16];
        // Nothing known about the client yet: straight to the blocking read.
        client.write_all(b"a\n").unwrap();
        let n = spin.wait(fd, &mut buf, |b| (&server).read(b)).unwrap();
        assert_eq!(&buf[..n], b"a\n");
        assert!(spin.quick);
        // Quick last time: it may poll, and the bytes are the same whichever way they come.
        client.write_all(b"b\n").unwrap();
        let n = spin.wait(fd, &mut buf, |b| (&server).read(b)).unwrap();
        assert_eq!(&buf[..n], b"b\n");
        // A wait longer than the window: no polling next time.
        let mut strict = Spin::new(Duration::from_nanos(1));
        client.write_all(b"c\n").unwrap();
        let n = strict.wait(fd, &mut buf, |b| (&server).read(b)).unwrap();
        assert_eq!(&buf[..n], b"c\n");
        assert!(!strict.quick);
    }

    #[test]
    fn a_handed_over_session_never_polls_and_leaves_the_working_count_once() {
        let (mut client, server) = pair();
        let fd = server.as_raw_fd();
        let mut spin = Spin::new(Duration::from_secs(5));
        spin.quick = true;
        spin.hand_over();
        assert!(!spin.counted);
        spin.hand_over();
        client.write_all(b"x\n").unwrap();
        let mut read_blocking = false;
        let mut buf = [0u8; 4];
        let n = spin
            .wait(fd, &mut buf, |b| {
                read_blocking = true;
                (&server).read(b)
            })
            .unwrap();
        assert!(read_blocking, "a handed-over session must not poll");
        assert_eq!(&buf[..n], b"x\n");
        assert!(!spin.quick);
    }

    #[test]
    fn the_working_count_sums_stripes_a_thread_left_and_came_back_on() {
        let w = Working([const { Stripe(AtomicUsize::new(0)) }; STRIPES]);
        w.add();
        w.add();
        assert_eq!(w.count(), 2);
        w.sub();
        assert_eq!(w.count(), 1);
        // Blocked on the last CPU, woken on the first: that stripe wraps, the sum holds.
        let last = (os::configured_cpus() - 1).min(STRIPES - 1);
        w.0[last].0.fetch_add(1, Ordering::Relaxed);
        w.0[0].0.fetch_sub(3, Ordering::Relaxed);
        w.0[last].0.fetch_add(1, Ordering::Relaxed);
        assert_eq!(w.count(), 0);
        w.sub();
        w.add();
        assert_eq!(w.count(), 0);
    }
}
