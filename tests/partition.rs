//! Partition tests at the IP level: every node runs in a network namespace of its own (see
//! `common/netns.rs`; needs root and iproute2), and the test cuts links in one or both
//! directions, splits the cluster, and flaps links, while clients on every node write (set,
//! set-safe, increment, remove) and watch. Each client operation is recorded with its start,
//! end and outcome; afterwards the guarantees are checked from that history, in the style of
//! etcd's robustness tests and Jepsen:
//! - one primary per term, and a node cut off from the majority acknowledges no write it
//!   received after the cut, and none at all later than one election timeout after it;
//! - every acknowledged write is on every node after healing, writes that failed with a
//!   definite error are on none, and every node holds the same data;
//! - each acknowledged set-safe moved its key from the version it read by exactly one, and no
//!   version was granted twice;
//! - every watcher saw each key's versions in order, without gaps or duplicates, and no two
//!   observers saw different values for one version;
//! - writes are accepted again within two election timeouts once a majority is whole.
//!
//! A failing run prints its whole history.

mod common;

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::faults::{check_terms, check_watchers, dump, watch_until, Data, Segment};
use common::netns::Lab;
use common::{eventually, TestCluster, ADMIN, ADMIN_PWD};
use nundb::client::{Client, ClientError};

/// The election timeout the test clusters run with (`TestCluster` sets it).
const ET: Duration = Duration::from_millis(500);
/// How long each fault is held.
const HOLD: Duration = Duration::from_millis(2_000);
/// Bound for waits on things that must happen eventually.
const LONG: Duration = Duration::from_secs(60);
/// Keys every writer fights over with set and set-safe (compare-and-set).
const CAS: [&str; 2] = ["k0", "k1"];
/// A key every writer sets and removes.
const REMOVED: &str = "k2";
/// Every key the watchers watch.
const SHARED: [&str; 3] = ["k0", "k1", REMOVED];
/// Writer threads per node.
const WRITERS: usize = 2;
/// A writer gives up on an answer after this long and records the outcome as unknown.
const WRITE_TIMEOUT: Duration = Duration::from_secs(3);
/// Probes give up sooner: they measure when writes are accepted again.
const PROBE_TIMEOUT: Duration = Duration::from_millis(700);
/// Client ids of probes start here (writers are numbered from 0).
const PROBE_IDS: usize = 1000;

/// A write a client sent (every field is shown in a failing run's history).
#[derive(Debug, Clone)]
#[allow(dead_code)]
enum Kind {
    Set {
        key: String,
        value: String,
    },
    SetSafe {
        key: String,
        from: i32,
        value: String,
    },
    Increment {
        key: String,
    },
    Remove {
        key: String,
    },
}

/// How a write ended, as the client saw it.
#[derive(Debug, Clone, PartialEq)]
enum Outcome {
    Ok,
    /// A definite error: the write did not happen.
    Failed(String),
    /// It may or may not have happened.
    Unknown(String),
}

/// One recorded client operation (times from the start of the run).
#[derive(Debug, Clone)]
struct Op {
    client: usize,
    node: usize,
    kind: Kind,
    start: Duration,
    end: Duration,
    outcome: Outcome,
}

/// One fault as it was applied.
#[derive(Debug, Clone)]
struct Fault {
    what: String,
    /// When the last link of the fault was cut.
    cut: Duration,
    /// When healing began.
    heal: Duration,
    /// Nodes without a two-way path to a majority while it lasted.
    minority: Vec<usize>,
    /// The rest still form a connected majority, so writes must resume during the fault.
    majority_whole: bool,
}

/// What every client did, shared by their threads.
struct History {
    t0: Instant,
    stop: AtomicBool,
    ops: Mutex<Vec<Op>>,
    faults: Mutex<Vec<Fault>>,
}

impl History {
    fn now(&self) -> Duration {
        self.t0.elapsed()
    }

