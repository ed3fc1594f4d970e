//! Bytes on the wire, without I/O: how a message is framed for each transport (a line on TCP, a
//! text frame on WebSocket), the WebSocket frame decoder for client frames (RFC 6455) and the
//! upgrade handshake. Pure functions over buffers, so they are safe on any input and fuzzable.

/// How a transport frames each message it sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// Messages are sent as they are (each already ends in `\n`): TCP and anything line based.
    Lines,
    /// Each message is one unmasked WebSocket text frame (server to client).
    WebSocket,
}

impl Framing {
    /// Appends `message` framed for this transport to `out`.
    pub fn encode(self, message: &[u8], out: &mut Vec<u8>) {
        match self {
            Framing::Lines => out.extend_from_slice(message),
            Framing::WebSocket => ws_frame(OP_TEXT, message, out),
        }
    }

    /// Bytes [`Framing::encode`] adds to a message of `len` bytes.
    pub fn overhead(self, len: usize) -> usize {
        match self {
            Framing::Lines => 0,
            Framing::WebSocket if len < 126 => 2,
            Framing::WebSocket if len <= 0xFFFF => 4,
            Framing::WebSocket => 10,
        }
    }
}

/// Continuation frame opcode.
pub const OP_CONTINUATION: u8 = 0x0;
/// Text frame opcode.
pub const OP_TEXT: u8 = 0x1;
/// Binary frame opcode.
pub const OP_BINARY: u8 = 0x2;
/// Close frame opcode.
pub const OP_CLOSE: u8 = 0x8;
/// Ping frame opcode.
pub const OP_PING: u8 = 0x9;
/// Pong frame opcode.
pub const OP_PONG: u8 = 0xA;

/// Close code: the peer broke the protocol.
pub const CLOSE_PROTOCOL_ERROR: u16 = 1002;
/// Close code: a message was larger than allowed.
pub const CLOSE_TOO_BIG: u16 = 1009;
/// Close code: the server is overloaded; try again later.
pub const CLOSE_TRY_AGAIN_LATER: u16 = 1013;

/// Appends one complete, unmasked server frame with `opcode` and `payload` to `out`.
pub fn ws_frame(opcode: u8, payload: &[u8], out: &mut Vec<u8>) {
    ws_frame_parts(opcode, &[payload], out);
}

/// [`ws_frame`] of a payload given in pieces (no copy to join them first).
pub fn ws_frame_parts(opcode: u8, parts: &[&[u8]], out: &mut Vec<u8>) {
    out.push(0x80 | opcode);
    let len: usize = parts.iter().map(|p| p.len()).sum();
    if len < 126 {
        out.push(len as u8);
    } else if len <= 0xFFFF {
        out.push(126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    for p in parts {
        out.extend_from_slice(p);
    }
}

/// Appends a close frame with `code` and a `reason` (cut to fit a control frame) to `out`.
pub fn ws_close_frame(code: u16, reason: &str, out: &mut Vec<u8>) {
    let mut payload = code.to_be_bytes().to_vec();
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    payload.extend_from_slice(&reason.as_bytes()[..end]);
    ws_frame(OP_CLOSE, &payload, out);
}

/// One decoded client frame; its payload (already unmasked) is `buf[payload]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameRef {
    /// Last frame of its message.
    pub fin: bool,
    /// Frame opcode.
    pub opcode: u8,
    /// Where the payload sits in the buffer given to [`decode_frame`].
    pub payload: std::ops::Range<usize>,
    /// Bytes of the buffer this frame used (header and payload).
    pub len: usize,
}

/// Why a client frame was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameError {
    /// Not a valid client frame; the connection must be closed with `1002`.
    Protocol(&'static str),
    /// Larger than the limit (the whole frame must be refused, `1009`).
    TooBig(u64),
}

/// What [`decode_frame`] found at the start of the buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoded {
    /// A whole frame, unmasked in place.
    Frame(FrameRef),
    /// Not enough bytes yet: at least this many are needed in all.
    Need(usize),
}

