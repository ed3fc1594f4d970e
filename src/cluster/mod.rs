//! Cluster state: members, this node's role and term, votes, and replication progress.
//! `election.rs` changes roles, `replication.rs` moves log records from the primary to
//! secondaries (`shipping.rs`: who writes a secondary's stream), `forward.rs` sends writes that
//! reach a secondary to the primary.

pub mod election;
pub mod forward;
pub mod membership;
pub mod replication;
pub mod shipping;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::sync::Condition;
use std::time::{Duration, Instant};

/// What this node currently is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Takes writes and streams its log to secondaries.
    Primary,
    /// Follows the primary's log and forwards writes to it.
    Secondary,
    /// Asking the others for votes.
    Candidate,
}

/// Write concern: when a write is acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteQuorum {
    /// Durable on a majority of the configured members.
    Majority,
    /// Durable on the primary only (NunDB's behaviour).
    One,
}

#[derive(Debug)]
struct State {
    term: u64,
    voted_for: Option<String>,
    /// Changed only through [`State::set_role`], which keeps [`CommitWatch::leading`] in step.
    role: Role,
    /// The commit point and role as writers waiting for their commit see them (shared).
    watch: Arc<CommitWatch>,
    primary: Option<String>,
    /// When this node last heard from a primary of its term (secondaries) or started leading.
    last_heard: Instant,
    /// Highest LSN each secondary acknowledged as durable, and when it last did.
    acks: HashMap<String, (u64, Instant)>,
    /// Highest LSN known committed: durable on enough members for the write concern, so no
    /// later primary can lose it. Secondaries apply and everyone notifies watchers only up to it.
    commit: u64,
    /// Highest LSN durable in this node's own log (what the primary counts for itself).
    durable: u64,
    /// LSN of this primary's term-start record: the commit point may only move to or past it.
    term_start: u64,
    /// Databases with arbiters on each secondary, as last reported, and when.
    remote_arbiters: HashMap<String, (Vec<String>, Instant)>,
    /// Arbiter reports (by generation) to confirm to each secondary.
    arbiter_confirms: HashMap<String, u64>,
    /// Highest generation of this node's arbiter report the primary confirmed.
    arbiters_confirmed: u64,
    /// The next election skips the pre-vote (`debug force-election`).
    force_next: bool,
}

/// Prepares this node to lead `term` before it starts taking writes (applies the log it
/// inherited, logs the term-start record); returns that record's LSN.
pub struct ElectedHook(pub Box<dyn Fn(u64) -> Result<u64, String> + Send + Sync>);

impl std::fmt::Debug for ElectedHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ElectedHook")
    }
}

/// The answer to a read of data this node cannot show yet: changes not committed by a majority.
pub const NOT_COMMITTED: &str =
    "This node holds changes a majority has not confirmed (it may be cut off); retry shortly";

/// Membership and role of this node.
#[derive(Debug)]
pub struct Cluster {
    /// This node's name as the others know it (its advertised TCP address).
    pub self_id: String,
    members: Mutex<Vec<String>>,
    state: Mutex<State>,
    /// Signalled when the role, the primary, the members or an arbiter confirmation change (not
    /// the commit point: writers wait on [`CommitWatch`]).
    changed: Condition,
    /// Admin credentials, also used between nodes.
    pub admin: (String, String),
    /// Election timeout.
    pub timeout: Duration,
    quorum: WriteQuorum,
    term_file: Option<PathBuf>,
    /// LSN applied locally (on secondaries: received through replication).
    applied: AtomicU64,
    applied_lock: Mutex<()>,
    applied_cv: Condition,
    /// Writes waiting for the quorum.
    pending: AtomicU64,
    /// The commit point and role for lock-free checks and commit waits (shared with the state).
    watch: Arc<CommitWatch>,
    /// A writer is polling the commit point ([`Cluster::await_commit`]).
    spinning: AtomicBool,
    /// Work waiting for a commit ([`Cluster::on_commit`]): LSN, deadline, what to run.
    commit_waits: CommitWaits,
    /// Run when this node wins an election, before it takes writes.
    on_elected: std::sync::OnceLock<ElectedHook>,
    /// Serializes appending and applying replicated records with taking over as primary.
    replica: Mutex<()>,
    /// Bumped whenever this node's arbiter sessions change (secondaries report them).
    arbiter_gen: AtomicU64,
    /// Held by the one member change (`join`/`leave`) in progress.
    changing: Mutex<()>,
    /// No member but this node (kept with the list, for hot paths that must not lock it).
    alone: AtomicBool,
    /// The member list this node applied from the log included it.
    listed: AtomicBool,
    /// A member list applied since start-up dropped this node (`leave`): it stops asking to
    /// join, or `leave` would be undone by the node it removed.
    removed: AtomicBool,
    /// The primary's log end as last heard (secondaries, for `replication_lag`).
    primary_lsn: AtomicU64,
    /// This primary's streams to its secondaries ([`Cluster::ship`]).
    streams: shipping::Streams,
    /// A copy of the state's `durable` mark, for a check without the lock.
    durable_seen: AtomicU64,
}

/// The member list file kept next to the term file.
fn members_file(term_file: &Path) -> PathBuf {
    term_file.with_file_name("cluster.members")
}

