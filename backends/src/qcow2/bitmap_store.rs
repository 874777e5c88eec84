//! Storing persistent dirty bitmaps at close (qemu's qcow2_store_persistent_dirty_bitmaps):
//! changed ones get new tables and data clusters, a new directory is written and published
//! in the header extension, IN_USE is cleared, then the old clusters are released. Unchanged
//! ones only have IN_USE cleared in place. A crash in between leaks clusters, never corrupts:
//! the new clusters and their refcounts are durable before the header points at them.

use super::bitmap::{self, Bitmap, Bitmaps};
use super::meta::Release;
use super::overlap::Kind;
use super::{header, Qcow2};
use crate::Result;
use std::sync::atomic::Ordering;

impl Qcow2 {
    pub fn store_bitmaps(&self) -> Result<()> {
        if self.opts.read_only || self.opts.load_snapshot.is_some() {
            return Ok(());
        }
        // Wait for writes in flight; later ones are refused.
        *self.closing.write() = true;
        if self.corrupt.load(Ordering::Acquire) {
            return Ok(());
        }
        let mut guard = self.bitmaps.lock();
        let Some(bm) = guard.as_mut() else {
            return Ok(());
        };
        self.tracking.store(false, Ordering::Relaxed);
        let owned: Vec<usize> = (0..bm.list.len())
            .filter(|&i| bm.list[i].enabled() || bm.list[i].problem.is_none())
            .collect();
        if owned.is_empty() {
            return Ok(());
        }
        self.flush_all()?;
        if bm.any_changed() {
            let mut old = Vec::new();
            for &i in &owned {
                old.extend(self.store_one(&mut bm.list[i])?);
            }
            self.publish(bm, old)?;
        } else {
            self.clear_in_use(bm, &owned)?;
        }
        *guard = None;
        drop(guard);
        self.flush_all()
    }

    /// Nothing changed: clear IN_USE of the bitmaps we own in the directory where it is.
    fn clear_in_use(&self, bm: &mut Bitmaps, owned: &[usize]) -> Result<()> {
        let (_, at) = bm.encode_directory();
        for &i in owned {
            let flags = bm.list[i].entry.flags & !bitmap::IN_USE;
            bm.list[i].entry.flags = flags;
            self.f.write(
                "clear bitmap in use",
                bm.ext.dir_offset + at[i] as u64 + 12,
                &flags.to_be_bytes(),
                false,
            )?;
        }
        self.f.sync()
    }

    /// Write a changed bitmap's data and table to new clusters; returns its old clusters.
    fn store_one(&self, b: &mut Bitmap) -> Result<Vec<u64>> {
        let cs = self.geo.cs;
        b.entry.flags &= !bitmap::IN_USE;
        if !b.changed() {
            return Ok(Vec::new());
        }
        let mut table = vec![0u8; b.entry.table_size as usize * 8];
        let mut clusters = Vec::new();
        for (k, data) in b.serialize(cs).unwrap_or_default() {
            let off = self.alloc_run(1)?;
            self.write_clusters("write bitmap data", off, data)?;
            if let Some(slot) = table.get_mut(k * 8..k * 8 + 8) {
                slot.copy_from_slice(&off.to_be_bytes());
            }
            clusters.push(off);
        }
        let tclusters = (table.len() as u64).div_ceil(cs);
        let toff = self.alloc_run(tclusters)?;
        self.write_clusters("write bitmap table", toff, &table)?;
        clusters.extend((0..tclusters).map(|k| toff + k * cs));
        let old = b.take_old_clusters();
        b.entry.table_offset = toff;
        b.stored(clusters);
        Ok(old)
    }

    /// Write the new directory, make it and its clusters durable, point the header extension
    /// at it, then queue the old directory and `old` clusters for release.
    fn publish(&self, bm: &mut Bitmaps, mut old: Vec<u64>) -> Result<()> {
        let cs = self.geo.cs;
        let (dir, _) = bm.encode_directory();
        let doff = self.alloc_run((dir.len() as u64).div_ceil(cs))?;
        self.write_clusters("write bitmap directory", doff, &dir)?;
        old.extend((0..bm.ext.dir_size.div_ceil(cs)).map(|k| bm.ext.dir_offset + k * cs));
        self.flush_all()?;
        self.f.sync()?;
        bm.ext.dir_offset = doff;
        bm.ext.dir_size = dir.len() as u64;
        bm.ext.nb_bitmaps = bm.list.len() as u32;
        self.f.write(
            "write bitmaps extension",
            bm.ext.pos,
            &bm.ext.encode(),
            false,
        )?;
        let autoclear =
            self.header.autoclear & header::AUTOCLEAR_BITMAPS | header::AUTOCLEAR_BITMAPS;
        self.f.write(
            "write header",
            header::OFF_AUTOCLEAR,
            &autoclear.to_be_bytes(),
            false,
        )?;
        self.f.sync()?;
        let mut m = self.meta.lock();
        m.map.clear_ranges(Kind::BitmapDir);
        m.map.add_range(Kind::BitmapDir, doff, dir.len() as u64);
        m.pending_free
            .extend(old.into_iter().map(|off| Release::metadata(off, cs)));
        Ok(())
    }

    /// `n` contiguous new clusters (bitmap tables and the directory must be contiguous).
    fn alloc_run(&self, n: u64) -> Result<u64> {
        let cs = self.geo.cs;
        let mut stray = Vec::new();
        let mut run: Vec<u64> = Vec::new();
        while (run.len() as u64) < n.max(1) {
            let (off, _) = self.with_meta(|m| m.alloc(&self.f))?;
            if run.last().is_some_and(|&l| l + cs != off) {
                stray.append(&mut run);
            }
            run.push(off);
        }
        let mut m = self.meta.lock();
        for off in stray {
            m.unalloc(&self.f, off, self.geo.cluster_bits)?;
        }
        Ok(run[0])
    }

    /// Write `data` from `off`, zero-padded to whole clusters (reused clusters hold garbage).
    fn write_clusters(&self, op: &'static str, off: u64, data: &[u8]) -> Result<()> {
        let cs = self.geo.cs as usize;
        let mut buf = data.to_vec();
        buf.resize(data.len().div_ceil(cs).max(1) * cs, 0);
        super::refcount::check_overlap(
            &self.f,
            &self.meta.lock().map,
            off,
            buf.len() as u64,
            None,
        )?;
        self.f.write(op, off, &buf, false)
    }
}
