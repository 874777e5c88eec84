//! A hosted sparse extent: grain directory → grain tables → grains, optionally compressed
//! (stream-optimized). See the module doc of `vmdk/mod.rs` for the write path's rules.

use super::header::{self, Header};
use crate::file::HostFile;
use crate::{Error, Result};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::io::Read;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

/// Grain tables kept in memory at once (2 KiB each for qemu's and VMware's 512 entries).
const MAX_TABLES: usize = 4096;
/// qemu's limits: a grain of more than 1 GiB, a directory of more than 32 Mi entries.
const MAX_GRAIN_SECTORS: u64 = 0x20_0000;
const MAX_GD_ENTRIES: u64 = 32 * 1024 * 1024;
/// A grain table entry that says "reads as zeroes" (with the zeroed-grain flag).
const GTE_ZEROED: u32 = 1;
/// Grain and table offsets are 32-bit sector numbers.
const MAX_SECTOR: u64 = 1 << 32;
/// Grains up to this size are built whole in memory for their first write; larger ones
/// (qemu allows 1 GiB) are filled piece by piece.
const COW_CHUNK: u64 = 1 << 20;
/// A compressed grain is inflated whole: larger ones are refused at open.
const MAX_COMPRESSED_GRAIN: u64 = 16 << 20;
/// A compressed grain's marker: its disk sector (u64) and compressed length (u32).
const MARKER_LEN: usize = 12;

/// Where a grain's bytes are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gte {
    /// Nowhere in this extent: the backing file's, or zeroes.
    Unalloc,
    /// Zeroes, whatever the backing file holds.
    Zeroed,
    /// At this byte offset of the extent file.
    At(u64),
}

#[derive(Debug)]
pub struct Sparse {
    pub f: Arc<HostFile>,
    /// The extent's size in bytes (the header's capacity).
    pub bytes: u64,
    pub grain: u64,
    pub compressed: bool,
    has_marker: bool,
    zero_grain: bool,
    /// A stream-optimized image whose directory lives in its footer: appending would move
    /// the footer away from the end, so it is only read.
    gd_at_end: bool,
    gtes: u64,
    gd_at: u64,
    gd: Vec<AtomicU32>,
    /// The redundant directory and its tables, kept in step with the primary ones.
    rgd: Option<(u64, Vec<AtomicU32>)>,
    /// Bytes before the first grain: a grain there would overwrite metadata.
    overhead: u64,
    tables: Mutex<HashMap<u64, Box<[u32]>>>,
    /// The next free byte of the file; held across an allocation, data write to link.
    alloc: Mutex<u64>,
    /// The last compressed grain inflated (sequential small reads inflate it once).
    inflated: Mutex<Option<(u64, Arc<Vec<u8>>)>>,
}

fn open_err(msg: impl Into<String>) -> Error {
    Error::Open(msg.into())
}

