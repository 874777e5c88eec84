//! The qcow2 header and its extensions, parsed from the image's first cluster as untrusted bytes.
//! Every field is range-checked here so the rest of the engine can rely on the geometry.

use std::fmt::Write as _;

pub const MAGIC: u32 = 0x5146_49fb;
pub const MIN_CLUSTER_BITS: u32 = 9;
pub const MAX_CLUSTER_BITS: u32 = 21;
/// qemu's QCOW_MAX_L1_SIZE (bytes) and QCOW_MAX_REFTABLE_SIZE (bytes): bound what we allocate.
pub const MAX_L1_BYTES: u64 = 32 << 20;
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
pub const MAX_SNAPSHOTS: u32 = 65536;

pub const INCOMPAT_DIRTY: u64 = 1 << 0;
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
pub const INCOMPAT_EXTL2: u64 = 1 << 4;
/// What this engine understands; anything else is refused at open.
pub const SUPPORTED_INCOMPAT: u64 =
    INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2;

pub const COMPAT_LAZY_REFCOUNTS: u64 = 1 << 0;
pub const AUTOCLEAR_BITMAPS: u64 = 1 << 0;
/// The external data file is a valid raw image of the guest disk (`data_file_raw`).
pub const AUTOCLEAR_DATA_FILE_RAW: u64 = 1 << 1;

const EXT_END: u32 = 0;
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
const EXT_BITMAPS: u32 = 0x2385_2875;
const EXT_DATA_FILE: u32 = 0x4441_5441;
/// The full disk encryption header pointer (the LUKS header's offset and length).
const EXT_CRYPTO: u32 = 0x0537_be77;

/// `crypt_method` values.
pub const CRYPT_NONE: u32 = 0;
pub const CRYPT_AES: u32 = 1;
pub const CRYPT_LUKS: u32 = 2;

/// Field offsets the engine rewrites in place.
pub const OFF_REFTABLE: u64 = 48;
pub const OFF_INCOMPAT: u64 = 72;
pub const OFF_AUTOCLEAR: u64 = 88;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    Zlib,
    Zstd,
}

#[derive(Clone, Debug)]
pub struct Header {
    pub version: u32,
    pub cluster_bits: u32,
    pub size: u64,
    pub crypt_method: u32,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub nb_snapshots: u32,
    pub snapshots_offset: u64,
    pub incompatible: u64,
    pub compatible: u64,
    pub autoclear: u64,
    pub refcount_order: u32,
    pub header_length: u32,
    pub compression: Compression,
    pub backing_file: Option<String>,
    pub backing_format: Option<String>,
    /// (type, bit, name) from the feature name table extension.
    pub feature_names: Vec<(u8, u8, String)>,
    pub has_bitmaps: bool,
    /// The bitmaps extension, when present and well formed.
    pub bitmaps: Option<super::bitmap::BitmapsExt>,
    /// The LUKS header's (offset, length) in the file, for `crypt_method` 2.
    pub crypto_header: Option<(u64, u64)>,
    /// The external data file's name, from its header extension.
    pub data_file: Option<String>,
}

fn be32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn be64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_be_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// Cluster size from the first bytes, so the caller knows how much to read for [`parse`].
pub fn peek_cluster_bits(b: &[u8]) -> Result<u32, String> {
    if be32(b, 0) != Some(MAGIC) {
        return Err("Image is not in qcow2 format".into());
    }
    let bits = be32(b, 20).ok_or("qcow2 header is truncated")?;
    if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&bits) {
        return Err(format!("Unsupported cluster size: 2^{bits}"));
    }
    Ok(bits)
}

/// `table` must be cluster aligned, non-empty in bytes only if `bytes > 0`, not overlap the
/// header cluster, and end inside the file.
fn check_table(
    what: &str,
    offset: u64,
    bytes: u64,
    cluster_size: u64,
    file_len: u64,
) -> Result<(), String> {
    if bytes == 0 {
        return Ok(());
    }
    if !offset.is_multiple_of(cluster_size) {
        return Err(format!("{what} offset {offset:#x} is not cluster aligned"));
    }
    if offset == 0 {
        return Err(format!("{what} overlaps the qcow2 header"));
    }
    let end = offset
        .checked_add(bytes)
        .ok_or_else(|| format!("{what} at {offset:#x} (length {bytes:#x}) overflows"))?;
    if end > file_len {
        return Err(format!(
            "{what} at {offset:#x} (length {bytes:#x}) is beyond the end of the file ({file_len:#x})"
        ));
    }
    Ok(())
}

