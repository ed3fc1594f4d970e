//! Chaos: three nodes under concurrent writes (set, set-safe, remove, increment) and watchers on
//! every node, while the primary is killed and restarted five times, or cut off from the others
//! for five seconds at a time. Afterwards: every acknowledged write is on every node, all nodes
//! hold identical data, no term had two primaries, every watcher saw each key's versions in
//! order without gaps, and no two watchers saw different values for one version (nobody was
//! shown a change that was later rolled back).

mod common;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::faults::{check_terms, check_watchers, dump, watch_until, Segment};
use common::proxy::Net;
use common::{eventually, TestCluster, ADMIN, ADMIN_PWD};
use nundb::client::{Client, ClientError};

/// Keys every writer fights over.
const SHARED: [&str; 4] = ["k0", "k1", "k2", "k3"];
const WRITERS_PER_NODE: usize = 2;
const LONG: Duration = Duration::from_secs(60);

/// What the workload did, shared by its threads.
#[derive(Default)]
struct Workload {
    stop: AtomicBool,
    /// Writes answered `ok`.
    acked: AtomicU64,
    /// Writes answered with an error or lost with their connection.
    failed: AtomicU64,
    /// Unique keys whose `set` was acknowledged, with their value.
    unique: Mutex<Vec<(String, String)>>,
    /// Per writer counter key: (acknowledged increments, attempted increments).
    counters: Mutex<HashMap<String, (u64, u64)>>,
    /// Error replies by kind (their first words), for the summary.
    errors: Mutex<BTreeMap<String, u64>>,
}

fn connect(addr: &str) -> Option<Client> {
    let mut c = Client::connect_tcp_timeout(addr, Duration::from_secs(2)).ok()?;
    c.set_timeout(Some(Duration::from_secs(30))).ok()?;
    c.use_db("chaos", "t").ok()?;
    Some(c)
}

/// Waits until the workload acknowledged `n` more writes.
fn progress(w: &Workload, n: u64) {
    let start = w.acked.load(Ordering::Relaxed);
    assert!(
        eventually(LONG, || w.acked.load(Ordering::Relaxed) >= start + n),
        "the cluster stopped acknowledging writes"
    );
}

