//! Command + Session -> effects on the databases and an [`Outcome`]. The one place where command
//! semantics live; knows nothing about sockets.

mod membership;
mod session;

pub use session::Session;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use crate::cluster::{forward, Cluster};
use crate::db::outbox::{self, Outbox};
use crate::db::security::{self, Access, Permissions};
use crate::db::{
    self, pattern, Database, WriteError, WriteOp, Written, CONNECTIONS_KEY, TOKEN_KEY, TOKEN_USER,
};
use crate::metrics;
use crate::node::Node;
use crate::protocol::Takeover;
use crate::protocol::{Command, Outcome, Strategy, VERBS};

const NOT_AUTH: &str = "Not auth";
const NO_DB: &str = "no-db-selected";
const READ_SECURITY: &str = "To read security keys you must auth as an admin!";
const WRITE_SECURITY: &str = "To write security keys you must auth as an admin!";
const PERMISSION_DENIED: &str = "permission denied";

/// Runs a write forwarded by a secondary as `user` on `db`, acknowledged like any write here,
/// and prefixes the reply with the LSN the secondary waits for before answering its client.
fn run_forwarded(node: &Arc<Node>, db: &str, user: &str, line: &str) -> Outcome {
    let mut s = Session::new(node, Outbox::discard());
    s.forwarded = true;
    s.admin = user == forward::ADMIN_USER;
    s.user = if user == "-" {
        String::new()
    } else {
        user.to_string()
    };
    if db != "-" {
        match node.dbs.get(db) {
            Some(d) => s.db = Some(d),
            None => return Outcome::error("Not a valid database name"),
        }
    }
    let internal = matches!(
        Command::parse(line),
        Ok(Command::Fwd { .. }
            | Command::ReplSync { .. }
            | Command::Election { .. }
            | Command::PreVote { .. }
            | Command::Victory { .. })
    );
    if internal {
        return Outcome::error("Only client commands can be forwarded");
    }
    let mut outcome = execute_line(&mut s, line);
    // The temporary session never counted itself in `$connections`.
    s.db = None;
    let lsn = outcome.lsn;
    acknowledge(node, std::slice::from_mut(&mut outcome));
    outcome.messages.insert(0, format!("fwd-lsn {lsn}"));
    outcome.lsn = 0;
    outcome
}

/// Parses and executes one command line. On a secondary, writes go to the primary.
pub fn execute_line(session: &mut Session, line: &str) -> Outcome {
    // Records this command appends go to the secondaries when its batch is acknowledged (or
    // when something waits for them), from this thread.
    let _ship = crate::storage::oplog::ship_later();
    let started = session.command_started();
    match Command::parse(line) {
        Ok(cmd) => {
            let node = session.node();
            if cmd.is_write() && !session.forwarded && !node.is_primary() {
                node.count_command();
                let outcome = forward(session, line);
                metrics::command_done(cmd.name(), outcome.error.is_none(), started.elapsed());
                return outcome;
            }
            execute(session, cmd, started)
        }
        Err(e) => Outcome::error(e),
    }
}

/// Sends a write to the primary for `session` (this node is not the primary).
fn forward(session: &mut Session, line: &str) -> Outcome {
    let node = session.node();
    // No cluster yet: the node is still starting and does not know who leads.
    let Some(cluster) = node.cluster() else {
        return Outcome::error(forward::NO_PRIMARY);
    };
    let db = session
        .db
        .as_ref()
        .map_or_else(|| "-".to_string(), |d| d.name().to_string());
    let user = if session.admin {
        forward::ADMIN_USER.to_string()
    } else if session.user.is_empty() {
        "-".to_string()
    } else {
        session.user.clone()
    };
    metrics::STATS
        .forwarded_writes
        .fetch_add(1, Ordering::Relaxed);
    forward::forward(cluster, &mut session.forwarder, &db, &user, line)
}

