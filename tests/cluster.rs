//! Three nodes on loopback: replication, forwarded writes, failover and catch-up.

mod common;

use std::time::{Duration, Instant};

use common::{eventually, RawTcp, TestCluster, ADMIN, ADMIN_PWD};
use nundb::client::Client;

const LONG: Duration = Duration::from_secs(20);

fn use_db(mut c: Client) -> Client {
    c.use_db("d", "t").unwrap();
    c
}

fn setup(c: &TestCluster, via: usize) {
    let mut a = c.client(via);
    a.auth(ADMIN, ADMIN_PWD).unwrap();
    assert_eq!(a.call("create-db d t newer").unwrap().error, None);
    a.use_db("d", "t").unwrap();
    a.call("create-user u ut").unwrap().into_result().unwrap();
    a.call("set-permissions u r *|w own*")
        .unwrap()
        .into_result()
        .unwrap();
}

/// Waits until every running node has `key` = `expected` (value and version).
fn converged(c: &TestCluster, key: &str, expected: Option<(i32, &str)>) -> bool {
    eventually(LONG, || {
        c.nodes.iter().enumerate().all(|(i, n)| {
            n.is_none() || {
                // A node still catching up may not have the database yet.
                let mut cl = c.client(i);
                cl.use_db("d", "t").is_ok()
                    && cl.get_safe(key).ok() == Some(expected.map(|(v, s)| (v, s.to_string())))
            }
        })
    })
}

#[test]
fn writes_replicate_and_secondaries_forward() {
    let c = TestCluster::start(3, &[]);
    let p = c.primary().unwrap();
    let s1 = (p + 1) % 3;
    let s2 = (p + 2) % 3;
    setup(&c, s1);
    let mut on_primary = use_db(c.client(p));
    on_primary
        .set("multi", "several words; ünïcödé {\"a\": 1}")
        .unwrap();
    assert!(converged(
        &c,
        "multi",
        Some((0, "several words; ünïcödé {\"a\": 1}"))
    ));

    // Writes through a secondary: answered by the primary, read back at once on that secondary.
    let mut on_secondary = use_db(c.client(s1));
    on_secondary.set("k", "v1").unwrap();
    assert_eq!(on_secondary.get_safe("k").unwrap(), Some((0, "v1".into())));
    on_secondary.set_safe("k", 0, "v2").unwrap();
    // `newer` strategy replicated: a stale set-safe wins on the primary.
    on_secondary.set_safe("k", 0, "v3").unwrap();
    on_secondary.increment("n", 7).unwrap();
    on_secondary.remove("multi").unwrap();
    assert!(converged(&c, "k", Some((2, "v3"))));
    assert!(converged(&c, "n", Some((0, "7"))));
    assert!(converged(&c, "multi", None));

    // Users and permissions replicate: the user is enforced on every node.
    for i in 0..3 {
        let mut u = c.client(i);
        u.use_db_as("d", "u", "ut").unwrap();
        assert_eq!(u.get("k").unwrap().as_deref(), Some("v3"));
        let denied = u.call("set k x").unwrap();
        assert_eq!(
            denied.error.as_deref(),
            Some("permission denied"),
            "node {i}"
        );
        assert_eq!(u.call("set own1 x").unwrap().error, None, "node {i}");
    }
    // Watchers on a secondary see the changes written elsewhere, in order.
    let mut watcher = use_db(c.client(s2));
    watcher.watch("w").unwrap();
    for i in 0..20 {
        on_secondary.set("w", &i.to_string()).unwrap();
    }
    for i in 0..20 {
        match watcher.next_event().unwrap() {
            nundb::client::Event::Changed { version, value, .. } => {
                assert_eq!(version, i);
                assert_eq!(value, i.to_string());
            }
            e => panic!("{e:?}"),
        }
    }
    // cluster-state in NunDB's shape, and the diagnostic commands, on every node.
    for i in 0..3 {
        let mut a = c.client(i);
        a.auth(ADMIN, ADMIN_PWD).unwrap();
        assert_eq!(a.call("ping").unwrap().messages, vec!["pong"], "node {i}");
        assert_eq!(
            a.call("debug pending-ops").unwrap().messages,
            vec!["pending-ops 0"],
            "node {i}"
        );
        let info = a.call("debug process-info").unwrap().messages.remove(0);
        assert!(info.starts_with("process-info uptime_secs: "), "{info}");
        assert!(info.contains(", dbs: 1, "), "node {i}: {info}");
        let metrics = a.call("metrics-state").unwrap().messages.remove(0);
        assert!(
            metrics.starts_with("metrics-state pending_ops: 0, op_log_file_size: "),
            "{metrics}"
        );
        // Every node has every record: no lag, whether measured from the primary's acks or
        // against the primary's log end.
        assert!(
            eventually(LONG, || a
                .call("metrics-state")
                .unwrap()
                .messages
                .remove(0)
                .ends_with(", replication_lag: 0")),
            "node {i}: {metrics}"
        );
        let line = a.call("cluster-state").unwrap().messages.remove(0);
        assert!(line.starts_with("cluster-state  "), "{line}");
        assert!(line.contains(&format!("{}(self)", c.addrs[i])), "{line}");
        assert!(line.contains(&format!("{}(", c.addrs[p])), "{line}");
        assert_eq!(line.matches(":Primary").count(), 1, "{line}");
    }
    // The primary waited for a majority on every write above: its replication average is set.
    let mut a = c.client(p);
    a.auth(ADMIN, ADMIN_PWD).unwrap();
    let line = a.call("metrics-state").unwrap().messages.remove(0);
    let avg: f64 = line
        .split("replication_time_moving_avg: ")
        .nth(1)
        .and_then(|rest| rest.split(',').next())
        .and_then(|f| f.parse().ok())
        .unwrap_or_else(|| panic!("{line}"));
    assert!(avg > 0.0, "{line}");
    assert!(line.starts_with("metrics-state pending_ops: 0, "), "{line}");
}