fn writer(addr: String, id: usize, w: Arc<Workload>) {
    let mut client: Option<Client> = None;
    let mut seed = 0x9e37_79b9_7f4a_7c15u64 ^ (id as u64 + 1);
    let counter = format!("c{id}");
    let mut n = 0u64;
    while !w.stop.load(Ordering::Relaxed) {
        let Some(c) = client.as_mut() else {
            client = connect(&addr);
            if client.is_none() {
                std::thread::sleep(Duration::from_millis(50));
            }
            continue;
        };
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        n += 1;
        let key = SHARED[(seed >> 8) as usize % SHARED.len()];
        let result = match seed % 6 {
            0 => {
                let (k, v) = (format!("u{id}-{n}"), format!("v{id}-{n}"));
                let r = c.set(&k, &v);
                if r.is_ok() {
                    w.unique.lock().unwrap().push((k, v));
                }
                r
            }
            1 => {
                w.counters
                    .lock()
                    .unwrap()
                    .entry(counter.clone())
                    .or_default()
                    .1 += 1;
                let r = c.increment(&counter, 1);
                if r.is_ok() {
                    w.counters
                        .lock()
                        .unwrap()
                        .entry(counter.clone())
                        .or_default()
                        .0 += 1;
                }
                r
            }
            2 => c.set(key, &format!("s{id}-{n}")),
            3 => match c.get_safe(key) {
                Ok(Some((version, _))) => c.set_safe(key, version, &format!("x{id}-{n}")),
                Ok(None) => c.set_safe(key, 0, &format!("x{id}-{n}")),
                Err(e) => Err(e),
            },
            4 => c.remove(key),
            _ => c.increment(key, 1),
        };
        match result {
            Ok(()) => {
                w.acked.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                w.failed.fetch_add(1, Ordering::Relaxed);
                let kind = match &e {
                    ClientError::Server(text) => {
                        text.split(' ').take(3).collect::<Vec<_>>().join(" ")
                    }
                    _ => "connection lost".to_string(),
                };
                *w.errors.lock().unwrap().entry(kind).or_default() += 1;
                if !matches!(e, ClientError::Server(_)) {
                    client = None;
                }
                // Failures other than conflicts mean the cluster is changing: do not spin.
                if !matches!(&e, ClientError::Server(t) if t.starts_with("Invalid") || t.contains("numeric"))
                {
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        }
    }
}

struct Run {
    workload: Arc<Workload>,
    writers: Vec<JoinHandle<()>>,
    watchers: Vec<JoinHandle<Vec<Segment>>>,
}

fn start_workload(c: &TestCluster) -> Run {
    let p = c.wait_primary(LONG).expect("a primary");
    let mut admin = c.client(p);
    admin.auth(ADMIN, ADMIN_PWD).unwrap();
    admin
        .call("create-db chaos t")
        .unwrap()
        .into_result()
        .unwrap();
    let workload = Arc::new(Workload::default());
    let mut writers = Vec::new();
    let mut watchers = Vec::new();
    for (i, addr) in c.tcp_addrs.iter().enumerate() {
        assert!(
            eventually(LONG, || connect(addr).is_some()),
            "node {i} never saw the database"
        );
        let w = Arc::clone(&workload);
        let a = addr.clone();
        watchers.push(std::thread::spawn(move || {
            watch_until(&w.stop, &SHARED, || connect(&a))
        }));
        for k in 0..WRITERS_PER_NODE {
            let w = Arc::clone(&workload);
            let a = addr.clone();
            writers.push(std::thread::spawn(move || {
                writer(a, i * WRITERS_PER_NODE + k, w)
            }));
        }
    }
    progress(&workload, 200);
    Run {
        workload,
        writers,
        watchers,
    }
}

/// Stops the workload and checks every guarantee.
fn finish(mut c: TestCluster, run: Run) {
    let w = &run.workload;
    w.stop.store(true, Ordering::Relaxed);
    for t in run.writers {
        t.join().unwrap();
    }
    // Everyone converges to the same data.
    let mut last = Vec::new();
    let same = eventually(LONG, || {
        last = c
            .tcp_addrs
            .iter()
            .map(|a| connect(a).and_then(|mut cl| dump(&mut cl)))
            .collect();
        last.iter().all(|d| d.is_some() && *d == last[0])
    });
    assert!(same, "nodes did not converge");
    let data = last[0].clone().unwrap();
    // Nothing acknowledged is lost.
    let unique = w.unique.lock().unwrap();
    for (k, v) in unique.iter() {
        assert_eq!(
            data.get(k).map(|(_, value)| value.as_str()),
            Some(v.as_str()),
            "acknowledged write {k} = {v} is missing"
        );
    }
    for (k, (acked, attempted)) in w.counters.lock().unwrap().iter() {
        let value: u64 = data.get(k).map_or(0, |(_, v)| v.parse().unwrap());
        assert!(
            (*acked..=*attempted).contains(&value),
            "counter {k} = {value}, acknowledged {acked} of {attempted} increments"
        );
    }
    let victories = c.victories();
    // Watchers: closing the nodes ends their connections.
    for i in 0..c.nodes.len() {
        c.kill(i);
    }
    let segments: Vec<Vec<Segment>> = run
        .watchers
        .into_iter()
        .map(|t| t.join().unwrap())
        .collect();
    // One primary per term; watchers in order, and none saw a change later rolled back.
    let mut violations = Vec::new();
    check_terms(&victories, &mut violations);
    check_watchers(&segments, &data, &mut violations);
    assert!(violations.is_empty(), "{}", violations.join("\n"));
    let events: usize = segments.iter().flatten().map(Vec::len).sum();
    let connections: usize = segments.iter().map(Vec::len).sum();
    eprintln!(
        "chaos: {} writes acknowledged, {} failed {:?}, {} unique keys, {} watch events checked on {} connections, terms {:?}",
        w.acked.load(Ordering::Relaxed),
        w.failed.load(Ordering::Relaxed),
        w.errors.lock().unwrap(),
        unique.len(),
        events,
        connections,
        victories
    );
}

#[test]
fn primary_killed_and_restarted_five_times() {
    let mut c = TestCluster::start(3, &[]);
    let run = start_workload(&c);
    for round in 0..5 {
        let p = c.wait_primary(LONG).expect("a primary");
        c.kill(p);
        let started = Instant::now();
        assert!(
            eventually(LONG, || c.primary().is_some_and(|q| q != p)),
            "round {round}: no new primary"
        );
        eprintln!(
            "round {round}: new primary {:?} after {:?}",
            c.primary(),
            started.elapsed()
        );
        progress(&run.workload, 100);
        c.start_node(p);
        progress(&run.workload, 100);
    }
    finish(c, run);
}

#[test]
fn primary_cut_off_for_five_seconds() {
    let net = Net::new();
    let c = TestCluster::start_proxied(3, &net, &[]);
    let run = start_workload(&c);
    for round in 0..2 {
        let p = c.wait_primary(LONG).expect("a primary");
        let cut = Instant::now();
        net.isolate(&c.addrs[p]);
        assert!(
            eventually(LONG, || c.primary().is_some_and(|q| q != p)),
            "round {round}: the majority elected no primary"
        );
        progress(&run.workload, 100);
        // The fault lasts five seconds whatever happens meanwhile.
        std::thread::sleep(Duration::from_secs(5).saturating_sub(cut.elapsed()));
        net.heal();
        progress(&run.workload, 100);
    }
    finish(c, run);
}
