//! Hyper-V VHDX images (dynamic and fixed; not differencing, as qemu), read and written as
//! qemu's `vhdx` driver does, a log left by an unclean close replayed first.
//!
//! # The write path's rules
//!
//! - The first write after opening renews the headers (the spec's file- and data-write
//!   GUIDs): the non-current header is written with the next sequence number, then the
//!   other one, each synced, so a crash leaves one valid current header.
//! - A write to a present block goes to its place in the file, without a lock.
//! - A write to a block that is not present takes the allocation lock, looks again, extends
//!   the file by a block at the next 1 MiB boundary (reads there are zeroes, what the block
//!   read before), writes the new bytes, and only then the block's BAT entry (one aligned
//!   8-byte write), then publishes it in memory.
//! - Order on disk: a new block lies past the file's old end, so a BAT entry that reaches the
//!   disk before its data points at zeroes, never at anyone's old bytes; a crash before the
//!   entry leaves unused space. qemu routes the BAT entry through the log; an aligned 8-byte
//!   write within one sector needs no log to be atomic, and the log stays empty, so any
//!   reader opens the file without a replay. FLUSH syncs the file; a FUA write syncs after
//!   its BAT entry.

mod log;
mod meta;

use crate::file::HostFile;
use crate::format::{Driver, ImageOptions, OpenBacking};
use crate::{BlockBackend, Caps, Error, Extent, ExtentFlags, Extents, IoFlags, Result};
use meta::{errno_open, Header};
use parking_lot::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

pub static DRIVER: Driver = Driver {
    name: "vhdx",
    probe: |head| head.starts_with(b"vhdxfile"),
    open,
    option: |_, _, _| None,
    has_metadata: true,
};

const MIB: u64 = 1 << 20;
const FULLY_PRESENT: u64 = 6;
const PARTIALLY_PRESENT: u64 = 7;

/// Where a block's bytes are.
enum Block {
    /// Not present, undefined, zero or unmapped: zeroes.
    Zero,
    At(u64),
    /// Present in a parent: not for an image without one.
    Partial,
}

#[derive(Debug)]
struct Headers {
    current: usize,
    list: [Option<Header>; 2],
    renewed: bool,
}

#[derive(Debug)]
pub struct Vhdx {
    f: HostFile,
    size: u64,
    read_only: bool,
    block: u64,
    chunk_ratio: u64,
    bat_at: u64,
    bat: Vec<AtomicU64>,
    /// The next free 1 MiB-aligned offset; held from an allocation's look-up to its entry.
    next: Mutex<u64>,
    headers: Mutex<Headers>,
}

fn random_guid() -> [u8; 16] {
    use std::hash::{BuildHasher, Hasher};
    let mut g = [0u8; 16];
    for half in g.chunks_mut(8) {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos()),
        );
        half.copy_from_slice(&h.finish().to_le_bytes());
    }
    // A random (version 4) GUID, DCE variant.
    g[7] = (g[7] & 0x0f) | 0x40;
    g[8] = (g[8] & 0x3f) | 0x80;
    g
}

