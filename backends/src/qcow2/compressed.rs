//! Compressed clusters: where their bytes are, and inflating them (raw deflate or zstd).
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
    fn locate_decodes_offset_and_sectors() {
        // 64 KiB clusters: shift 54; 2 additional sectors, offset 0x10200.
        let desc = (1u64 << 62) | (2u64 << 54) | 0x10200;
        assert_eq!(locate(desc & !(1 << 62), 16), (0x10200, 1536));
        assert_eq!(sectors(desc & !(1 << 62), 16), (0x10200, 1536));
    }
}
