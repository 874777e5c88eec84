//! Block status: data, zero or unallocated per (sub)cluster, asking the backing chain about
//! unallocated runs so the depth says which layer the bytes come from.

use super::{Qcow2, Sc};
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
                        if st == Sc::Data && self.data.as_ref().is_some_and(|d| d.raw) {
                            // qemu's BDRV_BLOCK_RECURSE: the raw data file's holes are zeroes.
                            self.df().zero_status(e.host() + (pos - (g << cb)), n, out);
                            pos += n;
                            continue;
                        }
                        let flags = if st == Sc::Zero {
                            ExtentFlags::HOLE | ExtentFlags::ZERO
                        } else {
                            ExtentFlags::empty()
                        };
                        out.push(Extent::new(n, flags, 1));
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
        crate::backing::status(self.backing.as_ref(), offset, len, out)
    }
}
