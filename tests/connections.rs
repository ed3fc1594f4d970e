//! Many sessions on one node: every push reaches every watcher in order, idle sessions cost at
//! most 20 KiB of the server's resident memory each (threads included), that memory comes back
//! when they leave, and past `--max-connections` a client gets one clear refusal while the
//! sessions already open go on.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::{eventually, RawTcp, RawWs, Server};

/// Sessions opened by the scale tests (CI-sized, nearer the 10,000 `make bench` opens: what
/// stays after they leave is judged against what they took, and fixed costs weigh less).
const SESSIONS: usize = 4000;
/// Resident memory an idle session may cost the server.
const MAX_KIB_PER_SESSION: f64 = 20.0;
/// Writes whose pushes every session must get.
const WRITES: usize = 20;

/// The server's resident memory (KiB) and thread count.
fn status(pid: u32) -> (u64, u64) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let field = |name: &str| -> u64 {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .expect("status field")
    };
    (field("VmRSS:"), field("Threads:"))
}

/// One watcher of key `k`: reads the versions pushed to it.
trait Watcher {
    fn next_version(&mut self) -> i32;
}

struct TcpWatcher(BufReader<TcpStream>);

impl Watcher for TcpWatcher {
    fn next_version(&mut self) -> i32 {
        loop {
            let mut line = String::new();
            let n = self.0.read_line(&mut line).expect("read push");
            assert!(n > 0, "server closed a watcher");
            if let Some(rest) = line.strip_prefix("changed-version k ") {
                return rest.split(' ').next().unwrap().parse().unwrap();
            }
        }
    }
}

impl Watcher for RawWs {
    fn next_version(&mut self) -> i32 {
        loop {
            let f = self.frame();
            if let Some(rest) = f.strip_prefix("changed-version k ") {
                return rest.split(' ').next().unwrap().parse().unwrap();
            }
        }
    }
}

fn tcp_watcher(server: &Server) -> Box<dyn Watcher> {
    let mut s = TcpStream::connect(&server.tcp).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    s.write_all(b"use-db d t\nwatch k\n").unwrap();
    let mut r = BufReader::new(s);
    let mut oks = 0;
    while oks < 2 {
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        assert!(!line.starts_with("error"), "{line}");
        if line == "ok \n" {
            oks += 1;
        }
    }
    Box::new(TcpWatcher(r))
}

fn ws_watcher(server: &Server) -> Box<dyn Watcher> {
    let mut ws = RawWs::connect(&server.ws);
    ws.send("use-db d t;watch k");
    let frames = ws.envelopes(2);
    assert_eq!(frames, vec!["ok \n", "ok \n"]);
    Box::new(ws)
}

