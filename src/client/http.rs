//! A minimal HTTP/1.1 POST over a plain TCP socket, for `nun-db exec` against the HTTP transport.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use super::{ClientError, DEFAULT_TIMEOUT};

/// Splits `http://host[:port][/path]` into (`host:port`, `/path`).
fn parse_url(url: &str) -> Result<(String, String), ClientError> {
    let rest = url.strip_prefix("http://").ok_or_else(|| {
        ClientError::Protocol(format!(
            "unsupported URL `{url}`: expected http://host:port"
        ))
    })?;
    let (host, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if host.is_empty() {
        return Err(ClientError::Protocol(format!("URL `{url}` has no host")));
    }
    let host = if host.contains(':') {
        host.to_string()
    } else {
        format!("{host}:80")
    };
    Ok((host, path.to_string()))
}

/// POSTs `body` to `url` and returns the response body; non-200 answers are errors.
pub fn post(url: &str, body: &str) -> Result<String, ClientError> {
    Connected::open(url)?.post(body)
}

/// An HTTP connection made, before anything is sent on it.
pub struct Connected {
    stream: TcpStream,
    host: String,
    path: String,
}

impl Connected {
    /// Connects to the server at `url`; an error here means nothing was sent.
    pub fn open(url: &str) -> Result<Connected, ClientError> {
        let (host, path) = parse_url(url)?;
        let stream = TcpStream::connect(&host)?;
        stream.set_read_timeout(Some(DEFAULT_TIMEOUT))?;
        stream.set_write_timeout(Some(Duration::from_secs(30)))?;
        Ok(Connected { stream, host, path })
    }

    /// Sends `body` as a POST and returns the response body; non-200 answers are errors.
    pub fn post(self, body: &str) -> Result<String, ClientError> {
        let Connected {
            mut stream,
            host,
            path,
        } = self;
        exchange(&mut stream, &host, &path, body)
    }
}

fn exchange(
    stream: &mut TcpStream,
    host: &str,
    path: &str,
    body: &str,
) -> Result<String, ClientError> {
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes())?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| ClientError::Protocol("malformed HTTP response".into()))?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| ClientError::Protocol("malformed HTTP status line".into()))?;
    if status != 200 {
        return Err(ClientError::Server(format!("HTTP {status}: {body}")));
    }
    Ok(body.to_string())
}

#[cfg(test)]
mod tests {
    use super::parse_url;

    #[test]
    fn urls() {
        assert_eq!(
            parse_url("http://localhost:3013").unwrap(),
            ("localhost:3013".to_string(), "/".to_string())
        );
        assert_eq!(
            parse_url("http://h/x").unwrap(),
            ("h:80".to_string(), "/x".to_string())
        );
        assert!(parse_url("https://h").is_err());
        assert!(parse_url("http://").is_err());
    }
}
