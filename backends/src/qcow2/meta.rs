//! The metadata state behind one lock: the active L1 table, the L2 cache, the refcounts, the
//! metadata map for overlap checks, the refcount decreases waiting for a flush, and the file
//! length. Only in-memory work, table loads and (rarely) a file extension happen under it;
//! data I/O never does, and table writes only in the flush (see `flush.rs`).

use super::cache::TableCache;
use super::overlap::{Kind, MetaMap};
use super::refcount::Refcounts;
use super::Geo;
use crate::file::HostFile;
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

/// The outcome of a metadata step that may need the refcount table to grow first: the
/// caller then drops the lock, grows it (`Qcow2::grow_refcounts`) and runs the step again.
pub enum Step<T> {
    Done(T),
    /// Range index that has no room in the refcount table.
    Grow(u64),
}

/// `need!(expr)`: the value of a `Result<Step<T>>`, or return `Ok(Step::Grow)` from here.
macro_rules! need {
    ($e:expr) => {
        match $e? {
            $crate::qcow2::meta::Step::Done(v) => v,
            $crate::qcow2::meta::Step::Grow(r) => return Ok($crate::qcow2::meta::Step::Grow(r)),
        }
    };
}
pub(crate) use need;

/// Host bytes to release once the pointer removal that dropped them is durable.
#[derive(Clone, Copy, Debug)]
pub struct Release {
    pub off: u64,
    pub len: u64,
    /// A plain data cluster (not metadata, not compressed bytes): a read may have spliced it.
    pub data: bool,
}

impl Release {
    pub fn metadata(off: u64, len: u64) -> Release {
        Release {
            off,
            len,
            data: false,
        }
    }
}

#[derive(Debug)]
pub struct Meta {
    pub l1: Vec<u64>,
    /// L1 entries whose new value is not yet on disk.
    pub l1_dirty: BTreeSet<usize>,
    pub l2: TableCache,
    pub rc: Refcounts,
    pub map: MetaMap,
    /// Host bytes to release once the pointer removals that freed them are durable.
    pub pending_free: Vec<Release>,
    /// Data clusters that reach refcount zero are never handed out again while this process
    /// runs (`Refcounts::quarantine`): reads of a writable image may be spliced
    /// (`Qcow2::contiguous_span`), and a pipe or a socket may still hold a cluster's pages.
    pub quarantine_data: bool,
    /// `--discard=unmap`: a data cluster that reaches refcount zero is punched out of the file,
    /// as qemu passes a guest's discard down (`apply_frees`, `Qcow2::punch_freed`).
    pub punch_frees: bool,
    /// The file's length: only extensions made here change it, and it never shrinks.
    pub file_len: u64,
    /// Where the next compressed cluster's bytes may go: the rest of the host cluster the
    /// last one was put in (0: none). Forgotten when that cluster is freed.
    free_bytes: u64,
    /// Bumped on every change, so a flush can tell what changed while it wrote.
    version: u64,
}

impl Meta {
    pub fn new(l1: Vec<u64>, l2: TableCache, rc: Refcounts, map: MetaMap, file_len: u64) -> Meta {
        Meta {
            l1,
            l1_dirty: BTreeSet::new(),
            l2,
            rc,
            map,
            pending_free: Vec::new(),
            quarantine_data: false,
            punch_frees: false,
            file_len,
            free_bytes: 0,
            version: 0,
        }
    }

    pub fn bump(&mut self) -> u64 {
        self.version += 1;
        self.version
    }

    /// Anything a flush would write.
    pub fn any_dirty(&self) -> bool {
        !self.l1_dirty.is_empty() || self.l2.any_dirty() || self.rc.any_dirty()
    }

    fn l2_offset(&self, f: &HostFile, geo: &Geo, l1i: usize) -> Result<Option<(u64, bool)>> {
        let e = *self
            .l1
            .get(l1i)
            .ok_or_else(|| f.corrupt(format!("L1 index {l1i} is beyond the L1 table")))?;
        let off = e & OFFSET_MASK;
        if off == 0 {
            return Ok(None);
        }
        if !off.is_multiple_of(geo.cs) {
            return Err(f.corrupt(format!(
                "L2 table offset {off:#x} unaligned (L1 index: {l1i:#x})"
            )));
        }
        Ok(Some((off, e & COPIED != 0)))
    }

    fn load_l2(&mut self, f: &HostFile, geo: &Geo, off: u64) -> Result<()> {
        if !self.l2.contains(off) {
            let mut raw = vec![0u8; geo.cs as usize];
            f.read("read L2 table", off, &mut raw)?;
            self.l2.insert(off, raw, false, 0);
        }
        Ok(())
    }

    fn entry_at(&self, geo: &Geo, g: u64) -> usize {
        let idx = (g & ((1 << geo.l2_bits) - 1)) as usize;
        idx * if geo.extended { 16 } else { 8 }
    }