#[test]
fn a_write_without_a_majority_gets_an_error_not_ok() {
    let mut c = TestCluster::start(3, &[]);
    let p = c.primary().unwrap();
    setup(&c, p);
    let mut w = use_db(c.client(p));
    w.set("k", "with a majority").unwrap();
    c.kill((p + 1) % 3);
    c.kill((p + 2) % 3);
    let reply = w.call("set k alone").unwrap();
    let error = reply
        .error
        .clone()
        .unwrap_or_else(|| panic!("acknowledged alone: {reply:?}"));
    assert!(
        error == "Write not confirmed by a majority (1 of 2 members)"
            || error == "Not the primary any more; the write may not be durable",
        "{error}"
    );
    // With a member back, the cluster elects again and takes writes.
    c.start_node((p + 1) % 3);
    let np = c.wait_primary(LONG).expect("a primary with a majority");
    let mut w = use_db(c.client(np));
    w.set("k", "majority again").unwrap();
    assert_eq!(w.get("k").unwrap().as_deref(), Some("majority again"));
}

/// The members node `i` lists in its `cluster-state`.
fn listed_members(c: &TestCluster, i: usize) -> Vec<String> {
    c.state_line(i)
        .trim_start_matches("cluster-state ")
        .split(',')
        .filter_map(|part| part.trim().split('(').next())
        .filter(|m| !m.is_empty())
        .map(str::to_string)
        .collect()
}

