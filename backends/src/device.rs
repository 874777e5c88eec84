//! What frontends hold: a backend plus its cached capabilities, with the emulation of optional
//! features written once (FUA by flush, write-zeroes by writing zeroes, cache by reading).

use crate::{BlockBackend, Caps, Error, Extents, HostSpan, IoFlags, Result, Support};
use std::sync::Arc;

/// Largest buffer the zero and cache emulation use per call.
const EMULATION_CHUNK: usize = 1 << 20;

#[derive(Clone, Debug)]
pub struct Device {
    backend: Arc<dyn BlockBackend>,
    caps: Caps,
    size: u64,
}

impl Device {
    pub fn new(backend: Arc<dyn BlockBackend>) -> Device {
        let caps = backend.caps();
        let size = backend.size();
        Device {
            backend,
            caps,
            size,
        }
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn caps(&self) -> &Caps {
        &self.caps
    }

    pub fn backend(&self) -> &Arc<dyn BlockBackend> {
        &self.backend
    }

    /// qemu's `request_alignment` of the image (the minimum block size clients are told).
    pub fn request_alignment(&self) -> u32 {
        self.backend.request_alignment()
    }

    pub fn format_name(&self) -> &'static str {
        self.backend.format_name()
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(Error::Invalid(format!(
                "offset {offset:#x} length {len:#x} is past the end ({:#x})",
                self.size
            ))),
        }
    }

    fn check_writable(&self) -> Result<()> {
        if self.caps.writable {
            Ok(())
        } else {
            Err(Error::ReadOnly)
        }
    }

    fn after_write(&self, flags: IoFlags) -> Result<()> {
        if flags.contains(IoFlags::FUA) && self.caps.fua == Support::Emulate {
            self.backend.flush()?;
        }
        Ok(())
    }

    fn native_flags(&self, flags: IoFlags) -> IoFlags {
        let mut f = flags;
        if self.caps.fua != Support::Native {
            f.remove(IoFlags::FUA);
        }
        f
    }

    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(());
        }
        self.backend.read(offset, buf)
    }

    /// See [`BlockBackend::try_read`]; false for a range past the end.
    pub fn try_read(&self, offset: u64, buf: &mut [u8]) -> bool {
        self.check_range(offset, buf.len() as u64).is_ok() && self.backend.try_read(offset, buf)
    }

    /// See [`BlockBackend::try_write`]; false on a read-only device or past the end.
    pub fn try_write(&self, offset: u64, buf: &[u8]) -> bool {
        self.caps.writable
            && self.check_range(offset, buf.len() as u64).is_ok()
            && self.backend.try_write(offset, buf)
    }

    /// See [`BlockBackend::read_source`]; None for a range past the end.
    pub fn read_source(&self, offset: u64, len: u64) -> Option<HostSpan<'_>> {
        self.check_range(offset, len).ok()?;
        self.backend.read_source(offset, len)
    }

    /// See [`BlockBackend::write_sink`]; None read-only or for a range past the end.
    pub fn write_sink(&self, offset: u64, len: u64) -> Option<HostSpan<'_>> {
        if !self.caps.writable {
            return None;
        }
        self.check_range(offset, len).ok()?;
        self.backend.write_sink(offset, len)
    }

    pub fn write(&self, offset: u64, buf: &[u8], flags: IoFlags) -> Result<()> {
        self.check_writable()?;
        self.check_range(offset, buf.len() as u64)?;
        if !buf.is_empty() {
            self.backend.write(offset, buf, self.native_flags(flags))?;
        }
        self.after_write(flags)
    }

    pub fn flush(&self) -> Result<()> {
        self.backend.flush()
    }

    /// Make every completed write survive the death of this process (see
    /// [`BlockBackend::settle`]).
    pub fn settle(&self) -> Result<()> {
        self.backend.settle()
    }

    /// Whether `settle` has anything to do.
    pub fn unsettled(&self) -> bool {
        self.backend.unsettled()
    }

    /// Release the image (stores what qemu stores on close); the last call on the device.
    pub fn close(&self) -> Result<()> {
        self.backend.close()
    }

    /// `-B NAME`: can this dirty bitmap be exported? Err is qemu's message.
    pub fn bitmap_check(&self, name: &str) -> Result<()> {
        self.backend.bitmap_check(name)
    }

    /// Dirty-bitmap extents from `offset`, clipped like [`Device::block_status`].
    pub fn bitmap_status(
        &self,
        name: &str,
        offset: u64,
        len: u64,
        out: &mut Extents,
    ) -> Result<()> {
        self.check_range(offset, len)?;
        out.clear();
        if len == 0 {
            return Ok(());
        }
        self.backend.bitmap_status(name, offset, len, out)?;
        if out.is_empty() {
            return Err(Error::Invalid(format!("no extent reported at {offset:#x}")));
        }
        Ok(())
    }

    pub fn trim(&self, offset: u64, len: u64, flags: IoFlags) -> Result<()> {
        self.check_writable()?;
        self.check_range(offset, len)?;
        if !self.caps.trim {
            return Err(Error::NotSupported("trim"));
        }
        if len > 0 {
            self.backend.trim(offset, len, self.native_flags(flags))?;
        }
        self.after_write(flags)
    }

    pub fn write_zeroes(&self, offset: u64, len: u64, flags: IoFlags) -> Result<()> {
        self.check_writable()?;
        self.check_range(offset, len)?;
        match self.caps.zero {
            Support::None => return Err(Error::NotSupported("write zeroes")),
            Support::Native => {
                if flags.contains(IoFlags::FAST_ZERO) && !self.caps.fast_zero {
                    return Err(Error::NotSupported("fast zero"));
                }
                if len > 0 {
                    self.backend
                        .write_zeroes(offset, len, self.native_flags(flags))?;
                }
            }
            Support::Emulate => {
                if flags.contains(IoFlags::FAST_ZERO) {
                    return Err(Error::NotSupported("fast zero"));
                }
                let zeroes = vec![0u8; (len as usize).min(EMULATION_CHUNK)];
                let mut done = 0u64;
                while done < len {
                    let n = (len - done).min(zeroes.len() as u64) as usize;
                    self.backend
                        .write(offset + done, &zeroes[..n], self.native_flags(flags))?;
                    done += n as u64;
                }
            }
        }
        self.after_write(flags)
    }

    pub fn cache(&self, offset: u64, len: u64) -> Result<()> {
        self.check_range(offset, len)?;
        match self.caps.cache {
            Support::None => Err(Error::NotSupported("cache")),
            Support::Native => self.backend.cache(offset, len),
            Support::Emulate => {
                let mut buf = vec![0u8; (len as usize).min(EMULATION_CHUNK)];
                let mut done = 0u64;
                while done < len {
                    let n = (len - done).min(buf.len() as u64) as usize;
                    self.backend.read(offset + done, &mut buf[..n])?;
                    done += n as u64;
                }
                Ok(())
            }
        }
    }

    /// Extents from `offset`, covering at least one byte; clipped to the device's end.
    pub fn block_status(&self, offset: u64, len: u64, out: &mut Extents) -> Result<()> {
        self.check_range(offset, len)?;
        out.clear();
        if len == 0 {
            return Ok(());
        }
        self.backend.block_status(offset, len, out)?;
        if out.is_empty() {
            return Err(Error::Invalid(format!("no extent reported at {offset:#x}")));
        }
        Ok(())
    }
}
