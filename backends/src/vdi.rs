//! VirtualBox disk images (VDI, version 1.1), dynamic and static, as qemu's `vdi` driver
//! reads and writes them: a header, a block map of 32-bit entries, 1 MiB blocks.
//!
//! # The write path's rules
//!
//! - A write to an allocated block goes to its place in the file, without a lock.
//! - A write to an unallocated (or discarded) block takes the allocation lock, looks again,
//!   writes the whole new block (zeroes around the new bytes) at the next free index, then
//!   the header's allocated count, then the map entry (qemu's order), then publishes the
//!   entry in memory. So a crash between the count and the entry leaves a block that nothing
//!   points to and that the count still covers (a leak, never a block handed out twice:
//!   VirtualBox allocates at the count), and the next free index is never below a mapped one
//!   (`next` starts past the largest index mapped).
//! - Order on disk: a new block lies past every block before it, at or past the file's end,
//!   so a map entry that reaches the disk before its block points at bytes that were never
//!   anything else. FLUSH syncs the file; a FUA write syncs after its map entry.

use crate::file::HostFile;
use crate::format::{Driver, ImageOptions, OpenBacking};
use crate::{BlockBackend, Caps, Error, Extent, ExtentFlags, Extents, IoFlags, Result};
use parking_lot::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

pub static DRIVER: Driver = Driver {
    name: "vdi",
    probe,
    open,
    option: |_, _, _| None,
    has_metadata: true,
};

const SIGNATURE: u32 = 0xbeda_107f;
const VERSION_1_1: u32 = 0x0001_0001;
const SECTOR: u64 = 512;
const BLOCK: u64 = 1 << 20;
/// qemu's limit: the map, rounded up to a sector, fits in an `int`.
const BLOCKS_MAX: u32 = 0x1fff_ff80;
const DISK_SIZE_MAX: u64 = BLOCKS_MAX as u64 * BLOCK;
/// Map entries at or above this are not allocated (never written; discarded: zeroes).
const DISCARDED: u32 = 0xffff_fffe;
/// Where the header keeps its allocated-block count.
const BLOCKS_ALLOCATED_AT: u64 = 0x184;

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn probe(head: &[u8]) -> bool {
    head.len() >= 512 && u32_at(head, 0x40) == SIGNATURE
}

#[derive(Debug)]
pub struct Vdi {
    f: HostFile,
    size: u64,
    read_only: bool,
    offset_bmap: u64,
    offset_data: u64,
    blocks_in_image: u32,
    /// A static (preallocated) image: its blocks' zeroes are the file's holes, as qemu
    /// reports them.
    static_image: bool,
    bmap: Vec<AtomicU32>,
    /// (next free block index, the header's allocated count); held from an allocation's
    /// look-up to its map entry.
    alloc: Mutex<(u32, u32)>,
}

fn unsupported(msg: String) -> Error {
    Error::Open(msg)
}

/// qemu's `vdi_open` checks, in its order and words.
fn check_header(h: &[u8; 512]) -> Result<()> {
    let disk_size = u64::from(u32_at(h, 0x170)) | (u64::from(u32_at(h, 0x174)) << 32);
    let signature = u32_at(h, 0x40);
    let version = u32_at(h, 0x44);
    let (offset_bmap, offset_data) = (u32_at(h, 0x154), u32_at(h, 0x158));
    let (sector_size, block_size) = (u32_at(h, 0x168), u32_at(h, 0x178));
    let blocks = u32_at(h, 0x180);
    let room = u64::from(blocks) * u64::from(block_size);
    let null = |at: usize| h[at..at + 16].iter().all(|&b| b == 0);
    let msg = if disk_size > DISK_SIZE_MAX {
        format!(
            "Unsupported VDI image size (size is 0x{disk_size:x}, max supported is 0x{DISK_SIZE_MAX:x})"
        )
    } else if signature != SIGNATURE {
        format!("Image not in VDI format (bad signature {signature:08x})")
    } else if version != VERSION_1_1 {
        format!(
            "unsupported VDI image (version {}.{})",
            version >> 16,
            version & 0xffff
        )
    } else if u64::from(offset_bmap) % SECTOR != 0 {
        format!("unsupported VDI image (unaligned block map offset 0x{offset_bmap:x})")
    } else if u64::from(offset_data) % SECTOR != 0 {
        format!("unsupported VDI image (unaligned data offset 0x{offset_data:x})")
    } else if u64::from(sector_size) != SECTOR {
        format!("unsupported VDI image (sector size {sector_size} is not {SECTOR})")
    } else if u64::from(block_size) != BLOCK {
        format!("unsupported VDI image (block size {block_size} is not {BLOCK})")
    } else if disk_size.next_multiple_of(SECTOR) > room {
        format!(
            "unsupported VDI image (disk size {}, image bitmap has room for {room})",
            disk_size.next_multiple_of(SECTOR)
        )
    } else if !null(0x1a8) {
        "unsupported VDI image (non-NULL link UUID)".into()
    } else if !null(0x1b8) {
        "unsupported VDI image (non-NULL parent UUID)".into()
    } else if blocks > BLOCKS_MAX {
        format!("unsupported VDI image (too many blocks {blocks}, max is {BLOCKS_MAX})")
    } else {
        return Ok(());
    };
    Err(unsupported(msg))
}

