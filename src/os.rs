//! The operating-system calls std does not offer, in one place: the descriptor limit, a deep
//! accept backlog, sends that never block, a TCP user timeout, `poll`, an eventfd wake-up, and giving the memory of
//! idle threads and departed sessions back to the kernel. Linux only, like the rest of the server.

use std::io::{self, IoSlice};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// Takes an exclusive advisory lock on `file` without waiting; false when another open file
/// (another process) holds it. The kernel drops it when the process ends, even by kill -9.
pub fn try_lock_exclusive(file: &std::fs::File) -> io::Result<bool> {
    // SAFETY: flock only reads its integer arguments; the descriptor is open for the call.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(e)
    }
}

/// Raises the soft limit on open descriptors to the hard limit; returns the limit now in force.
/// Every session holds one descriptor, so the default soft limit (often 1024) would cap a node
/// far below what it can hold.
pub fn raise_fd_limit() -> io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed by pointer.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return Err(io::Error::last_os_error());
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) != 0 {
                return Err(io::Error::last_os_error());
            }
            lim.rlim_cur = lim.rlim_max;
        }
    }
    Ok(lim.rlim_cur)
}

fn rlimit_cur(resource: libc::__rlimit_resource_t) -> Option<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct passed by pointer.
    let ok = unsafe { libc::getrlimit(resource, &mut lim) } == 0;
    (ok && lim.rlim_cur != libc::RLIM_INFINITY).then_some(lim.rlim_cur)
}

fn proc_number(path: &str) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Bytes of physical memory (`MemTotal`).
fn mem_total() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
    Some(line.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024)
}

/// Descriptors, threads and memory kept for everything that is not a client session: log
/// segments, snapshots, listeners, cluster links, HTTP requests.
const RESERVED: u64 = 256;

/// Memory a busy session may pin (stack pages touched by a command, buffers grown by a large
/// frame) before it goes idle and gives them back; sizes the memory bound of the default limit.
const BUSY_SESSION_BYTES: u64 = 512 * 1024;

/// The default connection ceiling and how it was derived: one descriptor and one thread per
/// session, so the smallest of the descriptor limit, the thread limits (`threads-max`,
/// `RLIMIT_NPROC`, and `vm.max_map_count / 2`, since each thread stack is two mappings) and
/// physical memory / 512 KiB, each less a reserve of 256 for the node's own use.
pub fn default_max_connections() -> (usize, String) {
    let fds = rlimit_cur(libc::RLIMIT_NOFILE).unwrap_or(1024);
    let mut bounds = vec![("open files", fds)];
    if let Some(t) = proc_number("/proc/sys/kernel/threads-max") {
        bounds.push(("threads-max", t));
    }
    if let Some(n) = rlimit_cur(libc::RLIMIT_NPROC) {
        bounds.push(("RLIMIT_NPROC", n));
    }
    if let Some(m) = proc_number("/proc/sys/vm/max_map_count") {
        bounds.push(("vm.max_map_count/2", m / 2));
    }
    if let Some(mem) = mem_total() {
        bounds.push(("memory/512KiB", mem / BUSY_SESSION_BYTES));
    }
    let (name, value) = bounds
        .iter()
        .min_by_key(|(_, v)| *v)
        .copied()
        .unwrap_or(("open files", 1024));
    let max = value.saturating_sub(RESERVED).max(16);
    let why = bounds
        .iter()
        .map(|(n, v)| format!("{n}={v}"))
        .collect::<Vec<_>>()
        .join(", ");
    (
        usize::try_from(max).unwrap_or(usize::MAX),
        format!("{name} less {RESERVED} reserved ({why})"),
    )
}

