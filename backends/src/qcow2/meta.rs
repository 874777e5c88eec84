//! The metadata state behind one lock: the active L1 table, the L2 cache and the refcounts.
//! Only short in-memory work and the occasional table load happen under it; data I/O never.

use super::file::ImageFile;
use super::l2_cache::{decode, L2Cache};
use super::refcount::Refcounts;
use super::Geo;
use crate::Result;
use std::collections::BTreeSet;

pub const COPIED: u64 = 1 << 63;
pub const COMPRESSED: u64 = 1 << 62;
pub const ZERO: u64 = 1;
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Extended L2 bitmap with every subcluster reading as zero.
pub const ALL_ZERO: u64 = 0xffff_ffff << 32;

/// One L2 entry: the descriptor and (extended L2 only) the subcluster bitmap.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Entry {
    pub desc: u64,
    pub bm: u64,
}

impl Entry {
    pub fn host(&self) -> u64 {
        self.desc & OFFSET_MASK
    }
    pub fn compressed(&self) -> bool {
        self.desc & COMPRESSED != 0
    }
    /// An uncompressed host cluster owned by this entry alone (refcount 1).
    pub fn owned_host(&self) -> bool {
        !self.compressed() && self.host() != 0 && self.desc & COPIED != 0
    }
}

#[derive(Debug)]
pub struct Meta {
    pub l1: Vec<u64>,
    pub l1_dirty: BTreeSet<usize>,
    pub l2: L2Cache,
    pub rc: Refcounts,
    /// Bumped on every change, so a flush can tell what changed while it wrote.
    pub version: u64,
}

impl Meta {
    pub fn bump(&mut self) -> u64 {
        self.version += 1;
        self.version
    }

    fn l2_offset(&self, f: &ImageFile, geo: &Geo, l1i: usize) -> Result<Option<(u64, bool)>> {
        let e = *self
            .l1
            .get(l1i)
            .ok_or_else(|| f.corrupt(format!("L1 index {l1i} is beyond the L1 table")))?;
        let off = e & OFFSET_MASK;
        if off == 0 {
            return Ok(None);
        }
        if !off.is_multiple_of(geo.cs) {
            return Err(f.corrupt(format!("L2 table offset {off:#x} is not cluster aligned")));
        }
        Ok(Some((off, e & COPIED != 0)))
    }

    fn load_l2(&mut self, f: &ImageFile, geo: &Geo, off: u64) -> Result<()> {
        if !self.l2.contains(off) {
            let mut raw = vec![0u8; geo.cs as usize];
            f.read("read L2 table", off, &mut raw)?;
            self.l2.insert(off, decode(&raw), false, 0);
        }
        Ok(())
    }

    /// The entry for guest cluster `g`; `None` when its whole L2 range is unallocated.
    pub fn entry(&mut self, f: &ImageFile, geo: &Geo, g: u64) -> Result<Option<Entry>> {
        let l1i = (g >> geo.l2_bits) as usize;
        let Some((off, _)) = self.l2_offset(f, geo, l1i)? else {
            return Ok(None);
        };
        self.load_l2(f, geo, off)?;
        let idx = (g & ((1 << geo.l2_bits) - 1)) as usize;
        let t = self
            .l2
            .get(off)
            .ok_or_else(|| f.corrupt(format!("L2 table {off:#x} vanished from the cache")))?;
        Ok(Some(if geo.extended {
            Entry {
                desc: t.words[idx * 2],
                bm: t.words[idx * 2 + 1],
            }
        } else {
            Entry {
                desc: t.words[idx],
                bm: 0,
            }
        }))
    }

    /// Make the L2 table for L1 index `l1i` ours to modify: allocate a new one, or copy one
    /// shared with a snapshot (the old copy is released after the new L1 entry is durable).
    pub fn l2_for_write(&mut self, f: &ImageFile, geo: &Geo, l1i: usize) -> Result<u64> {
        let cur = self.l2_offset(f, geo, l1i)?;
        if let Some((off, true)) = cur {
            self.load_l2(f, geo, off)?;
            return Ok(off);
        }
        let words = match cur {
            Some((off, _)) => {
                self.load_l2(f, geo, off)?;
                self.l2
                    .get(off)
                    .map(|t| t.words.clone())
                    .ok_or_else(|| f.corrupt(format!("L2 table {off:#x} vanished")))?
            }
            None => vec![0u64; (geo.cs / 8) as usize],
        };
        let v = self.bump();
        let (new, _) = self.rc.alloc(f, v)?;
        self.l2.insert(new, words, true, v);
        self.l1[l1i] = new | COPIED;
        self.l1_dirty.insert(l1i);
        if let Some((old, _)) = cur {
            self.rc.pending_free.push((old, geo.cs));
        }
        Ok(new)
    }

    pub fn set_entry(&mut self, f: &ImageFile, geo: &Geo, g: u64, e: Entry) -> Result<()> {
        let off = self.l2_for_write(f, geo, (g >> geo.l2_bits) as usize)?;
        let v = self.bump();
        let idx = (g & ((1 << geo.l2_bits) - 1)) as usize;
        let t = self
            .l2
            .get(off)
            .ok_or_else(|| f.corrupt(format!("L2 table {off:#x} vanished from the cache")))?;
        if geo.extended {
            t.words[idx * 2] = e.desc;
            t.words[idx * 2 + 1] = e.bm;
        } else {
            t.words[idx] = e.desc;
        }
        t.dirty = true;
        t.version = v;
        Ok(())
    }

    /// Release the host storage `old` referenced, once the entry replacing it is durable.
    pub fn queue_free(&mut self, geo: &Geo, old: Entry) {
        if old.compressed() {
            let (off, len) = super::compressed::sectors(old.desc, geo.cluster_bits);
            self.rc.pending_free.push((off, len));
        } else if old.host() != 0 {
            self.rc.pending_free.push((old.host(), geo.cs));
        }
    }
}
