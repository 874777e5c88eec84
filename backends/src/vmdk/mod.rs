//! VMDK images (VMware's virtual disks) as qemu's `vmdk` driver serves them: monolithic
//! sparse and stream-optimized images (a `KDMV` extent with its descriptor inside), and
//! descriptor files naming flat and sparse extents (monolithicFlat, twoGbMaxExtentSparse,
//! twoGbMaxExtentFlat, vmfs, vmfsSparse); a delta disk reads through its parent
//! (`parentFileNameHint`). Not here: VMDK3 (`COWD`) and ESXi seSparse extents.
//!
//! # The write path's rules
//!
//! - A write to an allocated grain goes to its place in the extent file, without a lock.
//! - A write to an unallocated (or zeroed) grain takes the extent's allocation lock, looks
//!   again (another writer may have allocated it meanwhile, and then it is an overwrite),
//!   builds the whole grain (the backing file's bytes, or zeroes, around the new ones),
//!   writes it at the end of the file, and only then links it in the grain table and the
//!   redundant one. The lock is held from the look-up to the link, so two writers never
//!   allocate one grain twice and no write lands in a grain that is about to be replaced.
//! - Grain tables are read into memory and changed in the file only while the table lock is
//!   held (lock order: allocation, then tables), so no stale copy of a table is ever cached.
//! - Order on disk: a new grain always lies past the file's old end, so a table entry that
//!   reaches the disk before its grain's data points at bytes that were never anything else
//!   (they read as zeroes): no sync is needed between data and link, and a crash loses at
//!   most writes that were not flushed. FLUSH syncs every extent file; a FUA write syncs its
//!   extent file after the link. Nothing is ever freed, so nothing is reused.
//! - The first write after opening gives the descriptor a new CID (as qemu, so delta disks
//!   made from the old content notice), written and synced before the data.

mod descriptor;
mod header;
mod sparse;

use crate::file::lock::Role;
use crate::file::HostFile;
use crate::format::{backing_option, BackingChoice, Driver, ImageOptions, OpenBacking};
use crate::{backing, BlockBackend, Caps, Error, Extent, ExtentFlags, Extents, IoFlags, Result};
use descriptor::ExtentKind;
use header::Header;
use parking_lot::Mutex;
use sparse::{Gte, Sparse};
use std::sync::Arc;

pub static DRIVER: Driver = Driver {
    name: "vmdk",
    probe: descriptor::probe,
    open,
    option,
    has_metadata: true,
};

/// Extents reported by one block-status call at most.
const MAX_EXTENTS: usize = 1024;
/// The descriptor inside a hosted sparse extent is where qemu looks for it.
const EMBEDDED_DESC_AT: u64 = 0x200;

fn option(key: &str, v: &str, opts: &mut ImageOptions) -> Option<std::result::Result<(), String>> {
    backing_option(key, v, opts)
}

#[derive(Debug)]
enum Kind {
    /// The disk's bytes at `start` of `f`.
    Flat {
        f: Arc<HostFile>,
        start: u64,
    },
    Sparse(Sparse),
}

#[derive(Debug)]
struct Piece {
    /// Where the extent begins in the disk.
    start: u64,
    len: u64,
    kind: Kind,
}

/// Where the descriptor text lives, for the CID update.
#[derive(Debug)]
struct DescPlace {
    f: Arc<HostFile>,
    at: u64,
    /// The bytes it may take (the embedded region); None: the whole file is the text.
    region: Option<usize>,
}

#[derive(Debug)]
pub struct Vmdk {
    pieces: Vec<Piece>,
    size: u64,
    backing: Option<Arc<dyn BlockBackend>>,
    read_only: bool,
    desc: DescPlace,
    /// Every file holding extents, once each (what FLUSH syncs).
    files: Vec<Arc<HostFile>>,
    /// Whether this open has renewed the CID yet (held while it does).
    cid_renewed: Mutex<bool>,
    /// The most one block-status call looks at: [`MAX_EXTENTS`] of the smallest grain.
    status_span: u64,
}

fn read_text(f: &HostFile, at: u64, max: usize) -> Result<String> {
    let len = f.size()?.saturating_sub(at).min(max as u64) as usize;
    let mut b = vec![0u8; len];
    f.read("read descriptor", at, &mut b)?;
    Ok(descriptor::text(&b))
}

fn sparse_header(f: &HostFile) -> Result<Header> {
    let mut s = [0u8; 512];
    f.read("read header", 0, &mut s)?;
    match &s[..4] {
        b"KDMV" => Ok(Header::parse(&s)),
        b"COWD" => Err(Error::Open(
            "VMDK3 (COWD) sparse extents are not supported".into(),
        )),
        _ => Err(Error::Open("Image not in VMDK format".into())),
    }
}

