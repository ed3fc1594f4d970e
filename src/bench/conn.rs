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

fn command(op: KvOp, key: &str, value: &str) -> String {
    match op {
        KvOp::Set => format!("set {key} {value}"),
        KvOp::Get => format!("get {key}"),
        KvOp::Remove => format!("remove {key}"),
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
            self.out.extend_from_slice(command(op, k, value).as_bytes());
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
    buf: Vec<u8>,
}

/// Appends a masked client text frame (mask 0, so the payload is sent as is).
pub fn client_frame(text: &str, out: &mut Vec<u8>) {
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
    out.extend_from_slice(text.as_bytes());
}

/// Payloads of the complete server frames at the start of `buf`, and the bytes they used.
pub fn server_frames(buf: &[u8]) -> (Vec<&[u8]>, usize) {
    let mut at = 0;
    let mut out = Vec::new();
    loop {
        let rest = &buf[at..];
        if rest.len() < 2 {
            break;
        }
        let (len, header) = match rest[1] & 0x7F {
            126 if rest.len() >= 4 => (u16::from_be_bytes([rest[2], rest[3]]) as usize, 4),
            127 if rest.len() >= 10 => {
                let mut b = [0u8; 8];
                b.copy_from_slice(&rest[2..10]);
                (u64::from_be_bytes(b) as usize, 10)
            }
            126 | 127 => break,
            n => (n as usize, 2),
        };
        if rest.len() < header + len {
            break;
        }
        out.push(&rest[header..header + len]);
        at += header + len;
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
            buf: Vec::new(),
        };
        let end = loop {
            if let Some(i) = c.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            c.fill()?;
        };
        if !c.buf.starts_with(b"HTTP/1.1 101") {
            return Err(protocol_error(&String::from_utf8_lossy(&c.buf[..end])));
        }
        c.buf.drain(..end);
        c.send_all(&[format!("use-db {db} {token}")])?;
        c.read_envelopes(1)?;
        Ok(c)
    }

    fn fill(&mut self) -> io::Result<()> {
        let len = self.buf.len();
        self.buf.resize(len + 16 * 1024, 0);
        let n = self.stream.read(&mut self.buf[len..]);
        self.buf.truncate(len + *n.as_ref().unwrap_or(&0));
        if n? == 0 {
            return Err(protocol_error("server closed the connection"));
        }
        Ok(())
    }

    fn send_all(&mut self, commands: &[String]) -> io::Result<()> {
        self.out.clear();
        for c in commands {
            client_frame(c, &mut self.out);
        }
        self.stream.write_all(&self.out)
    }

    fn read_envelopes(&mut self, n: usize) -> io::Result<()> {
        let mut seen = 0;
        while seen < n {
            let (frames, used) = server_frames(&self.buf);
            for f in frames {
                if is_envelope(f) {
                    if f.starts_with(b"error") {
                        return Err(protocol_error(&String::from_utf8_lossy(f)));
                    }
                    seen += 1;
                }
            }
            self.buf.drain(..used);
            if seen < n {
                self.fill()?;
            }
        }
        Ok(())
    }
}

impl Conn for NunWs {
    fn batch(&mut self, op: KvOp, keys: &[String], value: &str) -> io::Result<()> {
        let commands: Vec<String> = keys.iter().map(|k| command(op, k, value)).collect();
        self.send_all(&commands)?;
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
    out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
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
            self.read_reply()?;
            if waiting {
                self.read_reply()?;
            }
        }
        Ok(())
    }
}
