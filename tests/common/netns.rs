//! A private network for partition tests, made of Linux network namespaces (needs root).
//!
//! Node `i` lives in a namespace of its own with address `127.100.0.<i+1>`, the test's clients
//! in another with `127.100.0.200`; every namespace has one veth link to a bridge that lives in a
//! namespace of its own, so nothing touches the host's network. The addresses are loopback
//! addresses (`route_localnet` lets them cross the links) and every neighbour entry is static.
//! A fault replaces the entry a node uses to reach a peer with a MAC address nobody has: its
//! packets to that peer then vanish silently, as on a broken link, while the peer's packets
//! still arrive (one direction); healing restores the real address. Clients always reach
//! every node. Dropping the [`Lab`] deletes every namespace it made, also when a test fails.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};

/// A MAC address no interface has: frames sent to it are dropped.
const NOWHERE: &str = "02:00:00:00:00:01";
/// The test clients' index in the address plan.
const CLIENTS: usize = 199;

static LABS: AtomicU64 = AtomicU64::new(0);

/// Runs `ip` with `args`, panicking with its error output when it fails.
fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run ip {args:?}: {e} (partition tests need iproute2)"));
    assert!(
        out.status.success(),
        "ip {args:?} failed (partition tests need root): {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Deletes namespaces left by earlier test processes that died without cleaning up.
fn remove_stale() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(pid) = name
            .strip_prefix("nbt-")
            .and_then(|r| r.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
}

/// Moves the calling thread into the network namespace open at `ns`.
fn enter(ns: &File) {
    // SAFETY: setns only reads the descriptor and changes this thread's namespace.
    let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
}

/// The private network of one test.
pub struct Lab {
    prefix: String,
    n: usize,
    /// Open handles on each node's namespace, then the clients'.
    files: Vec<File>,
}

impl Lab {
    /// Makes the namespaces, links and addresses for `n` nodes and the clients.
    pub fn new(n: usize) -> Lab {
        remove_stale();
        let prefix = format!(
            "nbt-{}-{}",
            std::process::id(),
            LABS.fetch_add(1, Ordering::Relaxed)
        );
        let mut lab = Lab {
            prefix,
            n,
            files: Vec::new(),
        };
        let sw = lab.switch();
        ip(&["netns", "add", &sw]);
        ip(&["-n", &sw, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &sw, "link", "set", "br0", "up"]);
        let members: Vec<usize> = (0..n).chain([CLIENTS]).collect();
        for &i in &members {
            let ns = lab.ns(i);
            ip(&["netns", "add", &ns]);
            let port = format!("p{i}");
            ip(&[
                "link",
                "add",
                "eth0",
                "netns",
                &ns,
                "address",
                &mac(i),
                "type",
                "veth",
                "peer",
                "name",
                &port,
                "netns",
                &sw,
            ]);
            ip(&["-n", &sw, "link", "set", &port, "master", "br0", "up"]);
            // 127.0.0.0/8 stays local only for 127.0.0.1, so the others can leave on eth0.
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
            ip(&["-n", &ns, "addr", "del", "127.0.0.1/8", "dev", "lo"]);
            ip(&["-n", &ns, "addr", "add", "127.0.0.1/32", "dev", "lo"]);
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{}/24", addr(i)),
                "dev",
                "eth0",
            ]);
            ip(&["-n", &ns, "link", "set", "eth0", "up"]);
            let file = File::open(format!("/run/netns/{ns}")).expect("namespace handle");
            route_localnet(&file);
            lab.files.push(file);
        }
        for &i in &members {
            for &j in &members {
                if i != j {
                    lab.neighbour(i, j, &mac(j));
                }
            }
        }
        lab
    }

    fn switch(&self) -> String {
        format!("{}-sw", self.prefix)
    }

    fn ns(&self, i: usize) -> String {
        format!("{}-{i}", self.prefix)
    }

    /// How many nodes the lab has room for.
    pub fn nodes(&self) -> usize {
        self.n
    }

    /// Node `i`'s address.
    pub fn ip(&self, i: usize) -> String {
        addr(i)
    }

    fn neighbour(&self, from: usize, to: usize, lladdr: &str) {
        ip(&[
            "-n",
            &self.ns(from),
            "neigh",
            "replace",
            &addr(to),
            "lladdr",
            lladdr,
            "dev",
            "eth0",
            "nud",
            "permanent",
        ]);
    }

    /// Makes `cmd` start inside node `i`'s namespace.
    pub fn place(&self, i: usize, cmd: &mut Command) {
        use std::os::unix::process::CommandExt;
        let fd = self.files[i].as_raw_fd();
        // SAFETY: setns is async-signal-safe; the descriptor stays open (the Lab holds it)
        // until after the spawn.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
    }

    /// Moves the calling thread (and threads it starts later) to the clients' namespace.
    pub fn enter_clients(&self) {
        enter(&self.files[self.n]);
    }

    /// Drops node `from`'s packets to node `to` (one direction).
    pub fn cut(&self, from: usize, to: usize) {
        self.neighbour(from, to, NOWHERE);
    }

    /// Cuts both directions between every node of `a` and every node of `b`.
    pub fn split(&self, a: &[usize], b: &[usize]) {
        for &x in a {
            for &y in b {
                self.cut(x, y);
                self.cut(y, x);
            }
        }
    }

    /// Cuts node `i` off from every other node, both directions.
    pub fn isolate(&self, i: usize) {
        let others: Vec<usize> = (0..self.n).filter(|j| *j != i).collect();
        self.split(&[i], &others);
    }

    /// Restores every link between nodes.
    pub fn heal(&self) {
        for i in 0..self.n {
            for j in 0..self.n {
                if i != j {
                    self.neighbour(i, j, &mac(j));
                }
            }
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.files.clear();
        for i in (0..self.n).chain([CLIENTS]) {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.ns(i)])
                .status();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.switch()])
            .status();
    }
}

/// Address of member `i` (a node index, or [`CLIENTS`]).
fn addr(i: usize) -> String {
    format!("127.100.0.{}", i + 1)
}

/// MAC address of member `i`'s link.
fn mac(i: usize) -> String {
    format!("02:00:00:00:01:{:02x}", i + 1)
}

/// Lets loopback addresses cross the namespace's links: writes the sysctl from a thread that
/// enters the namespace (sysctl files under /proc/sys/net belong to the opener's namespace).
fn route_localnet(ns: &File) {
    std::thread::scope(|s| {
        s.spawn(|| {
            enter(ns);
            for conf in ["all", "eth0"] {
                std::fs::write(
                    format!("/proc/sys/net/ipv4/conf/{conf}/route_localnet"),
                    "1",
                )
                .expect("set route_localnet");
            }
        });
    });
}
