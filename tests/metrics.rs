//! `GET /metrics`: every line parses as Prometheus text exposition (a strict parser below),
//! the families dashboards rely on are there, counters move with real commands, promtool
//! accepts a scrape, and NUN_METRICS_TOKEN guards it.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{eventually, RawTcp, Server};

/// One sample: metric name, labels, value.
type Sample = (String, BTreeMap<String, String>, f64);

/// A scrape: the type of each family and every sample, in order.
#[derive(Debug, Default)]
struct Scrape {
    types: BTreeMap<String, String>,
    samples: Vec<Sample>,
}

impl Scrape {
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.samples
            .iter()
            .find(|(n, l, _)| {
                n == name
                    && l.len() == labels.len()
                    && labels
                        .iter()
                        .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|s| s.2)
    }
}

fn is_name(s: &str, colon: bool) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || (colon && c == ':'))
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || (colon && c == ':'))
}

fn parse_value(s: &str) -> Result<f64, String> {
    match s {
        "+Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        "NaN" => Ok(f64::NAN),
        _ => s.parse().map_err(|_| format!("bad value {s:?}")),
    }
}

/// `{a="x",b="y"}` (the part after the name) into labels; rejects anything malformed.
fn parse_labels(text: &str) -> Result<BTreeMap<String, String>, String> {
    let inner = text
        .strip_prefix('{')
        .and_then(|t| t.strip_suffix('}'))
        .ok_or_else(|| format!("bad label set {text:?}"))?;
    let mut labels = BTreeMap::new();
    let mut chars = inner.chars().peekable();
    while chars.peek().is_some() {
        let name: String = chars.by_ref().take_while(|c| *c != '=').collect();
        if !is_name(&name, false) {
            return Err(format!("bad label name {name:?} in {text:?}"));
        }
        if chars.next() != Some('"') {
            return Err(format!("unquoted label value in {text:?}"));
        }
        let mut value = String::new();
        loop {
            match chars.next() {
                Some('\\') => match chars.next() {
                    Some('\\') => value.push('\\'),
                    Some('"') => value.push('"'),
                    Some('n') => value.push('\n'),
                    other => return Err(format!("bad escape {other:?} in {text:?}")),
                },
                Some('"') => break,
                Some(c) => value.push(c),
                None => return Err(format!("unterminated label value in {text:?}")),
            }
        }
        if labels.insert(name.clone(), value).is_some() {
            return Err(format!("label {name} twice in {text:?}"));
        }
        match chars.next() {
            Some(',') | None => {}
            other => {
                return Err(format!(
                    "expected , after a label, got {other:?} in {text:?}"
                ))
            }
        }
    }
    Ok(labels)
}

/// The family a sample belongs to (histogram samples carry suffixes).
fn family_of(name: &str, types: &BTreeMap<String, String>) -> Option<String> {
    if types.contains_key(name) {
        return Some(name.to_string());
    }
    ["_bucket", "_sum", "_count"].iter().find_map(|suffix| {
        let base = name.strip_suffix(suffix)?;
        (types.get(base).map(String::as_str) == Some("histogram")).then(|| base.to_string())
    })
}

/// Parses a whole exposition, checking the rules a scraper relies on.
fn parse(text: &str) -> Result<Scrape, String> {
    let mut scrape = Scrape::default();
    let mut helped = HashSet::new();
    let mut finished: HashSet<String> = HashSet::new();
    let mut current: Option<String> = None;
    let mut series = HashSet::new();
    if !text.ends_with('\n') {
        return Err("the exposition must end with a newline".into());
    }
    for line in text.lines() {
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# ") {
            let mut words = rest.splitn(3, ' ');
            let (kind, name, arg) = (words.next(), words.next(), words.next());
            let name = name.ok_or_else(|| format!("bad comment line {line:?}"))?;
            if !is_name(name, true) {
                return Err(format!("bad metric name {name:?}"));
            }
            match (kind, arg) {
                (Some("HELP"), Some(_)) => {
                    if !helped.insert(name.to_string()) {
                        return Err(format!("HELP twice for {name}"));
                    }
                }
                (Some("TYPE"), Some(t)) => {
                    if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&t) {
                        return Err(format!("bad type {t:?} for {name}"));
                    }
                    if scrape
                        .types
                        .insert(name.to_string(), t.to_string())
                        .is_some()
                    {
                        return Err(format!("TYPE twice for {name}"));
                    }
                    if let Some(prev) = current.replace(name.to_string()) {
                        finished.insert(prev);
                    }
                }
                _ => return Err(format!("bad comment line {line:?}")),
            }
            continue;
        }
        let (head, value) = line
            .rsplit_once(' ')
            .ok_or_else(|| format!("no value in {line:?}"))?;
        let value = parse_value(value)?;
        let (name, labels) = match head.find('{') {
            Some(i) => (&head[..i], parse_labels(&head[i..])?),
            None => (head, BTreeMap::new()),
        };
        if !is_name(name, true) {
            return Err(format!("bad metric name {name:?}"));
        }
        let family = family_of(name, &scrape.types)
            .ok_or_else(|| format!("sample {name} before (or without) its TYPE"))?;
        if current.as_deref() != Some(family.as_str()) || finished.contains(&family) {
            return Err(format!("samples of {family} are not together"));
        }
        if !series.insert(format!("{name}{labels:?}")) {
            return Err(format!("series {name}{labels:?} twice"));
        }
        scrape.samples.push((name.to_string(), labels, value));
    }
    check_histograms(&scrape)?;
    Ok(scrape)
}

