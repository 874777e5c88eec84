//! Refcounts: the refcount table, a cache of refcount blocks (any width from 1 to 64 bits), and
//! the cluster allocator built on them.
//!
//! Ordering rules kept here: a new refcount block reaches disk before the table entry that
//! points to it; a grown table is complete on disk before the header points to it; refcount
//! decreases are queued (`pending_free`) and applied only after the pointers they drop are on
//! disk, so a crash can leak clusters but never leave a referenced cluster with refcount 0.

use super::file::ImageFile;
use super::header::{MAX_REFTABLE_BYTES, OFF_REFTABLE};
use crate::{Error, Result};
use std::collections::{BTreeSet, HashMap};

const REFBLOCK_MASK: u64 = !0x1ff;
/// Host offsets stay below 2^56 (the L2 entry's offset field is bits 9..55).
const MAX_HOST: u64 = 1 << 56;

/// Read entry `i` of a refcount block of `1 << order`-bit entries.
pub fn get_ref(data: &[u8], i: usize, order: u32) -> u64 {
    let bits = 1usize << order;
    if bits < 8 {
        let bit = i * bits;
        let mask = (1u64 << bits) - 1;
        (u64::from(data[bit / 8]) >> (bit % 8)) & mask
    } else {
        let bytes = bits / 8;
        data[i * bytes..(i + 1) * bytes]
            .iter()
            .fold(0u64, |acc, &b| (acc << 8) | u64::from(b))
    }
}

/// Write entry `i`; the caller has checked `v` fits.
pub fn set_ref(data: &mut [u8], i: usize, order: u32, v: u64) {
    let bits = 1usize << order;
    if bits < 8 {
        let bit = i * bits;
        let mask = ((1u16 << bits) - 1) as u8;
        let shift = bit % 8;
        let byte = &mut data[bit / 8];
        *byte = (*byte & !(mask << shift)) | (((v as u8) & mask) << shift);
    } else {
        let bytes = bits / 8;
        for (k, b) in data[i * bytes..(i + 1) * bytes].iter_mut().enumerate() {
            *b = (v >> (8 * (bytes - 1 - k))) as u8;
        }
    }
}

#[derive(Debug)]
struct Block {
    data: Vec<u8>,
    dirty: bool,
    version: u64,
    last_use: u64,
}

/// Dirty state copied out under the lock, written without it.
#[derive(Debug, Default)]
pub struct RefSnapshot {
    pub blocks: Vec<(u64, Vec<u8>, u64)>,
    pub table_dirty: bool,
}

#[derive(Debug)]
pub struct Refcounts {
    cluster_bits: u32,
    order: u32,
    table: Vec<u64>,
    table_offset: u64,
    table_clusters: u64,
    table_dirty: BTreeSet<usize>,
    blocks: HashMap<u64, Block>,
    tick: u64,
    max_blocks: usize,
    /// Lowest cluster index that may be free.
    free_hint: u64,
    /// Every byte at or past this offset has never been written: such clusters read as zeroes.
    alloc_high: u64,
    /// Byte ranges to decrement once the pointer removals are durable.
    pub pending_free: Vec<(u64, u64)>,
}

