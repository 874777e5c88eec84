//! qcow (version 1) images, read and written as qemu's `qcow` driver does: a 48-byte
//! big-endian header, an optional backing file name (probed: the format has no field for
//! it), an L1 table, L2 tables of 512 B to 64 KiB, clusters of 512 B to 64 KiB, compressed
//! clusters (bit 63, the stream's length in the bits under it), and the legacy AES-CBC
//! encryption (`crypt_method` 1, a 16-byte key from `encrypt.key-secret`, IVs of guest sector
//! numbers). There are no zero clusters, no refcounts and no discard: clusters never move and
//! are never freed, except that a compressed cluster is replaced by a normal one when written.
//!
//! qemu's `request_alignment` for qcow is 512: the driver sits behind the sector-aligning
//! layer (`align.rs`), so every data request it sees is whole sectors.
//!
//! # The write path's rules
//!
//! - A write to an allocated (normal) cluster goes to its place in the file, without a lock.
//!   Such a cluster never moves and is never freed, so one found allocated stays so.
//! - A write to unallocated clusters or a compressed one takes the allocation lock and looks
//!   again (another writer may have allocated it meanwhile: then it writes in place). A run
//!   of unallocated clusters in one L2 table (or the compressed cluster) gets new clusters,
//!   one after another, at the end of the file rounded up to a cluster (qemu's place), past
//!   everything this or an earlier session wrote. Their bytes are written first: the new data
//!   and, for a partial write, the run's other bytes (the decompressed cluster it
//!   replaces, else the backing file's bytes, else nothing: the file is extended over them
//!   and they read as zeroes; an encrypted image gets them encrypted). Then the L2 entries
//!   are written, then the in-memory table changed (under the table lock). Where a lost
//!   cluster would not read as before (it replaces a compressed cluster, or hides a backing
//!   file), the data is synced before the entries.
//! - Where the L1 entry is empty, a new L2 table goes at the end of the file first, written
//!   whole (zeroes) and synced before the L1 entry names it.
//! - The allocation lock is held from the second look-up to the L2 entry, so no cluster is
//!   handed out twice and no entry is lost to a concurrent writer. Lock order: allocation,
//!   then tables.
//! - No L2 entry reaches the disk before a file length that covers its cluster: the file is
//!   grown ahead of the allocation point in steps of 8 MiB, each step synced (the length
//!   with it) before an entry points into it. Otherwise a power cut could keep an entry and
//!   lose the length, and the next session, allocating at the file's end, would hand the
//!   same cluster out twice. Close cuts the file back to the allocation point. (A write to
//!   an entry past the file's end, left by another writer, still takes that cluster into
//!   the file first, so it is never handed out again.)
//! - FLUSH syncs the file; a FUA write syncs after its L2 entry.
//! - Write-zeroes writes zeroes (qemu's qcow has no zero clusters: its block layer writes
//!   zeroes too, allocating); trim does nothing (qemu's qcow has no discard).
//! - Compressed writes (the `compress` filter) go only to clusters never allocated (EIO
//!   over any other: qemu would overwrite the cluster's place without changing its entry);
//!   the stream is appended at the file's end, unaligned as in qemu, and synced before its
//!   L2 entry.
//!
//! Hostile images: the L1 table must lie in the file; an L2 table or data cluster that
//! overlaps the header, the backing file name or the L1 table, an L2 table not wholly in the
//! file, a cluster that is not sector-aligned (qemu's check) or, for a write, more than
//! 1 GiB past the file's end, fails its request; a compressed cluster that does not inflate
//! fails its read.
//!
//! Unlike qemu: a partial write to a new cluster over a backing file copies the backing
//! file's bytes around it (qemu leaves zeroes there, which only shows with clusters over
//! 512 bytes: its `-b` images have 512-byte clusters); a compressed cluster of an encrypted
//! image rewritten in part is stored encrypted (qemu stores it in the clear, then reads it
//! decrypted); qemu writes a new L1 entry before its L2 table and an L2 entry before its
//! data.

mod header;

use crate::file::HostFile;
use crate::format::OpenBacking;
use crate::format::{backing_option, BackingChoice, Driver, EncryptOptions, ImageOptions};
use crate::luks::cipher::{SectorCipher, Spec};
use crate::{align::Aligned, Support};
use crate::{backing, BlockBackend, Caps, Error, Extent, ExtentFlags, Extents, IoFlags, Result};
use header::Header;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

