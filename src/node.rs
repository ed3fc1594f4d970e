//! The running node: configuration, databases and counters shared by every session.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use crate::config::Config;
use crate::db::Databases;

/// Shared state of one server process.
#[derive(Debug)]
pub struct Node {
    /// Settings.
    pub config: Config,
    /// All databases.
    pub dbs: Databases,
    /// When the node started.
    pub started: Instant,
    /// Commands executed, for `metrics-state` and `debug process-info`.
    pub commands: AtomicU64,
    /// Sessions currently open.
    pub sessions: AtomicU64,
    /// The TCP address actually bound (differs from the configured one with port 0).
    pub tcp_bound: OnceLock<SocketAddr>,
}

impl Node {
    /// A node with no databases.
    pub fn new(config: Config) -> Arc<Node> {
        Arc::new(Node {
            config,
            dbs: Databases::new(),
            started: Instant::now(),
            commands: AtomicU64::new(0),
            sessions: AtomicU64::new(0),
            tcp_bound: OnceLock::new(),
        })
    }

    /// The address this node advertises (external address, else its bound TCP address).
    pub fn advertised_addr(&self) -> String {
        if !self.config.external_addr.is_empty() {
            self.config.external_addr.clone()
        } else if let Some(addr) = self.tcp_bound.get() {
            addr.to_string()
        } else {
            self.config.tcp_addr.clone()
        }
    }

    /// Counts one more executed command.
    pub fn count_command(&self) {
        self.commands.fetch_add(1, Ordering::Relaxed);
    }
}