/// Executes one parsed command for `session`; its duration is counted from `started`, when its
/// line began to be handled.
fn execute(session: &mut Session, cmd: Command, started: Instant) -> Outcome {
    session.node().count_command();
    let verb = cmd.name();
    let outcome = match run(session, cmd) {
        Ok(outcome) => outcome,
        Err(outcome) => outcome,
    };
    let ended = Instant::now();
    metrics::command_done(
        verb,
        outcome.error.is_none(),
        ended.saturating_duration_since(started),
    );
    session.command_ended(ended);
    outcome
}

type Res = Result<Outcome, Outcome>;

fn require_admin(session: &Session) -> Result<(), Outcome> {
    if session.admin {
        Ok(())
    } else {
        Err(Outcome::error(NOT_AUTH))
    }
}

/// The session's database (borrowed: cloning its `Arc` on every command would make all
/// sessions of a database write one shared counter).
fn selected_db<'s>(session: &'s Session) -> Result<&'s Arc<Database>, Outcome> {
    match &session.db {
        Some(db) if !db.is_dropped() => Ok(db),
        _ => Err(Outcome {
            messages: vec![format!("error {NO_DB}")],
            error: Some(NO_DB.to_string()),
            ..Outcome::default()
        }),
    }
}

fn denied() -> Outcome {
    Outcome {
        messages: vec![PERMISSION_DENIED.to_string()],
        error: Some(format!("{PERMISSION_DENIED}\n")),
        ..Outcome::default()
    }
}

/// Checks `$$` protection and the session user's permission for `access` on `key`. The
/// permission spec is read once per session and again only after the database's `$$` keys
/// change (a `set-permissions`, `create-user`, new token...), so a command does not touch the
/// data lock for it.
fn check_key(session: &Session, db: &Database, access: Access, key: &str) -> Result<(), Outcome> {
    if key.starts_with("$$") && !session.admin {
        return Err(Outcome::error(if access == Access::Read {
            READ_SECURITY
        } else {
            WRITE_SECURITY
        }));
    }
    if session.admin {
        return Ok(());
    }
    let version = db.security_version();
    let mut cache = session.permissions.borrow_mut();
    let cached = match cache.as_ref() {
        Some(c) if c.version == version => c,
        _ => {
            // The version is read before the spec: a change in between is seen next time.
            let spec = db
                .get(&db::permission_key(&session.user))
                .map(|(v, _)| Permissions::parse(&v).map(Arc::new).map_err(|_| ()));
            cache.insert(session::CachedPermissions { version, spec })
        }
    };
    let allowed = match &cached.spec {
        None => session.user == TOKEN_USER,
        Some(Ok(p)) => p.allows(access, key),
        Some(Err(())) => false,
    };
    if allowed {
        Ok(())
    } else {
        Err(denied())
    }
}

fn check_writable(key: &str) -> Result<(), Outcome> {
    if key == CONNECTIONS_KEY {
        Err(Outcome::error(format!("{CONNECTIONS_KEY} is read only")))
    } else if key.starts_with(db::conflicts::CONFLICTS_PREFIX) {
        Err(Outcome::error(
            "Conflict records change only through resolve",
        ))
    } else {
        Ok(())
    }
}

/// Values of secret keys are stored hashed, whoever writes them.
fn stored_value<'a>(key: &str, value: &'a str) -> std::borrow::Cow<'a, str> {
    let secret = key == TOKEN_KEY || key.starts_with(db::USER_KEY_PREFIX);
    if secret && !security::is_hashed(value) {
        std::borrow::Cow::Owned(security::hash_secret(value))
    } else {
        std::borrow::Cow::Borrowed(value)
    }
}

/// A successful write's reply carries its LSN: the transport sends it only once that log record
/// is durable (see [`acknowledge`]).
fn write_result(r: Result<Written, WriteError>) -> Res {
    r.map(|w| Outcome::written(w.lsn)).map_err(|e| {
        let lsn = match &e {
            // The conflict record must be durable before the writer is told about it.
            WriteError::Unresolved { lsn, .. } => *lsn,
            _ => 0,
        };
        Outcome {
            lsn,
            ..Outcome::error(e.to_string())
        }
    })
}

