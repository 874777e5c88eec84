//! Layers over another backend, in the spirit of nbdkit's filters: a layer names its inner
//! backend and overrides only the calls it changes; every other call goes straight through.

use crate::{BlockBackend, Caps, Extents, HostSpan, IoFlags, Result};
use std::fmt::Debug;
use std::sync::Arc;

pub trait Filter: Send + Sync + Debug {
    fn inner(&self) -> &Arc<dyn BlockBackend>;

    fn size(&self) -> u64 {
        self.inner().size()
    }
    fn caps(&self) -> Caps {
        self.inner().caps()
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.inner().read(offset, buf)
    }
    fn write(&self, offset: u64, buf: &[u8], flags: IoFlags) -> Result<()> {
        self.inner().write(offset, buf, flags)
    }
    fn flush(&self) -> Result<()> {
        self.inner().flush()
    }
    fn trim(&self, offset: u64, len: u64, flags: IoFlags) -> Result<()> {
        self.inner().trim(offset, len, flags)
    }
    fn write_zeroes(&self, offset: u64, len: u64, flags: IoFlags) -> Result<()> {
        self.inner().write_zeroes(offset, len, flags)
    }
    fn cache(&self, offset: u64, len: u64) -> Result<()> {
        self.inner().cache(offset, len)
    }
    fn block_status(&self, offset: u64, len: u64, out: &mut Extents) -> Result<()> {
        self.inner().block_status(offset, len, out)
    }
    fn format_name(&self) -> &'static str {
        self.inner().format_name()
    }
    fn request_alignment(&self) -> u32 {
        self.inner().request_alignment()
    }
    fn bitmap_check(&self, name: &str) -> Result<()> {
        self.inner().bitmap_check(name)
    }
    fn bitmap_status(&self, name: &str, offset: u64, len: u64, out: &mut Extents) -> Result<()> {
        self.inner().bitmap_status(name, offset, len, out)
    }
    fn close(&self) -> Result<()> {
        self.inner().close()
    }
    fn settle(&self) -> Result<()> {
        self.inner().settle()
    }
    fn unsettled(&self) -> bool {
        self.inner().unsettled()
    }
    /// Not forwarded by default: a filter that moves or changes bytes would have to
    /// translate compressed writes too.
    fn compressed_cluster_size(&self) -> Option<u64> {
        None
    }
    fn write_compressed(&self, offset: u64, buf: &[u8]) -> Result<()> {
        let _ = (offset, buf);
        Err(crate::Error::NotSupported("compressed writes"))
    }
    /// Not forwarded by default, as `read_source`.
    fn try_read(&self, offset: u64, buf: &mut [u8]) -> bool {
        let _ = (offset, buf);
        false
    }
    /// Not forwarded by default: a filter that changes or checks writes must see them.
    fn try_write(&self, offset: u64, buf: &[u8]) -> bool {
        let _ = (offset, buf);
        false
    }
    /// Not forwarded by default: a filter that changes what `read` returns must not let a
    /// frontend bypass it. A filter that passes reads through unchanged forwards it.
    fn read_source(&self, offset: u64, len: u64) -> Option<HostSpan<'_>> {
        let _ = (offset, len);
        None
    }
    /// Not forwarded by default, as `try_write`.
    fn write_sink(&self, offset: u64, len: u64) -> Option<HostSpan<'_>> {
        let _ = (offset, len);
        None
    }
}

impl<T: Filter> BlockBackend for T {
    fn size(&self) -> u64 {
        Filter::size(self)
    }
    fn caps(&self) -> Caps {
        Filter::caps(self)
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        Filter::read(self, offset, buf)
    }
    fn write(&self, offset: u64, buf: &[u8], flags: IoFlags) -> Result<()> {
        Filter::write(self, offset, buf, flags)
    }
    fn flush(&self) -> Result<()> {
        Filter::flush(self)
    }
    fn trim(&self, offset: u64, len: u64, flags: IoFlags) -> Result<()> {
        Filter::trim(self, offset, len, flags)
    }
    fn write_zeroes(&self, offset: u64, len: u64, flags: IoFlags) -> Result<()> {
        Filter::write_zeroes(self, offset, len, flags)
    }
    fn cache(&self, offset: u64, len: u64) -> Result<()> {
        Filter::cache(self, offset, len)
    }
    fn block_status(&self, offset: u64, len: u64, out: &mut Extents) -> Result<()> {
        Filter::block_status(self, offset, len, out)
    }
    fn format_name(&self) -> &'static str {
        Filter::format_name(self)
    }
    fn request_alignment(&self) -> u32 {
        Filter::request_alignment(self)
    }
    fn bitmap_check(&self, name: &str) -> Result<()> {
        Filter::bitmap_check(self, name)
    }
    fn bitmap_status(&self, name: &str, offset: u64, len: u64, out: &mut Extents) -> Result<()> {
        Filter::bitmap_status(self, name, offset, len, out)
    }
    fn close(&self) -> Result<()> {
        Filter::close(self)
    }
    fn settle(&self) -> Result<()> {
        Filter::settle(self)
    }
    fn unsettled(&self) -> bool {
        Filter::unsettled(self)
    }
    fn compressed_cluster_size(&self) -> Option<u64> {
        Filter::compressed_cluster_size(self)
    }
    fn write_compressed(&self, offset: u64, buf: &[u8]) -> Result<()> {
        Filter::write_compressed(self, offset, buf)
    }
    fn try_read(&self, offset: u64, buf: &mut [u8]) -> bool {
        Filter::try_read(self, offset, buf)
    }
    fn try_write(&self, offset: u64, buf: &[u8]) -> bool {
        Filter::try_write(self, offset, buf)
    }
    fn read_source(&self, offset: u64, len: u64) -> Option<HostSpan<'_>> {
        Filter::read_source(self, offset, len)
    }
    fn write_sink(&self, offset: u64, len: u64) -> Option<HostSpan<'_>> {
        Filter::write_sink(self, offset, len)
    }
}

/// A writable backend exported read-only: `-r` with `-s`, whose temporary overlay could be
/// written but which qemu-nbd exports read-only all the same.
#[derive(Debug)]
pub struct ReadOnly(pub Arc<dyn BlockBackend>);

impl Filter for ReadOnly {
    fn inner(&self) -> &Arc<dyn BlockBackend> {
        &self.0
    }
    fn caps(&self) -> Caps {
        Caps {
            writable: false,
            trim: false,
            zero: crate::Support::None,
            fast_zero: false,
            ..self.0.caps()
        }
    }
    fn write(&self, _offset: u64, _buf: &[u8], _flags: IoFlags) -> Result<()> {
        Err(crate::Error::ReadOnly)
    }
    fn trim(&self, _offset: u64, _len: u64, _flags: IoFlags) -> Result<()> {
        Err(crate::Error::ReadOnly)
    }
    fn write_zeroes(&self, _offset: u64, _len: u64, _flags: IoFlags) -> Result<()> {
        Err(crate::Error::ReadOnly)
    }
    fn compressed_cluster_size(&self) -> Option<u64> {
        None
    }
    fn write_compressed(&self, _offset: u64, _buf: &[u8]) -> Result<()> {
        Err(crate::Error::ReadOnly)
    }
    fn try_write(&self, _offset: u64, _buf: &[u8]) -> bool {
        false
    }
    fn write_sink(&self, _offset: u64, _len: u64) -> Option<HostSpan<'_>> {
        None
    }
}