    /// The entry for guest cluster `g`; `None` when its whole L2 range is unallocated.
    pub fn entry(&mut self, f: &HostFile, geo: &Geo, g: u64) -> Result<Option<Entry>> {
        let l1i = (g >> geo.l2_bits) as usize;
        let Some((off, _)) = self.l2_offset(f, geo, l1i)? else {
            return Ok(None);
        };
        self.load_l2(f, geo, off)?;
        let at = self.entry_at(geo, g);
        let t = self
            .l2
            .get(off)
            .ok_or_else(|| f.corrupt(format!("L2 table {off:#x} vanished from the cache")))?;
        let e = Entry {
            desc: t.be64(at),
            bm: if geo.extended { t.be64(at + 8) } else { 0 },
        };
        geo.check_mapping(g, e).map_err(|m| f.corrupt(m))?;
        Ok(Some(e))
    }

    /// The entry for guest cluster `g` if no I/O is needed to know it (its L2 table is in the
    /// cache, or its whole L2 range is unallocated). None: it must be read first.
    pub fn cached_entry(&mut self, geo: &Geo, g: u64) -> Option<Entry> {
        let l1i = (g >> geo.l2_bits) as usize;
        let off = *self.l1.get(l1i)? & OFFSET_MASK;
        if off == 0 {
            return Some(Entry::default());
        }
        let at = self.entry_at(geo, g);
        let t = self.l2.get(off)?;
        let e = Entry {
            desc: t.be64(at),
            bm: if geo.extended { t.be64(at + 8) } else { 0 },
        };
        // A bad mapping is reported by the slow path (`entry`).
        geo.check_mapping(g, e).is_ok().then_some(e)
    }

    /// Is the mapping of guest cluster `g` on disk as it is here? Then its L2 entry, the L1
    /// entry above it and the refcounts they rely on were written and synced by a flush (a
    /// table is marked clean only after the flush's final sync).
    pub fn mapping_durable(&mut self, f: &HostFile, geo: &Geo, g: u64) -> Result<bool> {
        let l1i = (g >> geo.l2_bits) as usize;
        if self.l1_dirty.contains(&l1i) {
            return Ok(false);
        }
        let Some((off, _)) = self.l2_offset(f, geo, l1i)? else {
            return Ok(false);
        };
        let at = self.entry_at(geo, g);
        Ok(self.l2.get(off).is_some_and(|t| !t.page_dirty(at)))
    }

    /// Allocate a cluster and make the file cover it: (offset, never written before).
    pub fn alloc(&mut self, f: &HostFile) -> Result<Step<(u64, bool)>> {
        let v = self.bump();
        match self.rc.alloc(f, v, &mut self.map)? {
            Some(got) => {
                if let Err(e) = self.cover(f) {
                    // The file could not be extended over the new cluster (EIO, ENOSPC):
                    // give it back, or its refcount stays with nothing pointing at it.
                    let v = self.bump();
                    self.rc.release(f, got.0, v)?;
                    return Err(e);
                }
                Ok(Step::Done(got))
            }
            None => Ok(Step::Grow(self.rc.growth_index())),
        }
    }

    /// Extend the file over everything the allocator handed out, before anyone writes there:
    /// all extensions happen here, under the lock, so none can undo another.
    pub fn cover(&mut self, f: &HostFile) -> Result<()> {
        if self.rc.high > self.file_len {
            f.grow_to(self.rc.high)?;
            self.file_len = self.rc.high;
        }
        Ok(())
    }

    /// Make the L2 table for L1 index `l1i` ours to modify: allocate a new one, or copy one
    /// shared with a snapshot (the old copy is released after the new L1 entry is durable).
    pub fn l2_for_write(&mut self, f: &HostFile, geo: &Geo, l1i: usize) -> Result<Step<u64>> {
        let cur = self.l2_offset(f, geo, l1i)?;
        if let Some((off, true)) = cur {
            self.load_l2(f, geo, off)?;
            return Ok(Step::Done(off));
        }
        let data = match cur {
            Some((off, _)) => {
                self.load_l2(f, geo, off)?;
                self.l2
                    .get(off)
                    .map(|t| t.data().to_vec())
                    .ok_or_else(|| f.corrupt(format!("L2 table {off:#x} vanished")))?
            }
            None => vec![0u8; geo.cs as usize],
        };
        let (new, _) = need!(self.alloc(f));
        let v = self.bump();
        self.l2.insert(new, data, true, v);
        self.map.add_cluster(Kind::ActiveL2, new);
        self.l1[l1i] = new | COPIED;
        self.l1_dirty.insert(l1i);
        if let Some((old, _)) = cur {
            // Only a snapshot's L1 points at the old table now.
            self.map.remove_cluster(old);
            self.pending_free.push(Release::metadata(old, geo.cs));
        }
        Ok(Step::Done(new))
    }

