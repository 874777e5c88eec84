//! Compressed clusters: where their bytes are, inflating them (raw deflate or zstd), and
//! deflating a cluster for the `compress` filter's writes.
//! The stored length is rounded up to whole sectors, so trailing bytes after the stream are
//! normal; success means the output cluster is full, as in qemu.

use super::header::Compression;

/// Where a compressed cluster's bytes lie: `(host offset, length)`, from its L2 descriptor.
pub fn locate(desc: u64, cluster_bits: u32) -> (u64, u64) {
    let shift = 62 - (cluster_bits - 8);
    let offset = desc & ((1u64 << shift) - 1);
    let sectors = ((desc >> shift) & ((1u64 << (cluster_bits - 8)) - 1)) + 1;
    (offset, sectors * 512 - (offset & 511))
}

/// The whole 512-byte sectors a compressed cluster touches (what its refcounts count).
pub fn sectors(desc: u64, cluster_bits: u32) -> (u64, u64) {
    let (off, len) = locate(desc, cluster_bits);
    let start = off & !511;
    (start, (off + len) - start)
}

pub fn decompress(kind: Compression, input: &[u8], out: &mut [u8]) -> Result<(), String> {
    match kind {
        Compression::Zlib => {
            let mut d = flate2::Decompress::new(false);
            // A stream error after the output is full is what qemu accepts too.
            let _ = d.decompress(input, out, flate2::FlushDecompress::Finish);
            if d.total_out() as usize == out.len() {
                Ok(())
            } else {
                Err(format!(
                    "zlib stream inflated to {} of {} bytes",
                    d.total_out(),
                    out.len()
                ))
            }
        }
        Compression::Zstd => {
            use zstd::stream::raw::{Decoder, InBuffer, Operation, OutBuffer};
            let mut d = Decoder::new().map_err(|e| e.to_string())?;
            let mut inb = InBuffer::around(input);
            let mut outb = OutBuffer::around(out);
            while outb.pos() < outb.capacity() && inb.pos() < inb.src.len() {
                let before = (inb.pos(), outb.pos());
                d.run(&mut inb, &mut outb)
                    .map_err(|e| format!("zstd: {e}"))?;
                if (inb.pos(), outb.pos()) == before {
                    break;
                }
            }
            if outb.pos() == outb.capacity() {
                Ok(())
            } else {
                Err(format!(
                    "zstd stream gave {} of {} bytes",
                    outb.pos(),
                    outb.capacity()
                ))
            }
        }
    }
}

/// The L2 descriptor of a compressed cluster whose `len` bytes start at host offset `at`
/// (without the COMPRESSED flag): the offset, and the number of 512-byte sectors it
/// touches after the first.
pub fn descriptor(at: u64, len: u64, cluster_bits: u32) -> u64 {
    let shift = 62 - (cluster_bits - 8);
    let extra = ((at + len - 1) >> 9) - (at >> 9);
    at | (extra << shift)
}

/// `input` (one cluster) compressed as qemu does (qcow2-threads.c): raw deflate with a
/// 4 KiB window (qemu inflates with `-12`, so no match may reach further back), or a zstd
/// frame. None when the result would not be smaller than the cluster: qemu then writes the
/// cluster as it is.
pub fn compress(kind: Compression, input: &[u8]) -> Option<Vec<u8>> {
    let max = input.len() - 1;
    let out = match kind {
        Compression::Zlib => {
            let mut c =
                flate2::Compress::new_with_window_bits(flate2::Compression::default(), false, 12);
            let mut out = Vec::with_capacity(input.len());
            match c.compress_vec(input, &mut out, flate2::FlushCompress::Finish) {
                Ok(flate2::Status::StreamEnd) => out,
                _ => return None,
            }
        }
        Compression::Zstd => zstd::bulk::compress(input, 0).ok()?,
    };
    (out.len() <= max).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn raw_deflate_with_trailing_garbage() {
        let data: Vec<u8> = (0..4096u32).map(|i| (i % 7) as u8).collect();
        let mut e = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(&data).unwrap();
        let mut c = e.finish().unwrap();
        c.extend_from_slice(&[0xaa; 100]);
        let mut out = vec![0u8; 4096];
        decompress(Compression::Zlib, &c, &mut out).unwrap();
        assert_eq!(out, data);
        let mut big = vec![0u8; 8192];
        assert!(decompress(Compression::Zlib, &c, &mut big).is_err());
        assert!(decompress(Compression::Zstd, &c, &mut out).is_err());
    }

    #[test]
    fn compressed_clusters_inflate_back() {
        let data: Vec<u8> = (0..65536u32).map(|i| (i / 100 % 13) as u8).collect();
        for kind in [Compression::Zlib, Compression::Zstd] {
            let c = compress(kind, &data).unwrap();
            assert!(c.len() < 65536);
            let mut out = vec![0u8; 65536];
            decompress(kind, &c, &mut out).unwrap();
            assert_eq!(out, data);
        }
        // Noise does not shrink: stored as it is.
        let mut x = 1u32;
        let noise: Vec<u8> = (0..65536)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect();
        assert!(compress(Compression::Zlib, &noise).is_none());
    }

    #[test]
    fn a_descriptor_is_what_locate_reads() {
        for (at, len) in [
            (0x10200u64, 1000u64),
            (0x10000, 512),
            (0x1fe00, 512),
            (0x10010, 600),
        ] {
            let desc = descriptor(at, len, 16);
            let (off, span) = locate(desc, 16);
            assert_eq!(off, at);
            assert!(span >= len && span < len + 1024, "{at:#x} {len}");
        }
    }

    #[test]
    fn locate_decodes_offset_and_sectors() {
        // 64 KiB clusters: shift 54; 2 additional sectors, offset 0x10200.
        let desc = (1u64 << 62) | (2u64 << 54) | 0x10200;
        assert_eq!(locate(desc & !(1 << 62), 16), (0x10200, 1536));
        assert_eq!(sectors(desc & !(1 << 62), 16), (0x10200, 1536));
    }
}
