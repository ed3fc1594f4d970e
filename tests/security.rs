//! Users, permission specs (r/w/i/x with patterns), `$$` keys, hashed secrets.

mod common;

use common::{RawTcp, Server};

fn denied() -> Vec<String> {
    vec![
        "permission denied\n".to_string(),
        "error permission denied \n".to_string(),
    ]
}

fn ok() -> Vec<String> {
    vec!["ok \n".to_string()]
}

#[test]
fn permission_letters_and_patterns() {
    let s = Server::start();
    s.create_db("d", "t", None);
    let mut a = s.admin();
    a.use_db("d", "t").unwrap();
    a.call("create-user u ut").unwrap().into_result().unwrap();
    a.call("create-user nobody nt")
        .unwrap()
        .into_result()
        .unwrap();
    a.call("set-permissions u rw pub*|r *-ro|i count*|x tmp")
        .unwrap()
        .into_result()
        .unwrap();
    a.set("secret", "s").unwrap();
    a.set("x-ro", "1").unwrap();

    let mut u = RawTcp::connect(&s.tcp);
    assert_eq!(u.cmd("use-db d u ut"), ok());
    assert_eq!(u.cmd("set pub1 v"), ok());
    assert_eq!(u.cmd("get pub1"), vec!["value v\n", "ok \n"]);
    assert_eq!(u.cmd("get-safe x-ro"), vec!["value-version 0 1\n", "ok \n"]);
    assert_eq!(u.cmd("watch x-ro"), ok());
    assert_eq!(u.cmd("set x-ro 2"), denied());
    assert_eq!(u.cmd("get secret"), denied());
    assert_eq!(u.cmd("watch secret"), denied());
    assert_eq!(u.cmd("increment counter"), ok());
    assert_eq!(u.cmd("increment pub1"), denied());
    assert_eq!(u.cmd("remove pub1"), denied());
    assert_eq!(u.cmd("set mytmpkey 1"), denied());
    assert_eq!(u.cmd("remove mytmpkey"), ok());
    assert_eq!(
        u.cmd("get $$user_u"),
        vec!["error To read security keys you must auth as an admin! \n"]
    );

    // A user without any permission entry is denied everything.
    let mut n = RawTcp::connect(&s.tcp);
    assert_eq!(n.cmd("use-db d nobody nt"), ok());
    assert_eq!(n.cmd("get pub1"), denied());
    assert_eq!(n.cmd("set pub1 x"), denied());

    // Token sessions act as `all`: unrestricted until `$$permission_$all` exists.
    let mut t = RawTcp::connect(&s.tcp);
    assert_eq!(t.cmd("use-db d t"), ok());
    assert_eq!(t.cmd("set secret s2"), ok());
    a.call("set-permissions all r *")
        .unwrap()
        .into_result()
        .unwrap();
    assert_eq!(t.cmd("set secret s3"), denied());
    assert_eq!(t.cmd("get secret"), vec!["value s2\n", "ok \n"]);

    // Bad specs are refused with a clear error.
    assert_eq!(
        a.call("set-permissions u q *").unwrap().error.as_deref(),
        Some("Invalid permission letters: q (use r, w, i, x)")
    );
}

#[test]
fn secrets_are_stored_salted_and_hashed() {
    let s = Server::start();
    s.create_db("d", "plain-token", None);
    let mut a = s.admin();
    a.use_db("d", "plain-token").unwrap();
    a.call("create-user u user-token")
        .unwrap()
        .into_result()
        .unwrap();
    let token = a.get("$$token").unwrap().unwrap();
    let user = a.get("$$user_u").unwrap().unwrap();
    assert!(
        token.starts_with("sha256$") && !token.contains("plain-token"),
        "{token}"
    );
    assert!(
        user.starts_with("sha256$") && !user.contains("user-token"),
        "{user}"
    );
    // An admin `set` of a secret key stores it hashed too, and it works as a token.
    a.set("$$token", "rotated").unwrap();
    assert!(a.get("$$token").unwrap().unwrap().starts_with("sha256$"));
    let mut c = RawTcp::connect(&s.tcp);
    assert_eq!(
        c.cmd("use-db d plain-token"),
        vec!["error Invalid token \n"]
    );
    assert_eq!(c.cmd("use-db d rotated"), ok());
    // Two databases with the same token get different salts.
    s.create_db("e", "plain-token", None);
    let mut b = s.admin();
    b.use_db("e", "plain-token").unwrap();
    assert_ne!(b.get("$$token").unwrap(), a.get("$$token").unwrap());
}

#[test]
fn non_admins_never_see_security_keys() {
    let s = Server::start();
    s.create_db("d", "t", None);
    let mut a = s.admin();
    a.use_db("d", "t").unwrap();
    a.call("create-user u ut").unwrap().into_result().unwrap();
    a.set("k", "v").unwrap();
    assert_eq!(
        a.keys("").unwrap(),
        vec!["$$token", "$$user_u", "$connections", "k"]
    );
    let mut c = s.tcp_client("d", "t");
    assert_eq!(c.keys("").unwrap(), vec!["$connections", "k"]);
    assert_eq!(c.keys("$*").unwrap(), vec!["$connections"]);
    assert_eq!(c.keys("*k").unwrap(), vec!["k"]);
}

/// Sessions keep their permissions between commands; a change must reach open sessions at
/// their very next command, in both directions, for users and for token sessions.
#[test]
fn permission_changes_reach_open_sessions_at_the_next_command() {
    let s = Server::start();
    s.create_db("d", "t", None);
    let mut a = s.admin();
    a.use_db("d", "t").unwrap();
    a.call("create-user u ut").unwrap().into_result().unwrap();
    a.call("set-permissions u rw *")
        .unwrap()
        .into_result()
        .unwrap();
    let mut u = RawTcp::connect(&s.tcp);
    assert_eq!(u.cmd("use-db d u ut"), ok());
    assert_eq!(u.cmd("set k 1"), ok());

    a.call("set-permissions u r *")
        .unwrap()
        .into_result()
        .unwrap();
    assert_eq!(u.cmd("set k 2"), denied());
    assert_eq!(u.cmd("get k"), vec!["value 1\n", "ok \n"]);

    a.call("set-permissions u rw k")
        .unwrap()
        .into_result()
        .unwrap();
    assert_eq!(u.cmd("set k 3"), ok());
    assert_eq!(u.cmd("get other"), denied());

    // Token sessions act as `all`: everything until `all` gets a spec of its own.
    let mut t = RawTcp::connect(&s.tcp);
    assert_eq!(t.cmd("use-db d t"), ok());
    assert_eq!(t.cmd("set open 1"), ok());
    a.call("set-permissions all r *")
        .unwrap()
        .into_result()
        .unwrap();
    assert_eq!(t.cmd("set open 2"), denied());
    assert_eq!(t.cmd("get open"), vec!["value 1\n", "ok \n"]);
}
