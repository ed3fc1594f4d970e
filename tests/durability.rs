//! Crash, restart, corruption and NunDB-import tests of the storage engine.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{start_failing, temp_dir, RawTcp, Server};
use nundb::client::Client;
use rand::Rng;

const CLIENTS: usize = 8;

fn setup_db(s: &Server) {
    s.create_db("d", "t", Some("newer"));
    let mut a = s.admin();
    a.use_db("d", "t").unwrap();
    a.call("create-user u ut").unwrap().into_result().unwrap();
    a.call("set-permissions u r *|w own*")
        .unwrap()
        .into_result()
        .unwrap();
}

fn check_security(s: &Server) {
    let mut u = RawTcp::connect(&s.tcp);
    assert_eq!(u.cmd("use-db d u ut"), vec!["ok \n"]);
    assert_eq!(u.cmd("set own1 x"), vec!["ok \n"]);
    assert_eq!(
        u.cmd("set k0 x"),
        vec!["permission denied\n", "error permission denied \n"]
    );
    assert_eq!(u.cmd("use-db d u bad"), vec!["error Invalid token \n"]);
    assert_eq!(u.cmd("use-db d t"), vec!["ok \n"]);
    assert_eq!(u.cmd("use-db d wrong"), vec!["error Invalid token \n"]);
}

/// Per client: the last counter value acknowledged, and whether one more was in flight.
type Acks = Arc<Mutex<Vec<(i64, Instant)>>>;

/// Runs CLIENTS writers, each bumping its own counter key `k<c>` with `set k<c> <n>` so that
/// a key's version always equals its value. Returns when `stop` is set or a write fails.
fn run_writers(
    s: &Server,
    acks: &Acks,
    stop: &Arc<AtomicBool>,
) -> Vec<std::thread::JoinHandle<()>> {
    (0..CLIENTS)
        .map(|c| {
            let addr = s.tcp.clone();
            let acks = Arc::clone(acks);
            let stop = Arc::clone(stop);
            std::thread::spawn(move || {
                let Ok(mut client) = Client::connect_tcp(&addr) else {
                    return;
                };
                if client.use_db("d", "t").is_err() {
                    return;
                }
                let mut next = acks.lock().unwrap()[c].0 + 1;
                while !stop.load(Ordering::Relaxed) {
                    match client.set(&format!("k{c}"), &next.to_string()) {
                        Ok(()) => {
                            acks.lock().unwrap()[c] = (next, Instant::now());
                            next += 1;
                        }
                        Err(_) => return,
                    }
                }
            })
        })
        .collect()
}

/// After a restart: each counter holds the last acked value or the one in flight after it, and
/// its version equals its value.
fn check_counters(s: &Server, acks: &Acks, durable_before: Option<Instant>) {
    let mut c = s.tcp_client("d", "t");
    let mut acks = acks.lock().unwrap();
    for (i, (acked, at)) in acks.iter_mut().enumerate() {
        let got = c.get_safe(&format!("k{i}")).unwrap();
        let must_have = match durable_before {
            None => true,
            Some(limit) => *at < limit,
        };
        match got {
            None => assert!(*acked < 0 || !must_have, "k{i}: acked {acked} lost"),
            Some((version, value)) => {
                let value: i64 = value.parse().expect("counter value");
                assert_eq!(version as i64, value, "k{i}: version/value mismatch");
                assert!(
                    value <= *acked + 1,
                    "k{i}: {value} was never sent (acked {acked})"
                );
                if must_have {
                    assert!(value >= *acked, "k{i}: acked {acked} but found {value}");
                }
                *acked = value;
            }
        }
    }
}

