//! Apple disk images (UDIF `.dmg`), read-only, as qemu's `dmg` driver reads them.
//!
//! A UDIF image ends with a 512-byte big-endian trailer (`koly`) that points at the data
//! fork and at the block tables, kept either in an XML property list (one base64 `mish`
//! block per partition, the modern form) or in an old-style resource fork. Each `mish` block
//! lists chunks: a run of guest sectors and where their bytes are (zeroes, stored as is, or
//! compressed with zlib, bzip2 or LZFSE).
//!
//! Followed from qemu 10.0 (`block/dmg.c`), in its order and words:
//!
//! - The trailer is looked for in the 515 bytes ending 508 bytes before the file's length
//!   rounded up to a sector (qemu's `bdrv_getlength`), so odd-sized files work.
//! - Chunks of types qemu does not know (comments, the terminator, anything else) are
//!   dropped while the tables are read; the kept ones are numbered in order (qemu's numbers
//!   in its "is larger than max" messages). Sector counts of data chunks and stored lengths
//!   of every chunk are capped at qemu's limits, so no chunk needs more than 64 MiB.
//! - A chunk is found by qemu's binary search (tables are sorted in real images); a sector
//!   no chunk covers fails its read with EIO, as does a compressed chunk that does not
//!   decompress to exactly its sectors.
//! - Block status: qemu's driver has none, so everything is data (the default).
//! - Opening without `-r` is refused ("Image is read-only"), as qemu-nbd refuses it.
//!
//! Where qnbd differs, on purpose: bzip2 and LZFSE chunks are read here (pure-Rust decoders),
//! while Debian's qemu build lacks those modules and so drops such chunks (their sectors
//! fail with EIO). A stored chunk whose length is shorter than its sectors fails the sectors
//! past its length with EIO (qemu returns whatever its buffer held). An empty chunk table
//! fails every read with EIO (qemu 10.0.2 crashes). Where chunks overlap, the binary search
//! alone decides (qemu first tries the chunk it read last). Bytes read past the file's end
//! are zeroes, as in qemu.

use crate::file::HostFile;
use crate::format::{Driver, ImageOptions, OpenBacking};
use crate::{BlockBackend, Caps, Error, Result};
use parking_lot::Mutex;
use std::collections::VecDeque;
use std::sync::Arc;

pub static DRIVER: Driver = Driver {
    name: "dmg",
    // qemu's dmg probe looks at the file name only (a ".dmg" suffix, scored just above
    // raw): `open.rs` asks [`probe_name`] once every header probe has said no.
    probe: |_| false,
    open,
    option: |_, _, _| None,
    has_metadata: true,
};

const SECTOR: u64 = 512;
/// qemu's caps: no chunk's stored bytes, nor a data chunk's sectors, past 64 MiB.
const LENGTHS_MAX: u64 = 64 * 1024 * 1024;
const SECTORCOUNTS_MAX: u64 = LENGTHS_MAX / SECTOR;
/// qemu's cap on the XML property list.
const XML_MAX: u64 = 16 * 1024 * 1024;
/// Decompressed chunks kept for the next reads: a few (several connections reading
/// sequentially each keep theirs), within a byte budget past which only the latest stays
/// (a chunk is at most 64 MiB; Apple's tools write 1 MiB chunks).
const CACHED_CHUNKS: usize = 8;
const CACHE_BYTES: usize = 64 << 20;
/// qemu's largest offset a read may start at (`BDRV_MAX_LENGTH`): past it, EIO.
const MAX_LENGTH: u64 = (i64::MAX as u64) & !((1 << 30) - 1);

const MISH: u32 = 0x6d69_7368;
const KOLY: &[u8; 4] = b"koly";

/// qemu's name probe: a file name ending in ".dmg" (and longer than that).
pub fn probe_name(name: &str) -> bool {
    name.len() > 4 && name.ends_with(".dmg")
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// Zeroes (UDZE) and ignored sectors (UDIG): both read as zeroes.
    Zero,
    /// Stored as is (UDRW).
    Raw,
    Zlib,
    Bzip2,
    Lzfse,
}

