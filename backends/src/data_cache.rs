//! One region of a file known to hold data, so that asking again inside it costs no
//! `lseek` (qemu keeps the same for a protocol node: `bdrv_bsc_*` in block/io.c). Structured
//! reads ask for holes on every read, and a fully written image is one data region.
//!
//! Rules: a data answer is always safe (a read then returns the real bytes, zeroes
//! included), a hole answer for data would lose it. So only data is cached; anything that can
//! make a hole (trim, write-zeroes) invalidates the region it touches *before* it runs, and
//! bumps a generation, so that a look-up that raced with it (`lseek` saw data, the hole was
//! punched, then the look-up tries to remember its data) is dropped instead of stored.
//! Writes only add data and leave the cache alone.

use parking_lot::Mutex;

#[derive(Debug, Default)]
pub struct DataCache {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// `[start, end)` is data; empty when `start == end`.
    start: u64,
    end: u64,
    /// Bumped by every invalidation.
    generation: u64,
}

impl DataCache {
    /// Where the cached data region containing `offset` ends, if it contains it.
    pub fn data_end(&self, offset: u64) -> Option<u64> {
        let s = self.state.lock();
        (s.start <= offset && offset < s.end).then_some(s.end)
    }

    /// Taken before a look-up whose answer may be remembered with `fill`.
    pub fn generation(&self) -> u64 {
        self.state.lock().generation
    }

    /// Remember `[start, end)` as data, unless an invalidation ran since `generation`.
    pub fn fill(&self, generation: u64, start: u64, end: u64) {
        let mut s = self.state.lock();
        if s.generation == generation && start < end {
            s.start = start;
            s.end = end;
        }
    }

    /// `[offset, offset + len)` may become a hole.
    pub fn invalidate(&self, offset: u64, len: u64) {
        let mut s = self.state.lock();
        s.generation = s.generation.wrapping_add(1);
        if offset < s.end && s.start < offset.saturating_add(len) {
            s.end = s.start;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_inside_the_region_only() {
        let c = DataCache::default();
        assert_eq!(c.data_end(0), None);
        c.fill(c.generation(), 4096, 8192);
        assert_eq!(c.data_end(4095), None);
        assert_eq!(c.data_end(4096), Some(8192));
        assert_eq!(c.data_end(8191), Some(8192));
        assert_eq!(c.data_end(8192), None);
    }

    #[test]
    fn an_overlapping_invalidation_forgets_the_region() {
        let c = DataCache::default();
        c.fill(c.generation(), 4096, 8192);
        c.invalidate(0, 4096);
        assert_eq!(c.data_end(4096), Some(8192), "touching is not overlapping");
        c.invalidate(8000, 1);
        assert_eq!(c.data_end(4096), None);
    }

    #[test]
    fn a_look_up_that_raced_with_an_invalidation_is_not_stored() {
        let c = DataCache::default();
        let g = c.generation();
        c.invalidate(1 << 40, 1);
        c.fill(g, 0, 8192);
        assert_eq!(c.data_end(0), None);
    }
}
