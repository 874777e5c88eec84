//! qcow2 images (v2 and v3): reads, allocating writes with copy-on-write, zero/discard,
//! block status through backing chains, compressed clusters, extended L2 (subclusters) and
//! internal snapshots kept intact.
//!
//! Concurrency: one metadata mutex ([`meta::Meta`]) guards the L1 table, the L2 cache and the
//! refcounts; it is never held across data I/O. Guest clusters are striped over reader/writer
//! locks: reads and in-place writes share a stripe, while anything that changes a cluster's
//! mapping (allocation, COW, zeroing, discard) holds it exclusively, so nobody reads or writes
//! a host cluster that is being remapped or freed.
//!
//! Flush order (see [`Qcow2::flush_meta`]): data and refcount blocks, sync; refcount table
//! entries, sync; L2 tables, sync; L1 entries, sync; then queued refcount decreases are
//! applied (written by the next flush). A crash can leak clusters, never corrupt.
//!
//! Policies: refcounts are always kept eagerly, so the dirty bit is never set (lazy refcounts
//! are a permission, not a duty); a dirty image opened read-write has its refcounts rebuilt
//! (`repair.rs`). Persistent dirty bitmaps are kept as qemu keeps them (`bitmap.rs`): marked
//! in use while open read-write, tracking writes, stored on close.
//! `--cache=none` adds an O_DIRECT descriptor for aligned I/O (`file.rs`).
//! Not done yet: qemu's metadata-overlap checks against hostile L2 entries, external data files and encryption (both refused at open).

mod backend;
mod batch;
pub mod bitmap;
mod compressed;
mod file;
pub mod header;
mod l2_cache;
mod meta;
mod refcount;
mod repair;
pub mod snapshot;
mod status;
mod zero;

use crate::{BlockBackend, Error, Result};
use file::ImageFile;
use header::{Compression, Header};
use meta::{Entry, Meta, COPIED, ZERO};
use parking_lot::{Mutex, RwLock};
use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

const STRIPES: usize = 256;

/// Opens a backing file read-only: (resolved path, backing_fmt).
pub type OpenBacking<'a> = dyn Fn(&Path, Option<&str>) -> Result<Arc<dyn BlockBackend>> + 'a;
const L2_CACHE_BYTES: usize = 32 << 20;

/// Which backing file to use (qemu's `backing=` options).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum BackingChoice {
    /// The one the header names, if any.
    #[default]
    FromHeader,
    /// None at all: unallocated clusters read as zeroes.
    None,
    /// This file, with this format (None: probe), instead of the header's.
    File(PathBuf, Option<String>),
    /// The header's file, opened with this format.
    HeaderAs(String),
}

/// How a qcow2 image is opened.
#[derive(Clone, Debug, Default)]
pub struct Qcow2Options {
    pub read_only: bool,
    /// `--discard=unmap`: trim and MAY_TRIM release clusters.
    pub discard: bool,
    /// Export this internal snapshot (matched by id, then by name) instead of the active
    /// layer; requires `read_only`.
    pub load_snapshot: Option<String>,
    pub backing: BackingChoice,
    /// `--cache=none|directsync`, `-n`: data I/O with O_DIRECT.
    pub direct: bool,
}

/// The image's fixed geometry.
#[derive(Clone, Debug)]
pub struct Geo {
    pub version: u32,
    pub cluster_bits: u32,
    pub cs: u64,
    /// log2 of L2 entries per table.
    pub l2_bits: u32,
    pub extended: bool,
    /// log2 of the subcluster size (= cluster_bits without extended L2).
    pub sc_bits: u32,
    pub size: u64,
    pub compression: Compression,
}

/// What one subcluster (or the whole cluster, without extended L2) reads from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Sc {
    Unalloc,
    Zero,
    Data,
    Compressed,
}

