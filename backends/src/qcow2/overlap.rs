//! qemu's metadata overlap checks (its default `overlap-check=cached` set): before any write
//! lands in the image file, its clusters are compared with every metadata structure the
//! engine knows without reading the disk — the header, the active L1 table, the active L2
//! tables, the refcount table and blocks, the snapshot table, the snapshots' L1 tables and the
//! bitmap directory. A hit means the image's metadata is inconsistent (a hostile or damaged
//! file): the write fails with EIO and the image is marked corrupt, as qemu does.

use std::collections::HashMap;

/// What a metadata cluster is; the order is qemu's `QCOW2_OL_*` bit order, which decides the
/// name reported when a range overlaps several.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Header,
    ActiveL1,
    ActiveL2,
    RefTable,
    RefBlock,
    SnapshotTable,
    InactiveL1,
    BitmapDir,
}

impl Kind {
    /// qemu's name in "Preventing invalid write on metadata (overlaps with NAME)".
    pub fn name(self) -> &'static str {
        match self {
            Kind::Header => "qcow2_header",
            Kind::ActiveL1 => "active L1 table",
            Kind::ActiveL2 => "active L2 table",
            Kind::RefTable => "refcount table",
            Kind::RefBlock => "refcount block",
            Kind::SnapshotTable => "snapshot table",
            Kind::InactiveL1 => "inactive L1 table",
            Kind::BitmapDir => "bitmap directory",
        }
    }
}

/// Where the metadata is, in whole clusters.
#[derive(Debug)]
pub struct MetaMap {
    cluster_bits: u32,
    /// Structures that are one range each: `(first cluster, end cluster, kind)`.
    ranges: Vec<(u64, u64, Kind)>,
    /// Active L2 tables and refcount blocks, by cluster index.
    clusters: HashMap<u64, Kind>,
}

impl MetaMap {
    pub fn new(cluster_bits: u32) -> MetaMap {
        let mut m = MetaMap {
            cluster_bits,
            ranges: Vec::new(),
            clusters: HashMap::new(),
        };
        m.ranges.push((0, 1, Kind::Header));
        m
    }

    fn span(&self, offset: u64, len: u64) -> (u64, u64) {
        let first = offset >> self.cluster_bits;
        let end = offset
            .saturating_add(len.max(1))
            .div_ceil(1 << self.cluster_bits);
        (first, end)
    }

    /// Record a structure of `len` bytes at `offset` (several may share a kind).
    pub fn add_range(&mut self, kind: Kind, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let (a, b) = self.span(offset, len);
        self.ranges.push((a, b, kind));
    }

    /// Forget every range of `kind` (before recording where the structure moved).
    pub fn clear_ranges(&mut self, kind: Kind) {
        self.ranges.retain(|r| r.2 != kind);
    }

    pub fn add_cluster(&mut self, kind: Kind, offset: u64) {
        self.clusters.insert(offset >> self.cluster_bits, kind);
    }

    pub fn remove_cluster(&mut self, offset: u64) {
        self.clusters.remove(&(offset >> self.cluster_bits));
    }

    /// The first kind of metadata (in qemu's order) that `[offset, offset + len)` touches,
    /// ignoring `ignore` (a table being written back does not overlap itself).
    pub fn check(&self, offset: u64, len: u64, ignore: Option<Kind>) -> Option<Kind> {
        let (a, b) = self.span(offset, len);
        let mut hit: Option<Kind> = None;
        let mut note = |k: Kind| {
            if Some(k) != ignore && hit.is_none_or(|h| k < h) {
                hit = Some(k);
            }
        };
        for &(s, e, k) in &self.ranges {
            if a < e && s < b {
                note(k);
            }
        }
        if !self.clusters.is_empty() {
            for c in a..b {
                if let Some(&k) = self.clusters.get(&c) {
                    note(k);
                }
            }
        }
        hit
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_the_first_kind_in_qemu_order() {
        let mut m = MetaMap::new(16);
        m.add_range(Kind::RefTable, 0x10000, 8);
        m.add_cluster(Kind::RefBlock, 0x20000);
        m.add_cluster(Kind::ActiveL2, 0x40000);
        assert_eq!(m.check(0x30000, 0x10000, None), None);
        assert_eq!(m.check(0x2ffff, 2, None), Some(Kind::RefBlock));
        assert_eq!(m.check(0, 0x50000, None), Some(Kind::Header));
        assert_eq!(m.check(0x40000, 512, Some(Kind::ActiveL2)), None);
        assert_eq!(m.check(0x10000, 512, None), Some(Kind::RefTable));
        m.remove_cluster(0x40000);
        assert_eq!(m.check(0x40000, 512, None), None);
    }
}
