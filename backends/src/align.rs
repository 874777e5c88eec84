//! Requests of any alignment over a backend that takes whole 512-byte sectors only (an
//! encrypted image): the aligned middle goes straight through; a partial first or last
//! sector is read, patched and written back (qemu's block layer does the same above a
//! driver's `request_alignment`). Such read-modify-writes of one sector are serialised by a
//! lock striped by sector, so two partial writes to one sector cannot lose each other's bytes.
//! No allocation: a partial sector lives on the stack.

use crate::filter::Filter;
use crate::{BlockBackend, HostSpan, IoFlags, Result};
use parking_lot::Mutex;
use std::sync::Arc;

const SECTOR: u64 = 512;
const STRIPES: usize = 64;

#[derive(Debug)]
pub struct Aligned {
    inner: Arc<dyn BlockBackend>,
    stripes: Box<[Mutex<()>]>,
}

/// `[offset, offset + len)` cut into a partial head sector, whole sectors, a partial tail.
struct Cut {
    /// (sector start, offset in it, length) of a partial first sector.
    head: Option<(u64, usize, usize)>,
    /// Whole sectors: (offset, length), as a byte range of the request.
    middle: Option<(u64, usize)>,
    tail: Option<(u64, usize, usize)>,
}

fn cut(offset: u64, len: u64) -> Cut {
    let end = offset + len;
    let first = offset - offset % SECTOR;
    let mut c = Cut {
        head: None,
        middle: None,
        tail: None,
    };
    if offset / SECTOR == (end - 1) / SECTOR && (!offset.is_multiple_of(SECTOR) || len < SECTOR) {
        // Inside one sector, not all of it.
        c.head = Some((first, (offset - first) as usize, len as usize));
        return c;
    }
    let mid_start = offset.next_multiple_of(SECTOR);
    let mid_end = end - end % SECTOR;
    if mid_start != offset {
        c.head = Some((
            first,
            (offset - first) as usize,
            (mid_start - offset) as usize,
        ));
    }
    if mid_end > mid_start {
        c.middle = Some((mid_start, (mid_end - mid_start) as usize));
    }
    if mid_end != end {
        c.tail = Some((mid_end, 0, (end - mid_end) as usize));
    }
    c
}

impl Aligned {
    pub fn new(inner: Arc<dyn BlockBackend>) -> Aligned {
        Aligned {
            inner,
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
        }
    }

    /// Part of one sector: read it and copy out.
    fn read_part(&self, sector: u64, at: usize, out: &mut [u8]) -> Result<()> {
        let mut s = [0u8; SECTOR as usize];
        let n = (self.inner.size() - sector).min(SECTOR) as usize;
        self.inner.read(sector, &mut s[..n])?;
        out.copy_from_slice(&s[at..at + out.len()]);
        Ok(())
    }

    /// Part of one sector: read, patch with `data` (None: zeroes), write back, under the
    /// sector's stripe lock.
    fn write_part(
        &self,
        sector: u64,
        at: usize,
        len: usize,
        data: Option<&[u8]>,
        flags: IoFlags,
    ) -> Result<()> {
        let _g = self.stripes[(sector / SECTOR) as usize % STRIPES].lock();
        let mut s = [0u8; SECTOR as usize];
        let n = (self.inner.size() - sector).min(SECTOR) as usize;
        self.inner.read(sector, &mut s[..n])?;
        match data {
            Some(d) => s[at..at + len].copy_from_slice(d),
            None => s[at..at + len].fill(0),
        }
        self.inner.write(sector, &s[..n], flags)
    }
}

impl Filter for Aligned {
    fn inner(&self) -> &Arc<dyn BlockBackend> {
        &self.inner
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let c = cut(offset, buf.len() as u64);
        let mut at = 0usize;
        if let Some((s, o, n)) = c.head {
            self.read_part(s, o, &mut buf[..n])?;
            at = n;
        }
        if let Some((o, n)) = c.middle {
            self.inner.read(o, &mut buf[at..at + n])?;
            at += n;
        }
        if let Some((s, o, n)) = c.tail {
            self.read_part(s, o, &mut buf[at..at + n])?;
        }
        Ok(())
    }

    fn write(&self, offset: u64, buf: &[u8], flags: IoFlags) -> Result<()> {
        let c = cut(offset, buf.len() as u64);
        let mut at = 0usize;
        if let Some((s, o, n)) = c.head {
            self.write_part(s, o, n, Some(&buf[..n]), flags)?;
            at = n;
        }
        if let Some((o, n)) = c.middle {
            self.inner.write(o, &buf[at..at + n], flags)?;
            at += n;
        }
        if let Some((s, o, n)) = c.tail {
            self.write_part(s, o, n, Some(&buf[at..at + n]), flags)?;
        }
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: IoFlags) -> Result<()> {
        let c = cut(offset, len);
        // Partial sectors are written as data: never fast.
        if (c.head.is_some() || c.tail.is_some()) && flags.contains(IoFlags::FAST_ZERO) {
            return Err(crate::Error::NotSupported("fast zero"));
        }
        if let Some((s, o, n)) = c.head {
            self.write_part(s, o, n, None, flags)?;
        }
        if let Some((o, n)) = c.middle {
            self.inner.write_zeroes(o, n as u64, flags)?;
        }
        if let Some((s, o, n)) = c.tail {
            self.write_part(s, o, n, None, flags)?;
        }
        Ok(())
    }

