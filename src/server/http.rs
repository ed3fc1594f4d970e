//! HTTP/1.1 transport, served like the other transports: the accept loop and connection
//! ceiling of [`super`], a worker thread per connection, requests parsed with httparse from the
//! connection's own buffer. `GET /metrics` is the Prometheus exposition and `GET /` with no body
//! the web console; any other request (any method and path, as NunDB) runs the `;`-separated
//! commands of its body in a fresh session and answers one item per command joined by `;`.
//!
//! Every request must arrive whole within the HTTP timeout of the moment the connection starts
//! waiting for it (`NUN_HTTP_TIMEOUT`): a client that sends nothing, trickles its headers a byte
//! at a time, or stalls in its body is answered `408` and disconnected. (tiny_http, used before,
//! had no such deadline, and its accept thread stopped for good on the first failed accept.)

use std::io::Write;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::conn::Conn;
use super::{prometheus, Server};
use crate::db::outbox::Outbox;
use crate::exec::{self, Session};
use crate::node::Node;
use crate::protocol::{split_commands, Outcome};

/// Response bytes after which the remaining commands of a body are refused.
const MAX_RESPONSE: usize = 64 * 1024 * 1024;

/// The longest request head (request line and headers) accepted.
const MAX_HEAD: usize = 64 * 1024;

/// The console page (one file, no external resources); `{{WS_PORT}}` becomes the node's
/// WebSocket port.
const CONSOLE: &str = include_str!("console.html");

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

/// One parsed request.
struct Request {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// The connection stays open after the answer.
    keep_alive: bool,
}

impl Request {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// An answer: status, content type, extra headers, body.
struct Response {
    status: u16,
    content_type: &'static str,
    headers: Vec<(&'static str, &'static str)>,
    body: String,
}

impl Response {
    fn text(status: u16, body: impl Into<String>) -> Response {
        Response {
            status,
            content_type: "text/plain; charset=utf-8",
            headers: Vec::new(),
            body: body.into(),
        }
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        408 => "Request Timeout",
        411 => "Length Required",
        413 => "Payload Too Large",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Error",
    }
}

/// The bytes of `response` (`head_only` for HEAD requests: no body, same length).
fn encode(response: &Response, keep_alive: bool, head_only: bool) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nAccess-Control-Allow-Origin: *\r\nConnection: {}\r\n",
        response.status,
        reason(response.status),
        response.content_type,
        response.body.len(),
        if keep_alive { "keep-alive" } else { "close" }
    );
    for (k, v) in &response.headers {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    out.push_str("\r\n");
    let mut bytes = out.into_bytes();
    if !head_only {
        bytes.extend_from_slice(response.body.as_bytes());
    }
    bytes
}

/// The refusal a client past the connection ceiling gets.
pub fn too_many() -> Vec<u8> {
    encode(&Response::text(503, "too many connections"), false, false)
}

/// Why no request could be read.
enum ReadError {
    /// The client left (or the socket failed) between requests: nothing to answer.
    Gone,
    /// Answer this, then close.
    Answer(Response),
}

/// Reads bytes until `need` are buffered or `deadline` passes.
fn fill_until(conn: &mut Conn, need: usize, deadline: Instant) -> Result<bool, ReadError> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(ReadError::Answer(Response::text(
            408,
            "request took too long",
        )));
    }
    let _ = conn.stream.set_read_timeout(Some(left));
    match conn.fill(need) {
        Ok(more) => Ok(more),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            Err(ReadError::Answer(Response::text(
                408,
                "request took too long",
            )))
        }
        Err(_) => Err(ReadError::Gone),
    }
}

