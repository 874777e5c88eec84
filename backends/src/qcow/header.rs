//! The qcow (version 1) header: 48 big-endian bytes, checked as qemu's `qcow_open` checks
//! them, in its order and words.

use crate::{Error, Result};

pub const LEN: usize = 48;
const MAGIC: &[u8; 4] = b"QFI\xfb";
const VERSION: u32 = 1;
pub const CRYPT_NONE: u32 = 0;
pub const CRYPT_AES: u32 = 1;
/// qemu's limit on a backing file name (it reads at most 1023 bytes).
const MAX_BACKING_NAME: u32 = 1023;

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn be64(b: &[u8], at: usize) -> u64 {
    (u64::from(be32(b, at)) << 32) | u64::from(be32(b, at + 4))
}

/// A qcow version 1 image: the magic and version 1 (qcow2 shares the magic, with 2 or 3).
pub fn probe(head: &[u8]) -> bool {
    head.len() >= LEN && &head[..4] == MAGIC && be32(head, 4) == VERSION
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub backing_offset: u64,
    pub backing_size: u32,
    /// The guest size in bytes, as the header has it (qemu exports whole sectors of it).
    pub size: u64,
    pub cluster_bits: u32,
    pub l2_bits: u32,
    pub crypt_method: u32,
    pub l1_offset: u64,
    pub l1_entries: u64,
}

impl Header {
    /// qemu's checks, first failure first.
    pub fn parse(h: &[u8; LEN]) -> Result<Header> {
        let refuse = |m: String| Err(Error::Open(m));
        if &h[..4] != MAGIC {
            return refuse("Image not in qcow format".into());
        }
        let version = be32(h, 4);
        if version != VERSION {
            let mut m = format!("qcow (v1) does not support qcow version {version}");
            if version == 2 || version == 3 {
                m.push_str("\nTry the 'qcow2' driver instead.");
            }
            return refuse(m);
        }
        let size = be64(h, 24);
        let (cluster_bits, l2_bits) = (u32::from(h[32]), u32::from(h[33]));
        let crypt_method = be32(h, 36);
        if size <= 1 {
            return refuse("Image size is too small (must be at least 2 bytes)".into());
        }
        if !(9..=16).contains(&cluster_bits) {
            return refuse("Cluster size must be between 512 and 64k".into());
        }
        // Entries of 8 bytes: a table of 512 bytes to 64 KiB.
        if !(6..=13).contains(&l2_bits) {
            return refuse("L2 table size must be between 512 and 64k".into());
        }
        if crypt_method > CRYPT_AES {
            return refuse("invalid encryption method in qcow header".into());
        }
        Ok(Header {
            backing_offset: be64(h, 8),
            backing_size: be32(h, 16),
            size,
            cluster_bits,
            l2_bits,
            crypt_method,
            l1_offset: be64(h, 40),
            // Filled by `check_size` (after the encryption key, as in qemu).
            l1_entries: 0,
        })
    }

    /// qemu's size checks, which come after the encryption key is taken: the L1 table's
    /// entries, at most `INT_MAX / 8`.
    pub fn check_size(&mut self) -> Result<()> {
        let shift = self.cluster_bits + self.l2_bits;
        let too_large = || Err(Error::Open("Image too large".into()));
        if self.size > u64::MAX - (1u64 << shift) {
            return too_large();
        }
        let entries = (self.size + (1u64 << shift) - 1) >> shift;
        if entries > (i32::MAX as u64) / 8 {
            return too_large();
        }
        self.l1_entries = entries;
        Ok(())
    }

    /// The backing file name's place, if the header names one (qemu's length limit checked).
    pub fn backing_name(&self) -> Result<Option<(u64, u32)>> {
        if self.backing_offset == 0 {
            return Ok(None);
        }
        if self.backing_size > MAX_BACKING_NAME {
            return Err(Error::Open("Backing file name too long".into()));
        }
        Ok(Some((self.backing_offset, self.backing_size)))
    }

    pub fn cluster(&self) -> u64 {
        1 << self.cluster_bits
    }

    pub fn l2_entries(&self) -> u64 {
        1 << self.l2_bits
    }

    pub fn l2_bytes(&self) -> u64 {
        8 << self.l2_bits
    }

    /// An L2 entry's compressed flag, and the mask of a compressed entry's offset.
    pub const COMPRESSED: u64 = 1 << 63;

    pub fn compressed_offset_mask(&self) -> u64 {
        (1u64 << (63 - self.cluster_bits)) - 1
    }

    /// Where a compressed cluster's stream lies: (offset, length).
    pub fn compressed_at(&self, entry: u64) -> (u64, u64) {
        let offset = entry & self.compressed_offset_mask();
        let len = (entry >> (63 - self.cluster_bits)) & (self.cluster() - 1);
        (offset, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub fn header() -> [u8; LEN] {
        let mut h = [0u8; LEN];
        h[..4].copy_from_slice(MAGIC);
        h[4..8].copy_from_slice(&1u32.to_be_bytes());
        h[24..32].copy_from_slice(&(8u64 << 20).to_be_bytes());
        h[32] = 12;
        h[33] = 9;
        h[40..48].copy_from_slice(&48u64.to_be_bytes());
        h
    }

    fn err(f: &dyn Fn(&mut [u8; LEN])) -> String {
        let mut h = header();
        f(&mut h);
        match Header::parse(&h).and_then(|mut h| h.check_size()) {
            Err(e) => e.to_string(),
            Ok(()) => "ok".into(),
        }
    }

    #[test]
    fn checks_headers_as_qemu() {
        assert!(probe(&header()));
        let mut h = Header::parse(&header()).unwrap();
        h.check_size().unwrap();
        assert_eq!(h.l1_entries, 4);
        assert_eq!(
            err(&|h| h[7] = 2),
            "qcow (v1) does not support qcow version 2\nTry the 'qcow2' driver instead."
        );
        assert_eq!(
            err(&|h| h[7] = 9),
            "qcow (v1) does not support qcow version 9"
        );
        assert_eq!(
            err(&|h| h[32] = 17),
            "Cluster size must be between 512 and 64k"
        );
        assert_eq!(
            err(&|h| h[33] = 14),
            "L2 table size must be between 512 and 64k"
        );
        assert_eq!(
            err(&|h| h[39] = 2),
            "invalid encryption method in qcow header"
        );
        assert_eq!(
            err(&|h| h[24..32].copy_from_slice(&1u64.to_be_bytes())),
            "Image size is too small (must be at least 2 bytes)"
        );
        assert_eq!(err(&|h| h[24..32].fill(0xff)), "Image too large");
        assert_eq!(err(&|h| h[0] = b'X'), "Image not in qcow format");
    }

    #[test]
    fn compressed_entries() {
        let mut h = Header::parse(&header()).unwrap();
        h.cluster_bits = 12;
        let e = Header::COMPRESSED | (100u64 << 51) | 0x1234;
        assert_eq!(h.compressed_at(e), (0x1234, 100));
    }
}
