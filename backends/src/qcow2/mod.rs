//! qcow2 images (v2 and v3): reads, allocating writes with copy-on-write, zero/discard,
//! block status through backing chains, compressed clusters, extended L2 (subclusters),
//! internal snapshots kept intact, persistent dirty bitmaps, LUKS encryption, and qemu's
//! overlap checks.
//!
//! # The write path's rules
//!
//! **Locks** (always taken in this order; none is held while waiting for a later one):
//! 1. a guest-cluster *stripe* (`stripes`, a reader/writer lock per guest cluster modulo
//!    [`STRIPES`]): reads and in-place writes share it; anything that changes a cluster's
//!    mapping (allocation, COW, zeroing, discard) holds it exclusively, from the lookup to the
//!    link, so nobody reads or writes a host cluster that is being remapped;
//! 2. the *flush gate* (`gate`): held by whoever writes metadata to the file — a flush, the
//!    refcount-table growth, the bitmap store at close. Metadata is never written without it;
//! 3. the *metadata lock* (`meta`): L1, the L2 and refcount-block caches, the refcount table,
//!    the allocator, the pending frees, the metadata map and the file length. Held only for
//!    in-memory work and table loads, never across data I/O.
//!
//! **Order on disk** (data → refcounts → L2 → L1 → header):
//! - An allocating write raises the cluster's refcount (in the cache) under the lock, writes
//!   the data and any COW without the lock, then links the L2 entry under the lock. Readers
//!   see the old mapping until the link. The old cluster's refcount decrease is queued.
//! - A flush copies, under the metadata lock and at one instant, every dirty refcount block,
//!   refcount-table entry, L2 table and L1 entry, plus the queued decreases; then, holding
//!   only the gate, writes the refcount blocks, syncs, writes the table entries (sync), the
//!   L2 tables (sync if L1 entries follow), the L1 entries, and syncs. The copy is a
//!   consistent cut: every pointer in it was linked after its refcount increase and after its
//!   data write completed, so the first sync makes both durable before any pointer is
//!   written. Only then are the queued decreases applied (in memory; the next flush writes
//!   them), so a cluster is reused only after the pointer that dropped it is durable.
//! - A table's dirty state is cleared only if it did not change while its copy was written
//!   (versions), and only the gate holder writes tables, so no older copy can land after a
//!   newer one. A freed table is dropped from its cache unwritten.
//! - New refcount blocks count themselves and are written before their table entry; the
//!   table grows synchronously under gate and lock (blocks, new table, sync, header, sync,
//!   old table freed).
//!
//! **FLUSH and FUA**: a flush covers every write that completed before it started: it reads
//! the write generation (bumped after every completed write) before taking the gate; if a
//! flush is running it waits for it and then does its own pass, unless a flush that started
//! later than all those writes already finished (`flushed_gen`). A FUA write returns after
//! such a flush. A failed sync is sticky (the host-file layer): later flushes fail too.
//!
//! **Inline requests** (`try_read`, `try_write`: a frontend serving a request on the thread
//! that read it): the same locks in the same order, each waited for at most
//! [`INLINE_LOCK_WAIT`] (a holder that only touches memory lets go sooner; one that loads a
//! table does not, and the request goes the usual way). Only what needs nothing else: a
//! mapping already in the cache, and for a write an owned cluster (refcount 1) whose touched
//! subclusters are allocated, overwritten in place with whole pages into the page cache,
//! under the stripe's shared lock as the usual in-place write. Such an overwrite dirties no
//! metadata; it bumps the write generation after the data, as every completed write does.
//!
//! **File length**: clusters are handed out only inside the file — the allocator's high
//! water mark is covered by a sparse extension under the metadata lock before anyone writes
//! there — so the file only grows while it is served, and nothing ever truncates it.
//!
//! **Spliced reads and frees** (`read.rs` `contiguous_span`): a large read of contiguous data
//! clusters may be sent from the page cache with splice, and the pages stay referenced by a
//! pipe and then by the client's socket until the client reads them — past the request, past
//! any lock. So a data cluster that reaches refcount zero in an image whose reads splice is
//! quarantined (`Refcounts::quarantine`, in memory only, free on disk): never handed out
//! again by this process, so no reply still in flight can show another offset's bytes.
//! Splicing is on where frees of data clusters are rare (read-only, or v3 without
//! `--discard=unmap`, see `open.rs` `spliceable`), so the quarantine costs little space.
//! With `--discard=unmap` a freed data cluster is instead punched out of the file (qemu's
//! pass-discard-request), by the flush that applied its decrease — after the pointer that
//! dropped it is durable, so a crash never finds a pointer to a hole where data should be —
//! and it stays quarantined until punched, so no write lands in it before the hole does.
//!
//! **Overlap checks** (`overlap.rs`): every data write and every metadata write is checked
//! against the metadata map first; a hit fails the request with EIO, marks the image corrupt
//! (header bit, qemu's message) and fails every later request, as qemu does.
//!
//! **Settle** (`BlockBackend::settle`, called by the ublk frontend before it completes a
//! write-type request): a device that outlives its server must not lose a completed write
//! that only the dead server's metadata cache knew of (the next server's FLUSH would succeed
//! without it). So when any metadata is dirty or a decrease is queued, settle runs the flush
//! above: its syncs keep the on-disk order, so a power cut after it still finds a consistent
//! image. Overwrites of allocated clusters dirty nothing and settle for free.
//!
//! A crash therefore leaves either the old or the new state of every structure, plus leaked
//! clusters: `qemu-img check` finds no corruption, and every write acknowledged with FUA or
//! before a completed flush reads back.
//!
//! **Encryption** (`crypt.rs`, `encrypt.format=luks`): data clusters hold LUKS ciphertext
//! whose IVs are *host* offsets / 512, so the rules above hold unchanged with one addition:
//! data is encrypted (into a per-thread buffer, or in place in a copy-on-write buffer of
//! ours) right before it is written and decrypted right after it is read, still without the
//! metadata lock and before the link. A copy-on-write decrypts with the old host offset and
//! encrypts with the new one, and it writes the whole cluster (or every touched subcluster)
//! as ciphertext: zeroes on disk would not read back as zeroes, so the zero-fill shortcut is
//! not taken for encrypted images (as in qemu). Zero flags and zero subclusters stay
//! metadata; compressed clusters are read in the clear, as qemu reads them, and never written
//! to an encrypted image. The image is served behind `align.rs`, so data requests are whole sectors;
//! the LUKS header's clusters are counted by a repair like any other metadata.
//!
//! Policies: refcounts are always kept eagerly, so the dirty bit is never set (lazy refcounts
//! are a permission, not a duty); a dirty image opened read-write has its refcounts rebuilt
//! (`repair.rs`). `--cache=none` reads and writes through O_DIRECT (the host-file layer).
//! **External data files** (`data_file.rs`): data clusters at their guest offsets in a
//! second file, not refcounted; that file is synced before any pointer is written.
//!
//! Not done yet: qemu's legacy AES encryption (`crypt_method` 1, refused at open).

