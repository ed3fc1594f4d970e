//! Benchmark connections: our protocol over TCP or WebSocket, and Redis's RESP over TCP.
//! Each sends a pipelined batch and reads exactly its replies.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::TcpStream;

/// A key-value operation driven by the load generator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvOp {
    /// `set key value`.
    Set,
    /// `get key`.
    Get,
    /// `remove key` (Redis: `DEL`).
    Remove,
}

/// One benchmark connection.
pub trait Conn: Send {
    /// Sends one command per key (all at once), then reads every reply.
    fn batch(&mut self, op: KvOp, keys: &[String], value: &str) -> io::Result<()>;
}

fn is_envelope(msg: &[u8]) -> bool {
    msg == b"ok \n" || (msg.starts_with(b"error ") && msg.ends_with(b" \n"))
}

fn protocol_error(msg: &str) -> io::Error {
    io::Error::other(msg.to_string())
}

/// Appends the command line for `op` on `key` (no newline) to `out`.
fn command(op: KvOp, key: &str, value: &str, out: &mut Vec<u8>) {
    let verb: &[u8] = match op {
        KvOp::Set => b"set ",
        KvOp::Get => b"get ",
        KvOp::Remove => b"remove ",
    };
    out.extend_from_slice(verb);
    out.extend_from_slice(key.as_bytes());
    if op == KvOp::Set {
        out.push(b' ');
        out.extend_from_slice(value.as_bytes());
    }
}

/// Our protocol over TCP lines.
pub struct NunTcp {
    stream: TcpStream,
    reader: BufReader<TcpStream>,
    out: Vec<u8>,
    line: Vec<u8>,
}

impl NunTcp {
    /// Connects and selects `db`.
    pub fn connect(addr: &str, db: &str, token: &str) -> io::Result<NunTcp> {
        let stream = TcpStream::connect(addr)?;
        stream.set_nodelay(true)?;
        let mut c = NunTcp {
            reader: BufReader::with_capacity(256 * 1024, stream.try_clone()?),
            stream,
            out: Vec::new(),
            line: Vec::new(),
        };
        c.stream
            .write_all(format!("use-db {db} {token}\n").as_bytes())?;
        c.read_envelopes(1)?;
        Ok(c)
    }

    fn read_envelopes(&mut self, n: usize) -> io::Result<()> {
        let mut seen = 0;
        while seen < n {
            self.line.clear();
            if self.reader.read_until(b'\n', &mut self.line)? == 0 {
                return Err(protocol_error("server closed the connection"));
            }
            if is_envelope(&self.line) {
                if self.line.starts_with(b"error") {
                    return Err(protocol_error(&String::from_utf8_lossy(&self.line)));
                }
                seen += 1;
            }
        }
        Ok(())
    }
}

impl Conn for NunTcp {
    fn batch(&mut self, op: KvOp, keys: &[String], value: &str) -> io::Result<()> {
        self.out.clear();
        for k in keys {
            command(op, k, value, &mut self.out);
            self.out.push(b'\n');
        }
        self.stream.write_all(&self.out)?;
        self.read_envelopes(keys.len())
    }
}

