//! qemu's `compress` filter (`--image-opts driver=compress,file.driver=qcow2,...`): every
//! write is stored as compressed clusters; everything else goes straight through. Its unit
//! is the image's cluster (qemu's `request_alignment`), so clients that follow the advertised
//! block size send whole clusters; a smaller write is read, patched and written whole, which
//! only works where the cluster held nothing yet (compression cannot overwrite: EIO), as
//! in qemu.

use crate::filter::Filter;
use crate::{BlockBackend, Error, IoFlags, Result};
use std::sync::Arc;

#[derive(Debug)]
pub struct Compress {
    inner: Arc<dyn BlockBackend>,
    cluster: u64,
}

impl Compress {
    /// qemu's words when `inner` cannot store compressed clusters.
    pub fn new(inner: Arc<dyn BlockBackend>) -> Result<Compress> {
        match inner.compressed_cluster_size() {
            Some(cluster) => Ok(Compress { inner, cluster }),
            None => Err(Error::Open(format!(
                "Compression is not supported for underlying format: {}",
                inner.format_name()
            ))),
        }
    }

    /// The clusters `[offset, offset + len)` touches, as one aligned range clipped to the
    /// image's end.
    fn widen(&self, offset: u64, len: u64) -> (u64, u64) {
        let start = offset - offset % self.cluster;
        let end = (offset + len).div_ceil(self.cluster) * self.cluster;
        (start, end.min(self.inner.size()) - start)
    }
}

impl Filter for Compress {
    fn inner(&self) -> &Arc<dyn BlockBackend> {
        &self.inner
    }

    fn request_alignment(&self) -> u32 {
        self.cluster.min(u64::from(u32::MAX)) as u32
    }

    fn write(&self, offset: u64, buf: &[u8], flags: IoFlags) -> Result<()> {
        let (start, len) = self.widen(offset, buf.len() as u64);
        if start == offset && len == buf.len() as u64 {
            self.inner.write_compressed(offset, buf)?;
        } else {
            let mut whole = vec![0u8; len as usize];
            self.inner.read(start, &mut whole)?;
            let at = (offset - start) as usize;
            whole[at..at + buf.len()].copy_from_slice(buf);
            self.inner.write_compressed(start, &whole)?;
        }
        if flags.contains(IoFlags::FUA) {
            self.inner.flush()?;
        }
        Ok(())
    }

    /// Reads are the inner image's own (writes are not: `try_write` is not forwarded).
    fn try_read(&self, offset: u64, buf: &mut [u8]) -> bool {
        self.inner.try_read(offset, buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_images_cannot_compress() {
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(1 << 20).unwrap();
        let raw = crate::raw::RawFile::open(f.path(), Default::default()).unwrap();
        let e = Compress::new(Arc::new(raw)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "Compression is not supported for underlying format: raw"
        );
    }
}
