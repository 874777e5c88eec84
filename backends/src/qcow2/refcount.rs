//! Refcounts: the refcount table, a cache of refcount blocks (any width from 1 to 64 bits), and
//! the cluster allocator built on them. Everything here runs under the metadata lock.
//!
//! Rules kept here (the flush in `flush.rs` writes the dirty state in this order):
//! - An allocation raises the refcount in the cached block *before* anything can point at the
//!   cluster, so a flush always writes the increase before the pointer (a crash leaks, never
//!   dangles).
//! - A range without a refcount block gets one in its own first cluster (it counts itself);
//!   the block is dirty and its table entry is dirty: the flush writes blocks, syncs, then
//!   table entries.
//! - Decreases are never made here on the caller's behalf: callers queue them and the flush
//!   applies them after the pointers they drop are durable (`Meta::pending_free`).
//! - Growing the table ([`Refcounts::grow`]) is the one synchronous structural change: under
//!   the flush gate and the metadata lock, dirty blocks are written and synced, then new
//!   blocks and the new table at the end of the file, sync, the header switched, sync, and only
//!   then the old table freed.

use super::cache::TableCache;
use super::header::{MAX_REFTABLE_BYTES, OFF_REFTABLE};
use super::overlap::{Kind, MetaMap};
use crate::file::HostFile;
use crate::{Error, Result};
use std::collections::BTreeSet;

const REFBLOCK_MASK: u64 = !0x1ff;
/// Host offsets stay below 2^56 (the L2 entry's offset field is bits 9..55).
pub const MAX_HOST: u64 = 1 << 56;
/// Refcount blocks kept in memory.
const BLOCK_CACHE_BYTES: usize = 16 << 20;

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

/// Byte range of entry `i` inside a block (whole bytes, for dirty tracking).
fn entry_bytes(i: usize, order: u32) -> (usize, usize) {
    let bits = 1usize << order;
    if bits < 8 {
        (i * bits / 8, 1)
    } else {
        (i * bits / 8, bits / 8)
    }
}

/// Where a grown refcount table goes, in clusters: `blocks` new refcount blocks from
/// `start`, then the table.
struct Area {
    start: u64,
    blocks: u64,
    table_clusters: u64,
}

impl Area {
    fn end(&self) -> u64 {
        self.start + self.blocks + self.table_clusters
    }

    fn table_offset(&self, cluster_bits: u32) -> u64 {
        (self.start + self.blocks) << cluster_bits
    }
}

#[derive(Debug)]
pub struct Refcounts {
    cluster_bits: u32,
    order: u32,
    table: Vec<u64>,
    table_offset: u64,
    table_clusters: u64,
    table_dirty: BTreeSet<usize>,
    pub blocks: TableCache,
    /// Lowest cluster index that may be free.
    free_hint: u64,
    /// Every byte at or past this offset has never been written (reads as zeroes), and
    /// every cluster handed out or holding a new block lies below it.
    pub high: u64,
    /// Free clusters never to be handed out again (one bit per cluster, grown on demand):
    /// see `Meta::quarantine_data`. In memory only: on disk they are free, as they are.
    quarantined: Vec<u64>,
}

