//! QEMU Enhanced Disk images (QED), read and written as qemu's `qed` driver does: a header,
//! a fixed L1 table, L2 tables allocated on demand, clusters of 4 KiB to 64 MiB, a backing
//! file (probed, or raw when the header says so), zero clusters (entry 1).
//!
//! # The write path's rules
//!
//! - A write to an allocated cluster goes to its place in the file, without a lock.
//!   Clusters never move and are never freed (QED has no discard), so a cluster found
//!   allocated stays so.
//! - A write to unallocated or zero clusters takes the allocation lock and looks again; a
//!   run of such clusters in one L2 table is given new clusters together, at the file's
//!   end (the allocation point starts at the file's length rounded *up* to a cluster, so
//!   new space never holds a crashed allocation's bytes). The run's data is written, then
//!   its other bytes: the backing file's where there is one, else nothing (the file is
//!   extended over them: they read as zeroes). Then the clusters are linked: the L2
//!   entries are written, then the in-memory table changed, under the table lock (a table
//!   is loaded and changed only while it is held, so no stale copy is ever cached).
//! - Where the L1 entry is empty, a new L2 table goes after the data, written whole and
//!   synced before the L1 entry names it (qemu's order).
//! - qemu's crash protocol, kept so qemu trusts what qnbd leaves behind: without a backing
//!   file a link may reach the disk before its data and point past the file's end, so the
//!   header's NEED_CHECK flag is set and synced before the first such link; the next
//!   read-write open (qemu's or qnbd's) then checks the image and clears invalid entries.
//!   With a backing file the data is synced before its link instead (a lost cluster would
//!   hide the backing file's bytes), and the flag is not used. The flag is cleared (after a
//!   sync) on close, and at a FLUSH once no cluster was allocated for 5 s (qemu's timer).
//! - FLUSH syncs the file; a FUA write syncs after its links.

mod check;
mod header;

use crate::file::HostFile;
use crate::format::{backing_option, BackingChoice, Driver, ImageOptions, OpenBacking};
use crate::{backing, BlockBackend, Caps, Error, Extent, ExtentFlags, Extents, IoFlags, Result};
use header::Header;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub static DRIVER: Driver = Driver {
    name: "qed",
    probe: header::probe,
    open,
    option: |key, v, opts| backing_option(key, v, opts),
    has_metadata: true,
};

/// L2 tables kept in memory at once, in bytes (256 KiB each with qemu's defaults).
const CACHE_BYTES: u64 = 64 << 20;
/// An L2 entry that says "reads as zeroes" whatever the backing file holds.
const ZERO_ENTRY: u64 = 1;
/// qemu's `QED_NEED_CHECK_TIMEOUT`: allocation idle this long before the flag is cleared.
const NEED_CHECK_IDLE: Duration = Duration::from_secs(5);
/// qemu's limit on a backing file name (`sizeof(bs->backing_file)`).
const MAX_BACKING_NAME: u32 = 4096;
/// The other bytes of a new cluster are copied from the backing file in pieces this large.
const COW_CHUNK: u64 = 1 << 20;

/// Where a cluster's bytes are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Entry {
    /// Nowhere in this image: the backing file's, or zeroes.
    Unalloc,
    /// Zeroes, whatever the backing file holds.
    Zero,
    /// At this byte offset of the file.
    At(u64),
}

#[derive(Debug)]
struct Alloc {
    /// The next free byte of the file (cluster-aligned).
    next: u64,
    /// The header's features as they are on disk.
    features: u64,
    /// When a cluster was last allocated.
    last: Option<Instant>,
}

#[derive(Debug)]
pub struct Qed {
    f: HostFile,
    h: Header,
    read_only: bool,
    cluster: u64,
    /// Entries per table.
    entries: u64,
    backing: Option<Arc<dyn BlockBackend>>,
    l1: Vec<AtomicU64>,
    tables: Mutex<HashMap<u64, Box<[u64]>>>,
    max_tables: usize,
    /// qemu's `file_size`: clusters before it are valid targets of an entry.
    file_end: AtomicU64,
    /// Held from an allocation's second look-up to its links.
    alloc: Mutex<Alloc>,
}