/// Buckets of each histogram series rise with `le`, end at `+Inf`, and `+Inf` equals count.
fn check_histograms(scrape: &Scrape) -> Result<(), String> {
    for (family, kind) in &scrape.types {
        if kind == "counter" && !family.ends_with("_total") {
            return Err(format!("counter {family} does not end in _total"));
        }
        if kind != "histogram" {
            continue;
        }
        let mut buckets: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
        for (name, labels, value) in &scrape.samples {
            if *name == format!("{family}_bucket") {
                let mut key = labels.clone();
                let le = key.remove("le").ok_or(format!("{name} without le"))?;
                buckets
                    .entry(format!("{key:?}"))
                    .or_default()
                    .push((parse_value(&le)?, *value));
            }
        }
        for (key, list) in buckets {
            let rising = list.windows(2).all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1);
            let last = list.last().ok_or("empty histogram")?;
            if !rising || last.0 != f64::INFINITY {
                return Err(format!("{family}{key}: buckets not cumulative or no +Inf"));
            }
            let count = scrape
                .samples
                .iter()
                .find(|(n, l, _)| *n == format!("{family}_count") && format!("{l:?}") == key)
                .map(|s| s.2);
            if count != Some(last.1) {
                return Err(format!("{family}{key}: +Inf bucket is not the count"));
            }
        }
    }
    Ok(())
}

/// A GET on the HTTP port: (status, content type, body).
fn get(addr: &str, path: &str, auth: Option<&str>) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let auth = auth.map_or_else(String::new, |a| format!("Authorization: {a}\r\n"));
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).expect("read response");
    let (head, body) = text.split_once("\r\n\r\n").expect("headers");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status");
    let content_type = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-type")
                .then(|| v.trim().to_string())
        })
        .unwrap_or_default();
    (status, content_type, body.to_string())
}

fn scrape(server: &Server) -> Scrape {
    let (status, content_type, body) = get(&server.http, "/metrics", None);
    assert_eq!(status, 200, "{body}");
    assert_eq!(content_type, "text/plain; version=0.0.4; charset=utf-8");
    parse(&body).unwrap_or_else(|e| panic!("{e}\n{body}"))
}

#[test]
fn the_parser_refuses_what_a_scraper_would() {
    let good = "# HELP a_total x\n# TYPE a_total counter\na_total{k=\"v\"} 1\n";
    assert!(parse(good).is_ok());
    for bad in [
        "a_total 1\n",
        "# TYPE a_total counter\na_total{k=v} 1\n",
        "# TYPE a_total counter\na_total{k=\"v\"} one\n",
        "# TYPE a counter\na 1\n",
        "# TYPE a_total counter\na_total 1\na_total 2\n",
        "# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\nh_count 1\nh_sum 0\n",
        "# TYPE a_total counter\na_total 1",
    ] {
        assert!(parse(bad).is_err(), "accepted {bad:?}");
    }
}

