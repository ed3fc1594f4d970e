//! Who is in the cluster. The primary's member list is the cluster's: `join`/`leave` sent to a
//! secondary go to the primary, which streams every change to its secondaries (`members` lines
//! in replication). A node started with itself in NUN_REPLICATE_ADDR asks to join whenever no
//! primary lists it. Only a primary that reaches a majority changes the list. With no primary
//! elected, a change applies to the node it is sent to (and says so), so a cluster that lost its
//! majority for good can be repaired by hand.

use std::sync::Arc;
use std::time::Duration;

use super::{forward, Cluster};
use crate::client::Client;
use crate::node::Node;
use crate::protocol::Outcome;
use crate::server::session::Session;

/// Runs `join <member>` (`join` true) or `leave <member>` for `session`.
pub fn change(node: &Arc<Node>, session: &mut Session, member: &str, join: bool) -> Outcome {
    let Some(cluster) = node.cluster() else {
        return Outcome::error("Not a cluster node");
    };
    let valid = member
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
    if !valid {
        return Outcome::error(format!("Invalid member address {member}: use host:port"));
    }
    if !join && member == cluster.self_id {
        return Outcome::error(format!(
            "{member} cannot remove itself: stop it, then run leave {member} on another member"
        ));
    }
    let local_only = !cluster.is_primary();
    if local_only && !session.forwarded && cluster.status().2.is_some() {
        let verb = if join { "join" } else { "leave" };
        return forward::forward(node, session, &format!("{verb} {member}"));
    }
    if !local_only && !cluster.peers().is_empty() && !cluster.leads_a_majority() {
        // A primary cut off from its majority must not grow a majority of its own.
        return Outcome::error(
            "The primary does not reach a majority of its members; the member list cannot change now",
        );
    }
    if join && !cluster.members().iter().any(|m| m == member) && !answers_as(cluster, member) {
        // A member that cannot answer (or knows itself by another name, so its acks would
        // never count) would count towards the majority and stall every write.
        return Outcome::error(format!(
            "{member} does not answer as {member}; start it first, with --external-address {member} (a node started with the member list joins by itself)"
        ));
    }
    let changed = if join {
        cluster.join(member)
    } else {
        cluster.leave(member)
    };
    if !changed {
        return if join {
            Outcome::ok()
        } else {
            Outcome::error(format!("Not a member: {member}"))
        };
    }
    log::info!("members are now {:?}", cluster.members());
    if let Some(log) = node.log() {
        // Wakes the replication senders, which stream the new list.
        log.wake();
    }
    if join {
        if let Err(e) = node.start_cluster_threads() {
            return Outcome::error(e);
        }
        if cluster.is_primary() {
            // The newcomer learns who leads now rather than at the next periodic announcement.
            cluster.announce(cluster.term());
        }
    }
    if local_only {
        // No primary: the next one's list replaces this unless this node becomes primary.
        return Outcome::message("applied on this node only: no primary is elected");
    }
    Outcome::ok()
}

/// For the node's lifetime, whenever no primary lists this node (it was just started, or a new
/// primary's list lacks it), asks the peers to let it join: a node added to a running cluster
/// only has to be started with the member list.
pub fn announce_self(cluster: &Arc<Cluster>) {
    let cluster = Arc::clone(cluster);
    let started = std::thread::Builder::new()
        .name("join-cluster".into())
        .spawn(move || {
            let cmd = format!("join {}", cluster.self_id);
            let mut backoff = cluster.timeout;
            loop {
                if cluster.is_listed() {
                    backoff = cluster.timeout;
                    std::thread::sleep(cluster.timeout * 2);
                    continue;
                }
                for peer in cluster.peers() {
                    if ask_ok(&cluster, &peer, &cmd) {
                        break;
                    }
                }
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        });
    if let Err(e) = started {
        log::error!("cannot start the thread that joins the cluster: {e}");
    }
}

/// True when `member` answers and calls itself `member` in its `cluster-state`.
fn answers_as(cluster: &Cluster, member: &str) -> bool {
    Client::connect_tcp_timeout(member, cluster.timeout)
        .and_then(|mut c| {
            c.auth(&cluster.admin.0, &cluster.admin.1)?;
            c.call("cluster-state")
        })
        .is_ok_and(|reply| {
            reply
                .messages
                .first()
                .is_some_and(|line| line.contains(&format!(" {member}(self)")))
        })
}

/// Sends an admin command to `peer`; true when it answered `ok`.
fn ask_ok(cluster: &Cluster, peer: &str, cmd: &str) -> bool {
    Client::connect_tcp_timeout(peer, cluster.timeout)
        .and_then(|mut c| {
            c.auth(&cluster.admin.0, &cluster.admin.1)?;
            c.call(cmd)
        })
        .is_ok_and(|reply| reply.error.is_none())
}