mod backend;
mod batch;
pub mod bitmap;
mod bitmap_store;
mod cache;
mod compress_write;
mod compressed;
pub mod create;
mod crypt;
mod data_file;
mod driver;
mod flush;
pub mod header;
mod meta;
mod open;
mod overlap;
mod read;
mod refcount;
mod repair;
pub mod snapshot;
mod status;
mod write;
mod zero;

use crate::file::HostFile;
use crate::{BlockBackend, Error, Result};
use header::{Compression, Header};
use meta::{Entry, Meta, Step, ZERO};
use parking_lot::{Mutex, RwLock};

/// How long an inline request (`try_read`/`try_write`) waits for a lock held by another
/// thread: enough for a holder that only touches memory, not for one that waits on I/O.
const INLINE_LOCK_WAIT: std::time::Duration = std::time::Duration::from_micros(20);
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

pub use crate::format::{BackingChoice, OpenBacking};
pub use driver::DRIVER;
pub use open::Qcow2Options;

const STRIPES: usize = 256;

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
    /// Data clusters live in an external data file (`data_file.rs`).
    pub external_data: bool,
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
    /// Does the entry map a host cluster? With an external data file, guest cluster 0 lives
    /// at host offset 0: there COPIED says so (the spec's rule for offset 0).
    fn has_cluster(&self, e: Entry) -> bool {
        !e.compressed() && (e.host() != 0 || (self.external_data && e.desc & meta::COPIED != 0))
    }

    /// With an external data file a host offset must be the guest offset and nothing may be
    /// compressed (qemu's `qcow2_get_host_offset`, with its messages).
    fn check_mapping(&self, g: u64, e: Entry) -> std::result::Result<(), String> {
        if !self.external_data {
            return Ok(());
        }
        let index = g & ((1 << self.l2_bits) - 1);
        if e.compressed() {
            return Err(format!(
                "Compressed cluster entry found in image with external data file (L2 index: {index:#x})"
            ));
        }
        let guest = g << self.cluster_bits;
        // A zero flag without an offset maps nothing, COPIED or not (qemu's ZERO_PLAIN).
        let plain_zero = !self.extended && e.desc & ZERO != 0 && e.host() == 0;
        if self.has_cluster(e) && !plain_zero && e.host() != guest {
            return Err(format!(
                "External data file host cluster offset {:#x} does not match guest cluster offset: {guest:#x}, L2 index: {index:#x})",
                e.host()
            ));
        }
        Ok(())
    }

    fn state(&self, e: Entry, i: u64) -> std::result::Result<Sc, String> {
        if e.compressed() {
            return Ok(Sc::Compressed);
        }
        let host = e.host();
        if !host.is_multiple_of(self.cs) {
            return Err(format!("Cluster allocation offset {host:#x} unaligned"));
        }
        if !self.extended {
            return Ok(if self.version >= 3 && e.desc & ZERO != 0 {
                Sc::Zero
            } else if self.has_cluster(e) {
                Sc::Data
            } else {
                Sc::Unalloc
            });
        }
        let alloc = e.bm >> i & 1 != 0;
        let zero = e.bm >> (32 + i) & 1 != 0;
        match (alloc, zero) {
            (true, true) => Err(format!("subcluster {i} is both allocated and zero")),
            (true, false) if !self.has_cluster(e) => {
                Err(format!("subcluster {i} allocated without a cluster"))
            }
            (true, false) => Ok(Sc::Data),
            (false, true) => Ok(Sc::Zero),
            (false, false) => Ok(Sc::Unalloc),
        }
    }
}