impl Refcounts {
    pub fn new(
        f: &ImageFile,
        cluster_bits: u32,
        order: u32,
        table_offset: u64,
        table_clusters: u64,
        file_len: u64,
    ) -> Result<Refcounts> {
        let bytes = table_clusters << cluster_bits;
        let mut raw = vec![0u8; bytes as usize];
        f.read("read refcount table", table_offset, &mut raw)?;
        let table = raw
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().unwrap_or([0; 8])))
            .collect();
        let cs = 1u64 << cluster_bits;
        Ok(Refcounts {
            cluster_bits,
            order,
            table,
            table_offset,
            table_clusters,
            table_dirty: BTreeSet::new(),
            blocks: HashMap::new(),
            tick: 0,
            max_blocks: ((16usize << 20) >> cluster_bits).max(16),
            free_hint: 0,
            alloc_high: file_len.div_ceil(cs) * cs,
            pending_free: Vec::new(),
        })
    }

    fn cs(&self) -> u64 {
        1 << self.cluster_bits
    }

    fn per_block(&self) -> u64 {
        1 << (self.cluster_bits + 3 - self.order)
    }

    fn max_value(&self) -> u64 {
        if self.order == 6 {
            u64::MAX
        } else {
            (1u64 << (1 << self.order)) - 1
        }
    }

    /// The cached block for range `r`, loading it; None when the table has no block there.
    fn block(&mut self, f: &ImageFile, r: u64) -> Result<Option<u64>> {
        let Some(&entry) = self.table.get(r as usize) else {
            return Ok(None);
        };
        let off = entry & REFBLOCK_MASK;
        if off == 0 {
            return Ok(None);
        }
        if !off.is_multiple_of(self.cs()) || off >= MAX_HOST {
            return Err(f.corrupt(format!(
                "refcount block {r} at {off:#x} is not cluster aligned"
            )));
        }
        self.tick += 1;
        if let Some(b) = self.blocks.get_mut(&off) {
            b.last_use = self.tick;
            return Ok(Some(off));
        }
        self.evict();
        let mut data = vec![0u8; self.cs() as usize];
        f.read("read refcount block", off, &mut data)?;
        self.blocks.insert(
            off,
            Block {
                data,
                dirty: false,
                version: 0,
                last_use: self.tick,
            },
        );
        Ok(Some(off))
    }

    fn evict(&mut self) {
        if self.blocks.len() < self.max_blocks {
            return;
        }
        if let Some((&k, _)) = self
            .blocks
            .iter()
            .filter(|(_, b)| !b.dirty)
            .min_by_key(|(_, b)| b.last_use)
        {
            self.blocks.remove(&k);
        }
    }

    #[allow(dead_code)]
    pub fn refcount(&mut self, f: &ImageFile, cluster: u64) -> Result<u64> {
        let per = self.per_block();
        match self.block(f, cluster / per)? {
            None => Ok(0),
            Some(k) => Ok(get_ref(
                &self.blocks[&k].data,
                (cluster % per) as usize,
                self.order,
            )),
        }
    }

    fn set(&mut self, key: u64, i: u64, v: u64, version: u64) {
        if let Some(b) = self.blocks.get_mut(&key) {
            set_ref(&mut b.data, i as usize, self.order, v);
            b.dirty = true;
            b.version = version;
        }
    }

    /// Add `delta` (±1) to one cluster's refcount.
    pub fn change(&mut self, f: &ImageFile, cluster: u64, delta: i64, version: u64) -> Result<()> {
        let per = self.per_block();
        let key = match self.block(f, cluster / per)? {
            Some(k) => k,
            None if delta > 0 => self.ensure_block(f, cluster / per, version)?,
            None => {
                return Err(f.corrupt(format!(
                    "freeing cluster {:#x} that has no refcount block",
                    cluster << self.cluster_bits
                )))
            }
        };
        let i = cluster % per;
        let old = get_ref(&self.blocks[&key].data, i as usize, self.order);
        let new = if delta >= 0 {
            old.checked_add(delta as u64)
                .filter(|&v| v <= self.max_value())
        } else {
            old.checked_sub(delta.unsigned_abs())
        };
        let Some(new) = new else {
            return Err(f.corrupt(format!(
                "refcount of cluster {:#x} would go from {old} by {delta}",
                cluster << self.cluster_bits
            )));
        };
        self.set(key, i, new, version);
        if new == 0 {
            self.free_hint = self.free_hint.min(cluster);
        }
        Ok(())
    }

    /// Make sure range `r` has a refcount block. A missing block means every cluster in its
    /// range is free, so the block goes into the range's own first cluster.
    fn ensure_block(&mut self, f: &ImageFile, r: u64, version: u64) -> Result<u64> {
        if r >= self.table.len() as u64 {
            self.grow(f, r, version)?;
        }
        if let Some(k) = self.block(f, r)? {
            return Ok(k);
        }
        let per = self.per_block();
        let off = (r * per) << self.cluster_bits;
        if off >= MAX_HOST {
            return Err(Error::NoSpace(format!(
                "{}: image too large",
                f.path.display()
            )));
        }
        let mut data = vec![0u8; self.cs() as usize];
        set_ref(&mut data, 0, self.order, 1);
        self.tick += 1;
        self.evict();
        self.blocks.insert(
            off,
            Block {
                data,
                dirty: true,
                version,
                last_use: self.tick,
            },
        );
        self.table[r as usize] = off;
        self.table_dirty.insert(r as usize);
        self.alloc_high = self.alloc_high.max(off + self.cs());
        Ok(off)
    }

    /// Allocate one cluster with refcount 1. Returns its offset and whether it is known to
    /// read as zeroes (never written before).
    pub fn alloc(&mut self, f: &ImageFile, version: u64) -> Result<(u64, bool)> {
        let per = self.per_block();
        let mut c = self.free_hint;
        loop {
            if (c << self.cluster_bits) >= MAX_HOST || c >= (MAX_HOST >> self.cluster_bits) {
                return Err(Error::NoSpace(format!(
                    "{}: image too large",
                    f.path.display()
                )));
            }
            let r = c / per;
            let key = self.ensure_block(f, r, version)?;
            let data = &self.blocks[&key].data;
            let found = (c % per..per).find(|&i| get_ref(data, i as usize, self.order) == 0);
            match found {
                Some(i) => {
                    let cluster = r * per + i;
                    self.set(key, i, 1, version);
                    self.free_hint = cluster + 1;
                    let off = cluster << self.cluster_bits;
                    let fresh = off >= self.alloc_high;
                    self.alloc_high = self.alloc_high.max(off + self.cs());
                    return Ok((off, fresh));
                }
                None => c = (r + 1) * per,
            }
        }
    }

    /// Move the table to a bigger one at the first uncovered cluster, with its own new
    /// refcount blocks in front of it.
    fn grow(&mut self, f: &ImageFile, need_r: u64, version: u64) -> Result<()> {
        let cs = self.cs();
        let per = self.per_block();
        // Pointers in the new table must not precede their blocks on disk.
        self.write_dirty_blocks(f)?;
        f.sync()?;
        let old_n = self.table.len() as u64;
        let start = old_n * per;
        let mut k = 1u64;
        let (entries, tclusters) = loop {
            let want = (need_r + 1).max(old_n + k);
            let want = want + want / 2;
            let tclusters = (want * 8).div_ceil(cs);
            let k2 = (k + tclusters).div_ceil(per);
            if k2 <= k {
                break (tclusters * cs / 8, tclusters);
            }
            k = k2;
        };
        if tclusters * cs > MAX_REFTABLE_BYTES
            || ((start + k + tclusters) << self.cluster_bits) >= MAX_HOST
        {
            return Err(Error::NoSpace(format!(
                "{}: refcount table cannot grow further",
                f.path.display()
            )));
        }
        let area_end = start + k + tclusters;
        let mut table = self.table.clone();
        table.resize(entries as usize, 0);
        for i in 0..k {
            let r = old_n + i;
            let mut data = vec![0u8; cs as usize];
            let lo = r * per;
            for c in lo.max(start)..(lo + per).min(area_end) {
                set_ref(&mut data, (c - lo) as usize, self.order, 1);
            }
            let off = (start + i) << self.cluster_bits;
            f.write("write refcount block", off, &data)?;
            table[r as usize] = off;
            self.blocks.insert(
                off,
                Block {
                    data,
                    dirty: false,
                    version: 0,
                    last_use: self.tick,
                },
            );
        }
        let table_off = (start + k) << self.cluster_bits;
        let mut raw = Vec::with_capacity((tclusters * cs) as usize);
        for e in &table {
            raw.extend_from_slice(&e.to_be_bytes());
        }
        f.write("write refcount table", table_off, &raw)?;
        f.sync()?;
        let mut hdr = [0u8; 12];
        hdr[..8].copy_from_slice(&table_off.to_be_bytes());
        hdr[8..].copy_from_slice(&(tclusters as u32).to_be_bytes());
        f.write("write header", OFF_REFTABLE, &hdr)?;
        f.sync()?;
        let (old_off, old_clusters) = (self.table_offset, self.table_clusters);
        self.table = table;
        self.table_offset = table_off;
        self.table_clusters = tclusters;
        self.table_dirty.clear();
        self.alloc_high = self.alloc_high.max(area_end << self.cluster_bits);
        // The old table is unreferenced on disk now: free it at once.
        for c in 0..old_clusters {
            self.change(f, (old_off >> self.cluster_bits) + c, -1, version)?;
        }
        Ok(())
    }

    fn write_dirty_blocks(&mut self, f: &ImageFile) -> Result<()> {
        for (&off, b) in self.blocks.iter_mut().filter(|(_, b)| b.dirty) {
            f.write("write refcount block", off, &b.data)?;
            b.dirty = false;
        }
        Ok(())
    }

    pub fn snapshot(&self) -> RefSnapshot {
        RefSnapshot {
            blocks: self
                .blocks
                .iter()
                .filter(|(_, b)| b.dirty)
                .map(|(&o, b)| (o, b.data.clone(), b.version))
                .collect(),
            table_dirty: !self.table_dirty.is_empty(),
        }
    }

    pub fn mark_clean(&mut self, snap: &RefSnapshot) {
        for (off, _, v) in &snap.blocks {
            if let Some(b) = self.blocks.get_mut(off) {
                if b.version == *v {
                    b.dirty = false;
                }
            }
        }
    }

    /// Write the dirty table entries (called with the metadata lock held: the table may move).
    pub fn write_table_entries(&mut self, f: &ImageFile) -> Result<()> {
        let dirty = std::mem::take(&mut self.table_dirty);
        for &i in &dirty {
            let off = self.table_offset + i as u64 * 8;
            if let Err(e) = f.write("write refcount table", off, &self.table[i].to_be_bytes()) {
                self.table_dirty.extend(dirty);
                return Err(e);
            }
        }
        Ok(())
    }

    /// Free `len` bytes at `off` (a compressed cluster may span two host clusters).
    pub fn free_range(&mut self, f: &ImageFile, off: u64, len: u64, version: u64) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let first = off >> self.cluster_bits;
        let last = (off + len - 1) >> self.cluster_bits;
        for c in first..=last {
            self.change(f, c, -1, version)?;
        }
        Ok(())
    }

    /// Host end of the allocated area (for extending the file at flush).
    pub fn alloc_high(&self) -> u64 {
        self.alloc_high
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_width_round_trips() {
        for order in 0..=6u32 {
            let bits = 1u32 << order;
            let max = if bits == 64 {
                u64::MAX
            } else {
                (1u64 << bits) - 1
            };
            let mut data = vec![0u8; 512];
            let n = 512 * 8 / bits as usize;
            for i in 0..n {
                set_ref(&mut data, i, order, (i as u64 * 7) & max);
            }
            for i in 0..n {
                assert_eq!(
                    get_ref(&data, i, order),
                    (i as u64 * 7) & max,
                    "order {order} i {i}"
                );
            }
            set_ref(&mut data, 1, order, max);
            assert_eq!(get_ref(&data, 1, order), max);
            assert_eq!(get_ref(&data, 0, order), 0);
        }
    }

    #[test]
    fn sub_byte_entries_are_lsb_first() {
        let mut data = vec![0u8; 1];
        set_ref(&mut data, 0, 0, 1);
        assert_eq!(data[0], 1);
        set_ref(&mut data, 1, 1, 2);
        assert_eq!(data[0], 0b1001);
    }
}
