//! qemu's protection for a raw image whose format was guessed: a write to the first sector
//! that would make the image probe as another format is refused with EPERM, since the next
//! open would then trust guest-written metadata.

use crate::filter::Filter;
use crate::{BlockBackend, Error, HostSpan, IoFlags, Result};
use std::sync::Arc;

pub struct ProbedRaw {
    inner: Arc<dyn BlockBackend>,
    /// Does a first sector look like an image format other than raw? (The opener's probe.)
    looks_formatted: fn(&[u8]) -> bool,
}

impl std::fmt::Debug for ProbedRaw {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProbedRaw")
            .field("inner", &self.inner)
            .finish()
    }
}

impl ProbedRaw {
    pub fn new(inner: Arc<dyn BlockBackend>, looks_formatted: fn(&[u8]) -> bool) -> ProbedRaw {
        ProbedRaw {
            inner,
            looks_formatted,
        }
    }

    /// The first sector as it would be after writing `buf` at `offset`.
    fn check_block0(&self, offset: u64, buf: &[u8]) -> Result<()> {
        if offset >= 512 {
            return Ok(());
        }
        let mut head = vec![0u8; 512.min(self.inner.size() as usize)];
        self.inner.read(0, &mut head)?;
        let start = offset as usize;
        let n = buf.len().min(head.len().saturating_sub(start));
        head[start..start + n].copy_from_slice(&buf[..n]);
        if (self.looks_formatted)(&head) {
            return Err(Error::Io {
                op: "write",
                path: "block 0 of a probed raw image".into(),
                offset,
                len: buf.len() as u64,
                source: std::io::Error::from_raw_os_error(libc::EPERM),
            });
        }
        Ok(())
    }
}

impl Filter for ProbedRaw {
    fn inner(&self) -> &Arc<dyn BlockBackend> {
        &self.inner
    }
    /// qemu restricts a probed image to whole sectors, the easier to protect the first.
    fn request_alignment(&self) -> u32 {
        512
    }
    fn write(&self, offset: u64, buf: &[u8], flags: IoFlags) -> Result<()> {
        self.check_block0(offset, buf)?;
        self.inner.write(offset, buf, flags)
    }
    fn try_read(&self, offset: u64, buf: &mut [u8]) -> bool {
        self.inner.try_read(offset, buf)
    }
    /// Writes to the first sector are checked the usual way.
    fn try_write(&self, offset: u64, buf: &[u8]) -> bool {
        offset >= 512 && self.inner.try_write(offset, buf)
    }
    fn read_source(&self, offset: u64, len: u64) -> Option<HostSpan<'_>> {
        self.inner.read_source(offset, len)
    }
    /// As `try_write`: the first sector's writes are checked.
    fn write_sink(&self, offset: u64, len: u64) -> Option<HostSpan<'_>> {
        if offset < 512 {
            return None;
        }
        self.inner.write_sink(offset, len)
    }
}
