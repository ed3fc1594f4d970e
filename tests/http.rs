//! The HTTP listener under slow and stalled clients: each is cut off after the HTTP timeout, and
//! `nun-db exec` keeps working while a hundred of them are connected. Also keep-alive and
//! chunked bodies, which the CLI and scripts may use.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Server, ADMIN, ADMIN_PWD};

/// Runs `nun-db exec` against `server` and returns what it printed.
fn exec(server: &Server, commands: &str) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_nun-db"))
        .args([
            "-u",
            ADMIN,
            "-p",
            ADMIN_PWD,
            "-h",
            &server.http_url(),
            "exec",
            commands,
        ])
        .output()
        .expect("run nun-db exec");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// Everything the server sends until it closes the connection; fails if it has not closed it
/// within 20 s.
fn read_all(mut s: TcpStream) -> String {
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut out = Vec::new();
    match s.read_to_end(&mut out) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!("the server did not close the connection: {e}"),
    }
    String::from_utf8_lossy(&out).to_string()
}

#[test]
fn stalled_clients_are_cut_off_and_exec_keeps_working() {
    let server = Server::start_with(&[("NUN_HTTP_TIMEOUT", "2")]);
    let started = Instant::now();
    let mut silent = Vec::new();
    let mut trickling = Vec::new();
    let mut stalled_bodies = Vec::new();
    for i in 0..100 {
        let mut s = TcpStream::connect(&server.http).unwrap();
        match i % 3 {
            0 => silent.push(s),
            1 => {
                s.write_all(b"PO").unwrap();
                trickling.push(s);
            }
            _ => {
                s.write_all(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nauth ")
                    .unwrap();
                stalled_bodies.push(s);
            }
        }
    }
    // Headers a byte at a time for 6 s: each byte comes well within a read timeout of the last
    // one, so only a deadline on the whole request cuts them off (at 2 s).
    let readers: Vec<_> = trickling
        .iter()
        .map(|s| {
            let s = s.try_clone().unwrap();
            std::thread::spawn(move || (read_all(s), Instant::now()))
        })
        .collect();
    let trickle = std::thread::spawn(move || {
        for _ in 0..12 {
            std::thread::sleep(Duration::from_millis(500));
            for s in &mut trickling {
                let _ = s.write_all(b"S");
            }
        }
    });
    // While the hundred are connected, the CLI is answered.
    assert_eq!(
        exec(&server, "create-db h t; use-db h t; set k v; get k"),
        "Response \"valid auth;create-db success;empty;empty;value v\"\n"
    );
    for reader in readers {
        let (answer, at) = reader.join().unwrap();
        assert!(answer.starts_with("HTTP/1.1 408 "), "{answer:?}");
        assert!(
            at < started + Duration::from_secs(5),
            "cut off only after {:?}",
            at - started
        );
    }
    trickle.join().unwrap();
    // The silent ones and the stalled bodies are cut off too.
    for s in silent.into_iter().chain(stalled_bodies) {
        let answer = read_all(s);
        assert!(answer.starts_with("HTTP/1.1 408 "), "{answer:?}");
    }
    assert!(started.elapsed() < Duration::from_secs(30));
    assert_eq!(
        exec(&server, "use-db h t; get k"),
        "Response \"valid auth;empty;value v\"\n"
    );
}

#[test]
fn keep_alive_and_chunked_bodies() {
    let server = Server::start();
    let mut s = TcpStream::connect(&server.http).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let auth = format!("auth {ADMIN} {ADMIN_PWD}; ping");
    write!(
        s,
        "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{auth}",
        auth.len()
    )
    .unwrap();
    // A chunked second request on the same connection, then close.
    let body = "ping; ping";
    write!(
        s,
        "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n4\r\n{}\r\n{:x}\r\n{}\r\n0\r\n\r\n",
        &body[..4],
        body.len() - 4,
        &body[4..]
    )
    .unwrap();
    let answer = read_all(s);
    let bodies: Vec<&str> = answer
        .split("HTTP/1.1 200 OK\r\n")
        .skip(1)
        .map(|r| r.split("\r\n\r\n").nth(1).unwrap_or(""))
        .collect();
    assert_eq!(bodies, vec!["valid auth;pong", "pong;pong"], "{answer}");
    assert!(answer.contains("Connection: keep-alive"), "{answer}");
    assert!(answer.contains("Connection: close"), "{answer}");
}
