//! Key patterns shared by `keys` and permission specs: `pre*`, `*suf`, `*`, else substring.

/// True when `key` matches `pattern`.
pub fn matches(pattern: &str, key: &str) -> bool {
    if pattern == "*" || pattern.is_empty() {
        true
    } else if let Some(prefix) = pattern.strip_suffix('*') {
        key.starts_with(prefix)
    } else if let Some(suffix) = pattern.strip_prefix('*') {
        key.ends_with(suffix)
    } else {
        key.contains(pattern)
    }
}

#[cfg(test)]
mod tests {
    use super::matches;

    #[test]
    fn pattern_kinds() {
        assert!(matches("ab*", "abc"));
        assert!(!matches("ab*", "cab"));
        assert!(matches("*bc", "abc"));
        assert!(!matches("*bc", "bca"));
        assert!(matches("b", "abc"));
        assert!(matches("*", "x"));
    }
}
