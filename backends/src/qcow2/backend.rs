//! The `BlockBackend` face of a qcow2 image, and what happens at close (bitmaps stored,
//! everything flushed).

use super::{bitmap, Qcow2};
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
            cache: Support::Emulate,
            ..Caps::NATIVE
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

    /// One cluster's worth at most: a larger read is not the small request this is for.
    fn try_read(&self, offset: u64, buf: &mut [u8]) -> bool {
        let in_off = offset & (self.geo.cs - 1);
        buf.len() as u64 <= self.geo.cs - in_off
            && self.try_read_piece(offset >> self.geo.cluster_bits, in_off, buf)
    }

    /// One cluster's worth at most, overwriting in place (see `try_write_piece`).
    fn try_write(&self, offset: u64, buf: &[u8]) -> bool {
        let Some(closing) = self.closing.try_read() else {
            return false;
        };
        let in_off = offset & (self.geo.cs - 1);
        if *closing
            || buf.is_empty()
            || buf.len() as u64 > self.geo.cs - in_off
            || !self.try_write_piece(offset >> self.geo.cluster_bits, in_off, buf)
        {
            return false;
        }
        // After the data: a flush that sees the new generation syncs it.
        let _ = self.finish_write(offset, buf.len() as u64, Ok(()));
        drop(closing);
        true
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

    fn read_source(&self, offset: u64, len: u64) -> Option<crate::HostSpan<'_>> {
        let at = self.contiguous_span(offset, len)?;
        self.df().page_cache_span(at)
    }

    fn compressed_cluster_size(&self) -> Option<u64> {
        (!self.opts.read_only && !self.is_encrypted() && !self.external_data())
            .then_some(self.geo.cs)
    }

    fn write_compressed(&self, offset: u64, buf: &[u8]) -> Result<()> {
        let closing = self.writes_open()?;
        let r = self.write_compressed_clusters(offset, buf);
        self.finish_write(offset, buf.len() as u64, r)?;
        drop(closing);
        Ok(())
    }

    /// Write out the metadata cache when it holds anything (see "Settle" in the module doc).
    /// Twice at most: the first flush turns queued decreases into dirty refcounts.
    fn settle(&self) -> Result<()> {
        for _ in 0..2 {
            if !self.unsettled() {
                break;
            }
            Qcow2::flush(self)?;
        }
        Ok(())
    }

    /// Metadata is marked clean only once a flush wrote and synced it, so nothing dirty and
    /// nothing queued means every completed write is in the file.
    fn unsettled(&self) -> bool {
        let m = self.meta.lock();
        m.any_dirty() || !m.pending_free.is_empty()
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