/// Parse and validate. `b` holds the first cluster (or the whole file if shorter).
pub fn parse(b: &[u8], file_len: u64) -> Result<Header, String> {
    let cluster_bits = peek_cluster_bits(b)?;
    let cluster_size = 1u64 << cluster_bits;
    let short = || "qcow2 header is truncated".to_string();
    let version = be32(b, 4).ok_or_else(short)?;
    if version != 2 && version != 3 {
        return Err(format!("Unsupported qcow2 version {version}"));
    }
    let backing_file_offset = be64(b, 8).ok_or_else(short)?;
    let size = be64(b, 24).ok_or_else(short)?;
    let crypt_method = be32(b, 32).ok_or_else(short)?;
    let l1_size = be32(b, 36).ok_or_else(short)?;
    let l1_table_offset = be64(b, 40).ok_or_else(short)?;
    let refcount_table_offset = be64(b, 48).ok_or_else(short)?;
    let refcount_table_clusters = be32(b, 56).ok_or_else(short)?;
    let nb_snapshots = be32(b, 60).ok_or_else(short)?;
    let snapshots_offset = be64(b, 64).ok_or_else(short)?;
    let (incompatible, compatible, autoclear, refcount_order, header_length) = if version == 3 {
        (
            be64(b, 72).ok_or_else(short)?,
            be64(b, 80).ok_or_else(short)?,
            be64(b, 88).ok_or_else(short)?,
            be32(b, 96).ok_or_else(short)?,
            be32(b, 100).ok_or_else(short)?,
        )
    } else {
        (0, 0, 0, 4, 72)
    };
    if version == 3 && header_length < 104 {
        return Err("qcow2 header too short".into());
    }
    if u64::from(header_length) > cluster_size || header_length as usize > b.len() {
        return Err("qcow2 header exceeds cluster size".into());
    }
    let mut h = Header {
        version,
        cluster_bits,
        size,
        crypt_method,
        l1_size,
        l1_table_offset,
        refcount_table_offset,
        refcount_table_clusters,
        nb_snapshots,
        snapshots_offset,
        incompatible,
        compatible,
        autoclear,
        refcount_order,
        header_length,
        compression: Compression::Zlib,
        backing_file: None,
        backing_format: None,
        feature_names: Vec::new(),
        has_bitmaps: false,
        bitmaps: None,
        crypto_header: None,
        data_file: None,
    };
    if header_length > 104 {
        h.compression = match b[104] {
            0 => Compression::Zlib,
            1 => Compression::Zstd,
            t => return Err(format!("Unknown compression type {t}")),
        };
    }
    if h.compression == Compression::Zstd && incompatible & INCOMPAT_COMPRESSION == 0 {
        return Err("Compression type incompatible feature bit must be set".into());
    }
    // Extensions first: the feature name table words the refusal below.
    let ext_start = if version == 3 {
        header_length as usize
    } else {
        72
    };
    parse_extensions(&mut h, b, ext_start, backing_file_offset)?;
    let unsupported = incompatible & !SUPPORTED_INCOMPAT;
    if unsupported != 0 {
        return Err(h.unsupported_message(unsupported));
    }
    if refcount_order > 6 || (version == 2 && refcount_order != 4) {
        return Err(format!("Unsupported refcount order {refcount_order}"));
    }
    match crypt_method {
        CRYPT_NONE => {}
        CRYPT_AES => {
            return Err(
                "qcow2 AES encryption (crypt_method 1) is not supported by qnbd: convert the image with qemu-img to LUKS encryption or none"
                    .into(),
            )
        }
        CRYPT_LUKS if h.crypto_header.is_none() => {
            return Err(format!(
                "Missing CRYPTO header for crypt method {crypt_method}"
            ))
        }
        CRYPT_LUKS => {}
        _ => return Err(format!("Unsupported encryption method: {crypt_method}")),
    }
    if size > i64::MAX as u64 {
        return Err(format!("Image size {size} is too big"));
    }
    // L1 must cover the disk.
    let l2_entry_bytes = if incompatible & INCOMPAT_EXTL2 != 0 {
        16
    } else {
        8
    };
    let l2_bits = cluster_bits - if l2_entry_bytes == 16 { 4 } else { 3 };
    let l1_needed = size.div_ceil(1u64 << (cluster_bits + l2_bits));
    if u64::from(l1_size) * 8 > MAX_L1_BYTES {
        return Err("Active L1 table too large".into());
    }
    if u64::from(l1_size) < l1_needed {
        return Err("L1 table is too small".into());
    }
    check_table(
        "L1 table",
        l1_table_offset,
        u64::from(l1_size) * 8,
        cluster_size,
        file_len,
    )?;
    let rt_bytes = u64::from(refcount_table_clusters) * cluster_size;
    if refcount_table_clusters == 0 {
        return Err("Image does not contain a reference count table".into());
    }
    if rt_bytes > MAX_REFTABLE_BYTES.max(cluster_size) {
        return Err("Reference count table too large".into());
    }
    check_table(
        "Reference count table",
        refcount_table_offset,
        rt_bytes,
        cluster_size,
        file_len,
    )?;
    if nb_snapshots > MAX_SNAPSHOTS {
        return Err("Too many snapshots".into());
    }
    if nb_snapshots > 0 {
        // Each entry is at least 40 bytes; the exact size is checked by the snapshot parser.
        check_table(
            "Snapshot table",
            snapshots_offset,
            u64::from(nb_snapshots) * 40,
            cluster_size,
            file_len,
        )?;
    }
    let overlaps = |a: u64, al: u64, b: u64, bl: u64| al > 0 && bl > 0 && a < b + bl && b < a + al;
    if overlaps(
        l1_table_offset,
        u64::from(l1_size) * 8,
        refcount_table_offset,
        rt_bytes,
    ) {
        return Err("L1 table overlaps the reference count table".into());
    }
    Ok(h)
}

