//! qemu's cache modes above the format: `writethrough`/`directsync` make every write durable
//! before it completes; `unsafe` ignores flushes. (`none`/`directsync` also open the file
//! with O_DIRECT, which is the raw backend's business.)

use crate::filter::Filter;
use crate::{BlockBackend, HostSpan, IoFlags, Result};
use std::sync::Arc;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheMode {
    Writeback,
    Writethrough,
    None,
    Directsync,
    Unsafe,
}

impl CacheMode {
    pub fn from_name(s: &str) -> Option<CacheMode> {
        Some(match s {
            "writeback" => CacheMode::Writeback,
            "writethrough" => CacheMode::Writethrough,
            "none" | "off" => CacheMode::None,
            "directsync" => CacheMode::Directsync,
            "unsafe" => CacheMode::Unsafe,
            _ => return None,
        })
    }

    /// O_DIRECT on the image file.
    pub fn direct(self) -> bool {
        matches!(self, CacheMode::None | CacheMode::Directsync)
    }

    /// Every write is made durable before completing.
    pub fn write_through(self) -> bool {
        matches!(self, CacheMode::Writethrough | CacheMode::Directsync)
    }
}

#[derive(Debug)]
pub struct Cached {
    inner: Arc<dyn BlockBackend>,
    mode: CacheMode,
}

impl Cached {
    /// Wrap `inner` if `mode` needs a layer; otherwise return it as it is.
    pub fn wrap(inner: Arc<dyn BlockBackend>, mode: CacheMode) -> Arc<dyn BlockBackend> {
        if mode.write_through() || mode == CacheMode::Unsafe {
            Arc::new(Cached { inner, mode })
        } else {
            inner
        }
    }

    fn flags(&self, flags: IoFlags) -> IoFlags {
        match self.mode {
            CacheMode::Unsafe => flags - IoFlags::FUA,
            _ => flags,
        }
    }

    fn after(&self, flags: IoFlags) -> Result<()> {
        // Writethrough: the layer below reported FUA as emulated or native; make it so.
        if self.mode.write_through() && !flags.contains(IoFlags::FUA) {
            self.inner.flush()?;
        }
        Ok(())
    }
}

impl Filter for Cached {
    fn inner(&self) -> &Arc<dyn BlockBackend> {
        &self.inner
    }
    fn write(&self, offset: u64, buf: &[u8], flags: IoFlags) -> Result<()> {
        if self.mode.write_through() && self.inner.caps().fua == crate::Support::Native {
            // A native FUA write (RWF_DSYNC) is cheaper than a write and a flush.
            return self.inner.write(offset, buf, flags | IoFlags::FUA);
        }
        self.inner.write(offset, buf, self.flags(flags))?;
        self.after(flags)
    }
    fn flush(&self) -> Result<()> {
        if self.mode == CacheMode::Unsafe {
            return Ok(());
        }
        self.inner.flush()
    }
    fn trim(&self, offset: u64, len: u64, flags: IoFlags) -> Result<()> {
        self.inner.trim(offset, len, self.flags(flags))?;
        self.after(flags)
    }
    fn write_zeroes(&self, offset: u64, len: u64, flags: IoFlags) -> Result<()> {
        self.inner.write_zeroes(offset, len, self.flags(flags))?;
        self.after(flags)
    }
    fn try_read(&self, offset: u64, buf: &mut [u8]) -> bool {
        self.inner.try_read(offset, buf)
    }
    /// Write-through modes make every write durable: that waits for the device.
    fn try_write(&self, offset: u64, buf: &[u8]) -> bool {
        !self.mode.write_through() && self.inner.try_write(offset, buf)
    }
    fn read_source(&self, offset: u64, len: u64) -> Option<HostSpan<'_>> {
        self.inner.read_source(offset, len)
    }
    /// As `try_write`: write-through modes sync every write.
    fn write_sink(&self, offset: u64, len: u64) -> Option<HostSpan<'_>> {
        if self.mode.write_through() {
            return None;
        }
        self.inner.write_sink(offset, len)
    }
}
