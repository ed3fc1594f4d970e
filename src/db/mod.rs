//! The databases map and everything stored in it.

mod database;
pub mod pattern;
pub mod security;

pub use database::{Database, Entry, WriteError, WriteOp, CONNECTIONS_KEY, TOKEN_KEY};

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use crate::protocol::Strategy;

/// Prefix of keys holding a user's hashed token.
pub const USER_KEY_PREFIX: &str = "$$user_";
/// Prefix of keys holding a user's permission spec (`$$permission_$<user>`).
pub const PERMISSION_KEY_PREFIX: &str = "$$permission_$";
/// The user a token-only session acts as.
pub const TOKEN_USER: &str = "all";

/// The key holding `user`'s token hash.
pub fn user_key(user: &str) -> String {
    format!("{USER_KEY_PREFIX}{user}")
}

/// The key holding `user`'s permission spec.
pub fn permission_key(user: &str) -> String {
    format!("{PERMISSION_KEY_PREFIX}{user}")
}

/// True for a valid database name: 1–128 ASCII letters, digits, `-`, `_` or `.`, not starting with `.`.
pub fn valid_db_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// All databases by name: the one global RwLock-guarded map.
#[derive(Debug, Default)]
pub struct Databases {
    map: RwLock<HashMap<String, Arc<Database>>>,
}

impl Databases {
    /// An empty map.
    pub fn new() -> Databases {
        Databases::default()
    }

    /// The database called `name`.
    pub fn get(&self, name: &str) -> Option<Arc<Database>> {
        self.map
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
    }

    /// Creates a database whose `$$token` holds `token_hash`; `None` if it already exists.
    pub fn create(
        &self,
        name: &str,
        token_hash: &str,
        strategy: Strategy,
    ) -> Option<Arc<Database>> {
        let mut map = self.map.write().unwrap_or_else(|e| e.into_inner());
        if map.contains_key(name) {
            return None;
        }
        let db = Arc::new(Database::new(name, strategy));
        let _ = db.write(TOKEN_KEY, WriteOp::Set(token_hash));
        map.insert(name.to_string(), Arc::clone(&db));
        Some(db)
    }

    /// Removes a database; false if there was none.
    pub fn delete(&self, name: &str) -> bool {
        let removed = self
            .map
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name);
        match removed {
            Some(db) => {
                db.mark_dropped();
                true
            }
            None => false,
        }
    }

    /// Sorted database names.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .map
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .cloned()
            .collect();
        names.sort();
        names
    }
}