    pub fn set_entry(&mut self, f: &HostFile, geo: &Geo, g: u64, e: Entry) -> Result<Step<()>> {
        let off = need!(self.l2_for_write(f, geo, (g >> geo.l2_bits) as usize));
        let v = self.bump();
        let at = self.entry_at(geo, g);
        let extended = geo.extended;
        let t = self
            .l2
            .get(off)
            .ok_or_else(|| f.corrupt(format!("L2 table {off:#x} vanished from the cache")))?;
        let n = if extended { 16 } else { 8 };
        t.modify(at, n, v, |d| {
            d[at..at + 8].copy_from_slice(&e.desc.to_be_bytes());
            if extended {
                d[at + 8..at + 16].copy_from_slice(&e.bm.to_be_bytes());
            }
        });
        Ok(Step::Done(()))
    }

    /// Release the host storage `old` referenced, once the entry replacing it is durable.
    pub fn queue_free(&mut self, geo: &Geo, old: Entry) {
        if old.compressed() {
            let (off, len) = super::compressed::sectors(old.desc, geo.cluster_bits);
            self.pending_free.push(Release::metadata(off, len));
        } else if old.host() != 0 {
            self.pending_free.push(Release {
                off: old.host(),
                len: geo.cs,
                data: true,
            });
        }
    }

    /// Apply queued decreases (their pointer removals are durable now). A cluster that reaches
    /// zero is dropped from the caches unwritten, so stale table contents can never land on
    /// it after it is reused; a data cluster is quarantined instead when reads may splice.
    /// Returns the data clusters to punch out of the file (`punch_frees`), in runs: they are
    /// quarantined until `Qcow2::punch_freed` has punched them, so no write can land in one
    /// before its hole.
    pub fn apply_frees(
        &mut self,
        f: &HostFile,
        geo: &Geo,
        frees: &[Release],
    ) -> Result<Vec<(u64, u64)>> {
        let mut punch: Vec<(u64, u64)> = Vec::new();
        for &Release { off, len, data } in frees {
            if len == 0 {
                continue;
            }
            let first = off >> geo.cluster_bits;
            let last = (off + len - 1) >> geo.cluster_bits;
            for c in first..=last {
                let v = self.bump();
                if self.rc.decrease(f, c, v)? == 0 {
                    self.l2.remove(c << geo.cluster_bits);
                    self.forget_free_bytes(c << geo.cluster_bits, geo.cs);
                    if data && self.quarantine_data {
                        self.rc.quarantine(c);
                    } else if data && self.punch_frees {
                        self.rc.quarantine(c);
                        match punch.last_mut() {
                            Some((start, n)) if *start + *n == c => *n += 1,
                            _ => punch.push((c, 1)),
                        }
                    }
                }
            }
        }
        Ok(punch)
    }

    /// Give back a cluster nothing ever pointed at (a failed write's, a stray one).
    pub fn unalloc(&mut self, f: &HostFile, off: u64, cluster_bits: u32) -> Result<()> {
        let v = self.bump();
        if self.rc.decrease(f, off >> cluster_bits, v)? == 0 {
            self.forget_free_bytes(off >> cluster_bits << cluster_bits, 1 << cluster_bits);
        }
        Ok(())
    }

    fn forget_free_bytes(&mut self, cluster: u64, cs: u64) {
        if self.free_bytes >= cluster && self.free_bytes < cluster + cs {
            self.free_bytes = 0;
        }
    }

    /// Room for `len` bytes of a compressed cluster (qemu's `qcow2_alloc_bytes`): the rest
    /// of the host cluster the last one went into, whose refcount then counts one more
    /// user, else a new cluster. Each piece starts on an `align` boundary. `len` is at most
    /// a cluster.
    pub fn alloc_bytes(
        &mut self,
        f: &HostFile,
        geo: &Geo,
        len: u64,
        align: u64,
    ) -> Result<Step<u64>> {
        let at = self.free_bytes;
        let in_cluster = at & (geo.cs - 1);
        if at != 0 && in_cluster + len <= geo.cs {
            let v = self.bump();
            if self.rc.increase(f, at >> geo.cluster_bits, v)?.is_some() {
                self.free_bytes = next_free(at, len, align, geo.cs);
                return Ok(Step::Done(at));
            }
        }
        let (target, _fresh) = need!(self.alloc(f));
        self.free_bytes = next_free(target, len, align, geo.cs);
        Ok(Step::Done(target))
    }
}

/// The next piece's offset after `len` bytes at `at`, or 0 when its cluster is full.
fn next_free(at: u64, len: u64, align: u64, cs: u64) -> u64 {
    let next = (at + len).div_ceil(align) * align;
    if next.is_multiple_of(cs) {
        0
    } else {
        next
    }
}
