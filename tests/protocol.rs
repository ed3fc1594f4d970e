//! Exact replies of every command on every transport, including every error string of PROTOCOL.md.

mod common;

use common::{RawTcp, RawWs, Server, ADMIN, ADMIN_PWD};
use nundb::client;

fn v(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

/// PROTOCOL.md's observed transcript, frame by frame.
#[test]
fn websocket_transcript_matches_protocol() {
    let s = Server::start();
    s.create_db("sample", "sample-pwd", None);
    let mut w = RawWs::connect(&s.ws);
    assert_eq!(w.cmd("use-db sample sample-pwd"), v(&["ok \n"]));
    assert_eq!(w.cmd("set a 1"), v(&["ok \n"]));
    assert_eq!(w.cmd("get a"), v(&["value 1\n", "ok \n"]));
    assert_eq!(w.cmd("get nope"), v(&["value <Empty>\n", "ok \n"]));
    assert_eq!(w.cmd("get-safe a"), v(&["value-version 0 1\n", "ok \n"]));
    assert_eq!(
        w.cmd("get-safe nope"),
        v(&["value-version 1 <Empty>\n", "ok \n"])
    );
    assert_eq!(w.cmd("keys"), v(&["keys ,$connections,a\n", "ok \n"]));
    assert_eq!(w.cmd("watch a"), v(&["ok \n"]));
    assert_eq!(
        w.cmd("set a 2"),
        v(&["changed a 2\n", "changed-version a 1 2\n", "ok \n"])
    );
    assert_eq!(w.cmd("remove a"), v(&["removed a\n", "ok \n"]));
    assert_eq!(w.cmd("set b 5"), v(&["ok \n"]));
    assert_eq!(w.cmd("set b 6"), v(&["ok \n"]));
    assert_eq!(w.cmd("set-safe b 0 y"), v(&["error Invalid version! \n"]));
    assert_eq!(w.cmd("foo"), v(&["error unknown command: foo \n"]));
    assert_eq!(w.cmd("use-db sample bad"), v(&["error Invalid token \n"]));
    assert_eq!(
        w.cmd("use-db nodb x"),
        v(&["error Not a valid database name \n"])
    );
    assert_eq!(
        w.cmd("get $$token"),
        v(&["error To read security keys you must auth as an admin! \n"])
    );
    assert_eq!(w.cmd("ping"), v(&["pong\n", "ok \n"]));
}

#[test]
fn websocket_frame_with_several_commands() {
    let s = Server::start();
    s.create_db("d", "t", None);
    let mut w = RawWs::connect(&s.ws);
    w.send("use-db d t;set k a;b; get k;set x 1 ;get x");
    assert_eq!(
        w.envelopes(5),
        v(&[
            "ok \n",
            "ok \n",
            "value a;b\n",
            "ok \n",
            "ok \n",
            "value 1\n",
            "ok \n"
        ])
    );
}

#[test]
fn no_db_selected_and_permission_denied_shapes() {
    let s = Server::start();
    s.create_db("d", "t", None);
    let mut a = s.admin();
    a.use_db("d", "t").unwrap();
    assert_eq!(a.call("create-user ro tok").unwrap().error, None);
    assert_eq!(a.call("set-permissions ro r *").unwrap().error, None);

    let mut w = RawWs::connect(&s.ws);
    assert_eq!(
        w.cmd("get a"),
        v(&["error no-db-selected\n", "error no-db-selected \n"])
    );
    assert_eq!(w.cmd("use-db d ro tok"), v(&["ok \n"]));
    assert_eq!(
        w.cmd("set k 1"),
        v(&["permission denied\n", "error permission denied\n \n"])
    );
    assert_eq!(w.cmd("get k"), v(&["value <Empty>\n", "ok \n"]));

    let mut t = RawTcp::connect(&s.tcp);
    assert_eq!(
        t.cmd("get a"),
        v(&["error no-db-selected\n", "error no-db-selected \n"])
    );
    assert_eq!(t.cmd("use-db d ro tok"), v(&["ok \n"]));
    // On line-framed TCP the envelope keeps to one line.
    assert_eq!(
        t.cmd("set k 1"),
        v(&["permission denied\n", "error permission denied \n"])
    );
    assert_eq!(t.cmd("use-db d ro bad"), v(&["error Invalid token \n"]));
    assert_eq!(t.cmd("use-db d nobody tok"), v(&["error Invalid token \n"]));
}

#[test]
fn tcp_commands_and_pipelining() {
    let s = Server::start();
    let mut t = RawTcp::connect(&s.tcp);
    assert_eq!(t.cmd("auth admin wrong"), v(&["invalid auth\n", "ok \n"]));
    assert_eq!(t.cmd("create-db d t"), v(&["error Not auth \n"]));
    assert_eq!(
        t.cmd(&format!("auth {ADMIN} {ADMIN_PWD}")),
        v(&["valid auth\n", "ok \n"])
    );
    assert_eq!(t.cmd("create-db d t"), v(&["create-db success\n", "ok \n"]));
    assert_eq!(
        t.cmd("create-db d t"),
        v(&["error database already exists \n"])
    );
    assert_eq!(
        t.cmd("create-db n t bogus"),
        v(&["error Invalid strategy: bogus \n"])
    );
    // Pipelined: all sent in one write, replies in order, with \r\n accepted.
    t.send(
        b"use d t\r\nset name mateus freira\nget name\nincrement n\nincrement n 41\nget n\nls\n",
    );
    let mut got = Vec::new();
    for _ in 0..7 {
        got.extend(t.until_envelope());
    }
    assert_eq!(
        got,
        v(&[
            "ok \n",
            "ok \n",
            "value mateus freira\n",
            "ok \n",
            "ok \n",
            "ok \n",
            "value 42\n",
            "ok \n",
            "keys ,$$token,$connections,n,name\n",
            "ok \n"
        ])
    );
    assert_eq!(t.cmd("increment name"), v(&["error Key is not numeric \n"]));
    assert_eq!(
        t.cmd("set-safe name x v"),
        v(&["error Invalid version number: x \n"])
    );
    assert_eq!(
        t.cmd("remove $$token"),
        v(&["error The $$token key can not be removed \n"])
    );
    assert_eq!(
        t.cmd("set $connections 5"),
        v(&["error $connections is read only \n"])
    );
    assert_eq!(t.cmd("snapshot"), v(&["ok \n"]));
    assert_eq!(t.cmd("snapshot reclaim d"), v(&["ok \n"]));
    assert_eq!(
        t.cmd("snapshot nodb"),
        v(&["error Not a valid database name: nodb \n"])
    );
    let lc = t.cmd("list-commands");
    assert!(lc[0].starts_with("commands-list ,auth,use-db,"), "{lc:?}");
    assert_eq!(lc[1], "ok \n");
    let cs = t.cmd("cluster-state");
    assert_eq!(cs[0], format!("cluster-state  {}(self):Primary \n", s.tcp));
    let ms = t.cmd("metrics-state");
    assert!(
        ms[0].starts_with("metrics-state pending_ops: 0, op_log_file_size: "),
        "{ms:?}"
    );
    assert!(ms[0].contains(",replication_time_moving_avg: "), "{ms:?}");
    assert_eq!(t.cmd("delete-db d"), v(&["ok \n"]));
    assert_eq!(
        t.cmd("get name"),
        v(&["error no-db-selected\n", "error no-db-selected \n"])
    );
    assert_eq!(
        t.cmd("delete-db d"),
        v(&["error Not a valid database name \n"])
    );
    // Blank lines produce nothing; the next command still answers in order.
    t.send(b"\n\n  \nping\n");
    assert_eq!(t.until_envelope(), v(&["pong\n", "ok \n"]));
}

#[test]
fn non_admin_cannot_run_admin_commands() {
    let s = Server::start();
    s.create_db("d", "t", None);
    let mut t = RawTcp::connect(&s.tcp);
    t.cmd("use-db d t");
    for cmd in [
        "create-db x y",
        "delete-db d",
        "snapshot",
        "create-user u t",
        "set-permissions u r *",
        "cluster-state",
        "metrics-state",
        "list-commands",
        "debug process-info",
        "join 127.0.0.1:1",
        "leave 127.0.0.1:1",
    ] {
        assert_eq!(t.cmd(cmd), v(&["error Not auth \n"]), "{cmd}");
    }
    assert_eq!(
        t.cmd("set $$x 1"),
        v(&["error To write security keys you must auth as an admin! \n"])
    );
    assert_eq!(
        t.cmd("set $$user_x 1"),
        v(&["error To write security keys you must auth as an admin! \n"])
    );
    assert_eq!(t.cmd("keys"), v(&["keys ,$connections\n", "ok \n"]));
}

#[test]
fn http_one_item_per_command() {
    let s = Server::start();
    let body = format!(
        "foo; auth {ADMIN} {ADMIN_PWD}; create-db h h-pwd; use-db h h-pwd; set a x;y; get a; get nope; get-safe a; remove a;get a; get a b"
    );
    assert_eq!(
        client::post(&s.http_url(), &body).unwrap(),
        "unknown command: foo;valid auth;create-db success;empty;empty;value x;y;value <Empty>;value-version 0 x;y;empty;value <Empty>;Invalid command, usage: get <key>"
    );
    // Each request is a fresh, unauthenticated session.
    assert_eq!(
        client::post(&s.http_url(), "get a;create-db z z").unwrap(),
        "no-db-selected;Not auth"
    );
    assert_eq!(
        client::post(&s.http_url(), "use-db h bad;use-db h h-pwd;get a").unwrap(),
        "Invalid token;empty;value <Empty>"
    );
    assert_eq!(client::post(&s.http_url(), "").unwrap(), "");
}

#[test]
fn cli_exec_and_create_db() {
    let s = Server::start();
    let bin = env!("CARGO_BIN_EXE_nun-db");
    let run = |args: &[&str]| {
        let out = std::process::Command::new(bin)
            .args(args)
            .env_remove("NUN_USER")
            .env_remove("NUN_PWD")
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let url = s.http_url();
    let (code, out, _) = run(&[
        "-u",
        ADMIN,
        "-p",
        ADMIN_PWD,
        "-h",
        &url,
        "create-db",
        "-d",
        "c",
        "-t",
        "ct",
    ]);
    assert_eq!(code, Some(0));
    assert_eq!(out, "Response \"valid auth;create-db success\"\n");
    let (code, out, _) = run(&[
        "-u",
        ADMIN,
        "-p",
        ADMIN_PWD,
        "-h",
        &url,
        "exec",
        "use-db c ct; set k v w; get k",
    ]);
    assert_eq!(code, Some(0));
    assert_eq!(out, "Response \"valid auth;empty;empty;value v w\"\n");
    // Misuse: one line on stderr, non-zero exit, no panic.
    for args in [
        vec!["exec", "ping"],
        vec![
            "-u",
            "a",
            "-p",
            "b",
            "-h",
            "http://127.0.0.1:1",
            "exec",
            "ping",
        ],
        vec!["-u", "a", "-p", "b", "-h", "ftp://x", "exec", "ping"],
        vec!["-u", "a", "-p", "b", "create-db", "-d", "x"],
        vec!["bogus"],
        vec!["start"],
    ] {
        let (code, out, err) = run(&args);
        assert_ne!(code, Some(0), "{args:?}");
        assert!(out.is_empty(), "{args:?}: {out}");
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
        assert!(err.starts_with("nun-db: "), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
}
