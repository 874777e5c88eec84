//! Write-zeroes and discard: whole clusters (and, with extended L2, whole subclusters) change
//! only metadata; partial ones fall back to writing zeroes (write-zeroes) or are ignored
//! (discard, as qemu does).

use super::meta::{need, Entry, Step, ALL_ZERO, COPIED, ZERO};
use super::{Qcow2, Sc};
use crate::{Error, IoFlags, Result};

#[derive(Clone, Copy, PartialEq, Eq)]
enum Op {
    Zero { unmap: bool },
    Discard,
}

impl Qcow2 {
    fn whole(&self, g: u64, in_off: u64, n: u64) -> bool {
        in_off == 0 && (n == self.geo.cs || (g << self.geo.cluster_bits) + n >= self.geo.size)
    }

    /// Can the range be zeroed without writing data? (FAST_ZERO's question.)
    fn zero_is_fast(&self, offset: u64, len: u64) -> Result<bool> {
        for (g, in_off, n) in self.pieces(offset, len) {
            if self.whole(g, in_off, n) {
                if self.geo.version < 3 && self.backing.is_some() {
                    return Ok(false);
                }
                continue;
            }
            let e = self.entry(g)?;
            if e.compressed() || !self.geo.extended {
                if !self.cluster_reads_zero(g, e)? {
                    return Ok(false);
                }
                continue;
            }
            let sc = self.geo.sc_bits;
            for i in [in_off >> sc, (in_off + n - 1) >> sc] {
                let full = (in_off <= i << sc) && in_off + n >= (i + 1) << sc;
                if !full && !self.sc_reads_zero(g, e, i)? {
                    return Ok(false);
                }
            }
        }
        Ok(true)
    }

    fn sc_reads_zero(&self, g: u64, e: Entry, i: u64) -> Result<bool> {
        Ok(match self.state(e, i)? {
            Sc::Zero => true,
            Sc::Unalloc => self.backing_is_zero(g << self.geo.cluster_bits),
            _ => false,
        })
    }

    pub(super) fn zero(&self, offset: u64, len: u64, flags: IoFlags) -> Result<()> {
        if flags.contains(IoFlags::FAST_ZERO) && !self.zero_is_fast(offset, len)? {
            return Err(Error::NotSupported("fast zero"));
        }
        let unmap = flags.contains(IoFlags::MAY_TRIM) && self.opts.discard;
        for (g, in_off, n) in self.pieces(offset, len) {
            if self.whole(g, in_off, n) {
                if !self.set_whole(g, Op::Zero { unmap })? {
                    self.write_piece(g, in_off, &vec![0u8; n as usize])?;
                }
                continue;
            }
            self.zero_partial(g, in_off, n)?;
        }
        Ok(())
    }

    pub(super) fn discard(&self, offset: u64, len: u64) -> Result<()> {
        for (g, in_off, n) in self.pieces(offset, len) {
            if self.whole(g, in_off, n) {
                self.set_whole(g, Op::Discard)?;
            }
        }
        Ok(())
    }

