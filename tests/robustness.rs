//! Throws >100k random and mutated command lines at all three transports, plus oversized lines,
//! invalid UTF-8, non-text and half-open WebSocket traffic; then checks the server still answers
//! and earlier data is intact.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::{RawTcp, RawWs, Server};
use nundb::client::{self, Client};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tungstenite::Message;

const VALID: &[&str] = &[
    "use-db fz fzt",
    "set k v",
    "set k2 a b c",
    "set-safe k 3 x",
    "get k",
    "get-safe k",
    "increment n 2",
    "increment k",
    "remove k2",
    "keys",
    "keys k*",
    "ls *2",
    "watch k",
    "unwatch k",
    "unwatch-all",
    "snapshot",
    "arbiter",
    "resolve 1 fz k 2 v",
    "create-user u t",
    "set-permissions u rw *",
    "cluster-state",
    "metrics-state",
    "list-commands",
    "debug process-info",
    "ping",
    "auth admin nope",
    "create-db x y newer",
    "use-db safe wrong",
    "delete-db safe",
];

fn random_line(rng: &mut StdRng) -> Vec<u8> {
    let mut line: Vec<u8> = match rng.gen_range(0..10) {
        // Random bytes.
        0..=2 => (0..rng.gen_range(0..80)).map(|_| rng.gen()).collect(),
        // A huge token.
        3 if rng.gen_ratio(1, 50) => {
            let mut l = b"set big ".to_vec();
            l.extend(std::iter::repeat_n(b'z', rng.gen_range(10_000..200_000)));
            l
        }
        // Lone separators and whitespace.
        4 => [";", " ; ", ";;;", " ", "\t", "\r", "; ping"][rng.gen_range(0..7)]
            .as_bytes()
            .to_vec(),
        // Mutated valid commands.
        _ => {
            let mut l = VALID[rng.gen_range(0..VALID.len())].as_bytes().to_vec();
            for _ in 0..rng.gen_range(0..4) {
                if l.is_empty() {
                    break;
                }
                let i = rng.gen_range(0..l.len());
                match rng.gen_range(0..5) {
                    0 => l[i] = rng.gen(),
                    1 => l.truncate(i),
                    2 => l.insert(i, b';'),
                    3 => l.insert(i, 0xff),
                    _ => {
                        let dup = l[..i].to_vec();
                        l.extend(dup);
                    }
                }
            }
            l
        }
    };
    line.retain(|&b| b != b'\n');
    line
}

/// Number of replies the server owes for one TCP line.
fn expected_replies(line: &[u8]) -> usize {
    match std::str::from_utf8(line) {
        Ok(s) if s.trim().is_empty() => 0,
        _ => 1,
    }
}

fn fuzz_tcp(s: &Server, rng: &mut StdRng, lines: usize) {
    let mut stream = TcpStream::connect(&s.tcp).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut batch = Vec::new();
    let mut owed = 0;
    for _ in 0..lines {
        let line = random_line(rng);
        owed += expected_replies(&line);
        batch.extend_from_slice(&line);
        batch.push(b'\n');
    }
    batch.extend_from_slice(b"ping\n");
    owed += 1;
    let reader = stream.try_clone().unwrap();
    let counter = std::thread::spawn(move || {
        let mut reader = std::io::BufReader::new(reader);
        let mut envelopes = 0;
        let mut last = Vec::new();
        let mut buf = Vec::new();
        loop {
            buf.clear();
            let n = std::io::BufRead::read_until(&mut reader, b'\n', &mut buf).unwrap();
            assert!(n > 0, "connection closed after {envelopes} replies");
            if buf == b"ok \n" || (buf.starts_with(b"error ") && buf.ends_with(b" \n")) {
                envelopes += 1;
                if envelopes == owed {
                    assert_eq!(last, b"pong\n", "last reply must be the ping's");
                    return envelopes;
                }
            }
            last = buf.clone();
        }
    });
    stream.write_all(&batch).unwrap();
    assert_eq!(
        counter.join().unwrap(),
        owed,
        "every line got exactly one reply"
    );
}