impl Geo {
    fn state(&self, e: Entry, i: u64) -> std::result::Result<Sc, String> {
        if e.compressed() {
            return Ok(Sc::Compressed);
        }
        let host = e.host();
        if !host.is_multiple_of(self.cs) {
            return Err(format!("cluster offset {host:#x} is not cluster aligned"));
        }
        if !self.extended {
            return Ok(if self.version >= 3 && e.desc & ZERO != 0 {
                Sc::Zero
            } else if host != 0 {
                Sc::Data
            } else {
                Sc::Unalloc
            });
        }
        let alloc = e.bm >> i & 1 != 0;
        let zero = e.bm >> (32 + i) & 1 != 0;
        match (alloc, zero) {
            (true, true) => Err(format!("subcluster {i} is both allocated and zero")),
            (true, false) if host == 0 => {
                Err(format!("subcluster {i} allocated without a cluster"))
            }
            (true, false) => Ok(Sc::Data),
            (false, true) => Ok(Sc::Zero),
            (false, false) => Ok(Sc::Unalloc),
        }
    }
}

#[derive(Debug)]
pub struct Qcow2 {
    f: ImageFile,
    geo: Geo,
    header: Header,
    l1_offset: u64,
    meta: Mutex<Meta>,
    stripes: Box<[RwLock<()>]>,
    flush_lock: Mutex<()>,
    backing: Option<Arc<dyn BlockBackend>>,
    opts: Qcow2Options,
    snapshots: Vec<snapshot::Snapshot>,
    /// The last cluster inflated, by descriptor: small sequential reads of a compressed
    /// cluster inflate it once. Descriptors are never reused for other data (this engine
    /// never writes compressed clusters), so the key cannot go stale.
    last_inflated: Mutex<Option<(u64, Arc<Vec<u8>>)>>,
    /// Persistent dirty bitmaps; `tracking` says whether any enabled one needs marking.
    bitmaps: Mutex<Option<bitmap::Bitmaps>>,
    tracking: std::sync::atomic::AtomicBool,
    /// True once closing began. Writes hold it shared from their start to the marking of
    /// the bitmaps, so none can land after the bitmaps were stored as consistent.
    closing: RwLock<bool>,
}

fn open_err(path: &Path, msg: impl std::fmt::Display) -> Error {
    let _ = path;
    Error::Open(msg.to_string())
}