impl Kind {
    fn from_type(t: u32) -> Option<Kind> {
        Some(match t {
            0 | 2 => Kind::Zero,
            1 => Kind::Raw,
            0x8000_0005 => Kind::Zlib,
            0x8000_0006 => Kind::Bzip2,
            0x8000_0007 => Kind::Lzfse,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Zero => "zero",
            Kind::Raw => "raw",
            Kind::Zlib => "zlib",
            Kind::Bzip2 => "bzip2",
            Kind::Lzfse => "lzfse",
        }
    }
}

/// One chunk of the table: guest sectors `[sector, sector + count)`, stored as `kind` in
/// the `length` bytes at file offset `offset`.
#[derive(Clone, Copy, Debug)]
struct Chunk {
    kind: Kind,
    sector: u64,
    count: u64,
    offset: u64,
    length: u64,
}

impl Chunk {
    /// qemu's `is_sector_in_chunk` (the end wraps as qemu's does).
    fn holds(&self, s: u64) -> bool {
        self.sector <= s && self.sector.wrapping_add(self.count) > s
    }
}

#[derive(Debug)]
pub struct Dmg {
    f: HostFile,
    sectors: u64,
    chunks: Vec<Chunk>,
    /// The last decompressed chunks, most recent first: (chunk index, its sectors' bytes).
    cache: Mutex<VecDeque<(usize, Arc<Vec<u8>>)>>,
    /// Held while a chunk is decompressed: one at a time, so memory stays bounded.
    inflating: Mutex<()>,
}

fn be32(b: &[u8], at: usize) -> u32 {
    let mut v = [0u8; 4];
    v.copy_from_slice(&b[at..at + 4]);
    u32::from_be_bytes(v)
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(v)
}

/// qemu's open failing with EINVAL and no message of its own.
fn einval(f: &HostFile) -> Error {
    Error::Open(format!(
        "Could not open '{}': Invalid argument",
        f.path().display()
    ))
}

/// qemu's failed allocation.
fn enomem(f: &HostFile) -> Error {
    Error::Open(format!(
        "Could not open '{}': Cannot allocate memory",
        f.path().display()
    ))
}

/// A zeroed buffer of `len` bytes, or ENOMEM.
fn buffer(f: &HostFile, len: u64) -> Result<Vec<u8>> {
    let mut v = Vec::new();
    let n = usize::try_from(len).map_err(|_| enomem(f))?;
    v.try_reserve_exact(n).map_err(|_| enomem(f))?;
    v.resize(n, 0);
    Ok(v)
}

fn read_u32(f: &HostFile, at: u64) -> Result<u32> {
    let mut b = [0u8; 4];
    f.read("read dmg header", at, &mut b)?;
    Ok(u32::from_be_bytes(b))
}

fn read_u64(f: &HostFile, at: u64) -> Result<u64> {
    let mut b = [0u8; 8];
    f.read("read dmg header", at, &mut b)?;
    Ok(u64::from_be_bytes(b))
}

/// The offset of the `koly` trailer (qemu's `dmg_find_koly_offset`).
fn find_koly(f: &HostFile) -> Result<u64> {
    // qemu measures the file in whole sectors.
    let length = f.size()?.div_ceil(SECTOR) * SECTOR;
    if length < SECTOR {
        return Err(Error::Open(
            "dmg file must be at least 512 bytes long".into(),
        ));
    }
    let start = length.saturating_sub(511 + 512);
    let mut window = vec![0u8; length.min(515) as usize];
    f.read("read UDIF trailer", start, &mut window)?;
    window
        .windows(4)
        .position(|w| w == KOLY)
        .map(|i| start + i as u64)
        .ok_or_else(|| Error::Open("Could not locate UDIF trailer in dmg file".into()))
}

/// The chunk table as it is read: the data fork's offset applies to every `mish` block.
struct Table<'a> {
    f: &'a HostFile,
    data_fork: u64,
    chunks: Vec<Chunk>,
}

