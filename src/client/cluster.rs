//! A client that follows a cluster: it knows several nodes, uses whichever answers, and when its
//! node dies or no primary is elected it reconnects (to the next node, with exponential backoff)
//! and tries again. Reads and writes that certainly did not happen are retried; a write whose
//! fate cannot be known (the connection dropped after it was sent, or the node says it may not be
//! durable) is reported as [`ClientError::Unknown`] and never retried, so nothing is applied twice.

use std::time::{Duration, Instant};

use super::http::Connected;
use super::{Client, ClientError, Reply};

/// First pause before trying again (doubled each time, up to [`MAX_BACKOFF`]).
const FIRST_BACKOFF: Duration = Duration::from_millis(50);
/// Longest pause between tries.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// What an `error` answer says about the command that got it.
#[derive(Debug, PartialEq, Eq)]
enum Fate {
    /// Certainly not applied: send it again (after a pause, perhaps to another node).
    Retry,
    /// A write that may or may not have been applied.
    Unknown,
    /// A real answer (bad token, permission denied, conflict…): give it to the caller.
    Final,
}

/// Sorts a node's `error` answer by what it means for the command.
fn fate(error: &str) -> Fate {
    if error.starts_with("Not the primary any more")
        || error.starts_with("Write not confirmed by a majority")
        || (error.starts_with("Primary ") && error.contains("the write may not be durable"))
    {
        Fate::Unknown
    } else if error.starts_with("No primary is elected right now")
        || error.starts_with("This node holds changes a majority has not confirmed")
        || error == "Not the primary"
        || (error.starts_with("Primary ") && error.contains(" unreachable"))
    {
        Fate::Retry
    } else {
        Fate::Final
    }
}

/// True when a node's `error` answer to a write leaves its outcome unknown.
pub(super) fn outcome_unknown(error: &str) -> bool {
    fate(error) == Fate::Unknown
}

/// True for commands that change data (the ones whose outcome can be unknown).
fn is_write(command: &str) -> bool {
    matches!(
        command.split(' ').next().unwrap_or(""),
        "set"
            | "set-safe"
            | "increment"
            | "remove"
            | "create-db"
            | "delete-db"
            | "create-user"
            | "set-permissions"
            | "resolve"
            | "snapshot"
    )
}