/// Our protocol over WebSocket: one command per frame, as the JS driver sends them. Frames are
/// built and parsed here (masked with a zero key, which the protocol allows), so the client
/// costs about what the TCP and Redis clients cost and the rows measure the server.
pub struct NunWs {
    stream: TcpStream,
    out: Vec<u8>,
    /// One command being framed.
    line: Vec<u8>,
    /// Received bytes: `buf[start..end]` is not parsed yet (allocated and zeroed once).
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

/// Appends a masked client text frame (mask 0, so the payload is sent as is).
pub fn client_frame(text: &str, out: &mut Vec<u8>) {
    client_frame_bytes(text.as_bytes(), out);
}

/// [`client_frame`] of a payload already in bytes.
fn client_frame_bytes(text: &[u8], out: &mut Vec<u8>) {
    let len = text.len();
    out.push(0x81);
    if len < 126 {
        out.push(0x80 | len as u8);
    } else if len <= 0xFFFF {
        out.push(0x80 | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    out.extend_from_slice(&[0, 0, 0, 0]);
    out.extend_from_slice(text);
}

/// The payload of the complete server frame at the start of `buf` and the bytes the frame
/// takes; `None` until the whole frame is there.
pub fn server_frame(buf: &[u8]) -> Option<(&[u8], usize)> {
    if buf.len() < 2 {
        return None;
    }
    let (len, header): (usize, usize) = match buf[1] & 0x7F {
        126 if buf.len() >= 4 => (u16::from_be_bytes([buf[2], buf[3]]) as usize, 4),
        127 if buf.len() >= 10 => {
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[2..10]);
            (u64::from_be_bytes(b) as usize, 10)
        }
        126 | 127 => return None,
        n => (n as usize, 2),
    };
    let end = header.checked_add(len)?;
    (buf.len() >= end).then(|| (&buf[header..end], end))
}

/// Payloads of the complete server frames at the start of `buf`, and the bytes they used.
pub fn server_frames(buf: &[u8]) -> (Vec<&[u8]>, usize) {
    let mut at = 0;
    let mut out = Vec::new();
    while let Some((payload, used)) = server_frame(&buf[at..]) {
        out.push(payload);
        at += used;
    }
    (out, at)
}

impl NunWs {
    /// Connects to `ws://addr` and selects `db`.
    pub fn connect(addr: &str, db: &str, token: &str) -> io::Result<NunWs> {
        let mut stream = TcpStream::connect(addr)?;
        stream.set_nodelay(true)?;
        stream.write_all(format!("GET / HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n").as_bytes())?;
        let mut c = NunWs {
            stream,
            out: Vec::new(),
            line: Vec::new(),
            buf: vec![0; 64 * 1024],
            start: 0,
            end: 0,
        };
        let end = loop {
            if let Some(i) = c.data().windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            c.fill()?;
        };
        if !c.data().starts_with(b"HTTP/1.1 101") {
            return Err(protocol_error(&String::from_utf8_lossy(&c.data()[..end])));
        }
        c.start += end;
        c.out.clear();
        client_frame(&format!("use-db {db} {token}"), &mut c.out);
        c.stream.write_all(&c.out)?;
        c.read_envelopes(1)?;
        Ok(c)
    }

    fn data(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    /// Reads more bytes after the unparsed ones (moved to the front first; the buffer doubles
    /// only for a frame larger than it).
    fn fill(&mut self) -> io::Result<()> {
        self.buf.copy_within(self.start..self.end, 0);
        self.end -= self.start;
        self.start = 0;
        if self.end == self.buf.len() {
            self.buf.resize(self.buf.len() * 2, 0);
        }
        let n = self.stream.read(&mut self.buf[self.end..])?;
        if n == 0 {
            return Err(protocol_error("server closed the connection"));
        }
        self.end += n;
        Ok(())
    }

    fn read_envelopes(&mut self, n: usize) -> io::Result<()> {
        let mut seen = 0;
        while seen < n {
            match server_frame(self.data()) {
                Some((frame, used)) => {
                    if is_envelope(frame) {
                        if frame.starts_with(b"error") {
                            return Err(protocol_error(&String::from_utf8_lossy(frame)));
                        }
                        seen += 1;
                    }
                    self.start += used;
                }
                None => self.fill()?,
            }
        }
        Ok(())
    }
}

impl Conn for NunWs {
    fn batch(&mut self, op: KvOp, keys: &[String], value: &str) -> io::Result<()> {
        self.out.clear();
        for k in keys {
            self.line.clear();
            command(op, k, value, &mut self.line);
            client_frame_bytes(&self.line, &mut self.out);
        }
        self.stream.write_all(&self.out)?;
        self.read_envelopes(keys.len())
    }
}

/// Redis over RESP.
pub struct Redis {
    /// Replicas each SET waits for (`WAIT n 0` after it); 0 sends plain SETs.
    wait_replicas: usize,
    stream: TcpStream,
    reader: BufReader<TcpStream>,
    out: Vec<u8>,
    line: Vec<u8>,
}

/// Encodes a RESP command.
pub fn resp_command(out: &mut Vec<u8>, args: &[&str]) {
    // Written straight into `out` (no string formatted per argument).
    let _ = write!(out, "*{}\r\n", args.len());
    for a in args {
        let _ = write!(out, "${}\r\n", a.len());
        out.extend_from_slice(a.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
}

impl Redis {
    /// Connects to `host:port`.
    pub fn connect(addr: &str) -> io::Result<Redis> {
        Redis::connect_waiting(addr, 0)
    }

    /// Connects to `host:port`; every SET is followed by `WAIT wait_replicas 0`, so a write
    /// counts as done once that many replicas have it (Redis's synchronous replication).
    pub fn connect_waiting(addr: &str, wait_replicas: usize) -> io::Result<Redis> {
        let stream = TcpStream::connect(addr)?;
        stream.set_nodelay(true)?;
        Ok(Redis {
            wait_replicas,
            reader: BufReader::with_capacity(256 * 1024, stream.try_clone()?),
            stream,
            out: Vec::new(),
            line: Vec::new(),
        })
    }

    /// Reads one RESP reply (simple, error, integer, bulk or array), discarding it.
    pub fn read_reply(&mut self) -> io::Result<Vec<Vec<u8>>> {
        self.line.clear();
        if self.reader.read_until(b'\n', &mut self.line)? == 0 {
            return Err(protocol_error("redis closed the connection"));
        }
        let kind = self.line.first().copied().unwrap_or(b'?');
        let rest = String::from_utf8_lossy(&self.line[1..]).trim().to_string();
        match kind {
            b'+' | b':' => Ok(vec![rest.into_bytes()]),
            b'-' => Err(protocol_error(&rest)),
            b'$' => {
                let len: i64 = rest
                    .parse()
                    .map_err(|_| protocol_error("bad bulk length"))?;
                if len < 0 {
                    return Ok(vec![]);
                }
                let mut buf = vec![0u8; len as usize + 2];
                std::io::Read::read_exact(&mut self.reader, &mut buf)?;
                buf.truncate(len as usize);
                Ok(vec![buf])
            }
            b'*' => {
                let n: i64 = rest
                    .parse()
                    .map_err(|_| protocol_error("bad array length"))?;
                let mut items = Vec::new();
                for _ in 0..n.max(0) {
                    items.extend(self.read_reply()?);
                }
                Ok(items)
            }
            _ => Err(protocol_error("unknown RESP reply")),
        }
    }

    /// Reads one RESP reply and drops it where it lies (a load row's replies: no copies).
    fn skip_reply(&mut self) -> io::Result<()> {
        self.line.clear();
        if self.reader.read_until(b'\n', &mut self.line)? == 0 {
            return Err(protocol_error("redis closed the connection"));
        }
        let kind = self.line.first().copied().unwrap_or(b'?');
        let rest = self.line.get(1..).unwrap_or_default().trim_ascii();
        let number = || -> io::Result<i64> {
            std::str::from_utf8(rest)
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| protocol_error("bad RESP length"))
        };
        match kind {
            b'+' | b':' => Ok(()),
            b'-' => Err(protocol_error(&String::from_utf8_lossy(rest))),
            b'$' => {
                let len = number()?;
                if len >= 0 {
                    self.discard(len as usize + 2)?;
                }
                Ok(())
            }
            b'*' => {
                for _ in 0..number()?.max(0) {
                    self.skip_reply()?;
                }
                Ok(())
            }
            _ => Err(protocol_error("unknown RESP reply")),
        }
    }

    /// Drops the next `n` bytes of the stream.
    fn discard(&mut self, mut n: usize) -> io::Result<()> {
        while n > 0 {
            let got = self.reader.fill_buf()?.len();
            if got == 0 {
                return Err(protocol_error("redis closed the connection"));
            }
            let used = got.min(n);
            self.reader.consume(used);
            n -= used;
        }
        Ok(())
    }

    /// A second handle on the socket (to shut it down from another thread).
    pub fn stream_clone(&self) -> io::Result<TcpStream> {
        self.stream.try_clone()
    }

    /// Sends a raw RESP command.
    pub fn send(&mut self, args: &[&str]) -> io::Result<()> {
        self.out.clear();
        resp_command(&mut self.out, args);
        self.stream.write_all(&self.out)
    }
}

impl Conn for Redis {
    fn batch(&mut self, op: KvOp, keys: &[String], value: &str) -> io::Result<()> {
        self.out.clear();
        let wait = self.wait_replicas.to_string();
        let waiting = op == KvOp::Set && self.wait_replicas > 0;
        for k in keys {
            match op {
                KvOp::Set => resp_command(&mut self.out, &["SET", k, value]),
                KvOp::Get => resp_command(&mut self.out, &["GET", k]),
                KvOp::Remove => resp_command(&mut self.out, &["DEL", k]),
            }
            if waiting {
                resp_command(&mut self.out, &["WAIT", &wait, "0"]);
            }
        }
        self.stream.write_all(&self.out)?;
        for _ in keys {
            self.skip_reply()?;
            if waiting {
                self.skip_reply()?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn redis_replies_are_skipped_whole_and_errors_reported() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            s.write_all(b"+OK\r\n$3\r\nabc\r\n$-1\r\n*2\r\n$1\r\na\r\n:5\r\n-ERR no\r\n+PONG\r\n")
                .unwrap();
        });
        let mut redis = Redis::connect(&addr).unwrap();
        for _ in 0..4 {
            redis.skip_reply().unwrap();
        }
        assert_eq!(redis.skip_reply().unwrap_err().to_string(), "ERR no");
        assert_eq!(redis.read_reply().unwrap(), vec![b"PONG".to_vec()]);
        server.join().unwrap();
    }

    #[test]
    fn server_frames_wait_for_whole_frames() {
        let mut buf = Vec::new();
        buf.extend_from_slice(&[0x81, 4]);
        buf.extend_from_slice(b"ok \n");
        buf.extend_from_slice(&[0x81, 126, 0, 200]);
        buf.extend_from_slice(&[b'x'; 200]);
        assert_eq!(server_frame(&buf), Some((&b"ok \n"[..], 6)));
        assert_eq!(
            server_frame(&buf[6..]).map(|(p, n)| (p.len(), n)),
            Some((200, 204))
        );
        assert_eq!(server_frame(&buf[6..buf.len() - 1]), None);
        assert_eq!(server_frame(&buf[..1]), None);
    }
}
