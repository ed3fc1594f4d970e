//! `join` / `leave`: change the cluster's member list through the replicated log. The primary
//! logs a `members` record with the new list, one change at a time, and applies it once a
//! majority of the old list has it (Raft's single-server changes: the old and the new list
//! always share a majority, so two primaries can never be elected side by side); secondaries
//! apply it when they learn it committed. A secondary forwards the command to the primary.
//! With no primary elected, a change applies to the node it is sent to (and says so), so a
//! cluster that lost its majority for good can be repaired by hand.

use std::sync::Arc;

use super::Session;
use crate::cluster::membership;
use crate::node::Node;
use crate::protocol::Outcome;
use crate::storage::record::{Op, Record};

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
        return super::forward(session, &format!("{verb} {member}"));
    }
    if !local_only && !cluster.peers().is_empty() && !cluster.leads_a_majority() {
        // A primary cut off from its majority must not grow a majority of its own.
        return Outcome::error(
            "The primary does not reach a majority of its members; the member list cannot change now",
        );
    }
    if join
        && !cluster.members().iter().any(|m| m == member)
        && !membership::answers_as(cluster, member)
    {
        // A member that cannot answer (or knows itself by another name, so its acks would
        // never count) would count towards the majority and stall every write.
        return Outcome::error(format!(
            "{member} does not answer as {member}; start it first, with --external-address {member} (a node started with the member list joins by itself)"
        ));
    }
    let Some(_change) = cluster.begin_change() else {
        return Outcome::error("Another member change is in progress; retry shortly");
    };
    let Some(members) = cluster.proposed(member, join) else {
        return if join {
            Outcome::ok()
        } else {
            Outcome::error(format!("Not a member: {member}"))
        };
    };
    match (local_only, node.log()) {
        (false, Some(log)) => {
            let mut record = Record::cluster(Op::Members, members.join(","));
            let lsn = match log.append(&mut record) {
                Ok(lsn) => lsn,
                Err(e) => return Outcome::error(format!("Storage error: {e}")),
            };
            // Committed by a majority of the list in force until now.
            if let Err(e) = node.wait_durable(lsn) {
                return Outcome::error(e);
            }
            cluster.set_members(members);
        }
        _ => cluster.set_members(members),
    }
    log::info!("members are now {:?}", cluster.members());
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
