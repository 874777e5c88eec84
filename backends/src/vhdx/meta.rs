//! The VHDX header section (file identifier, two headers, the region table) and the
//! metadata region, checked as qemu's `vhdx.c` checks them.

use crate::file::HostFile;
use crate::{Error, Result};

pub const HEADER1_AT: u64 = 64 * 1024;
pub const HEADER2_AT: u64 = 128 * 1024;
const REGION_TABLE_AT: u64 = 192 * 1024;
/// The header's checksum covers its first 4 KiB.
pub const HEADER_SIZE: usize = 4096;

/// MS GUIDs as they are laid out on disk.
const BAT_GUID: [u8; 16] = guid(
    0x2DC27766,
    0xF623,
    0x4200,
    [0x9D, 0x64, 0x11, 0x5E, 0x9B, 0xFD, 0x4A, 0x08],
);
const METADATA_GUID: [u8; 16] = guid(
    0x8B7CA206,
    0x4790,
    0x4B9A,
    [0xB8, 0xFE, 0x57, 0x5F, 0x05, 0x0F, 0x88, 0x6E],
);
const FILE_PARAMS: [u8; 16] = guid(
    0xCAA16737,
    0xFA36,
    0x4D43,
    [0xB3, 0xB6, 0x33, 0xF0, 0xAA, 0x44, 0xE7, 0x6B],
);
const VIRTUAL_SIZE: [u8; 16] = guid(
    0x2FA54224,
    0xCD1B,
    0x4876,
    [0xB2, 0x11, 0x5D, 0xBE, 0xD8, 0x3B, 0xF4, 0xB8],
);
const PAGE83: [u8; 16] = guid(
    0xBECA12AB,
    0xB2E6,
    0x4523,
    [0x93, 0xEF, 0xC3, 0x09, 0xE0, 0x00, 0xC7, 0x46],
);
const LOGICAL_SECTOR: [u8; 16] = guid(
    0x8141BF1D,
    0xA96F,
    0x4709,
    [0xBA, 0x47, 0xF2, 0x33, 0xA8, 0xFA, 0xAB, 0x5F],
);
const PHYSICAL_SECTOR: [u8; 16] = guid(
    0xCDA348C7,
    0x445D,
    0x4471,
    [0x9C, 0xC9, 0xE9, 0x88, 0x52, 0x51, 0xC5, 0x56],
);
const PARENT_LOCATOR: [u8; 16] = guid(
    0xA8D35F2D,
    0xB30B,
    0x454D,
    [0xAB, 0xF7, 0xD3, 0xD8, 0x48, 0x34, 0xAB, 0x0C],
);

const fn guid(d1: u32, d2: u16, d3: u16, d4: [u8; 8]) -> [u8; 16] {
    let a = d1.to_le_bytes();
    let b = d2.to_le_bytes();
    let c = d3.to_le_bytes();
    [
        a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], d4[0], d4[1], d4[2], d4[3], d4[4], d4[5],
        d4[6], d4[7],
    ]
}

pub fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

pub fn le64(b: &[u8], at: usize) -> u64 {
    u64::from(le32(b, at)) | (u64::from(le32(b, at + 4)) << 32)
}

/// CRC-32C of `buf` with its checksum field (at `at`) taken as zero.
pub fn checksum(buf: &[u8], at: usize) -> u32 {
    let c = crc32c::crc32c(&buf[..at]);
    let c = crc32c::crc32c_append(c, &[0; 4]);
    crc32c::crc32c_append(c, &buf[at + 4..])
}

fn valid(buf: &[u8], at: usize) -> bool {
    checksum(buf, at) == le32(buf, at)
}

/// Errors qemu reports only as an errno: "Could not open 'FILE': ...".
pub fn errno_open(f: &HostFile, code: i32) -> Error {
    Error::Open(format!(
        "Could not open '{}': {}",
        f.path().display(),
        crate::errno_text(&std::io::Error::from_raw_os_error(code))
    ))
}

/// One of the two headers (the first 4 KiB of its 64 KiB block).
#[derive(Clone, Debug)]
pub struct Header {
    pub raw: Vec<u8>,
    pub sequence: u64,
    pub log_guid: [u8; 16],
    pub log_length: u32,
    pub log_offset: u64,
}

impl Header {
    fn parse(raw: Vec<u8>) -> Option<Header> {
        if !valid(&raw, 4) || &raw[..4] != b"head" || u16::from_le_bytes([raw[66], raw[67]]) != 1 {
            return None;
        }
        let mut log_guid = [0u8; 16];
        log_guid.copy_from_slice(&raw[48..64]);
        Some(Header {
            sequence: le64(&raw, 8),
            log_guid,
            log_length: le32(&raw, 68),
            log_offset: le64(&raw, 72),
            raw,
        })
    }

    /// This header with `sequence`, new write GUIDs (`file`, and `data` if given) and
    /// `log_guid`, checksummed.
    pub fn renewed(
        &self,
        sequence: u64,
        file: [u8; 16],
        data: Option<[u8; 16]>,
        log_guid: [u8; 16],
    ) -> Header {
        let mut raw = self.raw.clone();
        raw[8..16].copy_from_slice(&sequence.to_le_bytes());
        raw[16..32].copy_from_slice(&file);
        if let Some(d) = data {
            raw[32..48].copy_from_slice(&d);
        }
        raw[48..64].copy_from_slice(&log_guid);
        let c = checksum(&raw, 4);
        raw[4..8].copy_from_slice(&c.to_le_bytes());
        Header {
            sequence,
            log_guid,
            log_length: self.log_length,
            log_offset: self.log_offset,
            raw,
        }
    }
}

