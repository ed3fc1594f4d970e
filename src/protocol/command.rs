//! One command line -> [`Command`]. Parse errors carry the exact text sent after `error `.

/// Conflict strategy of a database, chosen at `create-db`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    /// A stale `set-safe` is rejected with `Invalid version!`.
    None,
    /// A stale `set-safe` wins and the version becomes `old+1`.
    Newer,
    /// A stale `set-safe` is handed to an arbiter client.
    Arbiter,
}

impl Strategy {
    /// Parses the name used by `create-db` (`none`, `newer`, `arbiter`).
    pub fn parse(name: &str) -> Option<Strategy> {
        match name {
            "none" => Some(Strategy::None),
            "newer" => Some(Strategy::Newer),
            "arbiter" => Some(Strategy::Arbiter),
            _ => None,
        }
    }

    /// The name used by `create-db`.
    pub fn name(self) -> &'static str {
        match self {
            Strategy::None => "none",
            Strategy::Newer => "newer",
            Strategy::Arbiter => "arbiter",
        }
    }

    /// NunDB's numeric code in its `.madadata` files (0 none, 1 newer, 2 arbiter).
    pub fn code(self) -> i32 {
        match self {
            Strategy::None => 0,
            Strategy::Newer => 1,
            Strategy::Arbiter => 2,
        }
    }

    /// Inverse of [`Strategy::code`].
    pub fn from_code(code: i32) -> Option<Strategy> {
        match code {
            0 => Some(Strategy::None),
            1 => Some(Strategy::Newer),
            2 => Some(Strategy::Arbiter),
            _ => None,
        }
    }
}

