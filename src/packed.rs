//! Shared values (like `Arc`) that share pages with the other values of their [`Pool`]. A
//! watch fan-out visits the outbox of every watcher, one socket write between visits; each
//! write leaves the next outbox's page cold, and on the bench machine a cold page costs about
//! as much as a tenth of the write itself. Allocated by the general allocator, every outbox
//! sits on a page of its own, among its session's buffers; packed here, a few dozen share one.

use std::alloc::{self, Layout};
use std::marker::PhantomData;
use std::ops::Deref;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

/// Values per chunk: a chunk is one allocation holding this many slots side by side.
const SLOTS: usize = 32;

/// One allocation of [`SLOTS`] slots and the list of those not in use.
struct Chunk<T> {
    slots: NonNull<T>,
    free: Vec<usize>,
}

// SAFETY: a chunk only hands out its slots' addresses; the values in them are reached through
// `Shared<T>`, whose own Send/Sync bounds apply.
unsafe impl<T: Send> Send for Chunk<T> {}

impl<T> Chunk<T> {
    /// The layout of a chunk's slots; None if it would overflow or be empty.
    fn layout() -> Option<Layout> {
        let layout = Layout::array::<T>(SLOTS).ok()?.align_to(64).ok()?;
        (layout.size() > 0).then(|| layout.pad_to_align())
    }

    /// A chunk with every slot free; None if the allocator has no memory for it.
    fn new() -> Option<Chunk<T>> {
        let layout = Chunk::<T>::layout()?;
        // SAFETY: the layout has a non-zero size.
        let slots = NonNull::new(unsafe { alloc::alloc(layout) }.cast::<T>())?;
        Some(Chunk {
            slots,
            free: (0..SLOTS).rev().collect(),
        })
    }

    fn contains(&self, slot: NonNull<T>) -> bool {
        let start = self.slots.as_ptr() as usize;
        let at = slot.as_ptr() as usize;
        at >= start && at < start + SLOTS * std::mem::size_of::<T>()
    }
}

impl<T> Drop for Chunk<T> {
    fn drop(&mut self) {
        // A chunk exists only if its layout did.
        if let Some(layout) = Chunk::<T>::layout() {
            // SAFETY: `slots` came from `alloc` with this layout; the pool drops a chunk only
            // once every slot is free again, so no value lives in it.
            unsafe { alloc::dealloc(self.slots.as_ptr().cast::<u8>(), layout) };
        }
    }
}

/// Where [`Shared`] values of one type live: chunks of slots, each freed once it is empty.
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
            let i =
                (slot.as_ptr() as usize - chunk.slots.as_ptr() as usize) / std::mem::size_of::<T>();
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

/// A [`Shared`] value and its reference count, as a [`Pool`] slot holds them.
#[repr(C)]
pub struct Counted<T> {
    refs: AtomicUsize,
    value: T,
}

/// A reference-counted value like an `Arc`, allocated in a [`Pool`] beside others of its kind.
pub struct Shared<T: 'static> {
    slot: NonNull<Counted<T>>,
    pool: &'static Pool<Counted<T>>,
}

// SAFETY: the same contract as Arc<T>: the value is shared between threads and dropped by
// whichever thread lets go of it last.
unsafe impl<T: Send + Sync> Send for Shared<T> {}
// SAFETY: as above.
unsafe impl<T: Send + Sync> Sync for Shared<T> {}

impl<T> Shared<T> {
    /// Moves `value` into a slot of `pool`, with one reference: this one.
    pub fn new(pool: &'static Pool<Counted<T>>, value: T) -> Shared<T> {
        let Some(slot) = pool.take() else {
            // As Box and Arc do when the allocator fails.
            alloc::handle_alloc_error(Layout::new::<Counted<T>>());
        };
        let counted = Counted {
            refs: AtomicUsize::new(1),
            value,
        };
        // SAFETY: the slot is free, aligned for Counted<T> and inside a live chunk.
        unsafe { slot.as_ptr().write(counted) };
        Shared { slot, pool }
    }