#[test]
fn kill9_loses_nothing_acknowledged_with_fsync_always() {
    let dir = temp_dir("crash-always");
    let env = [("NUN_FSYNC", "always")];
    let acks: Acks = Arc::new(Mutex::new(vec![(-1, Instant::now()); CLIENTS]));
    let mut rng = rand::thread_rng();
    {
        let s = Server::start_in(dir.clone(), &env);
        setup_db(&s);
    }
    for cycle in 0..20 {
        let mut s = Server::start_in(dir.clone(), &env);
        check_counters(&s, &acks, None);
        check_security(&s);
        let stop = Arc::new(AtomicBool::new(false));
        let writers = run_writers(&s, &acks, &stop);
        std::thread::sleep(Duration::from_millis(rng.gen_range(20..250)));
        s.kill9();
        stop.store(true, Ordering::Relaxed);
        for w in writers {
            w.join().unwrap();
        }
        if cycle == 10 {
            // Mid-way, force a snapshot so recovery covers snapshot + log tail too.
            let s = Server::start_in(dir.clone(), &env);
            let mut a = s.admin();
            assert_eq!(a.call("snapshot").unwrap().error, None);
        }
    }
    let s = Server::start_in(dir.clone(), &env);
    check_counters(&s, &acks, None);
    let total: i64 = acks.lock().unwrap().iter().map(|(a, _)| a + 1).sum();
    assert!(total > 100, "too few writes to mean anything: {total}");
    drop(s);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn kill9_with_everysec_keeps_writes_older_than_a_second() {
    let dir = temp_dir("crash-everysec");
    let env = [("NUN_FSYNC", "everysec")];
    let acks: Acks = Arc::new(Mutex::new(vec![(-1, Instant::now()); CLIENTS]));
    {
        let s = Server::start_in(dir.clone(), &env);
        setup_db(&s);
    }
    let mut last_kill = None;
    let mut rng = rand::thread_rng();
    for _ in 0..20 {
        let mut s = Server::start_in(dir.clone(), &env);
        check_counters(&s, &acks, last_kill);
        check_security(&s);
        let stop = Arc::new(AtomicBool::new(false));
        let writers = run_writers(&s, &acks, &stop);
        std::thread::sleep(Duration::from_millis(rng.gen_range(1_600..2_400)));
        let kill_at = Instant::now();
        s.kill9();
        stop.store(true, Ordering::Relaxed);
        for w in writers {
            w.join().unwrap();
        }
        last_kill = Some(kill_at - Duration::from_millis(1_500));
    }
    let s = Server::start_in(dir.clone(), &env);
    check_counters(&s, &acks, last_kill);
    drop(s);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn sigterm_flushes_and_exits_cleanly() {
    let dir = temp_dir("sigterm");
    let env = [("NUN_FSYNC", "no")];
    {
        let mut s = Server::start_in(dir.clone(), &env);
        setup_db(&s);
        let mut c = s.tcp_client("d", "t");
        c.set("a", "b c").unwrap();
        assert_eq!(s.terminate(), Some(0));
    }
    let s = Server::start_in(dir.clone(), &env);
    let mut c = s.tcp_client("d", "t");
    assert_eq!(c.get_safe("a").unwrap(), Some((0, "b c".to_string())));
    drop(s);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn snapshot_truncates_the_log_and_restart_reads_both() {
    let s = Server::start_with(&[("NUN_MAX_OP_LOG_SIZE", "20000")]);
    setup_db(&s);
    let mut c = s.tcp_client("d", "t");
    for i in 0..2000 {
        c.set(&format!("key{}", i % 300), &format!("value {i}"))
            .unwrap();
    }
    c.remove("key7").unwrap();
    let mut a = s.admin();
    // The size trigger keeps the log bounded without any explicit snapshot.
    assert!(common::eventually(Duration::from_secs(20), || {
        let m = a.call("metrics-state").unwrap().messages[0].clone();
        let size: u64 = m
            .split("op_log_file_size: ")
            .nth(1)
            .and_then(|r| r.split(',').next())
            .and_then(|n| n.parse().ok())
            .unwrap();
        size < 20_000
    }));
    c.set("tail", "after snapshot").unwrap();
    let dir = s.dir.clone();
    let mut s = s;
    s.kill9();
    let s2 = Server::start_in(dir, &[]);
    let mut c = s2.tcp_client("d", "t");
    assert_eq!(c.get("tail").unwrap().as_deref(), Some("after snapshot"));
    assert_eq!(
        c.get_safe("key5").unwrap(),
        Some((6, "value 1805".to_string()))
    );
    assert_eq!(c.get("key7").unwrap(), None);
    // The removed key keeps counting versions after the restart.
    c.set("key7", "again").unwrap();
    assert_eq!(c.get_safe("key7").unwrap(), Some((8, "again".to_string())));
}

fn oplog_segments(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir.join("oplog"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    v.sort();
    v
}

#[test]
fn torn_log_tail_is_cut_with_a_warning() {
    let dir = temp_dir("torn");
    {
        let s = Server::start_in(dir.clone(), &[]);
        setup_db(&s);
        let mut c = s.tcp_client("d", "t");
        c.set("a", "1").unwrap();
        c.set("b", "2").unwrap();
    }
    let seg = oplog_segments(&dir).pop().unwrap();
    let bytes = std::fs::read(&seg).unwrap();
    // The killed server may have left space reserved after its records (zeros): tear the last
    // record itself (its value ends in a non-zero byte) where it lies, zeros after it.
    let mut bytes = bytes;
    let end = bytes.iter().rposition(|&b| b != 0).unwrap() + 1;
    assert!(bytes[..end].ends_with(b"2"), "the last record is b's");
    bytes[end - 5..end].fill(0);
    std::fs::write(&seg, &bytes).unwrap();
    let s = Server::start_in(dir.clone(), &[]);
    let mut c = s.tcp_client("d", "t");
    assert_eq!(c.get("a").unwrap().as_deref(), Some("1"));
    assert_eq!(c.get("b").unwrap(), None);
    c.set("b", "3").unwrap();
    drop(c);
    drop(s);
    let s = Server::start_in(dir.clone(), &[]);
    let mut c = s.tcp_client("d", "t");
    assert_eq!(c.get("b").unwrap().as_deref(), Some("3"));
    drop(s);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn corrupted_log_record_refuses_to_start_naming_the_file() {
    let dir = temp_dir("corrupt-log");
    {
        let s = Server::start_in(dir.clone(), &[]);
        setup_db(&s);
        let mut c = s.tcp_client("d", "t");
        c.set("a", "some value").unwrap();
        c.set("b", "2").unwrap();
    }
    let seg = oplog_segments(&dir).pop().unwrap();
    let mut bytes = std::fs::read(&seg).unwrap();
    bytes[20] ^= 0x55;
    std::fs::write(&seg, &bytes).unwrap();
    let (code, out) = start_failing(&dir);
    assert_ne!(code, Some(0));
    assert!(out.contains("corrupted operation log"), "{out}");
    assert!(
        out.contains(seg.file_name().unwrap().to_str().unwrap()),
        "{out}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_second_server_on_the_same_data_dir_is_refused() {
    let dir = temp_dir("locked");
    let s = Server::start_in(dir.clone(), &[]);
    setup_db(&s);
    s.tcp_client("d", "t").set("a", "1").unwrap();
    let (code, out) = start_failing(&dir);
    assert_ne!(code, Some(0));
    assert!(out.contains("is in use by another nun-db process"), "{out}");
    // The running server was not disturbed, and its lock goes with it (even by kill -9).
    assert_eq!(
        s.tcp_client("d", "t").get("a").unwrap().as_deref(),
        Some("1")
    );
    drop(s);
    let s = Server::start_in(dir.clone(), &[]);
    assert_eq!(
        s.tcp_client("d", "t").get("a").unwrap().as_deref(),
        Some("1")
    );
    drop(s);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn corrupted_snapshot_refuses_to_start_naming_the_file() {
    let dir = temp_dir("corrupt-snap");
    {
        let s = Server::start_in(dir.clone(), &[]);
        setup_db(&s);
        let mut c = s.tcp_client("d", "t");
        c.set("a", "some value").unwrap();
        assert_eq!(s.admin().call("snapshot").unwrap().error, None);
    }
    let values = dir.join("d-nun.data.values");
    let mut bytes = std::fs::read(&values).unwrap();
    let last = bytes.len() - 6;
    bytes[last] ^= 1;
    std::fs::write(&values, &bytes).unwrap();
    let (code, out) = start_failing(&dir);
    assert_ne!(code, Some(0));
    assert!(out.contains("corrupted snapshot file"), "{out}");
    assert!(out.contains("d-nun.data.values"), "{out}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Writes a NunDB database in its exact on-disk layout.
fn write_nundb_files(
    dir: &std::path::Path,
    db: &str,
    strategy: i32,
    entries: &[(&str, i32, &str)],
) {
    let records: Vec<(&str, &str, i32)> = entries
        .iter()
        .map(|(key, version, value)| (*key, *value, *version))
        .collect();
    let (keys, values) = common::nundb_keys_values(&records);
    std::fs::write(dir.join(format!("{db}-nun.data.keys")), keys).unwrap();
    std::fs::write(dir.join(format!("{db}-nun.data.values")), values).unwrap();
    let mut meta = 42u64.to_le_bytes().to_vec();
    meta.extend_from_slice(&strategy.to_le_bytes());
    std::fs::write(dir.join(format!("{db}-nun.madadata")), meta).unwrap();
}

#[test]
fn nundb_data_dir_is_imported() {
    let dir = temp_dir("import");
    write_nundb_files(
        &dir,
        "legacy",
        1,
        &[
            ("$$token", 0, "legacy-token"),
            ("name", 3, "mateus freira"),
            ("gone", -1, "old"),
            ("json", 0, "{\"a\":1}"),
        ],
    );
    write_nundb_files(&dir, "other", 0, &[("$$token", 0, "o-t"), ("x", 0, "1")]);
    {
        let s = Server::start_in(dir.clone(), &[]);
        let mut c = RawTcp::connect(&s.tcp);
        assert_eq!(c.cmd("use-db legacy legacy-token"), vec!["ok \n"]);
        assert_eq!(
            c.cmd("get-safe name"),
            vec!["value-version 3 mateus freira\n", "ok \n"]
        );
        assert_eq!(c.cmd("get gone"), vec!["value <Empty>\n", "ok \n"]);
        assert_eq!(
            c.cmd("keys"),
            vec!["keys ,$connections,json,name\n", "ok \n"]
        );
        // Strategy `newer` (1) came along: a stale set-safe wins.
        assert_eq!(c.cmd("set-safe name 0 newer wins"), vec!["ok \n"]);
        assert_eq!(c.cmd("use-db other o-t"), vec!["ok \n"]);
        assert_eq!(c.cmd("set x 2"), vec!["ok \n"]);
        assert_eq!(
            c.cmd("set-safe x 0 stale"),
            vec!["error Invalid version! \n"]
        );
        let mut a = s.admin();
        a.use_db("legacy", "legacy-token").unwrap();
        let token = a.get("$$token").unwrap().unwrap();
        assert!(
            token.starts_with("sha256$"),
            "token re-hashed on import: {token}"
        );
    }
    // The import was re-written in our checksummed format and survives restarts.
    assert!(dir.join("legacy-nun.snapshot").exists());
    let s = Server::start_in(dir.clone(), &[]);
    let mut c = s.tcp_client("legacy", "legacy-token");
    assert_eq!(
        c.get_safe("name").unwrap(),
        Some((4, "newer wins".to_string()))
    );
    drop(s);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `stored_entries` and `rss_kb` from `debug process-info`.
fn process_info(s: &Server) -> (u64, u64) {
    let line = s.admin().call("debug process-info").unwrap().messages[0].clone();
    let field = |name: &str| -> u64 {
        line.split(", ")
            .find_map(|f| f.strip_prefix(name)?.strip_prefix(": ")?.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {line:?}"))
    };
    (field("stored_entries"), field("rss_kb"))
}

/// Bytes of database `db`'s snapshot files in `dir`, after a forced snapshot.
fn snapshot_bytes(s: &Server, db: &str) -> u64 {
    s.admin()
        .call(&format!("snapshot {db}"))
        .unwrap()
        .into_result()
        .unwrap();
    std::fs::read_dir(&s.dir)
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with(db))
        .map(|e| e.metadata().map(|m| m.len()).unwrap_or(0))
        .sum()
}

#[test]
fn removed_keys_leave_no_entry_and_versions_stay_monotonic() {
    let s = Server::start_with(&[("NUN_TOMBSTONE_RETENTION", "1")]);
    s.create_db("rm", "t", None);
    let mut raw = RawTcp::connect(&s.tcp);
    assert_eq!(raw.cmd("use-db rm t"), vec!["ok \n"]);
    assert_eq!(raw.cmd("set base 1"), vec!["ok \n"]);
    let (idle_entries, idle_rss) = process_info(&s);
    let idle_bytes = snapshot_bytes(&s, "rm");
    let mut rss = Vec::new();
    for round in 0..4 {
        for batch in 0..20 {
            let lines: String = (0..500)
                .map(|i| {
                    let key = format!("r{round}-{batch}-{i}");
                    format!("set {key} {}\nremove {key}\n", "v".repeat(100))
                })
                .collect();
            raw.send(lines.as_bytes());
            for _ in 0..1000 {
                assert_eq!(raw.until_envelope(), vec!["ok \n"]);
            }
        }
        // Once the retention has passed: `$connections`, `base` and at most one version floor
        // per bucket (64).
        let mut entries = 0;
        assert!(
            common::eventually(Duration::from_secs(30), || {
                entries = process_info(&s).0;
                entries <= idle_entries + 64
            }),
            "round {round}: {entries} entries, idle {idle_entries}"
        );
        rss.push(process_info(&s).1);
        let bytes = snapshot_bytes(&s, "rm");
        assert!(
            bytes <= idle_bytes + 64 * 64,
            "round {round}: snapshot {bytes} bytes, idle {idle_bytes}"
        );
    }
    eprintln!("rss_kb idle {idle_rss}, after each round of 10000 set+remove: {rss:?}");
    assert!(
        rss[3] <= rss[1] + 2048,
        "resident memory grew from {} KiB to {} KiB",
        rss[1],
        rss[3]
    );
    // A watcher of a removed key sees it come back at a higher version, across a restart too.
    let mut c = s.tcp_client("rm", "t");
    c.set("w", "1").unwrap();
    let first = c.get_safe("w").unwrap().unwrap().0;
    c.remove("w").unwrap();
    let dir = s.dir.clone();
    let mut s = s;
    s.terminate();
    let s2 = Server::start_in(dir.clone(), &[]);
    let mut c = s2.tcp_client("rm", "t");
    assert_eq!(c.get("w").unwrap(), None);
    c.set("w", "2").unwrap();
    let again = c.get_safe("w").unwrap().unwrap().0;
    assert!(
        again > first + 1,
        "removed at {}, back at {again}",
        first + 1
    );
    // A stale set-safe from before the removal is a conflict, not a silent overwrite.
    let stale = c.call(&format!("set-safe w {first} stale")).unwrap().error;
    assert_eq!(stale.as_deref(), Some("Invalid version!"));
    drop(s2);
    let _ = std::fs::remove_dir_all(dir);
}
