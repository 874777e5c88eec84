//! Virtual PC / Hyper-V disk images (VHD, qemu's `vpc` driver): fixed images (the disk's
//! bytes, then a footer) and dynamic ones (a footer copy, a dynamic header, a block
//! allocation table, blocks of a sector bitmap and data, the footer last). Sizes, checks
//! and words are qemu's; differencing images are read as qemu reads them (without their
//! parent).
//!
//! # The write path's rules (dynamic images)
//!
//! - A write to an allocated block goes to its place in the file, without a lock.
//! - A write to an unallocated block takes the allocation lock, looks again, then: the
//!   footer is written at the new end of the file (so the file always ends in a footer), the
//!   block's bitmap (all sectors present, as qemu writes it) over the old footer, the new
//!   bytes into the block, and only then the table entry; then the entry is published in
//!   memory. The rest of the new block is a hole in the file: zeroes, which is what an
//!   unallocated block read before.
//! - Order on disk: the new block lies past the old end of the file, so a table entry that
//!   reaches the disk before its block points at bytes that were never anything else. A
//!   crash before the table entry leaves the space unused (the next open allocates there
//!   again). FLUSH syncs the file; a FUA write syncs after its table entry.

use crate::file::HostFile;
use crate::format::{Driver, ImageOptions, OpenBacking};
use crate::{BlockBackend, Caps, Error, Extent, ExtentFlags, Extents, IoFlags, Result};
use parking_lot::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

pub static DRIVER: Driver = Driver {
    name: "vpc",
    probe: |head| head.starts_with(b"conectix"),
    open,
    option,
    has_metadata: true,
};

const SECTOR: u64 = 512;
/// qemu's limit: 2040 GiB.
const MAX_SECTORS: u64 = 0xff00_0000;
/// The largest CHS geometry: such an image's size is the footer's, not its geometry's.
const MAX_GEOMETRY: u64 = 65535 * 16 * 255;
const UNALLOCATED: u32 = 0xffff_ffff;

fn option(key: &str, v: &str, opts: &mut ImageOptions) -> Option<std::result::Result<(), String>> {
    if key != "force_size_calc" {
        return None;
    }
    Some(match v {
        "chs" | "current_size" => {
            opts.vpc_size_calc = Some(v == "chs");
            Ok(())
        }
        _ => Err(format!("Invalid size calculation mode: '{v}'")),
    })
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn be64(b: &[u8], at: usize) -> u64 {
    (u64::from(be32(b, at)) << 32) | u64::from(be32(b, at + 4))
}

fn truncated() -> Error {
    err("block-vpc: free_data_block_offset points after the end of file. The image has been truncated.")
}

fn err(msg: impl Into<String>) -> Error {
    Error::Open(msg.into())
}

/// The disk's size in sectors, as qemu decides it: from the CHS geometry for the creators
/// that size disks by it (Virtual PC, old qemu), else (or at the largest geometry, or when
/// `force_size_calc` says) the footer's current size.
fn disk_sectors(footer: &[u8], force_chs: Option<bool>) -> u64 {
    let chs = u64::from(u16::from_be_bytes([footer[56], footer[57]]))
        * u64::from(footer[58])
        * u64::from(footer[59]);
    let app = &footer[28..32];
    let by_size = [&b"win "[..], b"qem2", b"d2v ", b"CTXS", b"tap\0"].contains(&app);
    let use_chs = !by_size || force_chs == Some(true);
    if !use_chs || chs == MAX_GEOMETRY || force_chs == Some(false) {
        be64(footer, 48) / SECTOR
    } else {
        chs
    }
}

fn open(
    f: HostFile,
    opts: &ImageOptions,
    _backing: &OpenBacking<'_>,
) -> Result<Arc<dyn BlockBackend>> {
    let file_len = f.size()?;
    let mut footer = [0u8; 512];
    f.read("read header", 0, &mut footer)?;
    let mut fixed = false;
    if !footer.starts_with(b"conectix") {
        if file_len < SECTOR {
            return Err(err("File too small for a VHD header"));
        }
        // A fixed disk has its footer only at the end.
        f.read("read footer", file_len - SECTOR, &mut footer)?;
        if !footer.starts_with(b"conectix") {
            return Err(err("invalid VPC image"));
        }
        fixed = true;
    }
    let checksum = be32(&footer, 64);
    let mut sum: u32 = 0;
    for (i, b) in footer.iter().enumerate() {
        if !(64..68).contains(&i) {
            sum = sum.wrapping_add(u32::from(*b));
        }
    }
    if !sum != checksum {
        return Err(err("Incorrect header checksum"));
    }
    let sectors = disk_sectors(&footer, opts.vpc_size_calc);
    if sectors > MAX_SECTORS {
        return Err(Error::Open(format!(
            "Could not open '{}': File too large",
            f.path().display()
        )));
    }
    let size = sectors * SECTOR;
    let read_only = opts.read_only || opts.snapshot;
    if fixed {
        return Ok(Arc::new(Fixed { f, size, read_only }));
    }
    Ok(Arc::new(Dynamic::open(
        f, &footer, size, file_len, read_only,
    )?))
}

/// A fixed image: the file's first bytes. Its size is qemu's (the geometry's, which may
/// reach past the data into the footer and beyond the file, read as zeroes there).
#[derive(Debug)]
struct Fixed {
    f: HostFile,
    size: u64,
    read_only: bool,
}

impl BlockBackend for Fixed {
    fn size(&self) -> u64 {
        self.size
    }

    fn caps(&self) -> Caps {
        Caps::image(self.read_only)
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.f.read("read", offset, buf)
    }

    fn write(&self, offset: u64, buf: &[u8], flags: IoFlags) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        self.f
            .write("write", offset, buf, flags.contains(IoFlags::FUA))
    }

    fn flush(&self) -> Result<()> {
        self.f.sync()
    }

    /// qemu's vpc driver has no discard: a trim changes nothing.
    fn trim(&self, _offset: u64, _len: u64, _flags: IoFlags) -> Result<()> {
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: IoFlags) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        self.f.write_zeroes(offset, len)?;
        if flags.contains(IoFlags::FUA) {
            self.f.sync()?;
        }
        Ok(())
    }

    /// Data, zero where the file has holes (as qemu reports it).
    fn block_status(&self, offset: u64, len: u64, out: &mut Extents) -> Result<()> {
        self.f.zero_status(offset, len, out);
        Ok(())
    }

    fn format_name(&self) -> &'static str {
        "vpc"
    }

    fn close(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.f.sync()
    }
}

