//! Safe bully election. A node that has not heard from a primary for the election timeout asks
//! every member for a vote in a new term. A member grants at most one vote per term, only to a
//! candidate whose log is at least as up to date as its own, and refuses (then runs itself) when
//! it ranks higher with an equally recent log — the bully rule. A candidate needs a majority of
//! the configured members; a primary that hears from no majority for one timeout steps down. So
//! there is never more than one primary accepting writes in a term.

use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{lock, Cluster, Role};
use crate::client::Client;
use crate::os::spawn_small;
use crate::storage::oplog::OpLog;

/// The answer to `election`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vote {
    /// Granted?
    pub granted: bool,
    /// The voter's term after handling the request.
    pub term: u64,
    /// The primary the voter knows, if any.
    pub primary: Option<String>,
}

impl Vote {
    /// `vote yes|no <term> <primary|->`.
    pub fn line(&self) -> String {
        format!(
            "vote {} {} {}",
            if self.granted { "yes" } else { "no" },
            self.term,
            self.primary.as_deref().unwrap_or("-")
        )
    }

    fn parse(line: &str) -> Option<Vote> {
        let mut p = line.split(' ');
        if p.next()? != "vote" {
            return None;
        }
        let granted = p.next()? == "yes";
        let term = p.next()?.parse().ok()?;
        let primary = p.next().filter(|x| *x != "-").map(str::to_string);
        Some(Vote {
            granted,
            term,
            primary,
        })
    }
}

/// The instant `d` ago (now, if the clock cannot go back that far).
fn ago(d: Duration) -> Instant {
    Instant::now().checked_sub(d).unwrap_or_else(Instant::now)
}

impl Cluster {
    /// Handles `election <term> <candidate> <last_term> <last_lsn>` from a candidate.
    fn handle_election(
        &self,
        log: &OpLog,
        term: u64,
        candidate: &str,
        their_log: (u64, u64),
    ) -> Vote {
        let mut s = lock(&self.state);
        let known = self.observe_term(&mut s, term);
        let mine = log.last_position();
        let granted = known
            && term == s.term
            && s.role != Role::Primary
            && their_log >= mine
            && !(their_log == mine
                && self.self_id.as_str() > candidate
                && s.last_heard.elapsed() < self.timeout * 4)
            && s.voted_for.as_deref().is_none_or(|v| v == candidate);
        if granted {
            s.voted_for = Some(candidate.to_string());
            s.last_heard = Instant::now();
            self.persist(&s);
        } else if their_log < mine || (their_log == mine && self.self_id.as_str() > candidate) {
            // Bully: a better-placed node answers and runs itself soon.
            s.last_heard = ago(self.timeout);
        }
        Vote {
            granted,
            term: s.term,
            primary: s.primary.clone(),
        }
    }

    /// Handles `pre-vote <term> <candidate> <last_term> <last_lsn>`: would this node vote for
    /// `candidate` in `term`? Changes nothing. No while a primary is alive (this node leads, or
    /// heard from its primary within half a timeout, where a healthy primary's heartbeats come
    /// every quarter), so a node that was cut off cannot depose a healthy primary by calling
    /// elections in ever higher terms when it comes back.
    fn handle_pre_vote(
        &self,
        log: &OpLog,
        term: u64,
        candidate: &str,
        their_log: (u64, u64),
    ) -> Vote {
        let s = lock(&self.state);
        let primary_alive = s.role == Role::Primary
            || (s.primary.as_deref().is_some_and(|p| p != candidate)
                && s.last_heard.elapsed() < self.timeout / 2);
        Vote {
            granted: term > s.term && !primary_alive && their_log >= log.last_position(),
            term: s.term,
            primary: s.primary.clone(),
        }
    }

    /// Answers a candidate's `pre-vote` (`pre` true) or `election` request. A candidate this
    /// node does not count as a member gets no vote either way.
    pub fn answer_candidate(
        &self,
        log: &OpLog,
        pre: bool,
        term: u64,
        candidate: &str,
        their_log: (u64, u64),
    ) -> Vote {
        if !self.members().iter().any(|m| m == candidate) {
            self.refuse_non_member()
        } else if pre {
            self.handle_pre_vote(log, term, candidate, their_log)
        } else {
            self.handle_election(log, term, candidate, their_log)
        }
    }

    /// The answer to a candidate this node does not count as a member (not joined yet, or
    /// removed): no vote, and no term change, but who leads, so it can ask to join.
    fn refuse_non_member(&self) -> Vote {
        let s = lock(&self.state);
        Vote {
            granted: false,
            term: s.term,
            primary: s.primary.clone(),
        }
    }

