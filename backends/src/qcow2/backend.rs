//! The `BlockBackend` face of a qcow2 image, and the metadata flush.

use super::Qcow2;
use crate::{BlockBackend, Caps, Extents, IoFlags, Result, Support};

impl Qcow2 {
    /// Write every dirty table, in an order that keeps the image consistent at each step:
    /// data and refcount blocks (sync), refcount table entries (sync), L2 tables (sync),
    /// L1 entries (sync). Refcount decreases queued before this flush are applied at its end,
    /// once nothing on disk points to the released clusters; the next flush writes them.
    pub fn flush_meta(&self) -> Result<()> {
        if self.opts.read_only {
            return Ok(());
        }
        let _fl = self.flush_lock.lock();
        let (rsnap, l2snap, l1snap, frees, high) = {
            let mut m = self.meta.lock();
            let l1: Vec<(usize, u64)> = m.l1_dirty.iter().map(|&i| (i, m.l1[i])).collect();
            m.l1_dirty.clear();
            (
                m.rc.snapshot(),
                m.l2.snapshot(),
                l1,
                std::mem::take(&mut m.rc.pending_free),
                m.rc.alloc_high(),
            )
        };
        let r = self.write_snapshots(&rsnap, &l2snap, &l1snap, high);
        let mut m = self.meta.lock();
        if let Err(e) = r {
            for (i, _) in &l1snap {
                m.l1_dirty.insert(*i);
            }
            m.rc.pending_free.extend(frees);
            return Err(e);
        }
        m.rc.mark_clean(&rsnap);
        m.l2.mark_clean(&l2snap);
        for (off, len) in frees {
            let v = m.bump();
            m.rc.free_range(&self.f, off, len, v)?;
            // A freed L2 table must not be found in the cache if its cluster is reused.
            let cs = self.geo.cs;
            let mut c = off & !(cs - 1);
            while c < off + len {
                m.l2.remove(c);
                c += cs;
            }
        }
        Ok(())
    }

    fn write_snapshots(
        &self,
        rsnap: &super::refcount::RefSnapshot,
        l2snap: &[(u64, Vec<u8>, u64)],
        l1snap: &[(usize, u64)],
        high: u64,
    ) -> Result<()> {
        // Clusters handed out but never written (holes) must still lie inside the file.
        if self.f.len()? < high {
            self.f.set_len(high)?;
        }
        for (off, data, _) in &rsnap.blocks {
            self.f.write("write refcount block", *off, data)?;
        }
        self.f.sync()?;
        if rsnap.table_dirty {
            // Under the lock: a concurrent table growth may move the table.
            self.meta.lock().rc.write_table_entries(&self.f)?;
            self.f.sync()?;
        }
        if !l2snap.is_empty() {
            for (off, data, _) in l2snap {
                self.f.write("write L2 table", *off, data)?;
            }
            self.f.sync()?;
        }
        if !l1snap.is_empty() {
            for (i, v) in l1snap {
                self.f.write(
                    "write L1 table",
                    self.l1_offset + *i as u64 * 8,
                    &v.to_be_bytes(),
                )?;
            }
            self.f.sync()?;
        }
        Ok(())
    }
}

impl Drop for Qcow2 {
    fn drop(&mut self) {
        // Twice: the first flush applies queued refcount decreases, the second writes them.
        for _ in 0..2 {
            if let Err(e) = self.flush_meta() {
                tracing::error!("flushing '{}' on close: {e}", self.f.path.display());
                return;
            }
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
            fua: Support::Emulate,
            trim: true,
            zero: Support::Native,
            fast_zero: true,
            cache: Support::Emulate,
            multi_conn: true,
            rotational: false,
        }
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        if buf.len() as u64 <= self.geo.cs - (offset & (self.geo.cs - 1)) {
            return self.read_piece(
                offset >> self.geo.cluster_bits,
                offset & (self.geo.cs - 1),
                buf,
            );
        }
        self.read_batched(offset, buf)
    }

    fn write(&self, offset: u64, buf: &[u8], flags: IoFlags) -> Result<()> {
        if buf.len() as u64 <= self.geo.cs - (offset & (self.geo.cs - 1)) {
            self.write_piece(
                offset >> self.geo.cluster_bits,
                offset & (self.geo.cs - 1),
                buf,
            )?;
        } else {
            self.write_batched(offset, buf)?;
        }
        if flags.contains(IoFlags::FUA) {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        // flush_meta always syncs the data before anything else.
        self.flush_meta()
    }

    fn trim(&self, offset: u64, len: u64, flags: IoFlags) -> Result<()> {
        if self.opts.discard {
            self.discard(offset, len)?;
        }
        if flags.contains(IoFlags::FUA) {
            self.flush()?;
        }
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: IoFlags) -> Result<()> {
        self.zero(offset, len, flags)?;
        if flags.contains(IoFlags::FUA) {
            self.flush()?;
        }
        Ok(())
    }

    fn block_status(&self, offset: u64, len: u64, out: &mut Extents) -> Result<()> {
        self.status(offset, len, out)
    }

    fn format_name(&self) -> &'static str {
        "qcow2"
    }
}
