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

/// Position of the first `\n` in `bytes`.
pub fn find_newline(bytes: &[u8]) -> Option<usize> {
    let mut start = 0;
    for block in bytes.chunks(BLOCK) {
        if block.len() < BLOCK || block_has(block, b'\n', b'\n') {
            if let Some(i) = block.iter().position(|&x| x == b'\n') {
                return Some(start + i);
            }
        }
        start += block.len();
    }
    None
}

/// True when `bytes` hold a `\n` or `\r`.
pub fn has_line_break(bytes: &[u8]) -> bool {
    let mut blocks = bytes.chunks_exact(BLOCK);
    for block in &mut blocks {
        if block_has(block, b'\n', b'\r') {
            return true;
        }
    }
    blocks.remainder().iter().any(|&x| x == b'\n' || x == b'\r')
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
