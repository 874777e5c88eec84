//! Opening a qcow2 image, one step per function: the header (repairing a dirty image first),
//! the geometry, the L1 table (active or a snapshot's), the refcounts and the metadata map,
//! the backing file, the bitmaps.

use super::cache::TableCache;
use super::header::{self, Header};
use super::meta::Meta;
use super::overlap::{Kind, MetaMap};
use super::refcount::Refcounts;
use super::{bitmap, repair, resolve_backing, snapshot, Gate, Geo, Qcow2, STRIPES};
use crate::file::{FileOptions, HostFile};
use crate::format::{BackingChoice, OpenBacking};
use crate::{BlockBackend, Error, Result};
use parking_lot::{Mutex, RwLock};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::Arc;

/// Bytes of L2 tables kept in memory.
const L2_CACHE_BYTES: usize = 32 << 20;

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
    /// `encrypt.key-secret=` and `encrypt.format=` of an encrypted image.
    pub encrypt: crate::format::EncryptOptions,
    /// `data-file.filename=`: the external data file instead of the one the header names.
    pub data_file: Option<std::path::PathBuf>,
    /// How the external data file is opened (O_DIRECT, aio, locks); `read_only` is ours.
    pub data_file_opts: FileOptions,
}

fn backing_err(e: Error) -> Error {
    Error::Backing(Box::new(e))
}

impl Qcow2 {
    /// Open the image; `open_backing` opens a backing file read-only given its resolved path
    /// and `backing_fmt` (the caller keeps probing and the depth limit in one place).
    pub fn open(path: &Path, opts: Qcow2Options, open_backing: &OpenBacking<'_>) -> Result<Qcow2> {
        let file_opts = FileOptions {
            read_only: opts.read_only,
            direct: opts.direct,
            ..Default::default()
        };
        let f = HostFile::open(path, &file_opts)?;
        let opts = Qcow2Options {
            data_file_opts: file_opts,
            ..opts
        };
        Self::open_file(f, opts, open_backing)
    }

    /// Open over an image file the caller opened (tests attach a recorder to it first).
    pub fn open_file(
        f: HostFile,
        opts: Qcow2Options,
        open_backing: &OpenBacking<'_>,
    ) -> Result<Qcow2> {
        let h = read_header(&f, &opts)?;
        // qemu unlocks the image before it repairs a dirty one.
        let crypto = super::crypt::open(&f, &h, &opts.encrypt)?;
        let h = repair_if_dirty(&f, &opts, h)?;
        let data = super::data_file::open(&h, &opts)?;
        let geo = geometry(&h);
        let (snapshots, snap_bytes) =
            snapshot::read_table(&f, h.snapshots_offset, h.nb_snapshots, geo.cs)?;
        let (l1, size) = load_l1(&f, &h, &geo, &opts, &snapshots)?;
        let geo = Geo { size, ..geo };
        let file_len = f.size()?;
        let mut map = MetaMap::new(geo.cluster_bits);
        map.add_range(Kind::ActiveL1, h.l1_table_offset, u64::from(h.l1_size) * 8);
        map.add_range(Kind::SnapshotTable, h.snapshots_offset, snap_bytes);
        for s in &snapshots {
            map.add_range(
                Kind::InactiveL1,
                s.l1_table_offset,
                u64::from(s.l1_size) * 8,
            );
        }
        if let Some(ext) = h.bitmaps {
            map.add_range(Kind::BitmapDir, ext.dir_offset, ext.dir_size);
        }
        let rc = Refcounts::open(
            &f,
            h.cluster_bits,
            h.refcount_order,
            h.refcount_table_offset,
            u64::from(h.refcount_table_clusters),
            file_len,
            &mut map,
        )?;
        for e in &l1 {
            let off = e & super::meta::OFFSET_MASK;
            if off != 0 && opts.load_snapshot.is_none() {
                map.add_cluster(Kind::ActiveL2, off);
            }
        }
        let backing = open_backing_file(f.path(), &h, &opts, open_backing)?;
        let bitmaps = open_bitmaps(&f, &h, &geo, &opts, file_len)?;
        let tracking = bitmaps
            .as_ref()
            .is_some_and(|b| !opts.read_only && b.list.iter().any(|x| x.enabled()));
        let l2 = TableCache::new(L2_CACHE_BYTES, geo.cs as usize);
        let splice_reads = spliceable(&opts, &geo, crypto.is_some(), data.is_some());
        let mut meta = Meta::new(l1, l2, rc, map, file_len);
        // Frees of data clusters only happen inside the image file.
        meta.quarantine_data = splice_reads && !opts.read_only && data.is_none();
        meta.punch_frees = opts.discard && !opts.read_only && data.is_none();
        Ok(Qcow2 {
            l1_offset: h.l1_table_offset,
            meta: Mutex::new(meta),
            splice_reads,
            f,
            geo,
            header: h,
            stripes: (0..STRIPES).map(|_| RwLock::new(())).collect(),
            gate: Mutex::new(Gate::default()),
            write_gen: AtomicU64::new(0),
            corrupt: AtomicBool::new(false),
            corrupt_reported: AtomicBool::new(false),
            backing,
            opts,
            snapshots,
            last_inflated: Mutex::new(None),
            bitmaps: Mutex::new(bitmaps),
            tracking: AtomicBool::new(tracking),
            closing: RwLock::new(false),
            crypto,
            data,
        })
    }
}