/// Opens [`SESSIONS`] watchers, checks pushes, memory per idle session, and memory after.
fn scale(open: fn(&Server) -> Box<dyn Watcher>) {
    let _ = nundb::os::raise_fd_limit();
    let server = Server::start_with(&[("NUN_LOG_LEVEL", "error")]);
    server.create_db("d", "t", None);
    let mut writer = RawTcp::connect(&server.tcp);
    writer.cmd("use-db d t");
    // Warm up: a few sessions come and go, so one-time allocations are in the baseline.
    for _ in 0..50 {
        drop(open(&server));
    }
    let pid = server.pid();
    let mut base = status(pid).0;
    // Settled: the warm-up threads are gone and the heap trimmed (the figure holds still).
    assert!(
        eventually(Duration::from_secs(30), || {
            let before = status(pid);
            std::thread::sleep(Duration::from_millis(700));
            base = status(pid).0;
            before.1 <= 40 && before.0 == base
        }),
        "warm-up sessions never left"
    );
    let mut watchers: Vec<Box<dyn Watcher>> = (0..SESSIONS).map(|_| open(&server)).collect();
    for i in 0..WRITES {
        assert_eq!(writer.cmd(&format!("set k v{i}")), vec!["ok \n"]);
    }
    for (n, w) in watchers.iter_mut().enumerate() {
        for i in 0..WRITES {
            assert_eq!(w.next_version(), i as i32, "watcher {n}, push {i}");
        }
    }
    // Idle sessions give memory back after a moment: poll for the figure, then judge it.
    let per_session = |rss: u64| rss.saturating_sub(base) as f64 / SESSIONS as f64;
    let mut connected = (0, 0);
    eventually(Duration::from_secs(30), || {
        connected = status(pid);
        per_session(connected.0) <= MAX_KIB_PER_SESSION
    });
    let per = per_session(connected.0);
    println!(
        "{SESSIONS} idle sessions: base {base} KiB, connected {} KiB, {per:.1} KiB each, {} threads",
        connected.0, connected.1
    );
    assert!(
        per <= MAX_KIB_PER_SESSION,
        "{per:.1} KiB per idle session (bar {MAX_KIB_PER_SESSION})"
    );
    assert!(connected.1 as usize >= SESSIONS, "one thread per session");
    drop(watchers);
    let taken = connected.0.saturating_sub(base);
    let mut after = 0;
    eventually(Duration::from_secs(30), || {
        after = status(pid).0;
        after.saturating_sub(base) * 5 <= taken
    });
    println!("after they left: {after} KiB ({taken} KiB were taken)");
    assert!(
        after.saturating_sub(base) * 5 <= taken,
        "kept {} of {taken} KiB after the sessions left (at most 20%)",
        after.saturating_sub(base)
    );
    // The node still serves.
    assert_eq!(
        writer.cmd("get k"),
        vec![format!("value v{}\n", WRITES - 1), "ok \n".into()]
    );
}

#[test]
#[cfg_attr(
    debug_assertions,
    ignore = "memory figures are the release build's: make test runs this with --release"
)]
fn thousands_of_websocket_watchers_get_every_push_cheaply() {
    scale(ws_watcher);
}

#[test]
#[cfg_attr(
    debug_assertions,
    ignore = "memory figures are the release build's: make test runs this with --release"
)]
fn thousands_of_tcp_watchers_get_every_push_cheaply() {
    scale(tcp_watcher);
}

/// A TCP session, once the server admits it (sessions that just left may still count).
fn admitted(server: &Server) -> RawTcp {
    let mut admitted = None;
    assert!(eventually(Duration::from_secs(30), || {
        let mut c = RawTcp::connect(&server.tcp);
        c.send(b"ping\n");
        let ok = c.line() == "pong\n" && c.line() == "ok \n";
        if ok {
            admitted = Some(c);
        }
        ok
    }));
    admitted.expect("admitted")
}

#[test]
fn past_the_ceiling_a_client_gets_one_clear_refusal_and_open_sessions_go_on() {
    let server = Server::start_with(&[("NUN_MAX_CONNECTIONS", "2")]);
    server.create_db("d", "t", None);
    let mut watcher = admitted(&server);
    watcher.cmd("use-db d t");
    watcher.cmd("watch k");
    // The second session, once the one that created the database no longer counts.
    let mut writer = None;
    assert!(eventually(Duration::from_secs(30), || {
        let mut w = RawWs::connect(&server.ws);
        let ok = w.cmd("use-db d t") == vec!["ok \n"];
        if ok {
            writer = Some(w);
        }
        ok
    }));
    let mut writer = writer.expect("admitted");

    // A third TCP client: exactly one line, then the end of the stream.
    let mut refused = RawTcp::connect(&server.tcp);
    assert_eq!(refused.read_to_end(), "error too many connections \n");

    // A third WebSocket client: the handshake completes, then the line and a close frame
    // saying why (1013: try again later).
    let mut ws = RawWs::connect(&server.ws);
    assert_eq!(ws.frame(), "error too many connections \n");
    match ws.ws.read() {
        Ok(tungstenite::Message::Close(Some(frame))) => {
            assert_eq!(u16::from(frame.code), 1013);
            assert_eq!(frame.reason, "too many connections");
        }
        other => panic!("expected a close frame, got {other:?}"),
    }

    // The sessions already open are untouched.
    assert_eq!(writer.cmd("set k 1"), vec!["ok \n"]);
    assert_eq!(watcher.line(), "changed k 1\n");
    assert_eq!(watcher.line(), "changed-version k 0 1\n");

    // Once one leaves, a new client is admitted.
    drop(writer);
    let mut next = admitted(&server);
    assert_eq!(next.cmd("ping"), vec!["pong\n", "ok \n"]);
}