#[test]
fn a_started_node_joins_the_cluster_and_leave_removes_it() {
    let mut c = TestCluster::start(3, &[]);
    let p = c.primary().unwrap();
    setup(&c, p);
    let mut w = use_db(c.client(p));
    w.set("k", "before the join").unwrap();
    // The new node only has to start with the member list: it asks to join.
    let d = c.add_node();
    let mut all = c.addrs.clone();
    all.sort();
    assert!(
        eventually(LONG, || (0..4).all(|i| listed_members(&c, i) == all)),
        "{:?}",
        (0..4).map(|i| c.state_line(i)).collect::<Vec<_>>()
    );
    assert!(converged(&c, "k", Some((0, "before the join"))));
    w.set("k", "after the join").unwrap();
    assert!(eventually(LONG, || {
        let mut cl = use_db(c.client(d));
        cl.get("k").ok().flatten().as_deref() == Some("after the join")
    }));

    let mut admin = c.client((p + 1) % 3);
    admin.auth(ADMIN, ADMIN_PWD).unwrap();
    for (cmd, error) in [
        (
            "join nonsense",
            "Invalid member address nonsense: use host:port",
        ),
        ("leave 127.0.0.1:1", "Not a member: 127.0.0.1:1"),
        (
            "join 127.0.0.1:1",
            "127.0.0.1:1 does not answer as 127.0.0.1:1; start it first, with --external-address 127.0.0.1:1 (a node started with the member list joins by itself)",
        ),
    ] {
        assert_eq!(
            admin.call(cmd).unwrap().error.as_deref(),
            Some(error),
            "{cmd}"
        );
    }
    // Nobody votes for a non-member, nor moves to its term: the primary keeps leading.
    let term = last_term(&c);
    let p = c.wait_primary(LONG).unwrap();
    let reply = admin.call("election 999 127.0.0.1:2 99 99").unwrap();
    assert_eq!(
        reply.messages,
        vec![format!("vote no {term} {}", c.addrs[p])],
        "{reply:?}"
    );
    w.set("k", "still led").unwrap();
    assert!(converged(&c, "k", Some((2, "still led"))));
    // Stopped, then removed through a secondary (forwarded to the primary).
    let removed = c.addrs[d].clone();
    c.kill(d);
    assert_eq!(admin.call(&format!("leave {removed}")).unwrap().error, None);
    all.retain(|m| *m != removed);
    assert!(
        eventually(LONG, || (0..3).all(|i| listed_members(&c, i) == all)),
        "{:?}",
        (0..3).map(|i| c.state_line(i)).collect::<Vec<_>>()
    );
    // Three members again: the primary and one secondary are a majority (2 of 4 would not be).
    let p = c.wait_primary(LONG).unwrap();
    c.kill((p + 1) % 3);
    let mut w = use_db(c.client(p));
    w.set("k", "two of three").unwrap();
    assert_eq!(w.get("k").unwrap().as_deref(), Some("two of three"));
}

#[test]
fn a_single_node_grows_into_a_cluster() {
    let mut c = TestCluster::start(1, &[]);
    assert_eq!(c.primary(), Some(0));
    setup(&c, 0);
    let mut w = use_db(c.client(0));
    w.set("k", "alone").unwrap();
    let b = c.add_node();
    let mut all = c.addrs.clone();
    all.sort();
    assert!(
        eventually(LONG, || (0..2).all(|i| listed_members(&c, i) == all)),
        "{:?}",
        (0..2).map(|i| c.state_line(i)).collect::<Vec<_>>()
    );
    // Writes now need both nodes, and reach the new one.
    let p = c.wait_primary(LONG).unwrap();
    let mut w = use_db(c.client(p));
    w.set("k", "two nodes").unwrap();
    assert!(converged(&c, "k", Some((1, "two nodes"))));
    assert!(c
        .state_line(p)
        .contains(&format!("{}(Connected)", c.addrs[1 - p])));
    let _ = b;
}

#[test]
fn a_survivor_without_majority_is_repaired_with_leave() {
    let mut c = TestCluster::start(2, &[]);
    let p = c.primary().unwrap();
    let dead = 1 - p;
    c.kill(dead);
    // Alone, the primary steps down; nobody leads.
    assert!(eventually(LONG, || !c.state_line(p).contains(":Primary")));
    let mut admin = c.client(p);
    admin.auth(ADMIN, ADMIN_PWD).unwrap();
    let reply = admin.call(&format!("leave {}", c.addrs[dead])).unwrap();
    assert_eq!(reply.error, None);
    assert_eq!(
        reply.messages,
        vec!["applied on this node only: no primary is elected"]
    );
    // A cluster of one elects itself and takes writes again.
    assert_eq!(c.wait_primary(LONG), Some(p));
    setup(&c, p);
    let mut w = use_db(c.client(p));
    w.set("k", "repaired").unwrap();
    assert_eq!(w.get("k").unwrap().as_deref(), Some("repaired"));
}

