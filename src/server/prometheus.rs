//! `GET /metrics`: the node's figures in the Prometheus text exposition format (0.0.4), with a
//! `nundb_` prefix. Rendered on demand from counters the hot paths keep without locks
//! ([`crate::metrics::STATS`]) and from the node's state.

use std::fmt::Write;
use std::sync::atomic::Ordering;

use super::Server;
use crate::metrics::{HistogramView, BUCKETS, STATS};
use crate::protocol::VERBS;

/// The `Content-Type` of the exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Builds the text, one metric family after another.
#[derive(Default)]
struct Exposition {
    out: String,
}

/// `name="value"` pairs, escaped as the format requires.
fn labels(pairs: &[(&str, &str)]) -> String {
    if pairs.is_empty() {
        return String::new();
    }
    let inner: Vec<String> = pairs
        .iter()
        .map(|(k, v)| {
            let escaped = v
                .replace('\\', "\\\\")
                .replace('"', "\\\"")
                .replace('\n', "\\n");
            format!("{k}=\"{escaped}\"")
        })
        .collect();
    format!("{{{}}}", inner.join(","))
}

impl Exposition {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, pairs: &[(&str, &str)], value: impl std::fmt::Display) {
        let _ = writeln!(self.out, "{name}{} {value}", labels(pairs));
    }

    fn single(&mut self, name: &str, kind: &str, help: &str, value: impl std::fmt::Display) {
        self.family(name, kind, help);
        self.sample(name, &[], value);
    }

    fn histogram(&mut self, name: &str, pairs: &[(&str, &str)], h: &HistogramView) {
        for (i, count) in h.cumulative.iter().enumerate() {
            let le = BUCKETS
                .get(i)
                .map_or_else(|| "+Inf".to_string(), |b| b.to_string());
            let mut with_le: Vec<(&str, &str)> = pairs.to_vec();
            with_le.push(("le", &le));
            self.sample(&format!("{name}_bucket"), &with_le, count);
        }
        self.sample(&format!("{name}_sum"), pairs, h.sum);
        self.sample(&format!("{name}_count"), pairs, h.count());
    }
}

