//! The log segment being appended to: where a log record's bytes reach the kernel.
//!
//! Records are copied into a shared memory map of file space reserved ahead with `fallocate`,
//! instead of one `write` call per group write: under fifty connections of single sets, those
//! calls were 8% of the server's time, and removing them bought 8% of throughput. The mapped
//! pages are the file's page cache, so a copied record survives kill -9 exactly like a written
//! one, and `fdatasync` makes it durable the same way.
//!
//! Reserved space reads as zeros. Recovery ends a log at the first record length of zero
//! ([`super::oplog`]), and a segment is cut back to its records when it is sealed or closed.
//! A group is copied with its first four bytes (that length) last, in one store, so a copy cut
//! short by kill -9 also ends the log where the group began; only groups smaller than
//! [`MAX_COPIED`] are copied, so recovery knows how far such a cut can reach. Larger groups,
//! filesystems where a page fault on reserved space could still fail (anything but ext4, XFS
//! and tmpfs), and space that cannot be reserved or mapped (a full disk) use positioned writes.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::ptr::NonNull;
use std::sync::atomic::{compiler_fence, fence, Ordering};
use std::sync::Arc;

/// Bytes reserved and mapped at a time.
const WINDOW: u64 = 2 << 20;

/// Alignment of a window's file offset: a multiple of every page size Linux uses.
const ALIGN: u64 = 64 << 10;

/// Bytes written last in a group: the first record's length, zero until the group is whole.
const LENGTH: usize = 4;

/// Group writes this large go through `pwrite`: one call is cheap for this many bytes, and the
/// kernel fills fresh pages for it for less than page faults on the map cost (50 connections
/// × 16 pipelined sets, whose groups are a few KiB each: 6% slower when they were copied).
/// Recovery relies on it too: a copy cut short leaves bytes no further than this past its start.
pub const MAX_COPIED: usize = 1024;

/// Filesystems (`statfs` magic numbers) where a page fault on space reserved with `fallocate`
/// cannot fail for want of space: ext4, XFS, tmpfs. Elsewhere (copy-on-write filesystems,
/// network filesystems) it could, and the process would get SIGBUS instead of an error.
const MAPPABLE: [i64; 3] = [0xEF53, 0x5846_5342, 0x0102_1994];

/// True when `file` is on a filesystem listed in [`MAPPABLE`].
pub(crate) fn mappable(file: &File) -> bool {
    // SAFETY: fstatfs only writes the struct passed by pointer, zeroed beforehand.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above; the descriptor is open for the call.
    let ok = unsafe { libc::fstatfs(file.as_raw_fd(), &mut st) } == 0;
    #[allow(clippy::unnecessary_cast)]
    let kind = st.f_type as i64;
    ok && MAPPABLE.contains(&kind)
}

/// A writable shared mapping of `len` bytes of the segment from file offset `start`.
struct Window {
    ptr: NonNull<u8>,
    start: u64,
    len: u64,
}

// SAFETY: the mapping belongs to this value alone and is written only through `&mut Segment`.
unsafe impl Send for Window {}

impl Window {
    fn map(file: &File, start: u64, len: u64) -> io::Result<Window> {
        let (Ok(offset), Ok(size)) = (libc::off_t::try_from(start), usize::try_from(len)) else {
            return Err(io::Error::other("log segment offset out of range"));
        };
        // SAFETY: maps a range of a file this process holds open; the result is checked below
        // and unmapped only by `drop`.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                offset,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(ptr.cast()).ok_or_else(|| io::Error::other("mmap returned null"))?;
        Ok(Window { ptr, start, len })
    }

    /// File offset just past the window.
    fn end(&self) -> u64 {
        self.start + self.len
    }
}

impl Drop for Window {
    fn drop(&mut self) {
        // SAFETY: `ptr` and `len` are exactly what `mmap` returned and took; nothing else
        // refers to the mapping once its window is dropped.
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len as usize);
        }
    }
}

/// Reserves `len` bytes of `file` from `offset` (extending it): pages written there later
/// cannot fail for want of disk space.
fn reserve(file: &File, offset: u64, len: u64) -> io::Result<()> {
    let (Ok(offset), Ok(len)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
        return Err(io::Error::other("log segment offset out of range"));
    };
    // SAFETY: fallocate only reads its integer arguments.
    if unsafe { libc::fallocate(file.as_raw_fd(), 0, offset, len) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The segment file being appended to, and how far its records reach.
pub struct Segment {
    file: Arc<File>,
    /// Bytes of records: where the next one goes.
    len: u64,
    /// The file's size: `len` plus reserved zeros.
    reserved: u64,
    window: Option<Window>,
    /// False once space could not be reserved or mapped: positioned writes from then on.
    mapping: bool,
}

impl std::fmt::Debug for Segment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Segment")
            .field("len", &self.len)
            .field("reserved", &self.reserved)
            .field("mapping", &self.mapping)
            .finish()
    }
}

impl Segment {
    /// Appends to `file` (opened for reading and writing) after its last byte: recovery has cut
    /// everything after the last record.
    pub fn open(file: File) -> io::Result<Segment> {
        let len = file.metadata()?.len();
        let mapping = mappable(&file);
        Ok(Segment {
            file: Arc::new(file),
            len,
            reserved: len,
            window: None,
            mapping,
        })
    }

    /// The file, for fsync.
    pub fn file(&self) -> &Arc<File> {
        &self.file
    }

