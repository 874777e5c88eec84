//! Guest writes into one cluster: in place when the cluster is ours and plainly allocated;
//! otherwise an allocating write (a new cluster, or an owned one whose subclusters or zero
//! flag change) with copy-on-write of what the old mapping holds around the new bytes.
//! See the module doc for the order: refcount raised and file extended under the lock, data
//! and COW written without it, then the L2 entry linked and the old cluster's release queued.

use super::meta::{need, Entry, Meta, Step, COPIED};
use super::Qcow2;
use crate::Result;

/// What an allocating write does, decided under the metadata lock.
enum Plan {
    InPlace(u64),
    Alloc {
        old: Entry,
        target: u64,
        fresh: bool,
        reuse: bool,
    },
}

impl Qcow2 {
    pub(super) fn touched_mask(&self, in_off: u64, n: u64) -> u64 {
        if !self.geo.extended {
            return 0;
        }
        let first = in_off >> self.geo.sc_bits;
        let last = (in_off + n - 1) >> self.geo.sc_bits;
        let bits = last - first + 1;
        let m = if bits >= 64 {
            u64::MAX
        } else {
            (1u64 << bits) - 1
        };
        (m << first) & 0xffff_ffff
    }

    pub(super) fn in_place(&self, e: Entry, touched: u64) -> bool {
        if !self.owns(e) {
            return false;
        }
        if self.geo.extended {
            e.bm & touched == touched
        } else {
            self.geo.version < 3 || e.desc & super::ZERO == 0
        }
    }

    /// qemu's overlap check for a data write: guest data must never land on metadata.
    /// (An external data file holds no metadata: nothing to check.)
    pub(super) fn check_data(&self, m: &Meta, host: u64, len: u64) -> Result<()> {
        if self.external_data() {
            return Ok(());
        }
        super::refcount::check_overlap(&self.f, &m.map, host, len, None)
    }

    /// `write` of part of one cluster without FUA, if nothing needs to wait: no lock held by
    /// another thread, a mapping in the metadata cache that takes the data in place (an
    /// owned cluster, every touched subcluster allocated), whole pages into the page cache
    /// (`HostFile::try_write`). False otherwise (a cluster to allocate or copy, compressed or
    /// encrypted data, a failed overlap check): the caller writes the usual way. The stripe's
    /// read lock is held across the data write, as on the usual in-place path, so a discard
    /// cannot free the cluster under it.
    pub(super) fn try_write_piece(&self, g: u64, in_off: u64, data: &[u8]) -> bool {
        if self.crypto.is_some() || self.usable().is_err() {
            return false;
        }
        let n = data.len() as u64;
        let touched = self.touched_mask(in_off, n);
        let Some(_s) = self.stripe(g).try_read_for(super::INLINE_LOCK_WAIT) else {
            return false;
        };
        let host = {
            let Some(mut m) = self.meta.try_lock_for(super::INLINE_LOCK_WAIT) else {
                return false;
            };
            let Some(e) = m.cached_entry(&self.geo, g) else {
                return false;
            };
            if !self.in_place(e, touched) {
                return false;
            }
            let host = e.host() + in_off;
            if self.check_data(&m, host, n).is_err() {
                return false;
            }
            host
        };
        self.df().try_write(host, data)
    }

    pub(super) fn write_piece(&self, g: u64, in_off: u64, data: &[u8]) -> Result<()> {
        self.write_piece_fua(g, in_off, data, false).map(|_| ())
    }

    /// With `fua`, an in-place write over a mapping that is already durable is written with
    /// O_DSYNC and needs no flush: returns whether the write is durable.
    pub(super) fn write_piece_fua(
        &self,
        g: u64,
        in_off: u64,
        data: &[u8],
        fua: bool,
    ) -> Result<bool> {
        let n = data.len() as u64;
        let touched = self.touched_mask(in_off, n);
        {
            let _s = self.stripe(g).read();
            let mut m = self.meta.lock();
            let e = m.entry(&self.f, &self.geo, g)?.unwrap_or_default();
            if self.in_place(e, touched) {
                let host = e.host() + in_off;
                self.check_data(&m, host, n)?;
                let dsync = fua && m.mapping_durable(&self.f, &self.geo, g)?;
                drop(m);
                self.write_data(host, data, dsync)?;
                return Ok(dsync);
            }
        }
        let _s = self.stripe(g).write();
        let plan = self.with_meta(|m| self.plan_write(m, g, in_off, n, touched))?;
        let (old, target, fresh, reuse) = match plan {
            Plan::InPlace(host) => return self.write_data(host, data, false).map(|()| false),
            Plan::Alloc {
                old,
                target,
                fresh,
                reuse,
            } => (old, target, fresh, reuse),
        };
        crate::file::record::test_delay();
        let new = match self.fill_cluster(g, old, target, fresh, reuse, in_off, data) {
            Ok(e) => e,
            Err(e) => {
                if !reuse {
                    // Nothing points at the new cluster: give it back now.
                    self.meta
                        .lock()
                        .unalloc(&self.f, target, self.geo.cluster_bits)?;
                }
                return Err(e);
            }
        };
        crate::file::record::test_delay();
        let over = self.with_meta(|m| {
            need!(m.set_entry(&self.f, &self.geo, g, new));
            if !reuse {
                m.queue_free(&self.geo, old);
            }
            Ok(Step::Done(m.l2.over_budget() || m.rc.blocks.over_budget()))
        })?;
        drop(_s);
        if over {
            // Dirty tables cannot be evicted: make them clean.
            self.flush()?;
        }
        Ok(false)
    }

