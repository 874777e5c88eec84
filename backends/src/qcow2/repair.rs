//! Rebuilding the refcounts of an image left dirty by a crash with lazy refcounts, as qemu
//! does when it opens such an image read-write: count every reference from the header, the
//! LUKS header of an encrypted image, the tables, the active and snapshot L1/L2 tables, then
//! write a fresh refcount table and blocks past the end of everything in use, point the
//! header at them and clear the dirty bit.

use super::compressed;
use super::header::{Header, INCOMPAT_DIRTY, OFF_INCOMPAT, OFF_REFTABLE};
use super::meta::{COMPRESSED, OFFSET_MASK};
use super::refcount::set_ref;
use super::snapshot::Snapshot;
use crate::file::HostFile;
use crate::{Error, Result};

/// Refuse to count images with more clusters than this (the counts live in memory).
const MAX_CLUSTERS: u64 = 1 << 28;

fn decode(raw: &[u8]) -> Vec<u64> {
    raw.chunks_exact(8)
        .map(|c| u64::from_be_bytes(c.try_into().unwrap_or([0; 8])))
        .collect()
}

struct Counter<'a> {
    f: &'a HostFile,
    cluster_bits: u32,
    counts: Vec<u64>,
    /// Data clusters live in an external data file: L2 entries point there, not here.
    external_data: bool,
}

impl Counter<'_> {
    fn add_range(&mut self, off: u64, len: u64) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let first = off >> self.cluster_bits;
        let last = (off + len - 1) >> self.cluster_bits;
        if last >= self.counts.len() as u64 {
            return Err(self.f.corrupt(format!(
                "reference to {off:#x} (length {len:#x}) is beyond the end of the image"
            )));
        }
        for c in first..=last {
            self.counts[c as usize] += 1;
        }
        Ok(())
    }

    fn add_l1(&mut self, l1_offset: u64, l1_size: u32, extended: bool) -> Result<()> {
        let cs = 1u64 << self.cluster_bits;
        self.add_range(l1_offset, u64::from(l1_size) * 8)?;
        let mut raw = vec![0u8; l1_size as usize * 8];
        self.f.read("read L1 table", l1_offset, &mut raw)?;
        for l1e in decode(&raw) {
            let l2 = l1e & OFFSET_MASK;
            if l2 == 0 {
                continue;
            }
            self.add_range(l2, cs)?;
            let mut t = vec![0u8; cs as usize];
            self.f.read("read L2 table", l2, &mut t)?;
            let words = decode(&t);
            let step = if extended { 2 } else { 1 };
            for w in words.iter().step_by(step) {
                if w & COMPRESSED != 0 {
                    let (off, len) = compressed::sectors(w & !(3 << 62), self.cluster_bits);
                    self.add_range(off, len)?;
                } else if w & OFFSET_MASK != 0 && !self.external_data {
                    self.add_range(w & OFFSET_MASK, cs)?;
                }
            }
        }
        Ok(())
    }
}

pub fn rebuild(
    f: &HostFile,
    h: &Header,
    snapshots: &[Snapshot],
    snap_table_len: u64,
) -> Result<()> {
    let counts = count_references(f, h, snapshots, snap_table_len)?;
    let (table_off, table_clusters) = write_refcounts(f, h, counts)?;
    let mut hdr = [0u8; 12];
    hdr[..8].copy_from_slice(&table_off.to_be_bytes());
    hdr[8..].copy_from_slice(&(table_clusters as u32).to_be_bytes());
    f.write("write header", OFF_REFTABLE, &hdr, false)?;
    f.sync()?;
    f.write(
        "write header",
        OFF_INCOMPAT,
        &(h.incompatible & !INCOMPAT_DIRTY).to_be_bytes(),
        false,
    )?;
    f.sync()?;
    let mut back = [0u8; 8];
    f.read("read header", OFF_INCOMPAT, &mut back)?;
    if u64::from_be_bytes(back) & INCOMPAT_DIRTY != 0 {
        return Err(f.corrupt("the dirty bit did not clear".into()));
    }
    tracing::info!(
        "'{}': rebuilt the refcounts of a dirty image",
        f.path().display()
    );
    Ok(())
}

/// Every reference in the image, per cluster: header, snapshot table, active and snapshot
/// L1 and L2 tables and what they point at.
fn count_references(
    f: &HostFile,
    h: &Header,
    snapshots: &[Snapshot],
    snap_table_len: u64,
) -> Result<Vec<u64>> {
    let cs = 1u64 << h.cluster_bits;
    let file_clusters = f.size()?.div_ceil(cs);
    if file_clusters > MAX_CLUSTERS {
        return Err(Error::Open(format!(
            "'{}' is dirty and too large to repair here: run 'qemu-img check -r all'",
            f.path().display()
        )));
    }
    let mut c = Counter {
        f,
        cluster_bits: h.cluster_bits,
        counts: vec![0; file_clusters.max(1) as usize],
        external_data: h.incompatible & super::header::INCOMPAT_DATA_FILE != 0,
    };
    c.add_range(0, cs)?;
    if let Some((off, len)) = h.crypto_header {
        // The LUKS header of an encrypted image: losing its clusters loses every key.
        c.add_range(off, len)?;
    }
    c.add_range(h.snapshots_offset, snap_table_len)?;
    c.add_l1(h.l1_table_offset, h.l1_size, h.extended_l2())?;
    for s in snapshots {
        c.add_l1(s.l1_table_offset, s.l1_size, h.extended_l2())?;
    }
    let order = h.refcount_order;
    let max = if order == 6 {
        u64::MAX
    } else {
        (1u64 << (1 << order)) - 1
    };
    if let Some(i) = c.counts.iter().position(|&n| n > max) {
        return Err(f.corrupt(format!(
            "cluster {i} has more references than refcounts can hold"
        )));
    }
    Ok(c.counts)
}

/// Write fresh refcount blocks and a table past everything in use (they count themselves)
/// and sync: returns the table's offset and clusters.
fn write_refcounts(f: &HostFile, h: &Header, mut counts: Vec<u64>) -> Result<(u64, u64)> {
    let cb = h.cluster_bits;
    let cs = 1u64 << cb;
    let order = h.refcount_order;
    let per = 1u64 << (cb + 3 - order);
    let start = counts
        .iter()
        .rposition(|&n| n > 0)
        .map_or(0, |i| i as u64 + 1);
    // k blocks then t table clusters; they must cover themselves.
    let mut k = 1u64;
    let t = loop {
        let total = start + k;
        let t = (total.div_ceil(per) * 8).div_ceil(cs).max(1);
        let k2 = (start + k + t).div_ceil(per);
        if k2 <= k {
            break t;
        }
        k = k2;
    };
    let end = start + k + t;
    counts.resize(end as usize, 0);
    for x in &mut counts[start as usize..] {
        *x = 1;
    }
    let mut table = vec![0u8; (t * cs) as usize];
    for b in 0..k {
        let mut data = vec![0u8; cs as usize];
        let lo = b * per;
        for i in lo..(lo + per).min(end) {
            set_ref(&mut data, (i - lo) as usize, order, counts[i as usize]);
        }
        let off = (start + b) << cb;
        f.write("write refcount block", off, &data, false)?;
        table[(b * 8) as usize..(b * 8 + 8) as usize].copy_from_slice(&off.to_be_bytes());
    }
    let table_off = (start + k) << cb;
    f.write("write refcount table", table_off, &table, false)?;
    f.sync()?;
    Ok((table_off, t))
}
