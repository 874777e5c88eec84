//! Persistent dirty bitmaps (the qcow2 "bitmaps" extension): the directory, the bitmap
//! tables and their data clusters, as qemu's docs/interop/qcow2.txt describes them.
//!
//! Lifecycle, as qemu does it: a read-write open loads every bitmap and marks it IN_USE on
//! disk (so a crash leaves it visibly inconsistent); writes set bits of the enabled (AUTO)
//! ones in memory; close stores changed bitmaps in new clusters, writes a new directory,
//! points the header extension at it, clears IN_USE and frees the old clusters. A bitmap
//! found IN_USE at open (a crash left it) is inconsistent: kept as it is, never exported.

use crate::file::HostFile;
use crate::{Extent, ExtentFlags, Extents};

pub const IN_USE: u32 = 1;
pub const AUTO: u32 = 2;
const EXTRA_DATA_COMPATIBLE: u32 = 4;
const TYPE_DIRTY_TRACKING: u8 = 1;
const MIN_GRANULARITY_BITS: u8 = 9;
const MAX_GRANULARITY_BITS: u8 = 31;
/// qemu's limits (QCOW2_MAX_BITMAPS, QCOW2_MAX_BITMAP_DIRECTORY_SIZE, BME_MAX_NAME_SIZE).
const MAX_BITMAPS: u32 = 65535;
const MAX_DIRECTORY_SIZE: u64 = 64 << 20;
const MAX_NAME: usize = 1023;
const MAX_TABLE_SIZE: u64 = 0x0800_0000;
/// qemu's BME_MAX_PHYS_SIZE: the most bitmap data one bitmap may hold in memory.
const MAX_DATA_BYTES: u64 = 0x2000_0000;
const ENTRY_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;

/// The header extension: where the directory is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BitmapsExt {
    pub nb_bitmaps: u32,
    pub dir_size: u64,
    pub dir_offset: u64,
    /// File offset of the extension's data, for updating it in place.
    pub pos: u64,
}

impl BitmapsExt {
    pub fn encode(&self) -> [u8; 24] {
        let mut b = [0u8; 24];
        b[0..4].copy_from_slice(&self.nb_bitmaps.to_be_bytes());
        b[8..16].copy_from_slice(&self.dir_size.to_be_bytes());
        b[16..24].copy_from_slice(&self.dir_offset.to_be_bytes());
        b
    }
}

/// One directory entry, kept whole so it can be written back.
#[derive(Clone, Debug)]
pub struct DirEntry {
    pub table_offset: u64,
    pub table_size: u32,
    pub flags: u32,
    pub typ: u8,
    pub granularity_bits: u8,
    pub name: String,
    pub extra: Vec<u8>,
}

impl DirEntry {
    fn encoded_len(&self) -> usize {
        (24 + self.extra.len() + self.name.len()).div_ceil(8) * 8
    }

    fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&self.table_offset.to_be_bytes());
        out.extend_from_slice(&self.table_size.to_be_bytes());
        out.extend_from_slice(&self.flags.to_be_bytes());
        out.push(self.typ);
        out.push(self.granularity_bits);
        out.extend_from_slice(&(self.name.len() as u16).to_be_bytes());
        out.extend_from_slice(&(self.extra.len() as u32).to_be_bytes());
        out.extend_from_slice(&self.extra);
        out.extend_from_slice(self.name.as_bytes());
        out.resize(start + self.encoded_len(), 0);
    }
}