/// Whether reads may be spliced from the page cache (`Qcow2::contiguous_span`): the bytes
/// must be in the file as they are (no cipher), and no cluster a pipe may hold may get
/// another guest range's data. Nothing frees a cluster of a read-only image. A writable one
/// quarantines the data clusters it frees (`Meta::quarantine_data`), which is only cheap where
/// frees are rare: v3 (a v2 image frees a cluster to zero it) without `--discard=unmap`.
/// With them, reads copy, as before. An external data file's clusters only ever hold their
/// own guest range (`data_file.rs`): nothing to quarantine.
fn spliceable(opts: &Qcow2Options, geo: &Geo, encrypted: bool, external: bool) -> bool {
    !encrypted && (opts.read_only || external || (geo.version >= 3 && !opts.discard))
}

/// Parse the header; a read-write open refuses a corrupt image.
fn read_header(f: &HostFile, opts: &Qcow2Options) -> Result<Header> {
    let open_err = Error::Header;
    let file_len = f.size()?;
    let mut head = vec![0u8; 4096.min(file_len as usize)];
    f.read("read header", 0, &mut head)?;
    let bits = header::peek_cluster_bits(&head).map_err(open_err)?;
    let mut first = vec![0u8; (1u64 << bits).min(file_len) as usize];
    f.read("read header", 0, &mut first)?;
    let h = header::parse(&first, file_len).map_err(open_err)?;
    if !opts.read_only && h.incompatible & header::INCOMPAT_CORRUPT != 0 {
        return Err(Error::CorruptReadWrite);
    }
    Ok(h)
}

/// A read-write open repairs a dirty image (unflushed lazy refcounts, rebuilt as qemu does,
/// bitmaps dropped first so their clusters may be counted as free), then reads the header
/// again.
fn repair_if_dirty(f: &HostFile, opts: &Qcow2Options, h: Header) -> Result<Header> {
    if opts.read_only || h.incompatible & header::INCOMPAT_DIRTY == 0 {
        return Ok(h);
    }
    clear_autoclear(f, &h)?;
    let (snaps, len) =
        snapshot::read_table(f, h.snapshots_offset, h.nb_snapshots, 1 << h.cluster_bits)?;
    repair::rebuild(f, &h, &snaps, len)?;
    read_header(f, opts)
}

fn geometry(h: &Header) -> Geo {
    let extended = h.extended_l2();
    let cb = h.cluster_bits;
    Geo {
        version: h.version,
        cluster_bits: cb,
        cs: 1 << cb,
        l2_bits: cb - if extended { 4 } else { 3 },
        extended,
        sc_bits: if extended { cb - 5 } else { cb },
        // qemu counts whole sectors.
        size: h.size & !511,
        compression: h.compression,
        external_data: h.incompatible & header::INCOMPAT_DATA_FILE != 0,
    }
}

/// `snapshot.id=ID,snapshot.name=NAME` (qemu's option syntax: `,,` is a comma, the last of
/// a key counts, a bare key is `on`): the id and the name asked for.
fn snapshot_keys(spec: &str) -> (Option<String>, Option<String>) {
    let (mut id, mut name) = (None, None);
    let mut items = Vec::new();
    let mut cur = String::new();
    let mut chars = spec.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            ',' if chars.peek() == Some(&',') => {
                chars.next();
                cur.push(',');
            }
            ',' => items.push(std::mem::take(&mut cur)),
            c => cur.push(c),
        }
    }
    items.push(cur);
    for item in items {
        let (k, v) = item.split_once('=').unwrap_or((item.as_str(), "on"));
        match k {
            "snapshot.id" => id = Some(v.to_string()),
            "snapshot.name" => name = Some(v.to_string()),
            _ => {}
        }
    }
    (id, name)
}