fn open(
    file: HostFile,
    opts: &ImageOptions,
    open_backing: &OpenBacking<'_>,
) -> Result<Arc<dyn BlockBackend>> {
    let read_only = opts.read_only || opts.snapshot;
    let f = Arc::new(file);
    if f.size()? < 4 {
        return Err(Error::Open("File is too small, not a valid image".into()));
    }
    let mut head = [0u8; 4];
    f.read("read header", 0, &mut head)?;
    let (pieces, desc) = match &head {
        b"KDMV" | b"COWD" => {
            let h = sparse_header(&f)?;
            if h.capacity == 0 && h.desc_offset != 0 {
                let at = h.desc_offset.saturating_mul(512);
                let text = read_text(&f, at, descriptor::MAX_TEXT)?;
                let place = DescPlace {
                    f: f.clone(),
                    at,
                    region: Some(descriptor::EMBEDDED_SIZE),
                };
                (open_extents(&f, &text, opts)?, place)
            } else {
                let s = Sparse::open(f.clone(), h, !read_only)?;
                let len = s.bytes;
                let piece = Piece {
                    start: 0,
                    len,
                    kind: Kind::Sparse(s),
                };
                let place = DescPlace {
                    f: f.clone(),
                    at: EMBEDDED_DESC_AT,
                    region: Some(descriptor::EMBEDDED_SIZE),
                };
                (vec![piece], place)
            }
        }
        _ => {
            let text = read_text(&f, 0, descriptor::MAX_TEXT)?;
            let place = DescPlace {
                f: f.clone(),
                at: 0,
                region: None,
            };
            (open_extents(&f, &text, opts)?, place)
        }
    };
    let text = desc_text(&desc)?;
    if descriptor::cid(&text, false).is_none() || descriptor::cid(&text, true).is_none() {
        return Err(Error::Open(format!(
            "Could not open '{}': Invalid argument",
            f.path().display()
        )));
    }
    let backing = open_parent(&f, &text, opts, open_backing)?;
    let size = pieces.last().map_or(0, |p| p.start + p.len);
    let mut files: Vec<Arc<HostFile>> = Vec::new();
    for p in &pieces {
        let pf = match &p.kind {
            Kind::Flat { f, .. } => f,
            Kind::Sparse(s) => &s.f,
        };
        if !files.iter().any(|x| Arc::ptr_eq(x, pf)) {
            files.push(pf.clone());
        }
    }
    let min_grain = pieces
        .iter()
        .filter_map(|p| match &p.kind {
            Kind::Sparse(s) => Some(s.grain),
            Kind::Flat { .. } => None,
        })
        .min();
    let status_span = min_grain.map_or(u64::MAX, |g| g.saturating_mul(MAX_EXTENTS as u64));
    Ok(Arc::new(Vmdk {
        status_span,
        pieces,
        size,
        backing,
        read_only,
        desc,
        files,
        cid_renewed: Mutex::new(false),
    }))
}

fn desc_text(d: &DescPlace) -> Result<String> {
    read_text(&d.f, d.at, d.region.unwrap_or(descriptor::MAX_TEXT))
}

/// The extents a descriptor names (qemu's `vmdk_open_desc_file`), each file opened as the
/// image was (read-only or not, direct or not, with qemu's locks).
fn open_extents(desc_file: &HostFile, text: &str, opts: &ImageOptions) -> Result<Vec<Piece>> {
    let ct = descriptor::quoted(text, "createType")
        .ok_or_else(|| Error::Open("invalid VMDK image descriptor".into()))?;
    const TYPES: [&str; 6] = [
        "monolithicFlat",
        "vmfs",
        "vmfsSparse",
        "seSparse",
        "twoGbMaxExtentSparse",
        "twoGbMaxExtentFlat",
    ];
    if !TYPES.contains(&ct.as_str()) {
        return Err(Error::Open(format!("Unsupported image type '{ct}'")));
    }
    let read_only = opts.read_only || opts.snapshot;
    let mut pieces = Vec::new();
    let mut start = 0u64;
    for line in descriptor::extents(text).map_err(Error::Open)? {
        let path = crate::qcow2::resolve_backing(desc_file.path(), &line.file);
        let role = match line.kind {
            _ if opts.chain_depth > 0 || opts.snapshot => Role::Backing,
            ExtentKind::Flat => Role::DataFile,
            ExtentKind::Sparse => Role::Qcow2,
        };
        let f = Arc::new(HostFile::open(&path, &opts.file_options(role))?);
        let (len, kind) = match line.kind {
            ExtentKind::Flat => {
                let len = line.sectors.saturating_mul(512);
                let at = line.offset.saturating_mul(512);
                if at.checked_add(len).is_none_or(|end| end > i64::MAX as u64) {
                    return Err(Error::Open(format!(
                        "Invalid extent line: the extent of '{}' ends past any file",
                        line.file
                    )));
                }
                (len, Kind::Flat { f, start: at })
            }
            ExtentKind::Sparse => {
                let h = sparse_header(&f)?;
                let s = Sparse::open(f, h, !read_only)?;
                (s.bytes, Kind::Sparse(s))
            }
        };
        pieces.push(Piece { start, len, kind });
        start = start
            .checked_add(len)
            .filter(|s| *s <= i64::MAX as u64)
            .ok_or_else(|| Error::Open("Image size too big".into()))?;
    }
    Ok(pieces)
}

