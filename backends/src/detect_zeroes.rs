//! `--detect-zeroes`: a write whose data is all zeroes becomes a write-zeroes, so the image
//! stays sparse (with `unmap` and `--discard=unmap`, zeroes may deallocate).

use crate::filter::Filter;
use crate::{BlockBackend, HostSpan, IoFlags, Result, Support};
use std::sync::Arc;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DetectZeroes {
    Off,
    On,
    /// Zeroes may be unmapped (only when discard is enabled, as in qemu).
    Unmap,
}

#[derive(Debug)]
pub struct ZeroDetect {
    inner: Arc<dyn BlockBackend>,
    mode: DetectZeroes,
}

impl ZeroDetect {
    pub fn new(inner: Arc<dyn BlockBackend>, mode: DetectZeroes) -> ZeroDetect {
        ZeroDetect { inner, mode }
    }
}

/// True if every byte is zero; word at a time.
pub fn is_zero(buf: &[u8]) -> bool {
    let (head, words, tail) = {
        // SAFETY: u128 has no invalid bit patterns; align_to only reinterprets aligned middles.
        unsafe { buf.align_to::<u128>() }
    };
    head.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

impl Filter for ZeroDetect {
    fn inner(&self) -> &Arc<dyn BlockBackend> {
        &self.inner
    }
    fn write(&self, offset: u64, buf: &[u8], flags: IoFlags) -> Result<()> {
        if self.mode != DetectZeroes::Off
            && self.inner.caps().zero == Support::Native
            && is_zero(buf)
        {
            let mut f = flags & IoFlags::FUA;
            if self.mode == DetectZeroes::Unmap {
                f |= IoFlags::MAY_TRIM;
            }
            return self.inner.write_zeroes(offset, buf.len() as u64, f);
        }
        self.inner.write(offset, buf, flags)
    }
    fn try_read(&self, offset: u64, buf: &mut [u8]) -> bool {
        self.inner.try_read(offset, buf)
    }
    /// Zeroes to be detected are written the usual way.
    fn try_write(&self, offset: u64, buf: &[u8]) -> bool {
        (self.mode == DetectZeroes::Off || !is_zero(buf)) && self.inner.try_write(offset, buf)
    }
    fn read_source(&self, offset: u64, len: u64) -> Option<HostSpan<'_>> {
        self.inner.read_source(offset, len)
    }
    /// Only with detection off: zeroes must be seen to be detected.
    fn write_sink(&self, offset: u64, len: u64) -> Option<HostSpan<'_>> {
        if self.mode != DetectZeroes::Off {
            return None;
        }
        self.inner.write_sink(offset, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_scan() {
        let mut v = vec![0u8; 4099];
        assert!(is_zero(&v));
        assert!(is_zero(&v[1..]));
        v[4098] = 1;
        assert!(!is_zero(&v));
        v[4098] = 0;
        v[17] = 1;
        assert!(!is_zero(&v[3..]));
        assert!(is_zero(&[]));
    }
}
