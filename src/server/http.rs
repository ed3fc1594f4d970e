//! HTTP transport (tiny_http). `GET /metrics` is the Prometheus exposition, `GET /` with no
//! body the web console; any other request (any method and path, as NunDB) runs the
//! `;`-separated commands of its body in a fresh session and answers one item per command
//! joined by `;`.

use std::io::{self, Read};
use std::net::SocketAddr;
use std::sync::Arc;

use std::sync::atomic::Ordering;

use tiny_http::{Header, Method, Request, Response};

use super::{prometheus, Server};
use crate::db::outbox::Outbox;
use crate::exec::{self, Session};
use crate::node::Node;
use crate::protocol::{split_commands, Outcome};

/// Response bytes after which the remaining commands of a body are refused.
const MAX_RESPONSE: usize = 64 * 1024 * 1024;

/// Binds the HTTP listener and starts the thread that hands each request to a worker, so a
/// client that is slow to send its body holds up nobody else.
pub fn listen(server: &Arc<Server>) -> io::Result<SocketAddr> {
    let http = tiny_http::Server::http(&server.node.config.http_addr).map_err(io::Error::other)?;
    let addr = http
        .server_addr()
        .to_ip()
        .ok_or_else(|| io::Error::other("http listener has no IP address"))?;
    let server = Arc::clone(server);
    std::thread::Builder::new()
        .name("http-accept".into())
        .spawn(move || {
            while let Ok(request) = http.recv() {
                let worker = Arc::clone(&server);
                if let Err((_, e)) = server
                    .pool
                    .submit(Box::new(move || handle(&worker, request)))
                {
                    log::error!("cannot start a thread for an HTTP request: {e}");
                }
            }
        })?;
    Ok(addr)
}

fn text_response(status: u16, body: String) -> Response<io::Cursor<Vec<u8>>> {
    let mut response = Response::from_string(body).with_status_code(status);
    if let Ok(h) = Header::from_bytes(&b"Content-Type"[..], &b"text/plain; charset=utf-8"[..]) {
        response = response.with_header(h);
    }
    if let Ok(h) = Header::from_bytes(&b"Access-Control-Allow-Origin"[..], &b"*"[..]) {
        response = response.with_header(h);
    }
    response
}

/// Runs every command of `body` in a fresh session and joins the reply items with `;`.
pub fn run_body(node: &Arc<Node>, body: &str) -> String {
    let mut session = Session::new(node, Outbox::discard());
    let mut outcomes = Vec::new();
    let mut bytes = 0;
    for command in split_commands(body) {
        if bytes > MAX_RESPONSE {
            // Only the first message of each reply is kept, but those can still be huge.
            outcomes.push(Outcome::error(
                "Response too large; send fewer commands per request",
            ));
            continue;
        }
        let mut outcome = exec::execute_line(&mut session, command);
        outcome.messages.truncate(1);
        bytes += outcome.size();
        outcomes.push(outcome);
    }
    exec::acknowledge(node, &mut outcomes);
    outcomes
        .iter()
        .map(|o| o.http_item())
        .collect::<Vec<_>>()
        .join(";")
}

/// The console page (one file, no external resources); `{{WS_PORT}}` becomes the node's
/// WebSocket port.
const CONSOLE: &str = include_str!("console.html");

fn typed_response(status: u16, body: String, content_type: &str) -> Response<io::Cursor<Vec<u8>>> {
    let mut response = Response::from_string(body).with_status_code(status);
    if let Ok(h) = Header::from_bytes(&b"Content-Type"[..], content_type.as_bytes()) {
        response = response.with_header(h);
    }
    response
}

/// True when `request` may read the metrics: no token configured, or the right bearer token.
fn metrics_allowed(server: &Server, request: &Request) -> bool {
    let Some(token) = &server.node.config.metrics_token else {
        return true;
    };
    request.headers().iter().any(|h| {
        h.field.equiv("Authorization")
            && h.value
                .as_str()
                .strip_prefix("Bearer ")
                .is_some_and(|given| {
                    crate::db::security::ct_eq(given.trim().as_bytes(), token.as_bytes())
                })
    })
}

fn handle(server: &Arc<Server>, mut request: Request) {
    server.open_http.fetch_add(1, Ordering::Relaxed);
    let node = &server.node;
    let max = node.config.max_line;
    let mut body = Vec::new();
    let read = request
        .as_reader()
        .take(max as u64 + 1)
        .read_to_end(&mut body);
    let page = matches!(request.method(), Method::Get | Method::Head) && body.is_empty();
    let path = request.url().split('?').next().unwrap_or("/").to_string();
    let response = match read {
        Err(e) => text_response(400, format!("error reading body: {e}")),
        Ok(_) if page && path == "/metrics" => {
            if metrics_allowed(server, &request) {
                typed_response(200, prometheus::render(server), prometheus::CONTENT_TYPE)
            } else {
                let mut denied = text_response(401, "metrics need a bearer token".to_string());
                if let Ok(h) = Header::from_bytes(&b"WWW-Authenticate"[..], &b"Bearer"[..]) {
                    denied = denied.with_header(h);
                }
                denied
            }
        }
        Ok(_) if page && (path == "/" || path == "/console") => {
            let port = server.ws_bound.get().map_or(0, |a| a.port());
            typed_response(
                200,
                CONSOLE.replace("{{WS_PORT}}", &port.to_string()),
                "text/html; charset=utf-8",
            )
        }
        Ok(_) if body.len() > max => text_response(413, "line too long".to_string()),
        Ok(_) => match String::from_utf8(body) {
            Ok(text) => text_response(200, run_body(node, &text)),
            Err(_) => text_response(400, "Invalid UTF-8 in command".to_string()),
        },
    };
    let _ = request.respond(response);
    server.open_http.fetch_sub(1, Ordering::Relaxed);
}