impl State {
    /// Changes this node's role and publishes whether it leads (waking writers waiting for a
    /// commit when it stops leading).
    fn set_role(&mut self, role: Role) {
        let demoted = self.role == Role::Primary && role != Role::Primary;
        self.role = role;
        self.watch
            .leading
            .store(role == Role::Primary, Ordering::Release);
        if demoted {
            self.watch.signal();
        }
    }

    /// Moves the commit point to `lsn` and tells the writers waiting for it.
    fn set_commit(&mut self, lsn: u64) {
        self.commit = lsn;
        self.watch.committed.store(lsn, Ordering::Release);
        self.watch.signal();
    }
}

/// What writers waiting for their change to commit look at without the state lock (which the
/// acknowledgement readers take for every ack): the commit point, whether this node leads, and
/// a condition signalled when either moves.
#[derive(Debug, Default)]
struct CommitWatch {
    /// A copy of the state's commit point.
    committed: AtomicU64,
    /// The state's `role == Primary`.
    leading: AtomicBool,
    /// Held by a waiter between its check and its sleep, so no signal falls in between.
    gate: Mutex<()>,
    moved: Condition,
}

impl CommitWatch {
    /// Wakes the waiters, if any.
    fn signal(&self) {
        drop(lock(&self.gate));
        self.moved.notify_all();
    }
}

/// How a wait for a commit ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CommitWait {
    Committed,
    NotPrimary,
    TimedOut,
}

/// Work to run once a change is committed (`Ok`), or the refusal its writer is told when it
/// cannot be (this node stopped leading, or no majority acknowledged in time).
pub type OnCommit = Box<dyn FnOnce(Result<(), String>) + Send>;

/// The list behind [`Cluster::on_commit`]: LSN, deadline, work.
#[derive(Default)]
struct CommitWaits(Mutex<Vec<(u64, Instant, OnCommit)>>);

impl std::fmt::Debug for CommitWaits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CommitWaits({})", lock(&self.0).len())
    }
}

/// What a write still waiting for its commit is told when this node no longer leads.
const NOT_PRIMARY_ANY_MORE: &str = "Not the primary any more; the write may not be durable";

/// How long a writer polls for its commit before it sleeps.
const COMMIT_SPIN: Duration = Duration::from_micros(200);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The highest log position that at least `need` of `marks` have reached.
fn reached_by(marks: impl Iterator<Item = u64> + Clone, need: usize) -> u64 {
    marks
        .clone()
        .filter(|&mark| marks.clone().filter(|&m| m >= mark).count() >= need)
        .max()
        .unwrap_or(0)
}

impl Cluster {
    /// A cluster of `members` (this node is added if missing). A single member is primary at once.
    pub fn new(
        self_id: String,
        members: &[String],
        admin: (String, String),
        timeout: Duration,
        quorum: WriteQuorum,
        term_file: Option<PathBuf>,
    ) -> Cluster {
        // The member list this node last applied from the log wins over the configured one
        // (which only seeds a new cluster, and names the peers a new node asks to join).
        let saved: Option<Vec<String>> = term_file
            .as_ref()
            .and_then(|p| std::fs::read_to_string(members_file(p)).ok())
            .map(|text| text.split_whitespace().map(str::to_string).collect())
            .filter(|list: &Vec<String>| !list.is_empty());
        let listed = saved.as_ref().is_some_and(|l| l.contains(&self_id));
        let mut all: Vec<String> = match saved {
            Some(list) => list,
            None => members.iter().cloned().chain([self_id.clone()]).collect(),
        };
        all.sort();
        all.dedup();
        let (term, voted_for) = term_file
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .and_then(|t| {
                let mut parts = t.split_whitespace();
                let term = parts.next()?.parse().ok()?;
                Some((term, parts.next().map(str::to_string)))
            })
            .unwrap_or((0, None));
        let single = all.len() == 1;
        let watch = Arc::new(CommitWatch {
            leading: AtomicBool::new(single),
            ..CommitWatch::default()
        });
        Cluster {
            watch: Arc::clone(&watch),
            spinning: AtomicBool::new(false),
            commit_waits: CommitWaits::default(),
            state: Mutex::new(State {
                watch,
                term: if single { term.max(1) } else { term },
                voted_for,
                role: if single {
                    Role::Primary
                } else {
                    Role::Secondary
                },
                primary: single.then(|| self_id.clone()),
                last_heard: Instant::now(),
                acks: HashMap::new(),
                commit: 0,
                durable: 0,
                term_start: 0,
                remote_arbiters: HashMap::new(),
                arbiter_confirms: HashMap::new(),
                arbiters_confirmed: 0,
                force_next: false,
            }),
            self_id,
            members: Mutex::new(all),
            changed: Condition::new(),
            admin,
            timeout,
            quorum,
            term_file,
            applied: AtomicU64::new(0),
            applied_lock: Mutex::new(()),
            applied_cv: Condition::new(),
            pending: AtomicU64::new(0),
            on_elected: std::sync::OnceLock::new(),
            replica: Mutex::new(()),
            arbiter_gen: AtomicU64::new(0),
            changing: Mutex::new(()),
            alone: AtomicBool::new(single),
            listed: AtomicBool::new(listed),
            removed: AtomicBool::new(false),
            primary_lsn: AtomicU64::new(0),
            streams: shipping::Streams::default(),
            durable_seen: AtomicU64::new(0),
        }
    }

