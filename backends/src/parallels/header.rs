//! The Parallels header (64 bytes, little-endian) and qemu's `parallels_open` checks, in
//! its order and words.

use crate::{Error, Result};

pub const MAGIC: &[u8; 16] = b"WithoutFreeSpace";
/// The "extended" magic: BAT entries count clusters instead of sectors.
pub const MAGIC_EXT: &[u8; 16] = b"WithouFreSpacExt";
pub const VERSION: u32 = 2;
/// `inuse` while a writer has the image open (qemu writes 0 on a clean close).
pub const INUSE_MAGIC: u32 = 0x746f_6e59;
pub const HEADER_SIZE: u64 = 64;
pub const OFF_INUSE: u64 = 44;
pub const OFF_DATA_OFF: u64 = 48;
const SECTOR: u64 = 512;

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from(u32_at(b, at)) | (u64::from(u32_at(b, at + 4)) << 32)
}

pub fn probe(head: &[u8]) -> bool {
    head.len() >= HEADER_SIZE as usize
        && (&head[..16] == MAGIC || &head[..16] == MAGIC_EXT)
        && u32_at(head, 16) == VERSION
}

#[derive(Clone, Debug)]
pub struct Header {
    pub ext: bool,
    /// Sectors per cluster.
    pub tracks: u32,
    pub bat_entries: u32,
    pub nb_sectors: u64,
    pub inuse: u32,
    pub data_off: u32,
    pub ext_off: u64,
}

impl Header {
    pub fn cluster(&self) -> u64 {
        u64::from(self.tracks) * SECTOR
    }

    /// Bytes per unit of a BAT entry: a sector, or a cluster with the extended magic.
    pub fn entry_unit(&self) -> u64 {
        if self.ext {
            self.cluster()
        } else {
            SECTOR
        }
    }

    /// The first sector data may use: right after the BAT (a whole cluster for the extended
    /// magic), qemu's `parallels_test_data_off` minimum.
    fn min_data_sectors(&self) -> u64 {
        let s = (HEADER_SIZE + 4 * u64::from(self.bat_entries)).div_ceil(SECTOR);
        if self.ext {
            s.next_multiple_of(u64::from(self.tracks))
        } else {
            s
        }
    }

    /// Where the data area starts (bytes), and whether `data_off` had to be replaced (qemu
    /// then checks and repairs a writable image).
    pub fn data_start(&self, file_len: u64) -> (u64, bool) {
        let min = self.min_data_sectors();
        let off = u64::from(self.data_off);
        if !self.ext && off == 0 {
            return (min * SECTOR, false);
        }
        if off < min || off > file_len / SECTOR {
            return (min * SECTOR, true);
        }
        (off * SECTOR, false)
    }

    pub fn min_data_off(&self) -> u64 {
        self.min_data_sectors()
    }
}

/// Parse and check the header, as qemu's `parallels_open` does.
pub fn parse(b: &[u8]) -> Result<Header> {
    let open = |m: &str| Err(Error::Open(m.to_string()));
    if b.len() < HEADER_SIZE as usize || !probe(b) {
        return open("Image not in Parallels format");
    }
    let h = Header {
        ext: &b[..16] == MAGIC_EXT,
        tracks: u32_at(b, 28),
        bat_entries: u32_at(b, 32),
        nb_sectors: u64_at(b, 36),
        inuse: u32_at(b, 44),
        data_off: u32_at(b, 48),
        ext_off: u64_at(b, 56),
    };
    if h.tracks == 0 {
        return open("Invalid image: Zero sectors per track");
    }
    if h.tracks > i32::MAX as u32 / 513 {
        return open("Invalid image: Too big cluster");
    }
    if h.bat_entries > i32::MAX as u32 / 4 {
        return open("Catalog too large");
    }
    if h.ext_off >= (i64::MAX >> 9) as u64 {
        return open("Invalid image: Too big offset");
    }
    // The old magic keeps a 32-bit sector count (qemu masks the rest).
    let nb_sectors = if h.ext {
        h.nb_sectors
    } else {
        h.nb_sectors & 0xffff_ffff
    };
    if nb_sectors > (i64::MAX >> 9) as u64 {
        return open("Invalid image: Too big size");
    }
    Ok(Header { nb_sectors, ..h })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> Vec<u8> {
        let mut b = vec![0u8; 64];
        b[..16].copy_from_slice(MAGIC_EXT);
        b[16..20].copy_from_slice(&2u32.to_le_bytes());
        b[28..32].copy_from_slice(&2048u32.to_le_bytes());
        b[32..36].copy_from_slice(&4u32.to_le_bytes());
        b[36..44].copy_from_slice(&8192u64.to_le_bytes());
        b[48..52].copy_from_slice(&2048u32.to_le_bytes());
        b
    }

    #[test]
    fn checks_as_qemu() {
        let h = parse(&header()).unwrap();
        assert_eq!(h.cluster(), 1 << 20);
        assert_eq!(h.data_start(3 << 20), (1 << 20, false));
        let err = |f: &dyn Fn(&mut Vec<u8>)| {
            let mut b = header();
            f(&mut b);
            parse(&b).unwrap_err().to_string()
        };
        assert_eq!(err(&|b| b[16] = 3), "Image not in Parallels format");
        assert_eq!(err(&|b| b[0] = b'x'), "Image not in Parallels format");
        assert_eq!(
            err(&|b| b[28..32].fill(0)),
            "Invalid image: Zero sectors per track"
        );
        assert_eq!(
            err(&|b| b[28..32].copy_from_slice(&4_186_128u32.to_le_bytes())),
            "Invalid image: Too big cluster"
        );
        assert_eq!(
            err(&|b| b[32..36].copy_from_slice(&0x2000_0000u32.to_le_bytes())),
            "Catalog too large"
        );
        assert_eq!(
            err(&|b| b[56..64].copy_from_slice(&u64::MAX.to_le_bytes())),
            "Invalid image: Too big offset"
        );
        assert!(parse(&header()[..63]).is_err());
    }

    #[test]
    fn old_magic_counts_sectors_and_32_bit_sizes() {
        let mut b = header();
        b[..16].copy_from_slice(MAGIC);
        b[36..44].copy_from_slice(&0x1_0000_2000u64.to_le_bytes());
        b[48..52].fill(0);
        let h = parse(&b).unwrap();
        assert_eq!(h.nb_sectors, 0x2000);
        assert_eq!(h.entry_unit(), 512);
        // data_off 0 is valid for the old magic: data right after the BAT.
        assert_eq!(h.data_start(1 << 20), (512, false));
    }
}
