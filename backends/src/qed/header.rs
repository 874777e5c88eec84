//! The QED header: its 64 little-endian bytes, and qemu's checks of them at open, in qemu's
//! order and words (`bdrv_qed_do_open`).

use crate::{Error, Result};

pub const MAGIC: u32 = u32::from_le_bytes(*b"QED\0");
pub const LEN: usize = 64;

/// The image has a backing file.
pub const F_BACKING_FILE: u64 = 0x01;
/// The image was not closed cleanly: check it before writing.
pub const F_NEED_CHECK: u64 = 0x02;
/// The backing file is raw: do not probe it.
pub const F_BACKING_FORMAT_NO_PROBE: u64 = 0x04;
const FEATURE_MASK: u64 = F_BACKING_FILE | F_NEED_CHECK | F_BACKING_FORMAT_NO_PROBE;

const MIN_CLUSTER: u32 = 4 * 1024;
const MAX_CLUSTER: u32 = 64 * 1024 * 1024;
const MIN_TABLE: u32 = 1;
const MAX_TABLE: u32 = 16;
/// Where `features` lives in the header (the only field qnbd rewrites after open).
const FEATURES_AT: usize = 16;
const AUTOCLEAR_AT: usize = 32;

#[derive(Clone, Debug)]
pub struct Header {
    /// The header as read: rewritten with only `features` and `autoclear` changed.
    pub raw: [u8; LEN],
    pub cluster_size: u32,
    /// L1 and L2 tables' size, in clusters.
    pub table_size: u32,
    /// The header's size, in clusters: nothing of the image lies before it ends.
    pub header_size: u32,
    pub features: u64,
    pub autoclear: u64,
    pub l1_offset: u64,
    pub image_size: u64,
    pub backing_name_offset: u32,
    pub backing_name_size: u32,
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from(u32_at(b, at)) | (u64::from(u32_at(b, at + 4)) << 32)
}

pub fn probe(head: &[u8]) -> bool {
    head.len() >= LEN && u32_at(head, 0) == MAGIC
}

fn valid_power_of_two(v: u32, min: u32, max: u32) -> bool {
    (min..=max).contains(&v) && v.is_power_of_two()
}

/// qemu's `qed_max_image_size`, with its 64-bit wrap-around kept: qemu refuses what it
/// refuses.
fn max_image_size(cluster_size: u32, table_size: u32) -> u64 {
    let entries = u64::from(table_size.wrapping_mul(cluster_size)) / 8;
    entries
        .wrapping_mul(u64::from(cluster_size))
        .wrapping_mul(entries)
}

fn invalid(msg: &str) -> Error {
    Error::Open(msg.to_string())
}

impl Header {
    /// Parse and check a header; `file_size` is the image file's length.
    pub fn parse(raw: [u8; LEN], file_size: u64) -> Result<Header> {
        let h = Header {
            cluster_size: u32_at(&raw, 4),
            table_size: u32_at(&raw, 8),
            header_size: u32_at(&raw, 12),
            features: u64_at(&raw, FEATURES_AT),
            autoclear: u64_at(&raw, AUTOCLEAR_AT),
            l1_offset: u64_at(&raw, 40),
            image_size: u64_at(&raw, 48),
            backing_name_offset: u32_at(&raw, 56),
            backing_name_size: u32_at(&raw, 60),
            raw,
        };
        if u32_at(&raw, 0) != MAGIC {
            return Err(invalid("Image not in QED format"));
        }
        if h.features & !FEATURE_MASK != 0 {
            return Err(Error::Open(format!(
                "Unsupported QED features: {:x}",
                h.features & !FEATURE_MASK
            )));
        }
        if !valid_power_of_two(h.cluster_size, MIN_CLUSTER, MAX_CLUSTER) {
            return Err(invalid("QED cluster size is invalid"));
        }
        if !valid_power_of_two(h.table_size, MIN_TABLE, MAX_TABLE) {
            return Err(invalid("QED table size is invalid"));
        }
        if !h.image_size.is_multiple_of(512)
            || h.image_size > max_image_size(h.cluster_size, h.table_size)
            || h.image_size > i64::MAX as u64
        {
            return Err(invalid("QED image size is invalid"));
        }
        let file_end = file_size & !(u64::from(h.cluster_size) - 1);
        if !h.table_offset_valid(h.l1_offset, file_end) {
            return Err(invalid("QED table offset is invalid"));
        }
        if h.header_size > u32::MAX / h.cluster_size {
            return Err(invalid("QED header size is too large"));
        }
        if h.features & F_BACKING_FILE != 0
            && u64::from(h.backing_name_offset) + u64::from(h.backing_name_size)
                > u64::from(h.cluster_size) * u64::from(h.header_size)
        {
            return Err(invalid("QED backing filename offset is invalid"));
        }
        Ok(h)
    }

