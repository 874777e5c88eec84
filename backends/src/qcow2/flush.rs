//! The one flush path: NBD FLUSH, FUA, writethrough, a full cache, close. It writes the
//! dirty metadata in dependency order from a consistent copy (see the module doc) while
//! holding the flush gate, then syncs.

use super::cache::DirtyCopy;
use super::meta::Release;
use super::overlap::Kind;
use super::refcount::check_overlap;
use super::{Gate, Qcow2};
use crate::Result;
use std::sync::atomic::Ordering;

/// What one flush writes, copied at one instant under the metadata lock.
#[derive(Default)]
struct Cut {
    blocks: Vec<DirtyCopy>,
    entries: Vec<(usize, u64)>,
    /// Where the refcount table is (it moves only under the gate, which the flush holds).
    table_offset: u64,
    l2: Vec<DirtyCopy>,
    l1: Vec<(usize, u64)>,
    frees: Vec<Release>,
}

impl Qcow2 {
    /// Make every write completed before this call durable.
    pub fn flush(&self) -> Result<()> {
        if self.opts.read_only {
            return Ok(());
        }
        let r = self.flush_inner();
        self.checked(r)
    }

    fn flush_inner(&self) -> Result<()> {
        self.usable()?;
        let gen = self.write_gen.load(Ordering::Acquire);
        let mut gate = self.gate.lock();
        if gate.flushed_gen >= gen {
            // A flush that started after every write we cover has finished.
            return Ok(());
        }
        self.writeback(&mut gate)?;
        gate.flushed_gen = gate.flushed_gen.max(gen);
        Ok(())
    }

    /// Write the dirty metadata and sync; the caller holds the gate.
    fn writeback(&self, _gate: &mut Gate) -> Result<()> {
        let cut = self.copy_cut()?;
        crate::file::record::test_delay();
        let r = self.write_cut(&cut);
        let mut m = self.meta.lock();
        if let Err(e) = r {
            m.pending_free.extend(cut.frees);
            return Err(e);
        }
        m.rc.blocks.mark_clean(&cut.blocks);
        m.rc.mark_entries_clean(&cut.entries);
        m.l2.mark_clean(&cut.l2);
        for (i, v) in &cut.l1 {
            if m.l1[*i] == *v {
                m.l1_dirty.remove(i);
            }
        }
        if !cut.frees.is_empty() {
            let punch = m.apply_frees(&self.f, &self.geo, &cut.frees)?;
            // The decreases are dirty now: the next flush must not skip writing them.
            self.write_gen.fetch_add(1, Ordering::AcqRel);
            drop(m);
            self.punch_freed(&punch);
        }
        Ok(())
    }

    /// Give freed data clusters' space back to the host file system, as qemu does with
    /// `--discard=unmap` (pass-discard-request), then let the allocator have them. Nothing
    /// points at them any more, durably (frees are applied after the pointer removals are
    /// synced), and they stayed quarantined since, so no new data is in them. A file system
    /// that cannot punch keeps the bytes; the clusters are reused all the same.
    fn punch_freed(&self, runs: &[(u64, u64)]) {
        let bits = self.geo.cluster_bits;
        for &(first, n) in runs {
            if let Err(e) = self.f.punch_hole(first << bits, n << bits) {
                tracing::debug!(
                    "'{}': punching freed clusters at {:#x} (+{:#x}): {e}",
                    self.f.path().display(),
                    first << bits,
                    n << bits
                );
            }
        }
        let mut m = self.meta.lock();
        for &(first, n) in runs {
            m.rc.release_quarantine(first, n);
        }
    }

    /// Copy the dirty state, overlap-checking every table against the others (qemu checks
    /// each cache entry before writing it back).
    fn copy_cut(&self) -> Result<Cut> {
        let mut m = self.meta.lock();
        let cs = self.geo.cs;
        let cut = Cut {
            blocks: m.rc.blocks.dirty_copies(),
            entries: m.rc.dirty_entries(),
            table_offset: m.rc.entry_offset(0),
            l2: m.l2.dirty_copies(),
            l1: m.l1_dirty.iter().map(|&i| (i, m.l1[i])).collect(),
            frees: std::mem::take(&mut m.pending_free),
        };
        let check = || -> Result<()> {
            for c in &cut.blocks {
                check_overlap(&self.f, &m.map, c.offset, cs, Some(Kind::RefBlock))?;
            }
            for c in &cut.l2 {
                check_overlap(&self.f, &m.map, c.offset, cs, Some(Kind::ActiveL2))?;
            }
            Ok(())
        };
        if let Err(e) = check() {
            m.pending_free.extend(cut.frees);
            return Err(e);
        }
        Ok(cut)
    }

    /// (The external data file, sync,) refcount blocks, sync, refcount-table entries, sync,
    /// L2 tables, (sync,) L1 entries, sync. Each sync makes what was written before it
    /// durable before any pointer to it.
    fn write_cut(&self, cut: &Cut) -> Result<()> {
        if let Some(d) = &self.data {
            d.file.sync()?;
        }
        for c in &cut.blocks {
            for (off, data) in &c.runs {
                self.f.write("write refcount block", *off, data, false)?;
            }
        }
        let pointers = !cut.entries.is_empty() || !cut.l2.is_empty() || !cut.l1.is_empty();
        if pointers {
            // Also makes the data of every linked allocation durable before its L2 entry.
            self.f.sync()?;
        }
        if !cut.entries.is_empty() {
            for &(i, v) in &cut.entries {
                let off = cut.table_offset + i as u64 * 8;
                self.f
                    .write("write refcount table", off, &v.to_be_bytes(), false)?;
            }
            if !cut.l2.is_empty() || !cut.l1.is_empty() {
                self.f.sync()?;
            }
        }
        for c in &cut.l2 {
            for (off, data) in &c.runs {
                self.f.write("write L2 table", *off, data, false)?;
            }
        }
        if !cut.l1.is_empty() {
            if !cut.l2.is_empty() {
                self.f.sync()?;
            }
            for &(i, v) in &cut.l1 {
                self.f.write(
                    "write L1 table",
                    self.l1_offset + i as u64 * 8,
                    &v.to_be_bytes(),
                    false,
                )?;
            }
        }
        self.f.sync()
    }

    /// Flush until nothing is dirty and no decrease is queued (close, bitmaps).
    pub(super) fn flush_all(&self) -> Result<()> {
        for _ in 0..4 {
            let idle = {
                let m = self.meta.lock();
                !m.any_dirty() && m.pending_free.is_empty()
            };
            if idle {
                break;
            }
            self.write_gen.fetch_add(1, Ordering::AcqRel);
            self.flush()?;
        }
        Ok(())
    }
}