/// The flush gate's state (see the module doc).
#[derive(Debug, Default)]
struct Gate {
    /// The write generation the last successful flush covered.
    flushed_gen: u64,
}

#[derive(Debug)]
pub struct Qcow2 {
    f: HostFile,
    geo: Geo,
    header: Header,
    l1_offset: u64,
    meta: Mutex<Meta>,
    stripes: Box<[RwLock<()>]>,
    gate: Mutex<Gate>,
    /// Bumped after every completed guest write, zeroing or discard.
    write_gen: AtomicU64,
    /// Set once the image was marked corrupt: every later request fails.
    corrupt: AtomicBool,
    /// A read-only image reports its first corruption only.
    corrupt_reported: AtomicBool,
    backing: Option<Arc<dyn BlockBackend>>,
    opts: Qcow2Options,
    /// Reads may be spliced from the page cache (`open.rs`, `spliceable`).
    splice_reads: bool,
    snapshots: Vec<snapshot::Snapshot>,
    /// The last cluster inflated, by descriptor: small sequential reads of a compressed
    /// cluster inflate it once. Freed compressed bytes can be written again under the same
    /// descriptor (the `compress` filter): linking one forgets it (`forget_inflated`).
    last_inflated: Mutex<Option<(u64, Arc<Vec<u8>>)>>,
    /// Persistent dirty bitmaps; `tracking` says whether any enabled one needs marking.
    bitmaps: Mutex<Option<bitmap::Bitmaps>>,
    tracking: AtomicBool,
    /// The unlocked LUKS volume of an encrypted image (`crypt.rs`).
    crypto: Option<crate::luks::Luks>,
    /// The external data file, where data clusters live instead (`data_file.rs`).
    data: Option<data_file::DataFile>,
    /// True once closing began. Writes hold it shared from their start to the marking of
    /// the bitmaps, so none can land after the bitmaps were stored as consistent.
    closing: RwLock<bool>,
}

