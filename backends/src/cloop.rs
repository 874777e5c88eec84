//! Compressed loop images (cloop V2.0), read-only, as qemu's `cloop` driver reads them: a
//! 128-byte shell-script preamble, the block size and count (big-endian 32-bit), `count + 1`
//! big-endian 64-bit file offsets, and each block a zlib stream between two offsets that
//! inflates to exactly one block.
//!
//! qemu's limits and words are kept at open (block size, offset table size, monotonic
//! offsets, per-block compressed size); a block that does not inflate to one block fails
//! its read with EIO. Offsets past the end of the file read as zeroes (the block layer's
//! rule), so a table cut short is refused at its first zero after a non-zero offset, and
//! the table's memory is bounded by the file's size. The export size is qemu's 32-bit
//! product of the block count and sectors per block.

use crate::file::HostFile;
use crate::format::{Driver, ImageOptions, OpenBacking};
use crate::{BlockBackend, Caps, Error, Result};
use flate2::{Decompress, FlushDecompress, Status};
use parking_lot::Mutex;
use std::sync::Arc;

pub static DRIVER: Driver = Driver {
    name: "cloop",
    probe,
    open,
    option: |_, _, _| None,
    has_metadata: true,
};

const MAGIC_V2: &[u8] =
    b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n";
const HEADER: u64 = 128;
const SECTOR: u64 = 512;
/// qemu's largest block (it keeps one inflated block in memory).
const BLOCK_MAX: u32 = 64 << 20;
const OFFSETS_BYTES_MAX: u64 = 512 << 20;
/// Inflated blocks kept for readers that take a block in several requests.
const CACHED_BLOCKS: usize = 4;

fn probe(head: &[u8]) -> bool {
    let n = MAGIC_V2.len().min(head.len());
    n > 0 && head[..n] == MAGIC_V2[..n]
}

#[derive(Debug)]
pub struct Cloop {
    f: HostFile,
    size: u64,
    block_size: u32,
    /// The table as far as the file holds it; entries past it are zero.
    offsets: Vec<u64>,
    /// The last blocks inflated, newest last.
    cache: Mutex<Vec<(u64, Arc<Vec<u8>>)>>,
}

fn refuse<T>(msg: String) -> Result<T> {
    Err(Error::Open(msg))
}

fn check_block_size(block_size: u32) -> Result<()> {
    if u64::from(block_size) % SECTOR != 0 {
        return refuse(format!("block_size {block_size} must be a multiple of 512"));
    }
    if block_size == 0 {
        return refuse("block_size cannot be zero".into());
    }
    if block_size > BLOCK_MAX {
        return refuse(format!(
            "block_size {block_size} must be {} MB or less",
            BLOCK_MAX >> 20
        ));
    }
    Ok(())
}

/// qemu's checks of the offset table: increasing, no block over twice the largest.
fn check_offsets(offsets: &[u64], entries: u64) -> Result<()> {
    for (i, pair) in offsets.windows(2).enumerate() {
        let i = i + 1;
        if pair[1] < pair[0] {
            return refuse(format!(
                "offsets not monotonically increasing at index {i}, image file is corrupt"
            ));
        }
        if pair[1] - pair[0] > 2 * u64::from(BLOCK_MAX) {
            return refuse(format!(
                "invalid compressed block size at index {i}, image file is corrupt"
            ));
        }
    }
    // The zeroes past the end of the file.
    if (offsets.len() as u64) < entries && offsets.last().is_some_and(|&o| o > 0) {
        return refuse(format!(
            "offsets not monotonically increasing at index {}, image file is corrupt",
            offsets.len()
        ));
    }
    Ok(())
}