/// Makes the kernel abort `stream` when data it sent stays unacknowledged for `timeout`
/// (`TCP_USER_TIMEOUT`): a link that lost one direction then fails the stream instead of
/// looking alive because the other direction still delivers.
pub fn set_user_timeout(stream: &TcpStream, timeout: std::time::Duration) -> io::Result<()> {
    let ms = libc::c_uint::try_from(timeout.as_millis()).unwrap_or(libc::c_uint::MAX);
    // SAFETY: a valid socket, and a pointer to a c_uint of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_USER_TIMEOUT,
            (&ms as *const libc::c_uint).cast(),
            std::mem::size_of::<libc::c_uint>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Binds a TCP listener whose accept queue holds `backlog` pending connections (the kernel caps
/// it at `net.core.somaxconn`), so a burst of thousands of connects is queued, not reset.
pub fn listen(addr: &str, backlog: i32) -> io::Result<TcpListener> {
    let listener = TcpListener::bind(addr)?;
    // SAFETY: listen() on a socket we own; Linux accepts a second listen() to resize the queue.
    if unsafe { libc::listen(listener.as_raw_fd(), backlog) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(listener)
}

/// Sends as much of `parts` as the socket takes right now, never blocking and never raising
/// SIGPIPE. `Ok(0)` when the send buffer is full.
pub fn send_now(fd: RawFd, parts: &[IoSlice<'_>]) -> io::Result<usize> {
    if parts.is_empty() {
        return Ok(0);
    }
    if let [one] = parts {
        return send_one(fd, one);
    }
    let count = parts.len().min(1024);
    // SAFETY: msghdr is plain data; IoSlice is ABI-compatible with iovec (std guarantees it),
    // and the kernel only reads `count` entries of `parts`, which outlive the call.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = parts.as_ptr() as *mut libc::iovec;
        msg.msg_iovlen = count as _;
        loop {
            let n = libc::sendmsg(fd, &msg, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL);
            if n >= 0 {
                return Ok(n as usize);
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock => return Ok(0),
                _ => return Err(e),
            }
        }
    }
}

/// The CPU this thread runs on now (0 if the kernel will not say): for per-CPU counters,
/// which only need it to be usually right.
pub fn current_cpu() -> usize {
    // SAFETY: no arguments; returns a CPU number or -1.
    usize::try_from(unsafe { libc::sched_getcpu() }).unwrap_or(0)
}

/// The number of CPUs configured (at least 1): every [`current_cpu`] is below it.
pub fn configured_cpus() -> usize {
    // SAFETY: sysconf reads a system constant.
    usize::try_from(unsafe { libc::sysconf(libc::_SC_NPROCESSORS_CONF) })
        .unwrap_or(1)
        .max(1)
}

/// `recv` as the bare system call. glibc's `recv` and `send` mark the thread cancellable around
/// each call (two atomic operations, 1% of the server under unpipelined load); no thread here
/// is ever cancelled. Returns what the kernel returned (-1 with `errno` set on failure).
fn sys_recv(fd: RawFd, buf: &mut [u8], flags: libc::c_int) -> isize {
    // SAFETY: recvfrom writes at most `buf.len()` bytes into a live, writable slice; the two
    // null arguments ask for no source address. Every argument is passed at full register
    // width, as `syscall` reads them.
    let n = unsafe {
        libc::syscall(
            libc::SYS_recvfrom,
            libc::c_long::from(fd),
            buf.as_mut_ptr(),
            buf.len(),
            libc::c_long::from(flags),
            std::ptr::null_mut::<libc::sockaddr>(),
            std::ptr::null_mut::<libc::socklen_t>(),
        )
    };
    n as isize
}

/// `send` as the bare system call (see [`sys_recv`]).
fn sys_send(fd: RawFd, buf: &[u8], flags: libc::c_int) -> isize {
    // SAFETY: sendto reads `buf.len()` bytes from a live slice; no destination address.
    let n = unsafe {
        libc::syscall(
            libc::SYS_sendto,
            libc::c_long::from(fd),
            buf.as_ptr(),
            buf.len(),
            libc::c_long::from(flags),
            std::ptr::null::<libc::sockaddr>(),
            0 as libc::c_long,
        )
    };
    n as isize
}

/// A blocking read of the socket into `buf` (up to its receive timeout, if one is set: then
/// `WouldBlock`); 0 at the end of stream.
pub fn recv(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        let n = sys_recv(fd, buf, 0);
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Reads what the socket holds right now into `buf`, never blocking: `Some(0)` at the end of
/// stream, `None` when nothing is there yet.
pub fn recv_now(fd: RawFd, buf: &mut [u8]) -> io::Result<Option<usize>> {
    loop {
        let n = sys_recv(fd, buf, libc::MSG_DONTWAIT);
        if n >= 0 {
            return Ok(Some(n as usize));
        }
        let e = io::Error::last_os_error();
        match e.kind() {
            io::ErrorKind::Interrupted => continue,
            io::ErrorKind::WouldBlock => return Ok(None),
            _ => return Err(e),
        }
    }
}

/// [`send_now`] of one buffer: `send` is a little cheaper than `sendmsg`.
fn send_one(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    loop {
        let n = sys_send(fd, buf, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL);
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        match e.kind() {
            io::ErrorKind::Interrupted => continue,
            io::ErrorKind::WouldBlock => return Ok(0),
            _ => return Err(e),
        }
    }
}

/// One descriptor to wait on with [`poll`], and what happened to it.
pub type PollFd = libc::pollfd;

/// A [`PollFd`] waiting for `fd` to become writable (`out`) or readable.
pub fn poll_fd(fd: RawFd, out: bool) -> PollFd {
    libc::pollfd {
        fd,
        events: if out { libc::POLLOUT } else { libc::POLLIN },
        revents: 0,
    }
}

/// True when `p` is ready or its socket failed (either way its owner should look at it).
pub fn poll_ready(p: &PollFd) -> bool {
    p.revents != 0
}

/// Waits up to `timeout_ms` for any of `fds` (-1: forever); returns how many are ready.
pub fn poll(fds: &mut [PollFd], timeout_ms: i32) -> io::Result<usize> {
    loop {
        // SAFETY: the kernel reads and writes `fds.len()` pollfd entries of a live slice.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// A counter another thread bumps to wake a thread sleeping in [`poll`] on it.
#[derive(Debug)]
pub struct EventFd(OwnedFd);

impl EventFd {
    /// A new non-blocking eventfd.
    pub fn new() -> io::Result<EventFd> {
        // SAFETY: eventfd returns a new descriptor we then own (or -1).
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor nobody else owns.
        Ok(EventFd(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Wakes the waiter.
    pub fn wake(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to our own descriptor.
        unsafe { libc::write(self.0.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }

    /// Clears pending wake-ups (after the waiter woke).
    pub fn clear(&self) {
        let mut n: u64 = 0;
        // SAFETY: reads at most 8 bytes into a live u64 from our own non-blocking descriptor.
        unsafe { libc::read(self.0.as_raw_fd(), (&mut n as *mut u64).cast(), 8) };
    }

    /// The descriptor, to [`poll`] for readability.
    pub fn fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

const PAGE: usize = 4096;

thread_local! {
    /// Lowest usable address of this thread's stack (0: unknown, e.g. the main thread).
    static STACK_LOW: usize = stack_low();
}

fn stack_low() -> usize {
    // SAFETY: pthread_getattr_np fills an attr object that we destroy after reading the
    // stack address from it; no pointer escapes.
    unsafe {
        let mut attr: libc::pthread_attr_t = std::mem::zeroed();
        if libc::pthread_getattr_np(libc::pthread_self(), &mut attr) != 0 {
            return 0;
        }
        let mut addr: *mut libc::c_void = std::ptr::null_mut();
        let mut size: libc::size_t = 0;
        let ok = libc::pthread_attr_getstack(&attr, &mut addr, &mut size) == 0;
        libc::pthread_attr_destroy(&mut attr);
        if ok {
            addr as usize
        } else {
            0
        }
    }
}

/// Gives back the stack pages this thread touched below its current frame (a command that ran
/// deep left them resident). Called by a session going idle, so ten thousand idle sessions cost
/// only the pages their blocking read needs.
#[inline(never)]
pub fn release_idle_stack() {
    let marker = 0u8;
    let sp = std::hint::black_box(&marker) as *const u8 as usize;
    let low = STACK_LOW.with(|l| *l);
    if low == 0 || sp <= low {
        return;
    }
    // Below the live frames only the red zone and madvise's own call are used.
    let start = (low + PAGE - 1) & !(PAGE - 1);
    let end = sp.saturating_sub(512) & !(PAGE - 1);
    if end > start {
        // SAFETY: [start, end) lies in this thread's own stack below the live frames, so no
        // live data is there; MADV_DONTNEED makes those pages read back as zeros if reused.
        unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED) };
    }
}

/// Tunes the allocator for thousands of threads that come and go: one arena per core instead
/// of eight (each arena keeps pages of its own, and a burst of sessions would leave them spread
/// over sixteen: with two per core 15-17% of a 10,000-session burst stayed resident, with one
/// about 2%), and fixed 128 KiB trim and mmap thresholds (glibc otherwise raises them for good
/// after the first large block is freed, then keeps up to twice that resident per arena). Large
/// blocks therefore come from mmap; the paths that used to free one per operation (the log's
/// write buffer) reuse theirs instead.
pub fn tune_allocator() {
    const MMAP_THRESHOLD: libc::c_int = 128 << 10;
    const TRIM_THRESHOLD: libc::c_int = 128 << 10;
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let arenas = libc::c_int::try_from(cores.max(2)).unwrap_or(2);
    // SAFETY: mallopt only changes allocator parameters; called before threads start.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
        libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD);
        libc::mallopt(libc::M_ARENA_MAX, arenas);
    }
}

/// Returns free heap pages of every allocator arena to the kernel (after a burst of sessions
/// left, their buffers are free but their pages would stay resident).
pub fn release_free_heap() {
    // SAFETY: malloc_trim takes no pointers and is safe to call from any thread.
    unsafe { libc::malloc_trim(0) };
}

/// Asks for freed heap pages to be returned to the kernel soon after sessions leave or go idle.
/// Requests are gathered: the trim runs once they stop for a moment (or at the latest a couple
/// of seconds after the first), on a thread of its own.
#[derive(Debug, Clone)]
pub struct Trimmer(std::sync::mpsc::SyncSender<()>);

/// Quiet time after the last request before the heap is trimmed.
const TRIM_QUIET: std::time::Duration = std::time::Duration::from_millis(500);
/// After a trim, how long without requests before the follow-up trim.
const TRIM_SETTLE: std::time::Duration = std::time::Duration::from_secs(1);
/// Longest a request waits while others keep coming.
const TRIM_AT_MOST: std::time::Duration = std::time::Duration::from_secs(2);

impl Trimmer {
    /// Starts the trimming thread.
    pub fn start() -> io::Result<Trimmer> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<()>(1);
        spawn("heap-trim".into(), SMALL_STACK, move || {
            use std::sync::mpsc::RecvTimeoutError;
            let mut requested = rx.recv().is_ok();
            while requested {
                let first = std::time::Instant::now();
                loop {
                    match rx.recv_timeout(TRIM_QUIET) {
                        Ok(()) if first.elapsed() < TRIM_AT_MOST => continue,
                        Ok(()) | Err(RecvTimeoutError::Timeout) => break,
                        Err(RecvTimeoutError::Disconnected) => return,
                    }
                }
                let before = resident_kb_and_threads().map_or(0, |r| r.0);
                let started = std::time::Instant::now();
                release_free_heap();
                let took = started.elapsed();
                let after = resident_kb_and_threads().map_or(0, |r| r.0);
                log::debug!("heap trimmed in {took:?}: resident {before} -> {after} KiB");
                // Threads that were still exiting free their caches after the last request:
                // once things have settled, trim again (a new request starts a new round).
                requested = match rx.recv_timeout(TRIM_SETTLE) {
                    Ok(()) => true,
                    Err(RecvTimeoutError::Timeout) => {
                        release_free_heap();
                        rx.recv().is_ok()
                    }
                    Err(RecvTimeoutError::Disconnected) => false,
                };
            }
        })?;
        Ok(Trimmer(tx))
    }

    /// Asks for a trim (cheap; repeated requests fold into one).
    pub fn request(&self) {
        let _ = self.0.try_send(());
    }
}

/// Bytes the allocator has handed out and not had back (all arenas).
pub fn heap_in_use() -> u64 {
    // SAFETY: mallinfo2 only reads allocator statistics.
    let info = unsafe { libc::mallinfo2() };
    (info.uordblks + info.hblkhd) as u64
}

/// Resident memory of this process in KiB and its thread count (`/proc/self/status`).
pub fn resident_kb_and_threads() -> Option<(u64, u64)> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let field = |name: &str| -> Option<u64> {
        let line = status.lines().find(|l| l.starts_with(name))?;
        line.split_whitespace().nth(1)?.parse().ok()
    };
    Some((field("VmRSS:")?, field("Threads:")?))
}

/// Stack size of session and helper threads: they need little, and thousands may be running.
pub const SMALL_STACK: usize = 256 * 1024;

/// Spawns a named helper thread with [`SMALL_STACK`]; logs instead of panicking when the system
/// refuses. True if it started.
pub fn spawn_small(name: String, f: impl FnOnce() + Send + 'static) -> bool {
    match spawn(name, SMALL_STACK, f) {
        Ok(_) => true,
        Err(e) => {
            log::error!("cannot start a thread: {e}");
            false
        }
    }
}

/// Spawns a named thread with a stack of `stack` bytes.
pub fn spawn(
    name: String,
    stack: usize,
    f: impl FnOnce() + Send + 'static,
) -> io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name(name)
        .stack_size(stack)
        .spawn(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn released_stack_pages_read_back_as_zero_and_the_thread_goes_on() {
        let handle = spawn("stack-test".into(), 256 * 1024, || {
            #[inline(never)]
            fn deep(n: usize) -> u64 {
                let mut buf = [n as u8; 8192];
                std::hint::black_box(&mut buf);
                if n == 0 {
                    buf[100] as u64
                } else {
                    deep(n - 1) + buf[0] as u64
                }
            }
            let a = deep(8);
            release_idle_stack();
            let b = deep(8);
            assert_eq!(a, b);
        })
        .unwrap();
        handle.join().unwrap();
    }

    #[test]
    fn default_ceiling_is_positive_and_explained() {
        let (max, why) = default_max_connections();
        assert!(max >= 16);
        assert!(why.contains("open files="), "{why}");
    }

    #[test]
    fn eventfd_wakes_poll() {
        let e = EventFd::new().unwrap();
        let mut fds = [poll_fd(e.fd(), false)];
        assert_eq!(poll(&mut fds, 0).unwrap(), 0);
        e.wake();
        assert_eq!(poll(&mut fds, 1000).unwrap(), 1);
        e.clear();
        let mut fds = [poll_fd(e.fd(), false)];
        assert_eq!(poll(&mut fds, 0).unwrap(), 0);
    }
}