impl Table<'_> {
    /// One `mish` block (qemu's `dmg_read_mish_block`): anything else is skipped.
    fn mish(&mut self, b: &[u8]) -> Result<()> {
        if b.len() < 244 || be32(b, 0) != MISH {
            return Ok(());
        }
        let first = be64(b, 8);
        let base = self.data_fork.wrapping_add(be64(b, 0x18));
        let entries = &b[204..];
        let n = entries.len() / 40;
        self.chunks.try_reserve(n).map_err(|_| enomem(self.f))?;
        for e in entries.chunks_exact(40) {
            let Some(kind) = Kind::from_type(be32(e, 0)) else {
                continue;
            };
            let i = self.chunks.len();
            let count = be64(e, 0x10);
            if kind != Kind::Zero && count > SECTORCOUNTS_MAX {
                crate::file::lock::error_report(&format!(
                    "sector count {count} for chunk {i} is larger than max ({SECTORCOUNTS_MAX})"
                ));
                return Err(einval(self.f));
            }
            let length = be64(e, 0x20);
            if length > LENGTHS_MAX {
                crate::file::lock::error_report(&format!(
                    "length {length} for chunk {i} is larger than max ({LENGTHS_MAX})"
                ));
                return Err(einval(self.f));
            }
            self.chunks.push(Chunk {
                kind,
                sector: be64(e, 8).wrapping_add(first),
                count,
                offset: be64(e, 0x18).wrapping_add(base),
                length,
            });
        }
        Ok(())
    }

    /// The old resource fork: a header, then length-prefixed resources (qemu's
    /// `dmg_read_resource_fork`).
    fn resource_fork(&mut self, begin: u64, length: u64) -> Result<()> {
        let f = self.f;
        let data_offset = read_u32(f, begin)?;
        if u64::from(data_offset) > length {
            return Err(einval(f));
        }
        let count = read_u32(f, begin + 8)?;
        // qemu adds the two as 32-bit numbers.
        if count == 0 || u64::from(data_offset.wrapping_add(count)) > length {
            return Err(einval(f));
        }
        let mut at = begin + u64::from(data_offset);
        let end = at + u64::from(count);
        while at < end {
            let n = read_u32(f, at)?;
            if n == 0 || u64::from(n) > end - at {
                return Err(einval(f));
            }
            at += 4;
            // Past the file's end is zeroes: no mish block starts there, and one that runs
            // into it would only gain empty zero chunks. So a hostile length costs no more
            // memory than the file's size (qemu allocates all of it).
            let in_file = f.size()?.saturating_sub(at).min(u64::from(n));
            let mut b = buffer(f, in_file)?;
            f.read("read dmg resource fork", at, &mut b)?;
            self.mish(&b)?;
            at += u64::from(n);
        }
        Ok(())
    }

    /// The XML property list: every `<data>...</data>` decoded from base64 (qemu's
    /// `dmg_read_plist_xml`, which reads it as a C string).
    fn plist(&mut self, begin: u64, length: u64) -> Result<()> {
        let f = self.f;
        if length == 0 || length > XML_MAX {
            return Err(einval(f));
        }
        let mut text = buffer(f, length)?;
        f.read("read dmg property list", begin, &mut text)?;
        if let Some(nul) = text.iter().position(|&c| c == 0) {
            text.truncate(nul);
        }
        let mut at = 0;
        while let Some(p) = find(&text[at..], b"<data>") {
            let start = at + p + 6;
            let Some(q) = find(&text[start..], b"</data>") else {
                return Err(einval(f));
            };
            let end = start + q;
            self.mish(&base64_decode(&text[start..end]))?;
            at = end + 1;
        }
        Ok(())
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// glib's `g_base64_decode`: characters outside the alphabet are skipped, `=` counts as a
/// zero digit (and drops the bytes it pads), a trailing partial group is dropped.
fn base64_decode(text: &[u8]) -> Vec<u8> {
    let rank = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            b'=' => 0,
            _ => return None,
        } as u32)
    };
    let mut out = Vec::with_capacity(text.len() / 4 * 3 + 3);
    let (mut v, mut i, mut last) = (0u32, 0, [0u8; 2]);
    for &c in text {
        let Some(r) = rank(c) else { continue };
        last = [c, last[0]];
        v = (v << 6) | r;
        i += 1;
        if i == 4 {
            out.push((v >> 16) as u8);
            if last[1] != b'=' {
                out.push((v >> 8) as u8);
            }
            if last[0] != b'=' {
                out.push(v as u8);
            }
            i = 0;
        }
    }
    out
}