/// A parsed request; its words borrow from the line, so parsing allocates nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command<'a> {
    /// `auth <user> <pwd>`: become admin.
    Auth { user: &'a str, pwd: &'a str },
    /// `use-db <db> [<user>] <token>`: select a database.
    UseDb {
        db: &'a str,
        user: Option<&'a str>,
        token: &'a str,
    },
    /// `create-db <name> <token> [strategy]`.
    CreateDb {
        name: &'a str,
        token: &'a str,
        strategy: Strategy,
    },
    /// `delete-db <name>`.
    DeleteDb { name: &'a str },
    /// `get <key>`.
    Get { key: &'a str },
    /// `get-safe <key>`: value with its version.
    GetSafe { key: &'a str },
    /// `set <key> <value…>`.
    Set { key: &'a str, value: &'a str },
    /// `set-safe <key> <version> <value…>`.
    SetSafe {
        key: &'a str,
        version: i32,
        value: &'a str,
    },
    /// `increment <key> [n]`.
    Increment { key: &'a str, by: i64 },
    /// `remove <key>`.
    Remove { key: &'a str },
    /// `keys [pattern]` / `ls [pattern]`.
    Keys { pattern: Option<&'a str> },
    /// `watch <key>`.
    Watch { key: &'a str },
    /// `unwatch <key>`.
    Unwatch { key: &'a str },
    /// `unwatch-all`.
    UnwatchAll,
    /// `snapshot [reclaim] [db1|db2…]`.
    Snapshot { reclaim: bool, dbs: Vec<&'a str> },
    /// `arbiter`: register as the conflict arbiter of the selected db.
    Arbiter,
    /// `resolve <opp_id> <db> <key> <version> <value…>`.
    Resolve {
        opp_id: &'a str,
        db: &'a str,
        key: &'a str,
        version: i32,
        value: &'a str,
    },
    /// `create-user <user> <token>`.
    CreateUser { user: &'a str, token: &'a str },
    /// `set-permissions <user> <spec>`.
    SetPermissions { user: &'a str, spec: &'a str },
    /// `cluster-state`.
    ClusterState,
    /// `metrics-state`.
    MetricsState,
    /// `list-commands`.
    ListCommands,
    /// `debug <sub>`.
    Debug { sub: &'a str },
    /// `ping`.
    Ping,
    /// `join <node>`.
    Join { node: &'a str },
    /// `leave <node>`.
    Leave { node: &'a str },
    /// `election <term> <candidate> <last_term> <last_lsn>` (between nodes).
    Election {
        term: u64,
        candidate: &'a str,
        last_term: u64,
        last_lsn: u64,
    },
    /// `pre-vote <term> <candidate> <last_term> <last_lsn>`: would you vote for me in `term`?
    /// Asked before a real election, changes nothing (between nodes).
    PreVote {
        term: u64,
        candidate: &'a str,
        last_term: u64,
        last_lsn: u64,
    },
    /// `victory <term> <primary>` (between nodes).
    Victory { term: u64, primary: &'a str },
    /// `repl-sync <after_lsn> <after_term> <node>`: stream the log (between nodes).
    ReplSync {
        after: u64,
        after_term: u64,
        node: &'a str,
    },
    /// `fwd <origin> <db|-> <user|-|$admin> <command…>`: a write forwarded by secondary `origin`.
    Fwd {
        origin: &'a str,
        db: &'a str,
        user: &'a str,
        line: &'a str,
    },
}

/// Splits off the next space-separated word; returns (word, rest after one separator).
/// A byte loop: words are short, so it beats `find`'s searcher set-up.
fn next_word(text: &str) -> (&str, &str) {
    let start = text.bytes().position(|b| b != b' ').unwrap_or(text.len());
    let text = &text[start..];
    match text.bytes().position(|b| b == b' ') {
        Some(i) => (&text[..i], &text[i + 1..]),
        None => (text, ""),
    }
}

/// Collects up to `n` words and the free text after them.
fn words(text: &str, n: usize) -> (Vec<&str>, &str) {
    let mut out = Vec::with_capacity(n);
    let mut rest = text;
    for _ in 0..n {
        let (w, r) = next_word(rest);
        if w.is_empty() {
            break;
        }
        out.push(w);
        rest = r;
    }
    (out, rest)
}

fn usage(text: &str) -> String {
    format!("Invalid command, usage: {text}")
}

fn number(text: &str) -> Result<u64, String> {
    text.parse::<u64>()
        .map_err(|_| format!("Invalid number: {}", printable(text)))
}

/// Request versions are -1 (plain set) or more; -2 marks keys in conflict and is never accepted.
fn parse_version(text: &str) -> Result<i32, String> {
    text.parse::<i32>()
        .ok()
        .filter(|v| *v >= -1)
        .ok_or_else(|| format!("Invalid version number: {}", printable(text)))
}

impl<'a> Command<'a> {
    /// Parses one command line (no trailing newline). The error is the message after `error `.
    pub fn parse(line: &'a str) -> Result<Command<'a>, String> {
        let line = line.trim_end_matches(['\r', '\n']);
        if super::scan::has_line_break(line.as_bytes()) {
            // A line break would let one command smuggle another into line-framed streams.
            return Err("Invalid command: line breaks are not allowed inside a command".into());
        }
        let (verb, args) = next_word(line);
        let exact = |n: usize, text: &str| -> Result<Vec<&'a str>, String> {
            let all: Vec<&str> = args.split(' ').filter(|w| !w.is_empty()).collect();
            if all.len() == n {
                Ok(all)
            } else {
                Err(usage(text))
            }
        };
        // One word and nothing else (the common case: no vector for the words).
        let key = |text: &str| -> Result<&'a str, String> {
            let (word, rest) = next_word(args);
            if word.is_empty() || !rest.trim_start_matches(' ').is_empty() {
                return Err(usage(text));
            }
            Ok(word)
        };
        let cmd = match verb {
            "auth" => {
                let mut a = exact(2, "auth <user> <pwd>")?;
                let pwd = a.remove(1);
                Command::Auth {
                    user: a.remove(0),
                    pwd,
                }
            }
            "use-db" | "use" => {
                let all: Vec<&str> = args.split(' ').filter(|w| !w.is_empty()).collect();
                match all.as_slice() {
                    [db, token] => Command::UseDb {
                        db,
                        user: None,
                        token,
                    },
                    [db, user, token] => Command::UseDb {
                        db,
                        user: Some(user),
                        token,
                    },
                    _ => return Err(usage("use-db <db> [<user>] <token>")),
                }
            }
            "create-db" => {
                let all: Vec<&str> = args.split(' ').filter(|w| !w.is_empty()).collect();
                let text = "create-db <name> <token> [none|newer|arbiter]";
                let (name, token, strategy) = match all.as_slice() {
                    [name, token] => (name, token, Strategy::None),
                    [name, token, s] => (
                        name,
                        token,
                        Strategy::parse(s).ok_or_else(|| format!("Invalid strategy: {s}"))?,
                    ),
                    _ => return Err(usage(text)),
                };
                Command::CreateDb {
                    name,
                    token,
                    strategy,
                }
            }
            "delete-db" => Command::DeleteDb {
                name: key("delete-db <name>")?,
            },
            "get" => Command::Get {
                key: key("get <key>")?,
            },
            "get-safe" => Command::GetSafe {
                key: key("get-safe <key>")?,
            },
            "set" => {
                let (key, value) = next_word(args);
                if key.is_empty() {
                    return Err(usage("set <key> <value>"));
                }
                Command::Set { key, value }
            }
            "set-safe" => {
                let (w, value) = words(args, 2);
                if w.len() < 2 {
                    return Err(usage("set-safe <key> <version> <value>"));
                }
                Command::SetSafe {
                    key: w[0],
                    version: parse_version(w[1])?,
                    value,
                }
            }
            "increment" => {
                let all: Vec<&str> = args.split(' ').filter(|w| !w.is_empty()).collect();
                let (key, by) = match all.as_slice() {
                    [key] => (key, 1),
                    [key, n] => (
                        key,
                        n.parse::<i64>()
                            .map_err(|_| format!("Invalid increment value: {n}"))?,
                    ),
                    _ => return Err(usage("increment <key> [n]")),
                };
                Command::Increment { key, by }
            }
            "remove" => Command::Remove {
                key: key("remove <key>")?,
            },
            "keys" | "ls" => {
                let all: Vec<&str> = args.split(' ').filter(|w| !w.is_empty()).collect();
                match all.as_slice() {
                    [] => Command::Keys { pattern: None },
                    [p] => Command::Keys { pattern: Some(p) },
                    _ => return Err(usage("keys [pattern]")),
                }
            }
            "watch" => Command::Watch {
                key: key("watch <key>")?,
            },
            "unwatch" => Command::Unwatch {
                key: key("unwatch <key>")?,
            },
            "unwatch-all" => {
                exact(0, "unwatch-all")?;
                Command::UnwatchAll
            }
            "snapshot" => {
                let mut reclaim = false;
                let mut dbs = Vec::new();
                for w in args.split(' ').filter(|w| !w.is_empty()) {
                    if w == "reclaim" && !reclaim && dbs.is_empty() {
                        reclaim = true;
                    } else {
                        dbs.extend(w.split('|').filter(|d| !d.is_empty()));
                    }
                }
                Command::Snapshot { reclaim, dbs }
            }
            "arbiter" => {
                exact(0, "arbiter")?;
                Command::Arbiter
            }
            "resolve" => {
                let (w, value) = words(args, 4);
                if w.len() < 4 {
                    return Err(usage("resolve <opp_id> <db> <key> <version> <value>"));
                }
                Command::Resolve {
                    opp_id: w[0],
                    db: w[1],
                    key: w[2],
                    // Informational (the key's next version is the server's to pick): arbiters
                    // echo the offered version, -2 for a conflict queued behind another.
                    version: w[3]
                        .parse()
                        .map_err(|_| format!("Invalid version number: {}", printable(w[3])))?,
                    value,
                }
            }
            "create-user" => {
                let mut a = exact(2, "create-user <user> <token>")?;
                let token = a.remove(1);
                Command::CreateUser {
                    user: a.remove(0),
                    token,
                }
            }
            "set-permissions" => {
                let (w, spec) = words(args, 1);
                if w.is_empty() || spec.trim().is_empty() {
                    return Err(usage("set-permissions <user> <spec>"));
                }
                Command::SetPermissions {
                    user: w[0],
                    spec: spec.trim(),
                }
            }
            "cluster-state" => Command::ClusterState,
            "metrics-state" => Command::MetricsState,
            "list-commands" => Command::ListCommands,
            "debug" => Command::Debug { sub: args.trim() },
            "ping" => Command::Ping,
            "join" => Command::Join {
                node: key("join <node>")?,
            },
            "leave" => Command::Leave {
                node: key("leave <node>")?,
            },
            "election" => {
                let a = exact(4, "election <term> <candidate> <last_term> <last_lsn>")?;
                Command::Election {
                    term: number(a[0])?,
                    candidate: a[1],
                    last_term: number(a[2])?,
                    last_lsn: number(a[3])?,
                }
            }
            "pre-vote" => {
                let a = exact(4, "pre-vote <term> <candidate> <last_term> <last_lsn>")?;
                Command::PreVote {
                    term: number(a[0])?,
                    candidate: a[1],
                    last_term: number(a[2])?,
                    last_lsn: number(a[3])?,
                }
            }
            "victory" => {
                let a = exact(2, "victory <term> <primary>")?;
                Command::Victory {
                    term: number(a[0])?,
                    primary: a[1],
                }
            }
            "repl-sync" => {
                let a = exact(3, "repl-sync <after_lsn> <after_term> <node>")?;
                Command::ReplSync {
                    after: number(a[0])?,
                    after_term: number(a[1])?,
                    node: a[2],
                }
            }
            "fwd" => {
                let (w, line) = words(args, 3);
                if w.len() < 3 || line.is_empty() {
                    return Err(usage("fwd <origin> <db> <user> <command>"));
                }
                Command::Fwd {
                    origin: w[0],
                    db: w[1],
                    user: w[2],
                    line,
                }
            }
            other => return Err(format!("unknown command: {}", printable(other))),
        };
        Ok(cmd)
    }

    /// The command's canonical verb (aliases give their main name), for metrics labels.
    pub fn name(&self) -> &'static str {
        match self {
            Command::Auth { .. } => "auth",
            Command::UseDb { .. } => "use-db",
            Command::CreateDb { .. } => "create-db",
            Command::DeleteDb { .. } => "delete-db",
            Command::Get { .. } => "get",
            Command::GetSafe { .. } => "get-safe",
            Command::Set { .. } => "set",
            Command::SetSafe { .. } => "set-safe",
            Command::Increment { .. } => "increment",
            Command::Remove { .. } => "remove",
            Command::Keys { .. } => "keys",
            Command::Watch { .. } => "watch",
            Command::Unwatch { .. } => "unwatch",
            Command::UnwatchAll => "unwatch-all",
            Command::Snapshot { .. } => "snapshot",
            Command::Arbiter => "arbiter",
            Command::Resolve { .. } => "resolve",
            Command::CreateUser { .. } => "create-user",
            Command::SetPermissions { .. } => "set-permissions",
            Command::ClusterState => "cluster-state",
            Command::MetricsState => "metrics-state",
            Command::ListCommands => "list-commands",
            Command::Debug { .. } => "debug",
            Command::Ping => "ping",
            Command::Join { .. } => "join",
            Command::Leave { .. } => "leave",
            Command::Election { .. } => "election",
            Command::PreVote { .. } => "pre-vote",
            Command::Victory { .. } => "victory",
            Command::ReplSync { .. } => "repl-sync",
            Command::Fwd { .. } => "fwd",
        }
    }

    /// True for commands that change data (forwarded to the primary in a cluster).
    pub fn is_write(&self) -> bool {
        matches!(
            self,
            Command::CreateDb { .. }
                | Command::DeleteDb { .. }
                | Command::Set { .. }
                | Command::SetSafe { .. }
                | Command::Increment { .. }
                | Command::Remove { .. }
                | Command::CreateUser { .. }
                | Command::SetPermissions { .. }
                | Command::Snapshot { .. }
                | Command::Resolve { .. }
        )
    }
}

/// Echoes a client-supplied word in an error without letting it flood the reply.
fn printable(word: &str) -> String {
    const MAX: usize = 64;
    if word.len() <= MAX {
        word.to_string()
    } else {
        let mut end = MAX;
        while !word.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}…", &word[..end])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_keeps_spaces_in_value() {
        assert_eq!(
            Command::parse("set name mateus freira").unwrap(),
            Command::Set {
                key: "name",
                value: "mateus freira"
            }
        );
    }

    #[test]
    fn set_safe_and_resolve_take_free_text() {
        assert_eq!(
            Command::parse("set-safe k 3 a b;c").unwrap(),
            Command::SetSafe {
                key: "k",
                version: 3,
                value: "a b;c"
            }
        );
        assert_eq!(
            Command::parse("resolve 7 db k 2 v w").unwrap(),
            Command::Resolve {
                opp_id: "7",
                db: "db",
                key: "k",
                version: 2,
                value: "v w"
            }
        );
    }

    #[test]
    fn line_breaks_inside_a_command_are_refused_anywhere() {
        let refused = "Invalid command: line breaks are not allowed inside a command";
        let long = "v".repeat(300);
        for value in ["a\rb", "a\nb", "\ra", "a\r\nb"] {
            for line in [
                format!("set k {value}"),
                format!("set k {long}{value}{long}"),
            ] {
                assert_eq!(Command::parse(&line).unwrap_err(), refused, "{line:?}");
            }
        }
        // At the very end they are a line ending, not part of the command.
        assert_eq!(
            Command::parse(&format!("set k {long}\r\n")).unwrap(),
            Command::Set {
                key: "k",
                value: &long
            }
        );
    }

    #[test]
    fn errors_are_exact() {
        assert_eq!(Command::parse("foo").unwrap_err(), "unknown command: foo");
        assert_eq!(
            Command::parse("set-safe k x v").unwrap_err(),
            "Invalid version number: x"
        );
        assert!(Command::parse("get").is_err());
        assert!(Command::parse("get a b").is_err());
    }

    #[test]
    fn use_db_forms() {
        assert_eq!(
            Command::parse("use db u t").unwrap(),
            Command::UseDb {
                db: "db",
                user: Some("u"),
                token: "t"
            }
        );
        assert_eq!(
            Command::parse("use-db db t").unwrap(),
            Command::UseDb {
                db: "db",
                user: None,
                token: "t"
            }
        );
    }

    #[test]
    fn line_breaks_and_low_versions_are_refused() {
        assert!(Command::parse("set k v\nfwd d $admin set $$token x").is_err());
        assert!(Command::parse("set k a\rb").is_err());
        assert!(Command::parse("set k v\r\n").is_ok());
        assert!(Command::parse("set-safe k -2 v").is_err());
        assert!(Command::parse("set-safe k -1 v").is_ok());
    }

    #[test]
    fn long_unknown_verb_is_truncated() {
        let long = "x".repeat(10_000);
        assert!(Command::parse(&long).unwrap_err().len() < 100);
    }
}