/// Decodes the client frame at the start of `buf`, unmasking its payload in place. Payloads
/// longer than `max` are refused before they are read.
pub fn decode_frame(buf: &mut [u8], max: usize) -> Result<Decoded, FrameError> {
    if buf.len() < 2 {
        return Ok(Decoded::Need(2));
    }
    let (b0, b1) = (buf[0], buf[1]);
    if b0 & 0x70 != 0 {
        return Err(FrameError::Protocol("reserved bits set"));
    }
    let fin = b0 & 0x80 != 0;
    let opcode = b0 & 0x0F;
    let control = opcode & 0x8 != 0;
    match opcode {
        OP_CONTINUATION | OP_TEXT | OP_BINARY | OP_CLOSE | OP_PING | OP_PONG => {}
        _ => return Err(FrameError::Protocol("unknown opcode")),
    }
    if b1 & 0x80 == 0 {
        return Err(FrameError::Protocol("client frames must be masked"));
    }
    let (len, mut at) = match b1 & 0x7F {
        126 => {
            if buf.len() < 4 {
                return Ok(Decoded::Need(4));
            }
            (u16::from_be_bytes([buf[2], buf[3]]) as u64, 4)
        }
        127 => {
            if buf.len() < 10 {
                return Ok(Decoded::Need(10));
            }
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[2..10]);
            (u64::from_be_bytes(b), 10)
        }
        n => (n as u64, 2),
    };
    if control && (len > 125 || !fin) {
        return Err(FrameError::Protocol("invalid control frame"));
    }
    if len > max as u64 {
        return Err(FrameError::TooBig(len));
    }
    let len = len as usize;
    let total = at + 4 + len;
    if buf.len() < total {
        return Ok(Decoded::Need(total));
    }
    let mask = [buf[at], buf[at + 1], buf[at + 2], buf[at + 3]];
    at += 4;
    unmask(&mut buf[at..total], mask);
    Ok(Decoded::Frame(FrameRef {
        fin,
        opcode,
        payload: at..total,
        len: total,
    }))
}

/// XORs `payload` with the repeated 4-byte `mask`, eight bytes at a time (a byte loop was 5%
/// of the server under pipelined WebSocket sets).
fn unmask(payload: &mut [u8], mask: [u8; 4]) {
    let word = u64::from_ne_bytes([
        mask[0], mask[1], mask[2], mask[3], mask[0], mask[1], mask[2], mask[3],
    ]);
    let mut chunks = payload.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(chunk);
        chunk.copy_from_slice(&(u64::from_ne_bytes(bytes) ^ word).to_ne_bytes());
    }
    // The tail starts at a multiple of 8, so the mask lines up from its first byte again.
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= mask[i & 3];
    }
}

/// Result of looking at the bytes of an HTTP upgrade request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Handshake {
    /// The request is not complete yet.
    Partial,
    /// A valid upgrade: send `response`; the request used the first `len` bytes.
    Accept {
        /// The `101 Switching Protocols` response.
        response: Vec<u8>,
        /// Bytes of the request (frames may follow them).
        len: usize,
    },
    /// Not a WebSocket upgrade: send `response` (a 400) and close.
    Reject {
        /// The error response.
        response: Vec<u8>,
    },
}

/// Parses a client's upgrade request at the start of `buf` and builds the answer.
pub fn handshake(buf: &[u8]) -> Handshake {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Handshake::Partial,
        Err(e) => return reject(&format!("bad request: {e}")),
    };
    if req.method != Some("GET") {
        return reject("WebSocket upgrade must be a GET");
    }
    let header = |name: &str| {
        req.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value)
    };
    let has_token = |name: &str, token: &str| {
        header(name).is_some_and(|v| {
            String::from_utf8_lossy(v)
                .split(',')
                .any(|t| t.trim().eq_ignore_ascii_case(token))
        })
    };
    if !has_token("Upgrade", "websocket") || !has_token("Connection", "upgrade") {
        return reject("this port speaks WebSocket only (Upgrade: websocket expected)");
    }
    if header("Sec-WebSocket-Version").map(|v| v.trim_ascii()) != Some(b"13") {
        return Handshake::Reject {
            response: b"HTTP/1.1 426 Upgrade Required\r\nSec-WebSocket-Version: 13\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_vec(),
        };
    }
    let Some(key) = header("Sec-WebSocket-Key").map(|k| k.trim_ascii()) else {
        return reject("Sec-WebSocket-Key missing");
    };
    let response = format!(
        "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Accept: {}\r\n\r\n",
        accept_key(key)
    );
    Handshake::Accept {
        response: response.into_bytes(),
        len,
    }
}

