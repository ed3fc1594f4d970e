//! HTTP transport (tiny_http): any method and path; the body holds `;`-separated commands run in
//! a fresh session; the response is one item per command joined by `;`.

use std::io::{self, Read};
use std::net::SocketAddr;
use std::sync::Arc;

use tiny_http::{Header, Request, Response};

use super::Server;
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
                let node = Arc::clone(&server.node);
                if let Err((_, e)) = server.pool.submit(Box::new(move || handle(&node, request))) {
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

fn handle(node: &Arc<Node>, mut request: Request) {
    let max = node.config.max_line;
    let mut body = Vec::new();
    let read = request
        .as_reader()
        .take(max as u64 + 1)
        .read_to_end(&mut body);
    let response = match read {
        Err(e) => text_response(400, format!("error reading body: {e}")),
        Ok(_) if body.len() > max => text_response(413, "line too long".to_string()),
        Ok(_) => match String::from_utf8(body) {
            Ok(text) => text_response(200, run_body(node, &text)),
            Err(_) => text_response(400, "Invalid UTF-8 in command".to_string()),
        },
    };
    let _ = request.respond(response);
}