fn read_backing_name(f: &HostFile, h: &Header) -> Result<Option<PathBuf>> {
    if h.features & header::F_BACKING_FILE == 0 {
        return Ok(None);
    }
    if h.backing_name_size >= MAX_BACKING_NAME {
        return Err(Error::Open("Failed to read backing filename".into()));
    }
    let mut b = vec![0u8; h.backing_name_size as usize];
    f.read(
        "read backing filename",
        u64::from(h.backing_name_offset),
        &mut b,
    )
    .map_err(|_| Error::Open("Failed to read backing filename".into()))?;
    // A C string: a NUL ends it.
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    b.truncate(end);
    Ok((!b.is_empty()).then(|| PathBuf::from(std::ffi::OsStr::from_bytes(&b))))
}

fn open_backing_file(
    f: &HostFile,
    h: &Header,
    name: Option<PathBuf>,
    opts: &ImageOptions,
    open_backing: &OpenBacking<'_>,
) -> Result<Option<Arc<dyn BlockBackend>>> {
    let header_fmt = (h.features & header::F_BACKING_FORMAT_NO_PROBE != 0).then_some("raw");
    let resolve = |n: &PathBuf| crate::qcow2::resolve_backing(f.path(), &n.to_string_lossy());
    let b = match (&opts.backing, &name) {
        (BackingChoice::None, _) => None,
        (BackingChoice::File(p, fmt), _) => Some(open_backing(p, fmt.as_deref())),
        (BackingChoice::HeaderAs(fmt), Some(n)) => Some(open_backing(&resolve(n), Some(fmt))),
        (BackingChoice::FromHeader, Some(n)) => Some(open_backing(&resolve(n), header_fmt)),
        (_, None) => None,
    };
    b.transpose().map_err(|e| Error::Backing(Box::new(e)))
}

