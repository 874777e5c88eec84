//! O_DIRECT I/O (`--cache=none|directsync`, `-n`): the kernel wants the buffer address,
//! offset and length aligned, clients may send any byte range, so every request goes through
//! an aligned bounce buffer and unaligned writes read-modify-write the blocks at their ends.
//!
//! Locking rule: a read-modify-write holds [`DirectIo::rmw`] exclusively from its read to its
//! write; every other write-type operation on the file (aligned writes, fallocate zeroing and
//! hole punching, the ragged tail) holds it shared. So no write, zeroing or discard that lands
//! inside the read-modify-written blocks can be undone by the stale bytes written back.

use super::read_full_at;
use crate::aio::{self, AioMode};
use parking_lot::{RwLock, RwLockReadGuard};
use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// Alignment used for buffers, offsets and lengths: right for 512- and 4096-byte devices.
pub const ALIGN: usize = 4096;

/// A zeroed heap buffer aligned to [`ALIGN`].
pub struct AlignedBuf {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: AlignedBuf owns its allocation exclusively, like a Vec<u8>.
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    pub fn new(len: usize) -> AlignedBuf {
        let len = len.max(ALIGN);
        let layout = match Layout::from_size_align(len, ALIGN) {
            Ok(l) => l,
            Err(_) => std::alloc::handle_alloc_error(Layout::new::<u8>()),
        };
        // SAFETY: layout has a non-zero size.
        let ptr = unsafe { alloc_zeroed(layout) };
        if ptr.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        AlignedBuf { ptr, len }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: ptr is valid for len bytes, zero-initialised, and uniquely borrowed here.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is valid for len bytes and initialised.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in new() with exactly this layout.
        unsafe { dealloc(self.ptr, Layout::from_size_align_unchecked(self.len, ALIGN)) }
    }
}

fn down(x: u64) -> u64 {
    x & !(ALIGN as u64 - 1)
}

fn up(x: u64) -> u64 {
    down(x + ALIGN as u64 - 1)
}

/// Positional I/O through aligned bounce buffers.
#[derive(Debug)]
pub struct DirectIo {
    rmw: RwLock<()>,
    /// The same file without O_DIRECT, for the ragged tail of a file whose length is not a
    /// multiple of [`ALIGN`]: an aligned write there would grow the file.
    plain: File,
    tail_start: u64,
    mode: AioMode,
}

impl DirectIo {
    pub fn new(plain: File, file_len: u64, mode: AioMode) -> DirectIo {
        let tail_start = if file_len.is_multiple_of(ALIGN as u64) {
            u64::MAX
        } else {
            down(file_len)
        };
        DirectIo {
            rmw: RwLock::new(()),
            plain,
            tail_start,
            mode,
        }
    }

    /// Held by write-type operations that are not a read-modify-write.
    pub fn shared(&self) -> RwLockReadGuard<'_, ()> {
        self.rmw.read()
    }

    pub fn read(&self, f: &File, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        if offset + buf.len() as u64 > self.tail_start {
            let _x = self.rmw.read();
            return read_full_at(AioMode::Threads, &self.plain, offset, buf);
        }
        let start = down(offset);
        let end = up(offset + buf.len() as u64);
        let mut bounce = AlignedBuf::new((end - start) as usize);
        read_full_at(
            self.mode,
            f,
            start,
            &mut bounce.as_mut_slice()[..(end - start) as usize],
        )?;
        let skip = (offset - start) as usize;
        buf.copy_from_slice(&bounce.as_slice()[skip..skip + buf.len()]);
        Ok(())
    }

    /// Write `buf` at `offset`, in the device when it returns (as O_DIRECT is; the device's
    /// own cache still needs a flush).
    pub fn write(&self, f: &File, offset: u64, buf: &[u8]) -> io::Result<()> {
        if offset + buf.len() as u64 > self.tail_start {
            let _x = self.rmw.write();
            self.plain.write_all_at(buf, offset)?;
            return self.plain.sync_data();
        }
        let start = down(offset);
        let end = up(offset + buf.len() as u64);
        let len = (end - start) as usize;
        let mut bounce = AlignedBuf::new(len);
        if start == offset && end == offset + buf.len() as u64 {
            let _x = self.rmw.read();
            bounce.as_mut_slice()[..len].copy_from_slice(buf);
            return aio::write_all_at(self.mode, f, &bounce.as_slice()[..len], start);
        }
        let _x = self.rmw.write();
        let b = bounce.as_mut_slice();
        // Only the first and last block hold bytes this write does not cover.
        read_full_at(self.mode, f, start, &mut b[..ALIGN])?;
        if len > ALIGN {
            read_full_at(self.mode, f, end - ALIGN as u64, &mut b[len - ALIGN..len])?;
        }
        let skip = (offset - start) as usize;
        b[skip..skip + buf.len()].copy_from_slice(buf);
        aio::write_all_at(self.mode, f, &b[..len], start)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::OpenOptionsExt;

    #[test]
    fn unaligned_round_trip_through_o_direct() {
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let p = dir.path().join("d.img");
        std::fs::write(&p, vec![0x11u8; 65536 + 100]).unwrap();
        let f = match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(&p)
        {
            Ok(f) => f,
            Err(e) => {
                eprintln!("SKIP: O_DIRECT not supported here: {e}");
                return;
            }
        };
        let d = DirectIo::new(
            std::fs::File::options()
                .read(true)
                .write(true)
                .open(&p)
                .unwrap(),
            65636,
            AioMode::Threads,
        );
        d.write(&f, 1000, b"hello world").unwrap();
        d.write(&f, 8192, &[0x22; 4096]).unwrap();
        d.write(&f, 65530, b"tail!").unwrap();
        let mut got = vec![0u8; 20];
        d.read(&f, 995, &mut got).unwrap();
        assert_eq!(&got[..5], &[0x11; 5]);
        assert_eq!(&got[5..16], b"hello world");
        assert_eq!(&got[16..], &[0x11; 4]);
        let all = std::fs::read(&p).unwrap();
        assert_eq!(all.len(), 65636, "the ragged tail does not grow the file");
        assert_eq!(&all[65530..65535], b"tail!");
        assert_eq!(&all[8192..12288], &[0x22; 4096][..]);
    }
}