#[test]
fn primary_kill_fails_over_and_old_primary_catches_up() {
    let mut c = TestCluster::start(3, &[]);
    let p = c.primary().unwrap();
    setup(&c, p);
    let mut w = use_db(c.client(p));
    w.set("before", "1").unwrap();
    assert!(converged(&c, "before", Some((0, "1"))));
    let killed_at = Instant::now();
    c.kill(p);
    let np = c.wait_primary(LONG).expect("new primary");
    eprintln!("failover took {:?}", killed_at.elapsed());
    assert_ne!(np, p);
    let other = (0..3).find(|i| *i != p && *i != np).unwrap();
    let mut w = use_db(c.client(other));
    w.set("during", "2").unwrap();
    w.remove("before").unwrap();
    c.start_node(p);
    assert!(converged(&c, "during", Some((0, "2"))));
    assert!(converged(&c, "before", None));
    assert_eq!(
        c.wait_primary(LONG),
        Some(np),
        "the restarted node rejoins as secondary"
    );
    // Exactly one victory per term.
    let mut terms: Vec<u64> = c.victories().iter().map(|(_, t)| *t).collect();
    let n = terms.len();
    terms.sort();
    terms.dedup();
    assert_eq!(
        terms.len(),
        n,
        "two primaries in one term: {:?}",
        c.victories()
    );
}

/// First LSN still in node `dir`'s operation log (segment files are named by it).
fn first_logged_lsn(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir.join("oplog"))
        .unwrap()
        .filter_map(|e| {
            e.ok()?
                .file_name()
                .to_str()?
                .strip_suffix(".oplog")?
                .parse()
                .ok()
        })
        .min()
        .unwrap_or(0)
}