fn parse_extensions(
    h: &mut Header,
    b: &[u8],
    start: usize,
    backing_file_offset: u64,
) -> Result<(), String> {
    // Extensions end where the backing file name starts, or at the end of the cluster.
    let limit = if backing_file_offset != 0 {
        usize::try_from(backing_file_offset)
            .ok()
            .filter(|&o| o <= b.len())
            .ok_or("Invalid backing file offset")?
    } else {
        b.len()
    };
    let mut pos = start;
    while pos + 8 <= limit {
        let typ = be32(b, pos).unwrap_or(EXT_END);
        let len = be32(b, pos + 4).unwrap_or(0) as usize;
        pos += 8;
        if typ == EXT_END {
            break;
        }
        let data = pos
            .checked_add(len)
            .filter(|&e| e <= limit)
            .map(|e| &b[pos..e])
            .ok_or("Invalid extension length")?;
        match typ {
            EXT_BACKING_FORMAT => {
                h.backing_format = Some(String::from_utf8_lossy(data).into_owned());
            }
            EXT_FEATURE_TABLE => {
                for e in data.chunks_exact(48) {
                    let name = &e[2..];
                    let n = name.iter().position(|&c| c == 0).unwrap_or(name.len());
                    h.feature_names.push((
                        e[0],
                        e[1],
                        String::from_utf8_lossy(&name[..n]).into_owned(),
                    ));
                }
            }
            EXT_BITMAPS => {
                h.has_bitmaps = true;
                if data.len() >= 24 {
                    h.bitmaps = Some(super::bitmap::BitmapsExt {
                        nb_bitmaps: be32(data, 0).unwrap_or(0),
                        dir_size: be64(data, 8).unwrap_or(0),
                        dir_offset: be64(data, 16).unwrap_or(0),
                        pos: pos as u64,
                    });
                }
            }
            EXT_CRYPTO => h.crypto_header = Some(crypto_extension(h, data)?),
            EXT_DATA_FILE => {
                let n = data.iter().position(|&c| c == 0).unwrap_or(data.len());
                h.data_file = Some(String::from_utf8_lossy(&data[..n]).into_owned());
            }
            _ => {}
        }
        pos = pos
            .checked_add(len.div_ceil(8) * 8)
            .ok_or("Invalid extension length")?;
    }
    if backing_file_offset != 0 {
        let len = h_backing_len(b)?;
        let start = backing_file_offset as usize;
        if len > 1023 {
            return Err("Backing file name too long".into());
        }
        let name = b
            .get(start..start + len)
            .ok_or("Invalid backing file offset")?;
        h.backing_file = Some(String::from_utf8_lossy(name).into_owned());
    }
    Ok(())
}

/// qemu's checks of the full disk encryption header pointer: (offset, length).
fn crypto_extension(h: &Header, data: &[u8]) -> Result<(u64, u64), String> {
    if h.crypt_method != CRYPT_LUKS {
        return Err("CRYPTO header extension only expected with LUKS encryption method".into());
    }
    let (Some(offset), Some(length), 16) = (be64(data, 0), be64(data, 8), data.len()) else {
        return Err(format!(
            "CRYPTO header extension size {}, but expected size 16",
            data.len()
        ));
    };
    let cs = 1u64 << h.cluster_bits;
    if !offset.is_multiple_of(cs) {
        return Err(format!(
            "Encryption header offset '{offset}' is not a multiple of cluster size '{cs}'"
        ));
    }
    Ok((offset, length))
}

fn h_backing_len(b: &[u8]) -> Result<usize, String> {
    Ok(be32(b, 16).ok_or("qcow2 header is truncated")? as usize)
}