#[derive(Debug)]
struct Dynamic {
    f: HostFile,
    size: u64,
    read_only: bool,
    footer: [u8; 512],
    block: u64,
    bitmap: u64,
    bat_at: u64,
    bat: Vec<AtomicU32>,
    /// Where the next block goes (the footer's place); held from an allocation's look-up to
    /// its table entry.
    free: Mutex<u64>,
}

impl Dynamic {
    fn open(
        f: HostFile,
        footer: &[u8; 512],
        size: u64,
        file_len: u64,
        ro: bool,
    ) -> Result<Dynamic> {
        let mut h = [0u8; 1024];
        f.read("read dynamic header", be64(footer, 16), &mut h)
            .map_err(|_| err("Error reading dynamic VHD header"))?;
        if !h.starts_with(b"cxsparse") {
            return Err(err("Invalid header magic"));
        }
        let block = u64::from(be32(&h, 32));
        if !block.is_power_of_two() || block < SECTOR {
            return Err(err(format!("Invalid block size {block}")));
        }
        let bitmap = (block / (8 * SECTOR)).next_multiple_of(SECTOR);
        let entries = be32(&h, 28);
        if size / block > u64::from(u32::MAX) {
            return Err(err("Too many blocks"));
        }
        if u64::from(entries) * block < size {
            return Err(err("Page table too small"));
        }
        if entries > i32::MAX as u32 / 4 {
            return Err(err(format!(
                "Max Table Entries too large ({})",
                entries as i32
            )));
        }
        let bat_at = be64(&h, 16);
        let bat_len = u64::from(entries) * 4;
        // A table past the file's end: refused before memory is sized by it, in qemu's words
        // (its free offset, which starts past the table, then lies past the end).
        if bat_at.saturating_add(bat_len) > file_len {
            return Err(truncated());
        }
        let mut raw = vec![0u8; bat_len as usize];
        f.read("read block allocation table", bat_at, &mut raw)?;
        let bat: Vec<AtomicU32> = raw
            .chunks_exact(4)
            .map(|c| AtomicU32::new(be32(c, 0)))
            .collect();
        let mut free = (bat_at + bat_len).next_multiple_of(SECTOR);
        for e in bat.iter().map(|e| e.load(Ordering::Relaxed)) {
            if e != UNALLOCATED {
                free = free.max(u64::from(e) * SECTOR + bitmap + block);
            }
        }
        if free > file_len {
            return Err(truncated());
        }
        Ok(Dynamic {
            f,
            size,
            read_only: ro,
            footer: *footer,
            block,
            bitmap,
            bat_at,
            bat,
            free: Mutex::new(free),
        })
    }

    /// Where block `b`'s data starts in the file, if it is allocated.
    fn data_at(&self, b: u64) -> Option<u64> {
        let e = self.bat.get(b as usize)?.load(Ordering::Acquire);
        (e != UNALLOCATED).then(|| u64::from(e) * SECTOR + self.bitmap)
    }