fn fuzz_ws(s: &Server, rng: &mut StdRng, commands: usize) {
    let mut w = RawWs::connect(&s.ws);
    let mut sent = 0;
    while sent < commands {
        let n = rng.gen_range(1..20);
        let mut parts = Vec::new();
        for _ in 0..n {
            parts.push(String::from_utf8_lossy(&random_line(rng)).to_string());
        }
        sent += n;
        let frame = parts.join(";");
        match rng.gen_range(0..20) {
            0 => w.ws.send(Message::Binary(random_line(rng))).unwrap(),
            1 => w.ws.send(Message::Ping(vec![1, 2, 3])).unwrap(),
            _ => w.ws.send(Message::Text(frame)).unwrap(),
        }
        // Drain whatever arrived so the server never has to queue our replies for long.
        if sent % 500 < n {
            w.send("ping");
            loop {
                if w.frame() == "pong\n" {
                    break;
                }
            }
        }
    }
    w.send("ping");
    while w.frame() != "pong\n" {}
}

fn fuzz_http(s: &Server, rng: &mut StdRng, commands: usize) {
    let mut sent = 0;
    while sent < commands {
        let n = rng.gen_range(1..200);
        let mut body = Vec::new();
        for i in 0..n {
            if i > 0 {
                body.push(b';');
            }
            body.extend(random_line(rng));
        }
        sent += n;
        let mut stream = TcpStream::connect(&s.http).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        let head = format!(
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        stream.write_all(head.as_bytes()).unwrap();
        stream.write_all(&body).unwrap();
        let mut response = Vec::new();
        stream.read_to_end(&mut response).unwrap();
        let text = String::from_utf8_lossy(&response);
        assert!(
            text.starts_with("HTTP/1.1 200") || text.starts_with("HTTP/1.1 400"),
            "{}",
            &text[..text.len().min(200)]
        );
    }
}

#[test]
fn hundred_thousand_hostile_lines_do_not_hurt_the_server() {
    let s = Server::start();
    s.create_db("safe", "safe-secret", None);
    s.create_db("fz", "fzt", Some("newer"));
    let mut keeper = s.tcp_client("safe", "safe-secret");
    keeper.set("precious", "value with spaces").unwrap();
    keeper.set("precious", "v2 ünïcödé").unwrap();

    // A half-open WebSocket handshake and raw garbage on the WebSocket port, held open throughout.
    let mut half_open = TcpStream::connect(&s.ws).unwrap();
    half_open
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n")
        .unwrap();
    let mut garbage = TcpStream::connect(&s.ws).unwrap();
    garbage.write_all(&[0xff; 4096]).unwrap();

    let seed: u64 = std::env::var("FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("fuzz seed {seed} (rerun with FUZZ_SEED={seed})");
    let mut rng = StdRng::seed_from_u64(seed);
    fuzz_tcp(&s, &mut rng, 60_000);
    fuzz_ws(&s, &mut rng, 25_000);
    fuzz_http(&s, &mut rng, 20_000);

    // A 20 MB line on TCP: refused, connection still usable.
    let mut t = RawTcp::connect(&s.tcp);
    let mut big = vec![b'a'; 20 * 1024 * 1024];
    big.extend_from_slice(b"\nping\n");
    t.send(&big);
    assert_eq!(t.until_envelope(), vec!["error line too long \n"]);
    assert_eq!(t.until_envelope(), vec!["pong\n", "ok \n"]);

    // A 20 MB WebSocket frame: refused with a clear error, then closed cleanly.
    let mut w = RawWs::connect(&s.ws);
    let _ = w.ws.send(Message::Text("x".repeat(20 * 1024 * 1024)));
    let mut got = Vec::new();
    while let Ok(m) = w.ws.read() {
        if let Message::Text(t) = m {
            got.push(t);
        }
    }
    assert_eq!(got, vec!["error line too long \n"]);

    // A 20 MB HTTP body: 413.
    let err = client::post(&s.http_url(), &"y".repeat(20 * 1024 * 1024)).unwrap_err();
    assert!(err.to_string().contains("HTTP 413"), "{err}");

    // Still healthy, data intact.
    let mut c = Client::connect_tcp(&s.tcp).unwrap();
    assert_eq!(c.call("ping").unwrap().messages, vec!["pong"]);
    let mut keeper = s.tcp_client("safe", "safe-secret");
    assert_eq!(
        keeper.get_safe("precious").unwrap(),
        Some((1, "v2 ünïcödé".to_string()))
    );
    let mut ws = s.ws_client("safe", "safe-secret");
    assert_eq!(ws.get("precious").unwrap().as_deref(), Some("v2 ünïcödé"));
    drop(half_open);
    drop(garbage);
}