/// The parent of a delta disk (`parentFileNameHint`, a VMDK beside it), or the backing file
/// `--image-opts` names instead.
fn open_parent(
    f: &HostFile,
    text: &str,
    opts: &ImageOptions,
    open_backing: &OpenBacking<'_>,
) -> Result<Option<Arc<dyn BlockBackend>>> {
    let hint = descriptor::quoted(text, "parentFileNameHint").filter(|h| !h.is_empty());
    let b = match (&opts.backing, hint) {
        (BackingChoice::None, _) => None,
        (BackingChoice::File(p, fmt), _) => Some(open_backing(p, fmt.as_deref())),
        (BackingChoice::HeaderAs(fmt), Some(h)) => Some(open_backing(
            &crate::qcow2::resolve_backing(f.path(), &h),
            Some(fmt),
        )),
        (BackingChoice::FromHeader, Some(h)) => Some(open_backing(
            &crate::qcow2::resolve_backing(f.path(), &h),
            Some("vmdk"),
        )),
        (_, None) => None,
    };
    b.transpose().map_err(|e| Error::Backing(Box::new(e)))
}

impl Vmdk {
    /// The extent holding disk byte `pos`.
    fn piece(&self, pos: u64) -> Result<&Piece> {
        let i = self.pieces.partition_point(|p| p.start + p.len <= pos);
        self.pieces
            .get(i)
            .ok_or_else(|| Error::Invalid(format!("offset {pos:#x} is past the last extent")))
    }

    /// Split `[offset, offset + len)` where extents and grains end, calling `each` with
    /// (extent, disk position, length).
    fn each_piece(
        &self,
        offset: u64,
        len: u64,
        mut each: impl FnMut(&Piece, u64, u64) -> Result<()>,
    ) -> Result<()> {
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let p = self.piece(pos)?;
            let in_e = pos - p.start;
            let mut n = (end - pos).min(p.len - in_e);
            if let Kind::Sparse(s) = &p.kind {
                n = n.min(s.grain - in_e % s.grain);
            }
            each(p, pos, n)?;
            pos += n;
        }
        Ok(())
    }

    /// Give the descriptor a new CID once per open, before the first write lands.
    fn renew_cid(&self) -> Result<()> {
        let mut done = self.cid_renewed.lock();
        if *done {
            return Ok(());
        }
        let old = desc_text(&self.desc)?;
        let cid = random_cid();
        if let Some(new) = descriptor::with_cid(&old, cid) {
            let d = &self.desc;
            let mut bytes = new.into_bytes();
            match d.region {
                Some(region) if bytes.len() > region => {
                    tracing::warn!("{}: the new CID does not fit", d.f.path().display());
                }
                Some(_) => {
                    bytes.resize(bytes.len().max(old.len()), 0);
                    d.f.write("write descriptor", d.at, &bytes, true)?;
                }
                None => {
                    d.f.write("write descriptor", d.at, &bytes, false)?;
                    if bytes.len() < old.len() {
                        let truncate = match d.f.file() {
                            Some(f) => f.set_len(bytes.len() as u64),
                            // A remote descriptor keeps its size: the padding is zeroes.
                            None => {
                                d.f.write(
                                    "write descriptor",
                                    d.at + bytes.len() as u64,
                                    &vec![0u8; old.len() - bytes.len()],
                                    false,
                                )
                                .map_err(|_| std::io::ErrorKind::Other.into())
                            }
                        };
                        truncate.map_err(|e| {
                            d.f.err("truncate descriptor", 0, bytes.len() as u64, e)
                        })?;
                    }
                    d.f.sync()?;
                }
            }
        }
        *done = true;
        Ok(())
    }

    fn cow(&self, p: &Piece) -> impl Fn(u64, &mut [u8]) -> Result<()> + '_ {
        let start = p.start;
        move |in_e, buf| backing::read(self.backing.as_ref(), start + in_e, buf)
    }

    fn backing_is_zero(&self, pos: u64) -> bool {
        self.backing.as_ref().is_none_or(|b| pos >= b.size())
    }

    fn sync_all(&self) -> Result<()> {
        for f in &self.files {
            f.sync()?;
        }
        Ok(())
    }
}