fn read_table(f: &HostFile, op: &'static str, at: u64, bytes: u64) -> Result<Vec<u64>> {
    let mut b = vec![0u8; bytes as usize];
    f.read(op, at, &mut b)?;
    Ok(b.chunks_exact(8)
        .map(|c| u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
        .collect())
}

fn table_bytes_of(entries: &[u64]) -> Vec<u8> {
    entries.iter().flat_map(|e| e.to_le_bytes()).collect()
}

fn open(
    f: HostFile,
    opts: &ImageOptions,
    open_backing: &OpenBacking<'_>,
) -> Result<Arc<dyn BlockBackend>> {
    let mut raw = [0u8; header::LEN];
    f.read("read QED header", 0, &mut raw)
        .map_err(|_| Error::Open("Failed to read QED header".into()))?;
    let file_size = f.size()?;
    let mut h = Header::parse(raw, file_size)?;
    let writable = !(opts.read_only || opts.snapshot);
    let name = read_backing_name(&f, &h)?;
    // Autoclear bits this program does not know are knocked out (none are known).
    if h.autoclear != 0 && writable {
        h.autoclear = 0;
        f.write("write QED header", 0, &h.bytes(), false)
            .map_err(|_| Error::Open("Failed to update header".into()))?;
        f.sync()?;
    }
    let mut l1 = read_table(&f, "read L1 table", h.l1_offset, h.table_bytes())
        .map_err(|_| Error::Open("Failed to read L1 table".into()))?;
    let file_end = file_size & !(h.cluster() - 1);
    if writable && h.features & header::F_NEED_CHECK != 0 {
        let report = check::repair(&f, &mut h, &mut l1, file_end)?;
        tracing::warn!(
            path = %f.path().display(),
            fixed = report.fixed,
            corruptions = report.corruptions,
            leaked_clusters = report.leaks,
            "QED image was not closed cleanly: checked"
        );
    }
    let backing = open_backing_file(&f, &h, name, opts, open_backing)?;
    let cluster = h.cluster();
    Ok(Arc::new(Qed {
        read_only: !writable,
        cluster,
        entries: h.table_entries(),
        backing,
        l1: l1.into_iter().map(AtomicU64::new).collect(),
        tables: Mutex::new(HashMap::new()),
        max_tables: (CACHE_BYTES / h.table_bytes()).max(1) as usize,
        file_end: AtomicU64::new(file_end),
        alloc: Mutex::new(Alloc {
            next: file_size.next_multiple_of(cluster),
            features: h.features,
            last: None,
        }),
        h,
        f,
    }))
}

impl Qed {
    fn bad(&self, what: &str, offset: u64) -> Error {
        self.f
            .corrupt(format!("{what} at offset {offset:#x} is invalid"))
    }

    /// L2 table at `l2`, loaded under the table lock.
    fn table<'a>(
        &self,
        tables: &'a mut HashMap<u64, Box<[u64]>>,
        l2: u64,
    ) -> Result<&'a mut Box<[u64]>> {
        if !tables.contains_key(&l2) {
            if tables.len() >= self.max_tables {
                if let Some(k) = tables.keys().next().copied() {
                    tables.remove(&k);
                }
            }
            let t = read_table(&self.f, "read L2 table", l2, self.h.table_bytes())?;
            tables.insert(l2, t.into_boxed_slice());
        }
        tables
            .get_mut(&l2)
            .ok_or_else(|| self.f.corrupt("L2 table vanished".into()))
    }

    /// The L2 table offset of cluster `c`'s L1 entry (0: none), checked.
    fn l2_of(&self, c: u64) -> Result<u64> {
        let i = c / self.entries;
        let l2 = self
            .l1
            .get(i as usize)
            .ok_or_else(|| Error::Invalid(format!("cluster {c} is past the L1 table")))?
            .load(Ordering::Acquire);
        if l2 != 0
            && !self
                .h
                .table_offset_valid(l2, self.file_end.load(Ordering::Acquire))
        {
            return Err(self.bad("L2 table offset", l2));
        }
        Ok(l2)
    }

    /// What cluster `c` is, and how many clusters from it (at most `max`, within its L2
    /// table) are the same: all unallocated, all zero, or allocated one after another in
    /// the file (qemu's `qed_count_contiguous_clusters`).
    fn run(&self, c: u64, max: u64) -> Result<(Entry, u64)> {
        self.run_cached(c, max, false)?
            .ok_or_else(|| self.f.corrupt("L2 table not loaded".into()))
    }

    /// `run`; with `cached_only`, None when the L2 table would have to be read from the
    /// file (the callers that must not wait).
    fn run_cached(&self, c: u64, max: u64, cached_only: bool) -> Result<Option<(Entry, u64)>> {
        let i = c % self.entries;
        let max = max.clamp(1, self.entries - i);
        let l2 = self.l2_of(c)?;
        if l2 == 0 {
            return Ok(Some((Entry::Unalloc, max)));
        }
        let (first, n) = {
            let mut tables = self.tables.lock();
            if cached_only && !tables.contains_key(&l2) {
                return Ok(None);
            }
            let t = &self.table(&mut tables, l2)?[i as usize..(i + max) as usize];
            let first = t[0];
            let n = t
                .iter()
                .enumerate()
                .skip(1)
                .find(|&(k, &e)| match first {
                    0 | ZERO_ENTRY => e != first,
                    _ => e != first.wrapping_add(k as u64 * self.cluster),
                })
                .map_or(t.len(), |(k, _)| k);
            (first, n as u64)
        };
        let entry = match first {
            0 => Entry::Unalloc,
            ZERO_ENTRY => Entry::Zero,
            at if self
                .h
                .cluster_offset_valid(at, self.file_end.load(Ordering::Acquire)) =>
            {
                Entry::At(at)
            }
            at => return Err(self.bad("cluster offset", at)),
        };
        Ok(Some((entry, n)))
    }

    /// Where `[offset, offset + len)` lies when it is one run whose L2 table is in memory:
    /// the entry (an allocated run's file offset for `offset` itself).
    fn whole_run(&self, offset: u64, len: u64) -> Option<Entry> {
        let (c, in_c) = (offset / self.cluster, offset % self.cluster);
        let want = (in_c + len).div_ceil(self.cluster);
        match self.run_cached(c, want, true) {
            Ok(Some((Entry::At(at), n))) if n >= want => Some(Entry::At(at + in_c)),
            Ok(Some((e, n))) if n >= want => Some(e),
            _ => None,
        }
    }

    /// Walk `[offset, offset + len)` run by run: (entry, position, length, offset into the
    /// request).
    fn each_run(
        &self,
        offset: u64,
        len: u64,
        mut f: impl FnMut(Entry, u64, u64, u64) -> Result<()>,
    ) -> Result<()> {
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let (c, in_c) = (pos / self.cluster, pos % self.cluster);
            let (e, n) = self.run(c, (in_c + end - pos).div_ceil(self.cluster))?;
            let n = (n * self.cluster - in_c).min(end - pos);
            let e = match e {
                Entry::At(at) => Entry::At(at + in_c),
                e => e,
            };
            f(e, pos, n, pos - offset)?;
            pos += n;
        }
        Ok(())
    }

    fn backing_is_zero(&self, pos: u64) -> bool {
        self.backing.as_ref().is_none_or(|b| pos >= b.size())
    }

    fn check_writable(&self) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        Ok(())
    }

    /// Write `data` at disk position `pos` into unallocated or zero clusters: a run of
    /// them (as found again under the allocation lock) gets new clusters. Returns the bytes
    /// of `data` written, maybe fewer than all.
    fn allocate(&self, pos: u64, data: &[u8]) -> Result<u64> {
        let mut a = self.alloc.lock();
        let (c, in_c) = (pos / self.cluster, pos % self.cluster);
        let want = (in_c + data.len() as u64).div_ceil(self.cluster);
        let (e, n) = self.run(c, want)?;
        let len = (n * self.cluster - in_c).min(data.len() as u64);
        let data = &data[..len as usize];
        if let Entry::At(at) = e {
            drop(a);
            self.f.write("write", at + in_c, data, false)?;
            return Ok(len);
        }
        let from_backing = e == Entry::Unalloc && self.backing.is_some();
        // With a backing file, never the NEED_CHECK protocol, even over a zero cluster: the
        // check clears a link whose data is missing to "unallocated", which would show the
        // backing file's bytes where a durable zeroing was (qemu decides by the backing file
        // too). The data is synced before the link instead.
        let sync_first = self.backing.is_some();
        if !sync_first {
            self.set_need_check(&mut a)?;
        }
        let clusters = (in_c + len).div_ceil(self.cluster);
        let at = a.next;
        let bytes = clusters * self.cluster;
        self.f.write("write", at + in_c, data, false)?;
        if from_backing {
            self.copy_backing(c * self.cluster, at, in_c)?;
            let tail = in_c + len;
            self.copy_backing(c * self.cluster + tail, at + tail, bytes - tail)?;
        }
        self.f.grow_to(at + bytes)?;
        if sync_first {
            self.f.sync()?;
        }
        a.next = at + bytes;
        a.last = Some(Instant::now());
        self.file_end.fetch_max(a.next, Ordering::AcqRel);
        self.link(&mut a, c, clusters, at)?;
        Ok(len)
    }

    /// Copy `len` bytes of the backing file at disk position `pos` to `at` in the file
    /// (where it reads zeroes, nothing: the new space reads zeroes already).
    fn copy_backing(&self, pos: u64, at: u64, len: u64) -> Result<()> {
        let mut done = 0;
        while done < len && !self.backing_is_zero(pos + done) {
            let mut chunk = vec![0u8; (len - done).min(COW_CHUNK) as usize];
            backing::read(self.backing.as_ref(), pos + done, &mut chunk)?;
            self.f.write("write", at + done, &chunk, false)?;
            done += chunk.len() as u64;
        }
        Ok(())
    }

    /// Set NEED_CHECK on disk (synced) before a link that may reach the disk before its
    /// data.
    fn set_need_check(&self, a: &mut Alloc) -> Result<()> {
        if a.features & header::F_NEED_CHECK != 0 {
            return Ok(());
        }
        self.write_header(a.features | header::F_NEED_CHECK)?;
        self.f.sync()?;
        a.features |= header::F_NEED_CHECK;
        Ok(())
    }

    fn write_header(&self, features: u64) -> Result<()> {
        let mut h = self.h.clone();
        h.features = features;
        self.f.write("write QED header", 0, &h.bytes(), false)
    }

    /// Clear NEED_CHECK once everything it covers is on disk.
    fn mark_clean(&self, a: &mut Alloc) -> Result<()> {
        if a.features & header::F_NEED_CHECK == 0 {
            return Ok(());
        }
        self.f.sync()?;
        let features = a.features & !header::F_NEED_CHECK;
        self.write_header(features)?;
        self.f.sync()?;
        a.features = features;
        Ok(())
    }

    /// Point `n` clusters from cluster `c` (all in one L2 table) at `first` and the
    /// clusters after it, or all at ZERO_ENTRY. Called with the allocation lock held.
    fn link(&self, a: &mut Alloc, c: u64, n: u64, first: u64) -> Result<()> {
        let i = c % self.entries;
        let entry = |k: u64| {
            if first == ZERO_ENTRY {
                ZERO_ENTRY
            } else {
                first + k * self.cluster
            }
        };
        let l2 = self.l2_of(c)?;
        let l1_index = c / self.entries;
        if l2 == 0 {
            let mut t = vec![0u64; self.entries as usize];
            for k in 0..n {
                t[(i + k) as usize] = entry(k);
            }
            let at = a.next;
            self.f
                .write("write L2 table", at, &table_bytes_of(&t), false)?;
            self.f.sync()?;
            a.next = at + self.h.table_bytes();
            self.file_end.fetch_max(a.next, Ordering::AcqRel);
            let mut tables = self.tables.lock();
            self.f.write(
                "write L1 table",
                self.h.l1_offset + l1_index * 8,
                &at.to_le_bytes(),
                false,
            )?;
            self.l1[l1_index as usize].store(at, Ordering::Release);
            if tables.len() < self.max_tables {
                tables.insert(at, t.into_boxed_slice());
            }
            return Ok(());
        }
        let new: Vec<u64> = (0..n).map(entry).collect();
        let mut tables = self.tables.lock();
        let t = self.table(&mut tables, l2)?;
        self.f
            .write("write L2 table", l2 + i * 8, &table_bytes_of(&new), false)?;
        t[i as usize..(i + n) as usize].copy_from_slice(&new);
        Ok(())
    }

    /// Mark the unallocated clusters of `[pos, pos + len)` (whole clusters) as zero
    /// clusters, as qemu's write-zeroes does.
    fn zero_unallocated(&self, pos: u64, len: u64) -> Result<()> {
        let mut done = 0;
        while done < len {
            let mut a = self.alloc.lock();
            let c = (pos + done) / self.cluster;
            let (e, n) = self.run(c, (len - done) / self.cluster)?;
            match e {
                Entry::Unalloc => self.link(&mut a, c, n, ZERO_ENTRY)?,
                Entry::Zero => {}
                Entry::At(at) => {
                    drop(a);
                    self.f.write_zeroes(at, n * self.cluster)?;
                }
            }
            done += n * self.cluster;
        }
        Ok(())
    }
}