impl Qcow2 {
    /// Open the image; `open_backing` opens a backing file read-only given its resolved path
    /// and `backing_fmt` (the caller keeps probing and the depth limit in one place).
    pub fn open(path: &Path, opts: Qcow2Options, open_backing: &OpenBacking<'_>) -> Result<Qcow2> {
        let open_with = |flags: i32| {
            OpenOptions::new()
                .read(true)
                .write(!opts.read_only)
                .custom_flags(libc::O_CLOEXEC | flags)
                .open(path)
                .map_err(|e| {
                    let msg = e
                        .raw_os_error()
                        .map(|c| nix::errno::Errno::from_raw(c).desc().to_string())
                        .unwrap_or_else(|| e.to_string());
                    Error::Open(format!("Could not open '{}': {msg}", path.display()))
                })
        };
        let file = open_with(0)?;
        let direct = if opts.direct {
            Some(open_with(libc::O_DIRECT)?)
        } else {
            None
        };
        let f = ImageFile {
            file,
            path: path.to_path_buf(),
            direct,
        };
        let file_len = f.len()?;
        let mut head = vec![0u8; 4096.min(file_len as usize)];
        f.read("read header", 0, &mut head)?;
        let bits = header::peek_cluster_bits(&head).map_err(|m| open_err(path, m))?;
        let mut first = vec![0u8; (1u64 << bits).min(file_len) as usize];
        f.read("read header", 0, &mut first)?;
        let h = header::parse(&first, file_len).map_err(|m| open_err(path, m))?;
        if !opts.read_only && h.incompatible & header::INCOMPAT_CORRUPT != 0 {
            return Err(Error::Open(
                "qcow2: Image is corrupt; cannot be opened read/write".into(),
            ));
        }
        if !opts.read_only && h.incompatible & header::INCOMPAT_DIRTY != 0 {
            // Unflushed lazy refcounts: rebuild them as qemu does, then open again. Bitmaps
            // are dropped first so their clusters may be counted as free.
            clear_autoclear(&f, &h)?;
            let (snaps, len) =
                snapshot::read_table(&f, h.snapshots_offset, h.nb_snapshots, 1 << h.cluster_bits)?;
            repair::rebuild(&f, &h, &snaps, len)?;
            drop(f);
            return Self::open(path, opts, open_backing);
        }
        let extended = h.extended_l2();
        let cb = h.cluster_bits;
        let geo = Geo {
            version: h.version,
            cluster_bits: cb,
            cs: 1 << cb,
            l2_bits: cb - if extended { 4 } else { 3 },
            extended,
            sc_bits: if extended { cb - 5 } else { cb },
            // qemu counts whole sectors.
            size: h.size & !511,
            compression: h.compression,
        };
        let mut raw = vec![0u8; h.l1_size as usize * 8];
        f.read("read L1 table", h.l1_table_offset, &mut raw)?;
        let l1 = l2_cache::decode(&raw);
        let rc = refcount::Refcounts::new(
            &f,
            cb,
            h.refcount_order,
            h.refcount_table_offset,
            u64::from(h.refcount_table_clusters),
            file_len,
        )?;
        let (snapshots, _) = snapshot::read_table(&f, h.snapshots_offset, h.nb_snapshots, geo.cs)?;
        let mut geo = geo;
        let mut l1 = l1;
        if let Some(want) = &opts.load_snapshot {
            if !opts.read_only {
                return Err(Error::Open(
                    "Loading a snapshot requires a read-only image".into(),
                ));
            }
            let s = snapshots
                .iter()
                .find(|s| &s.id == want)
                .or_else(|| snapshots.iter().find(|s| &s.name == want))
                .ok_or_else(|| Error::LoadSnapshot("Can't find snapshot".into()))?;
            let size = s.disk_size.unwrap_or(h.size);
            let needed = size.div_ceil(1u64 << (geo.cluster_bits + geo.l2_bits));
            if u64::from(s.l1_size) < needed || size > i64::MAX as u64 {
                return Err(f.corrupt(format!("snapshot '{want}': L1 table too small")));
            }
            let mut raw = vec![0u8; s.l1_size as usize * 8];
            f.read("read snapshot L1 table", s.l1_table_offset, &mut raw)?;
            l1 = l2_cache::decode(&raw);
            geo.size = size & !511;
        }
        let backing = match (&opts.backing, &h.backing_file) {
            (BackingChoice::None, _) => None,
            (BackingChoice::File(p, fmt), _) => Some(
                open_backing(p, fmt.as_deref())
                    .map_err(|e| Error::Open(format!("Could not open backing file: {e}")))?,
            ),
            (BackingChoice::HeaderAs(fmt), Some(name)) if !name.is_empty() => {
                let p = resolve_backing(path, name);
                Some(
                    open_backing(&p, Some(fmt))
                        .map_err(|e| Error::Open(format!("Could not open backing file: {e}")))?,
                )
            }
            (BackingChoice::FromHeader, Some(name)) if !name.is_empty() => {
                let p = resolve_backing(path, name);
                let b = open_backing(&p, h.backing_format.as_deref())
                    .map_err(|e| Error::Open(format!("Could not open backing file: {e}")))?;
                Some(b)
            }
            _ => None,
        };
        let bitmaps = open_bitmaps(&f, &h, &geo, &opts, file_len)?;
        let tracking = bitmaps
            .as_ref()
            .is_some_and(|b| !opts.read_only && b.list.iter().any(|x| x.enabled()));
        let table_bytes = geo.cs as usize;
        let meta = Meta {
            l1,
            l1_dirty: Default::default(),
            l2: l2_cache::L2Cache::new(L2_CACHE_BYTES, table_bytes),
            rc,
            version: 0,
        };
        Ok(Qcow2 {
            f,
            geo,
            l1_offset: h.l1_table_offset,
            header: h,
            meta: Mutex::new(meta),
            stripes: (0..STRIPES).map(|_| RwLock::new(())).collect(),
            flush_lock: Mutex::new(()),
            backing,
            opts,
            snapshots,
            last_inflated: Mutex::new(None),
            bitmaps: Mutex::new(bitmaps),
            tracking: std::sync::atomic::AtomicBool::new(tracking),
            closing: RwLock::new(false),
        })
    }

