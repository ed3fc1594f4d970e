//! Boxes whose values share pages with the other values of their [`Pool`]. A watch fan-out
//! visits the outbox of every watcher, one socket write between visits; each write leaves the
//! next outbox's page cold, and on the bench machine a cold page costs about as much as a
//! tenth of the write itself. Allocated by the general allocator, every outbox sits on a page
//! of its own, among its session's buffers; packed here, a few dozen share one.

use std::alloc::{self, Layout};
use std::marker::PhantomData;
use std::ops::Deref;
use std::ptr::NonNull;
use std::sync::Mutex;

/// Values per chunk: a chunk is one allocation holding this many slots side by side.
const SLOTS: usize = 32;

/// One allocation of [`SLOTS`] slots and the list of those not in use.
struct Chunk<T> {
    slots: NonNull<T>,
    free: Vec<usize>,
}

// SAFETY: a chunk only hands out its slots' addresses; the values in them are reached through
// `Packed<T>`, whose own Send/Sync bounds apply.
unsafe impl<T: Send> Send for Chunk<T> {}

impl<T> Chunk<T> {
    fn layout() -> Layout {
        // A zero-sized T still gets distinct one-byte slots.
        Layout::array::<T>(SLOTS)
            .and_then(|l| l.align_to(64))
            .unwrap_or(Layout::new::<u8>())
            .pad_to_align()
    }

    fn new() -> Option<Chunk<T>> {
        let layout = Chunk::<T>::layout();
        if layout.size() == 0 {
            return None;
        }
        // SAFETY: the layout has a non-zero size (checked above).
        let slots = NonNull::new(unsafe { alloc::alloc(layout) }.cast::<T>())?;
        Some(Chunk {
            slots,
            free: (0..SLOTS).rev().collect(),
        })
    }

    fn contains(&self, slot: NonNull<T>) -> bool {
        let start = self.slots.as_ptr() as usize;
        let at = slot.as_ptr() as usize;
        at >= start && at < start + SLOTS * std::mem::size_of::<T>().max(1)
    }
}

impl<T> Drop for Chunk<T> {
    fn drop(&mut self) {
        // SAFETY: `slots` came from `alloc` with this layout; the pool drops a chunk only once
        // every slot is free again, so no value lives in it.
        unsafe { alloc::dealloc(self.slots.as_ptr().cast::<u8>(), Chunk::<T>::layout()) };
    }
}

/// Where [`Packed`] values of one type live: chunks of slots, each freed once it is empty.
pub struct Pool<T> {
    chunks: Mutex<Vec<Chunk<T>>>,
    _values: PhantomData<T>,
}

impl<T> Pool<T> {
    /// An empty pool (usable as a `static`).
    pub const fn new() -> Pool<T> {
        Pool {
            chunks: Mutex::new(Vec::new()),
            _values: PhantomData,
        }
    }

    /// Chunks allocated now.
    pub fn chunks(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Chunk<T>>> {
        self.chunks.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A free slot, from the newest chunk that has one (so values made together sit together).
    fn take(&self) -> Option<NonNull<T>> {
        let mut chunks = self.lock();
        if chunks.last().is_none_or(|c| c.free.is_empty()) {
            match chunks.iter().position(|c| !c.free.is_empty()) {
                // Keep the chunk with room last, where the next allocations look first.
                Some(i) => {
                    let last = chunks.len() - 1;
                    chunks.swap(i, last);
                }
                None => chunks.push(Chunk::new()?),
            }
        }
        let chunk = chunks.last_mut()?;
        let i = chunk.free.pop()?;
        // SAFETY: i < SLOTS, inside the chunk's allocation.
        Some(unsafe { chunk.slots.add(i) })
    }

    /// Gives `slot` back; frees its chunk when that was its last value.
    fn give_back(&self, slot: NonNull<T>) {
        let mut chunks = self.lock();
        if let Some(at) = chunks.iter().position(|c| c.contains(slot)) {
            let chunk = &mut chunks[at];
            let i = (slot.as_ptr() as usize - chunk.slots.as_ptr() as usize)
                / std::mem::size_of::<T>().max(1);
            chunk.free.push(i);
            if chunk.free.len() == SLOTS {
                chunks.swap_remove(at);
            }
        }
    }
}

impl<T> Default for Pool<T> {
    fn default() -> Self {
        Pool::new()
    }
}

/// A value owned like a `Box`, stored in a [`Pool`] beside others of its kind.
pub struct Packed<T: 'static> {
    value: NonNull<T>,
    pool: &'static Pool<T>,
    /// Set when the allocator had no memory for a chunk: the value is in its own `Box`.
    boxed: bool,
}

// SAFETY: Packed owns its T exactly as Box<T> does.
unsafe impl<T: Send> Send for Packed<T> {}
// SAFETY: as above; shared access only hands out &T.
unsafe impl<T: Sync> Sync for Packed<T> {}

impl<T> Packed<T> {
    /// Moves `value` into a slot of `pool`.
    pub fn new(pool: &'static Pool<T>, value: T) -> Packed<T> {
        match pool.take() {
            Some(slot) => {
                // SAFETY: the slot is free, aligned for T and inside a live chunk.
                unsafe { slot.as_ptr().write(value) };
                Packed {
                    value: slot,
                    pool,
                    boxed: false,
                }
            }
            None => Packed {
                value: NonNull::from(Box::leak(Box::new(value))),
                pool,
                boxed: true,
            },
        }
    }

