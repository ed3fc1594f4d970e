//! Test harness: spawns the real `nun-db` binary on ephemeral loopback ports with a temp data
//! dir, waits for its readiness line, and kills exactly that process on drop.
#![allow(dead_code)]

pub mod faults;
pub mod moto;
pub mod netns;
pub mod proxy;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use nundb::client::Client;
use tungstenite::{Message, WebSocket};

pub const ADMIN: &str = "admin";
pub const ADMIN_PWD: &str = "admin-pwd";

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A unique, fresh temp directory (removed by [`Server`]'s drop).
pub fn temp_dir(tag: &str) -> PathBuf {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let dir = std::env::temp_dir().join(format!("nundb-{tag}-{}-{n}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// The command that starts a node on `dir` with ephemeral loopback ports.
pub fn server_command(dir: &std::path::Path, env: &[(&str, &str)]) -> Command {
    server_command_at(dir, "127.0.0.1:0", env)
}

/// The command that starts a node on `dir` with a given TCP address.
pub fn server_command_at(dir: &std::path::Path, tcp: &str, env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_nun-db"));
    cmd.arg("start")
        .arg("--tcp-address")
        .arg(tcp)
        .arg("--ws-address")
        .arg("127.0.0.1:0")
        .arg("--http-address")
        .arg("127.0.0.1:0")
        .arg("--dbs-dir")
        .arg(dir)
        .env("NUN_USER", ADMIN)
        .env("NUN_PWD", ADMIN_PWD)
        .env("NUN_LOG_LEVEL", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

/// Starts a node expected to refuse to start; returns its exit code and everything it printed.
pub fn start_failing(dir: &std::path::Path) -> (Option<i32>, String) {
    let mut cmd = server_command(dir, &[]);
    cmd.stderr(Stdio::piped());
    let child = cmd.spawn().expect("spawn");
    let out = child.wait_with_output().expect("wait");
    (
        out.status.code(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// A running server process.
pub struct Server {
    child: Child,
    pub tcp: String,
    pub ws: String,
    pub http: String,
    pub dir: PathBuf,
    owns_dir: bool,
}

impl Server {
    /// Starts a node with default settings.
    pub fn start() -> Server {
        Server::start_with(&[])
    }

    /// Starts a node with extra NUN_* environment variables.
    pub fn start_with(env: &[(&str, &str)]) -> Server {
        let mut s = Server::start_in(temp_dir("srv"), env);
        s.owns_dir = true;
        s
    }

    /// Starts a node on a data dir the caller owns (kept on drop, for restarts).
    pub fn start_in(dir: PathBuf, env: &[(&str, &str)]) -> Server {
        Server::spawn(server_command(&dir, env), dir, None)
    }

    /// Spawns `cmd`, appending its stdout (logs) to `log`.
    pub fn spawn_logged(cmd: Command, dir: PathBuf, log: PathBuf) -> Server {
        Server::spawn(cmd, dir, Some(log))
    }

    fn spawn(mut cmd: Command, dir: PathBuf, log: Option<PathBuf>) -> Server {
        let mut child = cmd.spawn().expect("spawn nun-db");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut file = log.and_then(|p| {
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .ok()
            });
            let mut lines = BufReader::new(stdout).lines();
            for line in lines.by_ref() {
                let Ok(line) = line else { break };
                if let Some(f) = file.as_mut() {
                    let _ = writeln!(f, "{line}");
                }
                if line.starts_with("ready ") {
                    let _ = tx.send(line);
                }
            }
        });
        let line = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(line) => line,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("server did not print its ready line");
            }
        };
        let field = |name: &str| {
            line.split(' ')
                .find_map(|w| w.strip_prefix(&format!("{name}=")))
                .expect("ready field")
                .to_string()
        };
        Server {
            tcp: field("tcp"),
            ws: field("ws"),
            http: field("http"),
            child,
            dir,
            owns_dir: false,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}", self.ws)
    }

    pub fn http_url(&self) -> String {
        format!("http://{}", self.http)
    }

    /// A TCP client already authenticated as admin.
    pub fn admin(&self) -> Client {
        let mut c = Client::connect_tcp(&self.tcp).expect("connect");
        c.auth(ADMIN, ADMIN_PWD).expect("auth");
        c
    }

    /// Creates `db` with token `token` (strategy optional).
    pub fn create_db(&self, db: &str, token: &str, strategy: Option<&str>) {
        let mut c = self.admin();
        let cmd = match strategy {
            Some(s) => format!("create-db {db} {token} {s}"),
            None => format!("create-db {db} {token}"),
        };
        let r = c.call(&cmd).expect("create-db");
        assert_eq!(r.error, None, "create-db failed: {r:?}");
    }

    /// A TCP client using `db`.
    pub fn tcp_client(&self, db: &str, token: &str) -> Client {
        let mut c = Client::connect_tcp(&self.tcp).expect("connect");
        c.use_db(db, token).expect("use-db");
        c
    }

    /// A WebSocket client using `db`.
    pub fn ws_client(&self, db: &str, token: &str) -> Client {
        let mut c = Client::connect_ws(&self.ws_url()).expect("connect ws");
        c.use_db(db, token).expect("use-db");
        c
    }

    /// Kills the process with SIGKILL and waits for it.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM and waits up to 30 s for a clean exit; returns the exit status code.
    pub fn terminate(&mut self) -> Option<i32> {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if self.owns_dir {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Raw line-level TCP connection for exact-bytes assertions.
pub struct RawTcp {
    stream: TcpStream,
    reader: BufReader<TcpStream>,
}

impl RawTcp {
    pub fn connect(addr: &str) -> RawTcp {
        let stream = TcpStream::connect(addr).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        RawTcp {
            reader: BufReader::new(stream.try_clone().unwrap()),
            stream,
        }
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("write");
    }

    /// Reads one line including its `\n`; empty string at EOF.
    pub fn line(&mut self) -> String {
        let mut buf = Vec::new();
        self.reader.read_until(b'\n', &mut buf).expect("read line");
        String::from_utf8_lossy(&buf).to_string()
    }

    /// Sends a command line and returns every line up to and including the envelope.
    pub fn cmd(&mut self, line: &str) -> Vec<String> {
        self.send(format!("{line}\n").as_bytes());
        self.until_envelope()
    }

    pub fn until_envelope(&mut self) -> Vec<String> {
        let mut out = Vec::new();
        loop {
            let l = self.line();
            assert!(!l.is_empty(), "connection closed; got so far {out:?}");
            let end = l == "ok \n" || (l.starts_with("error ") && l.ends_with(" \n"));
            out.push(l);
            if end {
                return out;
            }
        }
    }

    pub fn read_to_end(&mut self) -> String {
        let mut s = Vec::new();
        let _ = self.reader.read_to_end(&mut s);
        String::from_utf8_lossy(&s).to_string()
    }
}

/// Raw WebSocket connection for exact-frame assertions.
pub struct RawWs {
    pub ws: WebSocket<TcpStream>,
}

impl RawWs {
    pub fn connect(addr: &str) -> RawWs {
        let stream = TcpStream::connect(addr).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let (ws, _) = tungstenite::client(format!("ws://{addr}/"), stream).expect("handshake");
        RawWs { ws }
    }

    pub fn send(&mut self, text: &str) {
        self.ws.send(Message::Text(text.to_string())).expect("send");
    }

    pub fn frame(&mut self) -> String {
        loop {
            match self.ws.read().expect("read frame") {
                Message::Text(t) => return t,
                Message::Close(_) => panic!("closed"),
                _ => continue,
            }
        }
    }

    /// Frames up to and including the `n`-th envelope.
    pub fn envelopes(&mut self, n: usize) -> Vec<String> {
        let mut out = Vec::new();
        let mut seen = 0;
        while seen < n {
            let f = self.frame();
            if f == "ok \n" || (f.starts_with("error ") && f.ends_with(" \n")) {
                seen += 1;
            }
            out.push(f);
        }
        out
    }

    /// Sends one frame holding one command and returns its frames.
    pub fn cmd(&mut self, text: &str) -> Vec<String> {
        self.send(text);
        self.envelopes(1)
    }
}

/// Polls `f` until it returns true or `timeout` passes.
pub fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// A free loopback port for a node that must know its port before it starts.
pub fn free_port() -> u16 {
    // Below the kernel's ephemeral range (32768 and up): a port chosen here is never handed
    // out meanwhile to some node's port-0 listener or outgoing connection, as a released
    // ephemeral port can be.
    loop {
        let port = 20000 + rand::random::<u16>() % 12000;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// A cluster of nodes on loopback, each with its own data dir and log file.
pub struct TestCluster {
    pub nodes: Vec<Option<Server>>,
    /// Each node's cluster name (its advertised address).
    pub addrs: Vec<String>,
    /// Each node's own TCP address (the proxy's target when names are proxy addresses).
    pub tcp_addrs: Vec<String>,
    pub dirs: Vec<PathBuf>,
    env: Vec<(String, String)>,
    /// The private network the nodes run in, if any.
    lab: Option<Arc<netns::Lab>>,
}

impl TestCluster {
    /// Starts `n` nodes with extra environment and waits for a primary.
    pub fn start(n: usize, env: &[(&str, &str)]) -> TestCluster {
        let addrs: Vec<String> = (0..n)
            .map(|_| format!("127.0.0.1:{}", free_port()))
            .collect();
        TestCluster::launch(addrs.clone(), addrs, env)
    }

    /// Starts `n` nodes whose traffic to each other passes through proxies on `net`.
    pub fn start_proxied(n: usize, net: &Arc<proxy::Net>, env: &[(&str, &str)]) -> TestCluster {
        let names: Vec<String> = (0..n)
            .map(|_| format!("127.0.0.1:{}", free_port()))
            .collect();
        let tcp: Vec<String> = (0..n)
            .map(|_| format!("127.0.0.1:{}", free_port()))
            .collect();
        for (name, target) in names.iter().zip(&tcp) {
            net.proxy(name, name, target);
        }
        TestCluster::launch(names, tcp, env)
    }

    /// Starts `n` nodes, each in its own namespace of `lab` (the calling thread must already be
    /// in the lab's client namespace), and waits for a primary.
    pub fn start_in_lab(n: usize, lab: &Arc<netns::Lab>, env: &[(&str, &str)]) -> TestCluster {
        let addrs: Vec<String> = (0..n).map(|i| format!("{}:3014", lab.ip(i))).collect();
        TestCluster::launch_with(addrs.clone(), addrs, env, Some(Arc::clone(lab)))
    }

    fn launch(addrs: Vec<String>, tcp_addrs: Vec<String>, env: &[(&str, &str)]) -> TestCluster {
        TestCluster::launch_with(addrs, tcp_addrs, env, None)
    }

    fn launch_with(
        addrs: Vec<String>,
        tcp_addrs: Vec<String>,
        env: &[(&str, &str)],
        lab: Option<Arc<netns::Lab>>,
    ) -> TestCluster {
        let n = addrs.len();
        let dirs: Vec<PathBuf> = (0..n).map(|_| temp_dir("cluster")).collect();
        let mut c = TestCluster {
            nodes: (0..n).map(|_| None).collect(),
            addrs,
            tcp_addrs,
            dirs,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            lab,
        };
        for i in 0..n {
            c.start_node(i);
        }
        c.wait_primary(Duration::from_secs(30))
            .expect("a primary is elected");
        c
    }

    /// Starts one more node whose member list names every node so far and itself; returns its
    /// index. The running nodes keep their own configuration.
    pub fn add_node(&mut self) -> usize {
        let addr = match &self.lab {
            Some(lab) => format!("{}:3014", lab.ip(self.addrs.len())),
            None => format!("127.0.0.1:{}", free_port()),
        };
        self.addrs.push(addr.clone());
        self.tcp_addrs.push(addr);
        self.dirs.push(temp_dir("cluster"));
        self.nodes.push(None);
        let i = self.addrs.len() - 1;
        self.start_node(i);
        i
    }

    /// Node `i`'s `cluster-state` line ("" when it does not answer).
    pub fn state_line(&self, i: usize) -> String {
        let Some(n) = &self.nodes[i] else {
            return String::new();
        };
        Client::connect_tcp_timeout(&n.tcp, Duration::from_secs(2))
            .and_then(|mut c| {
                c.auth(ADMIN, ADMIN_PWD)?;
                c.call("cluster-state")
            })
            .ok()
            .and_then(|r| r.messages.into_iter().next())
            .unwrap_or_default()
    }

    /// (Re)starts node `i`.
    pub fn start_node(&mut self, i: usize) {
        let members = self.addrs.join(",");
        let mut env: Vec<(&str, &str)> = vec![
            ("NUN_REPLICATE_ADDR", &members),
            ("NUN_EXTERNAL_ADDR", &self.addrs[i]),
            ("NUN_ELECTION_TIMEOUT", "500"),
            ("NUN_LOG_LEVEL", "info"),
        ];
        for (k, v) in &self.env {
            env.push((k, v));
        }
        let mut cmd = server_command_at(&self.dirs[i], &self.tcp_addrs[i], &env);
        if let Some(lab) = &self.lab {
            lab.place(i, &mut cmd);
        }
        self.nodes[i] = Some(Server::spawn_logged(
            cmd,
            self.dirs[i].clone(),
            self.dirs[i].join("node.log"),
        ));
    }

    /// SIGKILLs node `i`.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut s) = self.nodes[i].take() {
            s.kill9();
        }
    }

    /// The node that says it is primary, if exactly one live node does.
    pub fn primary(&self) -> Option<usize> {
        let mut found = None;
        for (i, n) in self.nodes.iter().enumerate() {
            let Some(n) = n else { continue };
            let Ok(mut c) = Client::connect_tcp_timeout(&n.tcp, Duration::from_secs(2)) else {
                continue;
            };
            if c.auth(ADMIN, ADMIN_PWD).is_err() {
                continue;
            }
            let Ok(r) = c.call("cluster-state") else {
                continue;
            };
            if r.messages
                .first()
                .is_some_and(|m| m.contains(&format!("{}(self):Primary", self.addrs[i])))
            {
                if found.is_some() {
                    return None;
                }
                found = Some(i);
            }
        }
        found
    }

    /// Polls until some node is primary.
    pub fn wait_primary(&self, timeout: Duration) -> Option<usize> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(p) = self.primary() {
                return Some(p);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// A TCP client on node `i`.
    pub fn client(&self, i: usize) -> Client {
        let n = self.nodes[i].as_ref().expect("node is running");
        Client::connect_tcp(&n.tcp).expect("connect")
    }

    /// Every "is primary for term N" line in the node logs, as (node, term).
    pub fn victories(&self) -> Vec<(usize, u64)> {
        let mut out = Vec::new();
        for (i, d) in self.dirs.iter().enumerate() {
            let text = std::fs::read_to_string(d.join("node.log")).unwrap_or_default();
            for line in text.lines() {
                if let Some(rest) = line.split(" is primary for term ").nth(1) {
                    if let Some(t) = rest.split(' ').next().and_then(|t| t.parse().ok()) {
                        out.push((i, t));
                    }
                }
            }
        }
        out
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        for n in self.nodes.iter_mut() {
            if let Some(mut s) = n.take() {
                s.kill9();
            }
        }
        if std::thread::panicking() {
            eprintln!("node data and logs kept for inspection: {:?}", self.dirs);
            return;
        }
        for d in &self.dirs {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

/// NunDB's keys/values layout (on disk `<db>-nun.data.keys`/`.values`, in S3 `nun.keys`/
/// `nun.values`): keys are (u64 key_len, key, i32 version, u64 offset into values), values
/// are (u64 value_len, value, i32 status). `records` are (key, value, version).
pub fn nundb_keys_values(records: &[(&str, &str, i32)]) -> (Vec<u8>, Vec<u8>) {
    let (mut keys, mut values) = (Vec::new(), Vec::new());
    for (key, value, version) in records {
        let offset = values.len() as u64;
        values.extend_from_slice(&(value.len() as u64).to_le_bytes());
        values.extend_from_slice(value.as_bytes());
        values.extend_from_slice(&0i32.to_le_bytes());
        keys.extend_from_slice(&(key.len() as u64).to_le_bytes());
        keys.extend_from_slice(key.as_bytes());
        keys.extend_from_slice(&version.to_le_bytes());
        keys.extend_from_slice(&offset.to_le_bytes());
    }
    (keys, values)
}