fn open(
    f: HostFile,
    opts: &ImageOptions,
    _backing: &OpenBacking<'_>,
) -> Result<Arc<dyn BlockBackend>> {
    // qemu's dmg is read-only; qemu-nbd asks for a writable image without -r (under -s the
    // image is a read-only backing file).
    if !(opts.read_only || opts.snapshot || opts.chain_depth > 0) {
        return Err(Error::Open("Image is read-only".into()));
    }
    let koly = find_koly(&f)?;
    let data_fork = read_u64(&f, koly + 0x18)?;
    if data_fork > koly {
        return Err(einval(&f));
    }
    let (rsrc_at, rsrc_len) = (read_u64(&f, koly + 0x28)?, read_u64(&f, koly + 0x30)?);
    if rsrc_at >= koly || rsrc_len > koly - rsrc_at {
        return Err(einval(&f));
    }
    let (xml_at, xml_len) = (read_u64(&f, koly + 0xd8)?, read_u64(&f, koly + 0xe0)?);
    if xml_at >= koly || xml_len > koly - xml_at {
        return Err(einval(&f));
    }
    let sectors = read_u64(&f, koly + 0x1ec)?;
    if sectors > i64::MAX as u64 {
        return Err(einval(&f));
    }
    // qemu's block layer then checks the size in bytes, computed as an unsigned 64-bit
    // product (which wraps), and qemu-nbd asks for the length, in sectors that must fit.
    if sectors.wrapping_mul(SECTOR) > MAX_LENGTH {
        return Err(Error::Open(
            "Could not refresh total sector count: File too large".into(),
        ));
    }
    if sectors > i64::MAX as u64 / SECTOR {
        return Err(Error::Export(
            "Failed to determine the NBD export's length: File too large".into(),
        ));
    }
    let mut table = Table {
        f: &f,
        data_fork,
        chunks: Vec::new(),
    };
    if rsrc_len != 0 {
        table.resource_fork(rsrc_at, rsrc_len)?;
    } else if xml_len != 0 {
        table.plist(xml_at, xml_len)?;
    } else {
        return Err(einval(&f));
    }
    let chunks = table.chunks;
    Ok(Arc::new(Dmg {
        f,
        sectors,
        chunks,
        cache: Mutex::new(VecDeque::new()),
        inflating: Mutex::new(()),
    }))
}

impl Dmg {
    /// qemu's `search_chunk`: a binary search of a table assumed sorted.
    fn search(&self, s: u64) -> Option<usize> {
        let n = self.chunks.len();
        let (mut lo, mut hi) = (0usize, n);
        while lo <= hi {
            let mid = (lo + hi) / 2;
            let c = self.chunks.get(mid)?;
            if c.sector > s {
                if mid == 0 {
                    return None;
                }
                hi = mid - 1;
            } else if c.sector.wrapping_add(c.count) > s {
                return Some(mid);
            } else {
                lo = mid + 1;
            }
        }
        None
    }

    fn bad(&self, i: usize, c: &Chunk, what: &str) -> Error {
        self.f.corrupt(format!(
            "{} chunk {i} (sectors {} +{}, {} bytes at offset {:#x}): {what}",
            c.kind.name(),
            c.sector,
            c.count,
            c.length,
            c.offset
        ))
    }

    /// Read `buf.len()` stored bytes of chunk `i` at `at` in the file (zeroes past the
    /// file's end; EIO past qemu's largest offset).
    fn read_stored(&self, i: usize, c: &Chunk, at: u64, buf: &mut [u8]) -> Result<()> {
        match at.checked_add(buf.len() as u64) {
            Some(end) if end <= MAX_LENGTH => self.f.read("read dmg chunk", at, buf),
            _ => Err(self.bad(i, c, "its bytes lie past the largest file offset")),
        }
    }

