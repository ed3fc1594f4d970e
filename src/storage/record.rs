//! One operation-log record and its byte format:
//! `len u32 LE | crc32 u32 LE | payload` where payload =
//! `lsn u64 | term u64 | op u8 | db (u16 len + bytes) | key (u32 len + bytes) | version i32 | value (u32 len + bytes)`.
//! The CRC covers the payload; a record is only trusted when its CRC matches.

/// What a record does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Key takes `value` at `version` (set, set-safe, increment, users, permissions…).
    Set = 1,
    /// Key removed at `version`.
    Remove = 2,
    /// Database created; `value` holds its strategy name.
    CreateDb = 3,
    /// Database deleted.
    DeleteDb = 4,
    /// No data change: a new primary's first record of its term, so it can commit the records
    /// it inherited from earlier terms (a term's majority-acked own record commits its prefix).
    /// `value` holds the primary's member list (comma-separated; empty in older logs).
    TermStart = 5,
    /// The cluster's member list becomes `value` (comma-separated) once this record commits:
    /// one `join` or `leave`, committed by a majority of the list before it.
    Members = 6,
}

impl Op {
    fn from_u8(b: u8) -> Option<Op> {
        match b {
            1 => Some(Op::Set),
            2 => Some(Op::Remove),
            3 => Some(Op::CreateDb),
            4 => Some(Op::DeleteDb),
            5 => Some(Op::TermStart),
            6 => Some(Op::Members),
            _ => None,
        }
    }
}

/// A logged change, as applied (values and versions are final, so replay is deterministic).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Log sequence number: strictly increasing, never a timestamp.
    pub lsn: u64,
    /// Election term of the primary that wrote it.
    pub term: u64,
    /// The operation.
    pub op: Op,
    /// Database name.
    pub db: String,
    /// Key (empty for database operations).
    pub key: String,
    /// Resulting version.
    pub version: i32,
    /// Resulting value (strategy name for `CreateDb`, member list for `Members`).
    pub value: String,
}

/// Bytes before the payload.
pub const HEADER: usize = 8;

impl Record {
    /// A record about the cluster rather than a key (`TermStart`, `Members`), carrying `value`.
    pub fn cluster(op: Op, value: String) -> Record {
        Record {
            lsn: 0,
            term: 0,
            op,
            db: String::new(),
            key: String::new(),
            version: 0,
            value,
        }
    }

    /// Appends the encoded record (header with length and CRC, then the payload) to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        self.as_ref().encode(self.lsn, self.term, out);
    }

    /// The record with its fields borrowed, as [`view`] reads it.
    pub fn viewed(&self) -> Viewed<'_> {
        Viewed {
            lsn: self.lsn,
            term: self.term,
            fields: self.as_ref(),
        }
    }

    /// The record's fields, borrowed.
    pub fn as_ref(&self) -> RecordRef<'_> {
        RecordRef {
            op: self.op,
            db: &self.db,
            key: &self.key,
            version: self.version,
            value: &self.value,
        }
    }

    /// Encoded size.
    pub fn encoded_len(&self) -> usize {
        HEADER + 8 + 8 + 1 + 2 + self.db.len() + 4 + self.key.len() + 4 + 4 + self.value.len()
    }
}

/// A record's fields before it has an LSN, borrowed from the write that makes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordRef<'a> {
    /// The operation.
    pub op: Op,
    /// Database name.
    pub db: &'a str,
    /// Key (empty for database operations).
    pub key: &'a str,
    /// Resulting version.
    pub version: i32,
    /// Resulting value (strategy name for `CreateDb`).
    pub value: &'a str,
}

impl RecordRef<'_> {
    /// Appends the record with `lsn` and `term` (header with length and CRC, then the payload).
    pub fn encode(&self, lsn: u64, term: u64, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&[0u8; HEADER]);
        out.extend_from_slice(&lsn.to_le_bytes());
        out.extend_from_slice(&term.to_le_bytes());
        out.push(self.op as u8);
        let db = self.db.as_bytes();
        out.extend_from_slice(&(db.len().min(u16::MAX as usize) as u16).to_le_bytes());
        out.extend_from_slice(&db[..db.len().min(u16::MAX as usize)]);
        out.extend_from_slice(&(self.key.len() as u32).to_le_bytes());
        out.extend_from_slice(self.key.as_bytes());
        out.extend_from_slice(&self.version.to_le_bytes());
        out.extend_from_slice(&(self.value.len() as u32).to_le_bytes());
        out.extend_from_slice(self.value.as_bytes());
        let payload_len = (out.len() - start - HEADER) as u32;
        let crc = crc32fast::hash(&out[start + HEADER..]);
        out[start..start + 4].copy_from_slice(&payload_len.to_le_bytes());
        out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    }

    /// An owned record with `lsn` and `term`.
    pub fn to_owned(&self, lsn: u64, term: u64) -> Record {
        Record {
            lsn,
            term,
            op: self.op,
            db: self.db.to_string(),
            key: self.key.to_string(),
            version: self.version,
            value: self.value.to_string(),
        }
    }
}

