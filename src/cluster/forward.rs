//! Writes that reach a secondary go to the primary as `fwd <origin> <db> <user> <command>`; the client
//! gets the primary's answer once the change has come back through replication (so it reads
//! its own write). The secondary never applies the write itself.

use std::time::Duration;

use crate::client::Client;
use crate::node::Node;
use crate::protocol::Outcome;
use crate::server::session::Session;

/// Marker user for forwarded admin sessions.
pub const ADMIN_USER: &str = "$admin";

/// Sends `line` to the primary on behalf of `session`.
pub fn forward(node: &Node, session: &mut Session, line: &str) -> Outcome {
    const NO_PRIMARY: &str = "No primary is elected right now; retry shortly";
    // No cluster yet: the node is still starting and does not know who leads.
    let Some(cluster) = node.cluster() else {
        return Outcome::error(NO_PRIMARY);
    };
    let Some(primary) = cluster.status().2 else {
        return Outcome::error(NO_PRIMARY);
    };
    let db = session
        .db
        .as_ref()
        .map_or("-".to_string(), |d| d.name().to_string());
    let user = if session.admin {
        ADMIN_USER.to_string()
    } else if session.user.is_empty() {
        "-".to_string()
    } else {
        session.user.clone()
    };
    let command = format!("fwd {} {db} {user} {line}", cluster.self_id);
    for attempt in 0..2 {
        let reuse = matches!(&session.forwarder, Some((p, _)) if *p == primary);
        if !reuse {
            match Client::connect_tcp_timeout(&primary, cluster.timeout * 5)
                .and_then(|mut c| c.auth(&cluster.admin.0, &cluster.admin.1).map(|_| c))
            {
                Ok(c) => session.forwarder = Some((primary.clone(), c)),
                Err(e) => return Outcome::error(format!("Primary {primary} unreachable: {e}")),
            }
        }
        let Some((_, client)) = session.forwarder.as_mut() else {
            break;
        };
        match client.call(&command) {
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
                return Outcome {
                    messages,
                    error,
                    ..Outcome::default()
                };
            }
            Err(e) => {
                session.forwarder = None;
                if attempt == 1 {
                    return Outcome::error(format!("Primary {primary} unreachable: {e}"));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
    Outcome::error("Primary unreachable")
}
