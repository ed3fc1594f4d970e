//! A small blocking client for the NunDB protocol over TCP or WebSocket, plus an HTTP `post` used
//! by `nun-db exec`. Used by the CLI, the integration tests and the bench tool.
//!
//! ```no_run
//! use nundb::client::Client;
//! let mut c = Client::connect_tcp("127.0.0.1:3014").unwrap();
//! c.use_db("sample", "sample-pwd").unwrap();
//! c.set("name", "mateus").unwrap();
//! assert_eq!(c.get("name").unwrap().as_deref(), Some("mateus"));
//! ```

mod cluster;
mod http;
mod transport;

pub use cluster::{post_to_any, ClusterClient};
pub use http::post;

use std::collections::VecDeque;
use std::fmt;
use std::io;
use std::time::Duration;

use transport::{TcpTransport, Transport, WsTransport};

/// Default time to wait for a reply before giving up.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// Anything that can go wrong talking to the server.
#[derive(Debug)]
pub enum ClientError {
    /// Connection or socket failure (including timeouts).
    Io(io::Error),
    /// The server sent something that does not fit the protocol, or the URL is bad.
    Protocol(String),
    /// The server answered `error <message>`.
    Server(String),
    /// A write whose outcome cannot be known (the connection or the primary failed after it
    /// was sent): it may or may not have been applied. Only [`ClusterClient`] reports this.
    Unknown(String),
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientError::Io(e) => write!(f, "connection error: {e}"),
            ClientError::Protocol(e) => write!(f, "protocol error: {e}"),
            ClientError::Server(e) => write!(f, "server error: {e}"),
            ClientError::Unknown(e) => write!(f, "outcome unknown: {e}"),
        }
    }
}

impl std::error::Error for ClientError {}

impl ClientError {
    /// True when a write that got this error may still have been applied: the connection
    /// failed after it was sent, or the node said its fate is unknown. Any other error means
    /// the write certainly did not happen.
    pub fn outcome_unknown(&self) -> bool {
        match self {
            ClientError::Io(_) | ClientError::Protocol(_) | ClientError::Unknown(_) => true,
            ClientError::Server(text) => cluster::outcome_unknown(text),
        }
    }
}

impl From<io::Error> for ClientError {
    fn from(e: io::Error) -> Self {
        ClientError::Io(e)
    }
}

impl From<tungstenite::Error> for ClientError {
    fn from(e: tungstenite::Error) -> Self {
        match e {
            tungstenite::Error::Io(e) => ClientError::Io(e),
            other => ClientError::Protocol(other.to_string()),
        }
    }
}

/// The answer to one command: its output messages and its envelope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// Output messages before the envelope, without the trailing newline.
    pub messages: Vec<String>,
    /// `None` for `ok`, else the text after `error ` (trailing space removed).
    pub error: Option<String>,
}

impl Reply {
    /// Turns an `error` envelope into `Err(ClientError::Server)`.
    pub fn into_result(self) -> Result<Vec<String>, ClientError> {
        match self.error {
            None => Ok(self.messages),
            Some(e) => Err(ClientError::Server(e)),
        }
    }
}

/// A change pushed to a watcher.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// `changed-version <key> <version> <value>`.
    Changed {
        /// The key.
        key: String,
        /// Its new version.
        version: i32,
        /// Its new value.
        value: String,
    },
    /// `removed <key>`.
    Removed {
        /// The key.
        key: String,
    },
}

/// What one incoming message is.
enum Incoming {
    Output(String),
    Envelope(Option<String>),
    Event(Event),
    Skip,
}

fn classify(msg: &str) -> Incoming {
    let msg = msg.strip_suffix('\n').unwrap_or(msg);
    if msg == "ok " || msg == "ok" {
        return Incoming::Envelope(None);
    }
    if let Some(rest) = msg.strip_prefix("error ") {
        if rest.ends_with(' ') {
            return Incoming::Envelope(Some(rest.trim_end().to_string()));
        }
    }
    if let Some(rest) = msg.strip_prefix("changed-version ") {
        let mut parts = rest.splitn(3, ' ');
        let key = parts.next().unwrap_or_default().to_string();
        let version = parts.next().and_then(|v| v.parse().ok());
        let value = parts.next().unwrap_or_default().to_string();
        if let Some(version) = version {
            return Incoming::Event(Event::Changed {
                key,
                version,
                value,
            });
        }
    }
    if msg.starts_with("changed ") {
        return Incoming::Skip;
    }
    if let Some(key) = msg.strip_prefix("removed ") {
        return Incoming::Event(Event::Removed {
            key: key.to_string(),
        });
    }
    Incoming::Output(msg.to_string())
}

/// A blocking connection to one server.
pub struct Client {
    transport: Box<dyn Transport + Send>,
    events: VecDeque<Event>,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("queued_events", &self.events.len())
            .finish()
    }
}