    /// The value's address: the same for every clone, stable while one lives.
    pub fn as_ptr(&self) -> *const T {
        // SAFETY: the slot holds a live Counted<T> while this reference exists.
        unsafe { std::ptr::addr_of!((*self.slot.as_ptr()).value) }
    }

    /// True when both are references to the same value.
    pub fn ptr_eq(a: &Shared<T>, b: &Shared<T>) -> bool {
        a.slot == b.slot
    }

    /// Hints the CPU to load every cache line of this value's slot (ahead of a use that would
    /// otherwise wait for memory).
    #[inline(always)]
    pub fn prefetch(&self) {
        const LINE: usize = 64;
        let start = self.slot.as_ptr() as usize;
        let end = start + std::mem::size_of::<Counted<T>>();
        let mut line = start & !(LINE - 1);
        while line < end {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: a prefetch never faults and has no effect on memory.
            unsafe {
                std::arch::x86_64::_mm_prefetch(line as *const i8, std::arch::x86_64::_MM_HINT_T0);
            }
            line += LINE;
        }
    }

    fn counted(&self) -> &Counted<T> {
        // SAFETY: the slot holds a live Counted<T> while this reference exists.
        unsafe { self.slot.as_ref() }
    }
}

impl<T> Clone for Shared<T> {
    fn clone(&self) -> Self {
        if self.counted().refs.fetch_add(1, Ordering::Relaxed) > isize::MAX as usize {
            // As Arc does: a count this high means clones are being leaked; stop.
            std::process::abort();
        }
        Shared {
            slot: self.slot,
            pool: self.pool,
        }
    }
}

impl<T> Deref for Shared<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.counted().value
    }
}

impl<T> Drop for Shared<T> {
    fn drop(&mut self) {
        if self.counted().refs.fetch_sub(1, Ordering::Release) != 1 {
            return;
        }
        // Every other reference's use of the value happens before it is dropped (as in Arc).
        std::sync::atomic::fence(Ordering::Acquire);
        // SAFETY: this was the last reference: nothing reads the slot after this.
        unsafe { self.slot.as_ptr().drop_in_place() };
        self.pool.give_back(self.slot);
    }
}

impl<T: std::fmt::Debug> std::fmt::Debug for Shared<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        (**self).fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn values_made_together_share_a_chunk_and_empty_chunks_are_freed() {
        static POOL: Pool<Counted<[u64; 3]>> = Pool::new();
        let values: Vec<Shared<[u64; 3]>> = (0..SLOTS as u64 * 2 + 1)
            .map(|i| Shared::new(&POOL, [i; 3]))
            .collect();
        assert_eq!(POOL.chunks(), 3);
        let first = values[0].as_ptr() as usize;
        for (i, v) in values.iter().take(SLOTS).enumerate() {
            assert_eq!(**v, [i as u64; 3]);
            assert_eq!(v.as_ptr() as usize, first + i * 32);
        }
        drop(values);
        assert_eq!(POOL.chunks(), 0);
    }

    #[test]
    fn the_value_lives_until_its_last_reference_and_its_slot_is_reused() {
        static POOL: Pool<Counted<Arc<()>>> = Pool::new();
        let witness = Arc::new(());
        let a = Shared::new(&POOL, Arc::clone(&witness));
        let a2 = a.clone();
        assert!(Shared::ptr_eq(&a, &a2));
        let b = Shared::new(&POOL, Arc::clone(&witness));
        assert!(!Shared::ptr_eq(&a, &b));
        let b_at = b.as_ptr();
        drop(b);
        assert_eq!(Arc::strong_count(&witness), 2, "b's value dropped with b");
        let c = Shared::new(&POOL, Arc::clone(&witness));
        assert_eq!(c.as_ptr(), b_at, "the freed slot is the next one used");
        drop(a);
        assert_eq!(Arc::strong_count(&witness), 3, "a2 keeps the value alive");
        let moved = std::thread::spawn(move || drop(a2));
        assert!(moved.join().is_ok());
        drop(c);
        assert_eq!(Arc::strong_count(&witness), 1);
        assert_eq!(POOL.chunks(), 0);
    }
}
