//! A cache of metadata tables (L2 tables, refcount blocks) keyed by host offset, holding each
//! table's on-disk bytes. One copy per table exists in memory; it is changed only under the
//! metadata lock and written only by the holder of the flush gate (see `flush.rs`).
//!
//! Dirty state is kept per page (4 KiB, or the table if smaller), so a flush writes only the
//! pages that changed. Every change stamps the table with a new version; a flush clears the
//! dirty pages of a table only if its version is still the one it copied, so a change made
//! while the copy was being written stays dirty. Dirty tables are never evicted: eviction
//! (the CLOCK algorithm: a table used since the hand last passed gets a second chance) picks
//! clean ones only, and when every table is dirty the cache grows past its budget until the
//! next flush ([`TableCache::over_budget`]).

use std::collections::HashMap;

/// Dirty-tracking granularity.
const PAGE: usize = 4096;

#[derive(Debug)]
pub struct Table {
    data: Box<[u8]>,
    dirty: Vec<u64>,
    version: u64,
    referenced: bool,
}

impl Table {
    fn page(&self) -> usize {
        PAGE.min(self.data.len())
    }

    pub fn data(&self) -> &[u8] {
        &self.data
    }

    pub fn be64(&self, at: usize) -> u64 {
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.data[at..at + 8]);
        u64::from_be_bytes(b)
    }

    /// Change the table through `f`, which may touch only bytes `[at, at + len)`: they are
    /// marked dirty under `version`.
    pub fn modify(&mut self, at: usize, len: usize, version: u64, f: impl FnOnce(&mut [u8])) {
        f(&mut self.data);
        let p = self.page();
        for i in at / p..(at + len).div_ceil(p) {
            self.dirty[i / 64] |= 1 << (i % 64);
        }
        self.version = version;
    }

    #[cfg(test)]
    pub fn set_be64(&mut self, at: usize, v: u64, version: u64) {
        self.modify(at, 8, version, |d| {
            d[at..at + 8].copy_from_slice(&v.to_be_bytes())
        });
    }

    /// Is the page holding byte `at` changed since it was last written?
    pub fn page_dirty(&self, at: usize) -> bool {
        let i = at / self.page();
        self.dirty[i / 64] >> (i % 64) & 1 != 0
    }

    pub fn is_dirty(&self) -> bool {
        self.dirty.iter().any(|&w| w != 0)
    }

    fn mark_all(&mut self) {
        let pages = self.data.len().div_ceil(self.page());
        for i in 0..pages {
            self.dirty[i / 64] |= 1 << (i % 64);
        }
    }
}

/// The dirty pages of one table, copied for writing: `(offset in the file, bytes)` runs.
#[derive(Debug)]
pub struct DirtyCopy {
    pub offset: u64,
    pub version: u64,
    pub runs: Vec<(u64, Vec<u8>)>,
}

#[derive(Debug)]
struct Slot {
    offset: u64,
    table: Table,
}

#[derive(Debug)]
pub struct TableCache {
    index: HashMap<u64, usize>,
    slots: Vec<Option<Slot>>,
    free: Vec<usize>,
    hand: usize,
    max: usize,
}

impl TableCache {
    /// Room for `budget` bytes of tables of `table_bytes` each (at least 16 tables).
    pub fn new(budget: usize, table_bytes: usize) -> TableCache {
        TableCache {
            index: HashMap::new(),
            slots: Vec::new(),
            free: Vec::new(),
            hand: 0,
            max: (budget / table_bytes.max(1)).max(16),
        }
    }

    pub fn get(&mut self, offset: u64) -> Option<&mut Table> {
        let i = *self.index.get(&offset)?;
        let t = &mut self.slots[i].as_mut()?.table;
        t.referenced = true;
        Some(t)
    }

    pub fn contains(&self, offset: u64) -> bool {
        self.index.contains_key(&offset)
    }

    /// Add a table read from disk (clean) or made in memory (`dirty`: every page).
    pub fn insert(&mut self, offset: u64, data: Vec<u8>, dirty: bool, version: u64) {
        self.remove(offset);
        let pages = data.len().div_ceil(PAGE.min(data.len().max(1)));
        let mut table = Table {
            data: data.into_boxed_slice(),
            dirty: vec![0; pages.div_ceil(64).max(1)],
            version,
            referenced: true,
        };
        if dirty {
            table.mark_all();
        }
        // Back under the budget if clean tables allow (after a flush cleaned them).
        while self.index.len() >= self.max {
            let Some(i) = self.victim() else { break };
            if let Some(old) = self.slots[i].take() {
                self.index.remove(&old.offset);
            }
            self.free.push(i);
        }
        let i = match self.free.pop() {
            Some(i) => i,
            None => {
                self.slots.push(None);
                self.slots.len() - 1
            }
        };
        self.slots[i] = Some(Slot { offset, table });
        self.index.insert(offset, i);
    }

