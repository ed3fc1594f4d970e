//! The Rust client library over both transports, and the bench tool's quick mode.

mod common;

use common::{Server, ADMIN, ADMIN_PWD};
use nundb::client::{Client, ClientError, Event};

fn exercise(mut c: Client, mut watcher: Client) {
    c.set("name", "mateus freira").unwrap();
    assert_eq!(c.get("name").unwrap().as_deref(), Some("mateus freira"));
    assert_eq!(c.get("missing").unwrap(), None);
    assert_eq!(
        c.get_safe("name").unwrap(),
        Some((0, "mateus freira".into()))
    );
    assert_eq!(c.get_safe("missing").unwrap(), None);
    c.set_safe("name", 0, "v1").unwrap();
    match c.set_safe("name", 0, "stale") {
        Err(ClientError::Server(e)) => assert_eq!(e, "Invalid version!"),
        other => panic!("{other:?}"),
    }
    c.increment("n", 5).unwrap();
    c.increment("n", -2).unwrap();
    assert_eq!(c.get("n").unwrap().as_deref(), Some("3"));
    assert_eq!(c.keys("").unwrap(), vec!["$connections", "n", "name"]);
    assert_eq!(c.keys("na*").unwrap(), vec!["name"]);
    watcher.watch("name").unwrap();
    c.set("name", "v2").unwrap();
    c.remove("name").unwrap();
    let events: Vec<Event> = watcher.events().take(2).collect();
    assert_eq!(
        events,
        vec![
            Event::Changed {
                key: "name".into(),
                version: 2,
                value: "v2".into()
            },
            Event::Removed { key: "name".into() }
        ]
    );
    let replies = c.pipeline(&["set p 1", "get p", "nope"]).unwrap();
    assert_eq!(replies[0].error, None);
    assert_eq!(replies[1].messages, vec!["value 1"]);
    assert_eq!(replies[2].error.as_deref(), Some("unknown command: nope"));
}

#[test]
fn client_over_tcp_and_websocket() {
    let s = Server::start();
    s.create_db("a", "t", None);
    s.create_db("b", "t", None);
    exercise(s.tcp_client("a", "t"), s.tcp_client("a", "t"));
    exercise(s.ws_client("b", "t"), s.ws_client("b", "t"));
    let mut c = Client::connect_tcp(&s.tcp).unwrap();
    assert!(matches!(
        c.auth(ADMIN, "wrong"),
        Err(ClientError::Server(_))
    ));
    assert!(matches!(c.use_db("a", "wrong"), Err(ClientError::Server(e)) if e == "Invalid token"));
    assert!(matches!(
        Client::connect_ws("http://x"),
        Err(ClientError::Protocol(_))
    ));
    assert!(matches!(
        Client::connect_tcp("127.0.0.1:1"),
        Err(ClientError::Io(_))
    ));
}

#[test]
fn bench_quick_mode_produces_rows() {
    let s = Server::start();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_nun-db"))
        .args([
            "-u", ADMIN, "-p", ADMIN_PWD, "bench", "--quick", "--tcp", &s.tcp, "--ws", &s.ws,
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("| set |") || l.starts_with("| get |"))
        .collect();
    // 2 ops x 2 conn counts x 2 pipeline depths x 2 transports.
    assert_eq!(rows.len(), 16, "{text}");
    for row in rows {
        let ops: f64 = row.split('|').nth(5).unwrap().trim().parse().unwrap();
        assert!(ops > 0.0, "{row}");
    }
    let watch_rows = text
        .lines()
        .filter(|l| l.starts_with("| 1 |") || l.starts_with("| 10 |"))
        .count();
    assert_eq!(watch_rows, 2, "{text}");
}
