//! BLOCK_STATUS runs for one meta context: the extents gathered from the backend turned into
//! `(length, flags)` pairs in the context's terms, neighbours with equal flags merged, cut to
//! one with REQ_ONE, and split where a compact reply's 32-bit length cannot hold them.

use crate::nbd::proto::{STATE_HOLE, STATE_ZERO};
use crate::nbd::server::meta::ContextKind;
use backends::{Extent, ExtentFlags};

/// The largest run a compact reply carries (sector aligned, below 4 GiB).
const COMPACT_MAX: u64 = u32::MAX as u64 & !511;

pub fn runs(
    kind: &ContextKind,
    extents: &[Extent],
    req_one: bool,
    extended: bool,
) -> Vec<(u64, u32)> {
    let mut runs: Vec<(u64, u32)> = Vec::new();
    for e in extents {
        let v = match kind {
            ContextKind::BaseAllocation => e.flags.bits() & (STATE_HOLE | STATE_ZERO),
            ContextKind::AllocationDepth => e.depth,
            ContextKind::DirtyBitmap(_) => u32::from(e.flags.contains(ExtentFlags::DIRTY)),
        };
        match runs.last_mut() {
            Some(last) if last.1 == v => last.0 += e.len,
            _ => runs.push((e.len, v)),
        }
    }
    if req_one {
        runs.truncate(1);
    }
    if !extended {
        let mut split = Vec::with_capacity(runs.len());
        for (l, v) in runs {
            let mut rest = l;
            while rest > 0 {
                let piece = rest.min(COMPACT_MAX);
                split.push((piece, v));
                rest -= piece;
            }
        }
        runs = split;
        if req_one {
            runs.truncate(1);
        }
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ext(len: u64, flags: ExtentFlags, depth: u32) -> Extent {
        Extent::new(len, flags, depth)
    }

    /// (context, REQ_ONE, extended headers, expected runs)
    type Case = (ContextKind, bool, bool, Vec<(u64, u32)>);

    #[test]
    fn table() {
        let hole = ExtentFlags::HOLE | ExtentFlags::ZERO;
        let data = ExtentFlags::empty();
        let dirty = ExtentFlags::DIRTY;
        let e = [
            ext(4096, data, 1),
            ext(4096, data, 2),
            ext(8192, hole, 0),
            ext(1 << 33, hole, 0),
        ];
        let z = STATE_HOLE | STATE_ZERO;
        let cases: &[Case] = &[
            // Equal neighbours merge; depth keeps them apart.
            (
                ContextKind::BaseAllocation,
                false,
                true,
                vec![(8192, 0), (8192 + (1 << 33), z)],
            ),
            (
                ContextKind::AllocationDepth,
                false,
                true,
                vec![(4096, 1), (4096, 2), (8192 + (1 << 33), 0)],
            ),
            // Compact replies split what 32 bits cannot hold.
            (
                ContextKind::BaseAllocation,
                false,
                false,
                vec![
                    (8192, 0),
                    (COMPACT_MAX, z),
                    (COMPACT_MAX, z),
                    (8192 + (1 << 33) - 2 * COMPACT_MAX, z),
                ],
            ),
            (ContextKind::BaseAllocation, true, false, vec![(8192, 0)]),
            (ContextKind::AllocationDepth, true, true, vec![(4096, 1)]),
        ];
        for (kind, req_one, extended, want) in cases {
            assert_eq!(
                &runs(kind, &e, *req_one, *extended),
                want,
                "{kind:?} {req_one} {extended}"
            );
        }
        let b = [ext(512, dirty, 0), ext(512, dirty, 0), ext(1024, data, 0)];
        assert_eq!(
            runs(&ContextKind::DirtyBitmap("b".into()), &b, false, false),
            vec![(1024, 1), (1024, 0)]
        );
    }
}