/// `<prefix>[<version> ]<value>` in one allocation of the right size (`format!` guesses too
/// small for a long value and grows the string, a cost on every read).
fn reply_line(prefix: &str, version: Option<i32>, value: &str) -> String {
    let mut line = String::with_capacity(prefix.len() + 12 + value.len());
    line.push_str(prefix);
    if let Some(version) = version {
        use std::fmt::Write as _;
        let _ = write!(line, "{version} ");
    }
    line.push_str(value);
    line
}

/// Runs `read` on `db` and holds its answer back until what it read is committed (in a
/// cluster whose writes wait for a majority): the value may be a primary's write that a
/// majority does not have yet, or a change a cut-off node made that will be rolled back. The
/// database's last LSN, taken after the read, covers the change that wrote the value; if a
/// full sync replaced the contents meanwhile, that LSN belonged to the dropped history, so
/// the read is done again.
fn committed_read<T>(node: &Node, db: &Database, read: impl Fn() -> T) -> Result<T, Outcome> {
    let Some(cluster) = node.cluster() else {
        return Ok(read());
    };
    loop {
        let generation = db.generation();
        let answer = read();
        let lsn = db.last_lsn();
        if !cluster.is_visible(lsn) {
            if node.acks_locally() {
                return Ok(answer);
            }
            node.ship_owed();
            cluster.wait_visible(lsn).map_err(Outcome::error)?;
        }
        if db.generation() == generation {
            return Ok(answer);
        }
    }
}

/// A value write (`set`, `set-safe`): databases with the `arbiter` strategy turn conflicts into
/// conflict records for their arbiters, registered on this node or on any other.
fn write_value(node: &Node, db: &Database, key: &str, op: WriteOp<'_>) -> Res {
    if db.strategy() != Strategy::Arbiter {
        return write_result(db.write(key, op));
    }
    let online = db.has_arbiter() || node.cluster().is_some_and(|c| c.remote_arbiter(db.name()));
    write_result(db.write_arbitrated(key, op, online))
}

/// Makes every log record acknowledged by `outcomes` durable (one group flush for the whole
/// batch), turning their `ok` into the error if that fails (storage, or no quorum), then sends
/// the pushes the batch's changes made. For replies that go nowhere but back to the caller.
pub fn acknowledge(node: &Node, outcomes: &mut [Outcome]) {
    node.ship_owed();
    make_durable(node, outcomes);
    node.deliver(outbox::take_touched());
    node.refill_backlog();
}

/// [`acknowledge`] for a session's batch, with `encode` framing its replies for the transport.
/// Where a write is acknowledged once durable here, the replies wait in the session's outbox
/// for the log write (done by this thread, or by the one already writing) and the session goes
/// on reading. Where it waits for a majority, the batch is handed to the thread that learns of
/// the commit ([`Cluster::on_commit`]) and the session goes on reading; its next replies wait
/// for that one. Its own pushes always precede its replies. Acknowledged here, the outboxes
/// are released in the order the batch first queued into them (so watchers of its changes
/// usually get their pushes before it gets its replies, as Redis's subscribers do); after a
/// majority commit, its own pushes and replies go first, then everyone else's pushes. False
/// when the session closed.
pub fn acknowledge_and_reply(
    session: &Session,
    outcomes: &mut Vec<Outcome>,
    encode: impl FnOnce(&[Outcome]) -> Vec<u8> + Send + 'static,
) -> bool {
    let sent = answer(session, outcomes, encode);
    session.node().refill_backlog();
    sent
}