    /// Split a request at block boundaries: (block, offset in it, length, position).
    fn each(
        &self,
        offset: u64,
        len: u64,
        f: impl FnMut(u64, u64, u64, u64) -> Result<()>,
    ) -> Result<()> {
        crate::extent::for_each_unit(offset, len, self.block, f)
    }

    fn write_block(&self, b: u64, in_b: u64, data: &[u8], fua: bool) -> Result<()> {
        if let Some(at) = self.data_at(b) {
            return self.f.write("write", at + in_b, data, fua);
        }
        let mut free = self.free.lock();
        if let Some(at) = self.data_at(b) {
            drop(free);
            return self.f.write("write", at + in_b, data, fua);
        }
        let start = *free;
        let sector = u32::try_from(start / SECTOR)
            .ok()
            .filter(|s| *s != UNALLOCATED)
            .ok_or_else(|| Error::NoSpace(format!("'{}' is full", self.f.path().display())))?;
        let end = start + self.bitmap + self.block;
        self.f.write("write footer", end, &self.footer, false)?;
        self.f.write(
            "write block bitmap",
            start,
            &vec![0xff; self.bitmap as usize],
            false,
        )?;
        self.f
            .write("write", start + self.bitmap + in_b, data, false)?;
        self.f.write(
            "write block allocation table",
            self.bat_at + b * 4,
            &sector.to_be_bytes(),
            false,
        )?;
        self.bat[b as usize].store(sector, Ordering::Release);
        *free = end;
        drop(free);
        if fua {
            self.f.sync()?;
        }
        Ok(())
    }
}

impl BlockBackend for Dynamic {
    fn size(&self) -> u64 {
        self.size
    }

    fn caps(&self) -> Caps {
        Caps::image(self.read_only)
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.each(offset, buf.len() as u64, |b, in_b, n, at| {
            let out = &mut buf[at as usize..(at + n) as usize];
            match self.data_at(b) {
                Some(data) => self.f.read("read", data + in_b, out),
                None => {
                    out.fill(0);
                    Ok(())
                }
            }
        })
    }

    fn write(&self, offset: u64, buf: &[u8], flags: IoFlags) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        let fua = flags.contains(IoFlags::FUA);
        self.each(offset, buf.len() as u64, |b, in_b, n, at| {
            self.write_block(b, in_b, &buf[at as usize..(at + n) as usize], fua)
        })
    }

    fn flush(&self) -> Result<()> {
        self.f.sync()
    }

    /// qemu's vpc driver has no discard: a trim changes nothing.
    fn trim(&self, _offset: u64, _len: u64, _flags: IoFlags) -> Result<()> {
        Ok(())
    }

    /// Unallocated blocks read as zeroes already; allocated ones are zeroed in place.
    fn write_zeroes(&self, offset: u64, len: u64, flags: IoFlags) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        self.each(offset, len, |b, in_b, n, _| match self.data_at(b) {
            None => Ok(()),
            Some(at) if self.f.zero_range(at + in_b, n).is_ok() => Ok(()),
            Some(at) => self
                .f
                .write("write zeroes", at + in_b, &vec![0u8; n as usize], false),
        })?;
        if flags.contains(IoFlags::FUA) {
            self.f.sync()?;
        }
        Ok(())
    }

    /// As qemu's: an allocated block is data; an unallocated one reads as zeroes.
    fn block_status(&self, offset: u64, len: u64, out: &mut Extents) -> Result<()> {
        let len = len.min(1024 * self.block - offset % self.block);
        self.each(offset, len, |b, _, n, _| {
            let flags = match self.data_at(b) {
                Some(_) => ExtentFlags::empty(),
                None => ExtentFlags::HOLE | ExtentFlags::ZERO,
            };
            out.push(Extent::new(n, flags, 1));
            Ok(())
        })
    }

    fn format_name(&self) -> &'static str {
        "vpc"
    }

    fn close(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.f.sync()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_follow_the_creator() {
        let mut f = [0u8; 512];
        f[48..56].copy_from_slice(&(100u64 * 512).to_be_bytes());
        f[56..58].copy_from_slice(&2u16.to_be_bytes());
        f[58] = 4;
        f[59] = 10;
        f[28..32].copy_from_slice(b"vpc ");
        assert_eq!(disk_sectors(&f, None), 80);
        assert_eq!(disk_sectors(&f, Some(false)), 100);
        f[28..32].copy_from_slice(b"win ");
        assert_eq!(disk_sectors(&f, None), 100);
        assert_eq!(disk_sectors(&f, Some(true)), 80);
    }
}
