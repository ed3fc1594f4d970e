//! Where a replica's records wait in memory: the replication backlog. Recent records are kept
//! exactly as they are in the log, copied one after another into large blocks, so replication
//! streams them without reading files and sends them as they are. A block that falls out of
//! the backlog is emptied and reused for the next records, so a full backlog allocates nothing
//! and touches no new page. While it fills, the next block is allocated and its pages touched
//! ahead by a writer outside the log's locks ([`Backlog::wants_block`], [`new_block`]): a page
//! fault under the lock that orders the log would hold every other writer up.

use std::collections::VecDeque;

use super::record;

/// Largest block: records are copied into blocks of `limit / 16` bytes, at most this much.
const MAX_BLOCK: usize = 1 << 20;
/// Smallest block.
const MIN_BLOCK: usize = 4 << 10;
/// Bytes per page, for touching a new block.
const PAGE: usize = 4096;

/// Records copied back to back, with where each starts.
#[derive(Default)]
struct Block {
    bytes: Vec<u8>,
    /// LSN and offset of each record in `bytes`, in LSN order.
    starts: Vec<(u64, usize)>,
}

impl Block {
    /// The encoded record at index `i`.
    fn record(&self, i: usize) -> &[u8] {
        let start = self.starts[i].1;
        let end = self.starts.get(i + 1).map_or(self.bytes.len(), |s| s.1);
        &self.bytes[start..end]
    }

    /// Empties the block for reuse, keeping its buffers.
    fn emptied(mut self) -> Block {
        self.bytes.clear();
        self.starts.clear();
        self
    }

    /// Memory the block holds (its buffers' capacities).
    fn size(&self) -> usize {
        self.bytes.capacity() + self.starts.capacity() * std::mem::size_of::<(u64, usize)>()
    }
}

/// The most recent records, in LSN order, up to about `limit` bytes.
#[derive(Default)]
pub struct Backlog {
    blocks: VecDeque<Block>,
    /// Memory the blocks hold.
    bytes: usize,
    /// Bytes to keep (0: no backlog).
    limit: usize,
    /// An empty block ready for the next records.
    spare: Option<Block>,
}

/// What [`Backlog::copy_after`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Tail {
    /// `count` records after the requested LSN were copied, the last of them `last` (no
    /// record: `count` 0 and `last` 0).
    Copied {
        /// Records copied.
        count: usize,
        /// LSN of the last record copied.
        last: u64,
    },
    /// The requested LSN is older than the backlog.
    TooOld,
}

/// A block of `size` bytes with every page touched (so copying records into it faults no
/// more), for [`Backlog::give_block`]. Call it outside the log's locks.
pub fn new_block(size: usize) -> Vec<u8> {
    let mut bytes = vec![0u8; size];
    // `vec!` of zeros may map untouched pages; writing one byte per page faults them in now.
    for page in bytes.chunks_mut(PAGE) {
        page[0] = 1;
    }
    bytes.clear();
    bytes
}

impl Backlog {
    /// Starts keeping about `limit` bytes of records (0: none).
    pub fn set_limit(&mut self, limit: usize) {
        self.limit = limit;
    }

    /// True when records are kept.
    pub fn is_enabled(&self) -> bool {
        self.limit > 0
    }

    /// Bytes per block for this limit.
    pub fn block_size(&self) -> usize {
        (self.limit / 16).clamp(MIN_BLOCK, MAX_BLOCK)
    }

    /// True when no spare block waits and the backlog is still growing: a writer should make
    /// one with [`new_block`] outside the locks and hand it over with [`Backlog::give_block`].
    pub fn wants_block(&self) -> bool {
        self.spare.is_none() && self.is_enabled() && self.bytes + self.block_size() <= self.limit
    }

    /// Takes a block made by [`new_block`] as the spare (dropped if one is there already).
    pub fn give_block(&mut self, bytes: Vec<u8>) {
        if self.spare.is_none() {
            self.spare = Some(Block {
                bytes,
                starts: Vec::new(),
            });
        }
    }

    /// Keeps the encoded record `bytes` (LSN `lsn`, after every record kept), dropping the
    /// oldest blocks beyond the limit.
    pub fn push(&mut self, lsn: u64, bytes: &[u8]) {
        let fits = self
            .blocks
            .back()
            .is_some_and(|b| b.bytes.capacity() - b.bytes.len() >= bytes.len());
        if !fits {
            let size = self.block_size().max(bytes.len());
            let block = match self.spare.take() {
                Some(b) if b.bytes.capacity() >= size => b,
                _ => Block {
                    bytes: Vec::with_capacity(size),
                    starts: Vec::new(),
                },
            };
            self.bytes += block.size();
            self.blocks.push_back(block);
            while self.bytes > self.limit && self.blocks.len() > 1 {
                if let Some(old) = self.blocks.pop_front() {
                    self.bytes -= old.size();
                    if self.spare.is_none() && old.bytes.capacity() == self.block_size() {
                        self.spare = Some(old.emptied());
                    }
                }
            }
        }
        if let Some(block) = self.blocks.back_mut() {
            let before = block.size();
            block.starts.push((lsn, block.bytes.len()));
            block.bytes.extend_from_slice(bytes);
            self.bytes = self.bytes + block.size() - before;
        }
    }

    /// Forgets every record (keeps a block as the spare).
    pub fn clear(&mut self) {
        if let Some(block) = self.blocks.pop_back() {
            self.spare.get_or_insert(block.emptied());
        }
        self.blocks.clear();
        self.bytes = 0;
    }

    /// LSN of the oldest record kept.
    pub fn first_lsn(&self) -> Option<u64> {
        self.blocks.front()?.starts.first().map(|s| s.0)
    }