/// POSTs the `;`-separated commands in `body` to the first of `urls` that accepts a connection,
/// going round them with exponential backoff for up to `patience`. A request that failed after
/// it was sent is tried again only when `body` holds no write; otherwise it is reported as
/// [`ClientError::Unknown`].
pub fn post_to_any(urls: &[&str], body: &str, patience: Duration) -> Result<String, ClientError> {
    let writes = body.split(';').any(|c| is_write(c.trim()));
    let deadline = Instant::now() + patience;
    let mut pause = FIRST_BACKOFF;
    let mut last = ClientError::Protocol("no server address".into());
    for url in urls.iter().cycle() {
        match Connected::open(url).map(|c| c.post(body)) {
            Ok(Ok(reply)) => return Ok(reply),
            // A status other than 200 is the server's real answer.
            Ok(Err(e @ ClientError::Server(_))) => return Err(e),
            Ok(Err(e)) if writes => return Err(ClientError::Unknown(format!("{url}: {e}"))),
            Ok(Err(e)) | Err(e @ ClientError::Io(_)) => last = e,
            Err(e) => return Err(e),
        }
        if Instant::now() >= deadline {
            break;
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(MAX_BACKOFF);
    }
    Err(last)
}

/// A connection to any live node of a cluster.
#[derive(Debug)]
pub struct ClusterClient {
    nodes: Vec<String>,
    next: usize,
    current: Option<Client>,
    /// Commands replayed on every new connection (`auth`, `use-db`).
    setup: Vec<String>,
    /// How long one call may keep trying before it gives up.
    patience: Duration,
    timeout: Duration,
}

impl ClusterClient {
    /// A client for the nodes at `nodes` (TCP `host:port`); connects on first use.
    pub fn new(nodes: &[&str]) -> ClusterClient {
        ClusterClient {
            nodes: nodes.iter().map(|n| n.to_string()).collect(),
            next: 0,
            current: None,
            setup: Vec::new(),
            patience: Duration::from_secs(30),
            timeout: Duration::from_secs(10),
        }
    }

    /// How long a call keeps trying (reconnecting, waiting for an election) before failing.
    pub fn set_patience(&mut self, patience: Duration) {
        self.patience = patience;
    }

    /// Logs in as admin on every connection.
    pub fn auth(&mut self, user: &str, pwd: &str) -> Result<(), ClientError> {
        self.setup_command(format!("auth {user} {pwd}"))
    }

    /// Selects `db` on every connection.
    pub fn use_db(&mut self, db: &str, token: &str) -> Result<(), ClientError> {
        self.setup_command(format!("use-db {db} {token}"))
    }

    fn setup_command(&mut self, command: String) -> Result<(), ClientError> {
        let messages = self.call(&command)?.into_result()?;
        if messages.iter().any(|m| m == "invalid auth") {
            return Err(ClientError::Server("invalid auth".into()));
        }
        self.setup.push(command);
        Ok(())
    }

    /// A connection to the next node that accepts one, with the setup replayed.
    fn connect(&mut self) -> Result<&mut Client, ClientError> {
        if self.current.is_none() {
            let addr = self.nodes[self.next % self.nodes.len().max(1)].clone();
            self.next += 1;
            let mut client = Client::connect_tcp_timeout(&addr, self.timeout)?;
            for command in &self.setup {
                client.call(command)?.into_result()?;
            }
            self.current = Some(client);
        }
        self.current
            .as_mut()
            .ok_or_else(|| ClientError::Protocol("no connection".into()))
    }

    /// Sends `command` and returns its reply (an `error` reply is an `Ok` reply, as with
    /// [`Client::call`]), retrying on another node or after a pause when it certainly did not
    /// happen.
    pub fn call(&mut self, command: &str) -> Result<Reply, ClientError> {
        if self.nodes.is_empty() {
            return Err(ClientError::Protocol("no node addresses".into()));
        }
        let deadline = Instant::now() + self.patience;
        let mut pause = FIRST_BACKOFF;
        loop {
            let sent = match self.connect() {
                Ok(client) => client.call(command),
                // Not connected: nothing was sent.
                Err(e) => {
                    self.current = None;
                    if Instant::now() >= deadline {
                        return Err(e);
                    }
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(MAX_BACKOFF);
                    continue;
                }
            };
            match sent {
                Ok(reply) => {
                    let Some(error) = reply.error.as_deref() else {
                        return Ok(reply);
                    };
                    match fate(error) {
                        Fate::Unknown if is_write(command) => {
                            return Err(ClientError::Unknown(format!("{command}: {error}")));
                        }
                        Fate::Retry if Instant::now() < deadline => {
                            // The node may be the old primary or cut off: try the next one.
                            self.current = None;
                            std::thread::sleep(pause);
                            pause = (pause * 2).min(MAX_BACKOFF);
                        }
                        _ => return Ok(reply),
                    }
                }
                // The connection failed after the command went out: a read can be retried, a
                // write may have been applied.
                Err(e) => {
                    self.current = None;
                    if is_write(command) {
                        return Err(ClientError::Unknown(format!("{command}: {e}")));
                    }
                    if Instant::now() >= deadline {
                        return Err(e);
                    }
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    /// `set <key> <value>`.
    pub fn set(&mut self, key: &str, value: &str) -> Result<(), ClientError> {
        self.call(&format!("set {key} {value}"))?.into_result()?;
        Ok(())
    }

    /// `get <key>`; `None` when the key is missing.
    pub fn get(&mut self, key: &str) -> Result<Option<String>, ClientError> {
        let messages = self.call(&format!("get {key}"))?.into_result()?;
        let v = messages
            .iter()
            .find_map(|m| m.strip_prefix("value "))
            .ok_or_else(|| ClientError::Protocol(format!("no value for {key}")))?;
        Ok((v != "<Empty>").then(|| v.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_and_reads_are_told_apart() {
        assert!(is_write("set a 1"));
        assert!(is_write("remove a"));
        assert!(!is_write("get a"));
        assert!(!is_write("keys"));
    }

    #[test]
    fn error_answers_are_sorted_by_what_they_mean_for_the_write() {
        assert_eq!(
            fate("No primary is elected right now; retry shortly"),
            Fate::Retry
        );
        assert_eq!(fate("Not the primary"), Fate::Retry);
        assert_eq!(
            fate("Primary 127.0.0.1:9 unreachable: connection refused"),
            Fate::Retry
        );
        assert_eq!(
            fate("Not the primary any more; the write may not be durable"),
            Fate::Unknown
        );
        assert_eq!(
            fate("Write not confirmed by a majority (1 of 2 members)"),
            Fate::Unknown
        );
        assert_eq!(
            fate("Primary 127.0.0.1:9 did not answer; the write may not be durable: eof"),
            Fate::Unknown
        );
        assert_eq!(fate("Invalid token"), Fate::Final);
    }

    #[test]
    fn nobody_listening_is_an_error_after_the_patience() {
        let mut c = ClusterClient::new(&["127.0.0.1:1"]);
        c.set_patience(Duration::from_millis(200));
        let started = Instant::now();
        assert!(matches!(c.call("ping"), Err(ClientError::Io(_))));
        assert!(started.elapsed() >= Duration::from_millis(200));
    }
}
