//! A LUKS payload over any backend: the export is `[payload_offset, end)` of the inner
//! backend, decrypted on read and encrypted (in the per-thread bounce buffer) on write, one
//! 512-byte sector at a time. Requests must be whole sectors (`request_alignment` 512; the
//! `align` layer above makes them so).
//!
//! As qemu's crypto driver: discard does nothing, write-zeroes writes encrypted zeroes (so
//! FAST_ZERO is refused), and block status reports data everywhere.

use super::{bounce, Luks};
use crate::{BlockBackend, Caps, Error, Extent, ExtentFlags, Extents, IoFlags, Result, Support};
use std::sync::Arc;

#[derive(Debug)]
pub struct LuksVolume {
    inner: Arc<dyn BlockBackend>,
    luks: Luks,
    size: u64,
}

impl LuksVolume {
    /// The payload of `inner`, unlocked as `luks`.
    pub fn new(inner: Arc<dyn BlockBackend>, luks: Luks) -> Result<LuksVolume> {
        let size = inner
            .size()
            .checked_sub(luks.payload_offset())
            // qemu's words when the file ends before the payload starts.
            .ok_or_else(|| {
                Error::Encryption("Could not refresh total sector count: Input/output error".into())
            })?;
        Ok(LuksVolume { inner, luks, size })
    }

    fn check_aligned(&self, offset: u64, len: usize) -> Result<()> {
        if offset.is_multiple_of(512) && len.is_multiple_of(512) {
            return Ok(());
        }
        Err(Error::Invalid(format!(
            "unaligned encrypted request at {offset:#x} (length {len:#x})"
        )))
    }
}

impl BlockBackend for LuksVolume {
    fn size(&self) -> u64 {
        self.size
    }

    fn caps(&self) -> Caps {
        let c = self.inner.caps();
        Caps {
            trim: c.writable,
            zero: if c.writable {
                Support::Emulate
            } else {
                Support::None
            },
            fast_zero: false,
            cache: Support::Emulate,
            ..c
        }
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.check_aligned(offset, buf.len())?;
        self.inner.read(self.luks.payload_offset() + offset, buf)?;
        self.luks.decrypt(offset, buf);
        Ok(())
    }

    fn write(&self, offset: u64, buf: &[u8], flags: IoFlags) -> Result<()> {
        self.check_aligned(offset, buf.len())?;
        let base = self.luks.payload_offset() + offset;
        bounce::encrypt_and_write(
            buf,
            |at, b| self.luks.encrypt(offset + at as u64, b),
            |at, b| self.inner.write(base + at as u64, b, flags),
        )
    }

    fn flush(&self) -> Result<()> {
        self.inner.flush()
    }

    /// qemu's crypto driver has no discard: the request succeeds and changes nothing.
    fn trim(&self, _offset: u64, _len: u64, flags: IoFlags) -> Result<()> {
        if flags.contains(IoFlags::FUA) {
            self.inner.flush()?;
        }
        Ok(())
    }

    fn block_status(&self, _offset: u64, len: u64, out: &mut Extents) -> Result<()> {
        out.push(Extent::new(len, ExtentFlags::empty(), 1));
        Ok(())
    }

    fn format_name(&self) -> &'static str {
        "luks"
    }

    fn request_alignment(&self) -> u32 {
        512
    }

    fn close(&self) -> Result<()> {
        self.inner.close()
    }
}