impl Client {
    /// Connects over TCP to `host:port`.
    pub fn connect_tcp(addr: &str) -> Result<Client, ClientError> {
        Ok(Client {
            transport: Box::new(TcpTransport::connect(addr)?),
            events: VecDeque::new(),
        })
    }

    /// Connects over TCP, giving up after `timeout` (connect and each reply).
    pub fn connect_tcp_timeout(addr: &str, timeout: Duration) -> Result<Client, ClientError> {
        let mut client = Client {
            transport: Box::new(TcpTransport::connect_timeout(addr, timeout)?),
            events: VecDeque::new(),
        };
        client.set_timeout(Some(timeout))?;
        Ok(client)
    }

    /// Connects over WebSocket to a `ws://host:port` URL.
    pub fn connect_ws(url: &str) -> Result<Client, ClientError> {
        Ok(Client {
            transport: Box::new(WsTransport::connect(url)?),
            events: VecDeque::new(),
        })
    }

    /// Sets how long to wait for each message.
    pub fn set_timeout(&mut self, timeout: Option<Duration>) -> Result<(), ClientError> {
        self.transport.set_timeout(timeout)?;
        Ok(())
    }

    /// False when the server has certainly closed this connection (checked without blocking).
    pub fn is_open(&self) -> bool {
        self.transport.is_open()
    }

    /// Sends one raw command and waits for its reply.
    pub fn call(&mut self, command: &str) -> Result<Reply, ClientError> {
        self.transport.send(&[command])?;
        self.read_reply()
    }

    /// Sends one raw command and waits for its reply in slices of `slice`, for as long as
    /// `keep_waiting` says after each slice; then gives up with the timeout error (the
    /// command may still be carried out).
    pub fn call_while(
        &mut self,
        command: &str,
        slice: Duration,
        mut keep_waiting: impl FnMut() -> bool,
    ) -> Result<Reply, ClientError> {
        self.transport.set_timeout(Some(slice))?;
        self.transport.send(&[command])?;
        self.read_reply_while(&mut keep_waiting)
    }

    /// Sends several commands at once (pipelining), then reads all their replies in order.
    pub fn pipeline(&mut self, commands: &[&str]) -> Result<Vec<Reply>, ClientError> {
        self.transport.send(commands)?;
        commands.iter().map(|_| self.read_reply()).collect()
    }

    fn read_reply(&mut self) -> Result<Reply, ClientError> {
        self.read_reply_while(&mut || false)
    }