/// The current header (the valid one with the higher sequence number) and its index.
pub fn headers(f: &HostFile) -> Result<(usize, [Option<Header>; 2])> {
    let read = |at: u64| -> Result<Option<Header>> {
        let mut raw = vec![0u8; HEADER_SIZE];
        f.read("read header", at, &mut raw)?;
        Ok(Header::parse(raw))
    };
    let hs = [read(HEADER1_AT)?, read(HEADER2_AT)?];
    let current = match (&hs[0], &hs[1]) {
        (Some(_), None) => 0,
        (None, Some(_)) => 1,
        (Some(a), Some(b)) if a.sequence > b.sequence => 0,
        (Some(a), Some(b)) if b.sequence > a.sequence => 1,
        // Disk2VHD writes two identical headers.
        (Some(a), Some(b)) if a.raw[..80] == b.raw[..80] => 0,
        _ => return Err(Error::Open("No valid VHDX header found".into())),
    };
    Ok((current, hs))
}

/// Where the BAT and the metadata region are (the region table).
pub struct Regions {
    pub bat_at: u64,
    pub bat_len: u64,
    pub meta_at: u64,
}

pub fn regions(f: &HostFile) -> Result<Regions> {
    let mut b = vec![0u8; 64 * 1024];
    f.read("read region table", REGION_TABLE_AT, &mut b)?;
    let inval = || errno_open(f, libc::EINVAL);
    if !valid(&b, 4) || &b[..4] != b"regi" {
        return Err(inval());
    }
    let count = le32(&b, 8) as usize;
    if count > 2047 {
        return Err(inval());
    }
    let (mut bat, mut meta) = (None, None);
    for i in 0..count {
        let e = &b[16 + i * 32..16 + (i + 1) * 32];
        let (at, len) = (le64(e, 16), u64::from(le32(e, 24)));
        let slot = if e[..16] == BAT_GUID {
            &mut bat
        } else if e[..16] == METADATA_GUID {
            &mut meta
        } else if le32(e, 28) & 1 != 0 {
            return Err(errno_open(f, libc::ENOTSUP));
        } else {
            continue;
        };
        if slot.replace((at, len)).is_some() {
            return Err(inval());
        }
    }
    match (bat, meta) {
        (Some((bat_at, bat_len)), Some((meta_at, _))) => Ok(Regions {
            bat_at,
            bat_len,
            meta_at,
        }),
        _ => Err(inval()),
    }
}

/// What the metadata region says about the disk.
pub struct Params {
    pub block_size: u64,
    pub disk_size: u64,
    pub logical_sector: u64,
}

pub fn params(f: &HostFile, meta_at: u64) -> Result<Params> {
    let mut b = vec![0u8; 32 * 2048];
    f.read("read metadata", meta_at, &mut b)?;
    let inval = || errno_open(f, libc::EINVAL);
    if &b[..8] != b"metadata" {
        return Err(inval());
    }
    let count = usize::from(u16::from_le_bytes([b[10], b[11]]));
    if count * 32 > b.len() - 32 {
        return Err(inval());
    }
    let known = [
        FILE_PARAMS,
        VIRTUAL_SIZE,
        PAGE83,
        LOGICAL_SECTOR,
        PHYSICAL_SECTOR,
        PARENT_LOCATOR,
    ];
    let mut found: [Option<u64>; 6] = [None; 6];
    for i in 0..count {
        let e = &b[32 + i * 32..64 + i * 32];
        match known.iter().position(|g| e[..16] == *g) {
            Some(k) if found[k].is_some() => return Err(inval()),
            Some(k) => found[k] = Some(meta_at.saturating_add(u64::from(le32(e, 16)))),
            None if le32(e, 24) & 4 != 0 => return Err(errno_open(f, libc::ENOTSUP)),
            None => {}
        }
    }
    let [Some(fp), Some(vs), Some(_), Some(ls), Some(_), parent] = found else {
        return Err(errno_open(f, libc::ENOTSUP));
    };
    let item = |at: u64, n: usize| -> Result<Vec<u8>> {
        let mut v = vec![0u8; n];
        f.read("read metadata", at, &mut v)?;
        Ok(v)
    };
    let p = item(fp, 8)?;
    if le32(&p, 4) & 2 != 0 {
        // A differencing image: qemu has no parent support either.
        return Err(errno_open(
            f,
            if parent.is_some() {
                libc::ENOTSUP
            } else {
                libc::EINVAL
            },
        ));
    }
    let block_size = u64::from(le32(&p, 0));
    let disk_size = le64(&item(vs, 8)?, 0);
    let logical_sector = u64::from(le32(&item(ls, 4)?, 0));
    // The spec's bounds (qemu's): blocks of 1 MiB to 256 MiB, a power of two; sectors of
    // 512 or 4096 bytes; at most 64 TiB.
    let ok = block_size.is_power_of_two()
        && (1 << 20..=256 << 20).contains(&block_size)
        && (logical_sector == 512 || logical_sector == 4096)
        && disk_size <= 64 << 40
        && disk_size.is_multiple_of(logical_sector);
    if !ok {
        return Err(inval());
    }
    Ok(Params {
        block_size,
        disk_size,
        logical_sector,
    })
}