    /// A clean slot not used since the hand last passed it.
    fn victim(&mut self) -> Option<usize> {
        let n = self.slots.len();
        for _ in 0..2 * n {
            let i = self.hand % n.max(1);
            self.hand = i + 1;
            if let Some(s) = self.slots[i].as_mut() {
                if s.table.is_dirty() {
                    continue;
                }
                if s.table.referenced {
                    s.table.referenced = false;
                    continue;
                }
                return Some(i);
            }
        }
        None
    }

    /// Drop a table without writing it (its cluster was freed).
    pub fn remove(&mut self, offset: u64) {
        if let Some(i) = self.index.remove(&offset) {
            self.slots[i] = None;
            self.free.push(i);
        }
    }

    /// More tables than the budget: a flush should make some clean.
    pub fn over_budget(&self) -> bool {
        self.index.len() > self.max
    }

    pub fn any_dirty(&self) -> bool {
        self.slots.iter().flatten().any(|s| s.table.is_dirty())
    }

    /// Copies of every dirty page, grouped in runs per table.
    pub fn dirty_copies(&self) -> Vec<DirtyCopy> {
        let mut out = Vec::new();
        for s in self.slots.iter().flatten() {
            let t = &s.table;
            if !t.is_dirty() {
                continue;
            }
            let p = t.page();
            let pages = t.data.len().div_ceil(p);
            let mut runs = Vec::new();
            let mut i = 0;
            while i < pages {
                if t.dirty[i / 64] >> (i % 64) & 1 == 0 {
                    i += 1;
                    continue;
                }
                let mut j = i + 1;
                while j < pages && t.dirty[j / 64] >> (j % 64) & 1 != 0 {
                    j += 1;
                }
                let (a, b) = (i * p, (j * p).min(t.data.len()));
                runs.push((s.offset + a as u64, t.data[a..b].to_vec()));
                i = j;
            }
            out.push(DirtyCopy {
                offset: s.offset,
                version: t.version,
                runs,
            });
        }
        out
    }

    /// After `copies` were written: tables unchanged since are clean.
    pub fn mark_clean(&mut self, copies: &[DirtyCopy]) {
        for c in copies {
            if let Some(&i) = self.index.get(&c.offset) {
                if let Some(s) = self.slots[i].as_mut() {
                    if s.table.version == c.version {
                        s.table.dirty.iter_mut().for_each(|w| *w = 0);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_dirty_pages_are_copied_and_changes_during_a_flush_stay_dirty() {
        let mut c = TableCache::new(1 << 20, 65536);
        c.insert(0x10000, vec![0; 65536], false, 0);
        assert!(c.dirty_copies().is_empty());
        c.get(0x10000).unwrap().set_be64(8, 7, 1);
        c.get(0x10000).unwrap().set_be64(5 * 4096, 9, 2);
        let copies = c.dirty_copies();
        assert_eq!(copies.len(), 1);
        let runs: Vec<(u64, usize)> = copies[0].runs.iter().map(|(o, d)| (*o, d.len())).collect();
        assert_eq!(runs, vec![(0x10000, 4096), (0x10000 + 5 * 4096, 4096)]);
        c.get(0x10000).unwrap().set_be64(16, 1, 3);
        c.mark_clean(&copies);
        assert!(c.any_dirty(), "a change made after the copy stays dirty");
        let copies = c.dirty_copies();
        c.mark_clean(&copies);
        assert!(!c.any_dirty());
    }

    #[test]
    fn dirty_tables_are_never_evicted() {
        let mut c = TableCache::new(16 * 512, 512);
        for k in 0..16u64 {
            c.insert(k * 512, vec![0; 512], true, 1);
        }
        c.insert(100 * 512, vec![0; 512], false, 0);
        for k in 0..16u64 {
            assert!(c.contains(k * 512));
        }
        assert!(c.over_budget());
        let copies = c.dirty_copies();
        c.mark_clean(&copies);
        for k in 200..240u64 {
            c.insert(k * 512, vec![0; 512], false, 0);
        }
        assert!(!c.over_budget());
    }
}