    /// Asks every peer `cmd` in parallel (for up to half a timeout: a reachable peer answers in
    /// a round trip, and waiting longer for one that cannot be reached only delays the next
    /// try) and counts this node plus the
    /// peers whose vote `counts`, stopping at a majority. Also returns the most informative
    /// refusal (newest term, then one naming a primary), if any.
    fn canvass(
        self: &Arc<Self>,
        cmd: &str,
        counts: impl Fn(&Vote) -> bool,
    ) -> (usize, Option<Vote>) {
        let peers = self.peers();
        let (tx, rx) = mpsc::channel();
        for peer in &peers {
            let tx = tx.clone();
            let peer = peer.clone();
            let cluster = Arc::clone(self);
            let cmd = cmd.to_string();
            // A peer whose thread cannot start counts as not answering.
            spawn_small(format!("canvass-{peer}"), move || {
                let _ = tx.send(cluster.ask(&peer, &cmd).and_then(|m| Vote::parse(&m)));
            });
        }
        drop(tx);
        let mut votes = 1;
        let deadline = Instant::now() + self.timeout / 2;
        let mut newer: Option<Vote> = None;
        for _ in &peers {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(Some(v)) if counts(&v) => votes += 1,
                Ok(Some(v)) => {
                    // Keep the most informative refusal: the newest term, then a known primary.
                    let key = |v: &Vote| (v.term, v.primary.is_some());
                    if newer.as_ref().is_none_or(|n| key(&v) > key(n)) {
                        newer = Some(v);
                    }
                }
                Ok(None) => {}
                Err(_) => break,
            }
            if votes >= self.majority() {
                break;
            }
        }
        (votes, newer)
    }

    /// Handles `victory <term> <primary>`.
    pub fn handle_victory(&self, term: u64, primary: &str) -> bool {
        if primary == self.self_id {
            return true;
        }
        self.heard_from_primary(term, primary)
    }

    /// Runs one election (after a pre-vote, unless forced); true if this node became primary.
    pub fn run_election(self: &Arc<Self>, log: &OpLog) -> bool {
        let (next, forced) = {
            let mut s = lock(&self.state);
            (s.term + 1, std::mem::take(&mut s.force_next))
        };
        if !forced {
            let position = log.last_position();
            let cmd = format!(
                "pre-vote {next} {} {} {}",
                self.self_id, position.0, position.1
            );
            let (votes, newer) = self.canvass(&cmd, |v| v.granted);
            if votes < self.majority() {
                // Refused because a primary is alive: follow it (a node back from a partition
                // catches up at once instead of waiting for the primary's next announcement).
                self.learn_from_refusal(newer);
                return false;
            }
        }
        crate::metrics::STATS
            .elections
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (term, position) = {
            let mut s = lock(&self.state);
            s.term += 1;
            s.voted_for = Some(self.self_id.clone());
            s.set_role(Role::Candidate);
            s.primary = None;
            self.persist(&s);
            (s.term, log.last_position())
        };
        log::info!("{} starts an election for term {term}", self.self_id);
        let cmd = format!(
            "election {term} {} {} {}",
            self.self_id, position.0, position.1
        );
        let (votes, newer) = self.canvass(&cmd, |v| v.granted && v.term == term);
        let newer = newer.filter(|v| v.term > term || v.primary.is_some());
        let won = {
            let s = lock(&self.state);
            s.term == term && s.role == Role::Candidate && votes >= self.majority()
        };
        if won && self.promote(term, log) {
            log::info!(
                "{} is primary for term {term} ({votes} votes)",
                self.self_id
            );
            self.announce(term);
            return true;
        }
        {
            let mut s = lock(&self.state);
            if s.role == Role::Candidate {
                s.set_role(Role::Secondary);
            }
        }
        self.learn_from_refusal(newer);
        false
    }

    /// Takes in a refusal's news: its newer term, and the primary it names if that is not the
    /// one this node already believes in (whose silence is why it asked: hearing its name from
    /// a peer proves nothing).
    fn learn_from_refusal(&self, refusal: Option<Vote>) {
        let Some(v) = refusal else { return };
        let known = self.status().2;
        if let Some(p) = v
            .primary
            .filter(|p| *p != self.self_id && known.as_deref() != Some(p.as_str()))
        {
            self.heard_from_primary(v.term, &p);
        } else {
            let mut s = lock(&self.state);
            self.observe_term(&mut s, v.term);
        }
    }

    /// Tells every peer that this node won `term`.
    /// Makes this candidate the primary of `term`: runs the elected hook (applies the log it
    /// inherited, logs the term-start record), then takes writes. False if the term moved on
    /// meanwhile or the hook failed.
    fn promote(&self, term: u64, log: &OpLog) -> bool {
        log.set_term(term);
        let start = match self.on_elected.get() {
            Some(hook) => (hook.0)(term),
            None => Ok(0),
        };
        let mut s = lock(&self.state);
        let start = match start {
            Ok(lsn) => lsn,
            Err(e) => {
                log::error!("{} cannot take over term {term}: {e}", self.self_id);
                if s.role == Role::Candidate {
                    s.set_role(Role::Secondary);
                }
                return false;
            }
        };
        if s.term != term || s.role != Role::Candidate {
            return false;
        }
        s.set_role(Role::Primary);
        s.primary = Some(self.self_id.clone());
        s.last_heard = Instant::now();
        s.acks.clear();
        s.term_start = start;
        self.advance_commit(&mut s);
        self.changed.notify_all();
        true
    }

    /// Tells every peer that this node leads `term` (periodically, and when members join).
    pub fn announce(self: &Arc<Self>, term: u64) {
        for peer in self.peers() {
            let cluster = Arc::clone(self);
            spawn_small(format!("announce-{peer}"), move || {
                cluster.ask(&peer, &format!("victory {term} {}", cluster.self_id));
            });
        }
    }

    /// Sends one admin command to `peer`; returns its first output message.
    pub fn ask(&self, peer: &str, cmd: &str) -> Option<String> {
        let mut c = Client::connect_tcp_timeout(peer, self.timeout).ok()?;
        c.auth(&self.admin.0, &self.admin.1).ok()?;
        let reply = c.call(cmd).ok()?;
        reply.messages.into_iter().next()
    }

    /// Extra wait before calling an election: 0 for the highest-ranked member, growing by a
    /// fifth of the timeout per rank below it.
    fn rank_delay(&self) -> Duration {
        let members = self.members();
        let pos = members.iter().position(|m| *m == self.self_id).unwrap_or(0);
        self.timeout / 5 * (members.len() - 1 - pos) as u32
    }

    /// Forces an election at the next tick (`debug force-election`).
    pub fn force_election(&self) {
        let mut s = lock(&self.state);
        s.force_next = true;
        if s.role != Role::Primary {
            s.last_heard = ago(self.timeout * 10);
        } else {
            s.set_role(Role::Secondary);
            s.primary = None;
            s.last_heard = ago(self.timeout * 10);
        }
        self.changed.notify_all();
    }

    /// Starts the election timer thread.
    pub fn start_elections(self: &Arc<Self>, log: Arc<OpLog>) -> std::io::Result<()> {
        let cluster = Arc::clone(self);
        std::thread::Builder::new()
            .name("election".into())
            .spawn(move || cluster.election_loop(&log))?;
        Ok(())
    }

    fn election_loop(self: &Arc<Self>, log: &OpLog) {
        let tick = (self.timeout / 10).max(Duration::from_millis(10));
        let mut last_announce = Instant::now();
        loop {
            std::thread::sleep(tick);
            // Writes waiting for a commit that will not come: this node stopped leading, or
            // their time is up.
            self.fire_commit_waits();
            if !self.is_member() {
                // Removed by `leave`: it may still follow, but never leads or calls elections.
                continue;
            }
            if self.peers().is_empty() {
                let term = {
                    let mut s = lock(&self.state);
                    if s.role == Role::Primary {
                        continue;
                    }
                    s.term += 1;
                    s.voted_for = Some(self.self_id.clone());
                    s.set_role(Role::Candidate);
                    s.primary = None;
                    self.persist(&s);
                    s.term
                };
                self.promote(term, log);
                continue;
            }
            let (role, term, silent, reachable, forced) = {
                let s = lock(&self.state);
                let silent = s.last_heard.elapsed();
                (s.role, s.term, silent, self.reachable(&s), s.force_next)
            };
            match role {
                Role::Primary => {
                    if reachable + 1 < self.majority() && silent > self.timeout {
                        let mut s = lock(&self.state);
                        if s.role == Role::Primary && s.term == term {
                            log::warn!(
                                "{} cannot reach a majority: stepping down (term {term})",
                                self.self_id
                            );
                            s.set_role(Role::Secondary);
                            s.primary = None;
                            s.last_heard = Instant::now();
                            self.changed.notify_all();
                        }
                    } else if reachable + 1 >= self.majority() {
                        lock(&self.state).last_heard = Instant::now();
                    }
                    if last_announce.elapsed() > self.timeout {
                        // Nodes that restarted or joined learn who leads.
                        last_announce = Instant::now();
                        self.announce(term);
                    }
                }
                Role::Secondary | Role::Candidate => {
                    // Bully order: higher-ranked nodes call elections first; lower ones wait a
                    // little longer, so candidates rarely split the vote.
                    // A forced election runs at once: heartbeats from the primary, which a
                    // secondary still receives, would otherwise keep postponing it.
                    let due = forced || silent > self.timeout + self.rank_delay();
                    if due && !self.run_election(log) {
                        // Retry after a quarter timeout, randomised so candidates drift apart
                        // (a peer that still hears the old primary refuses the pre-vote until
                        // its own link fails too, which is usually a moment later).
                        let jitter =
                            rand::random::<u64>() % (self.timeout.as_millis() as u64 / 8 + 1);
                        lock(&self.state).last_heard =
                            ago(self.timeout * 3 / 4 - Duration::from_millis(jitter));
                    }
                }
            }
        }
    }
}