fn open(
    f: HostFile,
    opts: &ImageOptions,
    _backing: &OpenBacking<'_>,
) -> Result<Arc<dyn BlockBackend>> {
    let mut h = [0u8; 512];
    f.read("read header", 0, &mut h)?;
    check_header(&h)?;
    let disk_size = u64::from(u32_at(&h, 0x170)) | (u64::from(u32_at(&h, 0x174)) << 32);
    let offset_bmap = u64::from(u32_at(&h, 0x154));
    let blocks_in_image = u32_at(&h, 0x180);
    let map_len = u64::from(blocks_in_image) * 4;
    // A map past the file's end is damaged or hostile: refuse it before sizing memory by it.
    if offset_bmap + map_len > f.size()? {
        return Err(f.corrupt(format!(
            "block map at offset {offset_bmap:#x} ({blocks_in_image} entries) lies past the end of the file"
        )));
    }
    let mut raw = vec![0u8; map_len as usize];
    f.read("read block map", offset_bmap, &mut raw)?;
    let bmap: Vec<AtomicU32> = raw
        .chunks_exact(4)
        .map(|c| AtomicU32::new(u32::from_le_bytes([c[0], c[1], c[2], c[3]])))
        .collect();
    let allocated = u32_at(&h, BLOCKS_ALLOCATED_AT as usize);
    let past_mapped = bmap
        .iter()
        .map(|e| e.load(Ordering::Relaxed))
        // An entry past the image's blocks is damage (its writes fail); it reserves nothing.
        .filter(|&e| e < blocks_in_image)
        .map(|e| e + 1)
        .max()
        .unwrap_or(0);
    Ok(Arc::new(Vdi {
        size: disk_size.next_multiple_of(SECTOR),
        read_only: opts.read_only || opts.snapshot,
        offset_bmap,
        offset_data: u64::from(u32_at(&h, 0x158)),
        blocks_in_image,
        static_image: u32_at(&h, 0x4c) == 2,
        bmap,
        alloc: Mutex::new((allocated.max(past_mapped), allocated)),
        f,
    }))
}

impl Vdi {
    /// The file offset of block `b`'s data, if it is allocated.
    fn block_at(&self, b: u64) -> Option<u64> {
        let e = self.bmap.get(b as usize)?.load(Ordering::Acquire);
        (e < DISCARDED).then(|| self.offset_data + u64::from(e) * BLOCK)
    }

    /// Split a request at block boundaries: (block, offset in it, length, position).
    fn each(
        &self,
        offset: u64,
        len: u64,
        f: impl FnMut(u64, u64, u64, u64) -> Result<()>,
    ) -> Result<()> {
        crate::extent::for_each_unit(offset, len, BLOCK, f)
    }

    /// A hostile map entry past the image's blocks is refused for writes (its reads are
    /// zeroes, from past the file's end).
    fn check_index(&self, b: u64, at: u64) -> Result<()> {
        let index = (at - self.offset_data) / BLOCK;
        if index >= u64::from(self.blocks_in_image) {
            return Err(self.f.corrupt(format!(
                "block {b} maps to index {index}, past the image's {} blocks",
                self.blocks_in_image
            )));
        }
        Ok(())
    }

    fn overwrite(&self, b: u64, at: u64, data: &[u8], fua: bool) -> Result<()> {
        self.check_index(b, at)?;
        self.f.write("write", at, data, fua)
    }