    /// Reads one reply; a receive timeout ends it with the error unless `keep_waiting` says
    /// to go on (what arrived so far is kept).
    fn read_reply_while(
        &mut self,
        keep_waiting: &mut dyn FnMut() -> bool,
    ) -> Result<Reply, ClientError> {
        let mut messages = Vec::new();
        loop {
            match self.transport.recv() {
                Ok(msg) => match classify(&msg) {
                    Incoming::Envelope(error) => return Ok(Reply { messages, error }),
                    Incoming::Event(e) => self.events.push_back(e),
                    Incoming::Output(m) => messages.push(m),
                    Incoming::Skip => {}
                },
                Err(ClientError::Io(e))
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) && keep_waiting() => {}
                Err(e) => return Err(e),
            }
        }
    }

    fn single(&mut self, command: &str, prefix: &str) -> Result<String, ClientError> {
        let messages = self.call(command)?.into_result()?;
        messages
            .iter()
            .find_map(|m| m.strip_prefix(prefix))
            .map(str::to_string)
            .ok_or_else(|| ClientError::Protocol(format!("no `{prefix}` reply to `{command}`")))
    }

    /// `auth <user> <pwd>`; an invalid login is `Err(Server("invalid auth"))`.
    pub fn auth(&mut self, user: &str, pwd: &str) -> Result<(), ClientError> {
        let messages = self.call(&format!("auth {user} {pwd}"))?.into_result()?;
        if messages.iter().any(|m| m == "valid auth") {
            Ok(())
        } else {
            Err(ClientError::Server("invalid auth".into()))
        }
    }

    /// `use-db <db> <token>`.
    pub fn use_db(&mut self, db: &str, token: &str) -> Result<(), ClientError> {
        self.call(&format!("use-db {db} {token}"))?.into_result()?;
        Ok(())
    }

    /// `use-db <db> <user> <token>`.
    pub fn use_db_as(&mut self, db: &str, user: &str, token: &str) -> Result<(), ClientError> {
        self.call(&format!("use-db {db} {user} {token}"))?
            .into_result()?;
        Ok(())
    }

    /// `create-db <name> <token>` (needs admin auth).
    pub fn create_db(&mut self, name: &str, token: &str) -> Result<(), ClientError> {
        self.call(&format!("create-db {name} {token}"))?
            .into_result()?;
        Ok(())
    }

    /// `get <key>`; `None` when the key is missing.
    pub fn get(&mut self, key: &str) -> Result<Option<String>, ClientError> {
        let v = self.single(&format!("get {key}"), "value ")?;
        Ok(if v == "<Empty>" { None } else { Some(v) })
    }

    /// `get-safe <key>`: value and version; `None` when missing.
    pub fn get_safe(&mut self, key: &str) -> Result<Option<(i32, String)>, ClientError> {
        let v = self.single(&format!("get-safe {key}"), "value-version ")?;
        let (version, value) = v
            .split_once(' ')
            .ok_or_else(|| ClientError::Protocol(format!("bad value-version: {v}")))?;
        if value == "<Empty>" {
            return Ok(None);
        }
        let version = version
            .parse()
            .map_err(|_| ClientError::Protocol(format!("bad version: {version}")))?;
        Ok(Some((version, value.to_string())))
    }

    /// `set <key> <value>`.
    pub fn set(&mut self, key: &str, value: &str) -> Result<(), ClientError> {
        self.call(&format!("set {key} {value}"))?.into_result()?;
        Ok(())
    }

    /// `set-safe <key> <version> <value>`.
    pub fn set_safe(&mut self, key: &str, version: i32, value: &str) -> Result<(), ClientError> {
        self.call(&format!("set-safe {key} {version} {value}"))?
            .into_result()?;
        Ok(())
    }

    /// `remove <key>`.
    pub fn remove(&mut self, key: &str) -> Result<(), ClientError> {
        self.call(&format!("remove {key}"))?.into_result()?;
        Ok(())
    }

    /// `increment <key> <by>`.
    pub fn increment(&mut self, key: &str, by: i64) -> Result<(), ClientError> {
        self.call(&format!("increment {key} {by}"))?.into_result()?;
        Ok(())
    }

    /// `keys [pattern]`, without the leading comma.
    pub fn keys(&mut self, pattern: &str) -> Result<Vec<String>, ClientError> {
        let line = self.single(&format!("keys {pattern}"), "keys ")?;
        Ok(line
            .split(',')
            .filter(|k| !k.is_empty())
            .map(str::to_string)
            .collect())
    }

    /// `watch <key>`; changes then arrive through [`Client::next_event`].
    pub fn watch(&mut self, key: &str) -> Result<(), ClientError> {
        self.call(&format!("watch {key}"))?.into_result()?;
        Ok(())
    }

    /// Waits for the next pushed change (up to the client's timeout).
    pub fn next_event(&mut self) -> Result<Event, ClientError> {
        loop {
            if let Some(e) = self.events.pop_front() {
                return Ok(e);
            }
            let msg = self.transport.recv()?;
            if let Incoming::Event(e) = classify(&msg) {
                return Ok(e);
            }
        }
    }

    /// An endless iterator of pushed changes; ends at the first error (e.g. timeout).
    pub fn events(&mut self) -> impl Iterator<Item = Event> + '_ {
        std::iter::from_fn(move || self.next_event().ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_messages() {
        assert!(matches!(classify("ok \n"), Incoming::Envelope(None)));
        assert!(
            matches!(classify("error Invalid token \n"), Incoming::Envelope(Some(e)) if e == "Invalid token")
        );
        assert!(
            matches!(classify("error permission denied\n \n"), Incoming::Envelope(Some(e)) if e == "permission denied")
        );
        assert!(matches!(
            classify("error no-db-selected\n"),
            Incoming::Output(_)
        ));
        assert!(matches!(
            classify("changed-version a 3 x y\n"),
            Incoming::Event(Event::Changed { version: 3, .. })
        ));
    }

    /// A server on loopback that reads one line, then writes `parts` with `pause` between them.
    fn slow_server(parts: &'static [&'static str], pause: Duration) -> String {
        use std::io::{BufRead, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut line = String::new();
            let _ = io::BufReader::new(stream.try_clone().unwrap()).read_line(&mut line);
            let mut out = stream;
            for part in parts {
                std::thread::sleep(pause);
                let _ = out.write_all(part.as_bytes());
            }
            // Keeps the connection open while the client gives up.
            std::thread::sleep(Duration::from_secs(2));
        });
        addr
    }

    #[test]
    fn call_while_resumes_a_reply_split_across_slices() {
        let addr = slow_server(&["value 1", "2\nok", " \n"], Duration::from_millis(60));
        let mut c = Client::connect_tcp(&addr).unwrap();
        let mut slices = 0;
        let reply = c
            .call_while("get a", Duration::from_millis(20), || {
                slices += 1;
                true
            })
            .unwrap();
        assert_eq!(reply.messages, vec!["value 12"]);
        assert_eq!(reply.error, None);
        assert!(slices >= 3, "the reply came in one slice ({slices})");
    }

    #[test]
    fn call_while_gives_up_when_told_to() {
        let addr = slow_server(&[], Duration::ZERO);
        let mut c = Client::connect_tcp(&addr).unwrap();
        let mut slices = 0;
        let r = c.call_while("set a 1", Duration::from_millis(20), || {
            slices += 1;
            slices < 3
        });
        assert!(
            matches!(&r, Err(ClientError::Io(e)) if e.kind() == io::ErrorKind::WouldBlock),
            "{r:?}"
        );
        assert_eq!(slices, 3);
    }
}