    fn record(
        &self,
        client: usize,
        node: usize,
        kind: Kind,
        start: Duration,
        r: &Result<(), ClientError>,
    ) {
        let outcome = match r {
            Ok(()) => Outcome::Ok,
            Err(e) if e.outcome_unknown() => Outcome::Unknown(e.to_string()),
            Err(e) => Outcome::Failed(e.to_string()),
        };
        let op = Op {
            client,
            node,
            kind,
            start,
            end: self.now(),
            outcome,
        };
        self.ops.lock().unwrap().push(op);
    }

    fn acked(&self) -> usize {
        let ops = self.ops.lock().unwrap();
        ops.iter().filter(|o| o.outcome == Outcome::Ok).count()
    }

    /// Waits until `n` more writes are acknowledged.
    fn progress(&self, n: usize) {
        let start = self.acked();
        assert!(
            eventually(LONG, || self.acked() >= start + n),
            "the cluster stopped acknowledging writes"
        );
    }
}

fn connect(addr: &str, timeout: Duration) -> Option<Client> {
    let mut c = Client::connect_tcp_timeout(addr, timeout).ok()?;
    c.set_timeout(Some(timeout)).ok()?;
    c.use_db("part", "t").ok()?;
    Some(c)
}

/// The client's connection, made now if it has none; `None` (after a pause) while the node
/// does not answer.
fn session<'a>(
    client: &'a mut Option<Client>,
    addr: &str,
    timeout: Duration,
) -> Option<&'a mut Client> {
    if client.is_none() {
        *client = connect(addr, timeout);
        if client.is_none() {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    client.as_mut()
}

/// The version of `key`, `None` when it does not exist.
///
/// Set-safe is only tried on keys that exist: the protocol answers `value-version 1 <Empty>`
/// for a missing key and accepts any set-safe on a missing or removed key as a creation, so
/// only a set-safe from a version that was read is a compare-and-set. The keys that get
/// set-safes are never removed.
fn version_of(c: &mut Client, key: &str) -> Result<Option<i32>, ClientError> {
    Ok(c.get_safe(key)?.map(|(version, _)| version))
}

/// Writes a random mix of operations to node `node` until the run stops.
fn writer(addr: String, node: usize, id: usize, h: Arc<History>) {
    let mut client: Option<Client> = None;
    let mut seed = 0x9e37_79b9_7f4a_7c15u64 ^ (id as u64 + 1);
    let mut n = 0u64;
    while !h.stop.load(Ordering::Relaxed) {
        let Some(c) = session(&mut client, &addr, WRITE_TIMEOUT) else {
            continue;
        };
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        n += 1;
        let key = CAS[(seed >> 8) as usize % CAS.len()].to_string();
        let value = format!("w{id}-{n}");
        let removed = REMOVED.to_string();
        let mut start = h.now();
        let (kind, r) = match seed % 5 {
            0 => {
                let key = format!("u{id}-{n}");
                let r = c.set(&key, &value);
                (Kind::Set { key, value }, r)
            }
            1 => {
                let key = format!("c{id}");
                let r = c.increment(&key, 1);
                (Kind::Increment { key }, r)
            }
            2 => {
                let r = c.set(&key, &value);
                (Kind::Set { key, value }, r)
            }
            3 => match version_of(c, &key) {
                Ok(None) => {
                    let r = c.set(&key, &value);
                    (Kind::Set { key, value }, r)
                }
                Ok(Some(from)) => {
                    // The write starts after the read it depends on.
                    start = h.now();
                    let r = c.set_safe(&key, from, &value);
                    (Kind::SetSafe { key, from, value }, r)
                }
                Err(e) => {
                    settle(&mut client, &Err(e));
                    continue;
                }
            },
            4 if n.is_multiple_of(2) => {
                let r = c.remove(&removed);
                (Kind::Remove { key: removed }, r)
            }
            _ => {
                let r = c.set(&removed, &value);
                (
                    Kind::Set {
                        key: removed,
                        value,
                    },
                    r,
                )
            }
        };
        h.record(id, node, kind, start, &r);
        settle(&mut client, &r);
    }
}

/// After a failed call: drops a broken connection and pauses, so a changing cluster is not
/// hammered.
fn settle(client: &mut Option<Client>, r: &Result<(), ClientError>) {
    match r {
        Ok(()) => {}
        Err(ClientError::Server(text)) if text.starts_with("Invalid version") => {}
        Err(ClientError::Server(_)) => std::thread::sleep(Duration::from_millis(10)),
        Err(_) => {
            *client = None;
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Sets fresh keys on node `node` over and over with a short timeout: the first acknowledged
/// probe after a fault or a heal says when writes were accepted again.
fn prober(addr: String, node: usize, h: Arc<History>) {
    let id = PROBE_IDS + node;
    let mut client: Option<Client> = None;
    let mut n = 0u64;
    while !h.stop.load(Ordering::Relaxed) {
        let Some(c) = session(&mut client, &addr, PROBE_TIMEOUT) else {
            continue;
        };
        n += 1;
        let (key, value) = (format!("p{node}-{n}"), format!("p{node}-{n}"));
        let start = h.now();
        let r = c.set(&key, &value);
        h.record(id, node, Kind::Set { key, value }, start, &r);
        if r.is_err() {
            client = None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `nodes` nodes started in `lab`, with the test database created.
fn lab_cluster(lab: &Arc<Lab>, nodes: usize) -> TestCluster {
    let cluster = TestCluster::start_in_lab(nodes, lab, &[]);
    let p = cluster.wait_primary(LONG).expect("a primary");
    let mut admin = cluster.client(p);
    admin.auth(ADMIN, ADMIN_PWD).unwrap();
    admin
        .call("create-db part t")
        .unwrap()
        .into_result()
        .unwrap();
    cluster
}

/// A cluster in its own network with clients writing and watching on every node.
struct Run {
    lab: Arc<Lab>,
    cluster: TestCluster,
    history: Arc<History>,
    writers: Vec<JoinHandle<()>>,
    watchers: Vec<JoinHandle<Vec<Segment>>>,
}

impl Run {
    /// Starts `n` nodes in a lab and the clients. Must run on a thread that entered the lab's
    /// client namespace (see [`in_lab`]).
    fn start(lab: Arc<Lab>, nodes: usize) -> Run {
        let cluster = lab_cluster(&lab, nodes);
        let history = Arc::new(History {
            t0: Instant::now(),
            stop: AtomicBool::new(false),
            ops: Mutex::new(Vec::new()),
            faults: Mutex::new(Vec::new()),
        });
        let mut writers = Vec::new();
        let mut watchers = Vec::new();
        for (i, addr) in cluster.tcp_addrs.iter().enumerate() {
            assert!(
                eventually(LONG, || connect(addr, WRITE_TIMEOUT).is_some()),
                "node {i} never saw the database"
            );
            let (h, a) = (Arc::clone(&history), addr.clone());
            watchers.push(std::thread::spawn(move || {
                watch_until(&h.stop, &SHARED, || connect(&a, WRITE_TIMEOUT))
            }));
            let (h, a) = (Arc::clone(&history), addr.clone());
            writers.push(std::thread::spawn(move || prober(a, i, h)));
            for k in 0..WRITERS {
                let (h, a) = (Arc::clone(&history), addr.clone());
                writers.push(std::thread::spawn(move || writer(a, i, i * WRITERS + k, h)));
            }
        }
        history.progress(100);
        Run {
            lab,
            cluster,
            history,
            writers,
            watchers,
        }
    }

    fn primary(&self) -> usize {
        self.cluster.wait_primary(LONG).expect("a primary")
    }

    /// Applies a fault with `cut`, holds it for [`HOLD`], heals, and waits for writes to be
    /// acknowledged again.
    fn fault(&self, what: &str, minority: &[usize], majority_whole: bool, cut: impl FnOnce(&Lab)) {
        cut(&self.lab);
        let at = self.history.now();
        std::thread::sleep(HOLD);
        self.heal(what, at, minority, majority_whole);
    }

    fn heal(&self, what: &str, cut: Duration, minority: &[usize], majority_whole: bool) {
        let heal = self.history.now();
        self.lab.heal();
        eprintln!("partition: {what}: cut at {cut:?}, healed at {heal:?}");
        self.history.faults.lock().unwrap().push(Fault {
            what: what.to_string(),
            cut,
            heal,
            minority: minority.to_vec(),
            majority_whole,
        });
        self.history.progress(50);
        // The next fault starts from a whole cluster: every member follows the primary again
        // (a node back from the minority may need a full sync first).
        let c = &self.cluster;
        assert!(
            eventually(LONG, || c.primary().is_some_and(|p| {
                let line = c.state_line(p);
                !line.is_empty() && !line.contains("Disconnected")
            })),
            "after {what} the cluster never became whole again: {:?}",
            (0..c.nodes.len())
                .map(|i| c.state_line(i))
                .collect::<Vec<_>>()
        );
    }

    /// Stops the clients, waits for the nodes to converge and checks every guarantee.
    fn finish(mut self) {
        let h = Arc::clone(&self.history);
        h.stop.store(true, Ordering::Relaxed);
        for t in self.writers.drain(..) {
            t.join().unwrap();
        }
        let c = &mut self.cluster;
        // Every running node (the test stops those it removed from the cluster).
        let running: Vec<usize> = (0..c.nodes.len())
            .filter(|i| c.nodes[*i].is_some())
            .collect();
        let mut last = Vec::new();
        let converged = eventually(LONG, || {
            last = running
                .iter()
                .map(|i| connect(&c.tcp_addrs[*i], WRITE_TIMEOUT).and_then(|mut cl| dump(&mut cl)))
                .collect();
            last.iter().all(|d| d.is_some() && *d == last[0])
        });
        let victories = c.victories();
        for i in 0..c.nodes.len() {
            c.kill(i);
        }
        let segments: Vec<Vec<Segment>> =
            self.watchers.drain(..).map(|t| t.join().unwrap()).collect();
        let ops = h.ops.lock().unwrap().clone();
        let faults = h.faults.lock().unwrap().clone();
        let mut v = Vec::new();
        if !converged {
            v.push(format!("nodes did not converge: {last:?}"));
        }
        let data = last.first().cloned().flatten().unwrap_or_default();
        check_terms(&victories, &mut v);
        check_writes(&ops, &data, &mut v);
        let observed = check_watchers(&segments, &data, &mut v);
        check_set_safe(&ops, &observed, &mut v);
        let recovery = check_minorities(&ops, &faults, &mut v);
        let count = |f: fn(&Outcome) -> bool| ops.iter().filter(|o| f(&o.outcome)).count();
        eprintln!(
            "partition: {} operations ({} ok, {} failed, {} unknown), {} watch events on {} connections, terms {:?}",
            ops.len(),
            count(|o| *o == Outcome::Ok),
            count(|o| matches!(o, Outcome::Failed(_))),
            count(|o| matches!(o, Outcome::Unknown(_))),
            segments.iter().flatten().map(Vec::len).sum::<usize>(),
            segments.iter().map(Vec::len).sum::<usize>(),
            victories
        );
        for line in &recovery {
            eprintln!("partition: {line}");
        }
        if !v.is_empty() {
            eprintln!("{}", render(&ops, &faults));
            panic!("{} violations:\n{}", v.len(), v.join("\n"));
        }
    }
}

/// Acknowledged writes are there, definitely failed ones are not, counters are in range.
fn check_writes(ops: &[Op], data: &Data, v: &mut Vec<String>) {
    let mut counters: HashMap<&str, (u64, u64)> = HashMap::new();
    for op in ops {
        match (&op.kind, &op.outcome) {
            (Kind::Set { key, value }, outcome) if !SHARED.contains(&key.as_str()) => {
                let found = data.get(key).map(|(_, v)| v);
                match outcome {
                    Outcome::Ok if found != Some(value) => {
                        v.push(format!("acknowledged {op:?} is missing (found {found:?})"))
                    }
                    Outcome::Failed(_) if found.is_some() => {
                        v.push(format!("failed {op:?} was applied (found {found:?})"))
                    }
                    _ => {}
                }
            }
            (Kind::Increment { key }, outcome) => {
                let c = counters.entry(key).or_default();
                match outcome {
                    Outcome::Ok => {
                        c.0 += 1;
                        c.1 += 1;
                    }
                    Outcome::Unknown(_) => c.1 += 1,
                    Outcome::Failed(_) => {}
                }
            }
            _ => {}
        }
    }
    for (key, (acked, possible)) in counters {
        let value: u64 = data
            .get(key)
            .map_or(0, |(_, v)| v.parse().unwrap_or(u64::MAX));
        if !(acked..=possible).contains(&value) {
            v.push(format!(
                "counter {key} = {value}, but {acked} increments were acknowledged and {possible} may have happened"
            ));
        }
    }
}

/// Set-safe is compare-and-set: no two acknowledged set-safes started from the same version
/// of a key, an acknowledged one was only ever seen at the version after the one it read, and
/// a definitely failed one (or plain set) was never seen at all.
fn check_set_safe(ops: &[Op], observed: &HashMap<(String, i32), String>, v: &mut Vec<String>) {
    let mut at: HashMap<&str, Vec<i32>> = HashMap::new();
    for ((_, version), value) in observed {
        at.entry(value.as_str()).or_default().push(*version);
    }
    let mut granted: HashMap<(&str, i32), &Op> = HashMap::new();
    let mut checked = 0;
    for op in ops {
        match (&op.kind, &op.outcome) {
            (Kind::SetSafe { key, from, value }, Outcome::Ok) => {
                if let Some(other) = granted.insert((key, *from), op) {
                    v.push(format!(
                        "version {from} of {key} was granted twice: {other:?} and {op:?}"
                    ));
                }
                if let Some(versions) = at.get(value.as_str()) {
                    checked += 1;
                    if versions.iter().any(|x| *x != from + 1) {
                        v.push(format!("{op:?} was seen at versions {versions:?}"));
                    }
                }
            }
            (Kind::SetSafe { value, .. } | Kind::Set { value, .. }, Outcome::Failed(_)) => {
                if let Some(versions) = at.get(value.as_str()) {
                    v.push(format!("failed {op:?} was seen at versions {versions:?}"));
                }
            }
            _ => {}
        }
    }
    if checked == 0 {
        v.push("no acknowledged set-safe was observed".to_string());
    }
}

/// A node cut off from the majority acknowledges no write received after the cut and none
/// later than one election timeout after it; writes resume within two election timeouts once
/// a majority is whole. Returns the measured recovery times, for the log.
fn check_minorities(ops: &[Op], faults: &[Fault], v: &mut Vec<String>) -> Vec<String> {
    let mut out = Vec::new();
    for f in faults {
        for op in ops {
            if op.outcome != Outcome::Ok || !f.minority.contains(&op.node) || op.end > f.heal {
                continue;
            }
            // A remove of a missing key logs nothing: the primary confirms it from its own
            // view, which may be up to one election timeout stale.
            let noop = matches!(op.kind, Kind::Remove { .. });
            if (op.start >= f.cut && !noop) || op.end >= f.cut + ET {
                v.push(format!(
                    "{}: node {} was cut off from the majority at {:?} yet acknowledged {op:?}",
                    f.what, op.node, f.cut
                ));
            }
        }
        // After a cut the majority must elect and serve within two election timeouts; after
        // the heal every node is part of it again.
        let mut points = vec![("heal", f.heal)];
        if f.majority_whole {
            points.push(("cut", f.cut));
        }
        for (name, t) in points {
            let first = ops
                .iter()
                .filter(|o| {
                    o.outcome == Outcome::Ok && o.start >= t && !f.minority.contains(&o.node)
                })
                .map(|o| o.end)
                .min();
            match first {
                Some(end) if end - t <= 2 * ET => out.push(format!(
                    "{}: writes accepted {:?} after the {name}",
                    f.what,
                    end - t
                )),
                Some(end) => v.push(format!(
                    "{}: writes were accepted only {:?} after the {name} at {t:?}",
                    f.what,
                    end - t
                )),
                None => v.push(format!(
                    "{}: no write was accepted after the {name}",
                    f.what
                )),
            }
        }
    }
    out
}

/// The whole history, one line per fault or operation, in start order.
fn render(ops: &[Op], faults: &[Fault]) -> String {
    let mut lines: Vec<(Duration, String)> = Vec::new();
    for f in faults {
        lines.push((
            f.cut,
            format!("FAULT {} cut (minority {:?})", f.what, f.minority),
        ));
        lines.push((f.heal, format!("FAULT {} healed", f.what)));
    }
    for o in ops {
        lines.push((
            o.start,
            format!(
                "client {} node {} {:?} -> {:?} at {:?}",
                o.client, o.node, o.kind, o.outcome, o.end
            ),
        ));
    }
    lines.sort_by_key(|l| l.0);
    let mut s = String::from("history:\n");
    for (t, line) in lines {
        let _ = writeln!(s, "{:>10.3} {line}", t.as_secs_f64());
    }
    s
}

/// Runs `body` on a thread inside the lab's client namespace (threads it starts inherit it).
fn in_lab(nodes: usize, body: impl FnOnce(Arc<Lab>) + Send + 'static) {
    let lab = Arc::new(Lab::new(nodes));
    let inside = Arc::clone(&lab);
    let r = std::thread::spawn(move || {
        inside.enter_clients();
        body(inside)
    })
    .join();
    drop(lab);
    if let Err(e) = r {
        std::panic::resume_unwind(e);
    }
}

/// The other nodes of a cluster of `n`.
fn others(n: usize, of: &[usize]) -> Vec<usize> {
    (0..n).filter(|i| !of.contains(i)).collect()
}

#[test]
fn three_nodes_survive_cuts_one_way_cuts_and_flapping_links() {
    in_lab(3, |lab| {
        let run = Run::start(lab, 3);
        let p = run.primary();
        run.fault("primary isolated", &[p], true, |l| l.isolate(p));
        let p = run.primary();
        run.fault("primary's packets to the others dropped", &[p], true, |l| {
            for o in others(3, &[p]) {
                l.cut(p, o);
            }
        });
        let p = run.primary();
        run.fault(
            "the others' packets to the primary dropped",
            &[p],
            true,
            |l| {
                for o in others(3, &[p]) {
                    l.cut(o, p);
                }
            },
        );
        let p = run.primary();
        let cut = run.history.now();
        for _ in 0..4 {
            run.lab.isolate(p);
            std::thread::sleep(ET / 2);
            run.lab.heal();
            std::thread::sleep(ET / 2);
        }
        run.heal("primary's links flapping", cut, &[], false);
        let p = run.primary();
        let s = others(3, &[p])[0];
        run.fault("a secondary isolated", &[s], true, |l| l.isolate(s));
        run.finish();
    });
}

#[test]
fn five_nodes_survive_splits_with_the_primary_on_either_side() {
    in_lab(5, |lab| {
        let run = Run::start(lab, 5);
        let p = run.primary();
        let minority = [p, others(5, &[p])[0]];
        run.fault("2/3 split, primary in the minority", &minority, true, |l| {
            l.split(&minority, &others(5, &minority))
        });
        let p = run.primary();
        let small = others(5, &[p]);
        let minority = [small[0], small[1]];
        run.fault("2/3 split, primary in the majority", &minority, true, |l| {
            l.split(&minority, &others(5, &minority))
        });
        run.finish();
    });
}

#[test]
fn a_cut_off_primary_never_shows_its_uncommitted_writes() {
    in_lab(3, |lab| {
        let c = lab_cluster(&lab, 3);
        let p = c.wait_primary(LONG).expect("a primary");
        let addr = c.tcp_addrs[p].clone();
        let mut reader = connect(&addr, LONG).expect("reader");
        reader.set("x", "committed").unwrap();
        lab.isolate(p);
        // The write reaches the primary's memory and log, but no majority.
        let writer = std::thread::spawn(move || {
            let mut w = connect(&addr, LONG).expect("writer");
            w.set("x", "dirty")
        });
        // Until the write lands, reads see the committed value; after, they are refused.
        let refused = eventually(LONG, || match reader.get("x") {
            Ok(Some(v)) => {
                assert_eq!(v, "committed", "a read showed an uncommitted write");
                false
            }
            Err(ClientError::Server(e)) => {
                assert!(
                    e.starts_with("This node holds changes a majority has not confirmed"),
                    "unexpected refusal {e}"
                );
                true
            }
            other => panic!("a read on the cut-off primary answered {other:?}"),
        });
        assert!(refused, "reads were never held back");
        let w = writer.join().unwrap();
        assert!(
            matches!(&w, Err(e) if e.outcome_unknown()),
            "the cut-off write answered {w:?}"
        );
        let q = others(3, &[p]);
        let mut majority = connect(&c.tcp_addrs[q[0]], LONG).expect("majority");
        assert!(eventually(LONG, || majority.set("x", "after").is_ok()));
        lab.heal();
        assert!(
            eventually(LONG, || reader.get("x").ok().flatten().as_deref()
                == Some("after")),
            "the old primary never caught up"
        );
    });
}

/// The members node `i` lists in its `cluster-state`, sorted.
fn listed_members(c: &TestCluster, i: usize) -> Vec<String> {
    let mut list: Vec<String> = c
        .state_line(i)
        .trim_start_matches("cluster-state ")
        .split(',')
        .filter_map(|part| part.trim().split('(').next())
        .filter(|m| !m.is_empty())
        .map(str::to_string)
        .collect();
    list.sort();
    list
}

#[test]
fn members_join_and_leave_while_a_member_is_cut_off() {
    in_lab(4, |lab| {
        let mut run = Run::start(lab, 3);
        let p = run.primary();
        let s = others(3, &[p])[0];
        run.lab.isolate(s);
        let cut = run.history.now();
        // A new node asks to join; a majority of the old list (the primary and the other
        // secondary) commits the change without the cut-off member.
        let d = run.cluster.add_node();
        let c = &run.cluster;
        let mut four = c.addrs.clone();
        four.sort();
        let reachable: Vec<usize> = (0..4).filter(|i| *i != s).collect();
        assert!(
            eventually(LONG, || reachable
                .iter()
                .all(|i| listed_members(c, *i) == four)),
            "the join was not applied: {:?}",
            (0..4).map(|i| c.state_line(i)).collect::<Vec<_>>()
        );
        run.history.progress(100);
        // Now the cut-off member leaves: three of the four (counting the newcomer) commit it.
        let mut admin = c.client(p);
        admin.auth(ADMIN, ADMIN_PWD).unwrap();
        let removed = c.addrs[s].clone();
        let reply = admin.call(&format!("leave {removed}")).unwrap();
        assert_eq!(reply.error, None, "{reply:?}");
        let mut three = four.clone();
        three.retain(|m| *m != removed);
        assert!(
            eventually(LONG, || reachable
                .iter()
                .all(|i| listed_members(c, *i) == three)),
            "the leave was not applied: {:?}",
            (0..4).map(|i| c.state_line(i)).collect::<Vec<_>>()
        );
        run.history.progress(100);
        std::thread::sleep(HOLD);
        run.heal("a member cut off while the list changes", cut, &[s], true);
        // The removed node never learned either change; it can no longer disturb the others.
        let term = run.cluster.victories().iter().map(|v| v.1).max();
        run.history.progress(200);
        assert_eq!(
            run.cluster.victories().iter().map(|v| v.1).max(),
            term,
            "the removed node caused an election"
        );
        // A member restarted with the old configured list keeps the list it applied.
        let o = reachable
            .iter()
            .copied()
            .find(|i| *i != p && *i != d)
            .unwrap();
        run.cluster.kill(o);
        run.cluster.start_node(o);
        assert!(
            eventually(LONG, || listed_members(&run.cluster, o) == three),
            "after a restart node {o} lists {:?}",
            listed_members(&run.cluster, o)
        );
        run.history.progress(100);
        run.cluster.kill(s);
        run.finish();
    });
}