pub static DRIVER: Driver = Driver {
    name: "qcow",
    probe: header::probe,
    open,
    option,
    has_metadata: true,
};

const SECTOR: u64 = 512;
/// L2 tables kept in memory at once, in bytes.
const CACHE_BYTES: u64 = 32 << 20;
/// How far past the file's end an allocated cluster may be written (taken into the file):
/// further out, its L2 entry is hostile, and the write fails.
const MAX_CLAIM: u64 = 1 << 30;
/// How far past the allocation point the file is grown (and synced) at a time.
const GROW_AHEAD: u64 = 8 << 20;

/// `--image-opts` keys: a backing file, and the encryption key.
fn option(key: &str, v: &str, opts: &mut ImageOptions) -> Option<std::result::Result<(), String>> {
    if let Some(r) = backing_option(key, v, opts) {
        return Some(r);
    }
    match key {
        "encrypt.key-secret" => opts.encrypt.key_secret = Some(v.to_string()),
        "encrypt.format" => opts.encrypt.format = Some(v.to_string()),
        // qemu checks the other keys only when the image is encrypted.
        k if k.starts_with("encrypt.") => {
            let e = &mut opts.encrypt;
            e.unexpected
                .get_or_insert_with(|| k["encrypt.".len()..].to_string());
        }
        _ => return None,
    }
    Some(Ok(()))
}

/// The cipher of an encrypted image (qemu's checks of `encrypt.*` against the header, then
/// the key: a passphrase's first 16 bytes, zero-padded, for AES-128-CBC with plain64 IVs).
fn cipher(h: &Header, e: &EncryptOptions) -> Result<Option<SectorCipher>> {
    if h.crypt_method == header::CRYPT_NONE {
        return match &e.format {
            Some(fmt) => Err(Error::Encryption(format!(
                "No encryption in image header, but options specified format '{fmt}'"
            ))),
            None => Ok(None),
        };
    }
    if let Some(fmt) = e.format.as_deref().filter(|f| *f != "aes") {
        return Err(Error::Encryption(format!(
            "Header reported 'aes' encryption format but options specify '{fmt}'"
        )));
    }
    if let Some(k) = &e.unexpected {
        return Err(Error::Encryption(format!("Parameter '{k}' is unexpected")));
    }
    let password = crate::luks::passphrase(e, "encrypt.")?;
    let mut key = zeroize::Zeroizing::new([0u8; 16]);
    let n = password.len().min(16);
    key[..n].copy_from_slice(&password[..n]);
    let spec = Spec::parse("aes", "cbc-plain64", "sha256", 16).map_err(Error::Encryption)?;
    SectorCipher::new(&spec, &key[..])
        .map(Some)
        .map_err(Error::Encryption)
}

/// Where a cluster's bytes are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Entry {
    /// Nowhere in this image: the backing file's, or zeroes.
    Unalloc,
    /// A compressed stream (the raw L2 entry).
    Compressed(u64),
    /// At this byte offset of the file.
    At(u64),
}

#[derive(Debug)]
pub struct Qcow {
    f: HostFile,
    h: Header,
    size: u64,
    read_only: bool,
    cluster: u64,
    /// Byte ranges of the file that hold metadata no cluster may overlap: the header, the
    /// backing file name, the L1 table.
    meta: Vec<(u64, u64)>,
    l1: Vec<AtomicU64>,
    tables: Mutex<HashMap<u64, Box<[u64]>>>,
    max_tables: usize,
    backing: Option<Arc<dyn BlockBackend>>,
    cipher: Option<SectorCipher>,
    /// The last compressed cluster inflated: (its L2 entry, its bytes). A compressed
    /// stream is never rewritten in place, so the entry names the bytes for good.
    inflated: Mutex<Option<(u64, Vec<u8>)>>,
    /// The file's end as this process knows it (where the next cluster or table goes,
    /// rounded up to a cluster); held from an allocation's second look-up to its L2 entry.
    alloc: Mutex<u64>,
    /// A copy of `alloc`'s value, read without the lock: a write in place must lie below it.
    end: AtomicU64,
    /// The file length known durable (changed under the allocation lock).
    durable: AtomicU64,
}

