//! A database's keys as its map holds them: a key of up to [`INLINE`] bytes is stored inside
//! the map's node, so a lookup compares bytes it already has in cache instead of following a
//! pointer per comparison (and a short key costs no allocation of its own); longer keys live
//! on the heap. Ordered, compared and borrowed exactly as `str`, so the map is still searched
//! with `&str` and iterated in key order.

use std::borrow::Borrow;
use std::cmp::Ordering;
use std::fmt;
use std::ops::Deref;

/// Longest key kept inline: the key then takes 24 bytes, like a `String`.
pub const INLINE: usize = 22;

/// A key of a database's map.
#[derive(Clone)]
pub enum Key {
    /// `bytes[..len]` hold the key (always whole UTF-8: copied from a `str`).
    Inline { len: u8, bytes: [u8; INLINE] },
    /// A key longer than [`INLINE`] bytes.
    Heap(Box<str>),
}

impl Key {
    /// The key's text.
    #[inline]
    pub fn as_str(&self) -> &str {
        match self {
            Key::Inline { len, bytes } => {
                let bytes = &bytes[..usize::from(*len)];
                // SAFETY: an inline key's bytes were copied whole from a `str` (`From<&str>`),
                // so they are valid UTF-8.
                unsafe { std::str::from_utf8_unchecked(bytes) }
            }
            Key::Heap(s) => s,
        }
    }
}

impl From<&str> for Key {
    fn from(s: &str) -> Key {
        if s.len() <= INLINE {
            let mut bytes = [0u8; INLINE];
            bytes[..s.len()].copy_from_slice(s.as_bytes());
            Key::Inline {
                len: s.len() as u8,
                bytes,
            }
        } else {
            Key::Heap(Box::from(s))
        }
    }
}

impl From<String> for Key {
    fn from(s: String) -> Key {
        if s.len() <= INLINE {
            Key::from(s.as_str())
        } else {
            Key::Heap(s.into_boxed_str())
        }
    }
}

impl Deref for Key {
    type Target = str;

    #[inline]
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl Borrow<str> for Key {
    #[inline]
    fn borrow(&self) -> &str {
        self.as_str()
    }
}

impl PartialEq for Key {
    fn eq(&self, other: &Key) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for Key {}

impl PartialOrd for Key {
    fn partial_cmp(&self, other: &Key) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Key {
    #[inline]
    fn cmp(&self, other: &Key) -> Ordering {
        self.as_str().cmp(other.as_str())
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn keys_order_and_read_back_like_str_whatever_their_length() {
        let texts = [
            "",
            "a",
            "é",
            "key:0001",
            "exactly-twenty-two-by",
            "exactly-twenty-two-byt",
            "exactly-twenty-two-byte",
            "a much longer key that lives on the heap",
            "ключ-на-кириллице-длинный",
        ];
        let mut map = BTreeMap::new();
        for t in texts {
            let k = Key::from(t);
            assert_eq!(&*k, t);
            assert_eq!(Key::from(t.to_string()), k);
            assert_eq!(matches!(k, Key::Inline { .. }), t.len() <= INLINE, "{t:?}");
            map.insert(k, t.len());
        }
        let mut sorted = texts.to_vec();
        sorted.sort();
        assert_eq!(map.keys().map(|k| k.as_str()).collect::<Vec<_>>(), sorted);
        for t in texts {
            assert_eq!(map.get(t), Some(&t.len()));
        }
        assert_eq!(map.get("exactly-twenty-two-b"), None);
        assert_eq!(std::mem::size_of::<Key>(), 24);
    }
}