impl Refcounts {
    /// Load the table and record it and its blocks in `map`.
    pub fn open(
        f: &HostFile,
        cluster_bits: u32,
        order: u32,
        table_offset: u64,
        table_clusters: u64,
        file_len: u64,
        map: &mut MetaMap,
    ) -> Result<Refcounts> {
        let bytes = table_clusters << cluster_bits;
        let mut raw = vec![0u8; bytes as usize];
        f.read("read refcount table", table_offset, &mut raw)?;
        let table: Vec<u64> = raw
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().unwrap_or([0; 8])))
            .collect();
        map.add_range(Kind::RefTable, table_offset, bytes);
        for e in &table {
            let off = e & REFBLOCK_MASK;
            if off != 0 {
                map.add_cluster(Kind::RefBlock, off);
            }
        }
        Ok(Refcounts {
            cluster_bits,
            order,
            table,
            table_offset,
            table_clusters,
            table_dirty: BTreeSet::new(),
            blocks: TableCache::new(BLOCK_CACHE_BYTES, 1 << cluster_bits),
            free_hint: 0,
            high: file_len.div_ceil(1 << cluster_bits) << cluster_bits,
            quarantined: Vec::new(),
        })
    }

    fn cs(&self) -> u64 {
        1 << self.cluster_bits
    }

    fn per_block(&self) -> u64 {
        1 << (self.cluster_bits + 3 - self.order)
    }

    /// The cached block for range `r`, loading it; None when the table has no block there.
    fn block(&mut self, f: &HostFile, r: u64) -> Result<Option<u64>> {
        let Some(&entry) = self.table.get(r as usize) else {
            return Ok(None);
        };
        let off = entry & REFBLOCK_MASK;
        if off == 0 {
            return Ok(None);
        }
        if !off.is_multiple_of(self.cs()) || off >= MAX_HOST {
            return Err(f.corrupt(format!(
                "Refblock offset {off:#x} unaligned (reftable index: {r:#x})"
            )));
        }
        if !self.blocks.contains(off) {
            let mut data = vec![0u8; self.cs() as usize];
            f.read("read refcount block", off, &mut data)?;
            self.blocks.insert(off, data, false, 0);
        }
        Ok(Some(off))
    }

    fn set(&mut self, key: u64, i: u64, v: u64, version: u64) {
        let order = self.order;
        let (at, n) = entry_bytes(i as usize, order);
        if let Some(t) = self.blocks.get(key) {
            t.modify(at, n, version, |d| set_ref(d, i as usize, order, v));
        }
    }

    /// Never hand out free cluster `cluster` again.
    pub fn quarantine(&mut self, cluster: u64) {
        let word = (cluster / 64) as usize;
        if self.quarantined.len() <= word {
            self.quarantined.resize(word + 1, 0);
        }
        self.quarantined[word] |= 1 << (cluster % 64);
    }

    /// Let quarantined clusters `[first, first + n)` be handed out again.
    pub fn release_quarantine(&mut self, first: u64, n: u64) {
        for c in first..first + n {
            if let Some(w) = self.quarantined.get_mut((c / 64) as usize) {
                *w &= !(1 << (c % 64));
            }
        }
        self.free_hint = self.free_hint.min(first);
    }

    /// Undo [`Refcounts::alloc`] of the cluster at host offset `off`, which nothing points at.
    pub fn release(&mut self, f: &HostFile, off: u64, version: u64) -> Result<()> {
        self.decrease(f, off >> self.cluster_bits, version)
            .map(|_| ())
    }

    /// Drop one reference to a cluster; returns the new count.
    pub fn decrease(&mut self, f: &HostFile, cluster: u64, version: u64) -> Result<u64> {
        let per = self.per_block();
        let Some(key) = self.block(f, cluster / per)? else {
            return Err(f.corrupt(format!(
                "freeing cluster {:#x} that has no refcount block",
                cluster << self.cluster_bits
            )));
        };
        let i = cluster % per;
        let old = self
            .blocks
            .get(key)
            .map_or(0, |t| get_ref(t.data(), i as usize, self.order));
        let Some(new) = old.checked_sub(1) else {
            return Err(f.corrupt(format!(
                "refcount of cluster {:#x} would drop below zero",
                cluster << self.cluster_bits
            )));
        };
        self.set(key, i, new, version);
        if new == 0 {
            self.free_hint = self.free_hint.min(cluster);
        }
        Ok(new)
    }

    /// Add one reference to an allocated cluster (a second compressed cluster sharing it);
    /// returns the new count, or None when the count is at its largest (the caller takes a
    /// new cluster instead).
    pub fn increase(&mut self, f: &HostFile, cluster: u64, version: u64) -> Result<Option<u64>> {
        let per = self.per_block();
        let Some(key) = self.block(f, cluster / per)? else {
            return Ok(None);
        };
        let i = cluster % per;
        let old = self
            .blocks
            .get(key)
            .map_or(0, |t| get_ref(t.data(), i as usize, self.order));
        let max = if self.order >= 6 {
            u64::MAX
        } else {
            (1u64 << (1u32 << self.order)) - 1
        };
        if old == 0 || old >= max {
            return Ok(None);
        }
        self.set(key, i, old + 1, version);
        Ok(Some(old + 1))
    }

    /// Allocate one cluster with refcount 1: its offset and whether it was never written
    /// (reads as zeroes), or None when the refcount table must grow first
    /// ([`Refcounts::grow`], under the flush gate). The caller makes the file cover
    /// [`Refcounts::high`] before anything writes there.
    pub fn alloc(
        &mut self,
        f: &HostFile,
        version: u64,
        map: &mut MetaMap,
    ) -> Result<Option<(u64, bool)>> {
        let per = self.per_block();
        let mut c = self.free_hint;
        loop {
            if c >= (MAX_HOST >> self.cluster_bits) {
                return Err(Error::NoSpace(format!(
                    "{}: image too large",
                    f.path().display()
                )));
            }
            let r = c / per;
            if r >= self.table.len() as u64 {
                return Ok(None);
            }
            let key = match self.block(f, r)? {
                Some(k) => k,
                None => self.install_block(f, r, version, map)?,
            };
            let order = self.order;
            let found = self.blocks.get(key).and_then(|t| {
                (c % per..per).find(|&i| {
                    get_ref(t.data(), i as usize, order) == 0
                        && !is_set(&self.quarantined, r * per + i)
                })
            });
            match found {
                Some(i) => {
                    self.set(key, i, 1, version);
                    let cluster = r * per + i;
                    self.free_hint = cluster + 1;
                    let off = cluster << self.cluster_bits;
                    let fresh = off >= self.high;
                    self.high = self.high.max(off + self.cs());
                    return Ok(Some((off, fresh)));
                }
                None => c = (r + 1) * per,
            }
        }
    }

    /// Range `r` has no block: every cluster in it is free, so the block goes in the range's
    /// own first cluster and counts itself.
    fn install_block(
        &mut self,
        f: &HostFile,
        r: u64,
        version: u64,
        map: &mut MetaMap,
    ) -> Result<u64> {
        let off = (r * self.per_block()) << self.cluster_bits;
        if let Some(k) = map.check(off, self.cs(), None) {
            return Err(f.corrupt(format!(
                "Preventing invalid write on metadata (overlaps with {})",
                k.name()
            )));
        }
        let mut data = vec![0u8; self.cs() as usize];
        set_ref(&mut data, 0, self.order, 1);
        self.blocks.insert(off, data, true, version);
        self.table[r as usize] = off;
        self.table_dirty.insert(r as usize);
        map.add_cluster(Kind::RefBlock, off);
        self.high = self.high.max(off + self.cs());
        Ok(off)
    }

    /// Dirty table entries: `(file offset, value)` of each, for the flush.
    pub fn dirty_entries(&self) -> Vec<(usize, u64)> {
        self.table_dirty
            .iter()
            .map(|&i| (i, self.table[i]))
            .collect()
    }

    pub fn entry_offset(&self, i: usize) -> u64 {
        self.table_offset + i as u64 * 8
    }

    /// After `written` reached the disk: entries unchanged since are clean.
    pub fn mark_entries_clean(&mut self, written: &[(usize, u64)]) {
        for &(i, v) in written {
            if self.table.get(i) == Some(&v) {
                self.table_dirty.remove(&i);
            }
        }
    }

    pub fn any_dirty(&self) -> bool {
        !self.table_dirty.is_empty() || self.blocks.any_dirty()
    }

    /// The first range index past the table (what an allocation that found no room needs).
    pub fn growth_index(&self) -> u64 {
        self.table.len() as u64
    }

    /// Is range `r` inside the table?
    pub fn covers(&self, r: u64) -> bool {
        r < self.table.len() as u64
    }

    /// Move the table to a bigger one at the first uncovered cluster, with its own new
    /// refcount blocks in front of it. The caller holds the flush gate and the metadata lock,
    /// so nothing else writes metadata meanwhile.
    pub fn grow(
        &mut self,
        f: &HostFile,
        need_r: u64,
        version: u64,
        map: &mut MetaMap,
    ) -> Result<()> {
        // The new table carries every in-memory pointer: their blocks must be durable first.
        let copies = self.blocks.dirty_copies();
        for c in &copies {
            check_overlap(f, map, c.offset, self.cs(), Some(Kind::RefBlock))?;
            for (off, data) in &c.runs {
                f.write("write refcount block", *off, data, false)?;
            }
        }
        f.sync()?;
        self.blocks.mark_clean(&copies);
        let area = self.growth_area(f, need_r)?;
        check_overlap(
            f,
            map,
            area.start << self.cluster_bits,
            (area.end() - area.start) << self.cluster_bits,
            None,
        )?;
        f.grow_to(area.end() << self.cluster_bits)?;
        self.high = self.high.max(area.end() << self.cluster_bits);
        let table = self.write_area(f, map, &area)?;
        self.switch_table(f, map, table, &area, version)
    }

    /// Where the new blocks and table go: past every covered cluster, `blocks` blocks that
    /// cover themselves and the table, then a table 50 % larger than needed.
    fn growth_area(&self, f: &HostFile, need_r: u64) -> Result<Area> {
        let cs = self.cs();
        let per = self.per_block();
        let old_n = self.table.len() as u64;
        let start = old_n * per;
        let mut k = 1u64;
        let table_clusters = loop {
            let want = (need_r + 1).max(old_n + k);
            let want = want + want / 2;
            let tclusters = (want * 8).div_ceil(cs);
            let k2 = (k + tclusters).div_ceil(per);
            if k2 <= k {
                break tclusters;
            }
            k = k2;
        };
        let area = Area {
            start,
            blocks: k,
            table_clusters,
        };
        if table_clusters * cs > MAX_REFTABLE_BYTES || (area.end() << self.cluster_bits) >= MAX_HOST
        {
            return Err(Error::NoSpace(format!(
                "{}: refcount table cannot grow further",
                f.path().display()
            )));
        }
        Ok(area)
    }

    /// Write the area's new blocks and the new table (every entry, old and new); sync.
    fn write_area(&mut self, f: &HostFile, map: &mut MetaMap, area: &Area) -> Result<Vec<u64>> {
        let cs = self.cs();
        let per = self.per_block();
        let old_n = self.table.len() as u64;
        let mut table = self.table.clone();
        table.resize((area.table_clusters * cs / 8) as usize, 0);
        for i in 0..area.blocks {
            let r = old_n + i;
            let mut data = vec![0u8; cs as usize];
            let lo = r * per;
            for c in lo.max(area.start)..(lo + per).min(area.end()) {
                set_ref(&mut data, (c - lo) as usize, self.order, 1);
            }
            let off = (area.start + i) << self.cluster_bits;
            f.write("write refcount block", off, &data, false)?;
            table[r as usize] = off;
            self.blocks.insert(off, data, false, 0);
            map.add_cluster(Kind::RefBlock, off);
        }
        let raw: Vec<u8> = table.iter().flat_map(|e| e.to_be_bytes()).collect();
        f.write(
            "write refcount table",
            area.table_offset(self.cluster_bits),
            &raw,
            false,
        )?;
        f.sync()?;
        Ok(table)
    }

    /// Point the header at the new table (synced), take it in memory, free the old one.
    fn switch_table(
        &mut self,
        f: &HostFile,
        map: &mut MetaMap,
        table: Vec<u64>,
        area: &Area,
        version: u64,
    ) -> Result<()> {
        let table_off = area.table_offset(self.cluster_bits);
        let mut hdr = [0u8; 12];
        hdr[..8].copy_from_slice(&table_off.to_be_bytes());
        hdr[8..].copy_from_slice(&(area.table_clusters as u32).to_be_bytes());
        f.write("write header", OFF_REFTABLE, &hdr, false)?;
        f.sync()?;
        let (old_off, old_clusters) = (self.table_offset, self.table_clusters);
        self.table = table;
        self.table_offset = table_off;
        self.table_clusters = area.table_clusters;
        self.table_dirty.clear();
        map.clear_ranges(Kind::RefTable);
        map.add_range(
            Kind::RefTable,
            table_off,
            area.table_clusters << self.cluster_bits,
        );
        // The header no longer points at the old table, durably: free it at once.
        for c in 0..old_clusters {
            self.decrease(f, (old_off >> self.cluster_bits) + c, version)?;
        }
        Ok(())
    }
}

/// A metadata write about to land on other metadata marks the image corrupt (qemu's check).
pub fn check_overlap(
    f: &HostFile,
    map: &MetaMap,
    off: u64,
    len: u64,
    own: Option<Kind>,
) -> Result<()> {
    match map.check(off, len, own) {
        None => Ok(()),
        Some(k) => Err(f.corrupt(format!(
            "Preventing invalid write on metadata (overlaps with {})",
            k.name()
        ))),
    }
}

fn is_set(bits: &[u64], i: u64) -> bool {
    bits.get((i / 64) as usize)
        .is_some_and(|w| w & (1 << (i % 64)) != 0)
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