/// The L1 table to serve and the guest size: the active ones, or a snapshot's (`-l`).
fn load_l1(
    f: &HostFile,
    h: &Header,
    geo: &Geo,
    opts: &Qcow2Options,
    snapshots: &[snapshot::Snapshot],
) -> Result<(Vec<u64>, u64)> {
    let Some(want) = &opts.load_snapshot else {
        return Ok((
            read_l1(f, h.l1_table_offset, h.l1_size, "read L1 table")?,
            geo.size,
        ));
    };
    if !opts.read_only {
        return Err(Error::Open(
            "Loading a snapshot requires a read-only image".into(),
        ));
    }
    let found = if want.starts_with("snapshot.") {
        let (id, name) = snapshot_keys(want);
        snapshots.iter().find(|s| {
            (id.is_some() || name.is_some())
                && id.as_ref().is_none_or(|i| &s.id == i)
                && name.as_ref().is_none_or(|n| &s.name == n)
        })
    } else {
        snapshots
            .iter()
            .find(|s| &s.id == want)
            .or_else(|| snapshots.iter().find(|s| &s.name == want))
    };
    let s = found.ok_or_else(|| Error::LoadSnapshot("Can't find snapshot".into()))?;
    let size = s.disk_size.unwrap_or(h.size);
    let needed = size.div_ceil(1u64 << (geo.cluster_bits + geo.l2_bits));
    if u64::from(s.l1_size) < needed || size > i64::MAX as u64 {
        return Err(f.corrupt(format!("snapshot '{want}': L1 table too small")));
    }
    let l1 = read_l1(f, s.l1_table_offset, s.l1_size, "read snapshot L1 table")?;
    Ok((l1, size & !511))
}

fn read_l1(f: &HostFile, offset: u64, entries: u32, op: &'static str) -> Result<Vec<u64>> {
    let mut raw = vec![0u8; entries as usize * 8];
    f.read(op, offset, &mut raw)?;
    Ok(raw
        .chunks_exact(8)
        .map(|c| u64::from_be_bytes(c.try_into().unwrap_or([0; 8])))
        .collect())
}

fn open_backing_file(
    path: &Path,
    h: &Header,
    opts: &Qcow2Options,
    open_backing: &OpenBacking<'_>,
) -> Result<Option<Arc<dyn BlockBackend>>> {
    let named = h.backing_file.as_deref().filter(|n| !n.is_empty());
    let b = match (&opts.backing, named) {
        (BackingChoice::None, _) => None,
        (BackingChoice::File(p, fmt), _) => Some(open_backing(p, fmt.as_deref())),
        (BackingChoice::HeaderAs(fmt), Some(name)) => {
            Some(open_backing(&resolve_backing(path, name), Some(fmt)))
        }
        (BackingChoice::FromHeader, Some(name)) => Some(open_backing(
            &resolve_backing(path, name),
            h.backing_format.as_deref(),
        )),
        _ => None,
    };
    b.transpose().map_err(backing_err)
}

/// Load the bitmaps. Read-write, mark the ones we now own IN_USE on disk and clear the
/// autoclear bits we do not implement; when the bitmaps cannot be understood, clear their
/// bit too, so qemu treats them as inconsistent instead of trusting stale ones.
fn open_bitmaps(
    f: &HostFile,
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
                    tracing::warn!("{}: ignoring its dirty bitmaps: {e}", f.path().display());
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
    let keep = h.autoclear & header::AUTOCLEAR_BITMAPS | kept_autoclear(h);
    if h.autoclear != keep {
        f.write(
            "write header",
            header::OFF_AUTOCLEAR,
            &keep.to_be_bytes(),
            false,
        )?;
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
                false,
            )?;
            any = true;
        }
    }
    if any || h.autoclear != keep {
        f.sync()?;
    }
    Ok(Some(b))
}

/// The autoclear bits other than the bitmaps' that this engine keeps true: `data_file_raw`
/// of an image with a data file (`data_file.rs`).
fn kept_autoclear(h: &Header) -> u64 {
    if h.incompatible & header::INCOMPAT_DATA_FILE != 0 {
        h.autoclear & header::AUTOCLEAR_DATA_FILE_RAW
    } else {
        0
    }
}

/// As the spec asks of software that does not know an autoclear feature, clear the bits
/// (but the ones kept, `kept_autoclear`) before any write: qemu then treats the bitmaps as
/// inconsistent (and their clusters as leaked) instead of trusting stale ones.
pub(super) fn clear_autoclear(f: &HostFile, h: &Header) -> Result<()> {
    let keep = kept_autoclear(h);
    if h.autoclear != keep {
        f.write(
            "write header",
            header::OFF_AUTOCLEAR,
            &keep.to_be_bytes(),
            false,
        )?;
        f.sync()?;
    }
    Ok(())
}
