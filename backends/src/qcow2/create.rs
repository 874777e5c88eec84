//! Creating a qcow2 image: what `-s` needs — an empty v3 image over a backing file (64 KiB
//! clusters, 16-bit refcounts): header, refcount table, one refcount block, L1 table.

use super::header::MAGIC;

const CLUSTER_BITS: u32 = 16;
/// The v3 header is 104 bytes plus the 4-byte compression type, padded to 112.
const HEADER_LEN: u32 = 112;
const REFCOUNT_ORDER: u32 = 4;
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;

/// The header fields a new image sets (the rest are zero).
struct NewHeader<'a> {
    backing: &'a str,
    backing_fmt: &'a str,
    size: u64,
    l1_size: u32,
    l1_offset: u64,
    reftable_offset: u64,
    reftable_clusters: u32,
}

impl NewHeader<'_> {
    /// The header, its backing-format extension, the end marker and the backing name.
    fn encode(&self, out: &mut [u8]) {
        let mut w = Writer { out, at: 0 };
        w.u32(MAGIC);
        w.u32(3); // version
        let fmt_ext = 8 + self.backing_fmt.len().div_ceil(8) * 8;
        let name_at = HEADER_LEN as usize + fmt_ext + 8;
        w.u64(name_at as u64); // backing_file_offset
        w.u32(self.backing.len() as u32);
        w.u32(CLUSTER_BITS);
        w.u64(self.size);
        w.u32(0); // crypt_method
        w.u32(self.l1_size);
        w.u64(self.l1_offset);
        w.u64(self.reftable_offset);
        w.u32(self.reftable_clusters);
        w.u32(0); // nb_snapshots
        w.u64(0); // snapshots_offset
        w.u64(0); // incompatible features
        w.u64(0); // compatible features
        w.u64(0); // autoclear features
        w.u32(REFCOUNT_ORDER);
        w.u32(HEADER_LEN);
        w.at = HEADER_LEN as usize;
        w.u32(EXT_BACKING_FORMAT);
        w.u32(self.backing_fmt.len() as u32);
        w.bytes(self.backing_fmt.as_bytes());
        w.at = HEADER_LEN as usize + fmt_ext;
        w.u32(0); // end of extensions
        w.u32(0);
        w.at = name_at;
        w.bytes(self.backing.as_bytes());
    }
}

struct Writer<'a> {
    out: &'a mut [u8],
    at: usize,
}

impl Writer<'_> {
    fn bytes(&mut self, b: &[u8]) {
        self.out[self.at..self.at + b.len()].copy_from_slice(b);
        self.at += b.len();
    }
    fn u32(&mut self, v: u32) {
        self.bytes(&v.to_be_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.bytes(&v.to_be_bytes());
    }
}

/// The bytes of an empty image of `size` bytes backed by `backing` in `backing_fmt`.
pub fn overlay_image(size: u64, backing: &str, backing_fmt: &str) -> Result<Vec<u8>, String> {
    let cs = 1u64 << CLUSTER_BITS;
    let l2_span = cs * (cs / 8);
    let l1_size = size.div_ceil(l2_span);
    let l1_clusters = (l1_size * 8).div_ceil(cs).max(1);
    // Header, refcount table, refcount block, L1: the block covers them all.
    let clusters = 3 + l1_clusters;
    if clusters > cs / 2 || backing.len() > 1023 || backing_fmt.len() > 64 {
        return Err(format!("cannot create an overlay for a {size}-byte image"));
    }
    let mut img = vec![0u8; (clusters * cs) as usize];
    NewHeader {
        backing,
        backing_fmt,
        size,
        l1_size: l1_size as u32,
        l1_offset: 3 * cs,
        reftable_offset: cs,
        reftable_clusters: 1,
    }
    .encode(&mut img);
    // Refcount table entry 0 points at the block in cluster 2.
    img[cs as usize..cs as usize + 8].copy_from_slice(&(2 * cs).to_be_bytes());
    let block = 2 * cs as usize;
    for c in 0..clusters as usize {
        img[block + c * 2..block + c * 2 + 2].copy_from_slice(&1u16.to_be_bytes());
    }
    Ok(img)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_header_parses_back() {
        let img = overlay_image(10 << 30, "/base.raw", "raw").unwrap();
        let h = super::super::header::parse(&img[..65536], img.len() as u64).unwrap();
        assert_eq!(h.size, 10 << 30);
        assert_eq!(h.backing_file.as_deref(), Some("/base.raw"));
        assert_eq!(h.backing_format.as_deref(), Some("raw"));
        assert_eq!(h.refcount_order, 4);
        assert_eq!(h.l1_table_offset, 3 << 16);
    }
}
