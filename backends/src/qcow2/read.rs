//! Reads: one guest cluster at a time under its stripe (shared), from the data cluster, the
//! backing file, zeroes, or an inflated compressed cluster.

use super::meta::Entry;
use super::{compressed, Qcow2, Sc};
use crate::{Error, Result};
use std::sync::Arc;

impl Qcow2 {
    pub(super) fn read_compressed(&self, e: Entry) -> Result<Arc<Vec<u8>>> {
        if let Some((d, data)) = &*self.last_inflated.lock() {
            if *d == e.desc {
                return Ok(data.clone());
            }
        }
        let (off, len) = compressed::locate(e.desc, self.geo.cluster_bits);
        let mut input = vec![0u8; len as usize];
        self.f.read("read compressed cluster", off, &mut input)?;
        let mut out = vec![0u8; self.geo.cs as usize];
        compressed::decompress(self.geo.compression, &input, &mut out)
            .map_err(|m| self.corrupt_err(format!("compressed cluster at {off:#x}: {m}")))?;
        let out = Arc::new(out);
        *self.last_inflated.lock() = Some((e.desc, out.clone()));
        Ok(out)
    }

    /// A compressed cluster was just linked at `desc`, under its stripe held exclusively:
    /// bytes freed by a zeroing or discard can come back under the very same descriptor
    /// (same offset, same length in sectors), so an inflation cached under it is stale. No
    /// reader can cache it again: the only entry naming it is the one just linked, whose
    /// readers wait for the stripe.
    pub(super) fn forget_inflated(&self, desc: u64) {
        let mut last = self.last_inflated.lock();
        if last.as_ref().is_some_and(|(d, _)| *d == desc) {
            *last = None;
        }
    }

    /// Fill `buf` with what guest cluster `g` holds at `in_off`, given its entry.
    pub(super) fn read_mapped(&self, g: u64, e: Entry, in_off: u64, buf: &mut [u8]) -> Result<()> {
        let base = g << self.geo.cluster_bits;
        if e.compressed() {
            let data = self.read_compressed(e)?;
            buf.copy_from_slice(&data[in_off as usize..in_off as usize + buf.len()]);
            return Ok(());
        }
        let end = in_off + buf.len() as u64;
        let sc = self.geo.sc_bits;
        let mut pos = in_off;
        while pos < end {
            let st = self.state(e, pos >> sc)?;
            let mut run_end = (((pos >> sc) + 1) << sc).min(end);
            while run_end < end && self.state(e, run_end >> sc)? == st {
                run_end = (((run_end >> sc) + 1) << sc).min(end);
            }
            let piece = &mut buf[(pos - in_off) as usize..(run_end - in_off) as usize];
            match st {
                Sc::Data => self.read_data(e.host() + pos, piece)?,
                Sc::Zero => piece.fill(0),
                Sc::Unalloc => self.read_backing(base + pos, piece)?,
                Sc::Compressed => {
                    return Err(Error::Invalid("compressed state inside a cluster".into()))
                }
            }
            pos = run_end;
        }
        Ok(())
    }

    /// `read` of part of one cluster, if nothing needs to wait: no lock held by another
    /// thread, the mapping in the metadata cache, the data in the page cache (or zeroes, or
    /// the same from the backing file). False otherwise, or for anything but plain data
    /// (compressed, encrypted, corrupt): the caller reads the usual way.
    pub(super) fn try_read_piece(&self, g: u64, in_off: u64, buf: &mut [u8]) -> bool {
        if self.crypto.is_some() || self.usable().is_err() {
            return false;
        }
        let Some(_s) = self.stripe(g).try_read() else {
            return false;
        };
        let Some(e) = self
            .meta
            .try_lock()
            .and_then(|mut m| m.cached_entry(&self.geo, g))
        else {
            return false;
        };
        if e.compressed() {
            return false;
        }
        let base = g << self.geo.cluster_bits;
        let end = in_off + buf.len() as u64;
        let sc = self.geo.sc_bits;
        let mut pos = in_off;
        while pos < end {
            let Ok(st) = self.state(e, pos >> sc) else {
                return false;
            };
            let run_end = (((pos >> sc) + 1) << sc).min(end);
            let piece = &mut buf[(pos - in_off) as usize..(run_end - in_off) as usize];
            let done = match st {
                Sc::Data => self.df().try_read(e.host() + pos, piece),
                Sc::Zero => {
                    piece.fill(0);
                    true
                }
                Sc::Unalloc => self.try_read_backing(base + pos, piece),
                Sc::Compressed => false,
            };
            if !done {
                return false;
            }
            pos = run_end;
        }
        true
    }

    /// Where `[offset, offset + len)` lies in the image file as it is, for a read spliced
    /// from the page cache (`BlockBackend::read_source`). A pipe, then a socket, holds the
    /// pages by reference until the client has read them, which no server can know, so a
    /// cluster spliced once must never get another guest range's data: a read-only image
    /// frees nothing (writers of the file are locked out, as for raw), and a writable one
    /// never reuses a data cluster it freed (`Meta::quarantine_data`; only where frees are
    /// rare, see `spliceable` in open.rs). Its own range's writes may change the pages
    /// before the client reads them, which NBD allows of a read and a write in flight
    /// together, as raw's. No lock is held while the pipe is filled: the mapping found here
    /// can change under it only to one whose old cluster still holds this range's earlier
    /// data (a copy-on-write from a shared cluster) or to zeroes that keep the cluster.
    /// The range must be plain data in clusters that follow each other in the file, with
    /// their mappings in the metadata cache; None for anything else (the caller copies).
    pub(super) fn contiguous_span(&self, offset: u64, len: u64) -> Option<u64> {
        if !self.splice_reads || len == 0 || self.usable().is_err() {
            return None;
        }
        let end = offset.checked_add(len)?;
        if end > self.geo.size {
            return None;
        }
        let (bits, sc) = (self.geo.cluster_bits, self.geo.sc_bits);
        let first = offset >> bits;
        let mut meta = self.meta.try_lock()?;
        let mut start = None;
        for g in first..=(end - 1) >> bits {
            let e = meta.cached_entry(&self.geo, g)?;
            let base = g << bits;
            let (lo, hi) = (offset.max(base) - base, end.min(base + self.geo.cs) - base);
            for i in lo >> sc..=(hi - 1) >> sc {
                if self.geo.state(e, i).ok()? != Sc::Data {
                    return None;
                }
            }
            let want = *start.get_or_insert(e.host()) + ((g - first) << bits);
            if e.host() != want {
                return None;
            }
        }
        Some(start? + (offset & (self.geo.cs - 1)))
    }

    pub(super) fn read_piece(&self, g: u64, in_off: u64, buf: &mut [u8]) -> Result<()> {
        let _s = self.stripe(g).read();
        let e = self.entry(g)?;
        self.read_mapped(g, e, in_off, buf)
    }
}