#[test]
fn node_behind_a_truncated_log_gets_a_full_sync_with_strategies() {
    // A small log and backlog: x's position is soon neither in memory nor on disk.
    let mut c = TestCluster::start(
        3,
        &[
            ("NUN_MAX_OP_LOG_SIZE", "20000"),
            ("NUN_REPLICATION_BACKLOG", "20000"),
        ],
    );
    let p = c.primary().unwrap();
    let x = (p + 1) % 3;
    // Two databases x knows: `re` will be recreated with another strategy, `gone` deleted.
    let mut admin = c.client(p);
    admin.auth(ADMIN, ADMIN_PWD).unwrap();
    for cmd in ["create-db re t none", "create-db gone t none"] {
        admin.call(cmd).unwrap().into_result().unwrap();
    }
    let mut re = c.client(p);
    re.use_db("re", "t").unwrap();
    re.set("old", "from before").unwrap();
    assert!(eventually(LONG, || {
        let mut cl = c.client(x);
        cl.use_db("re", "t").is_ok() && cl.get("old").ok().flatten().is_some()
    }));
    c.kill(x);
    // The other databases exist only in records x never saw.
    for cmd in [
        "create-db arb t arbiter",
        "create-db nw t newer",
        "delete-db re",
        "create-db re t arbiter",
        "delete-db gone",
    ] {
        admin.call(cmd).unwrap().into_result().unwrap();
    }
    let mut w = c.client(p);
    w.use_db("nw", "t").unwrap();
    let words = "several words; a semicolon, unicode ✓ é";
    w.set("words", words).unwrap();
    for i in 0..2000 {
        w.set(&format!("key{}", i % 300), &format!("value {i}"))
            .unwrap();
    }
    assert!(
        eventually(LONG, || first_logged_lsn(&c.dirs[p]) > 100),
        "the primary's log was never truncated"
    );
    // The primary reports how far its slowest member (x, down) is behind.
    let metrics = admin.call("metrics-state").unwrap().messages.remove(0);
    let lag: u64 = metrics
        .rsplit("replication_lag: ")
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{metrics}"));
    assert!(lag >= 2000, "{metrics}");

    c.start_node(x);
    let on_x = |key: &str| {
        let mut cl = c.client(x);
        cl.use_db("nw", "t").ok()?;
        cl.get_safe(key).ok()?
    };
    assert!(
        eventually(LONG, || on_x("key299") == Some((5, "value 1799".into()))),
        "{:?}",
        on_x("key299")
    );
    assert_eq!(on_x("words"), Some((0, words.to_string())));
    let primary_log = std::fs::read_to_string(c.dirs[p].join("node.log")).unwrap();
    assert!(primary_log.contains("full sync at LSN"), "{primary_log}");
    // Records after the full sync stream as usual.
    w.set("after", "the sync").unwrap();
    assert!(eventually(LONG, || on_x("after") == Some((0, "the sync".into()))));

    // x's data alone, as a single node: the strategies came to it through the full sync only.
    c.kill(x);
    let single = common::Server::start_in(c.dirs[x].clone(), &[]);
    let mut nw = single.tcp_client("nw", "t");
    assert_eq!(nw.get_safe("words").unwrap(), Some((0, words.to_string())));
    nw.set("words", "newer").unwrap();
    nw.set_safe("words", 0, "stale wins").unwrap();
    assert_eq!(
        nw.get_safe("words").unwrap(),
        Some((2, "stale wins".into()))
    );
    let mut arb = single.tcp_client("arb", "t");
    arb.set_safe("a", 0, "v1").unwrap();
    assert_eq!(
        arb.set_safe("a", 0, "v2").unwrap_err().to_string(),
        "server error: An conflitct happend and there is no arbiter client not connected"
    );
    // A database x already had took the new strategy and contents; a deleted one is gone.
    let mut re = single.tcp_client("re", "t");
    assert_eq!(re.get("old").unwrap(), None);
    re.set_safe("a", 0, "v1").unwrap();
    assert_eq!(
        re.set_safe("a", 0, "v2").unwrap_err().to_string(),
        "server error: An conflitct happend and there is no arbiter client not connected"
    );
    let mut gone = Client::connect_tcp(&single.tcp).unwrap();
    assert!(gone.use_db("gone", "t").is_err());
}

/// Highest term any node won so far.
fn last_term(c: &TestCluster) -> u64 {
    c.victories().iter().map(|(_, t)| *t).max().unwrap_or(0)
}

#[test]
fn force_election_elects_again_from_the_primary_or_a_secondary() {
    let c = TestCluster::start(3, &[]);
    setup(&c, c.primary().unwrap());
    for (round, on_primary) in [true, false].into_iter().enumerate() {
        let p = c.wait_primary(LONG).unwrap();
        let before = last_term(&c);
        let target = if on_primary { p } else { (p + 1) % 3 };
        let mut admin = c.client(target);
        admin.auth(ADMIN, ADMIN_PWD).unwrap();
        admin
            .call("debug force-election")
            .unwrap()
            .into_result()
            .unwrap();
        assert!(
            eventually(LONG, || last_term(&c) > before && c.primary().is_some()),
            "round {round}: no new election"
        );
        // The new primary takes writes.
        let key = format!("forced{round}");
        assert!(eventually(LONG, || use_db(c.client(target))
            .set(&key, "yes")
            .is_ok()));
        assert!(converged(&c, &key, Some((0, "yes"))));
    }
}

#[test]
fn isolated_secondary_rejoins_without_deposing_the_primary() {
    let net = common::proxy::Net::new();
    let c = TestCluster::start_proxied(3, &net, &[]);
    let p = c.wait_primary(LONG).unwrap();
    setup(&c, p);
    let s = (p + 1) % 3;
    let before = c.victories();
    net.isolate(&c.addrs[s]);
    // Cut off for ten election timeouts: it may ask for votes, but nobody answers.
    std::thread::sleep(Duration::from_secs(5));
    net.heal();
    use_db(c.client(p)).set("after-heal", "v").unwrap();
    assert!(converged(&c, "after-heal", Some((0, "v"))));
    assert_eq!(c.primary(), Some(p));
    assert_eq!(c.victories(), before, "the healed node forced an election");
}

