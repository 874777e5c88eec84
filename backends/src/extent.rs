//! Block-status extents, the unit `BlockBackend::block_status` reports in.

use bitflags::bitflags;

bitflags! {
    /// `base:allocation` state bits; the values equal NBD_STATE_HOLE / NBD_STATE_ZERO.
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct ExtentFlags: u32 {
        /// Not allocated in any layer: reading it costs nothing.
        const HOLE = 1;
        /// Reads as zeroes.
        const ZERO = 2;
        /// Set in a dirty bitmap (`qemu:dirty-bitmap:NAME` contexts only).
        const DIRTY = 4;
    }
}

/// A run of bytes with one state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub len: u64,
    pub flags: ExtentFlags,
    /// Where the data comes from: 0 nowhere in the chain, 1 this layer, N the (N-1)th backing file.
    pub depth: u32,
}

impl Extent {
    pub fn new(len: u64, flags: ExtentFlags, depth: u32) -> Extent {
        Extent { len, flags, depth }
    }
}

/// A list of extents that merges a pushed extent into the previous one when both have one state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Extents {
    list: Vec<Extent>,
}

impl Extents {
    pub fn new() -> Extents {
        Extents::default()
    }

    pub fn push(&mut self, e: Extent) {
        if e.len == 0 {
            return;
        }
        match self.list.last_mut() {
            Some(last) if last.flags == e.flags && last.depth == e.depth => last.len += e.len,
            _ => self.list.push(e),
        }
    }

    pub fn clear(&mut self) {
        self.list.clear();
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    pub fn len(&self) -> usize {
        self.list.len()
    }

    /// Total bytes described.
    pub fn total(&self) -> u64 {
        self.list.iter().map(|e| e.len).sum()
    }

    pub fn as_slice(&self) -> &[Extent] {
        &self.list
    }

    pub fn iter(&self) -> std::slice::Iter<'_, Extent> {
        self.list.iter()
    }
}

impl<'a> IntoIterator for &'a Extents {
    type Item = &'a Extent;
    type IntoIter = std::slice::Iter<'a, Extent>;
    fn into_iter(self) -> Self::IntoIter {
        self.list.iter()
    }
}

/// Split `[offset, offset + len)` at multiples of `unit` (a format's block or grain): `f`
/// gets (unit index, offset in it, length, bytes already done).
pub fn for_each_unit(
    offset: u64,
    len: u64,
    unit: u64,
    mut f: impl FnMut(u64, u64, u64, u64) -> crate::Result<()>,
) -> crate::Result<()> {
    let end = offset + len;
    let mut pos = offset;
    while pos < end {
        let (b, in_b) = (pos / unit, pos % unit);
        let n = (end - pos).min(unit - in_b);
        f(b, in_b, n, pos - offset)?;
        pos += n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn push_merges_equal_neighbours_and_drops_empty() {
        let mut x = Extents::new();
        x.push(Extent::new(10, ExtentFlags::empty(), 1));
        x.push(Extent::new(5, ExtentFlags::empty(), 1));
        x.push(Extent::new(0, ExtentFlags::HOLE, 1));
        x.push(Extent::new(7, ExtentFlags::HOLE | ExtentFlags::ZERO, 1));
        x.push(Extent::new(7, ExtentFlags::HOLE | ExtentFlags::ZERO, 2));
        assert_eq!(x.len(), 3);
        assert_eq!(x.as_slice()[0].len, 15);
        assert_eq!(x.total(), 29);
    }
}
