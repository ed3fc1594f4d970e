//! Snapshots in S3 against a real S3 API on loopback (moto's server): a round trip to an empty
//! data dir, NunDB's two bucket layouts, the bucket going away while the node serves, a corrupt
//! object at start-up, and wrong credentials.

mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use common::moto::{http, Moto};
use common::proxy::Net;
use common::{eventually, free_port, nundb_keys_values, server_command, temp_dir, RawTcp, Server};

const BUCKET: &str = "nun-db";

/// Settings that put snapshots in `url`'s bucket under `prefix`.
fn s3_env<'a>(url: &'a str, prefix: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("NUN_STORAGE_STRATEGY", "s3"),
        ("NUN_S3_API_URL", url),
        ("NUN_S3_PREFIX", prefix),
        ("NUN_S3_KEY_ID", "test-key"),
        ("NUN_S3_SECRET_KEY", "test-secret"),
        ("NUN_S3_RETRY", "1"),
        ("NUN_LOG_LEVEL", "info"),
    ]
}

/// Starts a node on a fresh data dir with `env`, logging to `<dir>/node.log`.
fn start(env: &[(&str, &str)]) -> (Server, std::path::PathBuf) {
    let dir = temp_dir("s3");
    let log = dir.join("node.log");
    let server = Server::spawn_logged(server_command(&dir, env), dir.clone(), log.clone());
    (server, log)
}

