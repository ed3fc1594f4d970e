//! What TCP and WebSocket sessions share: the socket as an outbox [`Sink`] (non-blocking sends,
//! the flusher when full) and the input buffer with its idle rule. Input starts small and grows
//! with what the client sends; a session that sends nothing for [`IDLE_AFTER`] gives back its
//! buffer and the stack pages its last command touched, then blocks until the client speaks,
//! so ten thousand idle sessions cost little more than their threads' first pages.

use std::io::{self, IoSlice, Read};
use std::net::{Shutdown, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use super::flusher::Flusher;
use super::spin::{self, Spin};
use crate::db::outbox::{Outbox, Sink};
use crate::os::{self, Trimmer};
use crate::packed::Shared;
use crate::protocol::Framing;

/// A session that receives nothing for this long is idle: it gives its memory back.
pub const IDLE_AFTER: Duration = Duration::from_secs(2);

/// The smallest read buffer (allocated when the client first sends something).
const FIRST_BUFFER: usize = 2048;
/// Buffers grow (doubling) up to this size while a client streams; past it they are freed once
/// empty, not kept for the next command.
const KEEP_BUFFER: usize = 64 * 1024;
/// A read is attempted only with at least this much room (else the buffer grows).
const MIN_ROOM: usize = 1024;

/// A client socket as the destination of an outbox.
pub struct SocketSink {
    /// The socket's descriptor (the outbox writes to it directly, see [`Sink::fd`]).
    fd: std::os::fd::RawFd,
    stream: Arc<TcpStream>,
    framing: Framing,
    flusher: Arc<Flusher>,
}

impl SocketSink {
    /// A sink writing `framing`-framed messages to `stream`.
    pub fn new(stream: &Arc<TcpStream>, framing: Framing, flusher: &Arc<Flusher>) -> SocketSink {
        SocketSink {
            fd: stream.as_raw_fd(),
            stream: Arc::clone(stream),
            framing,
            flusher: Arc::clone(flusher),
        }
    }
}

impl Sink for SocketSink {
    fn framing(&self) -> Framing {
        self.framing
    }

    fn try_send(&self, parts: &[IoSlice<'_>]) -> io::Result<usize> {
        os::send_now(self.fd, parts)
    }

    fn stalled(&self, outbox: &Shared<Outbox>) {
        self.flusher.add(outbox, self.fd);
    }

    fn close(&self) {
        let _ = self.stream.shutdown(Shutdown::Both);
    }

    fn fd(&self) -> Option<std::os::fd::RawFd> {
        Some(self.fd)
    }
}

/// A session's socket and the bytes read from it but not used yet.
pub struct Conn {
    /// The socket (shared with the outbox's sink).
    pub stream: Arc<TcpStream>,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// A read timeout means the session is idle (false: it is an error, e.g. in a handshake).
    pub idles: bool,
    trimmer: Trimmer,
    spin: Spin,
}

impl Conn {
    /// Wraps an accepted socket: no Nagle delay, and reads that time out into the idle state
    /// (which asks `trimmer` to give freed memory back); between commands the socket is polled
    /// for up to `spin` before the thread blocks ([`Spin`]).
    pub fn new(stream: TcpStream, trimmer: Trimmer, spin: Duration) -> Conn {
        let _ = stream.set_nodelay(true);
        let _ = stream.set_read_timeout(Some(IDLE_AFTER));
        Conn {
            stream: Arc::new(stream),
            buf: Vec::new(),
            start: 0,
            end: 0,
            idles: true,
            trimmer,
            spin: Spin::new(spin),
        }
    }

    /// Bytes received and not consumed.
    pub fn data(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    /// The same bytes, writable (WebSocket payloads are unmasked in place).
    pub fn data_mut(&mut self) -> &mut [u8] {
        &mut self.buf[self.start..self.end]
    }

    /// Marks the first `n` bytes of [`Conn::data`] as used.
    pub fn consume(&mut self, n: usize) {
        self.start = (self.start + n).min(self.end);
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
            if self.buf.len() > KEEP_BUFFER {
                self.buf = Vec::new();
            }
        }
    }

    /// Takes every unconsumed byte (the connection is handed to something else, which waits
    /// on the socket its own way: the session stops counting as working, see [`Spin`]).
    pub fn take_rest(&mut self) -> Vec<u8> {
        self.spin.hand_over();
        let rest = self.data().to_vec();
        self.consume(rest.len());
        rest
    }

    /// Reads more bytes until at least `need` are buffered (or at least one more, if `need` is
    /// already there). When nothing comes for [`IDLE_AFTER`] the session goes idle first. False
    /// at end of stream.
    pub fn fill(&mut self, need: usize) -> io::Result<bool> {
        let need = need.max(self.end - self.start + 1);
        while self.end - self.start < need {
            self.make_room(need);
            let fd = self.stream.as_raw_fd();
            let n = match self
                .spin
                .wait(fd, &mut self.buf[self.end..], |b| crate::os::recv(fd, b))
            {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e)
                    if self.idles
                        && matches!(
                            e.kind(),
                            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                        ) =>
                {
                    match self.idle()? {
                        Some(first) => first,
                        None => return Ok(false),
                    }
                }
                Err(e) => return Err(e),
            };
            if n == 0 {
                return Ok(false);
            }
            self.end += n;
            if self.end == self.buf.len() && self.buf.len() < KEEP_BUFFER {
                // The client sends faster than this buffer takes: read more at a time.
                let grown = (self.buf.len() * 2).min(KEEP_BUFFER);
                self.buf.resize(grown, 0);
            }
        }
        Ok(true)
    }

    /// Nothing came for [`IDLE_AFTER`]: gives back the buffer (when empty), the stack pages the
    /// last command touched and, soon, freed heap pages; then blocks until the client sends.
    /// Returns how many bytes arrived (placed at the end of the buffer), `None` at end of stream.
    #[inline(never)]
    fn idle(&mut self) -> io::Result<Option<usize>> {
        let empty = self.start == self.end;
        if empty {
            self.buf = Vec::new();
            self.start = 0;
            self.end = 0;
        }
        os::release_idle_stack();
        self.trimmer.request();
        self.stream.set_read_timeout(None)?;
        let mut first = [0u8; 64];
        let n = spin::blocked(|| loop {
            match (&*self.stream).read(&mut first) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => break other,
            }
        })?;
        self.stream.set_read_timeout(Some(IDLE_AFTER))?;
        if n == 0 {
            return Ok(None);
        }
        self.make_room(n);
        self.buf[self.end..self.end + n].copy_from_slice(&first[..n]);
        Ok(Some(n))
    }

    /// Makes room for `need` buffered bytes and at least [`MIN_ROOM`] free after them.
    fn make_room(&mut self, need: usize) {
        if self.start > 0
            && (self.buf.len() - self.end < MIN_ROOM || self.start + need > self.buf.len())
        {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        let wanted = (self.start + need).max(self.end + MIN_ROOM);
        if self.buf.len() < wanted {
            let grown = (self.buf.len() * 2).max(FIRST_BUFFER).max(wanted);
            self.buf.resize(grown, 0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::net::TcpListener;

    #[test]
    fn buffer_grows_for_large_input_and_is_freed_when_idle() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        let mut conn = Conn::new(server, Trimmer::start().unwrap(), Duration::ZERO);
        let big = vec![b'x'; 100_000];
        client.write_all(&big).unwrap();
        assert!(conn.fill(big.len()).unwrap());
        assert_eq!(conn.data().len(), big.len());
        conn.consume(big.len());
        assert_eq!(conn.buf.capacity(), 0, "large buffers are not kept");
        client.write_all(b"ping\n").unwrap();
        assert!(conn.fill(5).unwrap());
        assert_eq!(conn.data(), b"ping\n");
        drop(client);
        conn.consume(5);
        assert!(!conn.fill(1).unwrap(), "end of stream");
    }

    #[test]
    fn a_full_socket_resumes_when_its_client_reads_and_is_cut_off_when_it_does_not() {
        let flusher = Flusher::start(Duration::from_millis(500)).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let outbox = || {
            let client = TcpStream::connect(addr).unwrap();
            let (server, _) = listener.accept().unwrap();
            let sink = SocketSink::new(&Arc::new(server), Framing::Lines, &flusher);
            (client, Outbox::new(Box::new(sink), 1, 1 << 30))
        };
        let (mut reading, reading_outbox) = outbox();
        let (silent, silent_outbox) = outbox();
        // 16 MiB each, far more than the sockets' buffers hold.
        let mut line = vec![b'x'; 1023];
        line.push(b'\n');
        let lines = 16 * 1024;
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            reading.read_to_end(&mut got).unwrap();
            got
        });
        for _ in 0..lines {
            assert!(reading_outbox.queue(line.clone(), 0));
            assert!(silent_outbox.queue(line.clone(), 0));
        }
        // The silent client is cut off once it has read nothing for the write timeout.
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !silent_outbox.is_closed() {
            assert!(std::time::Instant::now() < deadline, "never cut off");
            std::thread::sleep(Duration::from_millis(10));
        }
        // The reading one got every line, in order, once the flusher resumed it.
        assert!(reading_outbox.drain(Duration::from_secs(20)));
        reading_outbox.close();
        let got = reader.join().unwrap();
        assert_eq!(got.len(), lines * line.len());
        assert!(got.chunks(line.len()).all(|c| c == line.as_slice()));
        drop(silent);
    }
}
