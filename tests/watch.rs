//! Watch pushes: order without gaps under concurrent writers, `$connections`, unwatch, and slow
//! watchers being disconnected without ever stalling writers.

mod common;

use std::time::Duration;

use common::{eventually, RawTcp, Server};
use nundb::client::{Client, Event};

#[test]
fn watchers_see_every_version_in_order_on_both_transports() {
    let s = Server::start();
    s.create_db("w", "t", None);
    let mut tcp_watcher = s.tcp_client("w", "t");
    let mut ws_watcher = s.ws_client("w", "t");
    tcp_watcher.watch("k").unwrap();
    ws_watcher.watch("k").unwrap();
    const WRITERS: usize = 4;
    const WRITES: usize = 250;
    let handles: Vec<_> = (0..WRITERS)
        .map(|w| {
            let mut c = if w % 2 == 0 {
                s.tcp_client("w", "t")
            } else {
                s.ws_client("w", "t")
            };
            std::thread::spawn(move || {
                for i in 0..WRITES {
                    c.set("k", &format!("w{w} i{i}")).unwrap();
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    for watcher in [&mut tcp_watcher, &mut ws_watcher] {
        let mut expected = 0;
        while expected < (WRITERS * WRITES) as i32 {
            match watcher.next_event().unwrap() {
                Event::Changed { key, version, .. } => {
                    assert_eq!(key, "k");
                    assert_eq!(version, expected, "gap or reorder");
                    expected += 1;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    }
    let mut c = s.tcp_client("w", "t");
    assert_eq!(c.get_safe("k").unwrap().map(|(v, _)| v), Some(999));
}

#[test]
fn values_arrive_verbatim_and_removes_are_pushed() {
    let s = Server::start();
    s.create_db("w", "t", None);
    let mut watcher = s.ws_client("w", "t");
    watcher.watch("k").unwrap();
    let mut writer = s.tcp_client("w", "t");
    writer.set("k", "multi word; ünïcödé {\"a\":1}").unwrap();
    writer.remove("k").unwrap();
    assert_eq!(
        watcher.next_event().unwrap(),
        Event::Changed {
            key: "k".into(),
            version: 0,
            value: "multi word; ünïcödé {\"a\":1}".into()
        }
    );
    assert_eq!(
        watcher.next_event().unwrap(),
        Event::Removed { key: "k".into() }
    );
}

#[test]
fn unwatch_and_unwatch_all_stop_pushes() {
    let s = Server::start();
    s.create_db("w", "t", None);
    let mut t = RawTcp::connect(&s.tcp);
    t.cmd("use-db w t");
    t.cmd("watch a");
    t.cmd("watch b");
    let mut writer = s.tcp_client("w", "t");
    writer.set("a", "1").unwrap();
    assert_eq!(t.line(), "changed a 1\n");
    assert_eq!(t.line(), "changed-version a 0 1\n");
    assert_eq!(t.cmd("unwatch a"), vec!["ok \n"]);
    writer.set("a", "2").unwrap();
    writer.set("b", "1").unwrap();
    assert_eq!(t.line(), "changed b 1\n");
    assert_eq!(t.line(), "changed-version b 0 1\n");
    assert_eq!(t.cmd("unwatch-all"), vec!["ok \n"]);
    writer.set("b", "2").unwrap();
    // The next thing on the wire is the reply to ping: no push came in between.
    assert_eq!(t.cmd("ping"), vec!["pong\n", "ok \n"]);
}

#[test]
fn connections_key_counts_sessions_and_is_watchable() {
    let s = Server::start();
    s.create_db("w", "t", None);
    let mut watcher = s.tcp_client("w", "t");
    assert_eq!(watcher.get("$connections").unwrap().as_deref(), Some("1"));
    watcher.watch("$connections").unwrap();
    let other = s.ws_client("w", "t");
    match watcher.next_event().unwrap() {
        Event::Changed { key, value, .. } => {
            assert_eq!(key, "$connections");
            assert_eq!(value, "2");
        }
        e => panic!("{e:?}"),
    }
    drop(other);
    match watcher.next_event().unwrap() {
        Event::Changed { value, .. } => assert_eq!(value, "1"),
        e => panic!("{e:?}"),
    }
}

#[test]
fn slow_watcher_is_disconnected_and_writer_never_blocks() {
    let s = Server::start_with(&[("NUN_OUTBOX_BYTES", "8388608")]);
    s.create_db("w", "t", None);
    // A watcher that never reads.
    let mut slow = RawTcp::connect(&s.tcp);
    slow.cmd("use-db w t");
    slow.cmd("watch k");
    let mut fast = s.tcp_client("w", "t");
    fast.watch("k").unwrap();
    let fast_reader = std::thread::spawn(move || {
        for expected in 0..1024 {
            match fast.next_event().unwrap() {
                Event::Changed { version, .. } => assert_eq!(version, expected),
                e => panic!("{e:?}"),
            }
        }
    });
    let mut writer = s.tcp_client("w", "t");
    let value = "x".repeat(32 * 1024);
    // 64 MiB of pushes: far beyond socket buffers plus the 8 MiB queue budget.
    for i in 0..1024 {
        writer.set("k", &format!("{i}{value}")).unwrap();
    }
    // The fast watcher, reading as it goes, got every version.
    fast_reader.join().unwrap();
    // The slow one was cut off: reading what was buffered ends in EOF, well short of all pushes.
    let rest = slow.read_to_end();
    assert!(
        rest.len() < 1024 * value.len(),
        "slow watcher got everything"
    );
    // The server is healthy.
    let mut c = Client::connect_tcp(&s.tcp).unwrap();
    assert_eq!(c.call("ping").unwrap().messages, vec!["pong"]);
    assert!(eventually(Duration::from_secs(10), || {
        let mut c = s.tcp_client("w", "t");
        // The writer and this probe: the slow watcher is gone, the fast one finished.
        c.get("$connections").unwrap().as_deref() == Some("2")
    }));
}
