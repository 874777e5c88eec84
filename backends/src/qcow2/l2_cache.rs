//! A cache of L2 tables keyed by host offset, decoded to native words. Dirty tables stay until
//! a flush has written them; clean ones are evicted least-recently-used.

use std::collections::HashMap;

#[derive(Debug)]
pub struct Table {
    /// Big-endian words decoded: one per entry, or two (descriptor, bitmap) with extended L2.
    pub words: Vec<u64>,
    pub dirty: bool,
    pub version: u64,
    last_use: u64,
}

#[derive(Debug)]
pub struct L2Cache {
    map: HashMap<u64, Table>,
    tick: u64,
    max: usize,
}

impl L2Cache {
    /// `budget` bytes of tables of `table_bytes` each.
    pub fn new(budget: usize, table_bytes: usize) -> L2Cache {
        L2Cache {
            map: HashMap::new(),
            tick: 0,
            max: (budget / table_bytes.max(1)).max(16),
        }
    }

    pub fn get(&mut self, off: u64) -> Option<&mut Table> {
        self.tick += 1;
        let tick = self.tick;
        let t = self.map.get_mut(&off)?;
        t.last_use = tick;
        Some(t)
    }

    pub fn contains(&self, off: u64) -> bool {
        self.map.contains_key(&off)
    }

    pub fn insert(&mut self, off: u64, words: Vec<u64>, dirty: bool, version: u64) {
        if self.map.len() >= self.max {
            if let Some((&k, _)) = self
                .map
                .iter()
                .filter(|(_, t)| !t.dirty)
                .min_by_key(|(_, t)| t.last_use)
            {
                self.map.remove(&k);
            }
        }
        self.tick += 1;
        self.map.insert(
            off,
            Table {
                words,
                dirty,
                version,
                last_use: self.tick,
            },
        );
    }

    pub fn remove(&mut self, off: u64) {
        self.map.remove(&off);
    }

    /// Encoded copies of the dirty tables, for writing without the lock.
    pub fn snapshot(&self) -> Vec<(u64, Vec<u8>, u64)> {
        self.map
            .iter()
            .filter(|(_, t)| t.dirty)
            .map(|(&off, t)| (off, encode(&t.words), t.version))
            .collect()
    }

    pub fn mark_clean(&mut self, snap: &[(u64, Vec<u8>, u64)]) {
        for (off, _, v) in snap {
            if let Some(t) = self.map.get_mut(off) {
                if t.version == *v {
                    t.dirty = false;
                }
            }
        }
    }

    pub fn over_budget(&self) -> bool {
        self.map.len() > self.max
    }
}

pub fn decode(raw: &[u8]) -> Vec<u64> {
    raw.chunks_exact(8)
        .map(|c| u64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
        .collect()
}

pub fn encode(words: &[u64]) -> Vec<u8> {
    let mut out = Vec::with_capacity(words.len() * 8);
    for w in words {
        out.extend_from_slice(&w.to_be_bytes());
    }
    out
}