    /// Under the metadata lock, with the stripe held exclusively: where the write goes.
    fn plan_write(
        &self,
        m: &mut Meta,
        g: u64,
        in_off: u64,
        n: u64,
        touched: u64,
    ) -> Result<Step<Plan>> {
        let old = m.entry(&self.f, &self.geo, g)?.unwrap_or_default();
        if self.in_place(old, touched) {
            let host = old.host() + in_off;
            self.check_data(m, host, n)?;
            return Ok(Step::Done(Plan::InPlace(host)));
        }
        if self.external_data() {
            // The cluster at its own guest offset, unrefcounted (`data_file.rs`); it may
            // hold a discarded range's old bytes, so it is not fresh.
            need!(m.l2_for_write(&self.f, &self.geo, (g >> self.geo.l2_bits) as usize));
            return Ok(Step::Done(Plan::Alloc {
                old,
                target: g << self.geo.cluster_bits,
                fresh: false,
                reuse: true,
            }));
        }
        // An owned cluster (zero with preallocation, or partly allocated subclusters) is
        // reused; anything shared, compressed or absent gets a new cluster.
        if self.owns(old) {
            self.check_data(m, old.host(), self.geo.cs)?;
            need!(m.l2_for_write(&self.f, &self.geo, (g >> self.geo.l2_bits) as usize));
            return Ok(Step::Done(Plan::Alloc {
                old,
                target: old.host(),
                fresh: false,
                reuse: true,
            }));
        }
        need!(m.l2_for_write(&self.f, &self.geo, (g >> self.geo.l2_bits) as usize));
        let (target, fresh) = need!(m.alloc(&self.f));
        if let Err(e) = self.check_data(m, target, self.geo.cs) {
            m.unalloc(&self.f, target, self.geo.cluster_bits)?;
            return Err(e);
        }
        Ok(Step::Done(Plan::Alloc {
            old,
            target,
            fresh,
            reuse: false,
        }))
    }

    /// Zero a whole new cluster cheaply (fallocate), else by writing zeroes.
    fn zero_cluster(&self, target: u64) -> Result<()> {
        if self.df().zero_range(target, self.geo.cs).is_ok() {
            return Ok(());
        }
        self.df().write(
            "write zeroes",
            target,
            &vec![0u8; self.geo.cs as usize],
            false,
        )
    }

    /// Write `data` at `in_off` of guest cluster `g` into host cluster `target`, copying what
    /// the old mapping holds around it. Returns the new entry.
    #[allow(clippy::too_many_arguments)]
    fn fill_cluster(
        &self,
        g: u64,
        old: Entry,
        target: u64,
        fresh: bool,
        reuse: bool,
        in_off: u64,
        data: &[u8],
    ) -> Result<Entry> {
        let cs = self.geo.cs;
        let n = data.len() as u64;
        if !self.geo.extended {
            // Zeroes on disk are no encrypted zeroes: an encrypted image writes the whole
            // cluster (qemu skips its zero-write shortcut for encrypted images too).
            let old_zero = n < cs && !self.is_encrypted() && self.cluster_reads_zero(g, old)?;
            if n == cs {
                self.write_data(target, data, false)?;
            } else if old_zero {
                if !fresh {
                    self.zero_cluster(target)?;
                }
                self.df().write("write", target + in_off, data, false)?;
            } else {
                let mut buf = vec![0u8; cs as usize];
                self.read_mapped(g, old, 0, &mut buf)?;
                buf[in_off as usize..(in_off + n) as usize].copy_from_slice(data);
                self.write_buf(target, &mut buf)?;
            }
            return Ok(Entry {
                desc: target | COPIED,
                bm: 0,
            });
        }
        let touched = self.touched_mask(in_off, n);
        let (alloc, zero) = if old.compressed() {
            (0xffff_ffff, 0)
        } else {
            (old.bm & 0xffff_ffff, old.bm >> 32)
        };
        if !reuse && (old.compressed() || old.host() != 0) {
            // The old host cluster is shared or compressed: move everything it holds.
            let mut buf = vec![0u8; cs as usize];
            self.read_mapped(g, old, 0, &mut buf)?;
            buf[in_off as usize..(in_off + n) as usize].copy_from_slice(data);
            self.write_buf(target, &mut buf)?;
        } else {
            let sc = self.geo.sc_bits;
            let scs = 1u64 << sc;
            let span_start = (in_off >> sc) << sc;
            let span_end = (((in_off + n - 1) >> sc) + 1) << sc;
            let mut buf = vec![0u8; (span_end - span_start) as usize];
            let end = in_off + n;
            let head_partial = in_off > span_start;
            let tail_partial = end < span_end;
            let last_at = span_end - scs;
            // Partial subclusters keep what they read as (backing, zeroes or old data).
            if head_partial {
                self.read_mapped(g, old, span_start, &mut buf[..scs as usize])?;
            }
            if tail_partial && !(head_partial && last_at == span_start) {
                self.read_mapped(g, old, last_at, &mut buf[(last_at - span_start) as usize..])?;
            }
            buf[(in_off - span_start) as usize..(end - span_start) as usize].copy_from_slice(data);
            self.write_buf(target + span_start, &mut buf)?;
        }
        Ok(Entry {
            desc: target | COPIED,
            bm: ((zero & !touched) << 32) | alloc | touched,
        })
    }
}