fn read_table(f: &HostFile, op: &'static str, at: u64, bytes: u64) -> Result<Vec<u64>> {
    let mut b = vec![0u8; bytes as usize];
    f.read(op, at, &mut b)?;
    Ok(b.chunks_exact(8)
        .map(|c| u64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
        .collect())
}

fn read_backing_name(f: &HostFile, h: &Header) -> Result<Option<PathBuf>> {
    let Some((at, len)) = h.backing_name()? else {
        return Ok(None);
    };
    let mut b = vec![0u8; len as usize];
    f.read("read backing file name", at, &mut b)?;
    // A C string: a NUL ends it.
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    b.truncate(end);
    Ok((!b.is_empty()).then(|| PathBuf::from(std::ffi::OsStr::from_bytes(&b))))
}

fn open_backing_file(
    f: &HostFile,
    name: Option<PathBuf>,
    opts: &ImageOptions,
    open_backing: &OpenBacking<'_>,
) -> Result<Option<Arc<dyn BlockBackend>>> {
    let resolve = |n: &PathBuf| crate::qcow2::resolve_backing(f.path(), &n.to_string_lossy());
    let b = match (&opts.backing, &name) {
        (BackingChoice::None, _) => None,
        (BackingChoice::File(p, fmt), _) => Some(open_backing(p, fmt.as_deref())),
        (BackingChoice::HeaderAs(fmt), Some(n)) => Some(open_backing(&resolve(n), Some(fmt))),
        // No format in the header: the backing file is probed.
        (BackingChoice::FromHeader, Some(n)) => Some(open_backing(&resolve(n), None)),
        (_, None) => None,
    };
    b.transpose().map_err(|e| Error::Backing(Box::new(e)))
}

fn open(
    f: HostFile,
    opts: &ImageOptions,
    open_backing: &OpenBacking<'_>,
) -> Result<Arc<dyn BlockBackend>> {
    let mut raw = [0u8; header::LEN];
    f.read("read qcow header", 0, &mut raw)?;
    let mut h = Header::parse(&raw)?;
    let cipher = cipher(&h, &opts.encrypt)?;
    h.check_size()?;
    let file_size = f.size()?;
    let l1_bytes = h.l1_entries * 8;
    // A table past the file's end is damaged or hostile (qemu reads zeroes there): refuse
    // it before sizing memory by it.
    if h.l1_offset
        .checked_add(l1_bytes)
        .is_none_or(|end| end > file_size)
    {
        return Err(f.corrupt(format!(
            "L1 table at offset {:#x} ({} entries) lies past the end of the file",
            h.l1_offset, h.l1_entries
        )));
    }
    let l1 = read_table(&f, "read L1 table", h.l1_offset, l1_bytes)?;
    let name = read_backing_name(&f, &h)?;
    let mut meta = vec![(0, header::LEN as u64), (h.l1_offset, l1_bytes)];
    if let Some((at, len)) = h.backing_name()? {
        meta.push((at, u64::from(len)));
    }
    let backing = open_backing_file(&f, name, opts, open_backing)?;
    let cluster = h.cluster();
    let read_only = opts.read_only || opts.snapshot;
    let q = Qcow {
        size: h.size / SECTOR * SECTOR,
        read_only,
        cluster,
        meta,
        l1: l1.into_iter().map(AtomicU64::new).collect(),
        tables: Mutex::new(HashMap::new()),
        max_tables: (CACHE_BYTES / h.l2_bytes()).max(1) as usize,
        backing,
        cipher,
        inflated: Mutex::new(None),
        alloc: Mutex::new(file_size),
        end: AtomicU64::new(file_size),
        durable: AtomicU64::new(file_size),
        h,
        f,
    };
    // qemu's request_alignment for qcow is 512, encrypted or not.
    Ok(Arc::new(Aligned::new(Arc::new(q))))
}

impl Qcow {
    fn overlaps_meta(&self, at: u64, len: u64) -> bool {
        self.meta
            .iter()
            .any(|&(m, n)| at < m.saturating_add(n) && m < at.saturating_add(len))
    }

    /// The L2 table of cluster `c` (0: none), checked.
    fn l2_of(&self, c: u64) -> Result<u64> {
        let i = c >> self.h.l2_bits;
        let l2 = self
            .l1
            .get(i as usize)
            .ok_or_else(|| Error::Invalid(format!("cluster {c} is past the L1 table")))?
            .load(Ordering::Acquire);
        if l2 == 0 {
            return Ok(0);
        }
        let bytes = self.h.l2_bytes();
        let inside = l2
            .checked_add(bytes)
            .is_some_and(|e| e <= self.end.load(Ordering::Acquire));
        if !inside || self.overlaps_meta(l2, bytes) {
            return Err(self.f.corrupt(format!(
                "L1 entry {i} points at an invalid L2 table offset {l2:#x}"
            )));
        }
        Ok(l2)
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
            let t = read_table(&self.f, "read L2 table", l2, self.h.l2_bytes())?;
            tables.insert(l2, t.into_boxed_slice());
        }
        tables
            .get_mut(&l2)
            .ok_or_else(|| self.f.corrupt("L2 table vanished".into()))
    }

    /// An L2 entry, checked.
    fn classify(&self, c: u64, e: u64) -> Result<Entry> {
        if e == 0 {
            return Ok(Entry::Unalloc);
        }
        if e & Header::COMPRESSED != 0 {
            return Ok(Entry::Compressed(e));
        }
        if !e.is_multiple_of(SECTOR) || self.overlaps_meta(e, self.cluster) {
            return Err(self
                .f
                .corrupt(format!("cluster {c} has an invalid L2 entry {e:#x}")));
        }
        Ok(Entry::At(e))
    }

    /// What cluster `c` is, and how many clusters from it (at most `max`, within its L2
    /// table) are the same: unallocated, or allocated one after another in the file (a
    /// compressed cluster is always alone).
    fn run(&self, c: u64, max: u64) -> Result<(Entry, u64)> {
        let per = self.h.l2_entries();
        let i = c % per;
        let max = max.clamp(1, per - i);
        let l2 = self.l2_of(c)?;
        if l2 == 0 {
            return Ok((Entry::Unalloc, max));
        }
        let mut tables = self.tables.lock();
        let t = &self.table(&mut tables, l2)?[i as usize..(i + max) as usize];
        let first = self.classify(c, t[0])?;
        let n = match first {
            Entry::Compressed(_) => 1,
            Entry::Unalloc => t.iter().take_while(|&&e| e == 0).count(),
            Entry::At(at) => t
                .iter()
                .enumerate()
                .take_while(|&(k, &e)| {
                    e == at + k as u64 * self.cluster && !self.overlaps_meta(e, self.cluster)
                })
                .count(),
        };
        Ok((first, n as u64))
    }

    /// Walk `[offset, offset + len)` run by run: (entry, position, length, offset into the
    /// request); an allocated run's entry is the file offset of `position` itself.
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

    /// A compressed cluster's bytes, inflated (qemu's raw deflate, 4 KiB window).
    fn inflate(&self, c: u64, e: u64, out: &mut [u8]) -> Result<()> {
        if let Some((k, b)) = &*self.inflated.lock() {
            if *k == e {
                out.copy_from_slice(b);
                return Ok(());
            }
        }
        let (at, len) = self.h.compressed_at(e);
        let mut input = vec![0u8; len as usize];
        self.f.read("read compressed cluster", at, &mut input)?;
        let mut d = flate2::Decompress::new(false);
        // A stream error after the output is full is what qemu accepts too.
        let _ = d.decompress(&input, out, flate2::FlushDecompress::Finish);
        if d.total_out() != out.len() as u64 {
            return Err(self.f.corrupt(format!(
                "compressed cluster {c} at offset {at:#x} inflates to {} of {} bytes",
                d.total_out(),
                out.len()
            )));
        }
        *self.inflated.lock() = Some((e, out.to_vec()));
        Ok(())
    }

    fn check_sectors(&self, pos: u64, len: usize) -> Result<()> {
        if self.cipher.is_some() && !(pos.is_multiple_of(SECTOR) && len.is_multiple_of(512)) {
            return Err(Error::Invalid(format!(
                "unaligned encrypted I/O at {pos:#x} (length {len:#x})"
            )));
        }
        Ok(())
    }

    /// Write guest bytes at guest position `pos` to file offset `at` (encrypted as needed).
    fn write_data(&self, pos: u64, at: u64, data: &[u8]) -> Result<()> {
        match &self.cipher {
            None => self.f.write("write", at, data, false),
            Some(c) => {
                self.check_sectors(pos, data.len())?;
                let mut b = data.to_vec();
                c.encrypt(pos / SECTOR, &mut b);
                self.f.write("write", at, &b, false)
            }
        }
    }

    /// Write into an allocated run. It must lie below every cluster still to be allocated:
    /// a run past the file's end (its L2 entry reached the disk before the file's new
    /// length, in a power cut) is taken into the file first, under the allocation lock,
    /// unless it lies further out than any such loss could leave it (a hostile entry).
    fn write_in_place(&self, pos: u64, at: u64, data: &[u8]) -> Result<()> {
        let Some(last) = at.checked_add(data.len() as u64) else {
            return Err(self.past_end(pos, at));
        };
        if last > self.end.load(Ordering::Acquire) {
            let mut end = self.alloc.lock();
            let cluster_end = last.next_multiple_of(self.cluster);
            if cluster_end > *end {
                if cluster_end - *end > MAX_CLAIM {
                    return Err(self.past_end(pos, at));
                }
                self.f.grow_to(cluster_end)?;
                *end = cluster_end;
                self.end.store(cluster_end, Ordering::Release);
            }
        }
        self.write_data(pos, at, data)
    }

    fn past_end(&self, pos: u64, at: u64) -> Error {
        self.f.corrupt(format!(
            "guest offset {pos:#x} maps to {at:#x}, past the end of the file"
        ))
    }

    /// Make the file's length cover `len` durably (grown ahead, then synced), before an L2
    /// entry points below `len`. Called with the allocation lock held; true if it synced.
    fn cover(&self, len: u64) -> Result<bool> {
        if len <= self.durable.load(Ordering::Relaxed) {
            return Ok(false);
        }
        let to = (len + GROW_AHEAD).next_multiple_of(self.cluster);
        self.f.grow_to(to)?;
        self.f.sync()?;
        self.durable.store(to, Ordering::Relaxed);
        Ok(true)
    }

    /// The L2 table of cluster `c`, made (zeroes, synced, then the L1 entry) if there is
    /// none. Called with the allocation lock held.
    fn l2_for_write(&self, end: &mut u64, c: u64) -> Result<u64> {
        let l2 = self.l2_of(c)?;
        if l2 != 0 {
            return Ok(l2);
        }
        let i = c >> self.h.l2_bits;
        let bytes = self.h.l2_bytes();
        let at = end.next_multiple_of(self.cluster);
        self.f
            .write("write L2 table", at, &vec![0u8; bytes as usize], false)?;
        self.f.sync()?;
        *end = at + bytes;
        self.end.store(*end, Ordering::Release);
        self.durable.fetch_max(*end, Ordering::Relaxed);
        let mut tables = self.tables.lock();
        self.f.write(
            "write L1 table",
            self.h.l1_offset + i * 8,
            &at.to_be_bytes(),
            false,
        )?;
        self.l1[i as usize].store(at, Ordering::Release);
        if tables.len() < self.max_tables {
            tables.insert(at, vec![0u64; bytes as usize / 8].into_boxed_slice());
        }
        Ok(at)
    }

    /// Write `data` from `in_c` in cluster `c` on (guest position `pos`), where a run of
    /// unallocated clusters or a compressed one was found: give the run (as found again
    /// under the allocation lock) new clusters, one after another, as the module's rules
    /// say. Returns the bytes of `data` written, maybe fewer than all.
    fn allocate(&self, c: u64, in_c: u64, pos: u64, data: &[u8]) -> Result<u64> {
        let mut end = self.alloc.lock();
        let want = (in_c + data.len() as u64).div_ceil(self.cluster);
        let (e, n) = self.run(c, want)?;
        let len = (n * self.cluster - in_c).min(data.len() as u64);
        let data = &data[..len as usize];
        if let Entry::At(at) = e {
            drop(end);
            self.write_in_place(pos, at + in_c, data)?;
            return Ok(len);
        }
        let clusters = (in_c + len).div_ceil(self.cluster);
        let bytes = clusters * self.cluster;
        let l2 = self.l2_for_write(&mut end, c)?;
        let at = end.next_multiple_of(self.cluster);
        let base = c * self.cluster;
        let compressed = matches!(e, Entry::Compressed(_));
        let partial = in_c != 0 || in_c + len != bytes;
        if partial && (self.cipher.is_some() || self.backing.is_some() || compressed) {
            // The run's other bytes (at most a cluster's worth at either end) go with it.
            let mut b = vec![0u8; bytes as usize];
            let (head, tail) = (in_c as usize, (in_c + len) as usize);
            match e {
                Entry::Compressed(ce) => self.inflate(c, ce, &mut b)?,
                _ => {
                    backing::read(self.backing.as_ref(), base, &mut b[..head])?;
                    let after = base + tail as u64;
                    backing::read(self.backing.as_ref(), after, &mut b[tail..])?;
                }
            }
            b[head..tail].copy_from_slice(data);
            self.write_data(base, at, &b)?;
        } else {
            self.write_data(pos, at + in_c, data)?;
        }
        let synced = self.cover(at + bytes)?;
        if (self.backing.is_some() || compressed) && !synced {
            self.f.sync()?;
        }
        *end = at + bytes;
        self.end.store(*end, Ordering::Release);
        let i = c % self.h.l2_entries();
        let entries: Vec<u64> = (0..clusters).map(|k| at + k * self.cluster).collect();
        let raw: Vec<u8> = entries.iter().flat_map(|e| e.to_be_bytes()).collect();
        let mut tables = self.tables.lock();
        let t = self.table(&mut tables, l2)?;
        self.f.write("write L2 table", l2 + i * 8, &raw, false)?;
        t[i as usize..(i + clusters) as usize].copy_from_slice(&entries);
        Ok(len)
    }
}