    /// Held while replicated records are appended or applied, and while taking over as primary,
    /// so a promoted node never receives a record from its former primary behind its back.
    pub fn replica_guard(&self) -> MutexGuard<'_, ()> {
        lock(&self.replica)
    }

    /// Sets what runs when this node wins an election (see [`ElectedHook`]).
    pub fn set_elected_hook(&self, hook: ElectedHook) {
        let _ = self.on_elected.set(hook);
    }

    /// Sorted member names (including this node).
    pub fn members(&self) -> Vec<String> {
        lock(&self.members).clone()
    }

    /// Members other than this node.
    pub fn peers(&self) -> Vec<String> {
        self.members()
            .into_iter()
            .filter(|m| *m != self.self_id)
            .collect()
    }

    /// True when this node is the only member (same as `peers().is_empty()`, without a copy).
    pub fn is_alone(&self) -> bool {
        self.alone.load(Ordering::Acquire)
    }

    /// Votes needed for a majority of the configured members.
    pub fn majority(&self) -> usize {
        lock(&self.members).len() / 2 + 1
    }

    /// The member list after adding (`join`) or removing `node`; `None` when that changes
    /// nothing.
    pub fn proposed(&self, node: &str, join: bool) -> Option<Vec<String>> {
        let mut m = self.members();
        let before = m.len();
        if join {
            m.push(node.to_string());
            m.sort();
            m.dedup();
        } else {
            m.retain(|x| x != node);
        }
        (m.len() != before).then_some(m)
    }

    /// Starts a member change; `None` while another is in progress (one change at a time, so
    /// the old and the new list always share a majority).
    pub fn begin_change(&self) -> Option<MutexGuard<'_, ()>> {
        match self.changing.try_lock() {
            Ok(guard) => Some(guard),
            Err(std::sync::TryLockError::Poisoned(e)) => Some(e.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => None,
        }
    }

    /// Applies a member list: from a committed `members` or term-start record of the log, a
    /// full sync, or a repair by hand when no primary is elected. Persisted, so a restart
    /// keeps it.
    pub fn set_members(&self, mut members: Vec<String>) {
        members.sort();
        members.dedup();
        if members.is_empty() {
            return;
        }
        let listed = members.contains(&self.self_id);
        if self.listed.swap(listed, Ordering::AcqRel) && !listed {
            log::warn!("{} was removed from the cluster", self.self_id);
            self.removed.store(true, Ordering::Release);
        }
        let mut m = lock(&self.members);
        if *m == members {
            return;
        }
        let added = members.iter().any(|x| !m.contains(x));
        self.save_members(&members);
        self.alone.store(
            members.iter().all(|x| *x == self.self_id),
            Ordering::Release,
        );
        *m = members;
        drop(m);
        self.forget_acks_of_non_members();
        if added {
            // A primary gives a newcomer a full timeout to start acknowledging before it
            // counts it as unreachable (a single node that grows would step down at once).
            let mut s = lock(&self.state);
            if s.role == Role::Primary {
                s.last_heard = Instant::now();
            }
        }
        self.changed.notify_all();
    }

    /// Drops what removed members acknowledged: a node that still follows after `leave` must
    /// not count towards the majority.
    fn forget_acks_of_non_members(&self) {
        let members = self.members();
        lock(&self.state).acks.retain(|m, _| members.contains(m));
    }

    /// True once this node leads, or a member list it applied from the log included it.
    pub fn is_listed(&self) -> bool {
        self.is_primary() || self.listed.load(Ordering::Acquire)
    }

    /// True once a member list applied since start-up dropped this node.
    pub fn was_removed(&self) -> bool {
        self.removed.load(Ordering::Acquire)
    }

    /// True while this node is in its own member list (a removed node stops calling elections).
    pub fn is_member(&self) -> bool {
        lock(&self.members).contains(&self.self_id)
    }

    /// (role, term, primary).
    pub fn status(&self) -> (Role, u64, Option<String>) {
        let s = lock(&self.state);
        (s.role, s.term, s.primary.clone())
    }

    /// True while this node takes `primary` for the primary.
    pub fn follows(&self, primary: &str) -> bool {
        lock(&self.state).primary.as_deref() == Some(primary)
    }

    /// True when this node accepts writes.
    pub fn is_primary(&self) -> bool {
        self.watch.leading.load(Ordering::Acquire)
    }

    /// The current term.
    pub fn term(&self) -> u64 {
        lock(&self.state).term
    }

    fn persist(&self, s: &State) {
        if let Some(path) = &self.term_file {
            let text = format!("{} {}\n", s.term, s.voted_for.as_deref().unwrap_or("-"));
            if let Err(e) = crate::storage::write_durably(path, &text) {
                log::error!("cannot persist the election term: {e}");
            }
        }
    }

    /// Saves the member list (after `join`, `leave` or the primary's list changed it), so a
    /// restart with an older `--replicate-address` still knows the members that joined.
    fn save_members(&self, members: &[String]) {
        if let Some(path) = &self.term_file {
            if let Err(e) =
                crate::storage::write_durably(&members_file(path), &(members.join("\n") + "\n"))
            {
                log::error!("cannot persist the member list: {e}");
            }
        }
    }

    /// Moves to a newer term (forgetting the vote); a primary steps down. Returns false if
    /// `term` is older than ours.
    fn observe_term(&self, s: &mut State, term: u64) -> bool {
        if term < s.term {
            return false;
        }
        if term > s.term {
            s.term = term;
            s.voted_for = None;
            if s.role != Role::Secondary {
                log::info!("term {term} is newer: {} becomes secondary", self.self_id);
            }
            s.set_role(Role::Secondary);
            s.primary = None;
            self.persist(s);
            self.changed.notify_all();
        }
        true
    }

    /// This node cannot follow `primary` (the stream failed or went silent): it counts as not
    /// heard from for a whole timeout, so the election timer need not wait for another one.
    /// Pre-votes keep this from deposing a primary the other members still hear.
    pub fn primary_lost(&self, primary: &str) {
        let mut s = lock(&self.state);
        if s.role == Role::Secondary && s.primary.as_deref() == Some(primary) {
            let lost = Instant::now()
                .checked_sub(self.timeout)
                .unwrap_or_else(Instant::now);
            s.last_heard = s.last_heard.min(lost);
        }
    }

    /// A heartbeat or record from `primary` in `term` arrived. False if the term is stale.
    pub fn heard_from_primary(&self, term: u64, primary: &str) -> bool {
        let mut s = lock(&self.state);
        if !self.observe_term(&mut s, term) {
            return false;
        }
        if s.role == Role::Primary && primary != self.self_id {
            return false;
        }
        if s.primary.as_deref() != Some(primary) {
            s.primary = Some(primary.to_string());
            s.set_role(Role::Secondary);
            // A term has one primary: never vote for another candidate in it.
            if s.voted_for.is_none() {
                s.voted_for = Some(primary.to_string());
                self.persist(&s);
            }
            self.changed.notify_all();
        }
        s.last_heard = Instant::now();
        true
    }

    /// Records that `node` has `lsn` durable. True when the commit point moved.
    pub fn record_ack(&self, node: &str, lsn: u64) -> bool {
        let moved = {
            let mut s = lock(&self.state);
            let entry = s
                .acks
                .entry(node.to_string())
                .or_insert((0, Instant::now()));
            entry.0 = entry.0.max(lsn);
            entry.1 = Instant::now();
            self.advance_commit(&mut s)
        };
        if moved {
            self.fire_commit_waits();
        }
        moved
    }

    /// Records that this node's own log is durable up to `lsn`. True when the commit point moved.
    pub fn note_durable(&self, lsn: u64) -> bool {
        // Every write of a group flush notes it: only the first takes the state lock.
        if lsn <= self.durable_seen.load(Ordering::Acquire) {
            return false;
        }
        let moved = {
            let mut s = lock(&self.state);
            if lsn <= s.durable {
                return false;
            }
            s.durable = lsn;
            let moved = self.advance_commit(&mut s);
            // After the commit point: a writer that skips the lock on this mark must find its
            // record committed (where the commit follows this node's log alone).
            self.durable_seen.store(lsn, Ordering::Release);
            moved
        };
        if moved {
            self.fire_commit_waits();
        }
        moved
    }

    /// Sets this node's durable mark to exactly `lsn`, its whole log (a new primary, before it
    /// leads): a higher mark left from a tail that a full sync discarded must not count.
    pub fn reset_durable(&self, lsn: u64) {
        let mut s = lock(&self.state);
        s.durable = lsn;
        self.durable_seen.store(lsn, Ordering::Release);
    }

    /// On the primary, moves the commit point to the highest LSN durable on enough members
    /// (its own term's records only: they commit the prefix they extend).
    fn advance_commit(&self, s: &mut State) -> bool {
        if s.role != Role::Primary {
            return false;
        }
        let candidate = match self.quorum {
            WriteQuorum::One => s.durable,
            WriteQuorum::Majority => {
                let members = lock(&self.members);
                // How far each member has the log: the others' acknowledgements and this
                // node's own durable mark. Counted in place (a few members), not collected and
                // sorted: this runs once per group flush.
                let marks = members
                    .iter()
                    .filter(|m| **m != self.self_id)
                    .map(|m| s.acks.get(m).map_or(0, |a| a.0))
                    .chain(std::iter::once(s.durable));
                // A majority: members.len() / 2 + 1 of them (or all, when fewer are known).
                reached_by(marks.clone(), (members.len() / 2 + 1).min(marks.count()))
            }
        };
        if candidate > s.commit && candidate >= s.term_start {
            // Writers wait for the commit on the watch; `changed` is for role changes, and a
            // thread woken on it per write costs a context switch per write.
            s.set_commit(candidate);
            return true;
        }
        false
    }

    /// Waits (up to one election timeout) until the change logged as `lsn` is committed, so
    /// a reader is never shown a change a later primary could roll back: a primary's own
    /// writes are in memory before a majority has them, and a node that lost its primary may
    /// hold changes that never committed.
    pub fn wait_visible(&self, lsn: u64) -> Result<(), String> {
        match self.await_commit(lsn, self.timeout, false) {
            CommitWait::Committed => Ok(()),
            _ => Err(NOT_COMMITTED.to_string()),
        }
    }

    /// True when the change logged as `lsn` is committed (a lock-free check).
    pub fn is_visible(&self, lsn: u64) -> bool {
        lsn == 0 || self.watch.committed.load(Ordering::Acquire) >= lsn
    }

    /// The highest LSN known committed.
    pub fn commit(&self) -> u64 {
        lock(&self.state).commit
    }

    /// The highest LSN known committed, read without the state lock.
    pub fn committed(&self) -> u64 {
        self.watch.committed.load(Ordering::Acquire)
    }

    /// The primary's streams to its secondaries.
    pub fn streams(&self) -> &shipping::Streams {
        &self.streams
    }

    /// Writes new records of `log` and the commit point to every secondary stream no other
    /// thread is writing (see `shipping.rs`); never blocks.
    pub fn ship(&self, log: &crate::storage::oplog::OpLog) {
        self.streams.ship(log, self);
    }

    /// A secondary learned from its primary that everything up to `lsn` is committed.
    pub fn set_commit(&self, lsn: u64) {
        let mut s = lock(&self.state);
        if lsn > s.commit {
            s.set_commit(lsn);
        }
    }

    /// Waits until `lsn` is committed (watch pushes wait for this). False when this node stops
    /// being primary first, or after five election timeouts: the change may be rolled back, so
    /// the watcher is disconnected rather than told.
    pub fn wait_commit(&self, lsn: u64) -> bool {
        self.await_commit(lsn, self.timeout * 5, true) == CommitWait::Committed
    }

    /// Waits up to `timeout` until `lsn` is committed (or, with `as_primary`, this node stops
    /// leading). A writer alone first polls for up to [`COMMIT_SPIN`], yielding the core: an
    /// acknowledgement usually comes within it, and a sleeping writer costs a wake-up.
    fn await_commit(&self, lsn: u64, timeout: Duration, as_primary: bool) -> CommitWait {
        let watch = &self.watch;
        let check = || {
            if watch.committed.load(Ordering::Acquire) >= lsn {
                Some(CommitWait::Committed)
            } else if as_primary && !watch.leading.load(Ordering::Acquire) {
                Some(CommitWait::NotPrimary)
            } else {
                None
            }
        };
        if let Some(done) = check() {
            return done;
        }
        // Only a lone writer polls: with others waiting too, the core is better spent on them.
        if self.pending.load(Ordering::Relaxed) <= 1 && !self.spinning.swap(true, Ordering::Acquire)
        {
            let started = Instant::now();
            let mut done = None;
            while done.is_none() && started.elapsed() < COMMIT_SPIN {
                std::thread::yield_now();
                done = check();
            }
            self.spinning.store(false, Ordering::Release);
            if let Some(done) = done {
                return done;
            }
        }
        let deadline = Instant::now() + timeout;
        let mut gate = lock(&watch.gate);
        loop {
            if let Some(done) = check() {
                return done;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return CommitWait::TimedOut;
            }
            gate = watch.moved.wait_timeout(gate, left);
        }
    }

    /// Waits up to `timeout` for `decide` to answer about the state, re-asking on every change.
    /// On timeout, returns the state as it was then (to explain the failure).
    fn wait_state<T>(
        &self,
        timeout: Duration,
        mut decide: impl FnMut(&State) -> Option<T>,
    ) -> Result<T, MutexGuard<'_, State>> {
        let deadline = Instant::now() + timeout;
        let mut s = lock(&self.state);
        loop {
            if let Some(answer) = decide(&s) {
                return Ok(answer);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(s);
            }
            s = self.changed.wait_timeout(s, left);
        }
    }

    /// True when this node leads and a majority of its members (itself included) acknowledged
    /// within the election timeout: only then may the member list change.
    pub fn leads_a_majority(&self) -> bool {
        let s = lock(&self.state);
        s.role == Role::Primary && self.reachable(&s) + 1 >= self.majority()
    }

    /// Members (other than us) that acknowledged something within the election timeout.
    fn reachable(&self, s: &State) -> usize {
        let members = lock(&self.members);
        s.acks
            .iter()
            .filter(|(m, (_, at))| at.elapsed() < self.timeout && members.contains(m))
            .count()
    }

    /// Waits until `lsn` is durable on enough members for the write concern. The caller has
    /// already made it durable locally.
    /// Returns whether it had to wait at all (not with `NUN_WRITE_QUORUM=1` or alone).
    pub fn wait_quorum(&self, lsn: u64) -> Result<bool, String> {
        let needed = match self.quorum {
            WriteQuorum::One => return Ok(false),
            WriteQuorum::Majority => self.majority(),
        };
        if needed <= 1 || lsn == 0 {
            return Ok(false);
        }
        self.pending.fetch_add(1, Ordering::Relaxed);
        let result = match self.await_commit(lsn, self.timeout * 5, true) {
            CommitWait::Committed => Ok(()),
            CommitWait::NotPrimary => Err(NOT_PRIMARY_ANY_MORE.to_string()),
            CommitWait::TimedOut => Err(self.unconfirmed(lsn)),
        };
        self.pending.fetch_sub(1, Ordering::Relaxed);
        result.map(|()| true)
    }

    /// The refusal of a write `lsn` that a majority did not acknowledge in time.
    fn unconfirmed(&self, lsn: u64) -> String {
        let needed = self.majority();
        let s = lock(&self.state);
        let members = lock(&self.members);
        let have = 1 + s
            .acks
            .iter()
            .filter(|(m, (l, _))| *l >= lsn && members.contains(m))
            .count();
        format!("Write not confirmed by a majority ({have} of {needed} members)")
    }

    /// True when secondaries' acknowledgements move the commit point (majority writes), so
    /// each frame must be acknowledged at once. With `NUN_WRITE_QUORUM=1` the commit follows
    /// this node's own log, and acknowledgements only report progress and liveness.
    pub fn commits_on_acks(&self) -> bool {
        self.quorum == WriteQuorum::Majority
    }

    /// True when a write is acknowledged once a majority has it (not `NUN_WRITE_QUORUM=1`,
    /// and this node has peers).
    pub fn waits_for_majority(&self) -> bool {
        self.quorum == WriteQuorum::Majority && !self.is_alone()
    }

    /// Runs `done` on whichever thread decides it: the one that moves the commit point to
    /// `lsn` (usually the reader of a secondary's acknowledgement), or the election tick once
    /// this node stops leading or five election timeouts pass (then with the refusal
    /// [`Cluster::wait_quorum`] would give). Never waits. Lets a writer's reply be sent by the
    /// thread that learns of the commit instead of waking the writer to send it.
    pub fn on_commit(&self, lsn: u64, done: OnCommit) {
        lock(&self.commit_waits.0).push((lsn, Instant::now() + self.timeout * 5, done));
        // The commit point may have moved before the wait was listed.
        self.fire_commit_waits();
    }

    /// Runs the work of [`Cluster::on_commit`] that is decided now.
    pub fn fire_commit_waits(&self) {
        let (ready, committed, leading) = {
            let mut waits = lock(&self.commit_waits.0);
            if waits.is_empty() {
                return;
            }
            let now = Instant::now();
            // Read under the list's lock: a commit stored after this fires the waits again.
            let committed = self.watch.committed.load(Ordering::Acquire);
            let leading = self.watch.leading.load(Ordering::Acquire);
            let (ready, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut *waits)
                .into_iter()
                .partition(|(lsn, deadline, _)| *lsn <= committed || !leading || *deadline <= now);
            *waits = rest;
            (ready, committed, leading)
        };
        for (lsn, _, done) in ready {
            done(if lsn <= committed {
                Ok(())
            } else if !leading {
                Err(NOT_PRIMARY_ANY_MORE.to_string())
            } else {
                Err(self.unconfirmed(lsn))
            });
        }
    }

    /// For a write that changed nothing (a remove of a missing key), so there is no record
    /// for a majority to acknowledge: succeeds while this node is primary and a majority
    /// acknowledged something within the election timeout, so a primary cut off from the
    /// others stops confirming even these within one timeout.
    pub fn confirm_leadership(&self) -> Result<(), String> {
        let needed = match self.quorum {
            WriteQuorum::One => return Ok(()),
            WriteQuorum::Majority => self.majority(),
        };
        let s = lock(&self.state);
        if s.role != Role::Primary {
            return Err("Not the primary any more; the write may not be durable".to_string());
        }
        let have = self.reachable(&s) + 1;
        if have < needed {
            return Err(format!(
                "Write not confirmed by a majority ({have} of {needed} members)"
            ));
        }
        Ok(())
    }

    /// Writes waiting for the quorum.
    pub fn pending_ops(&self) -> u64 {
        self.pending.load(Ordering::Relaxed)
    }

    /// Records that everything up to `lsn` is applied locally.
    pub fn set_applied(&self, lsn: u64) {
        self.applied.fetch_max(lsn, Ordering::AcqRel);
        let _g = lock(&self.applied_lock);
        self.applied_cv.notify_all();
    }

    /// Waits (up to `timeout`, while this node hears its primary) until `lsn` is applied
    /// locally: read-your-writes after forwarding.
    pub fn wait_applied(&self, lsn: u64, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let slice = (self.timeout / 4).max(Duration::from_millis(10));
        let mut g = lock(&self.applied_lock);
        while self.applied.load(Ordering::Acquire) < lsn {
            let left = deadline.saturating_duration_since(Instant::now());
            // A node that stopped hearing its primary will not get the change soon.
            if left.is_zero() || !self.hears_primary(self.timeout / 2) {
                return false;
            }
            g = self.applied_cv.wait_timeout(g, left.min(slice));
        }
        true
    }

    /// True when this node follows a primary it heard from within `within`.
    fn hears_primary(&self, within: Duration) -> bool {
        let s = lock(&self.state);
        s.role == Role::Secondary && s.primary.is_some() && s.last_heard.elapsed() < within
    }

    /// Replication lag in LSNs: on the primary, of its slowest member; on a secondary, how far
    /// its log is behind the primary's (as of the primary's last heartbeat or commit point).
    pub fn max_lag(&self, last_lsn: u64) -> u64 {
        let s = lock(&self.state);
        if s.role != Role::Primary {
            let primary = self.primary_lsn.load(Ordering::Acquire).max(s.commit);
            return primary.saturating_sub(last_lsn);
        }
        self.peers()
            .iter()
            .map(|p| last_lsn.saturating_sub(s.acks.get(p).map_or(0, |a| a.0)))
            .max()
            .unwrap_or(0)
    }

    /// On the primary, how many records each other member trails its log (`last_lsn`) by.
    pub fn member_lags(&self, last_lsn: u64) -> Vec<(String, u64)> {
        let s = lock(&self.state);
        if s.role != Role::Primary {
            return Vec::new();
        }
        self.peers()
            .into_iter()
            .map(|p| {
                let lag = last_lsn.saturating_sub(s.acks.get(&p).map_or(0, |a| a.0));
                (p, lag)
            })
            .collect()
    }

    /// A secondary heard the primary's log end (`ping` on the replication stream; 0 when it
    /// starts following another primary).
    pub fn note_primary_lsn(&self, lsn: u64) {
        self.primary_lsn.store(lsn, Ordering::Release);
    }

    /// Notes that this node's arbiter sessions changed; returns the generation to report.
    pub fn arbiters_changed(&self) -> u64 {
        self.arbiter_gen.fetch_add(1, Ordering::AcqRel) + 1
    }

    /// The current generation of this node's arbiter sessions.
    pub fn arbiter_gen(&self) -> u64 {
        self.arbiter_gen.load(Ordering::Acquire)
    }

    /// Waits (up to two election timeouts) until the primary confirmed this node's arbiter
    /// report of `generation` or a later one.
    pub fn wait_arbiters_reported(&self, generation: u64) -> bool {
        self.wait_state(self.timeout * 2, |s| {
            (s.arbiters_confirmed >= generation).then_some(())
        })
        .is_ok()
    }

    /// The primary confirmed this node's arbiter report `generation` (secondary side).
    pub fn confirm_arbiters(&self, generation: u64) {
        let mut s = lock(&self.state);
        if generation > s.arbiters_confirmed {
            s.arbiters_confirmed = generation;
            self.changed.notify_all();
        }
    }

    /// Secondary `peer` reports arbiters on `dbs` (primary side); the confirmation goes back
    /// on its replication stream.
    pub fn set_remote_arbiters(&self, peer: &str, generation: u64, dbs: Vec<String>) {
        let mut s = lock(&self.state);
        s.remote_arbiters
            .insert(peer.to_string(), (dbs, Instant::now()));
        s.arbiter_confirms.insert(peer.to_string(), generation);
    }

    /// The arbiter report generation to confirm to `peer`, once.
    pub fn take_arbiter_confirm(&self, peer: &str) -> Option<u64> {
        lock(&self.state).arbiter_confirms.remove(peer)
    }

    /// True when a secondary recently reported an arbiter on database `db`.
    pub fn remote_arbiter(&self, db: &str) -> bool {
        let s = lock(&self.state);
        s.remote_arbiters
            .values()
            .any(|(dbs, at)| at.elapsed() < self.timeout * 3 && dbs.iter().any(|d| d == db))
    }

    /// NunDB's `cluster-state` line.
    pub fn state_line(&self) -> String {
        let s = lock(&self.state);
        let members = self.members();
        let parts: Vec<String> = members
            .iter()
            .map(|m| {
                let status = if *m == self.self_id {
                    "self"
                } else if s
                    .acks
                    .get(m)
                    .is_some_and(|(_, at)| at.elapsed() < self.timeout)
                    || (s.primary.as_deref() == Some(m.as_str())
                        && s.last_heard.elapsed() < self.timeout)
                {
                    "Connected"
                } else {
                    "Disconnected"
                };
                let role = if s.primary.as_deref() == Some(m.as_str()) {
                    "Primary"
                } else {
                    "Secoundary"
                };
                format!(" {m}({status}):{role} ")
            })
            .collect();
        format!("cluster-state {}", parts.join(","))
    }

    /// Waits until the role or primary changes, or `timeout` passes.
    pub fn wait_change(&self, timeout: Duration) {
        let s = lock(&self.state);
        drop(self.changed.wait_timeout(s, timeout));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_commit_point_is_the_highest_mark_a_majority_reached() {
        assert_eq!(reached_by([7u64].into_iter(), 1), 7);
        assert_eq!(reached_by([5u64, 9, 7].into_iter(), 2), 7);
        assert_eq!(reached_by([0u64, 0, 4].into_iter(), 2), 0);
        // The same as sorting the marks and taking the need-th highest, for every order.
        for seed in 0..500u64 {
            let n = (seed % 7 + 1) as usize;
            let marks: Vec<u64> = (0..n as u64).map(|i| (seed * 31 + i * 17) % 9).collect();
            for need in 1..=n {
                let mut sorted = marks.clone();
                sorted.sort_unstable_by(|a, b| b.cmp(a));
                assert_eq!(
                    reached_by(marks.iter().copied(), need),
                    sorted[need - 1],
                    "{marks:?} {need}"
                );
            }
        }
    }

    /// Member "a" of a, b, c, made primary of a term that started at `term_start`.
    fn primary_of_three(term_start: u64) -> Cluster {
        let members = ["a", "b", "c"].map(String::from);
        let c = Cluster::new(
            "a".into(),
            &members,
            ("u".into(), "p".into()),
            Duration::from_millis(100),
            WriteQuorum::Majority,
            None,
        );
        {
            let mut s = lock(&c.state);
            s.set_role(Role::Primary);
            s.term_start = term_start;
        }
        c
    }

    #[test]
    fn commit_needs_a_majority_and_a_record_of_this_term() {
        let c = primary_of_three(10);
        assert!(!c.note_durable(12), "one copy is not a majority");
        assert!(!c.record_ack("b", 9), "older than the term's first record");
        assert_eq!(c.commit(), 0);
        assert!(c.record_ack("b", 11));
        assert_eq!(c.commit(), 11);
        assert!(c.record_ack("c", 12));
        assert_eq!(c.commit(), 12);
    }

    #[test]
    fn a_writer_waiting_for_its_commit_wakes_on_the_ack_or_when_it_loses_the_lead() {
        let c = Arc::new(primary_of_three(1));
        c.note_durable(6);
        let wait = |lsn| {
            let c = Arc::clone(&c);
            std::thread::spawn(move || c.wait_quorum(lsn))
        };
        let acked = wait(5);
        c.record_ack("b", 5);
        assert_eq!(acked.join().unwrap(), Ok(true));
        let deposed = wait(6);
        assert!(c.heard_from_primary(1, "b"), "a newer term's primary");
        assert_eq!(
            deposed.join().unwrap(),
            Err("Not the primary any more; the write may not be durable".to_string())
        );
    }

    #[test]
    fn work_waiting_for_a_commit_runs_once_it_is_decided() {
        let c = primary_of_three(1);
        c.note_durable(7);
        let (tx, rx) = std::sync::mpsc::channel();
        let told = |tag: &'static str| -> OnCommit {
            let tx = tx.clone();
            Box::new(move |result| tx.send((tag, result)).unwrap())
        };
        c.on_commit(5, told("acked"));
        c.on_commit(6, told("late"));
        c.record_ack("b", 5);
        assert_eq!(
            rx.try_recv(),
            Ok(("acked", Ok(()))),
            "run by the ack's thread"
        );
        assert!(rx.try_recv().is_err(), "6 is not committed");
        // Nobody acknowledges 6: five election timeouts later the tick refuses it.
        let deadline = Instant::now() + Duration::from_secs(30);
        while rx.try_recv().map(|r| assert_eq!(r.0, "late")).is_err() {
            assert!(Instant::now() < deadline, "never refused");
            std::thread::sleep(Duration::from_millis(20));
            c.fire_commit_waits();
        }
        c.on_commit(7, told("deposed"));
        assert!(c.heard_from_primary(1, "b"), "a newer term's primary");
        c.fire_commit_waits();
        assert_eq!(
            rx.try_recv(),
            Ok(("deposed", Err(NOT_PRIMARY_ANY_MORE.to_string())))
        );
    }

    #[test]
    fn a_new_primary_counts_only_the_log_it_has() {
        // As an old primary this node had 2000 records; a full sync cut its log back to 1900
        // and it now leads from a term-start record at 1901.
        let c = primary_of_three(1901);
        lock(&c.state).durable = 2000;
        c.reset_durable(1901);
        c.record_ack("b", 1950);
        assert_eq!(c.commit(), 1901, "records 1902..1950 are on one node only");
    }

    #[test]
    fn the_applied_member_list_survives_a_restart_with_the_old_configured_list() {
        let dir = std::env::temp_dir().join(format!("nun-members-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let term_file = dir.join("cluster.term");
        let configured = ["a:1", "b:1"].map(String::from);
        let start = || {
            Cluster::new(
                "a:1".into(),
                &configured,
                ("u".into(), "p".into()),
                Duration::from_millis(100),
                WriteQuorum::Majority,
                Some(term_file.clone()),
            )
        };
        let c = start();
        assert_eq!(c.members(), ["a:1", "b:1"]);
        assert!(!c.is_listed(), "a configured list is not an applied one");
        assert_eq!(c.proposed("b:1", true), None);
        let grown = c.proposed("d:1", true).unwrap();
        assert_eq!(grown, ["a:1", "b:1", "d:1"]);
        c.set_members(grown);
        c.set_members(["a:1", "b:1", "d:1", "e:1"].map(String::from).to_vec());
        let shrunk = c.proposed("b:1", false).unwrap();
        c.set_members(shrunk);
        assert_eq!(c.proposed("b:1", false), None);
        assert!(c.is_listed() && !c.was_removed());
        drop(c);
        // The list applied last wins over the configured one.
        let c = start();
        assert_eq!(c.members(), ["a:1", "d:1", "e:1"]);
        assert_eq!(c.majority(), 2);
        assert!(c.is_listed());
        // A list without this node means it was removed: it stops asking to join.
        c.set_members(["d:1", "e:1"].map(String::from).to_vec());
        assert!(c.was_removed() && !c.is_listed() && !c.is_member());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn one_member_change_at_a_time() {
        let c = Cluster::new(
            "a:1".into(),
            &["a:1".to_string(), "b:1".to_string()],
            ("u".into(), "p".into()),
            Duration::from_millis(100),
            WriteQuorum::Majority,
            None,
        );
        let first = c.begin_change();
        assert!(first.is_some());
        assert!(c.begin_change().is_none());
        drop(first);
        assert!(c.begin_change().is_some());
    }
}