impl BlockBackend for Qed {
    fn size(&self) -> u64 {
        self.h.image_size
    }

    fn caps(&self) -> Caps {
        Caps::image(self.read_only)
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.each_run(offset, buf.len() as u64, |e, pos, n, at| {
            let out = &mut buf[at as usize..(at + n) as usize];
            match e {
                Entry::At(file_at) => self.f.read("read", file_at, out),
                Entry::Zero => {
                    out.fill(0);
                    Ok(())
                }
                Entry::Unalloc => backing::read(self.backing.as_ref(), pos, out),
            }
        })
    }

    fn write(&self, offset: u64, buf: &[u8], flags: IoFlags) -> Result<()> {
        self.check_writable()?;
        let end = offset + buf.len() as u64;
        let mut pos = offset;
        while pos < end {
            let data = &buf[(pos - offset) as usize..];
            let (c, in_c) = (pos / self.cluster, pos % self.cluster);
            let (e, n) = self.run(c, (in_c + end - pos).div_ceil(self.cluster))?;
            let n = (n * self.cluster - in_c).min(end - pos);
            pos += match e {
                Entry::At(at) => {
                    self.f
                        .write("write", at + in_c, &data[..n as usize], false)?;
                    n
                }
                _ => self.allocate(pos, &data[..n as usize])?,
            };
        }
        if flags.contains(IoFlags::FUA) {
            self.f.sync()?;
        }
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        self.f.sync()?;
        if self.read_only {
            return Ok(());
        }
        let mut a = self.alloc.lock();
        let idle = a.last.is_none_or(|t| t.elapsed() >= NEED_CHECK_IDLE);
        if idle {
            self.mark_clean(&mut a)?;
        }
        Ok(())
    }