/// The whole exposition for this node.
pub fn render(server: &Server) -> String {
    let node = &server.node;
    let mut e = Exposition::default();

    e.family(
        "nundb_commands_total",
        "counter",
        "Commands run, by command and result.",
    );
    for (i, verb) in VERBS.iter().enumerate() {
        e.sample(
            "nundb_commands_total",
            &[("command", verb), ("result", "ok")],
            STATS.commands.sum(i * 2),
        );
        e.sample(
            "nundb_commands_total",
            &[("command", verb), ("result", "error")],
            STATS.commands.sum(i * 2 + 1),
        );
    }
    e.family(
        "nundb_command_duration_seconds",
        "histogram",
        "Time a command takes to parse and run, not counting the wait for its log record to be durable.",
    );
    for (i, verb) in VERBS.iter().enumerate() {
        let h = STATS.command_time.view(i);
        if h.count() > 0 {
            e.histogram("nundb_command_duration_seconds", &[("command", verb)], &h);
        }
    }

    e.family(
        "nundb_connections",
        "gauge",
        "Client connections open now, by transport.",
    );
    for (transport, n) in [
        ("tcp", server.open_tcp.load(Ordering::Relaxed)),
        ("ws", server.open_ws.load(Ordering::Relaxed)),
        ("http", server.open_http.load(Ordering::Relaxed)),
    ] {
        e.sample("nundb_connections", &[("transport", transport)], n);
    }
    e.single(
        "nundb_connections_max",
        "gauge",
        "The connection ceiling (NUN_MAX_CONNECTIONS) for TCP and WebSocket sessions.",
        server.max,
    );

    let dbs = node.dbs.all();
    e.single(
        "nundb_watchers",
        "gauge",
        "Watch registrations (sessions times keys they watch).",
        dbs.iter().map(|d| d.watch_count()).sum::<usize>(),
    );
    e.single(
        "nundb_pushes_total",
        "counter",
        "Changes queued to watchers and conflicts offered to arbiters.",
        STATS.pushes.sum(0),
    );
    e.single(
        "nundb_slow_consumer_disconnects_total",
        "counter",
        "Sessions disconnected because they did not read what was sent to them.",
        STATS.slow_consumers.load(Ordering::Relaxed),
    );

    let (log_bytes, log_records) = node.log_stats();
    e.single(
        "nundb_oplog_bytes",
        "gauge",
        "Bytes in the operation log (since the last snapshot).",
        log_bytes,
    );
    e.single(
        "nundb_oplog_records",
        "gauge",
        "Records in the operation log (since the last snapshot).",
        log_records,
    );
    e.family(
        "nundb_fsync_duration_seconds",
        "histogram",
        "Time an fsync of the operation log takes.",
    );
    e.histogram(
        "nundb_fsync_duration_seconds",
        &[],
        &STATS.fsync_time.view(0),
    );
    e.family(
        "nundb_snapshot_duration_seconds",
        "histogram",
        "Time a snapshot of the changed databases takes.",
    );
    e.histogram(
        "nundb_snapshot_duration_seconds",
        &[],
        &STATS.snapshot_time.view(0),
    );

    e.single(
        "nundb_s3_snapshot_failures_total",
        "counter",
        "Snapshots that could not be stored in the S3 bucket (the log is kept until one is).",
        STATS.s3_failures.load(Ordering::Relaxed),
    );
    e.single(
        "nundb_s3_uploaded_bytes_total",
        "counter",
        "Bytes of snapshots uploaded to the S3 bucket.",
        STATS.s3_uploaded_bytes.load(Ordering::Relaxed),
    );

    e.family("nundb_keys", "gauge", "Live keys per database.");
    let mut sorted = dbs.clone();
    sorted.sort_by(|a, b| a.name().cmp(b.name()));
    for db in &sorted {
        e.sample("nundb_keys", &[("db", db.name())], db.len());
    }
    e.single(
        "nundb_conflicts_open",
        "gauge",
        "Conflicts waiting for an arbiter's answer.",
        sorted.iter().map(|d| d.open_conflicts()).sum::<usize>(),
    );

    let cluster = node.cluster();
    e.single(
        "nundb_is_primary",
        "gauge",
        "1 when this node takes writes (the primary, or a single node).",
        u8::from(node.is_primary()),
    );
    e.single(
        "nundb_term",
        "gauge",
        "The election term this node is in.",
        cluster.map_or(0, |c| c.term()),
    );
    e.single(
        "nundb_elections_total",
        "counter",
        "Elections this node ran as a candidate.",
        STATS.elections.load(Ordering::Relaxed),
    );
    e.family(
        "nundb_replication_lag_records",
        "gauge",
        "On the primary, how many log records each member trails by.",
    );
    if let (Some(c), Some(log)) = (cluster, node.log()) {
        for (member, lag) in c.member_lags(log.last_lsn()) {
            e.sample("nundb_replication_lag_records", &[("member", &member)], lag);
        }
    }
    e.single(
        "nundb_forwarded_writes_total",
        "counter",
        "Writes this node forwarded to the primary.",
        STATS.forwarded_writes.load(Ordering::Relaxed),
    );

    let (rss_kb, threads) = crate::os::resident_kb_and_threads().unwrap_or((0, 0));
    e.single(
        "process_resident_memory_bytes",
        "gauge",
        "Resident memory of the process.",
        rss_kb * 1024,
    );
    e.single(
        "nundb_threads",
        "gauge",
        "Threads of the process (one per session, plus a few).",
        threads,
    );
    e.single(
        "nundb_uptime_seconds",
        "gauge",
        "Seconds since the node started.",
        node.started.elapsed().as_secs(),
    );
    e.out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_escaped() {
        assert_eq!(labels(&[]), "");
        assert_eq!(
            labels(&[("db", "a\"b\\c\nd"), ("x", "y")]),
            "{db=\"a\\\"b\\\\c\\nd\",x=\"y\"}"
        );
    }

    #[test]
    fn histograms_have_buckets_sum_and_count() {
        let mut e = Exposition::default();
        let view = HistogramView {
            cumulative: (0..=BUCKETS.len() as u64).map(|i| i.min(2)).collect(),
            sum: 0.5,
        };
        e.histogram("h", &[("command", "get")], &view);
        assert!(e
            .out
            .starts_with("h_bucket{command=\"get\",le=\"0.00001\"} 0\n"));
        assert!(e.out.contains("h_bucket{command=\"get\",le=\"+Inf\"} 2\n"));
        assert!(e
            .out
            .ends_with("h_sum{command=\"get\"} 0.5\nh_count{command=\"get\"} 2\n"));
    }
}
