//! Message transports for [`super::Client`]: TCP lines or WebSocket text frames.

use std::io::{self, BufRead, BufReader, Write};
use std::net::TcpStream;
use std::time::Duration;

use tungstenite::{Message, WebSocket};

use super::{ClientError, DEFAULT_TIMEOUT};

/// Sends commands and receives one message at a time.
pub trait Transport {
    /// Sends commands (batched into as few writes as the framing allows).
    fn send(&mut self, commands: &[&str]) -> Result<(), ClientError>;
    /// Receives one message, including its trailing newline if any.
    fn recv(&mut self) -> Result<String, ClientError>;
    /// Sets the receive timeout.
    fn set_timeout(&mut self, timeout: Option<Duration>) -> io::Result<()>;
    /// False when the peer has certainly closed the connection (checked without blocking), so
    /// a command sent now would be lost unseen.
    fn is_open(&self) -> bool {
        true
    }
}

/// Line-framed TCP.
pub struct TcpTransport {
    writer: TcpStream,
    reader: BufReader<TcpStream>,
    buf: Vec<u8>,
}

impl TcpTransport {
    /// Connects to `host:port`.
    pub fn connect(addr: &str) -> Result<TcpTransport, ClientError> {
        let stream = TcpStream::connect(addr)?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(DEFAULT_TIMEOUT))?;
        Ok(TcpTransport {
            writer: stream.try_clone()?,
            reader: BufReader::with_capacity(64 * 1024, stream),
            buf: Vec::new(),
        })
    }
}

impl TcpTransport {
    /// Connects to `host:port`, giving up after `timeout`.
    pub fn connect_timeout(addr: &str, timeout: Duration) -> Result<TcpTransport, ClientError> {
        use std::net::ToSocketAddrs;
        let sock = addr
            .to_socket_addrs()?
            .next()
            .ok_or_else(|| ClientError::Protocol(format!("cannot resolve {addr}")))?;
        let stream = TcpStream::connect_timeout(&sock, timeout)?;
        stream.set_nodelay(true)?;
        stream.set_write_timeout(Some(timeout))?;
        Ok(TcpTransport {
            writer: stream.try_clone()?,
            reader: BufReader::with_capacity(64 * 1024, stream),
            buf: Vec::new(),
        })
    }
}

impl Transport for TcpTransport {
    fn send(&mut self, commands: &[&str]) -> Result<(), ClientError> {
        let mut out = String::with_capacity(commands.iter().map(|c| c.len() + 1).sum());
        for c in commands {
            out.push_str(c);
            out.push('\n');
        }
        self.writer.write_all(out.as_bytes())?;
        Ok(())
    }

    fn recv(&mut self) -> Result<String, ClientError> {
        // A read that timed out keeps what it got of the line in `buf`; the next call goes on
        // from there (a complete line is taken out of it below).
        let n = self.reader.read_until(b'\n', &mut self.buf)?;
        if n == 0 {
            self.buf.clear();
            return Err(ClientError::Io(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "server closed the connection",
            )));
        }
        String::from_utf8(std::mem::take(&mut self.buf))
            .map_err(|_| ClientError::Protocol("reply is not UTF-8".into()))
    }

    fn set_timeout(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        self.reader.get_ref().set_read_timeout(timeout)
    }

    fn is_open(&self) -> bool {
        if !self.reader.buffer().is_empty() {
            return true;
        }
        let stream = self.reader.get_ref();
        if stream.set_nonblocking(true).is_err() {
            return false;
        }
        let open = match stream.peek(&mut [0u8; 1]) {
            Ok(n) => n > 0,
            Err(e) => e.kind() == io::ErrorKind::WouldBlock,
        };
        stream.set_nonblocking(false).is_ok() && open
    }
}

/// WebSocket text frames.
pub struct WsTransport {
    ws: WebSocket<TcpStream>,
}

impl WsTransport {
    /// Connects to a `ws://host:port[/path]` URL.
    pub fn connect(url: &str) -> Result<WsTransport, ClientError> {
        let rest = url
            .strip_prefix("ws://")
            .ok_or_else(|| ClientError::Protocol(format!("not a ws:// URL: {url}")))?;
        let host = rest.split('/').next().unwrap_or(rest);
        let stream = TcpStream::connect(host)?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(DEFAULT_TIMEOUT))?;
        let (ws, _) = tungstenite::client(url, stream).map_err(|e| match e {
            tungstenite::HandshakeError::Failure(e) => ClientError::from(e),
            tungstenite::HandshakeError::Interrupted(_) => {
                ClientError::Protocol("websocket handshake interrupted".into())
            }
        })?;
        Ok(WsTransport { ws })
    }
}

impl Transport for WsTransport {
    fn send(&mut self, commands: &[&str]) -> Result<(), ClientError> {
        for c in commands {
            self.ws.write(Message::Text(c.to_string()))?;
        }
        self.ws.flush()?;
        Ok(())
    }

    fn recv(&mut self) -> Result<String, ClientError> {
        loop {
            match self.ws.read()? {
                Message::Text(t) => return Ok(t),
                Message::Close(_) => {
                    return Err(ClientError::Io(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "server closed the connection",
                    )))
                }
                _ => continue,
            }
        }
    }

    fn set_timeout(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        self.ws.get_ref().set_read_timeout(timeout)
    }
}