impl Sparse {
    /// Open the sparse extent in `f` (qemu's `vmdk_open_vmdk4` checks, its messages).
    pub fn open(f: Arc<HostFile>, h: Header, writable: bool) -> Result<Sparse> {
        let file_len = f.size()?;
        let h = if h.gd_offset == header::GD_AT_END {
            Header::from_footer(&f, file_len)?
        } else {
            h
        };
        let compressed = h.compressed();
        if h.version > 3 {
            return Err(open_err(format!("Unsupported VMDK version {}", h.version)));
        }
        if h.version == 3 && writable && !compressed {
            return Err(open_err("VMDK version 3 must be read only"));
        }
        if h.num_gtes_per_gt > 512 {
            return Err(open_err("L2 table size too big"));
        }
        let gtes = u64::from(h.num_gtes_per_gt);
        let span = gtes.saturating_mul(h.granularity);
        if span == 0 {
            return Err(open_err("L1 entry size is invalid"));
        }
        let gd_len = h.capacity.div_ceil(span);
        if file_len / 512 < h.grain_offset {
            return Err(open_err(format!(
                "File truncated, expecting at least {} bytes",
                h.grain_offset.saturating_mul(512)
            )));
        }
        if h.granularity > MAX_GRAIN_SECTORS {
            return Err(open_err("Invalid granularity, image may be corrupt"));
        }
        if gd_len > MAX_GD_ENTRIES {
            return Err(open_err("L1 size too big"));
        }
        let bytes = h
            .capacity
            .checked_mul(512)
            .filter(|b| *b <= i64::MAX as u64)
            .ok_or_else(|| open_err("Image size too big"))?;
        let gd_at = h.gd_offset.saturating_mul(512);
        let rgd_at = h.rgd_offset.saturating_mul(512);
        let has_rgd = h.flags & header::FLAG_RGD != 0;
        // A directory past the file's end is hostile: refuse it before sizing memory by it.
        for at in [Some(gd_at), has_rgd.then_some(rgd_at)]
            .into_iter()
            .flatten()
        {
            if at.saturating_add(gd_len * 4) > file_len {
                return Err(f.corrupt(format!(
                    "grain directory at offset {at:#x} ({gd_len} entries) lies past the end of the file"
                )));
            }
        }
        let gd = read_dir(&f, gd_at, gd_len)?;
        let rgd = if has_rgd {
            Some((rgd_at, read_dir(&f, rgd_at, gd_len)?))
        } else {
            None
        };
        let grain = h.granularity * 512;
        if compressed && grain > MAX_COMPRESSED_GRAIN {
            return Err(open_err(format!(
                "Compressed grains of {grain} bytes are too large (at most {MAX_COMPRESSED_GRAIN})"
            )));
        }
        Ok(Sparse {
            bytes,
            grain,
            compressed,
            has_marker: h.flags & header::FLAG_MARKER != 0,
            zero_grain: h.flags & header::FLAG_ZERO_GRAIN != 0,
            gd_at_end: h.gd_offset == header::GD_AT_END,
            gtes,
            gd_at,
            gd,
            rgd,
            overhead: h.grain_offset.saturating_mul(512),
            tables: Mutex::new(HashMap::new()),
            alloc: Mutex::new(file_len.next_multiple_of(grain)),
            inflated: Mutex::new(None),
            f,
        })
    }

    fn table_bytes(&self) -> u64 {
        self.gtes * 4
    }

    /// Where grain `g` (its index in the extent) is.
    pub fn lookup(&self, g: u64) -> Result<Gte> {
        let (d, i) = ((g / self.gtes) as usize, (g % self.gtes) as usize);
        let Some(t) = self.gd.get(d).map(|a| a.load(Ordering::Acquire)) else {
            return Err(self
                .f
                .corrupt(format!("grain {g} is past the grain directory")));
        };
        if t == 0 {
            return Ok(Gte::Unalloc);
        }
        let mut tables = self.tables.lock();
        let e = self.table(&mut tables, d as u64, t)?[i];
        Ok(match e {
            0 => Gte::Unalloc,
            GTE_ZEROED if self.zero_grain => Gte::Zeroed,
            s => Gte::At(u64::from(s) * 512),
        })
    }