impl Qcow {
    /// Cluster `c` (never allocated) stored compressed: qemu's raw deflate with a 4 KiB
    /// window, at the file's end as it is (streams are packed), synced before its L2 entry (a
    /// lost stream would fail reads of a cluster that read zeroes). A cluster that does not
    /// shrink is written as a normal one, as qemu does.
    fn write_compressed_cluster(&self, c: u64, data: &[u8], keep: usize) -> Result<()> {
        let mut z =
            flate2::Compress::new_with_window_bits(flate2::Compression::default(), false, 12);
        let mut stream = Vec::with_capacity(data.len());
        let done = matches!(
            z.compress_vec(data, &mut stream, flate2::FlushCompress::Finish),
            Ok(flate2::Status::StreamEnd)
        );
        if !done || stream.len() as u64 >= self.cluster {
            return self.write(c * self.cluster, &data[..keep], IoFlags::empty());
        }
        let len = stream.len() as u64;
        let mut end = self.alloc.lock();
        let (e, _) = self.run(c, 1)?;
        if e != Entry::Unalloc {
            let eio = std::io::Error::from_raw_os_error(libc::EIO);
            return Err(self.f.err(
                "compressed write over an allocated cluster",
                c * self.cluster,
                0,
                eio,
            ));
        }
        let l2 = self.l2_for_write(&mut end, c)?;
        let at = *end;
        if at > self.h.compressed_offset_mask() {
            return Err(Error::NoSpace(format!(
                "'{}': no compressed cluster can start at {at:#x}",
                self.f.path().display()
            )));
        }
        self.f
            .write("write compressed cluster", at, &stream, false)?;
        self.f.sync()?;
        self.durable.fetch_max(at + len, Ordering::Relaxed);
        *end = at + len;
        self.end.store(*end, Ordering::Release);
        let entry = Header::COMPRESSED | (len << (63 - self.h.cluster_bits)) | at;
        let i = c % self.h.l2_entries();
        let mut tables = self.tables.lock();
        let t = self.table(&mut tables, l2)?;
        self.f
            .write("write L2 table", l2 + i * 8, &entry.to_be_bytes(), false)?;
        t[i as usize] = entry;
        Ok(())
    }
}