/// [`acknowledge_and_reply`] up to the replies being queued or handed over.
fn answer(
    session: &Session,
    outcomes: &mut Vec<Outcome>,
    encode: impl FnOnce(&[Outcome]) -> Vec<u8> + Send + 'static,
) -> bool {
    let node = session.node();
    let lsn = outcomes.iter().map(|o| o.lsn).max().unwrap_or(0);
    let local = lsn > 0 && node.acks_locally();
    if !local {
        // A majority waits for the secondaries: they get the records before this thread
        // writes its own log.
        node.ship_owed();
    }
    session.await_handoff();
    if local {
        let queued = session.outbox.queue(encode(outcomes), lsn);
        node.deliver_when_durable(outbox::take_touched());
        // The reply does not wait for the secondaries: they get the records after it.
        node.ship_owed();
        return queued && session.outbox.wait_for_room();
    }
    if let Some(cluster) = node.commit_handoff().filter(|_| lsn > 0) {
        // Durable here first (this thread writes the log); a storage error, or a commit that
        // is already there, is answered below at once.
        if node.wait_local_durable(lsn).is_ok() && !cluster.is_visible(lsn) {
            return hand_off(session, cluster, lsn, outcomes, encode);
        }
    }
    make_durable(node, outcomes);
    let touched = outbox::take_touched();
    let committed = node.settle(&touched);
    if committed {
        touched.release_first(&session.outbox);
    }
    let sent = session.outbox.reply(encode(outcomes));
    if committed {
        touched.release();
    } else {
        touched.abandon();
    }
    sent
}

/// Lets the thread that learns `lsn` committed (or refused) answer the batch: the pushes of its
/// changes, its replies (with the refusal on its writes if it failed), then everyone's pushes.
fn hand_off(
    session: &Session,
    cluster: &Cluster,
    lsn: u64,
    outcomes: &mut Vec<Outcome>,
    encode: impl FnOnce(&[Outcome]) -> Vec<u8> + Send + 'static,
) -> bool {
    let mut outcomes = std::mem::take(outcomes);
    let touched = outbox::take_touched();
    let outbox = session.outbox.clone();
    let node = Arc::downgrade(session.node());
    let handoff = session.hand_off();
    let started = Instant::now();
    cluster.on_commit(
        lsn,
        Box::new(move |result| {
            let committed = match result {
                Ok(()) => {
                    if let Some(node) = node.upgrade() {
                        node.replication_time.record(started.elapsed());
                    }
                    true
                }
                Err(e) => {
                    log::error!("write not acknowledged: {e}");
                    for o in outcomes
                        .iter_mut()
                        .filter(|o| o.lsn > 0 && o.error.is_none())
                    {
                        o.error = Some(e.clone());
                    }
                    false
                }
            };
            if committed {
                touched.release_first(&outbox);
            }
            outbox.queue(encode(&outcomes), 0);
            if committed {
                touched.release();
            } else {
                touched.abandon();
            }
            handoff.finish();
        }),
    );
    session.outbox.wait_for_room()
}

fn make_durable(node: &Node, outcomes: &mut [Outcome]) {
    let lsn = outcomes.iter().map(|o| o.lsn).max().unwrap_or(0);
    if lsn == 0 {
        return;
    }
    if let Err(e) = node.wait_durable(lsn) {
        log::error!("write not acknowledged: {e}");
        for o in outcomes
            .iter_mut()
            .filter(|o| o.lsn > 0 && o.error.is_none())
        {
            o.error = Some(e.clone());
        }
    }
}

/// `election` / `pre-vote` (`pre`) from a candidate node: this node's vote.
fn answer_candidate(
    session: &Session,
    pre: bool,
    term: u64,
    candidate: &str,
    their_log: (u64, u64),
) -> Res {
    require_admin(session)?;
    let node = session.node();
    let (Some(c), Some(log)) = (node.cluster(), node.log()) else {
        return Err(Outcome::error("Not a cluster node"));
    };
    let vote = c.answer_candidate(log, pre, term, candidate, their_log);
    Ok(Outcome::message(vote.line()))
}