fn open(
    f: HostFile,
    opts: &ImageOptions,
    _backing: &OpenBacking<'_>,
) -> Result<Arc<dyn BlockBackend>> {
    let read_only = opts.read_only || opts.snapshot;
    let mut sig = [0u8; 8];
    f.read("read file identifier", 0, &mut sig)?;
    if &sig != b"vhdxfile" {
        return Err(errno_open(&f, libc::EINVAL));
    }
    let (mut current, mut list) = meta::headers(&f)?;
    let h = list[current]
        .clone()
        .ok_or_else(|| errno_open(&f, libc::EINVAL))?;
    if h.log_guid != [0; 16] {
        let log_len = u64::from(h.log_length);
        let (updates, last) = log::pending(&f, h.log_offset, log_len, &h.log_guid)?;
        if !updates.is_empty() || last != 0 {
            if read_only {
                return Err(log::needs_replay(&f));
            }
            log::replay(&f, &updates, last)?;
            // The log is spent: both headers say so.
            for _ in 0..2 {
                current = write_next_header(&f, current, &mut list, None, [0; 16])?;
            }
        }
    }
    let regions = meta::regions(&f)?;
    let p = meta::params(&f, regions.meta_at)?;
    let chunk_ratio = (1u64 << 23) * p.logical_sector / p.block_size;
    let data_blocks = p.disk_size.div_ceil(p.block_size);
    let entries = match data_blocks {
        0 => 0,
        n => n + (n - 1) / chunk_ratio,
    };
    let file_len = f.size()?;
    if entries * 8 > regions.bat_len || regions.bat_at.saturating_add(entries * 8) > file_len {
        return Err(errno_open(&f, libc::EINVAL));
    }
    let mut raw = vec![0u8; (entries * 8) as usize];
    f.read("read BAT", regions.bat_at, &mut raw)?;
    let bat: Vec<AtomicU64> = raw
        .chunks_exact(8)
        .map(|c| AtomicU64::new(meta::le64(c, 0)))
        .collect();
    let mut next = file_len.next_multiple_of(MIB);
    for (i, e) in bat.iter().enumerate() {
        let e = e.load(Ordering::Relaxed);
        if e & 7 != FULLY_PRESENT || (i as u64 + 1).is_multiple_of(chunk_ratio + 1) {
            continue;
        }
        let at = e >> 20 << 20;
        let end = at.saturating_add(p.block_size);
        // qemu reports the first such entry, then refuses the image.
        let bad = if at > file_len {
            Some(("start", at))
        } else {
            (end > file_len).then_some(("end", end))
        };
        if let Some((what, off)) = bad {
            tracing::error!(
                "VHDX BAT entry {i} {what} offset {off} points after end of file ({file_len}). Image has probably been truncated."
            );
            return Err(errno_open(&f, libc::EINVAL));
        }
        next = next.max(end);
    }
    Ok(Arc::new(Vhdx {
        size: p.disk_size,
        read_only,
        block: p.block_size,
        chunk_ratio,
        bat_at: regions.bat_at,
        bat,
        next: Mutex::new(next),
        headers: Mutex::new(Headers {
            current,
            list,
            renewed: false,
        }),
        f,
    }))
}

/// Write the non-current header as the current one's successor (new write GUIDs, `log_guid`),
/// synced; return the new current index.
fn write_next_header(
    f: &HostFile,
    current: usize,
    list: &mut [Option<Header>; 2],
    data_guid: Option<[u8; 16]>,
    log_guid: [u8; 16],
) -> Result<usize> {
    let cur = list[current]
        .clone()
        .ok_or_else(|| errno_open(f, libc::EINVAL))?;
    let other = 1 - current;
    let h = cur.renewed(cur.sequence + 1, random_guid(), data_guid, log_guid);
    let at = [meta::HEADER1_AT, meta::HEADER2_AT][other];
    f.write("write header", at, &h.raw, true)?;
    list[other] = Some(h);
    Ok(other)
}

impl Vhdx {
    fn entry_index(&self, b: u64) -> usize {
        (b + b / self.chunk_ratio) as usize
    }

    fn lookup(&self, b: u64) -> Block {
        let e = self.bat[self.entry_index(b)].load(Ordering::Acquire);
        match e & 7 {
            FULLY_PRESENT => Block::At(e >> 20 << 20),
            PARTIALLY_PRESENT => Block::Partial,
            _ => Block::Zero,
        }
    }