fn open(
    f: HostFile,
    opts: &ImageOptions,
    _backing: &OpenBacking<'_>,
) -> Result<Arc<dyn BlockBackend>> {
    // qemu has no write support for cloop and opens it only read-only.
    if !(opts.read_only || opts.snapshot) {
        return refuse("Image is read-only".into());
    }
    let mut h = [0u8; 8];
    f.read("read header", HEADER, &mut h)?;
    let block_size = u32::from_be_bytes([h[0], h[1], h[2], h[3]]);
    check_block_size(block_size)?;
    let n_blocks = u32::from_be_bytes([h[4], h[5], h[6], h[7]]);
    let n_max = (u32::MAX - 1) / 8;
    if n_blocks > n_max {
        return refuse(format!("n_blocks {n_blocks} must be {n_max} or less"));
    }
    let entries = u64::from(n_blocks) + 1;
    if entries * 8 > OFFSETS_BYTES_MAX {
        return refuse("image requires too many offsets, try increasing block size".into());
    }
    let table_at = HEADER + 8;
    let in_file = f.size()?.saturating_sub(table_at).min(entries * 8);
    let mut raw = vec![0u8; in_file.next_multiple_of(8) as usize];
    f.read("read offsets", table_at, &mut raw)?;
    let offsets: Vec<u64> = raw
        .chunks_exact(8)
        .map(|c| u64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
        .collect();
    check_offsets(&offsets, entries)?;
    let sectors_per_block = block_size / SECTOR as u32;
    Ok(Arc::new(Cloop {
        size: u64::from(n_blocks.wrapping_mul(sectors_per_block)) * SECTOR,
        block_size,
        offsets,
        cache: Mutex::new(Vec::with_capacity(CACHED_BLOCKS)),
        f,
    }))
}

impl Cloop {
    fn offset(&self, i: u64) -> u64 {
        self.offsets.get(i as usize).copied().unwrap_or(0)
    }

    /// Block `b`, inflated: from the cache, or read and inflated (outside the lock, so
    /// readers of other blocks go on) and then cached.
    fn block(&self, b: u64) -> Result<Arc<Vec<u8>>> {
        if let Some((_, data)) = self.cache.lock().iter().find(|(k, _)| *k == b) {
            return Ok(data.clone());
        }
        let data = Arc::new(self.inflate(b)?);
        let mut cache = self.cache.lock();
        if !cache.iter().any(|(k, _)| *k == b) {
            if cache.len() == CACHED_BLOCKS {
                cache.remove(0);
            }
            cache.push((b, data.clone()));
        }
        Ok(data)
    }

    fn inflate(&self, b: u64) -> Result<Vec<u8>> {
        let (from, to) = (self.offset(b), self.offset(b + 1));
        // Both checked at open: increasing, at most 128 MiB apart.
        let mut packed = vec![0u8; (to - from) as usize];
        self.f.read("read block", from, &mut packed)?;
        let mut out = vec![0u8; self.block_size as usize];
        let mut z = Decompress::new(true);
        let status = z.decompress(&packed, &mut out, FlushDecompress::Finish);
        match status {
            Ok(Status::StreamEnd) if z.total_out() == u64::from(self.block_size) => Ok(out),
            _ => Err(Error::io(
                "inflate block",
                self.f.path(),
                from,
                to - from,
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!(
                        "block {b} does not inflate to {} bytes, image file is corrupt",
                        self.block_size
                    ),
                ),
            )),
        }
    }
}

impl BlockBackend for Cloop {
    fn size(&self) -> u64 {
        self.size
    }

    fn caps(&self) -> Caps {
        Caps::READ_ONLY
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let unit = u64::from(self.block_size);
        crate::extent::for_each_unit(offset, buf.len() as u64, unit, |b, in_b, n, at| {
            let data = self.block(b)?;
            buf[at as usize..(at + n) as usize]
                .copy_from_slice(&data[in_b as usize..(in_b + n) as usize]);
            Ok(())
        })
    }

    crate::format::read_only_sector_image!("cloop");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_block_sizes_as_qemu() {
        let err = |s| check_block_size(s).err().map(|e| e.to_string());
        assert_eq!(err(65536), None);
        assert_eq!(
            err(1000).as_deref(),
            Some("block_size 1000 must be a multiple of 512")
        );
        assert_eq!(err(0).as_deref(), Some("block_size cannot be zero"));
        assert_eq!(
            err(128 << 20).as_deref(),
            Some("block_size 134217728 must be 64 MB or less")
        );
    }

    #[test]
    fn checks_offsets_as_qemu() {
        let err = |o: &[u64], n| check_offsets(o, n).err().map(|e| e.to_string());
        assert_eq!(err(&[200, 300, 300, 900], 4), None);
        assert_eq!(
            err(&[200, 300, 250], 3).as_deref(),
            Some("offsets not monotonically increasing at index 2, image file is corrupt")
        );
        assert_eq!(
            err(&[200, 200 + (128 << 20) + 1], 2).as_deref(),
            Some("invalid compressed block size at index 1, image file is corrupt")
        );
        // A table the file cuts short: its first missing entry is a zero.
        assert_eq!(
            err(&[200, 300], 5).as_deref(),
            Some("offsets not monotonically increasing at index 2, image file is corrupt")
        );
        assert_eq!(err(&[0, 0], 5), None);
    }

    #[test]
    fn probes_the_v2_preamble() {
        assert!(probe(MAGIC_V2));
        assert!(probe(&MAGIC_V2[..20]));
        assert!(!probe(b"#!/bin/sh\n#V3.0 Format\n"));
    }
}