fn run(session: &mut Session, cmd: Command) -> Res {
    let node = session.node();
    match cmd {
        Command::Ping => Ok(Outcome::message("pong")),
        Command::Auth { user, pwd } => {
            let ok = security::ct_eq(user.as_bytes(), node.config.admin_user.as_bytes())
                & security::ct_eq(pwd.as_bytes(), node.config.admin_pwd.as_bytes());
            if ok {
                session.admin = true;
                Ok(Outcome::message("valid auth"))
            } else {
                Ok(Outcome::message("invalid auth"))
            }
        }
        Command::UseDb { db, user, token } => {
            let database = node
                .dbs
                .get(db)
                .ok_or_else(|| Outcome::error("Not a valid database name"))?;
            let (stored, acting) = match &user {
                None => (database.get(TOKEN_KEY), TOKEN_USER.to_string()),
                Some(u) => (database.get(&db::user_key(u)), u.to_string()),
            };
            let valid = stored.is_some_and(|(hash, _)| security::verify_secret(token, &hash));
            if !valid {
                return Err(Outcome::error("Invalid token"));
            }
            session.select_db(database, acting);
            Ok(Outcome::ok())
        }
        Command::CreateDb {
            name,
            token,
            strategy,
        } => {
            require_admin(session)?;
            if !db::valid_db_name(name) {
                return Err(Outcome::error(format!("Invalid database name: {name}")));
            }
            match node
                .dbs
                .create(name, &security::hash_secret(token), strategy)
            {
                Ok(Some((_, lsn))) => Ok(Outcome {
                    lsn,
                    ..Outcome::message("create-db success")
                }),
                Ok(None) => Err(Outcome::error("database already exists")),
                Err(e) => Err(Outcome::error(e.to_string())),
            }
        }
        Command::DeleteDb { name } => {
            require_admin(session)?;
            match node.dbs.delete(name) {
                Ok(Some(lsn)) => Ok(Outcome::written(lsn)),
                Ok(None) => Err(Outcome::error("Not a valid database name")),
                Err(e) => Err(Outcome::error(e.to_string())),
            }
        }
        Command::Get { key } => {
            let start = metrics::sample_due().then(Instant::now);
            let db = selected_db(session)?;
            check_key(session, db, Access::Read, key)?;
            let message = committed_read(node, db, || {
                db.get_with(key, |value, _| reply_line("value ", None, value))
                    .unwrap_or_else(|| "value <Empty>".to_string())
            })?;
            if let Some(start) = start {
                node.get_time.record(start.elapsed());
            }
            Ok(Outcome::message(message))
        }
        Command::GetSafe { key } => {
            let db = selected_db(session)?;
            check_key(session, db, Access::Read, key)?;
            let message = committed_read(node, db, || {
                db.get_with(key, |v, version| {
                    reply_line("value-version ", Some(version), v)
                })
                .unwrap_or_else(|| "value-version 1 <Empty>".to_string())
            })?;
            Ok(Outcome::message(message))
        }
        Command::Set { key, value } => {
            let db = selected_db(session)?;
            check_key(session, db, Access::Write, key)?;
            check_writable(key)?;
            write_value(node, db, key, WriteOp::Set(&stored_value(key, value)))
        }
        Command::SetSafe {
            key,
            version,
            value,
        } => {
            let db = selected_db(session)?;
            check_key(session, db, Access::Write, key)?;
            check_writable(key)?;
            write_value(
                node,
                db,
                key,
                WriteOp::SetSafe(version, &stored_value(key, value)),
            )
        }
        Command::Increment { key, by } => {
            let db = selected_db(session)?;
            check_key(session, db, Access::Increment, key)?;
            check_writable(key)?;
            write_result(db.write(key, WriteOp::Increment(by)))
        }
        Command::Remove { key } => {
            let db = selected_db(session)?;
            if key == TOKEN_KEY {
                return Err(Outcome::error("The $$token key can not be removed"));
            }
            check_key(session, db, Access::Remove, key)?;
            check_writable(key)?;
            let written = db.write(key, WriteOp::Remove);
            if let (Ok(w), Some(c)) = (&written, node.cluster()) {
                if w.lsn == 0 {
                    c.confirm_leadership().map_err(Outcome::error)?;
                }
            }
            write_result(written)
        }
        Command::Keys { pattern } => {
            let db = selected_db(session)?;
            let admin = session.admin;
            let pattern = pattern.unwrap_or_default();
            let keys = committed_read(node, db, || {
                db.keys(|k| (admin || !k.starts_with("$$")) && pattern::matches(pattern, k))
            })?;
            let mut line = String::from("keys ");
            for k in keys {
                line.push(',');
                line.push_str(&k);
            }
            Ok(Outcome::message(line))
        }
        Command::Watch { key } => {
            let db = Arc::clone(selected_db(session)?);
            check_key(session, &db, Access::Read, key)?;
            db.watch(key, &session.outbox);
            if !session
                .watching
                .iter()
                .any(|(d, k)| Arc::ptr_eq(d, &db) && *k == key)
            {
                session.watching.push((db, key.to_string()));
            }
            Ok(Outcome::ok())
        }
        Command::Unwatch { key } => {
            let db = Arc::clone(selected_db(session)?);
            db.unwatch(key, session.outbox.id());
            session
                .watching
                .retain(|(d, k)| !(Arc::ptr_eq(d, &db) && *k == key));
            Ok(Outcome::ok())
        }
        Command::UnwatchAll => {
            session.unwatch_all();
            Ok(Outcome::ok())
        }
        Command::Snapshot { dbs, .. } => {
            require_admin(session)?;
            if let Some(missing) = dbs.iter().find(|d| node.dbs.get(d).is_none()) {
                return Err(Outcome::error(format!(
                    "Not a valid database name: {missing}"
                )));
            }
            node.snapshot()
                .map(|_| Outcome::ok())
                .map_err(|e| Outcome::error(format!("Snapshot failed: {e}")))
        }
        Command::Arbiter => {
            let db = Arc::clone(selected_db(session)?);
            let replay = db.add_arbiter(&session.outbox);
            if !session.arbiter_of.iter().any(|d| Arc::ptr_eq(d, &db)) {
                session.arbiter_of.push(db);
            }
            if let Some(cluster) = node.cluster() {
                // The primary detects conflicts: it must know this arbiter exists first.
                let generation = cluster.arbiters_changed();
                if !node.is_primary() && !cluster.wait_arbiters_reported(generation) {
                    log::warn!("the primary has not confirmed this node's arbiters yet");
                }
            }
            Ok(Outcome {
                messages: replay,
                ..Outcome::ok()
            })
        }
        Command::Resolve {
            opp_id,
            db: name,
            key,
            version: _,
            value,
        } => {
            let db = selected_db(session)?;
            if db.name() != name {
                return Err(Outcome::error(format!(
                    "resolve names database {} but the session uses {}",
                    name.chars().take(64).collect::<String>(),
                    db.name()
                )));
            }
            check_key(session, db, Access::Write, key)?;
            check_writable(key)?;
            write_result(db.resolve(key, opp_id, &stored_value(key, value)))
        }
        Command::CreateUser { user, token } => {
            require_admin(session)?;
            if user.starts_with('$') {
                return Err(Outcome::error("User names cannot start with $"));
            }
            let db = selected_db(session)?;
            write_result(db.write(
                &db::user_key(user),
                WriteOp::Set(&security::hash_secret(token)),
            ))
        }
        Command::SetPermissions { user, spec } => {
            require_admin(session)?;
            let db = selected_db(session)?;
            Permissions::parse(spec).map_err(Outcome::error)?;
            write_result(db.write(&db::permission_key(user), WriteOp::Set(spec)))
        }
        Command::ClusterState => {
            require_admin(session)?;
            Ok(Outcome::message(match node.cluster() {
                Some(c) => c.state_line(),
                None => format!("cluster-state  {}(self):Primary ", node.advertised_addr()),
            }))
        }
        Command::MetricsState => {
            require_admin(session)?;
            let (size, count) = node.log_stats();
            let (pending, lag) = match (node.cluster(), node.log()) {
                (Some(c), Some(l)) => (c.pending_ops(), c.max_lag(l.last_lsn())),
                _ => (0, 0),
            };
            Ok(Outcome::message(format!(
                "metrics-state pending_ops: {pending}, op_log_file_size: {size}, op_log_count: {count},replication_time_moving_avg: {:.3}, get_query_time_moving_avg: {:.3}, replication_lag: {lag}",
                node.replication_time.millis(),
                node.get_time.millis()
            )))
        }
        Command::ListCommands => {
            require_admin(session)?;
            let mut line = String::from("commands-list ");
            for verb in VERBS {
                line.push(',');
                line.push_str(verb);
            }
            Ok(Outcome::message(line))
        }
        Command::Debug { sub } => {
            require_admin(session)?;
            match sub {
                "process-info" => {
                    let dbs = node.dbs.all();
                    let entries: usize = dbs.iter().map(|d| d.stored_entries()).sum();
                    let (rss, threads) = crate::os::resident_kb_and_threads().unwrap_or((0, 0));
                    Ok(Outcome::message(format!(
                        "process-info uptime_secs: {}, sessions: {}, commands: {}, dbs: {}, \
                         stored_entries: {entries}, rss_kb: {rss}, threads: {threads}, heap_in_use_kb: {}",
                        node.started.elapsed().as_secs(),
                        node.sessions.load(Ordering::Relaxed),
                        node.commands(),
                        dbs.len(),
                        crate::os::heap_in_use() / 1024,
                    )))
                }
                "pending-ops" => Ok(Outcome::message(format!(
                    "pending-ops {}",
                    node.cluster().map_or(0, |c| c.pending_ops())
                ))),
                "force-election" => match node.cluster() {
                    Some(c) if !c.peers().is_empty() => {
                        c.force_election();
                        Ok(Outcome::ok())
                    }
                    _ => Ok(Outcome::ok()),
                },
                other => Err(Outcome::error(format!(
                    "Invalid debug command: {other} (try process-info, pending-ops, force-election)"
                ))),
            }
        }
        Command::Join { node: member } => {
            require_admin(session)?;
            Ok(membership::change(node, session, member, true))
        }
        Command::Leave { node: member } => {
            require_admin(session)?;
            Ok(membership::change(node, session, member, false))
        }
        Command::Election {
            term,
            candidate,
            last_term,
            last_lsn,
        } => answer_candidate(session, false, term, candidate, (last_term, last_lsn)),
        Command::PreVote {
            term,
            candidate,
            last_term,
            last_lsn,
        } => answer_candidate(session, true, term, candidate, (last_term, last_lsn)),
        Command::Victory { term, primary } => {
            require_admin(session)?;
            match node.cluster() {
                Some(c) if c.handle_victory(term, primary) => Ok(Outcome::ok()),
                _ => Err(Outcome::error("Stale term")),
            }
        }
        Command::ReplSync {
            after,
            after_term,
            node: peer,
        } => {
            require_admin(session)?;
            Ok(Outcome {
                takeover: Some(Takeover::Replicate {
                    after,
                    after_term,
                    node: peer.to_string(),
                }),
                ..Outcome::default()
            })
        }
        Command::Fwd {
            origin,
            db,
            user,
            line,
        } => {
            require_admin(session)?;
            if !node.is_primary() {
                return Err(Outcome::error("Not the primary"));
            }
            log::debug!("write forwarded by {origin}: {line}");
            Ok(run_forwarded(node, db, user, line))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    /// A restarted member's listeners open before it joins its cluster: until then it must not
    /// take writes itself (it did, and acknowledged writes that the cluster never saw).
    #[test]
    fn no_writes_before_the_cluster_is_joined() {
        let node = Node::new(Config::default());
        let mut session = Session::new(&node, Outbox::discard());
        session.admin = true;
        assert!(!node.is_primary());
        let refused = execute_line(&mut session, "create-db d t");
        assert_eq!(
            refused.error.as_deref(),
            Some("No primary is elected right now; retry shortly")
        );
        assert!(node.dbs.get("d").is_none());
        node.start_cluster().unwrap();
        assert!(node.is_primary());
        let created = execute_line(&mut session, "create-db d t");
        assert_eq!(created.error, None);
        assert!(node.dbs.get("d").is_some());
    }
}