/// Parse `nb` directory entries from `b`.
pub fn parse_directory(b: &[u8], nb: u32) -> Result<Vec<DirEntry>, String> {
    let mut out = Vec::with_capacity(nb.min(1024) as usize);
    let mut pos = 0usize;
    let be32 = |at: usize| -> Option<u32> {
        Some(u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
    };
    for i in 0..nb {
        let bad = |what: &str| format!("bitmap directory entry {i}: {what}");
        let hdr = b
            .get(pos..pos + 24)
            .ok_or_else(|| bad("beyond the directory"))?;
        let table_offset = u64::from_be_bytes(hdr[0..8].try_into().map_err(|_| bad("short"))?);
        let table_size = be32(pos + 8).ok_or_else(|| bad("short"))?;
        let flags = be32(pos + 12).ok_or_else(|| bad("short"))?;
        let typ = hdr[16];
        let granularity_bits = hdr[17];
        let name_size = u16::from_be_bytes([hdr[18], hdr[19]]) as usize;
        let extra_size = be32(pos + 20).ok_or_else(|| bad("short"))? as usize;
        if name_size == 0 || name_size > MAX_NAME {
            return Err(bad("bad name size"));
        }
        let extra_start = pos + 24;
        let name_start = extra_start
            .checked_add(extra_size)
            .ok_or_else(|| bad("bad extra data size"))?;
        let extra = b
            .get(extra_start..name_start)
            .ok_or_else(|| bad("extra data beyond the directory"))?
            .to_vec();
        let name = b
            .get(name_start..name_start + name_size)
            .ok_or_else(|| bad("name beyond the directory"))?;
        let name = String::from_utf8_lossy(name).into_owned();
        let e = DirEntry {
            table_offset,
            table_size,
            flags,
            typ,
            granularity_bits,
            name,
            extra,
        };
        pos += e.encoded_len();
        out.push(e);
    }
    Ok(out)
}

/// A loaded bitmap: one bit per granule, LSB first, as on disk.
#[derive(Debug)]
pub struct Bitmap {
    pub entry: DirEntry,
    /// None when the bitmap is inconsistent (IN_USE at open, or unreadable).
    bits: Option<Vec<u8>>,
    /// Changed since it was loaded.
    changed: bool,
    /// Why it cannot be exported, when `bits` is None.
    pub problem: Option<String>,
    /// Clusters it occupies on disk now (table and data), to free once replaced.
    old_clusters: Vec<u64>,
}

impl Bitmap {
    pub fn enabled(&self) -> bool {
        self.entry.flags & AUTO != 0 && self.bits.is_some()
    }

    fn granule(&self) -> u64 {
        1u64 << self.entry.granularity_bits
    }
}

/// All bitmaps of an image.
#[derive(Debug, Default)]
pub struct Bitmaps {
    pub ext: BitmapsExt,
    pub list: Vec<Bitmap>,
}

impl Bitmaps {
    /// Read the directory and every bitmap's data. `consistent` is false when the autoclear
    /// bit is clear (a program that does not know bitmaps wrote the image).
    pub fn load(
        f: &HostFile,
        ext: BitmapsExt,
        cluster_bits: u32,
        size: u64,
        file_len: u64,
        consistent: bool,
    ) -> Result<Bitmaps, String> {
        let cs = 1u64 << cluster_bits;
        if ext.nb_bitmaps == 0 || ext.nb_bitmaps > MAX_BITMAPS {
            return Err(format!("invalid number of bitmaps {}", ext.nb_bitmaps));
        }
        if ext.dir_size > MAX_DIRECTORY_SIZE
            || !ext.dir_offset.is_multiple_of(cs)
            || ext
                .dir_offset
                .checked_add(ext.dir_size)
                .is_none_or(|e| e > file_len)
        {
            return Err("invalid bitmap directory location".into());
        }
        let mut raw = vec![0u8; ext.dir_size as usize];
        f.read("read bitmap directory", ext.dir_offset, &mut raw)
            .map_err(|e| e.to_string())?;
        let entries = parse_directory(&raw, ext.nb_bitmaps)?;
        let mut list = Vec::with_capacity(entries.len());
        for entry in entries {
            let mut b = Bitmap {
                entry,
                bits: None,
                changed: false,
                problem: None,
                old_clusters: Vec::new(),
            };
            match load_one(f, &b.entry, cs, size, file_len) {
                Ok((bits, clusters)) => {
                    b.old_clusters = clusters;
                    if !consistent || b.entry.flags & IN_USE != 0 {
                        b.problem = Some("inconsistent".into());
                    } else {
                        b.bits = Some(bits);
                    }
                }
                Err(e) => b.problem = Some(e),
            }
            list.push(b);
        }
        Ok(Bitmaps { ext, list })
    }

    pub fn find(&self, name: &str) -> Option<&Bitmap> {
        self.list.iter().find(|b| b.entry.name == name)
    }

    /// Set the bits of every enabled bitmap for `[offset, offset + len)`.
    pub fn mark(&mut self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        for b in &mut self.list {
            if !b.enabled() {
                continue;
            }
            let g = b.granule();
            let (first, last) = (offset / g, (offset + len - 1) / g);
            let Some(bits) = b.bits.as_mut() else {
                continue;
            };
            for i in first..=last {
                if let Some(byte) = bits.get_mut((i / 8) as usize) {
                    let m = 1u8 << (i % 8);
                    if *byte & m == 0 {
                        *byte |= m;
                        b.changed = true;
                    }
                }
            }
        }
    }

    /// Extents of `name` from `offset` (dirty ones with [`ExtentFlags::DIRTY`]).
    pub fn status(&self, name: &str, offset: u64, len: u64, size: u64, out: &mut Extents) {
        let Some(b) = self.find(name) else { return };
        let Some(bits) = &b.bits else { return };
        let g = b.granule();
        let end = offset.saturating_add(len).min(size);
        let mut pos = offset;
        while pos < end {
            let i = pos / g;
            let dirty = bits
                .get((i / 8) as usize)
                .is_some_and(|v| v >> (i % 8) & 1 != 0);
            let next = ((i + 1) * g).min(end);
            let flags = if dirty {
                ExtentFlags::DIRTY
            } else {
                ExtentFlags::empty()
            };
            out.push(Extent::new(next - pos, flags, 0));
            pos = next;
            if out.len() > 65536 {
                break;
            }
        }
    }

    pub fn any_changed(&self) -> bool {
        self.list.iter().any(|b| b.changed)
    }

    /// The directory as it is now, and the entries' byte positions in it.
    pub fn encode_directory(&self) -> (Vec<u8>, Vec<usize>) {
        let mut out = Vec::new();
        let mut at = Vec::new();
        for b in &self.list {
            at.push(out.len());
            b.entry.encode(&mut out);
        }
        (out, at)
    }

    /// Bitmaps that were loaded consistent (the ones this process owns until close).
    pub fn owned_mut(&mut self) -> impl Iterator<Item = &mut Bitmap> {
        self.list.iter_mut().filter(|b| b.bits.is_some())
    }
}

impl Bitmap {
    /// The table and data to store: (table entries, data clusters as (index, bytes)).
    /// Clusters that would be all zero are left out (table entry 0).
    pub fn serialize(&self, cs: u64) -> Option<Vec<(usize, &[u8])>> {
        let bits = self.bits.as_ref()?;
        let per = cs as usize;
        Some(
            bits.chunks(per)
                .enumerate()
                .filter(|(_, c)| c.iter().any(|&v| v != 0))
                .collect(),
        )
    }

    pub fn bits_len(&self) -> usize {
        self.bits.as_ref().map_or(0, |b| b.len())
    }

    pub fn take_old_clusters(&mut self) -> Vec<u64> {
        std::mem::take(&mut self.old_clusters)
    }

    pub fn stored(&mut self, clusters: Vec<u64>) {
        self.old_clusters = clusters;
        self.changed = false;
    }

    pub fn changed(&self) -> bool {
        self.changed
    }
}

/// Bytes of bitmap data for `size` bytes at this granularity.
fn data_len(size: u64, granularity_bits: u8) -> u64 {
    size.div_ceil(1u64 << granularity_bits).div_ceil(8)
}

/// Read one bitmap: its bits and the clusters it occupies.
fn load_one(
    f: &HostFile,
    e: &DirEntry,
    cs: u64,
    size: u64,
    file_len: u64,
) -> Result<(Vec<u8>, Vec<u64>), String> {
    if e.typ != TYPE_DIRTY_TRACKING {
        return Err(format!("unsupported bitmap type {}", e.typ));
    }
    if !(MIN_GRANULARITY_BITS..=MAX_GRANULARITY_BITS).contains(&e.granularity_bits) {
        return Err(format!("unsupported granularity 2^{}", e.granularity_bits));
    }
    if !e.extra.is_empty() && e.flags & EXTRA_DATA_COMPATIBLE == 0 {
        return Err("unknown extra data".into());
    }
    if e.flags & !(IN_USE | AUTO | EXTRA_DATA_COMPATIBLE) != 0 {
        return Err(format!("unknown flags {:#x}", e.flags));
    }
    let bytes = data_len(size, e.granularity_bits);
    if bytes > MAX_DATA_BYTES {
        return Err(format!(
            "bitmap of {bytes} bytes is larger than {MAX_DATA_BYTES}"
        ));
    }
    let want = bytes.div_ceil(cs);
    if u64::from(e.table_size) != want || want > MAX_TABLE_SIZE {
        return Err(format!(
            "bitmap table size {} does not fit the image (expected {want})",
            e.table_size
        ));
    }
    let tbytes = u64::from(e.table_size) * 8;
    if !e.table_offset.is_multiple_of(cs)
        || e.table_offset
            .checked_add(tbytes)
            .is_none_or(|x| x > file_len)
    {
        return Err("bitmap table beyond the end of the file".into());
    }
    let mut raw = vec![0u8; tbytes as usize];
    f.read("read bitmap table", e.table_offset, &mut raw)
        .map_err(|e| e.to_string())?;
    let mut clusters: Vec<u64> = (0..tbytes.div_ceil(cs))
        .map(|k| e.table_offset + k * cs)
        .collect();
    let mut bits = vec![0u8; bytes as usize];
    for (k, chunk) in raw.chunks_exact(8).enumerate() {
        let v = u64::from_be_bytes(chunk.try_into().unwrap_or_default());
        let off = v & ENTRY_OFFSET_MASK;
        let start = k * cs as usize;
        let end = (start + cs as usize).min(bits.len());
        if off == 0 {
            if v & 1 != 0 {
                bits[start..end].fill(0xff);
            }
            continue;
        }
        if v & 1 != 0 || !off.is_multiple_of(cs) || off.checked_add(cs).is_none_or(|x| x > file_len)
        {
            return Err(format!("invalid bitmap table entry {k}"));
        }
        f.read("read bitmap data", off, &mut bits[start..end])
            .map_err(|e| e.to_string())?;
        clusters.push(off);
    }
    Ok((bits, clusters))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directory_round_trips() {
        let e = DirEntry {
            table_offset: 0x30000,
            table_size: 1,
            flags: AUTO,
            typ: 1,
            granularity_bits: 16,
            name: "b0".into(),
            extra: vec![],
        };
        let mut v = Vec::new();
        e.encode(&mut v);
        e.encode(&mut v);
        assert_eq!(v.len(), 64);
        let back = parse_directory(&v, 2).unwrap();
        assert_eq!(back[1].name, "b0");
        assert_eq!(back[0].table_offset, 0x30000);
        assert!(parse_directory(&v, 3).is_err());
        assert!(parse_directory(&v[..20], 1).is_err());
    }
}