    pub fn path(&self) -> &Path {
        &self.f.path
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    pub fn snapshots(&self) -> &[snapshot::Snapshot] {
        &self.snapshots
    }

    pub fn backing(&self) -> Option<&Arc<dyn BlockBackend>> {
        self.backing.as_ref()
    }

    fn stripe(&self, g: u64) -> &RwLock<()> {
        &self.stripes[(g as usize) % STRIPES]
    }

    fn corrupt(&self, msg: String) -> Error {
        self.f.corrupt(msg)
    }

    fn entry(&self, g: u64) -> Result<Entry> {
        Ok(self
            .meta
            .lock()
            .entry(&self.f, &self.geo, g)?
            .unwrap_or_default())
    }

    fn state(&self, e: Entry, i: u64) -> Result<Sc> {
        self.geo.state(e, i).map_err(|m| self.corrupt(m))
    }

    /// Read from the backing file; past its end (or without one) reads zeroes.
    fn read_backing(&self, pos: u64, buf: &mut [u8]) -> Result<()> {
        let Some(b) = &self.backing else {
            buf.fill(0);
            return Ok(());
        };
        let bs = b.size();
        let n = bs.saturating_sub(pos).min(buf.len() as u64) as usize;
        if n > 0 {
            b.read(pos, &mut buf[..n])?;
        }
        buf[n..].fill(0);
        Ok(())
    }

    fn backing_is_zero(&self, pos: u64) -> bool {
        self.backing.as_ref().is_none_or(|b| pos >= b.size())
    }

    fn read_compressed(&self, e: Entry) -> Result<Arc<Vec<u8>>> {
        if let Some((d, data)) = &*self.last_inflated.lock() {
            if *d == e.desc {
                return Ok(data.clone());
            }
        }
        let (off, len) = compressed::locate(e.desc, self.geo.cluster_bits);
        let mut input = vec![0u8; len as usize];
        self.f.read("read compressed cluster", off, &mut input)?;
        let mut out = vec![0u8; self.geo.cs as usize];
        compressed::decompress(self.geo.compression, &input, &mut out)
            .map_err(|m| self.corrupt(format!("compressed cluster at {off:#x}: {m}")))?;
        let out = Arc::new(out);
        *self.last_inflated.lock() = Some((e.desc, out.clone()));
        Ok(out)
    }

    /// Fill `buf` with what guest cluster `g` holds at `in_off`, given its entry.
    fn read_mapped(&self, g: u64, e: Entry, in_off: u64, buf: &mut [u8]) -> Result<()> {
        let base = g << self.geo.cluster_bits;
        if e.compressed() {
            let data = self.read_compressed(e)?;
            buf.copy_from_slice(&data[in_off as usize..in_off as usize + buf.len()]);
            return Ok(());
        }
        let end = in_off + buf.len() as u64;
        let sc = self.geo.sc_bits;
        let mut pos = in_off;
        while pos < end {
            let st = self.state(e, pos >> sc)?;
            let mut run_end = (((pos >> sc) + 1) << sc).min(end);
            while run_end < end && self.state(e, run_end >> sc)? == st {
                run_end = (((run_end >> sc) + 1) << sc).min(end);
            }
            let piece = &mut buf[(pos - in_off) as usize..(run_end - in_off) as usize];
            match st {
                Sc::Data => self.f.read("read", e.host() + pos, piece)?,
                Sc::Zero => piece.fill(0),
                Sc::Unalloc => self.read_backing(base + pos, piece)?,
                Sc::Compressed => unreachable_state()?,
            }
            pos = run_end;
        }
        Ok(())
    }

    fn read_piece(&self, g: u64, in_off: u64, buf: &mut [u8]) -> Result<()> {
        let _s = self.stripe(g).read();
        let e = self.entry(g)?;
        self.read_mapped(g, e, in_off, buf)
    }

    /// Split `[offset, offset + len)` at cluster boundaries: (cluster, offset in it, length).
    fn pieces(&self, offset: u64, len: u64) -> impl Iterator<Item = (u64, u64, u64)> {
        let cb = self.geo.cluster_bits;
        let cs = self.geo.cs;
        let end = offset + len;
        let mut pos = offset;
        std::iter::from_fn(move || {
            if pos >= end {
                return None;
            }
            let g = pos >> cb;
            let in_off = pos & (cs - 1);
            let n = (cs - in_off).min(end - pos);
            pos += n;
            Some((g, in_off, n))
        })
    }

    fn touched_mask(&self, in_off: u64, n: u64) -> u64 {
        if !self.geo.extended {
            return 0;
        }
        let first = in_off >> self.geo.sc_bits;
        let last = (in_off + n - 1) >> self.geo.sc_bits;
        let bits = last - first + 1;
        let m = if bits >= 64 {
            u64::MAX
        } else {
            (1u64 << bits) - 1
        };
        (m << first) & 0xffff_ffff
    }

    fn in_place(&self, e: Entry, touched: u64) -> bool {
        if !e.owned_host() {
            return false;
        }
        if self.geo.extended {
            e.bm & touched == touched
        } else {
            self.geo.version < 3 || e.desc & ZERO == 0
        }
    }

    /// Does the whole cluster read as zeroes (ignoring extended-L2 subclusters)?
    fn cluster_reads_zero(&self, g: u64, e: Entry) -> Result<bool> {
        let base = g << self.geo.cluster_bits;
        let n = if self.geo.extended { 32 } else { 1 };
        for i in 0..n {
            match self.state(e, i)? {
                Sc::Zero => {}
                Sc::Unalloc if self.backing_is_zero(base) => {}
                _ => return Ok(false),
            }
        }
        Ok(true)
    }

    fn write_piece(&self, g: u64, in_off: u64, data: &[u8]) -> Result<()> {
        let n = data.len() as u64;
        let touched = self.touched_mask(in_off, n);
        {
            let _s = self.stripe(g).read();
            let e = self.entry(g)?;
            if self.in_place(e, touched) {
                return self.f.write("write", e.host() + in_off, data);
            }
        }
        let _s = self.stripe(g).write();
        let mut m = self.meta.lock();
        let old = m.entry(&self.f, &self.geo, g)?.unwrap_or_default();
        if self.in_place(old, touched) {
            drop(m);
            return self.f.write("write", old.host() + in_off, data);
        }
        // An owned cluster (zero with preallocation, or partly allocated subclusters) is
        // reused; anything shared, compressed or absent gets a new cluster.
        let reuse = old.owned_host();
        let (target, fresh) = if reuse {
            (old.host(), false)
        } else {
            m.l2_for_write(&self.f, &self.geo, (g >> self.geo.l2_bits) as usize)?;
            let v = m.bump();
            m.rc.alloc(&self.f, v)?
        };
        drop(m);
        let r = self.fill_cluster(g, old, target, fresh, reuse, in_off, data);
        let mut m = self.meta.lock();
        let new = match r {
            Ok(e) => e,
            Err(e) => {
                if !reuse {
                    // The cluster is unreferenced: release it (now, nothing points to it).
                    let _ = m.rc.change(&self.f, target >> self.geo.cluster_bits, -1, 0);
                }
                return Err(e);
            }
        };
        m.set_entry(&self.f, &self.geo, g, new)?;
        if !reuse {
            m.queue_free(&self.geo, old);
        }
        let over = m.l2.over_budget();
        drop(m);
        drop(_s);
        if over {
            self.flush_meta()?;
        }
        Ok(())
    }

    /// Write `data` at `in_off` of guest cluster `g` into host cluster `target`, copying what
    /// the old mapping holds around it. Returns the new entry.
    #[allow(clippy::too_many_arguments)]
    fn fill_cluster(
        &self,
        g: u64,
        old: Entry,
        target: u64,
        fresh: bool,
        reuse: bool,
        in_off: u64,
        data: &[u8],
    ) -> Result<Entry> {
        let cs = self.geo.cs;
        let n = data.len() as u64;
        if !self.geo.extended {
            if n == cs {
                self.f.write("write", target, data)?;
            } else {
                let old_zero = self.cluster_reads_zero(g, old)?;
                if fresh && old_zero {
                    self.f.write("write", target + in_off, data)?;
                } else {
                    let mut buf = vec![0u8; cs as usize];
                    if !old_zero {
                        self.read_mapped(g, old, 0, &mut buf)?;
                    }
                    buf[in_off as usize..(in_off + n) as usize].copy_from_slice(data);
                    self.f.write("write", target, &buf)?;
                }
            }
            return Ok(Entry {
                desc: target | COPIED,
                bm: 0,
            });
        }
        let touched = self.touched_mask(in_off, n);
        let (alloc, zero) = if old.compressed() {
            (0xffff_ffff, 0)
        } else {
            (old.bm & 0xffff_ffff, old.bm >> 32)
        };
        if !reuse && (old.compressed() || old.host() != 0) {
            // The old host cluster is shared or compressed: move everything it holds.
            let mut buf = vec![0u8; cs as usize];
            self.read_mapped(g, old, 0, &mut buf)?;
            buf[in_off as usize..(in_off + n) as usize].copy_from_slice(data);
            self.f.write("write", target, &buf)?;
        } else {
            let sc = self.geo.sc_bits;
            let span_start = (in_off >> sc) << sc;
            let span_end = (((in_off + n - 1) >> sc) + 1) << sc;
            let mut buf = vec![0u8; (span_end - span_start) as usize];
            let scs = 1u64 << sc;
            let end = in_off + n;
            let head_partial = in_off > span_start;
            let tail_partial = end < span_end;
            let last_at = span_end - scs;
            // Partial subclusters keep what they read as (backing, zeroes or old data).
            if head_partial {
                self.read_mapped(g, old, span_start, &mut buf[..scs as usize])?;
            }
            if tail_partial && !(head_partial && last_at == span_start) {
                self.read_mapped(g, old, last_at, &mut buf[(last_at - span_start) as usize..])?;
            }
            buf[(in_off - span_start) as usize..(end - span_start) as usize].copy_from_slice(data);
            self.f.write("write", target + span_start, &buf)?;
        }
        Ok(Entry {
            desc: target | COPIED,
            bm: ((zero & !touched) << 32) | alloc | touched,
        })
    }
}

/// Load the bitmaps. Read-write, mark the ones we now own IN_USE on disk and clear the
/// autoclear bits we do not implement (bit 1, raw external data, needs a data file we
/// refuse anyway); when the bitmaps cannot be understood, clear every bit, so qemu treats
/// them as inconsistent instead of trusting stale ones.
fn open_bitmaps(
    f: &ImageFile,
    h: &Header,
    geo: &Geo,
    opts: &Qcow2Options,
    file_len: u64,
) -> Result<Option<bitmap::Bitmaps>> {
    let consistent = h.autoclear & header::AUTOCLEAR_BITMAPS != 0;
    let loaded = match h.bitmaps {
        Some(ext) if ext.nb_bitmaps > 0 => {
            match bitmap::Bitmaps::load(f, ext, geo.cluster_bits, geo.size, file_len, consistent) {
                Ok(b) => Some(b),
                Err(e) => {
                    tracing::warn!("{}: ignoring its dirty bitmaps: {e}", f.path.display());
                    None
                }
            }
        }
        _ => None,
    };
    if opts.read_only || opts.load_snapshot.is_some() {
        return Ok(loaded);
    }
    let Some(b) = loaded else {
        clear_autoclear(f, h)?;
        return Ok(None);
    };
    let keep = h.autoclear & header::AUTOCLEAR_BITMAPS;
    if h.autoclear != keep {
        f.write("write header", header::OFF_AUTOCLEAR, &keep.to_be_bytes())?;
    }
    let (_, at) = b.encode_directory();
    let mut any = false;
    for (e, pos) in b.list.iter().zip(at) {
        if e.enabled() || (e.problem.is_none() && e.entry.flags & bitmap::IN_USE == 0) {
            let flags = e.entry.flags | bitmap::IN_USE;
            f.write(
                "mark bitmap in use",
                b.ext.dir_offset + pos as u64 + 12,
                &flags.to_be_bytes(),
            )?;
            any = true;
        }
    }
    if any || h.autoclear != keep {
        f.sync()?;
    }
    Ok(Some(b))
}

/// As the spec asks of software that does not know an autoclear feature, clear the bits
/// before any write: qemu then treats the bitmaps as inconsistent (and their clusters as
/// leaked) instead of trusting stale ones.
fn clear_autoclear(f: &ImageFile, h: &Header) -> Result<()> {
    if h.autoclear != 0 {
        f.write("write header", header::OFF_AUTOCLEAR, &0u64.to_be_bytes())?;
        f.sync()?;
    }
    Ok(())
}

fn unreachable_state() -> Result<()> {
    Err(Error::Invalid("compressed state inside a cluster".into()))
}

/// A backing name is relative to the directory of the image that names it.
pub fn resolve_backing(image: &Path, name: &str) -> PathBuf {
    let p = Path::new(name);
    if p.is_absolute() {
        return p.to_path_buf();
    }
    match image.parent() {
        Some(dir) => dir.join(p),
        None => p.to_path_buf(),
    }
}