    fn request_alignment(&self) -> u32 {
        SECTOR as u32
    }

    /// Whole clusters are whole sectors: straight to the inner layer.
    fn compressed_cluster_size(&self) -> Option<u64> {
        self.inner.compressed_cluster_size()
    }

    fn write_compressed(&self, offset: u64, buf: &[u8]) -> Result<()> {
        self.inner.write_compressed(offset, buf)
    }

    /// Whole sectors are read straight from the inner layer.
    fn try_read(&self, offset: u64, buf: &mut [u8]) -> bool {
        let c = cut(offset, buf.len() as u64);
        c.head.is_none() && c.tail.is_none() && self.inner.try_read(offset, buf)
    }

    /// Whole sectors are written straight to the inner layer.
    fn try_write(&self, offset: u64, buf: &[u8]) -> bool {
        let c = cut(offset, buf.len() as u64);
        c.head.is_none() && c.tail.is_none() && self.inner.try_write(offset, buf)
    }

    /// Whole sectors are read straight from the inner layer, so they may be spliced too.
    fn read_source(&self, offset: u64, len: u64) -> Option<HostSpan<'_>> {
        let c = cut(offset, len);
        if c.head.is_some() || c.tail.is_some() {
            return None;
        }
        self.inner.read_source(offset, len)
    }

    /// Whole sectors are written straight to the inner layer.
    fn write_sink(&self, offset: u64, len: u64) -> Option<HostSpan<'_>> {
        let c = cut(offset, len);
        if c.head.is_some() || c.tail.is_some() {
            return None;
        }
        self.inner.write_sink(offset, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Caps, Error};

    /// A memory backend that refuses anything not sector aligned.
    #[derive(Debug)]
    struct Strict(Mutex<Vec<u8>>);

    impl BlockBackend for Strict {
        fn size(&self) -> u64 {
            self.0.lock().len() as u64
        }
        fn caps(&self) -> Caps {
            Caps {
                writable: true,
                ..Caps::READ_ONLY
            }
        }
        fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
            if !offset.is_multiple_of(SECTOR) || !(buf.len() as u64).is_multiple_of(SECTOR) {
                return Err(Error::Invalid("unaligned".into()));
            }
            buf.copy_from_slice(&self.0.lock()[offset as usize..offset as usize + buf.len()]);
            Ok(())
        }
        fn write(&self, offset: u64, buf: &[u8], _: IoFlags) -> Result<()> {
            if !offset.is_multiple_of(SECTOR) || !(buf.len() as u64).is_multiple_of(SECTOR) {
                return Err(Error::Invalid("unaligned".into()));
            }
            self.0.lock()[offset as usize..offset as usize + buf.len()].copy_from_slice(buf);
            Ok(())
        }
        fn flush(&self) -> Result<()> {
            Ok(())
        }
        fn trim(&self, _: u64, _: u64, _: IoFlags) -> Result<()> {
            Ok(())
        }
        fn write_zeroes(&self, offset: u64, len: u64, f: IoFlags) -> Result<()> {
            self.write(offset, &vec![0u8; len as usize], f)
        }
        fn format_name(&self) -> &'static str {
            "strict"
        }
    }

    #[test]
    fn every_alignment_reads_and_writes_like_a_plain_buffer() {
        let size = 4096usize;
        let a = Aligned::new(Arc::new(Strict(Mutex::new(vec![0u8; size]))));
        let mut model = vec![0u8; size];
        let mut seed = 1u64;
        for i in 0..2000u32 {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let off = (seed >> 33) as usize % size;
            let len = 1 + (seed >> 13) as usize % (size - off).min(1500);
            if i % 3 == 0 {
                let mut got = vec![0u8; len];
                BlockBackend::read(&a, off as u64, &mut got).unwrap();
                assert_eq!(got, model[off..off + len], "read {off}+{len}");
            } else if i % 7 == 0 {
                BlockBackend::write_zeroes(&a, off as u64, len as u64, IoFlags::empty()).unwrap();
                model[off..off + len].fill(0);
            } else {
                let data: Vec<u8> = (0..len).map(|k| (k as u32 ^ i) as u8 | 1).collect();
                BlockBackend::write(&a, off as u64, &data, IoFlags::empty()).unwrap();
                model[off..off + len].copy_from_slice(&data);
            }
        }
        let mut all = vec![0u8; size];
        BlockBackend::read(&a, 0, &mut all).unwrap();
        assert_eq!(all, model);
        assert_eq!(BlockBackend::request_alignment(&a), 512);
    }
}
