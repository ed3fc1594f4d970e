//! Writes that reach a secondary go to the primary as `fwd <origin> <db> <user> <command>`; the client
//! gets the primary's answer once the change has come back through replication (so it reads
//! its own write). The secondary never applies the write itself, and never sends one twice: a
//! write lost on the way gets an error saying its outcome is unknown, and the client decides.

use super::Cluster;
use crate::client::Client;
use crate::protocol::Outcome;

/// Marker user for forwarded admin sessions.
pub const ADMIN_USER: &str = "$admin";

/// The answer while no primary is known.
pub const NO_PRIMARY: &str = "No primary is elected right now; retry shortly";

/// A session's connection to the primary, kept between its forwarded writes.
pub type Forwarder = Option<(String, Client)>;

/// Sends `line` to the primary on behalf of a session using database `db` (`-`: none) as `user`
/// ([`ADMIN_USER`] for admins, `-` for nobody), over the session's `forwarder` connection.
pub fn forward(
    cluster: &Cluster,
    forwarder: &mut Forwarder,
    db: &str,
    user: &str,
    line: &str,
) -> Outcome {
    let Some(primary) = cluster.status().2 else {
        return Outcome::error(NO_PRIMARY);
    };
    let reuse = matches!(forwarder, Some((p, c)) if *p == primary && c.is_open());
    if !reuse {
        *forwarder = None;
        match Client::connect_tcp_timeout(&primary, cluster.timeout)
            .and_then(|mut c| c.auth(&cluster.admin.0, &cluster.admin.1).map(|_| c))
        {
            Ok(c) => *forwarder = Some((primary.clone(), c)),
            // Nothing was sent: the write certainly did not happen.
            Err(e) => return Outcome::error(format!("Primary {primary} unreachable: {e}")),
        }
    }
    let Some((_, client)) = forwarder.as_mut() else {
        return Outcome::error(format!("Primary {primary} unreachable"));
    };
    let command = format!("fwd {} {db} {user} {line}", cluster.self_id);
    // Waits while this node still follows `primary`, for up to five timeouts: once it follows
    // another (or none), the answer may never come, and the client hears at once that the
    // write's outcome is unknown.
    let started = std::time::Instant::now();
    let still_leads = || {
        started.elapsed() < cluster.timeout * 5 && cluster.status().2.as_deref() == Some(&primary)
    };
    match client.call_while(&command, cluster.timeout / 4, still_leads) {
        Ok(reply) => {
            let mut messages = reply.messages;
            let lsn = match messages.first().and_then(|m| m.strip_prefix("fwd-lsn ")) {
                Some(n) => n.parse::<u64>().unwrap_or(0),
                None => 0,
            };
            if messages.first().is_some_and(|m| m.starts_with("fwd-lsn ")) {
                messages.remove(0);
            }
            if lsn > 0 && !cluster.wait_applied(lsn, cluster.timeout * 5) {
                log::warn!("forwarded write {lsn} not replicated back in time");
            }
            let error = reply.error.map(|e| {
                if e == "permission denied" {
                    "permission denied\n".to_string()
                } else {
                    e
                }
            });
            Outcome {
                messages,
                error,
                ..Outcome::default()
            }
        }
        // The command went out and no answer came back: the primary may have applied it.
        // Sending it again could apply it twice, so the client is told instead.
        Err(e) => {
            *forwarder = None;
            Outcome::error(format!(
                "Primary {primary} did not answer; the write may not be durable: {e}"
            ))
        }
    }
}
