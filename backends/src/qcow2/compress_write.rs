//! Writes of whole clusters stored compressed (the `compress` filter, qemu's
//! `qcow2_co_pwritev_compressed`): the cluster is deflated, its bytes go where the byte
//! allocator says (`Meta::alloc_bytes`: several compressed clusters share a host cluster,
//! whose refcount counts them), and the L2 entry is linked to them.
//!
//! As qemu: only a cluster that holds nothing yet (unallocated or a zero cluster) can be
//! written compressed; anything else fails with EIO ("compression can't overwrite
//! anything"). A cluster that does not shrink is written as it is, the usual way. The last
//! cluster of an image whose size is not a whole number of clusters is padded with zeroes.
//!
//! The order is the write path's (see the module doc): the refcount is raised under the
//! lock, the bytes are written without it, then the entry is linked; the next flush makes
//! the refcount durable before the pointer. A crash in between leaves a leak at most.

use super::compressed;
use super::meta::{need, Entry, Step, COMPRESSED};
use super::Qcow2;
use crate::{Error, Result};

/// Compressed pieces are packed byte by byte, as qemu packs them: two pieces may share a
/// sector, which is safe because a write never changes bytes outside its own range (the
/// page cache copies only those; an O_DIRECT read-modify-write holds the host-file layer's
/// exclusive lock, see `file/direct.rs`), and a sector written again holds the earlier
/// piece's bytes unchanged, so even a torn sector write cannot damage them.
const PIECE_ALIGN: u64 = 1;

impl Qcow2 {
    /// `buf` at `offset`: whole clusters, or up to the end of the image.
    pub(super) fn write_compressed_clusters(&self, offset: u64, buf: &[u8]) -> Result<()> {
        if self.external_data() {
            // qemu's qcow2_co_pwritev_compressed_part: ENOTSUP.
            return Err(Error::NotSupported(
                "compressed writes to an external data file",
            ));
        }
        let cs = self.geo.cs;
        let end = offset + buf.len() as u64;
        if !offset.is_multiple_of(cs) || !(end.is_multiple_of(cs) || end == self.geo.size) {
            return Err(Error::Invalid(format!(
                "compressed write at {offset:#x} of {:#x} bytes is not whole clusters",
                buf.len()
            )));
        }
        let mut padded = Vec::new();
        for (i, chunk) in buf.chunks(cs as usize).enumerate() {
            let g = (offset >> self.geo.cluster_bits) + i as u64;
            let data = if chunk.len() as u64 == cs {
                chunk
            } else {
                padded.clear();
                padded.extend_from_slice(chunk);
                padded.resize(cs as usize, 0);
                &padded[..]
            };
            self.write_compressed_cluster(g, data)?;
        }
        Ok(())
    }

    fn write_compressed_cluster(&self, g: u64, data: &[u8]) -> Result<()> {
        let Some(packed) = compressed::compress(self.geo.compression, data) else {
            return self.write_piece(g, 0, data);
        };
        let len = packed.len() as u64;
        let _s = self.stripe(g).write();
        let at = self.with_meta(|m| {
            let old = m.entry(&self.f, &self.geo, g)?.unwrap_or_default();
            if old.host() != 0 || old.compressed() {
                let eio = std::io::Error::from_raw_os_error(libc::EIO);
                let at = g << self.geo.cluster_bits;
                return Err(self
                    .f
                    .err("compressed write over an allocated cluster", at, 0, eio));
            }
            need!(m.l2_for_write(&self.f, &self.geo, (g >> self.geo.l2_bits) as usize));
            let at = need!(m.alloc_bytes(&self.f, &self.geo, len, PIECE_ALIGN));
            if let Err(e) = self.check_data(m, at, len) {
                m.unalloc(&self.f, at, self.geo.cluster_bits)?;
                return Err(e);
            }
            Ok(Step::Done(at))
        })?;
        if let Err(e) = self.f.write("write compressed cluster", at, &packed, false) {
            self.meta
                .lock()
                .unalloc(&self.f, at, self.geo.cluster_bits)?;
            return Err(e);
        }
        let desc = COMPRESSED | compressed::descriptor(at, len, self.geo.cluster_bits);
        let over = self.with_meta(|m| {
            // The stripe kept the entry as it was: nothing to release.
            need!(m.set_entry(&self.f, &self.geo, g, Entry { desc, bm: 0 }));
            Ok(Step::Done(m.l2.over_budget() || m.rc.blocks.over_budget()))
        })?;
        self.forget_inflated(desc);
        drop(_s);
        if over {
            self.flush()?;
        }
        Ok(())
    }
}