/// Reads one whole request (head and body) that must arrive before `deadline`.
fn read_request(conn: &mut Conn, max_body: usize, deadline: Instant) -> Result<Request, ReadError> {
    let (head_len, mut request, length, chunked) = loop {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut parsed = httparse::Request::new(&mut headers);
        match parsed.parse(conn.data()) {
            Ok(httparse::Status::Complete(len)) => {
                let keep_alive = {
                    let connection = parsed
                        .headers
                        .iter()
                        .find(|h| h.name.eq_ignore_ascii_case("connection"))
                        .map(|h| String::from_utf8_lossy(h.value).to_ascii_lowercase());
                    match parsed.version {
                        Some(1) => !connection.as_deref().is_some_and(|c| c.contains("close")),
                        _ => connection
                            .as_deref()
                            .is_some_and(|c| c.contains("keep-alive")),
                    }
                };
                let headers: Vec<(String, String)> = parsed
                    .headers
                    .iter()
                    .map(|h| {
                        (
                            h.name.to_string(),
                            String::from_utf8_lossy(h.value).trim().to_string(),
                        )
                    })
                    .collect();
                let request = Request {
                    method: parsed.method.unwrap_or("GET").to_string(),
                    path: parsed.path.unwrap_or("/").to_string(),
                    headers,
                    body: Vec::new(),
                    keep_alive,
                };
                let chunked = request
                    .header("transfer-encoding")
                    .is_some_and(|t| t.to_ascii_lowercase().contains("chunked"));
                let length = match request.header("content-length") {
                    Some(v) => Some(v.parse::<usize>().map_err(|_| {
                        ReadError::Answer(Response::text(400, "bad Content-Length"))
                    })?),
                    None => None,
                };
                break (len, request, length, chunked);
            }
            Ok(httparse::Status::Partial) if conn.data().len() < MAX_HEAD => {
                if !fill_until(conn, conn.data().len() + 1, deadline)? {
                    return Err(ReadError::Gone);
                }
            }
            Ok(httparse::Status::Partial) => {
                return Err(ReadError::Answer(Response::text(
                    431,
                    "request head too large",
                )))
            }
            Err(e) => {
                return Err(ReadError::Answer(Response::text(
                    400,
                    format!("bad request: {e}"),
                )))
            }
        }
    };
    conn.consume(head_len);
    if chunked {
        request.body = read_chunked(conn, max_body, deadline)?;
    } else if let Some(len) = length {
        if len > max_body {
            return Err(ReadError::Answer(Response::text(413, "line too long")));
        }
        while conn.data().len() < len {
            if !fill_until(conn, len, deadline)? {
                return Err(ReadError::Gone);
            }
        }
        request.body = conn.data()[..len].to_vec();
        conn.consume(len);
    }
    Ok(request)
}

/// Reads a chunked body (RFC 9112 §7.1; extensions and trailers are skipped).
fn read_chunked(conn: &mut Conn, max_body: usize, deadline: Instant) -> Result<Vec<u8>, ReadError> {
    let bad = || ReadError::Answer(Response::text(400, "bad chunked body"));
    let mut body = Vec::new();
    loop {
        let line_end = loop {
            if let Some(i) = conn.data().windows(2).position(|w| w == b"\r\n") {
                break i;
            }
            if conn.data().len() > 1024 {
                return Err(bad());
            }
            if !fill_until(conn, conn.data().len() + 1, deadline)? {
                return Err(ReadError::Gone);
            }
        };
        let size_text = String::from_utf8_lossy(&conn.data()[..line_end]).to_string();
        let size_text = size_text.split(';').next().unwrap_or("").trim().to_string();
        let size = usize::from_str_radix(&size_text, 16).map_err(|_| bad())?;
        conn.consume(line_end + 2);
        if size == 0 {
            // Trailers end with an empty line.
            loop {
                while !conn.data().windows(2).any(|w| w == b"\r\n") {
                    if !fill_until(conn, conn.data().len() + 1, deadline)? {
                        return Err(ReadError::Gone);
                    }
                }
                let end = conn
                    .data()
                    .windows(2)
                    .position(|w| w == b"\r\n")
                    .unwrap_or(0);
                conn.consume(end + 2);
                if end == 0 {
                    return Ok(body);
                }
            }
        }
        if body.len() + size > max_body {
            return Err(ReadError::Answer(Response::text(413, "line too long")));
        }
        while conn.data().len() < size + 2 {
            if !fill_until(conn, size + 2, deadline)? {
                return Err(ReadError::Gone);
            }
        }
        body.extend_from_slice(&conn.data()[..size]);
        conn.consume(size + 2);
    }
}