    fn zero_partial(&self, g: u64, in_off: u64, n: u64) -> Result<()> {
        let e = self.entry(g)?;
        if e.compressed() || !self.geo.extended {
            if !self.cluster_reads_zero(g, e)? {
                self.write_piece(g, in_off, &vec![0u8; n as usize])?;
            }
            return Ok(());
        }
        let sc = self.geo.sc_bits;
        let end = in_off + n;
        let mut full_mask = 0u64;
        let mut i = in_off >> sc;
        while i << sc < end {
            let (s, t) = (i << sc, (i + 1) << sc);
            if in_off <= s && end >= t {
                full_mask |= 1 << i;
            } else if !self.sc_reads_zero(g, e, i)? {
                let a = in_off.max(s);
                let b = end.min(t);
                self.write_piece(g, a, &vec![0u8; (b - a) as usize])?;
            }
            i += 1;
        }
        if full_mask != 0 {
            let _s = self.stripe(g).write();
            let a = full_mask.trailing_zeros() as u64;
            let b = 64 - full_mask.leading_zeros() as u64;
            self.zero_raw_data(
                (g << self.geo.cluster_bits) + (a << sc),
                (b - a) << sc,
                false,
            )?;
            let compressed = self.with_meta(|m| {
                let old = m.entry(&self.f, &self.geo, g)?.unwrap_or_default();
                if old.compressed() {
                    return Ok(Step::Done(true));
                }
                let new = Entry {
                    desc: old.desc,
                    bm: (old.bm | (full_mask << 32)) & !full_mask,
                };
                if new != old {
                    need!(m.set_entry(&self.f, &self.geo, g, new));
                }
                Ok(Step::Done(false))
            })?;
            if compressed {
                drop(_s);
                // Compressed clusters have no subclusters: write the zeroes.
                return self.write_piece(g, a << sc, &vec![0u8; ((b - a) << sc) as usize]);
            }
        }
        Ok(())
    }

    /// Zero or discard a whole cluster by its L2 entry. False when the format cannot say
    /// "zero" here (v2 over a backing file): the caller writes zeroes.
    fn set_whole(&self, g: u64, op: Op) -> Result<bool> {
        let _s = self.stripe(g).write();
        let base = g << self.geo.cluster_bits;
        let has_backing = !self.backing_is_zero(base);
        if let Op::Zero { unmap } = op {
            self.zero_raw_data(base, self.geo.cs.min(self.geo.size - base), unmap)?;
        }
        let (done, dropped) = self.with_meta(|m| {
            let old = m.entry(&self.f, &self.geo, g)?.unwrap_or_default();
            let keep = self.owns(old) && matches!(op, Op::Zero { unmap: false });
            let Some(new) = self.whole_entry(old, op, keep, has_backing) else {
                return Ok(Step::Done((false, None)));
            };
            // Nothing to record for never-written clusters without a backing file: they
            // already read as zeroes, and skipping avoids allocating L2 tables for a
            // whole-disk zeroing.
            if new == old || (old == Entry::default() && !has_backing) {
                return Ok(Step::Done((true, None)));
            }
            need!(m.set_entry(&self.f, &self.geo, g, new));
            // A v2 entry cannot keep its cluster and say "zero": it drops it, keep or not.
            if !keep || new.host() != old.host() {
                if self.external_data() {
                    let dropped = self.geo.has_cluster(old).then_some(old.host());
                    return Ok(Step::Done((true, dropped)));
                }
                m.queue_free(&self.geo, old);
            }
            Ok(Step::Done((true, None)))
        })?;
        if let Some(host) = dropped {
            self.drop_data_cluster(host)?;
        }
        Ok(done)
    }

    /// The entry a whole-cluster zero or discard leaves; None when the format cannot say
    /// "zero" here (v2 over a backing file): the caller writes zeroes, or a discard does nothing.
    fn whole_entry(&self, old: Entry, op: Op, keep: bool, has_backing: bool) -> Option<Entry> {
        Some(if !self.geo.extended {
            if self.geo.version < 3 {
                // Without a zero flag, both would show the backing file's stale bytes: a
                // zeroing writes zeroes instead, a discard does nothing (as qemu's).
                if has_backing {
                    return None;
                }
                Entry::default()
            } else if keep {
                Entry {
                    desc: old.host() | COPIED | ZERO,
                    bm: 0,
                }
            } else if op == Op::Discard && !has_backing {
                Entry::default()
            } else {
                Entry { desc: ZERO, bm: 0 }
            }
        } else if keep {
            Entry {
                desc: old.desc,
                bm: ALL_ZERO,
            }
        } else if op == Op::Discard && !has_backing {
            Entry::default()
        } else {
            Entry {
                desc: 0,
                bm: ALL_ZERO,
            }
        })
    }
}