    /// The sectors of compressed chunk `i`, from the cache or decompressed now.
    fn inflated(&self, i: usize, c: &Chunk) -> Result<Arc<Vec<u8>>> {
        let cached = |cache: &mut VecDeque<(usize, Arc<Vec<u8>>)>| {
            let at = cache.iter().position(|(k, _)| *k == i)?;
            let hit = cache.remove(at)?;
            let data = hit.1.clone();
            cache.push_front(hit);
            Some(data)
        };
        if let Some(d) = cached(&mut self.cache.lock()) {
            return Ok(d);
        }
        let _one = self.inflating.lock();
        if let Some(d) = cached(&mut self.cache.lock()) {
            return Ok(d);
        }
        let data = Arc::new(self.decompress(i, c)?);
        let mut cache = self.cache.lock();
        cache.push_front((i, data.clone()));
        cache.truncate(CACHED_CHUNKS);
        while cache.len() > 1 && cache.iter().map(|(_, d)| d.len()).sum::<usize>() > CACHE_BYTES {
            cache.pop_back();
        }
        Ok(data)
    }

    fn decompress(&self, i: usize, c: &Chunk) -> Result<Vec<u8>> {
        // Both sizes were capped at 64 MiB when the table was read.
        let mut input = buffer(&self.f, c.length)?;
        self.read_stored(i, c, c.offset, &mut input)?;
        let mut out = buffer(&self.f, c.count * SECTOR)?;
        decode(c.kind, &input, &mut out).map_err(|e| self.bad(i, c, &e))?;
        Ok(out)
    }

    /// Fill `out` with the bytes at `within` in chunk `i`.
    fn read_chunk(&self, i: usize, c: &Chunk, within: u64, out: &mut [u8]) -> Result<()> {
        let n = out.len() as u64;
        match c.kind {
            Kind::Zero => out.fill(0),
            Kind::Raw => {
                // Sectors starting past the stored bytes have none.
                if within + n > c.length.div_ceil(SECTOR) * SECTOR {
                    return Err(self.bad(i, c, "its sectors run past its stored bytes"));
                }
                let stored = c.length.saturating_sub(within).min(n) as usize;
                let (data, tail) = out.split_at_mut(stored);
                tail.fill(0);
                match c.offset.checked_add(within) {
                    Some(at) => self.read_stored(i, c, at, data)?,
                    None => return Err(self.bad(i, c, "its offset overflows")),
                }
            }
            _ => {
                let d = self.inflated(i, c)?;
                out.copy_from_slice(&d[within as usize..(within + n) as usize]);
            }
        }
        Ok(())
    }
}

/// Decompress a whole chunk into `out`, its sectors' room: zlib and bzip2 must fill it
/// exactly, LZFSE at least in part (qemu's rules).
fn decode(kind: Kind, input: &[u8], out: &mut [u8]) -> std::result::Result<(), String> {
    let want = out.len() as u64;
    match kind {
        Kind::Zlib => {
            let mut z = flate2::Decompress::new(true);
            match z.decompress(input, out, flate2::FlushDecompress::Finish) {
                Ok(flate2::Status::StreamEnd) if z.total_out() == want => Ok(()),
                Ok(_) => Err(format!("does not inflate to {want} bytes")),
                Err(e) => Err(format!("inflate: {e}")),
            }
        }
        Kind::Bzip2 => {
            let mut z = bzip2::Decompress::new(false);
            match z.decompress(input, out) {
                Ok(bzip2::Status::StreamEnd) if z.total_out() == want => Ok(()),
                Ok(_) => Err(format!("does not decompress to {want} bytes")),
                Err(e) => Err(format!("bzip2: {e}")),
            }
        }
        Kind::Lzfse => {
            // qemu takes whatever decodes into the chunk's room, if anything does (the rest
            // stays zero here).
            use std::io::Read;
            let mut dec = lzfse_rust::LzfseRingDecoder::default();
            let mut r = dec.reader_bytes(input);
            let mut got = 0;
            while got < out.len() {
                match r.read(&mut out[got..]) {
                    Ok(0) => break,
                    Ok(n) => got += n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(format!("lzfse: {e}")),
                }
            }
            if got == 0 {
                return Err("lzfse: nothing decodes".into());
            }
            Ok(())
        }
        Kind::Zero | Kind::Raw => Err("not a compressed chunk".into()),
    }
}