    /// Position (block, record) of the first record with LSN > `after`.
    fn after(&self, after: u64) -> (usize, usize) {
        let block = self
            .blocks
            .partition_point(|b| b.starts.last().is_some_and(|s| s.0 <= after));
        let record = self
            .blocks
            .get(block)
            .map_or(0, |b| b.starts.partition_point(|s| s.0 <= after));
        (block, record)
    }

    /// Appends to `out` the records with `after` < LSN <= `through` (at most `max`), exactly
    /// as they are in the log. `TooOld` when the backlog no longer reaches back to `after`
    /// (`last`: the LSN of the last record appended to the log).
    pub fn copy_after(
        &self,
        after: u64,
        through: u64,
        max: usize,
        last: u64,
        out: &mut Vec<u8>,
    ) -> Tail {
        let missing = match self.first_lsn() {
            Some(first) => first > after.saturating_add(1),
            None => after < last,
        };
        if missing {
            return Tail::TooOld;
        }
        let (mut count, mut copied) = (0, 0);
        let (first_block, first_record) = self.after(after);
        'blocks: for (n, block) in self.blocks.iter().skip(first_block).enumerate() {
            let from = if n == 0 { first_record } else { 0 };
            for i in from..block.starts.len() {
                let lsn = block.starts[i].0;
                if count == max || lsn > through {
                    break 'blocks;
                }
                out.extend_from_slice(block.record(i));
                count += 1;
                copied = lsn;
            }
        }
        Tail::Copied {
            count,
            last: copied,
        }
    }

    /// The term of the record at `lsn`, if it is kept.
    pub fn term_at(&self, lsn: u64) -> Option<u64> {
        let (block, i) = self.after(lsn.checked_sub(1)?);
        let b = self.blocks.get(block)?;
        (b.starts.get(i)?.0 == lsn).then(|| record::position(b.record(i)).1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::record::Record;

    fn encoded(lsn: u64, value_len: usize) -> Vec<u8> {
        let mut r = Record::test_set("k");
        r.lsn = lsn;
        r.term = lsn * 10;
        r.value = "v".repeat(value_len);
        let mut bytes = Vec::new();
        r.encode(&mut bytes);
        bytes
    }

    #[test]
    fn records_cross_blocks_in_order_and_old_blocks_are_reused() {
        let mut b = Backlog::default();
        b.set_limit(64 << 10);
        assert_eq!(b.block_size(), MIN_BLOCK);
        let records: Vec<Vec<u8>> = (1..=2000)
            .map(|lsn| encoded(lsn, (lsn % 97) as usize))
            .collect();
        for (i, r) in records.iter().enumerate() {
            b.push(i as u64 + 1, r);
        }
        // The limit holds (give or take a block), and the oldest records are gone.
        assert!(b.bytes <= (64 << 10) + MIN_BLOCK, "{} bytes kept", b.bytes);
        let first = b.first_lsn().unwrap();
        assert!(first > 1);
        assert_eq!(
            b.copy_after(first - 2, u64::MAX, 10, 2000, &mut Vec::new()),
            Tail::TooOld
        );
        // From any kept position the copy is the records, byte for byte, across blocks.
        for after in [first - 1, first, first + 100, 1990, 2000] {
            let mut out = Vec::new();
            let tail = b.copy_after(after, u64::MAX, usize::MAX, 2000, &mut out);
            let expected: Vec<u8> = records[after as usize..].concat();
            assert_eq!(out, expected, "after {after}");
            let count = 2000 - after as usize;
            let last = if count == 0 { 0 } else { 2000 };
            assert_eq!(tail, Tail::Copied { count, last });
        }
        // `through` and `max` cut the copy.
        let mut out = Vec::new();
        assert_eq!(
            b.copy_after(1500, 1502, 10, 2000, &mut out),
            Tail::Copied {
                count: 2,
                last: 1502
            }
        );
        assert_eq!(out, records[1500..1502].concat());
        out.clear();
        assert_eq!(
            b.copy_after(1500, u64::MAX, 3, 2000, &mut out),
            Tail::Copied {
                count: 3,
                last: 1503
            }
        );
        assert_eq!(b.term_at(1777), Some(17770));
        assert_eq!(b.term_at(first - 1), None);
        assert_eq!(b.term_at(2001), None);
        // A full backlog recycles its blocks: the spare is an emptied old block.
        assert!(b.spare.is_some());
        assert!(!b.wants_block());
    }

    #[test]
    fn a_growing_backlog_asks_for_a_touched_block_and_uses_it() {
        let mut b = Backlog::default();
        assert!(!b.wants_block(), "no backlog, no block");
        b.set_limit(16 << 20);
        assert!(b.wants_block());
        let block = new_block(b.block_size());
        let at = block.as_ptr();
        b.give_block(block);
        assert!(!b.wants_block());
        b.push(1, &encoded(1, 10));
        assert_eq!(
            b.blocks[0].bytes.as_ptr(),
            at,
            "the given block holds the record"
        );
        assert!(
            b.wants_block(),
            "the next one is wanted as soon as this one is taken"
        );
        // A record larger than a block gets a block of its own.
        let big = encoded(2, MAX_BLOCK + 10);
        b.push(2, &big);
        let mut out = Vec::new();
        b.copy_after(1, u64::MAX, 10, 2, &mut out);
        assert_eq!(out, big);
        b.clear();
        assert_eq!(b.first_lsn(), None);
        assert_eq!(
            b.copy_after(2, u64::MAX, 10, 2, &mut Vec::new()),
            Tail::Copied { count: 0, last: 0 }
        );
        assert_eq!(
            b.copy_after(1, u64::MAX, 10, 2, &mut Vec::new()),
            Tail::TooOld
        );
    }
}
