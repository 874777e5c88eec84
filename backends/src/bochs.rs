//! Bochs "growing" redolog images, read-only, as qemu's `bochs` driver reads them: a 512-byte
//! header, a catalog of 32-bit extent indices, and per allocated extent a sector bitmap then
//! the extent's sectors. A sector whose catalog entry is 0xffffffff, or whose bitmap bit is
//! clear, reads as zeroes.
//!
//! qemu's arithmetic is kept where it decides what a damaged image reads as: the data offset
//! is a 32-bit sum, the bitmap and extent sizes are rounded up to sectors with 32-bit
//! wrapping (a bitmap size of 0 is 2^23 sectors), and bytes past the end of the file read as
//! zeroes (the block layer's rule). An extent whose place overflows 64 bits fails its read
//! with EIO instead of wrapping.

use crate::file::HostFile;
use crate::format::{Driver, ImageOptions, OpenBacking};
use crate::{BlockBackend, Caps, Error, Result};
use std::sync::Arc;

pub static DRIVER: Driver = Driver {
    name: "bochs",
    probe,
    open,
    option: |_, _, _| None,
    has_metadata: true,
};

const HEADER_SIZE: usize = 512;
const SECTOR: u64 = 512;
const MAGIC: &[u8] = b"Bochs Virtual HD Image";
const REDOLOG: &[u8] = b"Redolog";
const GROWING: &[u8] = b"Growing";
const VERSION: u32 = 0x0002_0000;
const VERSION_1: u32 = 0x0001_0000;
/// qemu's bound on the catalog (1M entries: bximage's largest image, about 8 TB).
const CATALOG_MAX: u32 = 0x10_0000;
const EXTENT_MAX: u32 = 0x80_0000;
const UNALLOCATED: u32 = 0xffff_ffff;

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from(u32_at(b, at)) | (u64::from(u32_at(b, at + 4)) << 32)
}

/// The C string starting at `at` (qemu compares the header's fields with strcmp, which may
/// run on into the next field when one has no NUL).
fn c_str(b: &[u8], at: usize) -> &[u8] {
    let rest = &b[at..];
    &rest[..rest.iter().position(|&c| c == 0).unwrap_or(rest.len())]
}

fn is_bochs(h: &[u8]) -> bool {
    let version = u32_at(h, 64);
    c_str(h, 0) == MAGIC
        && c_str(h, 32) == REDOLOG
        && c_str(h, 48) == GROWING
        && (version == VERSION || version == VERSION_1)
}

fn probe(head: &[u8]) -> bool {
    head.len() >= HEADER_SIZE && is_bochs(&head[..HEADER_SIZE])
}

#[derive(Debug)]
pub struct Bochs {
    f: HostFile,
    size: u64,
    catalog: Vec<u32>,
    data_offset: u64,
    bitmap_sectors: u64,
    extent_sectors: u64,
    extent_size: u64,
}

/// The header's geometry, checked as qemu's `bochs_open` checks it, in its order and words.
struct Geometry {
    disk_sectors: u64,
    catalog_size: u32,
    catalog_at: u32,
    bitmap: u32,
    extent: u32,
}

fn geometry(h: &[u8]) -> Result<Geometry> {
    if !is_bochs(h) {
        return Err(Error::Open("Image not in Bochs format".into()));
    }
    // Version 1 headers lack the reserved word before the disk size.
    let disk = if u32_at(h, 64) == VERSION_1 {
        u64_at(h, 84)
    } else {
        u64_at(h, 88)
    };
    let g = Geometry {
        disk_sectors: disk / SECTOR,
        catalog_size: u32_at(h, 72),
        catalog_at: u32_at(h, 68),
        bitmap: u32_at(h, 76),
        extent: u32_at(h, 80),
    };
    let refuse = |msg: String| Err(Error::Open(msg));
    if g.catalog_size > CATALOG_MAX {
        return refuse("Catalog size is too large".into());
    }
    if u64::from(g.extent) < SECTOR {
        return refuse("Extent size must be at least 512".into());
    }
    if !g.extent.is_power_of_two() {
        return refuse(format!("Extent size {} is not a power of two", g.extent));
    }
    if g.extent > EXTENT_MAX {
        return refuse(format!("Extent size {} is too large", g.extent));
    }
    if u64::from(g.catalog_size) < g.disk_sectors.div_ceil(u64::from(g.extent) / SECTOR) {
        return refuse("Catalog size is too small for this disk size".into());
    }
    Ok(g)
}

fn open(
    f: HostFile,
    opts: &ImageOptions,
    _backing: &OpenBacking<'_>,
) -> Result<Arc<dyn BlockBackend>> {
    // qemu has no write support for bochs and opens it only read-only.
    if !(opts.read_only || opts.snapshot) {
        return Err(Error::Open("Image is read-only".into()));
    }
    let mut h = [0u8; HEADER_SIZE];
    f.read("read header", 0, &mut h)?;
    let g = geometry(&h)?;
    // At most 4 MiB (the catalog bound); past the end of the file it reads as zeroes.
    let mut raw = vec![0u8; g.catalog_size as usize * 4];
    f.read("read catalog", u64::from(g.catalog_at), &mut raw)?;
    let catalog = raw.chunks_exact(4).map(|c| u32_at(c, 0)).collect();
    let sectors = |bytes: u32| u64::from(1 + bytes.wrapping_sub(1) / SECTOR as u32);
    Ok(Arc::new(Bochs {
        size: g.disk_sectors * SECTOR,
        catalog,
        data_offset: u64::from(g.catalog_at.wrapping_add(g.catalog_size.wrapping_mul(4))),
        bitmap_sectors: sectors(g.bitmap),
        extent_sectors: sectors(g.extent),
        extent_size: u64::from(g.extent),
        f,
    }))
}

