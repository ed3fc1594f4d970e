//! Secrets (tokens, passwords) stored salted and hashed, compared in constant time; and the
//! per-user permission specs (`rw pre*,*suf|r *`).

use rand::RngCore;
use sha2::{Digest, Sha256};

use super::pattern;

const HASH_PREFIX: &str = "sha256$";

/// Byte-wise comparison whose time does not depend on where the inputs differ.
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = u8::from(a.len() != b.len());
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0xff);
        diff |= x ^ y;
    }
    diff == 0
}

fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn digest(salt: &str, secret: &str) -> String {
    let mut h = Sha256::new();
    h.update(salt.as_bytes());
    h.update(b"\0");
    h.update(secret.as_bytes());
    to_hex(&h.finalize())
}

/// Salts and hashes a secret for storage: `sha256$<salt>$<hex digest>`.
pub fn hash_secret(secret: &str) -> String {
    let mut salt = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut salt);
    let salt = to_hex(&salt);
    format!("{HASH_PREFIX}{salt}${}", digest(&salt, secret))
}

/// True when `stored` already is a hash made by [`hash_secret`].
pub fn is_hashed(stored: &str) -> bool {
    stored.starts_with(HASH_PREFIX)
}

/// Checks `secret` against a stored value: a hash from [`hash_secret`], or a plain value
/// (as NunDB stores tokens; such values are re-hashed on import).
pub fn verify_secret(secret: &str, stored: &str) -> bool {
    match stored
        .strip_prefix(HASH_PREFIX)
        .and_then(|rest| rest.split_once('$'))
    {
        Some((salt, hex)) => ct_eq(digest(salt, secret).as_bytes(), hex.as_bytes()),
        None => ct_eq(secret.as_bytes(), stored.as_bytes()),
    }
}

/// An operation checked against permissions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// get, get-safe, watch.
    Read,
    /// set, set-safe.
    Write,
    /// increment.
    Increment,
    /// remove.
    Remove,
}

impl Access {
    fn letter(self) -> char {
        match self {
            Access::Read => 'r',
            Access::Write => 'w',
            Access::Increment => 'i',
            Access::Remove => 'x',
        }
    }
}

/// A parsed permission spec: `|`-separated entries of `<letters> <comma-separated patterns>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Permissions {
    entries: Vec<(String, Vec<String>)>,
}

impl Permissions {
    /// Parses a spec; the error is a client-facing message.
    pub fn parse(spec: &str) -> Result<Permissions, String> {
        let mut entries = Vec::new();
        for entry in spec.split('|').map(str::trim).filter(|e| !e.is_empty()) {
            let (letters, patterns) = entry
                .split_once(' ')
                .ok_or_else(|| format!("Invalid permission entry: {entry}"))?;
            if letters.is_empty() || !letters.chars().all(|c| "rwix".contains(c)) {
                return Err(format!(
                    "Invalid permission letters: {letters} (use r, w, i, x)"
                ));
            }
            let patterns: Vec<String> = patterns
                .split(',')
                .map(str::trim)
                .filter(|p| !p.is_empty())
                .map(str::to_string)
                .collect();
            if patterns.is_empty() {
                return Err(format!("Invalid permission entry: {entry}"));
            }
            entries.push((letters.to_string(), patterns));
        }
        if entries.is_empty() {
            return Err("Invalid permission spec".to_string());
        }
        Ok(Permissions { entries })
    }

    /// True when some entry grants `access` on `key`.
    pub fn allows(&self, access: Access, key: &str) -> bool {
        let letter = access.letter();
        self.entries.iter().any(|(letters, patterns)| {
            letters.contains(letter) && patterns.iter().any(|p| pattern::matches(p, key))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_verify_and_differ_by_salt() {
        let a = hash_secret("pwd");
        let b = hash_secret("pwd");
        assert_ne!(a, b);
        assert!(verify_secret("pwd", &a));
        assert!(!verify_secret("pwx", &a));
        assert!(verify_secret("plain", "plain"));
        assert!(!verify_secret("plain", "plainx"));
        assert!(!a.contains("pwd"));
    }

    #[test]
    fn ct_eq_cases() {
        assert!(ct_eq(b"abc", b"abc"));
        assert!(!ct_eq(b"abc", b"abd"));
        assert!(!ct_eq(b"abc", b"ab"));
        assert!(!ct_eq(b"", b"a"));
        assert!(ct_eq(b"", b""));
    }

    #[test]
    fn permissions() {
        let p = Permissions::parse("rw pub*,*-mine|r *").unwrap();
        assert!(p.allows(Access::Write, "pub1"));
        assert!(p.allows(Access::Write, "x-mine"));
        assert!(!p.allows(Access::Write, "secret"));
        assert!(p.allows(Access::Read, "secret"));
        assert!(!p.allows(Access::Remove, "pub1"));
        assert!(Permissions::parse("q *").is_err());
        assert!(Permissions::parse("r").is_err());
    }
}
