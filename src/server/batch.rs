//! A session's batch: the replies of commands received together, answered with one durability
//! wait and one socket write. A reply that can no longer change (its command logged nothing and
//! no reply before it waits for the log) is encoded at once, so a pipelined read frees its
//! strings before the next command runs instead of holding them until the batch is answered
//! (sixteen held replies overflowed the allocator's per-thread cache on every batch).

use crate::exec::{self, Session};
use crate::protocol::{Framing, Outcome};

/// Bytes reserved when the first reply of a batch is encoded (under 1,024, the allocator's
/// per-thread cache still serves it).
const FIRST_RESERVE: usize = 1000;

/// Replies of the commands run since the last answer.
#[derive(Debug)]
pub struct Batch {
    framing: Framing,
    /// Encoded replies of the leading commands whose answer is final.
    encoded: Vec<u8>,
    /// The replies after them, in order: the first of these waits for the log.
    waiting: Vec<Outcome>,
    /// Reply bytes so far (encoded, and estimated for the waiting ones).
    bytes: usize,
    /// Commands in the batch.
    count: usize,
}

/// Appends `outcome` framed for `framing`.
fn encode(framing: Framing, outcome: &Outcome, out: &mut Vec<u8>) {
    match framing {
        Framing::Lines => outcome.write_lines(out),
        Framing::WebSocket => outcome.write_frames(out),
    }
}

impl Batch {
    /// An empty batch for a transport's framing.
    pub fn new(framing: Framing) -> Batch {
        Batch {
            framing,
            encoded: Vec::new(),
            waiting: Vec::new(),
            bytes: 0,
            count: 0,
        }
    }

    /// Adds a command's reply.
    pub fn push(&mut self, outcome: Outcome) {
        self.count += 1;
        if self.waiting.is_empty() && outcome.lsn == 0 && outcome.takeover.is_none() {
            if self.encoded.capacity() == 0 {
                self.encoded.reserve(FIRST_RESERVE);
            }
            let before = self.encoded.len();
            encode(self.framing, &outcome, &mut self.encoded);
            self.bytes += self.encoded.len() - before;
        } else {
            self.bytes += outcome.size();
            self.waiting.push(outcome);
        }
    }

    /// Commands in the batch.
    pub fn len(&self) -> usize {
        self.count
    }

    /// True when no command ran since the last answer.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Reply bytes in the batch (estimated for replies not encoded yet).
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Makes the batch's changes durable (and committed, in a cluster) and sends its replies
    /// ([`exec::acknowledge_and_reply`]); empties the batch. False when the session closed.
    pub fn answer(&mut self, session: &Session) -> bool {
        session.batch_answered();
        if self.is_empty() {
            return true;
        }
        let framing = self.framing;
        let mut bytes = std::mem::take(&mut self.encoded);
        let more = self.bytes.saturating_sub(bytes.len()) + 16 * self.waiting.len();
        let ok = exec::acknowledge_and_reply(session, &mut self.waiting, move |outcomes| {
            bytes.reserve_exact(more);
            for outcome in outcomes {
                encode(framing, outcome, &mut bytes);
            }
            bytes
        });
        self.waiting.clear();
        self.bytes = 0;
        self.count = 0;
        ok
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(value: &str) -> Outcome {
        Outcome::message(format!("value {value}"))
    }

    #[test]
    fn only_replies_before_the_first_logged_write_are_encoded_at_once() {
        let mut batch = Batch::new(Framing::Lines);
        batch.push(read("1"));
        batch.push(Outcome::error("Invalid key"));
        assert_eq!(batch.encoded, b"value 1\nok \nerror Invalid key \n");
        assert!(batch.waiting.is_empty());
        // A write's reply waits for the log, and so does every reply after it (order).
        batch.push(Outcome::written(7));
        batch.push(read("2"));
        assert_eq!(batch.waiting.len(), 2);
        assert_eq!(batch.waiting[1].messages, ["value 2"]);
        assert_eq!(batch.len(), 4);
        assert_eq!(
            batch.bytes(),
            batch.encoded.len() + Outcome::written(7).size() + read("2").size()
        );
    }

    #[test]
    fn websocket_replies_are_framed_as_they_would_be_at_the_answer() {
        let mut batch = Batch::new(Framing::WebSocket);
        batch.push(read("1"));
        let mut expected = Vec::new();
        read("1").write_frames(&mut expected);
        assert_eq!(batch.encoded, expected);
    }
}
