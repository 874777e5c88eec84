//! Block status: data, zero or unallocated per (sub)cluster, asking the backing chain about
//! unallocated runs so the depth says which layer the bytes come from. As qemu's
//! bdrv_co_block_status, a data cluster whose host bytes are a hole in the image file (or
//! lie past its end) reads as zero: ZERO without HOLE ("zero": true, "data": true in
//! `qemu-img map`).

use super::{Qcow2, Sc};
use crate::file::HostFile;
use crate::{Extent, ExtentFlags, Extents, Result};

/// Enough for one reply; the caller asks again for the rest.
const MAX_EXTENTS: usize = 1024;

impl Qcow2 {
    pub(super) fn status(&self, offset: u64, len: u64, out: &mut Extents) -> Result<()> {
        let end = offset + len;
        let cb = self.geo.cluster_bits;
        let sc = self.geo.sc_bits;
        let l2_span = 1u64 << (cb + self.geo.l2_bits);
        let mut pos = offset;
        // A pending run of unallocated bytes, resolved through the backing chain at once.
        let mut hole_start: Option<u64> = None;
        let mut host = HostRuns::default();
        while pos < end && out.len() < MAX_EXTENTS {
            let g = pos >> cb;
            let entry = self.meta.lock().entry(&self.f, &self.geo, g)?;
            let Some(e) = entry else {
                // The whole L2 range is unallocated.
                hole_start.get_or_insert(pos);
                pos = ((pos / l2_span) + 1) * l2_span;
                continue;
            };
            let cluster_end = (g + 1) << cb;
            while pos < end.min(cluster_end) {
                let in_off = pos - (g << cb);
                let st = self.state(e, in_off >> sc)?;
                let next = (((in_off >> sc) + 1) << sc) + (g << cb);
                let n = next.min(end) - pos;
                match st {
                    Sc::Unalloc => {
                        hole_start.get_or_insert(pos);
                    }
                    Sc::Data | Sc::Compressed | Sc::Zero => {
                        if let Some(h) = hole_start.take() {
                            self.status_backing(h, pos - h, out)?;
                        }
                        if st == Sc::Data {
                            host.push(&self.f, e.host() + in_off, n, out)?;
                        } else {
                            let flags = if st == Sc::Zero {
                                ExtentFlags::HOLE | ExtentFlags::ZERO
                            } else {
                                ExtentFlags::empty()
                            };
                            out.push(Extent::new(n, flags, 1));
                        }
                    }
                }
                pos += n;
            }
        }
        if let Some(h) = hole_start {
            self.status_backing(h, pos.min(end) - h, out)?;
        }
        Ok(())
    }

    fn status_backing(&self, offset: u64, len: u64, out: &mut Extents) -> Result<()> {
        let hole = ExtentFlags::HOLE | ExtentFlags::ZERO;
        let Some(b) = &self.backing else {
            out.push(Extent::new(len, hole, 0));
            return Ok(());
        };
        let bsize = b.size();
        let end = offset + len;
        let mut pos = offset;
        let mut tmp = Extents::new();
        while pos < end.min(bsize) {
            tmp.clear();
            let want = end.min(bsize) - pos;
            b.block_status(pos, want, &mut tmp)?;
            if tmp.is_empty() {
                break;
            }
            for x in tmp.iter() {
                let n = x.len.min(end.min(bsize) - pos);
                if n == 0 {
                    break;
                }
                let depth = if x.depth == 0 { 0 } else { x.depth + 1 };
                out.push(Extent::new(n, x.flags, depth));
                pos += n;
            }
        }
        if pos < end {
            out.push(Extent::new(end - pos, hole, 0));
        }
        Ok(())
    }
}

/// What the image file says about host ranges: the last data run and the last hole found,
/// so that consecutive clusters cost no more lseek calls than the file has runs.
#[derive(Default)]
struct HostRuns {
    data: std::ops::Range<u64>,
    hole: std::ops::Range<u64>,
    /// No SEEK_DATA here (a block device, or a file system without it): all data.
    unsupported: bool,
}

impl HostRuns {
    /// Push `len` data bytes at host offset `at`, the parts in a hole of the file as zero.
    fn push(&mut self, f: &HostFile, at: u64, len: u64, out: &mut Extents) -> Result<()> {
        let end = at + len;
        let mut pos = at;
        while pos < end {
            if self.unsupported || self.data.contains(&pos) {
                let n = if self.unsupported {
                    end
                } else {
                    self.data.end.min(end)
                } - pos;
                out.push(Extent::new(n, ExtentFlags::empty(), 1));
                pos += n;
                continue;
            }
            if self.hole.contains(&pos) {
                let n = self.hole.end.min(end) - pos;
                out.push(Extent::new(n, ExtentFlags::ZERO, 1));
                pos += n;
                continue;
            }
            self.learn(f, pos)?;
        }
        Ok(())
    }

    /// Find the run of the file that holds `pos`.
    fn learn(&mut self, f: &HostFile, pos: u64) -> Result<()> {
        if f.is_block_device() {
            self.unsupported = true;
            return Ok(());
        }
        match f.seek(pos, libc::SEEK_DATA) {
            Ok(Some(d)) if d <= pos => {
                let h = f
                    .seek(pos, libc::SEEK_HOLE)
                    .ok()
                    .flatten()
                    .unwrap_or(u64::MAX);
                self.data = pos..h.max(pos + 1);
            }
            // A hole up to the next data, or up to the end of everything past the last data.
            Ok(d) => self.hole = pos..d.unwrap_or(u64::MAX),
            // Extra information only, as for qemu: without it the bytes are data.
            Err(_) => self.unsupported = true,
        }
        Ok(())
    }
}
