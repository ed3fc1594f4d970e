//! A real S3 API on loopback for tests: moto's server (PyPI `moto[server]`, installed by
//! `make deps`) on a free port, killed by pid on drop. Objects can be put and read directly:
//! moto takes any signature unless started with credential checks, but objects are private to
//! signed-in callers, so reads carry a (dummy) SigV4 header.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running moto server.
pub struct Moto {
    child: Child,
    /// `http://127.0.0.1:<port>`.
    pub url: String,
    /// `127.0.0.1:<port>`.
    pub addr: String,
}

/// One plain HTTP/1.1 request: (status, body).
pub fn http(addr: &str, method: &str, path: &str, body: &[u8]) -> (u16, Vec<u8>) {
    let mut s = TcpStream::connect(addr).expect("connect to moto");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    // Object requests sign in (objects a node stored are private to signed-in callers);
    // creating a bucket goes anonymously, as moto wants.
    let auth = if path.trim_start_matches('/').contains('/') || method == "GET" {
        "Authorization: AWS4-HMAC-SHA256 Credential=test-key/20260101/us-east/s3/aws4_request, SignedHeaders=host, Signature=00\r\n"
    } else {
        ""
    };
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .unwrap();
    s.write_all(body).unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("read answer");
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("headers");
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status");
    let mut body = raw[split + 4..].to_vec();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body = dechunk(&body);
    }
    (status, body)
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(end) = b.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let size =
            usize::from_str_radix(String::from_utf8_lossy(&b[..end]).trim(), 16).unwrap_or(0);
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&b[end + 2..end + 2 + size]);
        b = &b[end + 2 + size + 2..];
    }
}

impl Moto {
    /// Starts moto with extra environment (e.g. `INITIAL_NO_AUTH_ACTION_COUNT=0` to check
    /// credentials) and waits until it answers.
    pub fn start(env: &[(&str, &str)]) -> Moto {
        let port = super::free_port();
        let addr = format!("127.0.0.1:{port}");
        let mut cmd = Command::new("python3");
        cmd.args([
            "-m",
            "moto.server",
            "-H",
            "127.0.0.1",
            "-p",
            &port.to_string(),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd
            .spawn()
            .expect("python3 -m moto.server (make deps installs moto[server])");
        let moto = Moto {
            child,
            url: format!("http://{addr}"),
            addr,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while TcpStream::connect(&moto.addr).is_err() {
            assert!(Instant::now() < deadline, "moto did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        moto
    }

    /// Creates `bucket`.
    pub fn create_bucket(&self, bucket: &str) {
        let (status, body) = http(&self.addr, "PUT", &format!("/{bucket}"), b"");
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    }

    /// Stores an object directly (unsigned).
    pub fn put(&self, bucket: &str, key: &str, bytes: &[u8]) {
        let (status, body) = http(&self.addr, "PUT", &format!("/{bucket}/{key}"), bytes);
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    }

    /// An object's bytes, if it exists.
    pub fn get(&self, bucket: &str, key: &str) -> Option<Vec<u8>> {
        let (status, body) = http(&self.addr, "GET", &format!("/{bucket}/{key}"), b"");
        (status == 200).then_some(body)
    }

    /// Keys of every object in `bucket`, sorted.
    pub fn keys(&self, bucket: &str) -> Vec<String> {
        let (status, body) = http(&self.addr, "GET", &format!("/{bucket}?list-type=2"), b"");
        assert_eq!(status, 200);
        let text = String::from_utf8_lossy(&body).to_string();
        let mut keys: Vec<String> = text
            .split("<Key>")
            .skip(1)
            .filter_map(|p| p.split("</Key>").next())
            .map(str::to_string)
            .collect();
        keys.sort();
        keys
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
