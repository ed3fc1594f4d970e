//! Splitting a WebSocket frame or an HTTP body into individual command lines.

/// Every command verb the server knows, in the order `list-commands` reports them.
pub const VERBS: &[&str] = &[
    "auth",
    "use-db",
    "use",
    "create-db",
    "delete-db",
    "get",
    "get-safe",
    "set",
    "set-safe",
    "increment",
    "remove",
    "keys",
    "ls",
    "watch",
    "unwatch",
    "unwatch-all",
    "snapshot",
    "arbiter",
    "resolve",
    "create-user",
    "set-permissions",
    "cluster-state",
    "metrics-state",
    "list-commands",
    "debug",
    "ping",
    "join",
    "leave",
    "election",
    "pre-vote",
    "victory",
    "repl-sync",
    "fwd",
];

/// True when `text` (after optional spaces and empty commands) starts with a known verb followed by a space or the end.
fn starts_with_verb(text: &str) -> bool {
    let text = text.trim_start_matches([' ', '\t', '\r', '\n', ';']);
    let word_end = text
        .find(|c: char| c.is_ascii_whitespace() || c == ';')
        .unwrap_or(text.len());
    let word = &text[..word_end];
    VERBS.contains(&word)
}

/// Splits `text` into command lines at each `;` that is followed by a known command verb, so that a
/// value such as `a;b` survives. Surrounding whitespace is trimmed and empty commands are skipped.
pub fn split_commands(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    for_each_command(text, |c| out.push(c));
    out
}

/// Calls `f` with each command line of `text`, split as [`split_commands`] does (without
/// collecting them: a WebSocket frame usually holds one).
pub fn for_each_command<'a>(text: &'a str, mut f: impl FnMut(&'a str)) {
    let mut emit = |part: &'a str| {
        let part = part.trim_matches([' ', '\t', '\r', '\n']);
        if !part.is_empty() {
            f(part);
        }
    };
    let mut start = 0;
    for (i, _) in text.match_indices(';') {
        if i < start {
            continue;
        }
        let rest = &text[i + 1..];
        if starts_with_verb(rest) || rest.trim_matches([' ', ';']).is_empty() {
            emit(&text[start..i]);
            start = i + 1;
        }
    }
    emit(&text[start..]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_on_verbs_only() {
        assert_eq!(
            split_commands("use-db a b;set k a;b; get k"),
            vec!["use-db a b", "set k a;b", "get k"]
        );
    }

    #[test]
    fn tolerates_empty_and_trailing_separators() {
        assert_eq!(split_commands(";;ping;"), vec!["ping"]);
        assert_eq!(split_commands(""), Vec::<&str>::new());
        assert_eq!(split_commands(" ; "), Vec::<&str>::new());
    }

    #[test]
    fn keeps_semicolon_followed_by_non_verb() {
        assert_eq!(split_commands("set k x; y"), vec!["set k x; y"]);
        assert_eq!(split_commands("set k x;getter"), vec!["set k x;getter"]);
    }
}