/// Result of decoding the record at the start of a buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded<R = Record> {
    /// A valid record and its total encoded length.
    Record(R, usize),
    /// The buffer ends before the record does (a torn tail, or simply the end).
    Incomplete,
    /// The record is complete but its checksum or contents are wrong.
    Corrupt(String),
}

/// A valid record read in place: its position and its fields, borrowed from the buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Viewed<'a> {
    /// Its log sequence number.
    pub lsn: u64,
    /// Its term.
    pub term: u64,
    /// Its fields.
    pub fields: RecordRef<'a>,
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let s = self.buf.get(self.pos..end)?;
        self.pos = end;
        Some(s)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Option<u64> {
        self.take(8).map(|b| {
            let mut a = [0u8; 8];
            a.copy_from_slice(b);
            u64::from_le_bytes(a)
        })
    }
    fn str(&mut self, n: usize) -> Option<&'a str> {
        std::str::from_utf8(self.take(n)?).ok()
    }
}

/// Reads the record at the start of `buf` in place, checking its length, checksum and fields.
pub fn view(buf: &[u8]) -> Decoded<Viewed<'_>> {
    if buf.len() < HEADER {
        return Decoded::Incomplete;
    }
    let len = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    let crc = u32::from_le_bytes([buf[4], buf[5], buf[6], buf[7]]);
    let Some(payload) = buf.get(HEADER..HEADER + len) else {
        return Decoded::Incomplete;
    };
    if crc32fast::hash(payload) != crc {
        return Decoded::Corrupt("checksum mismatch".into());
    }
    let mut c = Cursor {
        buf: payload,
        pos: 0,
    };
    let parsed = (|| {
        let lsn = c.u64()?;
        let term = c.u64()?;
        let op = Op::from_u8(c.u8()?)?;
        let db_len = c.u16()? as usize;
        let db = c.str(db_len)?;
        let key_len = c.u32()? as usize;
        let key = c.str(key_len)?;
        let version = c.u32()? as i32;
        let value_len = c.u32()? as usize;
        let value = c.str(value_len)?;
        (c.pos == payload.len()).then_some(Viewed {
            lsn,
            term,
            fields: RecordRef {
                op,
                db,
                key,
                version,
                value,
            },
        })
    })();
    match parsed {
        Some(v) => Decoded::Record(v, HEADER + len),
        None => Decoded::Corrupt("malformed record".into()),
    }
}

/// Decodes the record at the start of `buf` into an owned [`Record`].
pub fn decode(buf: &[u8]) -> Decoded {
    match view(buf) {
        Decoded::Record(v, len) => Decoded::Record(v.fields.to_owned(v.lsn, v.term), len),
        Decoded::Incomplete => Decoded::Incomplete,
        Decoded::Corrupt(why) => Decoded::Corrupt(why),
    }
}

/// The LSN and term of an encoded record already checked by [`view`] (read from its payload's
/// first two fields); zeros when `bytes` is too short to hold them.
pub fn position(bytes: &[u8]) -> (u64, u64) {
    let field = |at: usize| {
        bytes
            .get(at..at + 8)
            .and_then(|b| b.try_into().ok())
            .map_or(0, u64::from_le_bytes)
    };
    (field(HEADER), field(HEADER + 8))
}

/// Records for tests.
#[cfg(test)]
impl Record {
    /// An unnumbered `set` of `key` to `v` in database `d`.
    pub fn test_set(key: &str) -> Record {
        Record {
            lsn: 0,
            term: 0,
            op: Op::Set,
            db: "d".into(),
            key: key.into(),
            version: 0,
            value: "v".into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Record {
        Record {
            lsn: 42,
            term: 3,
            op: Op::Set,
            db: "db".into(),
            key: "k ü".into(),
            version: -1,
            value: "a; b\nc".into(),
        }
    }

    #[test]
    fn round_trip() {
        let mut buf = Vec::new();
        sample().encode(&mut buf);
        assert_eq!(buf.len(), sample().encoded_len());
        assert_eq!(decode(&buf), Decoded::Record(sample(), buf.len()));
        assert_eq!(position(&buf), (42, 3));
        let Decoded::Record(v, len) = view(&buf) else {
            panic!("the record reads in place");
        };
        assert_eq!(
            (v.lsn, v.term, v.fields, len),
            (42, 3, sample().as_ref(), buf.len())
        );
    }

    #[test]
    fn torn_and_corrupt() {
        let mut buf = Vec::new();
        sample().encode(&mut buf);
        assert_eq!(decode(&buf[..buf.len() - 1]), Decoded::Incomplete);
        assert_eq!(decode(&buf[..3]), Decoded::Incomplete);
        let mut bad = buf.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert!(matches!(decode(&bad), Decoded::Corrupt(_)));
    }
}
