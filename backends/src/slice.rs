//! A window `[offset, offset + size)` of another backend (`-o OFFSET`, `--image-opts offset=,size=`).

use crate::filter::Filter;
use crate::{BlockBackend, Error, Extents, HostSpan, IoFlags, Result};
use std::sync::Arc;

#[derive(Debug)]
pub struct Slice {
    inner: Arc<dyn BlockBackend>,
    offset: u64,
    size: u64,
}

impl Slice {
    /// `size` None means "to the end of `inner`".
    pub fn new(inner: Arc<dyn BlockBackend>, offset: u64, size: Option<u64>) -> Result<Slice> {
        let inner_size = inner.size();
        if offset > inner_size {
            return Err(Error::Open(format!(
                "offset ({offset}) cannot be greater than size of image ({inner_size})"
            )));
        }
        let size = match size {
            None => inner_size - offset,
            Some(s) if offset.checked_add(s).is_some_and(|end| end <= inner_size) => s,
            Some(s) => {
                return Err(Error::Open(format!(
                    "The sum of offset ({offset}) and size ({s}) has to be smaller or equal to the  actual size of the containing file ({inner_size})"
                )))
            }
        };
        Ok(Slice {
            inner,
            offset,
            size,
        })
    }
}

impl Filter for Slice {
    fn inner(&self) -> &Arc<dyn BlockBackend> {
        &self.inner
    }
    fn size(&self) -> u64 {
        self.size
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.inner.read(self.offset + offset, buf)
    }
    fn write(&self, offset: u64, buf: &[u8], flags: IoFlags) -> Result<()> {
        self.inner.write(self.offset + offset, buf, flags)
    }
    fn trim(&self, offset: u64, len: u64, flags: IoFlags) -> Result<()> {
        self.inner.trim(self.offset + offset, len, flags)
    }
    fn write_zeroes(&self, offset: u64, len: u64, flags: IoFlags) -> Result<()> {
        self.inner.write_zeroes(self.offset + offset, len, flags)
    }
    fn cache(&self, offset: u64, len: u64) -> Result<()> {
        self.inner.cache(self.offset + offset, len)
    }
    fn block_status(&self, offset: u64, len: u64, out: &mut Extents) -> Result<()> {
        self.inner.block_status(self.offset + offset, len, out)
    }
    fn bitmap_status(&self, name: &str, offset: u64, len: u64, out: &mut Extents) -> Result<()> {
        self.inner
            .bitmap_status(name, self.offset + offset, len, out)
    }
    fn try_read(&self, offset: u64, buf: &mut [u8]) -> bool {
        self.inner.try_read(self.offset + offset, buf)
    }
    fn try_write(&self, offset: u64, buf: &[u8]) -> bool {
        self.inner.try_write(self.offset + offset, buf)
    }
    fn read_source(&self, offset: u64, len: u64) -> Option<HostSpan<'_>> {
        self.inner.read_source(self.offset + offset, len)
    }
    fn write_sink(&self, offset: u64, len: u64) -> Option<HostSpan<'_>> {
        self.inner.write_sink(self.offset + offset, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raw::{RawFile, RawOptions};
    use std::os::unix::fs::FileExt;

    #[test]
    fn slice_translates_offsets_and_checks_bounds() {
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(8192).unwrap();
        let raw: Arc<dyn BlockBackend> =
            Arc::new(RawFile::open(f.path(), RawOptions::default()).unwrap());
        let s = Slice::new(raw.clone(), 4096, Some(1024)).unwrap();
        assert_eq!(BlockBackend::size(&s), 1024);
        BlockBackend::write(&s, 0, b"abc", IoFlags::empty()).unwrap();
        let mut b = [0u8; 3];
        f.as_file().read_exact_at(&mut b, 4096).unwrap();
        assert_eq!(&b, b"abc");
        assert!(Slice::new(raw.clone(), 8000, Some(1000)).is_err());
        assert!(Slice::new(raw, 9000, None).is_err());
    }
}