impl BlockBackend for Qcow {
    fn size(&self) -> u64 {
        self.size
    }

    fn caps(&self) -> Caps {
        if self.read_only {
            return Caps::READ_ONLY;
        }
        // No zero clusters: zeroes are written, as qemu's block layer writes them.
        Caps {
            zero: Support::Emulate,
            ..Caps::image(false)
        }
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.each_run(offset, buf.len() as u64, |e, pos, n, at| {
            let out = &mut buf[at as usize..(at + n) as usize];
            match e {
                Entry::At(file_at) => {
                    self.check_sectors(pos, out.len())?;
                    self.f.read("read", file_at, out)?;
                    if let Some(c) = &self.cipher {
                        c.decrypt(pos / SECTOR, out);
                    }
                    Ok(())
                }
                Entry::Unalloc => backing::read(self.backing.as_ref(), pos, out),
                // Stored in the clear, encrypted image or not (as qemu reads them).
                Entry::Compressed(ce) => {
                    let mut b = vec![0u8; self.cluster as usize];
                    self.inflate(pos / self.cluster, ce, &mut b)?;
                    let in_c = (pos % self.cluster) as usize;
                    out.copy_from_slice(&b[in_c..in_c + out.len()]);
                    Ok(())
                }
            }
        })
    }

    fn write(&self, offset: u64, buf: &[u8], flags: IoFlags) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        let end = offset + buf.len() as u64;
        let mut pos = offset;
        while pos < end {
            let data = &buf[(pos - offset) as usize..];
            let (c, in_c) = (pos / self.cluster, pos % self.cluster);
            let (e, n) = self.run(c, (in_c + end - pos).div_ceil(self.cluster))?;
            let n = match e {
                Entry::At(at) => {
                    let n = (n * self.cluster - in_c).min(end - pos);
                    self.write_in_place(pos, at + in_c, &data[..n as usize])?;
                    n
                }
                _ => {
                    let n = (n * self.cluster - in_c).min(end - pos);
                    self.allocate(c, in_c, pos, &data[..n as usize])?
                }
            };
            pos += n;
        }
        if flags.contains(IoFlags::FUA) {
            self.f.sync()?;
        }
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        self.f.sync()
    }

    /// qemu's qcow driver has no discard: a trim changes nothing.
    fn trim(&self, _offset: u64, _len: u64, _flags: IoFlags) -> Result<()> {
        Ok(())
    }

    fn block_status(&self, offset: u64, len: u64, out: &mut Extents) -> Result<()> {
        // At most 64 L2 tables' worth per call: the client asks again for the rest.
        let span = self.h.l2_entries() * self.cluster;
        let len = len.min(64 * span - offset % span);
        self.each_run(offset, len, |e, pos, n, _| {
            match e {
                // qemu maps a plain cluster to the file and looks at the file's holes there.
                Entry::At(at) if self.cipher.is_none() => self.f.zero_status(at, n, out),
                Entry::At(_) | Entry::Compressed(_) => {
                    out.push(Extent::new(n, ExtentFlags::empty(), 1))
                }
                Entry::Unalloc => backing::status(self.backing.as_ref(), pos, n, out)?,
            }
            Ok(())
        })
    }

    fn format_name(&self) -> &'static str {
        "qcow"
    }

    /// The `compress` filter's unit (an encrypted image takes no compressed writes here).
    fn compressed_cluster_size(&self) -> Option<u64> {
        (!self.read_only && self.cipher.is_none()).then_some(self.cluster)
    }

    /// Whole clusters (the last one may end at the image's end, padded with zeroes).
    fn write_compressed(&self, offset: u64, buf: &[u8]) -> Result<()> {
        if self.compressed_cluster_size().is_none() {
            return Err(Error::NotSupported("compressed writes"));
        }
        let end = offset + buf.len() as u64;
        if !offset.is_multiple_of(self.cluster)
            || !(end.is_multiple_of(self.cluster) || end == self.size)
        {
            return Err(Error::Invalid(format!(
                "compressed write at {offset:#x} of {:#x} bytes is not whole clusters",
                buf.len()
            )));
        }
        let mut padded = Vec::new();
        for (i, chunk) in buf.chunks(self.cluster as usize).enumerate() {
            let data = if chunk.len() as u64 == self.cluster {
                chunk
            } else {
                padded.clear();
                padded.extend_from_slice(chunk);
                padded.resize(self.cluster as usize, 0);
                &padded[..]
            };
            self.write_compressed_cluster(offset / self.cluster + i as u64, data, chunk.len())?;
        }
        Ok(())
    }

    /// The file cut back to the allocation point (it was grown ahead of it), then synced.
    fn close(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.f.truncate_to(*self.alloc.lock())?;
        self.f.sync()
    }
}
