//! nun-db: a NunDB-compatible realtime key-value database.
//!
//! Data flows one way: bytes -> [`protocol`] -> [`exec`] -> [`node`] -> [`db`] (+ [`storage`],
//! [`cluster`]) -> replies and watch pushes -> the session's outbox ([`db::outbox`]) -> socket.
//! Imports point down only: [`server`] -> [`exec`] -> [`node`] -> [`cluster`] / [`storage`] /
//! [`db`] -> [`protocol`].

pub mod bench;
pub mod client;
pub mod cluster;
pub mod config;
pub mod db;
pub mod exec;
pub mod metrics;
pub mod node;
pub mod os;
pub mod packed;
pub mod protocol;
pub mod server;
pub mod storage;
pub mod sync;