    /// qemu's qed driver has no discard: a trim changes nothing.
    fn trim(&self, _offset: u64, _len: u64, _flags: IoFlags) -> Result<()> {
        Ok(())
    }

    /// Whole clusters: zeroed in place where allocated, marked zero where not (qemu's
    /// rule); the partial clusters at either end get zeroes written unless they read as
    /// zeroes already.
    fn write_zeroes(&self, offset: u64, len: u64, flags: IoFlags) -> Result<()> {
        self.check_writable()?;
        let end = offset + len;
        let start_whole = offset.next_multiple_of(self.cluster).min(end);
        let end_whole = (end / self.cluster * self.cluster).max(start_whole);
        for (a, b) in [(offset, start_whole), (end_whole, end)] {
            if a < b {
                self.zero_partial(a, b - a)?;
            }
        }
        if start_whole < end_whole {
            self.zero_unallocated(start_whole, end_whole - start_whole)?;
        }
        if flags.contains(IoFlags::FUA) {
            self.f.sync()?;
        }
        Ok(())
    }

    fn block_status(&self, offset: u64, len: u64, out: &mut Extents) -> Result<()> {
        // At most 64 L2 tables' worth per call: the client asks again for the rest.
        let span = self.entries * self.cluster;
        let len = len.min(64 * span - offset % span);
        self.each_run(offset, len, |e, pos, n, _| {
            match e {
                // Data, as qemu-nbd reports it (no look into the file's holes).
                Entry::At(_) => out.push(Extent::new(n, ExtentFlags::empty(), 1)),
                Entry::Zero => out.push(Extent::new(n, ExtentFlags::HOLE | ExtentFlags::ZERO, 1)),
                Entry::Unalloc => backing::status(self.backing.as_ref(), pos, n, out)?,
            }
            Ok(())
        })
    }