    /// Bytes of records in the segment: a reader of the live file must stop there.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True when the segment holds no record.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends one group write (whole records) after the last record. A small group is copied
    /// into the map, its first four bytes last and in one store; a large one is written with
    /// `pwrite`.
    pub fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        if bytes.is_empty() {
            return Ok(());
        }
        let n = bytes.len() as u64;
        let len = self.len;
        let window = if bytes.len() < MAX_COPIED {
            self.window_for(n)
        } else {
            None
        };
        match window {
            Some(w) => {
                let off = (len - w.start) as usize;
                // SAFETY: `window_for` returned a window holding [len, len + n), so every store
                // stays inside the mapping; only this segment writes it.
                unsafe {
                    let dst = w.ptr.as_ptr().add(off);
                    match bytes.first_chunk::<LENGTH>() {
                        Some(head) => {
                            std::ptr::copy_nonoverlapping(
                                bytes.as_ptr().add(LENGTH),
                                dst.add(LENGTH),
                                bytes.len() - LENGTH,
                            );
                            // The rest of the group is stored before its first length.
                            compiler_fence(Ordering::SeqCst);
                            fence(Ordering::SeqCst);
                            dst.cast::<u32>().write_unaligned(u32::from_ne_bytes(*head));
                        }
                        None => std::ptr::copy_nonoverlapping(bytes.as_ptr(), dst, bytes.len()),
                    }
                }
            }
            None => {
                self.file.write_all_at(bytes, len)?;
                self.reserved = self.reserved.max(len + n);
            }
        }
        self.len += n;
        Ok(())
    }

    /// A mapped window holding the next `n` bytes after the records, mapping (and reserving)
    /// one when the current window cannot; `None` when mapping is off or just failed.
    fn window_for(&mut self, n: u64) -> Option<&Window> {
        let fits = |w: &Window| self.len >= w.start && self.len + n <= w.end();
        if !self.window.as_ref().is_some_and(fits) {
            self.window = None;
            if !self.mapping {
                return None;
            }
            match self.map_from_here(n) {
                Ok(w) => self.window = Some(w),
                Err(e) => {
                    log::warn!(
                        "operation log: cannot reserve and map segment space ({e}); writing records with pwrite instead"
                    );
                    self.mapping = false;
                    return None;
                }
            }
        }
        self.window.as_ref()
    }

    /// Reserves and maps a window from the aligned offset at or below `len`, which holds the
    /// next `n` bytes (fewer than [`MAX_COPIED`]).
    fn map_from_here(&mut self, n: u64) -> io::Result<Window> {
        let start = self.len / ALIGN * ALIGN;
        let end = start + WINDOW;
        debug_assert!(self.len + n <= end);
        if end > self.reserved {
            reserve(&self.file, self.reserved, end - self.reserved)?;
            self.reserved = end;
        }
        Window::map(&self.file, start, WINDOW)
    }

    /// Unmaps and cuts the reserved space off, so the file ends at its last record (before the
    /// segment is sealed, or when the log closes). Appending again reserves anew.
    pub fn trim(&mut self) -> io::Result<()> {
        self.window = None;
        // The file's own size, not `reserved`: a failed reservation or write may have grown it.
        if self.file.metadata()?.len() != self.len {
            self.file.set_len(self.len)?;
        }
        self.reserved = self.len;
        Ok(())
    }
}

impl Drop for Segment {
    fn drop(&mut self) {
        if let Err(e) = self.trim() {
            log::warn!("operation log: cannot cut a closed segment's reserved space: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::{self, OpenOptions};
    use std::path::PathBuf;

    fn tmp_file(tag: &str) -> (PathBuf, File) {
        let path = std::env::temp_dir().join(format!(
            "nundb-segment-{tag}-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        let file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        (path, file)
    }

    /// Groups of every size from 1 byte to past a window (copied below [`MAX_COPIED`], written
    /// from it), each byte numbered by its offset.
    fn groups() -> Vec<Vec<u8>> {
        let mut at = 0u64;
        let mut out = Vec::new();
        for size in [1usize, 3, 4, 5, 130, 4096, 70_000, 3 << 20, 17, 1 << 20, 2] {
            out.push((0..size as u64).map(|i| ((at + i) % 251) as u8).collect());
            at += size as u64;
        }
        out
    }

    fn writes_and_trims(mapping: bool) {
        let (path, file) = tmp_file(if mapping { "map" } else { "pwrite" });
        let mut seg = Segment::open(file).unwrap();
        seg.mapping = mapping;
        let mut expected = Vec::new();
        for g in groups() {
            seg.write(&g).unwrap();
            expected.extend_from_slice(&g);
            assert_eq!(seg.len(), expected.len() as u64);
            // Whatever reserved space follows reads as zeros.
            let on_disk = fs::read(&path).unwrap();
            assert_eq!(&on_disk[..expected.len()], &expected[..]);
            assert!(on_disk[expected.len()..].iter().all(|&b| b == 0));
            // Copied groups leave reserved space after them; written ones may end the file.
            if !mapping {
                assert_eq!(on_disk.len(), expected.len());
            } else if g.len() < MAX_COPIED {
                assert!(on_disk.len() > expected.len());
            }
            assert_eq!(on_disk.len() as u64, seg.reserved);
        }
        drop(seg);
        assert_eq!(fs::read(&path).unwrap(), expected);
        // Reopened, it appends after the last byte.
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let mut seg = Segment::open(file).unwrap();
        seg.write(b"tail").unwrap();
        seg.trim().unwrap();
        expected.extend_from_slice(b"tail");
        assert_eq!(fs::read(&path).unwrap(), expected);
        drop(seg);
        let _ = fs::remove_file(&path);
    }

    #[test]
    fn mapped_writes_land_in_order_across_windows_and_trim_to_the_records() {
        writes_and_trims(true);
    }

    #[test]
    fn positioned_writes_land_the_same_bytes() {
        writes_and_trims(false);
    }
}
