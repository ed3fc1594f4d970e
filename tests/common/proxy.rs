//! A fault-injecting TCP proxy for partition tests. Every node advertises a proxy address as
//! its cluster name, so all traffic between nodes passes through a [`Net`]. A connection's
//! source node is read from its first command (`repl-sync`, `election`, `victory` and `fwd`
//! all name the sender); [`Net::isolate`] then refuses and cuts every connection to or from one
//! node, in both directions, until [`Net::heal`].

use std::io::{BufRead, BufReader, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

/// One live proxied connection: (source node, destination node, both sockets).
type Link = (Option<String>, String, TcpStream, TcpStream);

/// The simulated network between cluster nodes.
#[derive(Default)]
pub struct Net {
    isolated: Mutex<Option<String>>,
    links: Mutex<Vec<Link>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The node named by an inter-node command line, if it names one.
fn sender(line: &str) -> Option<String> {
    let w: Vec<&str> = line.split_whitespace().collect();
    match w.first().copied()? {
        "repl-sync" => w.get(3),
        "election" | "victory" => w.get(2),
        "fwd" => w.get(1),
        _ => None,
    }
    .map(|s| s.to_string())
}

impl Net {
    /// A network with every link up.
    pub fn new() -> Arc<Net> {
        Arc::new(Net::default())
    }

    fn blocked(&self, src: Option<&str>, dst: &str) -> bool {
        match lock(&self.isolated).as_deref() {
            Some(cut) => cut == dst || src == Some(cut),
            None => false,
        }
    }

    /// Cuts `node` off from every other node (existing connections are closed).
    pub fn isolate(&self, node: &str) {
        *lock(&self.isolated) = Some(node.to_string());
        lock(&self.links).retain(|(src, dst, a, b)| {
            let cut = dst == node || src.as_deref() == Some(node);
            if cut {
                let _ = a.shutdown(Shutdown::Both);
                let _ = b.shutdown(Shutdown::Both);
            }
            !cut
        });
    }

    /// Restores every link.
    pub fn heal(&self) {
        *lock(&self.isolated) = None;
    }

    /// Listens on `listen` and forwards connections to node `name`, reachable at `target`.
    pub fn proxy(self: &Arc<Self>, listen: &str, name: &str, target: &str) {
        let listener = TcpListener::bind(listen).expect("bind proxy");
        let net = Arc::clone(self);
        let name = name.to_string();
        let target = target.to_string();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                let net = Arc::clone(&net);
                let (name, target) = (name.clone(), target.clone());
                std::thread::spawn(move || net.serve(client, &name, &target));
            }
        });
    }

    fn serve(&self, client: TcpStream, dst: &str, target: &str) {
        if self.blocked(None, dst) {
            let _ = client.shutdown(Shutdown::Both);
            return;
        }
        let Ok(mut server) = TcpStream::connect(target) else {
            let _ = client.shutdown(Shutdown::Both);
            return;
        };
        let _ = server.set_nodelay(true);
        let _ = client.set_nodelay(true);
        let (Ok(read_half), Ok(mut server_read), Ok(mut client_write)) =
            (client.try_clone(), server.try_clone(), client.try_clone())
        else {
            return;
        };
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut server_read, &mut client_write);
            let _ = client_write.shutdown(Shutdown::Both);
        });
        // Lines pass through one by one (`auth` waits for its answer) until one names the sender.
        let mut reader = BufReader::new(read_half);
        let mut src = None;
        for _ in 0..4 {
            let mut line = String::new();
            if matches!(reader.read_line(&mut line), Ok(0) | Err(_)) {
                let _ = server.shutdown(Shutdown::Both);
                return;
            }
            let named = !line.starts_with("auth ");
            if named {
                src = sender(&line);
                if self.blocked(src.as_deref(), dst) {
                    let _ = client.shutdown(Shutdown::Both);
                    let _ = server.shutdown(Shutdown::Both);
                    return;
                }
            }
            if server.write_all(line.as_bytes()).is_err() {
                let _ = client.shutdown(Shutdown::Both);
                return;
            }
            if named {
                break;
            }
        }
        let (Ok(c2), Ok(s2)) = (client.try_clone(), server.try_clone()) else {
            return;
        };
        {
            let mut links = lock(&self.links);
            // Checked under the lock, so an isolation that started meanwhile applies.
            if self.blocked(src.as_deref(), dst) {
                let _ = client.shutdown(Shutdown::Both);
                let _ = server.shutdown(Shutdown::Both);
                return;
            }
            links.push((src, dst.to_string(), c2, s2));
        }
        let _ = std::io::copy(&mut reader, &mut server);
        let _ = server.shutdown(Shutdown::Both);
    }
}
