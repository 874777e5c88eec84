//! The `BlockBackend` face of a qcow2 image, and what happens at close (bitmaps stored,
//! everything flushed).

use super::{bitmap, header, Qcow2};
use crate::{BlockBackend, Caps, Error, Extents, IoFlags, Result, Support};
use std::sync::atomic::Ordering;

impl Qcow2 {
    /// A guard that keeps closing from starting while a write runs; Err once it began.
    fn writes_open(&self) -> Result<parking_lot::RwLockReadGuard<'_, bool>> {
        self.usable()?;
        let closing = self.closing.read();
        if *closing {
            return Err(Error::Invalid("the image is being closed".into()));
        }
        Ok(closing)
    }

    /// Set the bits of the enabled bitmaps for a write (also one that failed part way, as
    /// qemu does: some of it may have landed).
    fn mark_dirty(&self, offset: u64, len: u64) {
        if self.tracking.load(Ordering::Relaxed) {
            if let Some(b) = self.bitmaps.lock().as_mut() {
                b.mark(offset, len);
            }
        }
    }

    /// The end of every write-type request: bitmaps, the write generation, corruption.
    fn finish_write(&self, offset: u64, len: u64, r: Result<()>) -> Result<()> {
        self.mark_dirty(offset, len);
        self.write_gen.fetch_add(1, Ordering::AcqRel);
        self.checked(r)
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
        super::refcount::check_overlap(&self.f, &self.meta.lock().map, off, buf.len() as u64, None)
            .and_then(|()| self.f.write(op, off, &buf, false))
    }

    /// Close-time work for persistent bitmaps (qemu's qcow2_store_persistent_dirty_bitmaps):
    /// changed ones get new tables and data, a new directory is written and published in
    /// the header, IN_USE is cleared, then the old clusters are freed. Unchanged ones only
    /// have IN_USE cleared in place. A crash in between leaks clusters, never corrupts.
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
        let cs = self.geo.cs;
        if !bm.any_changed() {
            let (_, at) = bm.encode_directory();
            for &i in &owned {
                let flags = bm.list[i].entry.flags & !bitmap::IN_USE;
                bm.list[i].entry.flags = flags;
                self.f.write(
                    "clear bitmap in use",
                    bm.ext.dir_offset + at[i] as u64 + 12,
                    &flags.to_be_bytes(),
                    false,
                )?;
            }
            self.f.sync()?;
            *guard = None;
            return Ok(());
        }
        let mut old: Vec<u64> = Vec::new();
        for &i in &owned {
            let b = &mut bm.list[i];
            b.entry.flags &= !bitmap::IN_USE;
            if !b.changed() {
                continue;
            }
            let table_size = b.entry.table_size as usize;
            let mut table = vec![0u8; table_size * 8];
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
            old.extend(b.take_old_clusters());
            b.entry.table_offset = toff;
            b.stored(clusters);
        }
        let (dir, _) = bm.encode_directory();
        let dclusters = (dir.len() as u64).div_ceil(cs);
        let doff = self.alloc_run(dclusters)?;
        self.write_clusters("write bitmap directory", doff, &dir)?;
        let old_dir = bm.ext.dir_offset;
        let old_dir_clusters = bm.ext.dir_size.div_ceil(cs);
        // New clusters and their refcounts durable before the header points at them.
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
        {
            let mut m = self.meta.lock();
            m.map.clear_ranges(super::overlap::Kind::BitmapDir);
            m.map
                .add_range(super::overlap::Kind::BitmapDir, doff, dir.len() as u64);
            for k in 0..old_dir_clusters {
                old.push(old_dir + k * cs);
            }
            for off in old {
                m.pending_free.push((off, cs));
            }
        }
        *guard = None;
        drop(guard);
        self.flush_all()
    }

    /// Everything qemu does when it releases a writable image: bitmaps stored, caches and
    /// queued decreases written, synced.
    fn close_image(&self) -> Result<()> {
        self.store_bitmaps()?;
        if self.corrupt.load(Ordering::Acquire) {
            return Ok(());
        }
        self.flush_all()
    }
}

impl Drop for Qcow2 {
    fn drop(&mut self) {
        if self.opts.read_only {
            return;
        }
        if let Err(e) = self.close_image() {
            tracing::error!("closing '{}': {e}", self.f.path().display());
        }
    }
}