/// What one writer saw: keys acknowledged, keys whose outcome is unknown, anything else.
#[derive(Default, Debug)]
struct Writes {
    acked: Vec<String>,
    unknown: Vec<String>,
    other: Vec<String>,
}

#[test]
fn cluster_clients_keep_writing_through_a_primary_kill() {
    use nundb::client::{ClientError, ClusterClient};
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;

    let mut c = TestCluster::start(3, &[]);
    let p = c.primary().unwrap();
    setup(&c, p);
    let tcp = |i: usize| c.nodes[i].as_ref().unwrap().tcp.clone();
    let secondary = (p + 1) % 3;
    // One client starts on the primary (its connection dies with it), one on a secondary (its
    // writes are forwarded to the primary that dies).
    let orders: Vec<Vec<String>> = vec![
        vec![tcp(p), tcp(secondary), tcp((p + 2) % 3)],
        vec![tcp(secondary), tcp((p + 2) % 3), tcp(p)],
    ];
    let stop = Arc::new(AtomicBool::new(false));
    let acked: Arc<Vec<AtomicUsize>> = Arc::new((0..2).map(|_| AtomicUsize::new(0)).collect());
    let writers: Vec<_> = orders
        .into_iter()
        .enumerate()
        .map(|(w, nodes)| {
            let (stop, acked) = (stop.clone(), acked.clone());
            std::thread::spawn(move || {
                let nodes: Vec<&str> = nodes.iter().map(String::as_str).collect();
                let mut client = ClusterClient::new(&nodes);
                client.auth(ADMIN, ADMIN_PWD).unwrap();
                client.use_db("d", "t").unwrap();
                let mut seen = Writes::default();
                let mut i = 0;
                while !stop.load(Ordering::SeqCst) {
                    let key = format!("w{w}-{i}");
                    match client.set(&key, &i.to_string()) {
                        Ok(()) => {
                            seen.acked.push(key);
                            acked[w].fetch_add(1, Ordering::SeqCst);
                        }
                        Err(ClientError::Unknown(e)) => seen.unknown.push(format!("{key}: {e}")),
                        Err(e) => seen.other.push(format!("{key}: {e}")),
                    }
                    i += 1;
                }
                // Reads follow the cluster too.
                let last = seen.acked.last().cloned().unwrap_or_default();
                let read = client.get(&last).unwrap();
                assert!(read.is_some(), "writer {w} reads back {last}");
                seen
            })
        })
        .collect();
    let both_past = |n: usize| acked.iter().all(|a| a.load(Ordering::SeqCst) >= n);
    assert!(eventually(LONG, || both_past(30)), "writers started");
    let before: Vec<usize> = acked.iter().map(|a| a.load(Ordering::SeqCst)).collect();
    let primary_http = c.nodes[p].as_ref().unwrap().http_url();
    c.kill(p);
    assert!(
        eventually(Duration::from_secs(60), || acked
            .iter()
            .zip(&before)
            .all(|(a, b)| a.load(Ordering::SeqCst) >= b + 30)),
        "both writers go on after the kill: {acked:?} (before {before:?})"
    );
    stop.store(true, Ordering::SeqCst);
    let results: Vec<Writes> = writers.into_iter().map(|t| t.join().unwrap()).collect();
    for (w, r) in results.iter().enumerate() {
        eprintln!(
            "writer {w}: {} acknowledged, unknown: {:?}",
            r.acked.len(),
            r.unknown
        );
        assert!(r.other.is_empty(), "writer {w} saw errors: {:?}", r.other);
    }
    // Every acknowledged write is on every live node.
    let survivors: Vec<usize> = (0..3).filter(|i| *i != p).collect();
    for i in &survivors {
        assert!(
            eventually(LONG, || {
                let mut cl = use_db(c.client(*i));
                results
                    .iter()
                    .flat_map(|r| &r.acked)
                    .all(|k| cl.get(k).ok().flatten().is_some())
            }),
            "node {i} has every acknowledged write"
        );
    }
    // `nun-db exec` given the dead node first moves on to a live one.
    let hosts = format!(
        "{primary_http},{}",
        c.nodes[survivors[0]].as_ref().unwrap().http_url()
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_nun-db"))
        .args(["-u", ADMIN, "-p", ADMIN_PWD, "-h", &hosts, "exec"])
        .arg(format!("use-db d t; get {}", results[0].acked[0]))
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "Response \"valid auth;empty;value 0\"\n"
    );
}