impl Bochs {
    /// Where extent `e`'s bitmap starts, if the extent is allocated.
    fn extent_at(&self, e: u64) -> Result<Option<u64>> {
        let index = match self.catalog.get(e as usize) {
            Some(&i) if i != UNALLOCATED => u64::from(i),
            // The catalog covers the disk (checked at open): only unallocated gets here.
            _ => return Ok(None),
        };
        let stride = SECTOR * (self.extent_sectors + self.bitmap_sectors);
        index
            .checked_mul(stride)
            .and_then(|o| o.checked_add(self.data_offset))
            .filter(|&o| o <= i64::MAX as u64)
            .map(Some)
            .ok_or_else(|| {
                self.f.corrupt(format!(
                    "extent {e} maps to index {index}, past any file offset"
                ))
            })
    }

    /// Read `out` from extent `e`, starting `in_e` bytes into it: the sectors its bitmap
    /// marks come from the file (consecutive ones in one read), the others are zeroes.
    fn read_extent(&self, e: u64, in_e: u64, out: &mut [u8]) -> Result<()> {
        let Some(bitmap_at) = self.extent_at(e)? else {
            out.fill(0);
            return Ok(());
        };
        let data_at = bitmap_at + SECTOR * self.bitmap_sectors;
        let (first, last) = (in_e / SECTOR, (in_e + out.len() as u64 - 1) / SECTOR);
        let mut bits = vec![0u8; (last / 8 - first / 8 + 1) as usize];
        self.f
            .read("read bitmap", bitmap_at + first / 8, &mut bits)?;
        let allocated = |s: u64| bits[(s / 8 - first / 8) as usize] >> (s % 8) & 1 == 1;
        let mut s = first;
        while s <= last {
            let run_end = (s..=last)
                .find(|&t| allocated(t) != allocated(s))
                .unwrap_or(last + 1);
            let from = (s * SECTOR).max(in_e) - in_e;
            let to = (run_end * SECTOR).min(in_e + out.len() as u64) - in_e;
            let part = &mut out[from as usize..to as usize];
            if allocated(s) {
                self.f.read("read", data_at + in_e + from, part)?;
            } else {
                part.fill(0);
            }
            s = run_end;
        }
        Ok(())
    }
}

impl BlockBackend for Bochs {
    fn size(&self) -> u64 {
        self.size
    }

    fn caps(&self) -> Caps {
        Caps::READ_ONLY
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        crate::extent::for_each_unit(
            offset,
            buf.len() as u64,
            self.extent_size,
            |e, in_e, n, at| self.read_extent(e, in_e, &mut buf[at as usize..(at + n) as usize]),
        )
    }

    crate::format::read_only_sector_image!("bochs");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> [u8; HEADER_SIZE] {
        let mut h = [0u8; HEADER_SIZE];
        h[..MAGIC.len()].copy_from_slice(MAGIC);
        h[32..32 + REDOLOG.len()].copy_from_slice(REDOLOG);
        h[48..48 + GROWING.len()].copy_from_slice(GROWING);
        h[64..68].copy_from_slice(&VERSION.to_le_bytes());
        h[68..72].copy_from_slice(&512u32.to_le_bytes());
        h[72..76].copy_from_slice(&256u32.to_le_bytes());
        h[76..80].copy_from_slice(&512u32.to_le_bytes());
        h[80..84].copy_from_slice(&4096u32.to_le_bytes());
        h[88..96].copy_from_slice(&(1u64 << 20).to_le_bytes());
        h
    }

    fn err(f: &dyn Fn(&mut [u8; HEADER_SIZE])) -> String {
        let mut h = header();
        f(&mut h);
        geometry(&h)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    }

    #[test]
    fn checks_headers_as_qemu() {
        assert!(probe(&header()));
        assert!(geometry(&header()).is_ok());
        assert_eq!(err(&|h| h[0] = b'b'), "Image not in Bochs format");
        assert_eq!(err(&|h| h[64] = 1), "Image not in Bochs format");
        assert_eq!(
            err(&|h| h[72..76].copy_from_slice(&0x10_0001u32.to_le_bytes())),
            "Catalog size is too large"
        );
        assert_eq!(
            err(&|h| h[80..84].copy_from_slice(&256u32.to_le_bytes())),
            "Extent size must be at least 512"
        );
        assert_eq!(
            err(&|h| h[80..84].copy_from_slice(&4097u32.to_le_bytes())),
            "Extent size 4097 is not a power of two"
        );
        assert_eq!(
            err(&|h| h[80..84].copy_from_slice(&(16u32 << 20).to_le_bytes())),
            "Extent size 16777216 is too large"
        );
        assert_eq!(
            err(&|h| h[72..76].copy_from_slice(&255u32.to_le_bytes())),
            "Catalog size is too small for this disk size"
        );
    }

    #[test]
    fn a_version_1_header_has_no_reserved_word() {
        let mut h = header();
        h[64..68].copy_from_slice(&VERSION_1.to_le_bytes());
        h[84..92].copy_from_slice(&(1u64 << 19).to_le_bytes());
        assert_eq!(geometry(&h).map(|g| g.disk_sectors).ok(), Some(1024));
    }
}