/// `Sec-WebSocket-Accept` for a client's `Sec-WebSocket-Key`.
pub fn accept_key(key: &[u8]) -> String {
    tungstenite::handshake::derive_accept_key(key)
}

fn reject(why: &str) -> Handshake {
    Handshake::Reject {
        response: format!(
            "HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{why}",
            why.len()
        )
        .into_bytes(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client_frame(opcode: u8, fin: bool, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        ws_frame(opcode, payload, &mut out);
        if !fin {
            out[0] &= 0x7F;
        }
        let mask = [1u8, 2, 3, 4];
        let header_len = out.len() - payload.len();
        out[1] |= 0x80;
        let mut framed = out[..header_len].to_vec();
        framed.extend_from_slice(&mask);
        framed.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i & 3]));
        framed
    }

    #[test]
    fn frames_round_trip_at_every_length_class() {
        for len in [0usize, 5, 125, 126, 300, 65535, 65536, 70000] {
            let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let mut buf = client_frame(OP_TEXT, true, &payload);
            buf.extend_from_slice(b"next");
            let Ok(Decoded::Frame(f)) = decode_frame(&mut buf, 1 << 20) else {
                panic!("no frame for {len}");
            };
            assert!(f.fin);
            assert_eq!(f.opcode, OP_TEXT);
            assert_eq!(&buf[f.payload.clone()], &payload[..]);
            assert_eq!(&buf[f.len..], b"next");
        }
    }

    #[test]
    fn unmasking_by_words_matches_the_byte_rule_at_every_length() {
        let mask = [0x12u8, 0x34, 0x56, 0x78];
        for len in 0..=40usize {
            let plain: Vec<u8> = (0..len).map(|i| (i * 7 + 1) as u8).collect();
            let mut payload: Vec<u8> = plain
                .iter()
                .enumerate()
                .map(|(i, b)| b ^ mask[i % 4])
                .collect();
            unmask(&mut payload, mask);
            assert_eq!(payload, plain, "length {len}");
        }
    }

    #[test]
    fn partial_frames_ask_for_more_and_limits_hold() {
        let mut buf = client_frame(OP_TEXT, true, b"hello world");
        for cut in 0..buf.len() {
            match decode_frame(&mut buf[..cut].to_vec(), 100) {
                Ok(Decoded::Need(n)) => assert!(n > cut),
                other => panic!("cut {cut}: {other:?}"),
            }
        }
        assert_eq!(
            decode_frame(&mut buf, 5),
            Err(FrameError::TooBig(11)),
            "over the limit"
        );
        let mut unmasked = Vec::new();
        ws_frame(OP_TEXT, b"x", &mut unmasked);
        assert!(matches!(
            decode_frame(&mut unmasked, 100),
            Err(FrameError::Protocol(_))
        ));
        let mut ping = client_frame(OP_PING, false, b"p");
        assert!(matches!(
            decode_frame(&mut ping, 100),
            Err(FrameError::Protocol(_))
        ));
    }

    #[test]
    fn handshake_answers_the_rfc_example() {
        let req = b"GET /chat HTTP/1.1\r\nHost: server.example.com\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\nrest";
        match handshake(req) {
            Handshake::Accept { response, len } => {
                let text = String::from_utf8(response).unwrap();
                assert!(text.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"));
                assert_eq!(&req[len..], b"rest");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(handshake(&req[..20]), Handshake::Partial);
        assert!(matches!(
            handshake(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
            Handshake::Reject { .. }
        ));
    }

    #[test]
    fn websocket_framing_encodes_each_message_as_a_text_frame() {
        let mut out = Vec::new();
        Framing::WebSocket.encode(b"ok \n", &mut out);
        assert_eq!(out, b"\x81\x04ok \n");
        assert_eq!(Framing::WebSocket.overhead(4), 2);
        let mut close = Vec::new();
        ws_close_frame(CLOSE_TRY_AGAIN_LATER, "too many connections", &mut close);
        assert_eq!(&close[..4], &[0x88, 22, 0x03, 0xF5]);
    }
}
