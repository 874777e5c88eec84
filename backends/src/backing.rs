//! What an image with a backing file does where it holds nothing itself: read the backing
//! file's bytes (zeroes past its end, or without one) and report its block status one
//! level deeper. Shared by the formats that have backing files (qcow2, vmdk).

use crate::{BlockBackend, Extent, ExtentFlags, Extents, Result};
use std::sync::Arc;

/// Read `buf` from `backing` at `pos`; past its end (or without one) reads zeroes.
pub fn read(backing: Option<&Arc<dyn BlockBackend>>, pos: u64, buf: &mut [u8]) -> Result<()> {
    let Some(b) = backing else {
        buf.fill(0);
        return Ok(());
    };
    let n = b.size().saturating_sub(pos).min(buf.len() as u64) as usize;
    if n > 0 {
        b.read(pos, &mut buf[..n])?;
    }
    buf[n..].fill(0);
    Ok(())
}

/// Block status of `[offset, offset + len)` as the backing file has it, one level deeper
/// (unallocated everywhere, and zero, past its end or without one).
pub fn status(
    backing: Option<&Arc<dyn BlockBackend>>,
    offset: u64,
    len: u64,
    out: &mut Extents,
) -> Result<()> {
    let hole = ExtentFlags::HOLE | ExtentFlags::ZERO;
    let Some(b) = backing else {
        out.push(Extent::new(len, hole, 0));
        return Ok(());
    };
    let end = offset + len;
    let stop = end.min(b.size());
    let mut pos = offset;
    let mut tmp = Extents::new();
    while pos < stop {
        tmp.clear();
        b.block_status(pos, stop - pos, &mut tmp)?;
        if tmp.is_empty() {
            break;
        }
        for x in tmp.iter() {
            let n = x.len.min(stop - pos);
            if n == 0 {
                break;
            }
            let depth = if x.depth == 0 { 0 } else { x.depth + 1 };
            out.push(Extent::new(n, x.flags, depth));
            pos += n;
        }
    }
    if pos < end {
        out.push(Extent::new(end - pos, hole, 0));
    }
    Ok(())
}