    fn partial(&self, b: u64) -> Error {
        self.f.corrupt(format!(
            "block {b} is partially present, in an image without a parent"
        ))
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

    /// Before the first write of this open: new write GUIDs in both headers.
    fn renew_headers(&self) -> Result<()> {
        let mut h = self.headers.lock();
        if h.renewed {
            return Ok(());
        }
        let data = random_guid();
        let log_guid = h.list[h.current].as_ref().map_or([0; 16], |x| x.log_guid);
        for _ in 0..2 {
            let cur = h.current;
            h.current = write_next_header(&self.f, cur, &mut h.list, Some(data), log_guid)?;
        }
        h.renewed = true;
        Ok(())
    }

    fn write_block(&self, b: u64, in_b: u64, data: &[u8], fua: bool) -> Result<()> {
        match self.lookup(b) {
            Block::At(at) => return self.f.write("write", at + in_b, data, fua),
            Block::Partial => return Err(self.partial(b)),
            Block::Zero => {}
        }
        let mut next = self.next.lock();
        match self.lookup(b) {
            Block::At(at) => {
                drop(next);
                return self.f.write("write", at + in_b, data, fua);
            }
            Block::Partial => return Err(self.partial(b)),
            Block::Zero => {}
        }
        let at = *next;
        self.f.grow_to(at + self.block)?;
        self.f.write("write", at + in_b, data, false)?;
        let entry = at | FULLY_PRESENT;
        let idx = self.entry_index(b);
        self.f.write(
            "write BAT",
            self.bat_at + idx as u64 * 8,
            &entry.to_le_bytes(),
            false,
        )?;
        self.bat[idx].store(entry, Ordering::Release);
        *next = at + self.block;
        drop(next);
        if fua {
            self.f.sync()?;
        }
        Ok(())
    }
}

impl BlockBackend for Vhdx {
    fn size(&self) -> u64 {
        self.size
    }

    fn caps(&self) -> Caps {
        Caps::image(self.read_only)
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.each(offset, buf.len() as u64, |b, in_b, n, at| {
            let out = &mut buf[at as usize..(at + n) as usize];
            match self.lookup(b) {
                Block::At(data) => self.f.read("read", data + in_b, out),
                Block::Zero => {
                    out.fill(0);
                    Ok(())
                }
                Block::Partial => Err(self.partial(b)),
            }
        })
    }

    fn write(&self, offset: u64, buf: &[u8], flags: IoFlags) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        self.renew_headers()?;
        let fua = flags.contains(IoFlags::FUA);
        self.each(offset, buf.len() as u64, |b, in_b, n, at| {
            self.write_block(b, in_b, &buf[at as usize..(at + n) as usize], fua)
        })
    }

    fn flush(&self) -> Result<()> {
        self.f.sync()
    }

    /// qemu's vhdx driver has no discard: a trim changes nothing.
    fn trim(&self, _offset: u64, _len: u64, _flags: IoFlags) -> Result<()> {
        Ok(())
    }

    /// Blocks that are not present read as zeroes already; present ones are zeroed in place.
    fn write_zeroes(&self, offset: u64, len: u64, flags: IoFlags) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        self.renew_headers()?;
        self.each(offset, len, |b, in_b, n, _| match self.lookup(b) {
            Block::Zero => Ok(()),
            Block::Partial => Err(self.partial(b)),
            Block::At(at) => self.f.write_zeroes(at + in_b, n),
        })?;
        if flags.contains(IoFlags::FUA) {
            self.f.sync()?;
        }
        Ok(())
    }

    /// Present blocks are data; the others read as zeroes. (qemu's driver reports everything
    /// as data.)
    fn block_status(&self, offset: u64, len: u64, out: &mut Extents) -> Result<()> {
        let len = len.min(1024 * self.block - offset % self.block);
        self.each(offset, len, |b, _, n, _| {
            let e = match self.lookup(b) {
                Block::At(_) => Extent::new(n, ExtentFlags::empty(), 1),
                Block::Zero => Extent::new(n, ExtentFlags::HOLE | ExtentFlags::ZERO, 0),
                Block::Partial => return Err(self.partial(b)),
            };
            out.push(e);
            Ok(())
        })
    }

    fn format_name(&self) -> &'static str {
        "vhdx"
    }

    fn close(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.f.sync()
    }
}