/// True when `request` may read the metrics: no token configured, or the right bearer token.
fn metrics_allowed(server: &Server, request: &Request) -> bool {
    let Some(token) = &server.node.config.metrics_token else {
        return true;
    };
    request
        .header("authorization")
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|given| crate::db::security::ct_eq(given.trim().as_bytes(), token.as_bytes()))
}

/// What the node answers to `request`.
fn answer(server: &Arc<Server>, request: &Request) -> Response {
    let node = &server.node;
    let page = matches!(request.method.as_str(), "GET" | "HEAD") && request.body.is_empty();
    let path = request.path.split('?').next().unwrap_or("/");
    if page && path == "/metrics" {
        if !metrics_allowed(server, request) {
            let mut denied = Response::text(401, "metrics need a bearer token");
            denied.headers.push(("WWW-Authenticate", "Bearer"));
            return denied;
        }
        return Response {
            status: 200,
            content_type: prometheus::CONTENT_TYPE,
            headers: Vec::new(),
            body: prometheus::render(server),
        };
    }
    if page && (path == "/" || path == "/console") {
        let port = server.ws_bound.get().map_or(0, |a| a.port());
        return Response {
            status: 200,
            content_type: "text/html; charset=utf-8",
            headers: Vec::new(),
            body: CONSOLE.replace("{{WS_PORT}}", &port.to_string()),
        };
    }
    match std::str::from_utf8(&request.body) {
        Ok(text) => Response::text(200, run_body(node, text)),
        Err(_) => Response::text(400, "Invalid UTF-8 in command"),
    }
}

/// After an early answer (a body too large, a bad request) the client may still be sending:
/// closing at once would reset the connection and lose the answer, so what it sends is read
/// and dropped until it stops (or `timeout` passes).
fn linger(conn: &Conn, timeout: Duration) {
    let _ = conn.stream.shutdown(std::net::Shutdown::Write);
    let deadline = Instant::now() + timeout;
    let mut sink = [0u8; 16 * 1024];
    while let Some(left) =
        Some(deadline.saturating_duration_since(Instant::now())).filter(|l| !l.is_zero())
    {
        let _ = conn.stream.set_read_timeout(Some(left));
        match std::io::Read::read(&mut &*conn.stream, &mut sink) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

/// Serves one HTTP connection: requests one after another (keep-alive) until the client closes,
/// asks to close, or is too slow.
pub fn serve(server: &Arc<Server>, conn: Conn) {
    let mut conn = conn;
    conn.idles = false;
    let timeout = server.node.config.http_timeout;
    let _ = conn
        .stream
        .set_write_timeout(Some(timeout.max(Duration::from_secs(1))));
    loop {
        let deadline = Instant::now() + timeout;
        let request = match read_request(&mut conn, server.node.config.max_line, deadline) {
            Ok(r) => r,
            Err(ReadError::Gone) => return,
            Err(ReadError::Answer(response)) => {
                let _ = (&*conn.stream).write_all(&encode(&response, false, false));
                linger(&conn, timeout);
                return;
            }
        };
        server.open_http.fetch_add(1, Ordering::Relaxed);
        let response = answer(server, &request);
        server.open_http.fetch_sub(1, Ordering::Relaxed);
        let bytes = encode(&response, request.keep_alive, request.method == "HEAD");
        if (&*conn.stream).write_all(&bytes).is_err() || !request.keep_alive {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses_have_length_type_and_connection() {
        let r = Response::text(200, "value 1");
        let text = String::from_utf8(encode(&r, true, false)).unwrap();
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
        assert!(text.contains("Content-Length: 7\r\n"));
        assert!(text.contains("Connection: keep-alive\r\n"));
        assert!(text.ends_with("\r\n\r\nvalue 1"));
        let head = String::from_utf8(encode(&r, false, true)).unwrap();
        assert!(head.ends_with("Connection: close\r\n\r\n"), "{head}");
        assert!(String::from_utf8(too_many())
            .unwrap()
            .starts_with("HTTP/1.1 503 "));
    }
}