impl BlockBackend for Qcow2 {
    fn size(&self) -> u64 {
        self.geo.size
    }

    fn caps(&self) -> Caps {
        if self.opts.read_only {
            return Caps::READ_ONLY;
        }
        Caps {
            writable: true,
            flush: true,
            fua: Support::Native,
            trim: true,
            zero: Support::Native,
            fast_zero: true,
            cache: Support::Emulate,
            multi_conn: true,
            rotational: false,
        }
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.usable()?;
        let r = if buf.len() as u64 <= self.geo.cs - (offset & (self.geo.cs - 1)) {
            self.read_piece(
                offset >> self.geo.cluster_bits,
                offset & (self.geo.cs - 1),
                buf,
            )
        } else {
            self.read_batched(offset, buf)
        };
        self.checked(r)
    }

    fn write(&self, offset: u64, buf: &[u8], flags: IoFlags) -> Result<()> {
        let closing = self.writes_open()?;
        let fua = flags.contains(IoFlags::FUA);
        let r = if buf.len() as u64 <= self.geo.cs - (offset & (self.geo.cs - 1)) {
            self.write_piece_fua(
                offset >> self.geo.cluster_bits,
                offset & (self.geo.cs - 1),
                buf,
                fua,
            )
        } else {
            self.write_batched(offset, buf).map(|()| false)
        };
        let durable = *r.as_ref().unwrap_or(&false);
        self.finish_write(offset, buf.len() as u64, r.map(|_| ()))?;
        drop(closing);
        if fua && !durable {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        Qcow2::flush(self)
    }

    fn trim(&self, offset: u64, len: u64, flags: IoFlags) -> Result<()> {
        if self.opts.discard {
            let _closing = self.writes_open()?;
            let r = self.discard(offset, len);
            self.finish_write(offset, len, r)?;
        }
        if flags.contains(IoFlags::FUA) {
            self.flush()?;
        }
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: IoFlags) -> Result<()> {
        let closing = self.writes_open()?;
        let r = self.zero(offset, len, flags);
        if matches!(r, Err(Error::NotSupported(_))) {
            // FAST_ZERO refused before anything changed.
            return r;
        }
        self.finish_write(offset, len, r)?;
        drop(closing);
        if flags.contains(IoFlags::FUA) {
            self.flush()?;
        }
        Ok(())
    }

    fn block_status(&self, offset: u64, len: u64, out: &mut Extents) -> Result<()> {
        self.usable()?;
        let r = self.status(offset, len, out);
        self.checked(r)
    }

    fn format_name(&self) -> &'static str {
        "qcow2"
    }

    fn bitmap_check(&self, name: &str) -> Result<()> {
        if let Some(bm) = self.bitmaps.lock().as_ref() {
            if let Some(b) = bm.find(name) {
                if b.entry.flags & bitmap::IN_USE != 0 || b.problem.is_some() {
                    return Err(Error::BitmapInconsistent(name.to_string()));
                }
                return Ok(());
            }
        }
        // qemu looks down the chain (an overlay of -s finds its base's bitmaps).
        match &self.backing {
            Some(b) => b.bitmap_check(name),
            None => Err(Error::BitmapNotFound(name.to_string())),
        }
    }

    fn bitmap_status(&self, name: &str, offset: u64, len: u64, out: &mut Extents) -> Result<()> {
        if let Some(bm) = self.bitmaps.lock().as_ref() {
            if bm.find(name).is_some() {
                bm.status(name, offset, len, self.geo.size, out);
                return Ok(());
            }
        }
        match &self.backing {
            Some(b) if offset < b.size() => {
                let n = len.min(b.size() - offset);
                b.bitmap_status(name, offset, n, out)
            }
            // Past the backing file's end nothing can be dirty in it.
            Some(_) => {
                out.push(crate::Extent::new(len, crate::ExtentFlags::empty(), 0));
                Ok(())
            }
            None => Err(Error::NotSupported("dirty bitmaps")),
        }
    }

    fn close(&self) -> Result<()> {
        if self.opts.read_only {
            return Ok(());
        }
        self.close_image()
    }
}