impl Qcow2 {
    pub fn path(&self) -> &Path {
        self.f.path()
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

    /// The image file (tests attach a recorder before opening, see `open_file`).
    pub fn host_file(&self) -> &HostFile {
        &self.f
    }

    /// The file data clusters live in: the external data file, or the image file itself.
    fn df(&self) -> &HostFile {
        self.data.as_ref().map_or(&self.f, |d| &d.file)
    }

    fn external_data(&self) -> bool {
        self.data.is_some()
    }

    /// Does this entry's host cluster belong to its guest cluster alone, so it may be
    /// written in place or kept? (With an external data file every plain cluster does.)
    fn owns(&self, e: Entry) -> bool {
        if self.external_data() {
            self.geo.has_cluster(e)
        } else {
            e.owned_host()
        }
    }

    fn stripe(&self, g: u64) -> &RwLock<()> {
        &self.stripes[(g as usize) % STRIPES]
    }

    fn corrupt_err(&self, msg: String) -> Error {
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
        self.geo.state(e, i).map_err(|m| self.corrupt_err(m))
    }

    /// Run a metadata step under the lock; when it needs the refcount table to grow, grow it
    /// (outside the lock, under the gate) and run the step again.
    fn with_meta<T>(&self, mut step: impl FnMut(&mut Meta) -> Result<Step<T>>) -> Result<T> {
        loop {
            let r = step(&mut self.meta.lock())?;
            match r {
                Step::Done(v) => return Ok(v),
                Step::Grow(r) => self.grow_refcounts(r)?,
            }
        }
    }

    /// Make the refcount table cover range `r`.
    fn grow_refcounts(&self, r: u64) -> Result<()> {
        let _g = self.gate.lock();
        let mut m = self.meta.lock();
        if m.rc.covers(r) {
            return Ok(());
        }
        let v = m.bump();
        let Meta { rc, map, .. } = &mut *m;
        rc.grow(&self.f, r, v, map)?;
        m.cover(&self.f)
    }

    /// Refuse I/O once the image was marked corrupt (qemu detaches the driver: ENOMEDIUM).
    fn usable(&self) -> Result<()> {
        if self.corrupt.load(Ordering::Acquire) {
            return Err(Error::NoMedium);
        }
        Ok(())
    }

    /// qemu's qcow2_signal_corruption: a writable image gets the corrupt bit and refuses all
    /// further I/O; a read-only one only reports it. Messages go to stderr once, as qemu's.
    fn signal_corruption(&self, e: &Error) {
        let Error::Corrupt { msg, .. } = e else {
            return;
        };
        if self.opts.read_only {
            if !self.corrupt_reported.swap(true, Ordering::AcqRel) {
                eprintln!("qcow2: Image is corrupt: {msg}; further non-fatal corruption events will be suppressed");
            }
            return;
        }
        if self.corrupt.swap(true, Ordering::AcqRel) {
            return;
        }
        eprintln!(
            "qcow2: Marking image as corrupt: {msg}; further corruption events will be suppressed"
        );
        let bits = self.header.incompatible | header::INCOMPAT_CORRUPT;
        let r = self
            .f
            .write(
                "mark image corrupt",
                header::OFF_INCOMPAT,
                &bits.to_be_bytes(),
                false,
            )
            .and_then(|()| self.f.sync());
        if let Err(e) = r {
            tracing::error!("marking '{}' corrupt: {e}", self.f.path().display());
        }
    }

    /// Pass a request's result through, signalling corruption it found.
    fn checked<T>(&self, r: Result<T>) -> Result<T> {
        if let Err(e @ Error::Corrupt { .. }) = &r {
            self.signal_corruption(e);
        }
        r
    }

    /// Read from the backing file; past its end (or without one) reads zeroes.
    fn read_backing(&self, pos: u64, buf: &mut [u8]) -> Result<()> {
        crate::backing::read(self.backing.as_ref(), pos, buf)
    }

    /// `read_backing`, if the backing file can do it without waiting.
    fn try_read_backing(&self, pos: u64, buf: &mut [u8]) -> bool {
        let Some(b) = &self.backing else {
            buf.fill(0);
            return true;
        };
        let n = b.size().saturating_sub(pos).min(buf.len() as u64) as usize;
        if n > 0 && !b.try_read(pos, &mut buf[..n]) {
            return false;
        }
        buf[n..].fill(0);
        true
    }

    fn backing_is_zero(&self, pos: u64) -> bool {
        self.backing.as_ref().is_none_or(|b| pos >= b.size())
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
}

/// A backing name is relative to the directory of the image that names it (a `json:` name
/// is options, not a path).
pub fn resolve_backing(image: &Path, name: &str) -> PathBuf {
    let p = Path::new(name);
    if p.is_absolute() || name.starts_with("json:") {
        return p.to_path_buf();
    }
    match image.parent() {
        Some(dir) => dir.join(p),
        None => p.to_path_buf(),
    }
}