/// Reads one complete reply (`pong` then `ok`) to a `ping`.
fn pong(s: &mut TcpStream) -> std::io::Result<()> {
    let mut got = Vec::new();
    let mut byte = [0u8; 1];
    while !got.ends_with(b"ok \n") {
        if std::io::Read::read(s, &mut byte)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        got.push(byte[0]);
    }
    assert_eq!(got, b"pong\nok \n");
    Ok(())
}

#[test]
fn a_burst_of_simultaneous_connects_is_served() {
    let _ = nundb::os::raise_fd_limit();
    let server = Server::start();
    let connectors: Vec<_> = (0..8)
        .map(|_| {
            let addr = server.tcp.clone();
            std::thread::spawn(move || {
                (0..250)
                    .map(|_| TcpStream::connect(&addr).expect("connect"))
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut clients: Vec<TcpStream> = connectors
        .into_iter()
        .flat_map(|h| h.join().expect("connector"))
        .collect();
    assert_eq!(clients.len(), 2000);
    for c in &mut clients {
        c.write_all(b"ping\n").unwrap();
    }
    for c in &mut clients {
        c.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        pong(c).expect("every client of the burst is served");
    }
}

#[test]
fn running_out_of_descriptors_is_logged_once_and_waiting_clients_are_served_later() {
    use std::os::unix::process::CommandExt;
    let dir = common::temp_dir("fds");
    let log = dir.join("node.log");
    let mut cmd = common::server_command(
        &dir,
        &[("NUN_MAX_CONNECTIONS", "1000"), ("NUN_LOG_LEVEL", "info")],
    );
    // SAFETY: setrlimit is async-signal-safe and touches only the child about to exec.
    unsafe {
        cmd.pre_exec(|| {
            let limit = libc::rlimit {
                rlim_cur: 64,
                rlim_max: 64,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let server = Server::spawn_logged(cmd, dir.clone(), log.clone());
    let lines = |needle: &str| {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(needle))
            .count()
    };
    // More clients than the node has descriptors: the kernel queues the ones it cannot take.
    let mut clients: Vec<TcpStream> = (0..100)
        .map(|_| TcpStream::connect(&server.tcp).expect("connect"))
        .collect();
    for c in &mut clients {
        c.write_all(b"ping\n").unwrap();
    }
    let mut served = 0;
    for c in &mut clients {
        c.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        if pong(c).is_err() {
            break;
        }
        served += 1;
    }
    assert!(
        served > 0 && served < 100,
        "{served} served with 64 descriptors"
    );
    assert!(eventually(Duration::from_secs(30), || lines(
        "cannot accept"
    ) == 1));
    // The served clients leave: the waiting ones are accepted and answered, each leaving in
    // turn (freeing its descriptor for the next).
    clients.drain(..served);
    for mut c in clients.drain(..) {
        c.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        pong(&mut c).expect("a waiting client is served once descriptors free up");
    }
    // A client that comes after they all left is served at once, and by then every run out
    // of descriptors was logged once, with its recovery, not once per attempt.
    let mut late = TcpStream::connect(&server.tcp).expect("connect");
    late.write_all(b"ping\n").unwrap();
    late.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    pong(&mut late).expect("a client after the run out is served");
    assert!(eventually(Duration::from_secs(30), || {
        lines("accepts again") == lines("cannot accept")
    }));
    let episodes = lines("cannot accept");
    assert!((1..=5).contains(&episodes), "{episodes} episodes logged");
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}
