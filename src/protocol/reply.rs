//! Replies: the messages a command produces and its envelope, rendered per transport.

use super::wire::{ws_frame_parts, OP_TEXT};

/// The success envelope, exactly as NunDB sends it.
pub const OK: &str = "ok \n";
/// The start of a failure envelope: `error <message> \n`.
pub const ERROR_PREFIX: &str = "error ";

/// What one command produced: output messages (without `\n`) and the envelope result.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Outcome {
    /// Messages sent before the envelope, e.g. `value 1`.
    pub messages: Vec<String>,
    /// `None` for `ok`, `Some(msg)` for `error <msg>`.
    pub error: Option<String>,
    /// Operation-log LSN that must be durable before this reply is sent (0: none).
    pub lsn: u64,
    /// The connection stops being a command session (replication stream).
    pub takeover: Option<Takeover>,
}

/// A command that turns its connection into something else.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Takeover {
    /// Stream log records after `after` (whose term was `after_term`) to secondary `node`.
    Replicate {
        /// Last LSN the secondary has.
        after: u64,
        /// Term of that record on the secondary.
        after_term: u64,
        /// The secondary's name.
        node: String,
    },
}

impl Outcome {
    /// Success that acknowledges the log record `lsn`.
    pub fn written(lsn: u64) -> Outcome {
        Outcome {
            lsn,
            ..Outcome::default()
        }
    }

    /// Success with no output.
    pub fn ok() -> Outcome {
        Outcome::default()
    }

    /// Success with one output message.
    pub fn message(msg: impl Into<String>) -> Outcome {
        Outcome {
            messages: vec![msg.into()],
            ..Outcome::default()
        }
    }

    /// Failure with no output.
    pub fn error(msg: impl Into<String>) -> Outcome {
        Outcome {
            error: Some(msg.into()),
            ..Outcome::default()
        }
    }

    /// Approximate bytes of the rendered reply.
    pub fn size(&self) -> usize {
        self.messages.iter().map(|m| m.len() + 1).sum::<usize>()
            + self.error.as_ref().map_or(4, |e| e.len() + 8)
    }

    /// The wire messages for stream transports (TCP, WebSocket): each output then the envelope.
    pub fn wire_messages(&self) -> Vec<String> {
        let mut out: Vec<String> = self.messages.iter().map(|m| format!("{m}\n")).collect();
        out.push(match &self.error {
            None => OK.to_string(),
            Some(e) => format!("{ERROR_PREFIX}{e} \n"),
        });
        out
    }

    /// The messages for the line-framed TCP transport: as [`Outcome::wire_messages`], but a
    /// message never contains an inner newline (NunDB's `error permission denied\n \n` becomes
    /// `error permission denied \n`), so one line is always one message.
    pub fn line_messages(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .messages
            .iter()
            .map(|m| format!("{}\n", m.replace('\n', " ")))
            .collect();
        out.push(match &self.error {
            None => OK.to_string(),
            Some(e) => format!("{ERROR_PREFIX}{} \n", e.trim_end().replace('\n', " ")),
        });
        out
    }

    /// Appends [`Outcome::line_messages`] to `out`, without building them first.
    pub fn write_lines(&self, out: &mut Vec<u8>) {
        for m in &self.messages {
            let start = out.len();
            out.extend_from_slice(m.as_bytes());
            for b in &mut out[start..] {
                if *b == b'\n' {
                    *b = b' ';
                }
            }
            out.push(b'\n');
        }
        match &self.error {
            None => out.extend_from_slice(OK.as_bytes()),
            Some(e) => {
                let start = out.len();
                out.extend_from_slice(ERROR_PREFIX.as_bytes());
                out.extend_from_slice(e.trim_end().as_bytes());
                for b in &mut out[start..] {
                    if *b == b'\n' {
                        *b = b' ';
                    }
                }
                out.extend_from_slice(b" \n");
            }
        }
    }

    /// Appends [`Outcome::wire_messages`] to `out` as WebSocket text frames, one per message.
    pub fn write_frames(&self, out: &mut Vec<u8>) {
        for m in &self.messages {
            ws_frame_parts(OP_TEXT, &[m.as_bytes(), b"\n"], out);
        }
        match &self.error {
            None => ws_frame_parts(OP_TEXT, &[OK.as_bytes()], out),
            Some(e) => ws_frame_parts(
                OP_TEXT,
                &[ERROR_PREFIX.as_bytes(), e.as_bytes(), b" \n"],
                out,
            ),
        }
    }

    /// The single HTTP item: first output message, else `empty`; for an error the bare message.
    pub fn http_item(&self) -> String {
        match &self.error {
            Some(e) => e.trim_end().to_string(),
            None => self
                .messages
                .first()
                .map(|m| m.trim_end().to_string())
                .unwrap_or_else(|| "empty".to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelopes() {
        assert_eq!(Outcome::ok().wire_messages(), vec!["ok \n"]);
        assert_eq!(
            Outcome::message("value 1").wire_messages(),
            vec!["value 1\n", "ok \n"]
        );
        assert_eq!(
            Outcome::error("Invalid token").wire_messages(),
            vec!["error Invalid token \n"]
        );
        let denied = Outcome {
            messages: vec!["permission denied".into()],
            error: Some("permission denied\n".into()),
            ..Outcome::default()
        };
        assert_eq!(
            denied.wire_messages(),
            vec!["permission denied\n", "error permission denied\n \n"]
        );
        assert_eq!(denied.http_item(), "permission denied");
        assert_eq!(
            denied.line_messages(),
            vec!["permission denied\n", "error permission denied \n"]
        );
        assert_eq!(Outcome::ok().http_item(), "empty");
    }

    #[test]
    fn written_replies_match_the_messages() {
        let outcomes = [
            Outcome::ok(),
            Outcome::message("value a\nb"),
            Outcome::error("Invalid token"),
            Outcome {
                messages: vec!["permission denied".into()],
                error: Some("permission denied\n".into()),
                ..Outcome::default()
            },
        ];
        for o in &outcomes {
            let mut lines = Vec::new();
            o.write_lines(&mut lines);
            assert_eq!(
                String::from_utf8(lines).unwrap(),
                o.line_messages().concat()
            );
            let mut frames = Vec::new();
            o.write_frames(&mut frames);
            let mut expected = Vec::new();
            for m in o.wire_messages() {
                crate::protocol::Framing::WebSocket.encode(m.as_bytes(), &mut expected);
            }
            assert_eq!(frames, expected);
        }
    }
}
