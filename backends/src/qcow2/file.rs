//! The image file: positional reads and writes with the file name and offset in every error.
//! With `--cache=none` the file also has an O_DIRECT descriptor: block-aligned I/O (data
//! clusters, whole tables) goes through it and bypasses the page cache; small metadata
//! updates (an L1 entry, a header field) use the buffered one. Linux keeps the two coherent:
//! a direct read writes back cached pages first, a direct write invalidates them.

use crate::{Error, Result};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

#[derive(Debug)]
pub struct ImageFile {
    pub file: File,
    pub path: PathBuf,
    /// The same file opened with O_DIRECT (`cache.direct=on`).
    pub direct: Option<File>,
}

/// What O_DIRECT needs of offsets, lengths and buffers here (the largest common logical
/// block size).
const DIRECT_ALIGN: u64 = 4096;

fn direct_ok(offset: u64, len: usize) -> bool {
    len > 0 && offset.is_multiple_of(DIRECT_ALIGN) && (len as u64).is_multiple_of(DIRECT_ALIGN)
}

impl ImageFile {
    /// Read `buf.len()` bytes; bytes past the end of the file read as zeroes (as qemu does
    /// for compressed clusters near the end and sparse tails).
    pub fn read(&self, op: &'static str, offset: u64, buf: &mut [u8]) -> Result<()> {
        if let Some(d) = &self.direct {
            if direct_ok(offset, buf.len()) {
                let mut bounce = crate::direct_io::AlignedBuf::new(buf.len());
                let b = &mut bounce.as_mut_slice()[..buf.len()];
                crate::direct_io::read_full_at(crate::aio::AioMode::Threads, d, offset, b)
                    .map_err(|e| self.err(op, offset, buf.len() as u64, e))?;
                buf.copy_from_slice(b);
                return Ok(());
            }
        }
        crate::direct_io::read_full_at(crate::aio::AioMode::Threads, &self.file, offset, buf)
            .map_err(|e| self.err(op, offset, buf.len() as u64, e))
    }

    pub fn write(&self, op: &'static str, offset: u64, buf: &[u8]) -> Result<()> {
        if let Some(d) = &self.direct {
            if direct_ok(offset, buf.len()) {
                let mut bounce = crate::direct_io::AlignedBuf::new(buf.len());
                bounce.as_mut_slice()[..buf.len()].copy_from_slice(buf);
                return d
                    .write_all_at(&bounce.as_slice()[..buf.len()], offset)
                    .map_err(|e| self.err(op, offset, buf.len() as u64, e));
            }
        }
        self.file
            .write_all_at(buf, offset)
            .map_err(|e| self.err(op, offset, buf.len() as u64, e))
    }

    pub fn sync(&self) -> Result<()> {
        self.file
            .sync_data()
            .map_err(|e| self.err("flush", 0, 0, e))
    }

    pub fn len(&self) -> Result<u64> {
        self.file
            .metadata()
            .map(|m| m.len())
            .map_err(|e| self.err("stat", 0, 0, e))
    }

    pub fn set_len(&self, len: u64) -> Result<()> {
        self.file
            .set_len(len)
            .map_err(|e| self.err("extend", len, 0, e))
    }

    pub fn err(&self, op: &'static str, offset: u64, len: u64, e: io::Error) -> Error {
        Error::io(op, &self.path, offset, len, e)
    }

    pub fn corrupt(&self, msg: String) -> Error {
        corrupt(&self.path, msg)
    }
}

pub fn corrupt(path: &Path, msg: String) -> Error {
    Error::Corrupt {
        path: path.to_path_buf(),
        msg,
    }
}