fn random_cid() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish() as u32
}

impl BlockBackend for Vmdk {
    fn size(&self) -> u64 {
        self.size
    }

    fn caps(&self) -> Caps {
        Caps::image(self.read_only)
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.each_piece(offset, buf.len() as u64, |p, pos, n| {
            let out = &mut buf[(pos - offset) as usize..][..n as usize];
            let in_e = pos - p.start;
            match &p.kind {
                Kind::Flat { f, start } => f.read("read", start + in_e, out),
                Kind::Sparse(s) => match s.lookup(in_e / s.grain)? {
                    Gte::At(at) => s.read_grain(at, in_e % s.grain, out),
                    Gte::Zeroed => {
                        out.fill(0);
                        Ok(())
                    }
                    Gte::Unalloc => backing::read(self.backing.as_ref(), pos, out),
                },
            }
        })
    }

    fn write(&self, offset: u64, buf: &[u8], flags: IoFlags) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        self.renew_cid()?;
        let fua = flags.contains(IoFlags::FUA);
        self.each_piece(offset, buf.len() as u64, |p, pos, n| {
            let data = &buf[(pos - offset) as usize..][..n as usize];
            let in_e = pos - p.start;
            match &p.kind {
                Kind::Flat { f, start } => f.write("write", start + in_e, data, fua),
                Kind::Sparse(s) => s.write(in_e, pos, data, fua, &self.cow(p)),
            }
        })
    }

    fn flush(&self) -> Result<()> {
        self.sync_all()
    }

    /// qemu's vmdk driver has no discard: a trim changes nothing.
    fn trim(&self, _offset: u64, _len: u64, _flags: IoFlags) -> Result<()> {
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: IoFlags) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        self.renew_cid()?;
        self.each_piece(offset, len, |p, pos, n| {
            let in_e = pos - p.start;
            match &p.kind {
                Kind::Flat { f, start } => f.write_zeroes(start + in_e, n),
                Kind::Sparse(s) => match s.lookup(in_e / s.grain)? {
                    Gte::Zeroed => Ok(()),
                    Gte::Unalloc if self.backing_is_zero(pos) => Ok(()),
                    Gte::At(at) if !s.compressed => s.f.write_zeroes(at + in_e % s.grain, n),
                    _ if n == s.grain && s.zero_grain(in_e / s.grain)? => Ok(()),
                    _ => {
                        // In bounded pieces: the first allocates the grain, the rest overwrite.
                        let zero = vec![0u8; n.min(1 << 20) as usize];
                        let mut done = 0;
                        while done < n {
                            let k = (n - done).min(zero.len() as u64);
                            let z = &zero[..k as usize];
                            s.write(in_e + done, pos + done, z, false, &self.cow(p))?;
                            done += k;
                        }
                        Ok(())
                    }
                },
            }
        })?;
        if flags.contains(IoFlags::FUA) {
            self.sync_all()?;
        }
        Ok(())
    }

    fn block_status(&self, offset: u64, len: u64, out: &mut Extents) -> Result<()> {
        // Enough for one reply: the client asks again for the rest.
        let len = len.min(self.status_span);
        let mut hole: Option<(u64, u64)> = None;
        self.each_piece(offset, len, |p, pos, n| {
            let in_e = pos - p.start;
            let state = match &p.kind {
                Kind::Flat { f, start } => {
                    if let Some((h, hn)) = hole.take() {
                        backing::status(self.backing.as_ref(), h, hn, out)?;
                    }
                    f.zero_status(start + in_e, n, out);
                    return Ok(());
                }
                Kind::Sparse(s) => match s.lookup(in_e / s.grain)? {
                    Gte::At(_) => Some(ExtentFlags::empty()),
                    Gte::Zeroed => Some(ExtentFlags::HOLE | ExtentFlags::ZERO),
                    Gte::Unalloc => None,
                },
            };
            match state {
                None => hole.get_or_insert((pos, 0)).1 += n,
                Some(flags) => {
                    if let Some((h, hn)) = hole.take() {
                        backing::status(self.backing.as_ref(), h, hn, out)?;
                    }
                    out.push(Extent::new(n, flags, 1));
                }
            }
            Ok(())
        })?;
        if let Some((h, hn)) = hole {
            backing::status(self.backing.as_ref(), h, hn, out)?;
        }
        Ok(())
    }

    fn format_name(&self) -> &'static str {
        "vmdk"
    }

    fn close(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.sync_all()
    }
}
