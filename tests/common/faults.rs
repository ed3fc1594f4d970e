//! What the fault tests (`chaos.rs`, `partition.rs`) share: watch connections that record
//! every push, a node's data read back, and the checks on both.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use nundb::client::{Client, Event};

/// One watch connection's events, in arrival order.
pub type Segment = Vec<Event>;

/// Every user key with its version and value.
pub type Data = BTreeMap<String, (i32, String)>;

/// Watches `keys` over connections from `connect` until `stop`, one segment per connection
/// (a connection ends when its node drops the watcher or dies; the tests kill the nodes last).
pub fn watch_until(
    stop: &AtomicBool,
    keys: &[&str],
    connect: impl Fn() -> Option<Client>,
) -> Vec<Segment> {
    let mut segments = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let Some(mut c) = connect() else {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        };
        if c.set_timeout(None).is_err() || keys.iter().any(|k| c.watch(k).is_err()) {
            continue;
        }
        let mut seg = Vec::new();
        while let Ok(e) = c.next_event() {
            seg.push(e);
        }
        segments.push(seg);
    }
    segments
}

/// Every user key of the database `client` uses, with its version and value.
pub fn dump(client: &mut Client) -> Option<Data> {
    let keys: Vec<String> = client
        .keys("")
        .ok()?
        .into_iter()
        .filter(|k| !k.is_empty() && !k.starts_with('$'))
        .collect();
    let mut out = BTreeMap::new();
    for chunk in keys.chunks(500) {
        let commands: Vec<String> = chunk.iter().map(|k| format!("get-safe {k}")).collect();
        let refs: Vec<&str> = commands.iter().map(String::as_str).collect();
        for (k, reply) in chunk.iter().zip(client.pipeline(&refs).ok()?) {
            let line = reply.messages.first()?.strip_prefix("value-version ")?;
            let (version, value) = line.split_once(' ')?;
            out.insert(k.clone(), (version.parse().ok()?, value.to_string()));
        }
    }
    Some(out)
}

/// No term had two primaries (`victories` as from `TestCluster::victories`).
pub fn check_terms(victories: &[(usize, u64)], v: &mut Vec<String>) {
    let mut by_term: HashMap<u64, usize> = HashMap::new();
    for &(node, term) in victories {
        let first = *by_term.entry(term).or_insert(node);
        if first != node {
            v.push(format!("term {term} had two primaries: {first} and {node}"));
        }
    }
}

/// Watchers (`segments[node]`) saw each key's versions in order without gaps or duplicates
/// (a removal consumes one version), the watchers of every node saw something, and nobody
/// saw two values for one version (nobody was shown a change later rolled back). Returns
/// every observed (key, version) -> value, the final `data` included.
pub fn check_watchers(
    segments: &[Vec<Segment>],
    data: &Data,
    v: &mut Vec<String>,
) -> HashMap<(String, i32), String> {
    let mut seen: HashMap<(String, i32), String> = data
        .iter()
        .map(|(k, (version, value))| ((k.clone(), *version), value.clone()))
        .collect();
    for (node, segs) in segments.iter().enumerate() {
        if segs.iter().all(Vec::is_empty) {
            v.push(format!("the watchers on node {node} saw nothing"));
        }
        for seg in segs {
            let mut last: HashMap<&str, i32> = HashMap::new();
            for e in seg {
                match e {
                    Event::Changed {
                        key,
                        version,
                        value,
                    } => {
                        if let Some(prev) = last.get(key.as_str()) {
                            if *version != prev + 1 {
                                v.push(format!(
                                    "node {node}: a watcher of {key} saw version {version} ({value}) after {prev}"
                                ));
                            }
                        }
                        last.insert(key, *version);
                        let first = seen.entry((key.clone(), *version)).or_insert(value.clone());
                        if first != value {
                            v.push(format!(
                                "{key} v{version} was seen as {first} and as {value} (node {node})"
                            ));
                        }
                    }
                    Event::Removed { key } => {
                        if let Some(prev) = last.get_mut(key.as_str()) {
                            *prev += 1;
                        }
                    }
                }
            }
        }
    }
    seen
}
