//! nun-db: a NunDB-compatible realtime key-value database.
//!
//! Data flows one way: bytes -> [`protocol`] -> [`exec`] -> [`db`] -> replies and watch
//! notifications -> session queue -> transport ([`server`]).

pub mod bench;
pub mod client;
pub mod cluster;
pub mod config;
pub mod db;
pub mod exec;
pub mod metrics;
pub mod node;
pub mod protocol;
pub mod server;
pub mod storage;