/// A node that must refuse to start: (exit code, everything it printed).
fn start_failing(env: &[(&str, &str)]) -> (Option<i32>, String) {
    let dir = temp_dir("s3-fail");
    let mut cmd = server_command(&dir, env);
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let out = cmd
        .spawn()
        .expect("spawn")
        .wait_with_output()
        .expect("wait");
    let _ = std::fs::remove_dir_all(&dir);
    (
        out.status.code(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn admin(server: &Server) -> RawTcp {
    let mut c = RawTcp::connect(&server.tcp);
    assert_eq!(
        c.cmd(&format!("auth {} {}", common::ADMIN, common::ADMIN_PWD)),
        vec!["valid auth\n", "ok \n"]
    );
    c
}

fn cleanup(server: Server) {
    let dir = server.dir.clone();
    drop(server);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn snapshots_go_to_the_bucket_and_an_empty_data_dir_restores_everything() {
    let moto = Moto::start(&[]);
    moto.create_bucket(BUCKET);
    let env = s3_env(&moto.url, "round");
    let (mut first, _) = start(&env);
    let mut a = admin(&first);
    a.cmd("create-db shop shop-token newer");
    a.cmd("create-db notes notes-token arbiter");
    a.cmd("use-db shop shop-token");
    a.cmd("set greeting hello; world, with spaces");
    a.cmd("set counter 1");
    a.cmd("set counter 2");
    a.cmd("set gone soon");
    a.cmd("remove gone");
    a.cmd("create-user alice alice-token");
    a.cmd("set-permissions alice r *");
    assert_eq!(a.cmd("snapshot"), vec!["ok \n"]);
    let keys = moto.keys(BUCKET);
    assert!(
        keys.contains(&"round/shop/nun.manifest".to_string()),
        "{keys:?}"
    );
    assert!(
        keys.contains(&"round/notes/nun.manifest".to_string()),
        "{keys:?}"
    );
    // A change after the snapshot is uploaded by the graceful stop.
    a.cmd("set late after the snapshot");
    drop(a);
    assert_eq!(first.terminate(), Some(0));
    cleanup(first);

    let (second, log) = start(&env);
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(text.contains("restored 2 databases"), "{text}");
    let mut b = admin(&second);
    b.cmd("use-db shop shop-token");
    assert_eq!(
        b.cmd("get-safe greeting"),
        vec!["value-version 0 hello; world, with spaces\n", "ok \n"]
    );
    assert_eq!(
        b.cmd("get-safe counter"),
        vec!["value-version 1 2\n", "ok \n"]
    );
    assert_eq!(
        b.cmd("get late"),
        vec!["value after the snapshot\n", "ok \n"]
    );
    // The tombstone kept its version: the key comes back above it.
    assert_eq!(b.cmd("get gone"), vec!["value <Empty>\n", "ok \n"]);
    b.cmd("set gone again");
    assert_eq!(
        b.cmd("get-safe gone"),
        vec!["value-version 2 again\n", "ok \n"]
    );
    // `newer`: a stale set-safe wins.
    assert_eq!(b.cmd("set-safe counter 0 stale"), vec!["ok \n"]);
    // Users and permissions came back.
    let mut alice = RawTcp::connect(&second.tcp);
    assert_eq!(alice.cmd("use-db shop alice alice-token"), vec!["ok \n"]);
    assert_eq!(
        alice.cmd("get greeting"),
        vec!["value hello; world, with spaces\n", "ok \n"]
    );
    assert_eq!(
        alice.cmd("set greeting x"),
        vec!["permission denied\n", "error permission denied \n"]
    );
    // `arbiter` came back too: a stale write with no arbiter is refused as such.
    b.cmd("use-db notes notes-token");
    b.cmd("set n 1");
    b.cmd("set n 2");
    assert_eq!(
        b.cmd("set-safe n 0 x"),
        vec!["error An conflitct happend and there is no arbiter client not connected \n"]
    );
    cleanup(second);
}

/// NunDB's `s3_patition` layout: u64 key_len, key, u64 value_len, value, i32 status, i32 version.
fn nundb_partition(records: &[(&str, &str, i32)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (key, value, version) in records {
        out.extend_from_slice(&(key.len() as u64).to_le_bytes());
        out.extend_from_slice(key.as_bytes());
        out.extend_from_slice(&(value.len() as u64).to_le_bytes());
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(&0i32.to_le_bytes());
        out.extend_from_slice(&version.to_le_bytes());
    }
    out
}

#[test]
fn nundb_buckets_are_read_in_both_layouts() {
    let moto = Moto::start(&[]);
    moto.create_bucket(BUCKET);
    // NunDB stores tokens and passwords as they are; later records override earlier ones.
    let (keys, values) = nundb_keys_values(&[
        ("$$token", "legacy-token", 0),
        ("$$user_bob", "bob-token", 0),
        ("$$permission_$bob", "r *", 0),
        ("a", "old", 2),
        ("a", "first value", 3),
        ("deleted", "x", 0),
        ("deleted", "", -1),
    ]);
    moto.put(BUCKET, "nun-db-base/legacy/nun.keys", &keys);
    moto.put(BUCKET, "nun-db-base/legacy/nun.values", &values);
    moto.put(
        BUCKET,
        "nun-db-base/parts/0.nun",
        &nundb_partition(&[("$$token", "parts-token", 0), ("p", "in zero", 4)]),
    );
    moto.put(
        BUCKET,
        "nun-db-base/parts/1.nun",
        &nundb_partition(&[("q", "in one", 1), ("p", "newer in one", 5)]),
    );
    // The data dir's NunDB metadata says `legacy` uses the `newer` strategy (code 1).
    let dir = temp_dir("s3-nundb");
    let mut meta = 7u64.to_le_bytes().to_vec();
    meta.extend_from_slice(&1i32.to_le_bytes());
    std::fs::write(dir.join("legacy-nun.madadata"), meta).unwrap();
    let mut env = s3_env(&moto.url, "nun-db-base");
    env.push(("NUN_STORAGE_READ_STRATEGY", "s3_patition"));
    let log = dir.join("node.log");
    let server = Server::spawn_logged(server_command(&dir, &env), dir.clone(), log);
    let mut t = RawTcp::connect(&server.tcp);
    assert_eq!(t.cmd("use-db legacy legacy-token"), vec!["ok \n"]);
    assert_eq!(
        t.cmd("get-safe a"),
        vec!["value-version 3 first value\n", "ok \n"]
    );
    assert_eq!(t.cmd("get deleted"), vec!["value <Empty>\n", "ok \n"]);
    assert_eq!(t.cmd("set-safe a 0 newer wins"), vec!["ok \n"]);
    let mut bob = RawTcp::connect(&server.tcp);
    assert_eq!(bob.cmd("use-db legacy bob bob-token"), vec!["ok \n"]);
    assert_eq!(bob.cmd("get a"), vec!["value newer wins\n", "ok \n"]);
    assert_eq!(
        bob.cmd("set a y"),
        vec!["permission denied\n", "error permission denied \n"]
    );
    let mut p = RawTcp::connect(&server.tcp);
    assert_eq!(p.cmd("use-db parts parts-token"), vec!["ok \n"]);
    assert_eq!(
        p.cmd("get-safe p"),
        vec!["value-version 5 newer in one\n", "ok \n"]
    );
    assert_eq!(p.cmd("get q"), vec!["value in one\n", "ok \n"]);
    // Imported databases are written back in our layout; NunDB's objects are left alone.
    let keys = moto.keys(BUCKET);
    for k in [
        "nun-db-base/legacy/nun.manifest",
        "nun-db-base/parts/nun.manifest",
        "nun-db-base/legacy/nun.keys",
        "nun-db-base/parts/0.nun",
    ] {
        assert!(keys.contains(&k.to_string()), "{k} missing from {keys:?}");
    }
    // Tokens were stored hashed in our snapshot.
    let manifest =
        String::from_utf8(moto.get(BUCKET, "nun-db-base/legacy/nun.manifest").unwrap()).unwrap();
    let keys_object = manifest
        .lines()
        .find_map(|l| l.strip_prefix("object ").filter(|o| o.contains("nun.keys")))
        .and_then(|o| o.split(' ').next())
        .unwrap()
        .to_string();
    let values_object = keys_object.replace("nun.keys", "nun.values");
    let stored = moto.get(BUCKET, &values_object).unwrap();
    assert!(!String::from_utf8_lossy(&stored).contains("legacy-token"));
    cleanup(server);
}

/// Lines of `name` in the node's log.
fn count_lines(log: &Path, needle: &str) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(needle))
        .count()
}

#[test]
fn the_node_keeps_serving_and_its_log_while_the_bucket_is_away() {
    let moto = Moto::start(&[]);
    moto.create_bucket(BUCKET);
    // The node reaches the bucket through a proxy that can cut it off.
    let net = Net::new();
    let proxy = format!("127.0.0.1:{}", free_port());
    net.proxy(&proxy, "bucket", &moto.addr);
    let url = format!("http://{proxy}");
    let mut env = s3_env(&url, "away");
    env.push(("NUN_SNAPSHOT_INTERVAL", "1"));
    let (mut server, log) = start(&env);
    let mut a = admin(&server);
    a.cmd("create-db d t");
    a.cmd("use-db d t");
    a.cmd("set before 1");
    assert_eq!(a.cmd("snapshot"), vec!["ok \n"]);

    net.isolate("bucket");
    assert_eq!(a.cmd("set during 2"), vec!["ok \n"]);
    let refused = a.cmd("snapshot");
    assert!(
        refused.len() == 1
            && refused[0].starts_with("error Snapshot failed: PUT s3://nun-db/away/d/"),
        "{refused:?}"
    );
    assert!(eventually(Duration::from_secs(30), || count_lines(
        &log,
        "the log is kept"
    ) >= 1));
    let (_, _, metrics) = metrics(&server);
    assert!(
        !metrics.contains("nundb_s3_snapshot_failures_total 0\n"),
        "{metrics}"
    );

    // A crash now: the local log still holds what the bucket does not.
    server.kill9();
    net.heal();
    let data = server.dir.clone();
    let restarted = Server::spawn_logged(server_command(&data, &env), data.clone(), log.clone());
    let mut b = admin(&restarted);
    b.cmd("use-db d t");
    assert_eq!(b.cmd("get before"), vec!["value 1\n", "ok \n"]);
    assert_eq!(b.cmd("get during"), vec!["value 2\n", "ok \n"]);
    // With the bucket back, the periodic snapshot catches up: the manifest moves past it.
    assert_eq!(b.cmd("set after 3"), vec!["ok \n"]);
    assert!(eventually(Duration::from_secs(30), || {
        moto.get(BUCKET, "away/d/nun.manifest")
            .map(|m| String::from_utf8_lossy(&m).lines().any(|l| l == "keys 4"))
            .unwrap_or(false)
    }));
    cleanup(restarted);
}

/// (status, content type, body) of GET /metrics.
fn metrics(server: &Server) -> (u16, String, String) {
    let (status, body) = http(&server.http, "GET", "/metrics", b"");
    (
        status,
        String::new(),
        String::from_utf8_lossy(&body).to_string(),
    )
}

#[test]
fn a_corrupt_object_stops_the_node_and_names_it() {
    let moto = Moto::start(&[]);
    moto.create_bucket(BUCKET);
    let env = s3_env(&moto.url, "corrupt");
    let (server, _) = start(&env);
    let mut a = admin(&server);
    a.cmd("create-db d t");
    a.cmd("use-db d t");
    a.cmd("set k v");
    assert_eq!(a.cmd("snapshot"), vec!["ok \n"]);
    drop(a);
    cleanup(server);
    let values = moto
        .keys(BUCKET)
        .into_iter()
        .find(|k| k.ends_with("nun.values"))
        .expect("a values object");
    let mut bytes = moto.get(BUCKET, &values).unwrap();
    bytes.truncate(bytes.len() - 3);
    moto.put(BUCKET, &values, &bytes);
    let (code, out) = start_failing(&env);
    assert_ne!(code, Some(0), "{out}");
    assert!(out.contains(&values), "the error names the object: {out}");
    assert!(!out.contains("\nready "), "{out}");
}

#[test]
fn wrong_credentials_stop_the_node_at_start() {
    // moto checks credentials when told to; ours are unknown to it.
    let moto = Moto::start(&[("INITIAL_NO_AUTH_ACTION_COUNT", "0")]);
    let env = s3_env(&moto.url, "creds");
    let (code, out) = start_failing(&env);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("the S3 bucket cannot be used"), "{out}");
    assert!(out.contains("HTTP 403"), "{out}");
}

/// Once a snapshot is in the bucket, the log drops the segments it covers. A restart that
/// reads snapshots from the data directory instead (which has none) would come back without
/// those changes, so it is refused with the place to read from; reading the bucket works.
#[test]
fn a_start_that_reads_older_snapshots_than_the_log_needs_is_refused() {
    let moto = Moto::start(&[]);
    moto.create_bucket(BUCKET);
    let env = s3_env(&moto.url, "gap");
    let (mut first, _) = start(&env);
    let dir = first.dir.clone();
    let mut a = admin(&first);
    a.cmd("create-db shop shop-token");
    a.cmd("use-db shop shop-token");
    assert_eq!(a.cmd("set k before the snapshot"), vec!["ok \n"]);
    assert_eq!(a.cmd("snapshot"), vec!["ok \n"]);
    assert_eq!(a.cmd("set k after it"), vec!["ok \n"]);
    drop(a);
    first.kill9();

    let (code, out) = common::start_failing(&dir);
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("the changes before it are in the snapshots at s3://nun-db/gap")
            && out.contains("reads snapshots from disk"),
        "{out}"
    );

    let second = Server::spawn_logged(
        server_command(&dir, &env),
        dir.clone(),
        dir.join("again.log"),
    );
    let mut b = admin(&second);
    b.cmd("use-db shop shop-token");
    assert_eq!(b.cmd("get k"), vec!["value after it\n", "ok \n"]);
    drop(b);
    drop(first);
    cleanup(second);
}