impl Header {
    /// qemu's report_unsupported_feature wording.
    pub fn unsupported_message(&self, mut mask: u64) -> String {
        let mut s = String::new();
        for (typ, bit, name) in &self.feature_names {
            if *typ == 0 && *bit < 64 && mask & (1 << bit) != 0 {
                if !s.is_empty() {
                    s.push_str(", ");
                }
                s.push_str(name);
                mask &= !(1 << bit);
            }
        }
        if mask != 0 {
            if !s.is_empty() {
                s.push_str(", ");
            }
            let _ = write!(s, "Unknown incompatible feature: {mask:x}");
        }
        format!("Unsupported qcow2 feature(s): {s}")
    }

    pub fn extended_l2(&self) -> bool {
        self.incompatible & INCOMPAT_EXTL2 != 0
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A valid v3 header for a 64 MiB image with 64 KiB clusters, one field per line.
    pub fn valid_v3() -> Vec<u8> {
        let mut b = vec![0u8; 65536];
        let put32 =
            |b: &mut Vec<u8>, at: usize, v: u32| b[at..at + 4].copy_from_slice(&v.to_be_bytes());
        put32(&mut b, 0, MAGIC);
        put32(&mut b, 4, 3); // version
        put32(&mut b, 20, 16); // cluster_bits
        b[24..32].copy_from_slice(&(64u64 << 20).to_be_bytes()); // size
        put32(&mut b, 36, 1); // l1_size
        b[40..48].copy_from_slice(&(3u64 << 16).to_be_bytes()); // l1_table_offset
        b[48..56].copy_from_slice(&(1u64 << 16).to_be_bytes()); // refcount_table_offset
        put32(&mut b, 56, 1); // refcount_table_clusters
        put32(&mut b, 96, 4); // refcount_order
        put32(&mut b, 100, 112); // header_length
        b
    }

    const FILE: u64 = 4 << 16;

    #[test]
    fn valid_header_parses() {
        let h = parse(&valid_v3(), FILE).unwrap();
        assert_eq!(h.cluster_bits, 16);
        assert_eq!(h.size, 64 << 20);
    }

    #[test]
    fn hostile_fields_are_refused() {
        let cases: Vec<(usize, Vec<u8>, &str)> = vec![
            (20, 8u32.to_be_bytes().to_vec(), "cluster size"),
            (20, 22u32.to_be_bytes().to_vec(), "cluster size"),
            (4, 4u32.to_be_bytes().to_vec(), "version"),
            (40, (100u64 << 16).to_be_bytes().to_vec(), "beyond the end"),
            (48, 0u64.to_be_bytes().to_vec(), "overlaps the qcow2 header"),
            (48, 0x1234u64.to_be_bytes().to_vec(), "aligned"),
            (24, u64::MAX.to_be_bytes().to_vec(), "too big"),
            (36, u32::MAX.to_be_bytes().to_vec(), "too large"),
            (56, u32::MAX.to_be_bytes().to_vec(), "too large"),
            (96, 7u32.to_be_bytes().to_vec(), "refcount order"),
            (100, 8u32.to_be_bytes().to_vec(), "too short"),
            (
                72,
                (1u64 << 5).to_be_bytes().to_vec(),
                "Unknown incompatible feature: 20",
            ),
            (
                72,
                (1u64 << 40).to_be_bytes().to_vec(),
                "Unknown incompatible feature: 10000000000",
            ),
            (60, 100_000u32.to_be_bytes().to_vec(), "snapshots"),
        ];
        for (at, bytes, want) in cases {
            let mut b = valid_v3();
            b[at..at + bytes.len()].copy_from_slice(&bytes);
            let e = parse(&b, FILE).unwrap_err();
            assert!(e.contains(want), "field at {at}: {e}");
        }
    }

    #[test]
    fn truncations_never_panic() {
        let b = valid_v3();
        for n in 0..200 {
            let _ = parse(&b[..n], FILE);
        }
    }

    #[test]
    fn unsupported_names_come_from_the_table() {
        let mut b = valid_v3();
        b[72..80].copy_from_slice(&(1u64 << 5).to_be_bytes());
        // Feature table extension at 112 with one entry: incompatible bit 5 "frobnication".
        b[112..116].copy_from_slice(&EXT_FEATURE_TABLE.to_be_bytes());
        b[116..120].copy_from_slice(&48u32.to_be_bytes());
        b[120] = 0;
        b[121] = 5;
        b[122..134].copy_from_slice(b"frobnication");
        let e = parse(&b, FILE).unwrap_err();
        assert_eq!(e, "Unsupported qcow2 feature(s): frobnication");
    }
}