    /// The value's address: stable for as long as this box lives.
    pub fn as_ptr(&self) -> *const T {
        self.value.as_ptr()
    }
}

impl<T> Deref for Packed<T> {
    type Target = T;

    fn deref(&self) -> &T {
        // SAFETY: the slot holds a live T until this box drops.
        unsafe { self.value.as_ref() }
    }
}

impl<T> Drop for Packed<T> {
    fn drop(&mut self) {
        if self.boxed {
            // SAFETY: made by Box::leak in `new`, dropped once here.
            drop(unsafe { Box::from_raw(self.value.as_ptr()) });
            return;
        }
        // SAFETY: the slot holds a live T that nothing else will read after this.
        unsafe { self.value.as_ptr().drop_in_place() };
        self.pool.give_back(self.value);
    }
}

impl<T: std::fmt::Debug> std::fmt::Debug for Packed<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        (**self).fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    #[test]
    fn values_made_together_share_a_chunk_and_empty_chunks_are_freed() {
        static POOL: Pool<[u64; 4]> = Pool::new();
        let values: Vec<Packed<[u64; 4]>> = (0..SLOTS as u64 * 2 + 1)
            .map(|i| Packed::new(&POOL, [i; 4]))
            .collect();
        assert_eq!(POOL.chunks(), 3);
        let first = values[0].as_ptr() as usize;
        for (i, v) in values.iter().take(SLOTS).enumerate() {
            assert_eq!(**v, [i as u64; 4]);
            assert_eq!(v.as_ptr() as usize, first + i * 32);
        }
        drop(values);
        assert_eq!(POOL.chunks(), 0);
    }

    #[test]
    fn a_freed_slot_is_reused_and_values_are_dropped_once() {
        static POOL: Pool<Counted> = Pool::new();
        static DROPS: AtomicUsize = AtomicUsize::new(0);
        struct Counted {
            _shared: Arc<()>,
        }
        impl Drop for Counted {
            fn drop(&mut self) {
                DROPS.fetch_add(1, Ordering::SeqCst);
            }
        }
        let shared = Arc::new(());
        let a = Packed::new(
            &POOL,
            Counted {
                _shared: Arc::clone(&shared),
            },
        );
        let b = Packed::new(
            &POOL,
            Counted {
                _shared: Arc::clone(&shared),
            },
        );
        let b_at = b.as_ptr();
        drop(b);
        assert_eq!(DROPS.load(Ordering::SeqCst), 1);
        let c = Packed::new(
            &POOL,
            Counted {
                _shared: Arc::clone(&shared),
            },
        );
        assert_eq!(c.as_ptr(), b_at);
        assert_eq!(Arc::strong_count(&shared), 3);
        drop((a, c));
        assert_eq!(DROPS.load(Ordering::SeqCst), 3);
        assert_eq!(Arc::strong_count(&shared), 1);
        assert_eq!(POOL.chunks(), 0);
    }
}