#[test]
fn metrics_parse_and_move_with_real_commands() {
    let server = Server::start();
    server.create_db("m", "t", None);
    let before = scrape(&server);
    for family in [
        "nundb_commands_total",
        "nundb_command_duration_seconds",
        "nundb_connections",
        "nundb_watchers",
        "nundb_pushes_total",
        "nundb_slow_consumer_disconnects_total",
        "nundb_oplog_bytes",
        "nundb_fsync_duration_seconds",
        "nundb_snapshot_duration_seconds",
        "nundb_keys",
        "nundb_is_primary",
        "nundb_term",
        "nundb_elections_total",
        "nundb_replication_lag_records",
        "nundb_forwarded_writes_total",
        "nundb_conflicts_open",
    ] {
        assert!(before.types.contains_key(family), "no family {family}");
    }
    let sets = |s: &Scrape, result: &str| {
        s.value(
            "nundb_commands_total",
            &[("command", "set"), ("result", result)],
        )
        .unwrap_or(0.0)
    };
    let mut watcher = RawTcp::connect(&server.tcp);
    watcher.cmd("use-db m t");
    watcher.cmd("watch k");
    let mut writer = RawTcp::connect(&server.tcp);
    writer.cmd("use-db m t");
    for i in 0..5 {
        assert_eq!(writer.cmd(&format!("set k {i}")), vec!["ok \n"]);
    }
    writer.cmd("set $connections 9");
    let after = scrape(&server);
    assert_eq!(sets(&after, "ok") - sets(&before, "ok"), 5.0);
    assert_eq!(sets(&after, "error") - sets(&before, "error"), 1.0);
    assert_eq!(
        after.value(
            "nundb_command_duration_seconds_count",
            &[("command", "set")]
        ),
        Some(sets(&after, "ok") + sets(&after, "error"))
    );
    assert_eq!(after.value("nundb_watchers", &[]), Some(1.0));
    // Five sets, each pushed to one watcher; use-db also pushed `$connections`, nobody watches it.
    assert_eq!(
        after.value("nundb_pushes_total", &[]).unwrap()
            - before.value("nundb_pushes_total", &[]).unwrap(),
        5.0
    );
    assert_eq!(
        after.value("nundb_connections", &[("transport", "tcp")]),
        Some(2.0)
    );
    // $connections, $$token and k.
    assert_eq!(after.value("nundb_keys", &[("db", "m")]), Some(3.0));
    assert_eq!(after.value("nundb_is_primary", &[]), Some(1.0));
    assert!(
        after.value("nundb_oplog_bytes", &[]).unwrap()
            > before.value("nundb_oplog_bytes", &[]).unwrap()
    );
    writer.cmd("remove k");
    drop(watcher);
    assert!(eventually(Duration::from_secs(30), || {
        let s = scrape(&server);
        s.value("nundb_keys", &[("db", "m")]) == Some(2.0)
            && s.value("nundb_watchers", &[]) == Some(0.0)
            && s.value("nundb_connections", &[("transport", "tcp")]) == Some(1.0)
    }));
    let mut admin = server.admin();
    admin.call("snapshot").unwrap().into_result().unwrap();
    let snapped = scrape(&server);
    assert!(
        snapped
            .value("nundb_snapshot_duration_seconds_count", &[])
            .unwrap()
            >= 1.0
    );

    // promtool (Debian's prometheus package, installed by make deps) accepts a scrape.
    let (_, _, body) = get(&server.http, "/metrics", None);
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool on PATH (make deps installs it)");
    promtool
        .stdin
        .take()
        .expect("stdin")
        .write_all(body.as_bytes())
        .unwrap();
    let out = promtool.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn time_between_a_sessions_batches_counts_for_no_command() {
    let server = Server::start();
    server.create_db("m", "t", None);
    let mut writer = RawTcp::connect(&server.tcp);
    writer.cmd("use-db m t");
    let set_time = |s: &Scrape| {
        (
            s.value(
                "nundb_command_duration_seconds_count",
                &[("command", "set")],
            )
            .unwrap_or(0.0),
            s.value("nundb_command_duration_seconds_sum", &[("command", "set")])
                .unwrap_or(0.0),
        )
    };
    let (count_before, sum_before) = set_time(&scrape(&server));
    assert_eq!(writer.cmd("set a 1"), vec!["ok \n"]);
    // The client is idle for a second (the time under test, not a wait for the server), then
    // pipelines two more: each command's clock starts after the previous reply was sent.
    std::thread::sleep(Duration::from_secs(1));
    writer.send(b"set b 2\nset c 3\n");
    assert_eq!(writer.line(), "ok \n");
    assert_eq!(writer.line(), "ok \n");
    let (count_after, sum_after) = set_time(&scrape(&server));
    assert_eq!(count_after - count_before, 3.0);
    let took = sum_after - sum_before;
    assert!(took < 0.5, "three sets took {took} s in all");
}

#[test]
fn a_metrics_token_is_required_when_configured() {
    let server = Server::start_with(&[("NUN_METRICS_TOKEN", "s3cret")]);
    assert_eq!(get(&server.http, "/metrics", None).0, 401);
    assert_eq!(get(&server.http, "/metrics", Some("Bearer nope")).0, 401);
    let (status, _, body) = get(&server.http, "/metrics", Some("Bearer s3cret"));
    assert_eq!(status, 200);
    assert!(parse(&body).is_ok());
    // Commands over HTTP are not affected.
    let (status, content_type, page) = get(&server.http, "/", None);
    assert_eq!(status, 200);
    assert_eq!(content_type, "text/html; charset=utf-8");
    assert!(page.contains("nun-db console"));
    assert!(!page.contains("{{WS_PORT}}"));
}
