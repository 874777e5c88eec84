//! qemu's `null-co` / `null-aio` protocol: an image with no storage, for tests and
//! benchmarks (`qemu-nbd -f raw null-co://`, `--image-opts driver=null-co,size=1G`).
//! Writes, trims and zeroing succeed and are forgotten; reads return zeroes (qemu leaves the
//! buffer as it is unless `read-zeroes=on`; zeroes are what it holds for a fresh buffer, and
//! never anyone's old bytes); block status says nothing is allocated (and, with
//! `read-zeroes=on`, that it reads as zeroes), as qemu's does.

use crate::{BlockBackend, Caps, Extent, ExtentFlags, Extents, IoFlags, Result};
use std::path::Path;

/// qemu's default size: 1 GiB.
pub const DEFAULT_SIZE: u64 = 1 << 30;

/// `size=`, `read-zeroes=` (`latency-ns=` is accepted and ignored).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NullOptions {
    pub size: u64,
    pub read_zeroes: bool,
}

impl Default for NullOptions {
    fn default() -> NullOptions {
        NullOptions {
            size: DEFAULT_SIZE,
            read_zeroes: false,
        }
    }
}

/// The protocol a filename names (`null-co://`, `null-aio://`, anything after `://` being
/// ignored as qemu ignores it), or None for a file name.
pub fn from_filename(path: &Path) -> Option<NullOptions> {
    let s = path.to_str()?;
    (s.starts_with("null-co://") || s.starts_with("null-aio://")).then(NullOptions::default)
}

#[derive(Debug)]
pub struct Null {
    opts: NullOptions,
    read_only: bool,
}

impl Null {
    pub fn new(opts: NullOptions, read_only: bool) -> Null {
        Null { opts, read_only }
    }
}

impl BlockBackend for Null {
    fn size(&self) -> u64 {
        self.opts.size
    }

    fn caps(&self) -> Caps {
        if self.read_only {
            return Caps::READ_ONLY;
        }
        Caps::NATIVE
    }

    fn read(&self, _offset: u64, buf: &mut [u8]) -> Result<()> {
        buf.fill(0);
        Ok(())
    }

    fn try_read(&self, _offset: u64, buf: &mut [u8]) -> bool {
        buf.fill(0);
        true
    }

    fn write(&self, _offset: u64, _buf: &[u8], _flags: IoFlags) -> Result<()> {
        Ok(())
    }

    fn try_write(&self, _offset: u64, _buf: &[u8]) -> bool {
        !self.read_only
    }

    fn flush(&self) -> Result<()> {
        Ok(())
    }

    fn trim(&self, _offset: u64, _len: u64, _flags: IoFlags) -> Result<()> {
        Ok(())
    }

    fn write_zeroes(&self, _offset: u64, _len: u64, _flags: IoFlags) -> Result<()> {
        Ok(())
    }

    fn block_status(&self, _offset: u64, len: u64, out: &mut Extents) -> Result<()> {
        // qemu's null_co_block_status: nothing is allocated; zeroes only with read-zeroes.
        let flags = if self.opts.read_zeroes {
            ExtentFlags::HOLE | ExtentFlags::ZERO
        } else {
            ExtentFlags::HOLE
        };
        out.push(Extent::new(len, flags, 1));
        Ok(())
    }

    fn format_name(&self) -> &'static str {
        "null-co"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filenames_name_the_protocol() {
        assert_eq!(
            from_filename(Path::new("null-co://")),
            Some(NullOptions::default())
        );
        assert!(from_filename(Path::new("null-aio://x")).is_some());
        assert!(from_filename(Path::new("./null-co://")).is_none());
        assert!(from_filename(Path::new("disk.img")).is_none());
    }

    #[test]
    fn reads_are_zeroes_and_writes_vanish() {
        let n = Null::new(NullOptions::default(), false);
        assert_eq!(n.size(), 1 << 30);
        n.write(0, &[7; 512], IoFlags::empty()).unwrap();
        let mut b = [9u8; 512];
        n.read(0, &mut b).unwrap();
        assert_eq!(b, [0u8; 512]);
    }
}