    /// Clusters never move and are never freed, so an allocated run found in memory can be
    /// read or overwritten in place from the thread that read the request.
    fn try_read(&self, offset: u64, buf: &mut [u8]) -> bool {
        match self.whole_run(offset, buf.len() as u64) {
            Some(Entry::At(at)) => self.f.try_read(at, buf),
            Some(Entry::Zero) => {
                buf.fill(0);
                true
            }
            Some(Entry::Unalloc) if self.backing.is_none() => {
                buf.fill(0);
                true
            }
            _ => false,
        }
    }

    fn try_write(&self, offset: u64, buf: &[u8]) -> bool {
        match self.whole_run(offset, buf.len() as u64) {
            Some(Entry::At(at)) if !self.read_only => self.f.try_write(at, buf),
            _ => false,
        }
    }

    /// An allocated run only ever holds its own range's bytes (nothing is freed or reused).
    fn read_source(&self, offset: u64, len: u64) -> Option<crate::HostSpan<'_>> {
        match self.whole_run(offset, len)? {
            Entry::At(at) => self.f.page_cache_span(at),
            _ => None,
        }
    }

    fn write_sink(&self, offset: u64, len: u64) -> Option<crate::HostSpan<'_>> {
        match self.whole_run(offset, len)? {
            Entry::At(at) if !self.read_only => self.f.page_cache_sink(at),
            _ => None,
        }
    }

    fn format_name(&self) -> &'static str {
        "qed"
    }

    fn close(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.f.sync()?;
        self.mark_clean(&mut self.alloc.lock())
    }
}

impl Qed {
    /// Zeroes into part of one cluster, unless it reads as zeroes already.
    fn zero_partial(&self, pos: u64, len: u64) -> Result<()> {
        let (e, _) = self.run(pos / self.cluster, 1)?;
        match e {
            Entry::Zero => Ok(()),
            Entry::Unalloc if self.backing_is_zero(pos) => Ok(()),
            Entry::At(at) => self.f.write_zeroes(at + pos % self.cluster, len),
            Entry::Unalloc => {
                let zeroes = vec![0u8; len as usize];
                self.write(pos, &zeroes, IoFlags::empty())
            }
        }
    }
}