    pub fn cluster(&self) -> u64 {
        u64::from(self.cluster_size)
    }

    /// Bytes of one L1 or L2 table.
    pub fn table_bytes(&self) -> u64 {
        self.cluster() * u64::from(self.table_size)
    }

    /// Entries in one table.
    pub fn table_entries(&self) -> u64 {
        self.table_bytes() / 8
    }

    /// qemu's `qed_check_cluster_offset`: cluster-aligned, past the header, before `file_end`.
    pub fn cluster_offset_valid(&self, offset: u64, file_end: u64) -> bool {
        offset.is_multiple_of(self.cluster())
            && offset >= u64::from(self.header_size) * self.cluster()
            && offset < file_end
    }

    /// qemu's `qed_check_table_offset`: the table's first and last clusters valid.
    pub fn table_offset_valid(&self, offset: u64, file_end: u64) -> bool {
        let last = offset.wrapping_add((u64::from(self.table_size) - 1) * self.cluster());
        // qemu's overflow check (`end <= offset`) also refuses every one-cluster table: an
        // image made with table_size=1 does not open in qemu either.
        last > offset
            && self.cluster_offset_valid(offset, file_end)
            && self.cluster_offset_valid(last, file_end)
    }

    /// The header bytes with `features` and `autoclear` as they are now.
    pub fn bytes(&self) -> [u8; LEN] {
        let mut b = self.raw;
        b[FEATURES_AT..FEATURES_AT + 8].copy_from_slice(&self.features.to_le_bytes());
        b[AUTOCLEAR_AT..AUTOCLEAR_AT + 8].copy_from_slice(&self.autoclear.to_le_bytes());
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// qemu-img's default 8 MiB image: 64 KiB clusters, 4-cluster tables, L1 at 64 KiB.
    fn header() -> [u8; LEN] {
        let mut h = [0u8; LEN];
        h[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        h[4..8].copy_from_slice(&65536u32.to_le_bytes());
        h[8..12].copy_from_slice(&4u32.to_le_bytes());
        h[12..16].copy_from_slice(&1u32.to_le_bytes());
        h[40..48].copy_from_slice(&65536u64.to_le_bytes());
        h[48..56].copy_from_slice(&(8u64 << 20).to_le_bytes());
        h
    }

    const FILE: u64 = 5 * 65536;

    #[test]
    fn checks_headers_as_qemu() {
        assert!(probe(&header()));
        let h = Header::parse(header(), FILE).unwrap();
        assert_eq!((h.table_entries(), h.table_bytes()), (32768, 262144));
        let err = |f: &dyn Fn(&mut [u8; LEN])| {
            let mut h = header();
            f(&mut h);
            Header::parse(h, FILE).unwrap_err().to_string()
        };
        assert_eq!(err(&|h| h[3] = 1), "Image not in QED format");
        assert_eq!(err(&|h| h[16] = 0x18), "Unsupported QED features: 18");
        assert_eq!(err(&|h| h[5] = 0x11), "QED cluster size is invalid");
        assert_eq!(err(&|h| h[8] = 1), "QED table offset is invalid");
        assert_eq!(err(&|h| h[8] = 32), "QED table size is invalid");
        assert_eq!(err(&|h| h[48] = 1), "QED image size is invalid");
        // The L1 table's last cluster past the end of the file.
        assert_eq!(err(&|h| h[42] = 2), "QED table offset is invalid");
        assert_eq!(
            err(&|h| {
                h[16] = 1;
                h[56..64].copy_from_slice(&[0xf0, 0xff, 0, 0, 0x20, 0, 0, 0]);
            }),
            "QED backing filename offset is invalid"
        );
    }

    #[test]
    fn max_image_size_wraps_as_qemus() {
        assert_eq!(max_image_size(65536, 4), 64 << 40);
        // 64 MiB clusters and 16-cluster tables: 2^80 wraps to 0 in qemu, which then
        // refuses every size.
        assert_eq!(max_image_size(64 << 20, 16), 0);
    }
}
