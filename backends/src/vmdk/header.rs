//! The hosted sparse extent header (`KDMV`, VMDK 4), and the footer a stream-optimized
//! image keeps its real header in.

use crate::file::HostFile;
use crate::{Error, Result};

pub const FLAG_RGD: u32 = 1 << 1;
pub const FLAG_ZERO_GRAIN: u32 = 1 << 2;
pub const FLAG_MARKER: u32 = 1 << 17;
/// `gd_offset` of a stream-optimized image: the grain directory's place is in the footer.
pub const GD_AT_END: u64 = u64::MAX;
pub const COMPRESSION_DEFLATE: u16 = 1;

const MARKER_END_OF_STREAM: u32 = 0;
const MARKER_FOOTER: u32 = 3;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    pub version: u32,
    pub flags: u32,
    /// Sectors.
    pub capacity: u64,
    /// Sectors per grain.
    pub granularity: u64,
    pub desc_offset: u64,
    pub desc_size: u64,
    pub num_gtes_per_gt: u32,
    pub rgd_offset: u64,
    pub gd_offset: u64,
    /// Sectors before the first grain (metadata).
    pub grain_offset: u64,
    pub compress_algorithm: u16,
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from(u32_at(b, at)) | (u64::from(u32_at(b, at + 4)) << 32)
}

impl Header {
    /// From a sector that starts with the magic (qemu's packed `VMDK4Header` after it).
    pub fn parse(s: &[u8; 512]) -> Header {
        Header {
            version: u32_at(s, 4),
            flags: u32_at(s, 8),
            capacity: u64_at(s, 12),
            granularity: u64_at(s, 20),
            desc_offset: u64_at(s, 28),
            desc_size: u64_at(s, 36),
            num_gtes_per_gt: u32_at(s, 44),
            rgd_offset: u64_at(s, 48),
            gd_offset: u64_at(s, 56),
            grain_offset: u64_at(s, 64),
            compress_algorithm: u16::from_le_bytes([s[77], s[78]]),
        }
    }

    pub fn compressed(&self) -> bool {
        self.compress_algorithm == COMPRESSION_DEFLATE
    }

    /// A stream-optimized image's header, from its footer: the three sectors before the
    /// file's end are a footer marker, a copy of the header, an end-of-stream marker.
    pub fn from_footer(f: &HostFile, file_len: u64) -> Result<Header> {
        let invalid = || Error::Open("Invalid footer".into());
        let at = file_len.checked_sub(1536).ok_or_else(invalid)?;
        let mut b = vec![0u8; 1536];
        f.read("read footer", at, &mut b)?;
        let (marker, rest) = b.split_at(512);
        let (head, eos) = rest.split_at(512);
        let ok = head[..4] == *b"KDMV"
            && u32_at(marker, 8) == 0
            && u32_at(marker, 12) == MARKER_FOOTER
            && u64_at(eos, 0) == 0
            && u32_at(eos, 8) == 0
            && u32_at(eos, 12) == MARKER_END_OF_STREAM;
        if !ok {
            return Err(invalid());
        }
        let mut s = [0u8; 512];
        s.copy_from_slice(head);
        Ok(Header::parse(&s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_qemus_layout() {
        let mut s = [0u8; 512];
        s[..4].copy_from_slice(b"KDMV");
        s[4..8].copy_from_slice(&1u32.to_le_bytes());
        s[8..12].copy_from_slice(&(FLAG_RGD | 1).to_le_bytes());
        s[12..20].copy_from_slice(&2048u64.to_le_bytes());
        s[20..28].copy_from_slice(&128u64.to_le_bytes());
        s[44..48].copy_from_slice(&512u32.to_le_bytes());
        s[56..64].copy_from_slice(&GD_AT_END.to_le_bytes());
        s[64..72].copy_from_slice(&128u64.to_le_bytes());
        s[77..79].copy_from_slice(&1u16.to_le_bytes());
        let h = Header::parse(&s);
        assert_eq!(h.capacity, 2048);
        assert_eq!(h.granularity, 128);
        assert_eq!(h.num_gtes_per_gt, 512);
        assert_eq!(h.gd_offset, GD_AT_END);
        assert_eq!(h.grain_offset, 128);
        assert!(h.compressed());
    }
}
