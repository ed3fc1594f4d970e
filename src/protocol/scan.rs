//! Byte scans on the per-command path, written so the compiler turns them into vector compares
//! (32 bytes per step, no branch per byte): the end of a line in the TCP input, and line breaks
//! inside a command.

/// Bytes per block.
const BLOCK: usize = 32;

/// True when some byte of `block` is `a` or `b`.
#[inline]
fn block_has(block: &[u8], a: u8, b: u8) -> bool {
    let mut hit = 0u8;
    for &x in block {
        hit |= u8::from(x == a) | u8::from(x == b);
    }
    hit != 0
}

/// Bit `i` set when byte `i` of the (32-byte) `block` is `byte`.
#[inline]
fn block_mask(block: &[u8], byte: u8) -> u32 {
    let mut mask = 0u32;
    for (i, &x) in block.iter().enumerate().take(BLOCK) {
        mask |= u32::from(x == byte) << i;
    }
    mask
}

/// Position of the first `\n` in `bytes`.
pub fn find_newline(bytes: &[u8]) -> Option<usize> {
    let mut blocks = bytes.chunks_exact(BLOCK);
    let mut start = 0;
    for block in &mut blocks {
        let mask = block_mask(block, b'\n');
        if mask != 0 {
            return Some(start + mask.trailing_zeros() as usize);
        }
        start += BLOCK;
    }
    let mask = block_mask(&padded(blocks.remainder()), b'\n');
    (mask != 0).then(|| start + mask.trailing_zeros() as usize)
}

/// The last, partial block copied into a whole one, zero-filled: zeros match neither byte
/// searched for, and one vector compare beats a byte loop over up to 31 bytes.
#[inline]
fn padded(tail: &[u8]) -> [u8; BLOCK] {
    let mut block = [0u8; BLOCK];
    block[..tail.len()].copy_from_slice(tail);
    block
}

/// True when `bytes` hold a `\n` or `\r`.
pub fn has_line_break(bytes: &[u8]) -> bool {
    let mut blocks = bytes.chunks_exact(BLOCK);
    for block in &mut blocks {
        if block_has(block, b'\n', b'\r') {
            return true;
        }
    }
    block_has(&padded(blocks.remainder()), b'\n', b'\r')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scans_agree_with_a_byte_by_byte_search_at_every_position_and_length() {
        for len in 0..100 {
            for at in 0..=len {
                let mut bytes = vec![b'x'; len];
                if at < len {
                    bytes[at] = b'\n';
                }
                let expected = bytes.iter().position(|&b| b == b'\n');
                assert_eq!(find_newline(&bytes), expected, "len {len} at {at}");
                assert_eq!(has_line_break(&bytes), expected.is_some());
                if at < len {
                    bytes[at] = b'\r';
                    assert_eq!(find_newline(&bytes), None);
                    assert!(has_line_break(&bytes));
                }
            }
        }
        assert_eq!(find_newline(b"a\nb\n"), Some(1));
    }
}