/// A session ships its writes to the secondaries itself (the sender thread sleeps until its
/// heartbeat, a quarter of the election timeout: 1 s here). A majority write and a read of
/// it, pipelined in one batch, are answered with the new value without waiting for that
/// heartbeat; if nothing shipped them, ten such batches would take about 5 s.
#[test]
fn pipelined_majority_writes_and_reads_do_not_wait_for_a_heartbeat() {
    let c = TestCluster::start(
        3,
        &[
            ("NUN_ELECTION_TIMEOUT", "4000"),
            ("NUN_WRITE_QUORUM", "majority"),
        ],
    );
    let p = c.primary().unwrap();
    setup(&c, p);
    let mut raw = RawTcp::connect(&c.tcp_addrs[p]);
    assert_eq!(raw.cmd("use-db d t"), vec!["ok \n"]);
    // The first write also waits for the secondaries' streams to be in place.
    assert_eq!(raw.cmd("set warm 0"), vec!["ok \n"]);
    let started = Instant::now();
    for i in 1..=10 {
        raw.send(format!("set k {i}\nget k\n").as_bytes());
        assert_eq!(raw.until_envelope(), vec!["ok \n"]);
        assert_eq!(
            raw.until_envelope(),
            vec![format!("value {i}\n"), "ok \n".to_string()]
        );
    }
    let took = started.elapsed();
    assert!(took < Duration::from_secs(2), "ten batches took {took:?}");
    assert!(converged(&c, "k", Some((9, "10"))));
}

/// With `NUN_WRITE_QUORUM=1` the secondaries acknowledge lazily (at most every 50 ms, and
/// every heartbeat: 1 s here), and the primary does not hold single writes for those
/// acknowledgements: a watcher on a secondary gets each write at once (a primary that held
/// each write for the last one's acknowledgement took 3 s for ten; here twenty take
/// milliseconds). The acknowledgements still come: the primary's lag figure returns to zero.
#[test]
fn quorum_one_secondaries_get_single_writes_at_once_and_acknowledge_lazily() {
    let c = TestCluster::start(
        3,
        &[("NUN_ELECTION_TIMEOUT", "4000"), ("NUN_WRITE_QUORUM", "1")],
    );
    let p = c.primary().unwrap();
    setup(&c, p);
    let mut watcher = use_db(c.client((p + 1) % 3));
    watcher.watch("w").unwrap();
    let mut writer = use_db(c.client(p));
    // The first write also waits for the secondaries' streams to be in place.
    writer.set("warm", "0").unwrap();
    assert!(converged(&c, "warm", Some((0, "0"))));
    let started = Instant::now();
    for i in 0..20 {
        writer.set("w", &i.to_string()).unwrap();
        match watcher.next_event().unwrap() {
            nundb::client::Event::Changed { version, value, .. } => {
                assert_eq!((version, value), (i, i.to_string()));
            }
            e => panic!("{e:?}"),
        }
    }
    let took = started.elapsed();
    assert!(took < Duration::from_secs(2), "twenty writes took {took:?}");
    let mut admin = c.client(p);
    admin.auth(ADMIN, ADMIN_PWD).unwrap();
    assert!(eventually(LONG, || admin
        .call("metrics-state")
        .unwrap()
        .messages
        .remove(0)
        .ends_with(", replication_lag: 0")));
}