    fn write_block(&self, b: u64, in_b: u64, data: &[u8], fua: bool) -> Result<()> {
        if let Some(at) = self.block_at(b) {
            return self.overwrite(b, at + in_b, data, fua);
        }
        let mut alloc = self.alloc.lock();
        if let Some(at) = self.block_at(b) {
            drop(alloc);
            return self.overwrite(b, at + in_b, data, fua);
        }
        let (next, count) = *alloc;
        if next >= self.blocks_in_image {
            return Err(Error::NoSpace(format!(
                "'{}' has no free block left",
                self.f.path().display()
            )));
        }
        let at = self.offset_data + u64::from(next) * BLOCK;
        if data.len() as u64 == BLOCK {
            self.f.write("write", at, data, false)?;
        } else {
            let mut whole = vec![0u8; BLOCK as usize];
            whole[in_b as usize..in_b as usize + data.len()].copy_from_slice(data);
            self.f.write("write", at, &whole, false)?;
        }
        let count = count + 1;
        self.f.write(
            "write header",
            BLOCKS_ALLOCATED_AT,
            &count.to_le_bytes(),
            false,
        )?;
        self.f.write(
            "write block map",
            self.offset_bmap + b * 4,
            &next.to_le_bytes(),
            false,
        )?;
        self.bmap[b as usize].store(next, Ordering::Release);
        *alloc = (next + 1, count);
        drop(alloc);
        if fua {
            self.f.sync()?;
        }
        Ok(())
    }
}

impl BlockBackend for Vdi {
    fn size(&self) -> u64 {
        self.size
    }

    fn caps(&self) -> Caps {
        Caps::image(self.read_only)
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.each(offset, buf.len() as u64, |b, in_b, n, at| {
            let out = &mut buf[at as usize..(at + n) as usize];
            match self.block_at(b) {
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

    /// qemu's vdi driver has no discard: a trim changes nothing.
    fn trim(&self, _offset: u64, _len: u64, _flags: IoFlags) -> Result<()> {
        Ok(())
    }

    /// Unallocated blocks read as zeroes already; allocated ones are zeroed in place.
    fn write_zeroes(&self, offset: u64, len: u64, flags: IoFlags) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        self.each(offset, len, |b, in_b, n, _| match self.block_at(b) {
            None => Ok(()),
            Some(at) => {
                self.check_index(b, at)?;
                self.f.write_zeroes(at + in_b, n)
            }
        })?;
        if flags.contains(IoFlags::FUA) {
            self.f.sync()?;
        }
        Ok(())
    }

    fn block_status(&self, offset: u64, len: u64, out: &mut Extents) -> Result<()> {
        // At most 1024 blocks per call: the client asks again for the rest.
        let len = len.min(1024 * BLOCK - offset % BLOCK);
        self.each(offset, len, |b, in_b, n, _| {
            match self.block_at(b) {
                Some(at) if self.static_image => self.f.zero_status(at + in_b, n, out),
                Some(_) => out.push(Extent::new(n, ExtentFlags::empty(), 1)),
                None => out.push(Extent::new(n, ExtentFlags::HOLE | ExtentFlags::ZERO, 0)),
            }
            Ok(())
        })
    }

    fn format_name(&self) -> &'static str {
        "vdi"
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

    fn header() -> [u8; 512] {
        let mut h = [0u8; 512];
        h[0x40..0x44].copy_from_slice(&SIGNATURE.to_le_bytes());
        h[0x44..0x48].copy_from_slice(&VERSION_1_1.to_le_bytes());
        h[0x154..0x158].copy_from_slice(&0x200u32.to_le_bytes());
        h[0x158..0x15c].copy_from_slice(&0x400u32.to_le_bytes());
        h[0x168..0x16c].copy_from_slice(&512u32.to_le_bytes());
        h[0x170..0x178].copy_from_slice(&(1u64 << 20).to_le_bytes());
        h[0x178..0x17c].copy_from_slice(&(1u32 << 20).to_le_bytes());
        h[0x180..0x184].copy_from_slice(&1u32.to_le_bytes());
        h
    }

    #[test]
    fn checks_headers_as_qemu() {
        assert!(probe(&header()));
        assert!(check_header(&header()).is_ok());
        let err = |f: &dyn Fn(&mut [u8; 512])| {
            let mut h = header();
            f(&mut h);
            check_header(&h).unwrap_err().to_string()
        };
        assert_eq!(
            err(&|h| h[0x40] = 0),
            "Image not in VDI format (bad signature beda1000)"
        );
        assert_eq!(
            err(&|h| h[0x44..0x48].copy_from_slice(&0x0001_0000u32.to_le_bytes())),
            "unsupported VDI image (version 1.0)"
        );
        assert_eq!(
            err(&|h| h[0x171] = 0x20),
            "unsupported VDI image (disk size 1056768, image bitmap has room for 1048576)"
        );
        assert_eq!(
            err(&|h| h[0x1b8] = 1),
            "unsupported VDI image (non-NULL parent UUID)"
        );
    }
}