impl BlockBackend for Dmg {
    fn size(&self) -> u64 {
        self.sectors * SECTOR
    }

    fn caps(&self) -> Caps {
        Caps::image(true)
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let s = pos / SECTOR;
            let Some(i) = self.search(s) else {
                return Err(self.f.corrupt(format!("no chunk holds sector {s}")));
            };
            let c = self.chunks[i];
            debug_assert!(c.holds(s));
            // The chunk holds sectors up to its end; the request may end sooner.
            let chunk_end = c.sector.wrapping_add(c.count).min(self.sectors) * SECTOR;
            let n = (chunk_end - pos).min((buf.len() - done) as u64) as usize;
            let within = pos - c.sector * SECTOR;
            self.read_chunk(i, &c, within, &mut buf[done..done + n])?;
            done += n;
        }
        Ok(())
    }

    crate::format::read_only_sector_image!("dmg");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probes_by_name_as_qemu() {
        assert!(probe_name("a.dmg"));
        assert!(probe_name("/x/.dmg"));
        assert!(!probe_name(".dmg"));
        assert!(!probe_name("a.DMG"));
        assert!(!probe_name("a.dmg.raw"));
    }

    #[test]
    fn decodes_base64_as_glib() {
        assert_eq!(base64_decode(b"aGVsbG8="), b"hello");
        assert_eq!(base64_decode(b"\n\taGVs\n\tbG8h\n"), b"hello!");
        // A partial group is dropped; '=' inside a group pads.
        assert_eq!(base64_decode(b"aGVsbG"), b"hel");
        assert_eq!(base64_decode(b"aG=="), b"h");
    }

    #[test]
    fn decodes_chunks_as_qemu() {
        use std::io::Write;
        let plain: Vec<u8> = (0..4096u32).map(|i| (i * 7 % 251) as u8).collect();
        let mut out = vec![0u8; 4096];
        let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        z.write_all(&plain).unwrap();
        let zlib = z.finish().unwrap();
        decode(Kind::Zlib, &zlib, &mut out).unwrap();
        assert_eq!(out, plain);
        // A count that lies either way, or cut data, fails.
        assert!(decode(Kind::Zlib, &zlib, &mut [0u8; 4608]).is_err());
        assert!(decode(Kind::Zlib, &zlib, &mut [0u8; 3584]).is_err());
        assert!(decode(Kind::Zlib, &zlib[..zlib.len() / 2], &mut out).is_err());
        let mut b = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::default());
        b.write_all(&plain).unwrap();
        let bz = b.finish().unwrap();
        out.fill(0);
        decode(Kind::Bzip2, &bz, &mut out).unwrap();
        assert_eq!(out, plain);
        assert!(decode(Kind::Bzip2, &bz, &mut [0u8; 4608]).is_err());
        assert!(decode(Kind::Bzip2, &zlib, &mut out).is_err());
        let mut lz = Vec::new();
        lzfse_rust::encode_bytes(&plain, &mut lz).unwrap();
        out.fill(0);
        decode(Kind::Lzfse, &lz, &mut out).unwrap();
        assert_eq!(out, plain);
        // Room for less is not an error (qemu's rule); garbage is.
        let mut half = vec![0u8; 2048];
        decode(Kind::Lzfse, &lz, &mut half).unwrap();
        assert_eq!(half, plain[..2048]);
        assert!(decode(Kind::Lzfse, &[0x62, 0x76, 0x78, 0x32, 0xff], &mut out).is_err());
        assert!(decode(Kind::Lzfse, &zlib, &mut out).is_err());
    }
}
