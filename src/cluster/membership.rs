//! Who is in the cluster. The member list lives in the replicated log (`members` records for
//! each `join`/`leave`, and every term-start record restates it; see `exec::membership`), and
//! each node keeps the list it last applied in `cluster.members`. A node started with itself
//! in NUN_REPLICATE_ADDR asks to join until a list it applied names it (and stops for good if
//! a later one drops it).

use std::sync::Arc;
use std::time::Duration;

use super::Cluster;
use crate::client::Client;

/// Until a member list this node applied names it (it was just started), asks the peers to
/// let it join: a node added to a running cluster only has to be started with the member list.
pub fn announce_self(cluster: &Arc<Cluster>) {
    let cluster = Arc::clone(cluster);
    let started = std::thread::Builder::new()
        .name("join-cluster".into())
        .spawn(move || {
            let cmd = format!("join {}", cluster.self_id);
            let mut backoff = cluster.timeout;
            loop {
                if cluster.is_listed() || cluster.was_removed() {
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
pub fn answers_as(cluster: &Cluster, member: &str) -> bool {
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