    /// Grain table `d` (at sector `t`), loaded under the table lock: a table is read from
    /// the file and changed in the file only while it is held, so no stale copy is cached.
    fn table<'a>(
        &self,
        tables: &'a mut HashMap<u64, Box<[u32]>>,
        d: u64,
        t: u32,
    ) -> Result<&'a mut Box<[u32]>> {
        if !tables.contains_key(&d) {
            if tables.len() >= MAX_TABLES {
                if let Some(k) = tables.keys().next().copied() {
                    tables.remove(&k);
                }
            }
            let mut b = vec![0u8; self.table_bytes() as usize];
            self.f
                .read("read grain table", u64::from(t) * 512, &mut b)?;
            let entries = b
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]));
            tables.insert(d, entries.collect());
        }
        tables
            .get_mut(&d)
            .ok_or_else(|| self.f.corrupt("grain table vanished".into()))
    }

    /// Read `buf` from the allocated grain at `at`, `in_off` bytes into it.
    pub fn read_grain(&self, at: u64, in_off: u64, buf: &mut [u8]) -> Result<()> {
        if !self.compressed {
            return self.f.read("read", at + in_off, buf);
        }
        let data = self.inflate(at)?;
        let end = in_off as usize + buf.len();
        let src = data.get(in_off as usize..end).ok_or_else(|| {
            Error::Invalid(format!(
                "compressed grain at {at:#x} holds {} bytes",
                data.len()
            ))
        })?;
        buf.copy_from_slice(src);
        Ok(())
    }

    fn inflate(&self, at: u64) -> Result<Arc<Vec<u8>>> {
        if let Some((a, d)) = self.inflated.lock().as_ref() {
            if *a == at {
                return Ok(d.clone());
            }
        }
        let mut raw = vec![0u8; 2 * self.grain as usize];
        self.f.read("read compressed grain", at, &mut raw)?;
        let data = if self.has_marker {
            let len = u32::from_le_bytes([raw[8], raw[9], raw[10], raw[11]]) as usize;
            raw.get(MARKER_LEN..MARKER_LEN + len).filter(|_| len > 0)
        } else {
            Some(&raw[..])
        };
        let bad = || {
            self.f
                .corrupt(format!("bad compressed grain at offset {at:#x}"))
        };
        let data = data.ok_or_else(bad)?;
        let mut out = Vec::with_capacity(self.grain as usize);
        flate2::read::ZlibDecoder::new(data)
            .take(self.grain + 1)
            .read_to_end(&mut out)
            .map_err(|_| bad())?;
        if out.len() as u64 > self.grain {
            return Err(bad());
        }
        let out = Arc::new(out);
        *self.inflated.lock() = Some((at, out.clone()));
        Ok(out)
    }

    /// Write `data` at `pos` of the extent, inside one grain (`disk_pos`: the same byte of
    /// the disk, for a compressed grain's marker). `cow` fills a new grain's other bytes
    /// (the backing file's, or zeroes).
    pub fn write(
        &self,
        pos: u64,
        disk_pos: u64,
        data: &[u8],
        fua: bool,
        cow: &dyn Fn(u64, &mut [u8]) -> Result<()>,
    ) -> Result<()> {
        let g = pos / self.grain;
        let in_off = pos % self.grain;
        if let Gte::At(at) = self.lookup(g)? {
            return self.overwrite(at, in_off, data, fua);
        }
        let mut next = self.alloc.lock();
        let gte = self.lookup(g)?;
        if let Gte::At(at) = gte {
            drop(next);
            return self.overwrite(at, in_off, data, fua);
        }
        if self.compressed {
            return self.write_compressed(&mut next, g, pos, disk_pos, data, fua);
        }
        self.ensure_table(&mut next, g)?;
        let at = self.take(&mut next, self.grain)?;
        let start = g * self.grain;
        let end = in_off + data.len() as u64;
        if self.grain <= COW_CHUNK {
            // One write of the whole grain.
            let mut whole = vec![0u8; self.grain as usize];
            if gte == Gte::Unalloc && data.len() as u64 != self.grain {
                cow(start, &mut whole)?;
            }
            whole[in_off as usize..end as usize].copy_from_slice(data);
            self.f.write("write", at, &whole, false)?;
        } else {
            // A huge grain: its other bytes in bounded pieces, then the new ones.
            for (a, b) in [(0, in_off), (end, self.grain)] {
                let mut pos = a;
                while pos < b {
                    let mut chunk = vec![0u8; (b - pos).min(COW_CHUNK) as usize];
                    if gte == Gte::Unalloc {
                        cow(start + pos, &mut chunk)?;
                    }
                    self.f.write("write", at + pos, &chunk, false)?;
                    pos += chunk.len() as u64;
                }
            }
            self.f.write("write", at + in_off, data, false)?;
        }
        self.link(g, (at / 512) as u32)?;
        if fua {
            self.f.sync()?;
        }
        Ok(())
    }

    fn overwrite(&self, at: u64, in_off: u64, data: &[u8], fua: bool) -> Result<()> {
        if self.compressed {
            // qemu's refusal: a compressed grain cannot be rewritten in place.
            tracing::error!("Could not write to allocated cluster for streamOptimized");
            return Err(Error::io(
                "write",
                self.f.path(),
                at,
                data.len() as u64,
                std::io::Error::from_raw_os_error(libc::EIO),
            ));
        }
        if at < self.overhead {
            return Err(self.f.corrupt(format!(
                "grain at offset {at:#x} lies in the metadata (before {:#x})",
                self.overhead
            )));
        }
        self.f.write("write", at + in_off, data, fua)
    }

    /// A whole grain (or the extent's last, shorter one) compressed behind its marker and
    /// appended, as qemu writes a stream-optimized image.
    fn write_compressed(
        &self,
        next: &mut u64,
        g: u64,
        pos: u64,
        disk_pos: u64,
        data: &[u8],
        fua: bool,
    ) -> Result<()> {
        let whole = pos.is_multiple_of(self.grain)
            && (data.len() as u64 == self.grain || pos + data.len() as u64 == self.bytes);
        if !whole || !self.has_marker {
            return Err(Error::Invalid(
                "a compressed VMDK is written in whole grains".into(),
            ));
        }
        if self.gd_at_end {
            return Err(Error::NotSupported(
                "writing a stream-optimized VMDK whose grain directory is in its footer",
            ));
        }
        let mut enc = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        std::io::Write::write_all(&mut enc, data)
            .and_then(|()| enc.try_finish())
            .map_err(|e| Error::io("compress", self.f.path(), pos, data.len() as u64, e))?;
        let packed = enc.get_ref();
        let mut rec = Vec::with_capacity(MARKER_LEN + packed.len());
        rec.extend_from_slice(&(disk_pos / 512).to_le_bytes());
        rec.extend_from_slice(&(packed.len() as u32).to_le_bytes());
        rec.extend_from_slice(packed);
        self.ensure_table(next, g)?;
        let at = self.take(next, (rec.len() as u64).next_multiple_of(512))?;
        self.f.write("write compressed grain", at, &rec, false)?;
        self.link(g, (at / 512) as u32)?;
        if fua {
            self.f.sync()?;
        }
        Ok(())
    }

    /// Hand out `len` bytes at the end of the file.
    fn take(&self, next: &mut u64, len: u64) -> Result<u64> {
        let at = *next;
        if (at + len) / 512 > MAX_SECTOR {
            return Err(Error::NoSpace(format!(
                "'{}' has reached the largest size a VMDK extent can address",
                self.f.path().display()
            )));
        }
        *next = at + len;
        Ok(at)
    }

    /// Point grain `g` at `sector` in its table and the redundant one. Written while the
    /// table lock is held, so a concurrent load sees either the old file and is updated
    /// here, or the new file.
    pub fn link(&self, g: u64, sector: u32) -> Result<()> {
        let (d, i) = (g / self.gtes, g % self.gtes);
        let mut tables = self.tables.lock();
        let t = self.gd[d as usize].load(Ordering::Acquire);
        let at = u64::from(t) * 512 + i * 4;
        self.f
            .write("write grain table", at, &sector.to_le_bytes(), false)?;
        if let Some((_, rgd)) = &self.rgd {
            let rt = rgd[d as usize].load(Ordering::Acquire);
            if rt != 0 {
                let at = u64::from(rt) * 512 + i * 4;
                self.f.write(
                    "write redundant grain table",
                    at,
                    &sector.to_le_bytes(),
                    false,
                )?;
            }
        }
        self.table(&mut tables, d, t)?[i as usize] = sector;
        Ok(())
    }

    /// Give grain `g` a grain table if its directory entry has none (stream-optimized
    /// images only have tables where they hold data): a zeroed table written, then the
    /// directory entry, in both directories.
    fn ensure_table(&self, next: &mut u64, g: u64) -> Result<()> {
        let d = g / self.gtes;
        if self.gd[d as usize].load(Ordering::Acquire) != 0 {
            return Ok(());
        }
        let step = if self.compressed {
            self.table_bytes().next_multiple_of(512)
        } else {
            self.table_bytes().next_multiple_of(self.grain)
        };
        let zero = vec![0u8; self.table_bytes() as usize];
        let mut place = |dir_at: u64, dir: &[AtomicU32]| -> Result<()> {
            let at = self.take(next, step)?;
            self.f.write("write grain table", at, &zero, false)?;
            let sector = (at / 512) as u32;
            self.f.write(
                "write grain directory",
                dir_at + d * 4,
                &sector.to_le_bytes(),
                false,
            )?;
            dir[d as usize].store(sector, Ordering::Release);
            Ok(())
        };
        if let Some((rat, rgd)) = &self.rgd {
            place(*rat, rgd)?;
        }
        place(self.gd_at, &self.gd)?;
        self.tables.lock().remove(&d);
        Ok(())
    }

    /// Make whole grain `g` read as zeroes without data (the zeroed-grain entry), or report
    /// that it cannot.
    pub fn zero_grain(&self, g: u64) -> Result<bool> {
        if !self.zero_grain || self.compressed {
            return Ok(false);
        }
        let mut next = self.alloc.lock();
        self.ensure_table(&mut next, g)?;
        self.link(g, GTE_ZEROED)?;
        Ok(true)
    }
}

fn read_dir(f: &HostFile, at: u64, n: u64) -> Result<Vec<AtomicU32>> {
    let mut b = vec![0u8; (n * 4) as usize];
    f.read("read grain directory", at, &mut b)?;
    Ok(b.chunks_exact(4)
        .map(|c| AtomicU32::new(u32::from_le_bytes([c[0], c[1], c[2], c[3]])))
        .collect())
}
