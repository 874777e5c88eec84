//! The block-backend core: one trait every image kind implements, and the image kinds.
//!
//! Modeled on nbdkit's plugin API: a small set of data calls taking `(offset, …, flags)` in the
//! same order, plus capability answers computed once at open. The trait is synchronous and
//! positional (`&self`, no seek state), so any frontend can call it from whatever thread it runs:
//! the NBD server's worker threads, the kernel binder, or a ublk queue thread with its own
//! io_uring executor. Backends are `Send + Sync` and take no global lock on the data path.
//!
//! Frontends should not call a backend directly: they wrap it in [`Device`], which validates
//! nothing (the frontend has done that) but writes the emulation of optional features once.

pub mod aio;
pub mod align;
mod backing;
pub mod bochs;
pub mod cache_mode;
pub mod cloop;
pub mod compress;
mod data_cache;
pub mod detect_zeroes;
mod device;
pub mod dmg;
mod error;
mod extent;
pub mod file;
pub mod filter;
pub mod format;
pub mod luks;
pub mod null;
pub mod open;
pub mod overlay;
pub mod parallels;
mod probe_guard;
pub mod qcow;
pub mod qcow2;
pub mod qed;
pub mod raw;
pub mod slice;
pub mod vdi;
pub mod vhdx;
pub mod vmdk;
pub mod vpc;

pub use device::Device;
pub use error::{errno_text, Error, Result};
pub use extent::{Extent, ExtentFlags, Extents};

use bitflags::bitflags;
use std::fmt::Debug;
use std::os::fd::BorrowedFd;

/// Where a range of an image lies, byte for byte, in a host file (see
/// [`BlockBackend::read_source`] and [`BlockBackend::write_sink`]).
#[derive(Clone, Copy, Debug)]
pub struct HostSpan<'a> {
    pub fd: BorrowedFd<'a>,
    pub offset: u64,
    /// The file's name, for errors.
    pub path: &'a std::path::Path,
}

bitflags! {
    /// Per-call flags, in the backend's own terms (not the wire's).
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct IoFlags: u32 {
        /// The data must be on stable storage before the call returns.
        const FUA = 1;
        /// write_zeroes may deallocate (punch a hole) instead of writing zeroes.
        const MAY_TRIM = 2;
        /// write_zeroes must fail with [`Error::NotSupported`] rather than be slow.
        const FAST_ZERO = 4;
    }
}

/// How an optional feature is provided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Support {
    /// Not at all: the frontend must not advertise it.
    None,
    /// [`Device`] emulates it with other calls (FUA by flush, zero by write, cache by read).
    Emulate,
    /// The backend does it itself.
    Native,
}

impl Support {
    pub fn available(self) -> bool {
        self != Support::None
    }
}

/// What a backend can do; computed once at open, never queried on the data path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Caps {
    /// Writes are accepted (false for a read-only open).
    pub writable: bool,
    /// `flush` does something useful (advertise NBD_FLAG_SEND_FLUSH).
    pub flush: bool,
    pub fua: Support,
    /// `trim` may be sent (it may still be a no-op, as with qemu's `--discard=ignore`).
    pub trim: bool,
    pub zero: Support,
    /// FAST_ZERO can be honoured (only meaningful when `zero` is Native).
    pub fast_zero: bool,
    pub cache: Support,
    /// Several connections see each other's writes and flushes (one shared image state).
    pub multi_conn: bool,
    pub rotational: bool,
}

impl Caps {
    /// The answers of a writable backend that does everything itself.
    pub const NATIVE: Caps = Caps {
        writable: true,
        flush: true,
        fua: Support::Native,
        trim: true,
        zero: Support::Native,
        fast_zero: true,
        cache: Support::Native,
        multi_conn: true,
        rotational: false,
    };

    /// An image format over a host file (vmdk, vdi, vpc, vhdx, qed): everything but FAST_ZERO
    /// itself, the cache hint by reads; read-only as [`Caps::READ_ONLY`].
    pub const fn image(read_only: bool) -> Caps {
        if read_only {
            return Caps::READ_ONLY;
        }
        Caps {
            fast_zero: false,
            cache: Support::Emulate,
            ..Caps::NATIVE
        }
    }

    /// The answers of a read-only backend with nothing native.
    pub const READ_ONLY: Caps = Caps {
        writable: false,
        flush: true,
        fua: Support::Emulate,
        trim: false,
        zero: Support::None,
        fast_zero: false,
        cache: Support::Emulate,
        multi_conn: true,
        rotational: false,
    };
}

/// One image kind. The caller (normally [`Device`]) guarantees, for every data call:
/// `offset + len <= size()` with no overflow; write calls only when `caps().writable`;
/// `FUA` only when `caps().fua == Native`; `write_zeroes` only when `caps().zero == Native`;
/// `FAST_ZERO` only when `caps().fast_zero`; `cache` only when `caps().cache == Native`.
/// Implementations may `debug_assert!` these, never rely on them for memory safety.
pub trait BlockBackend: Send + Sync + Debug {
    /// Size in bytes of what is exported.
    fn size(&self) -> u64;

    fn caps(&self) -> Caps;

    /// Fill `buf` with the bytes at `offset`.
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()>;

    /// Write `buf` at `offset`. Flags: FUA.
    fn write(&self, offset: u64, buf: &[u8], flags: IoFlags) -> Result<()>;

    /// Make every completed write durable.
    fn flush(&self) -> Result<()>;

    /// Advisory discard. Flags: FUA.
    fn trim(&self, offset: u64, len: u64, flags: IoFlags) -> Result<()>;

    /// Make the range read as zeroes. Flags: FUA, MAY_TRIM, FAST_ZERO.
    fn write_zeroes(&self, _offset: u64, _len: u64, _flags: IoFlags) -> Result<()> {
        Err(Error::NotSupported("write zeroes"))
    }

    /// Prefetch hint.
    fn cache(&self, _offset: u64, _len: u64) -> Result<()> {
        Ok(())
    }

    /// Append to `out` extents describing `[offset, offset + len)`, starting exactly at `offset`.
    /// It may stop early (at least one extent) and the last extent may run past `len`.
    /// The default: all data, allocated in this layer.
    fn block_status(&self, offset: u64, len: u64, out: &mut Extents) -> Result<()> {
        let _ = offset;
        out.push(Extent::new(len, ExtentFlags::empty(), 1));
        Ok(())
    }

    /// The format's name, as `qemu-img info` prints it.
    fn format_name(&self) -> &'static str;

    /// The smallest unit a request should use (qemu's `request_alignment`): smaller or
    /// unaligned requests still work, read-modify-written by the layer that needs it.
    fn request_alignment(&self) -> u32 {
        1
    }

    /// The cluster size, when whole clusters can be written compressed
    /// ([`BlockBackend::write_compressed`]): a qcow2 image opened for writing.
    fn compressed_cluster_size(&self) -> Option<u64> {
        None
    }

    /// Write whole clusters (or up to the end of the image) stored compressed. As in qemu,
    /// a cluster that is already allocated cannot be (EIO).
    fn write_compressed(&self, _offset: u64, _buf: &[u8]) -> Result<()> {
        Err(Error::NotSupported("compressed writes"))
    }

    /// Whether persistent dirty bitmap `name` exists here (or in a backing file) and can be
    /// exported; Err carries qemu's message.
    fn bitmap_check(&self, name: &str) -> Result<()> {
        Err(Error::BitmapNotFound(name.to_string()))
    }

    /// Like `block_status`, for dirty bitmap `name`: dirty runs carry [`ExtentFlags::DIRTY`].
    fn bitmap_status(&self, name: &str, offset: u64, len: u64, out: &mut Extents) -> Result<()> {
        let _ = (name, offset, len, out);
        Err(Error::NotSupported("dirty bitmaps"))
    }

    /// The image is being released: write what is kept only until close (qemu stores
    /// persistent bitmaps then). Calls after close are not allowed.
    fn close(&self) -> Result<()> {
        self.flush()
    }

    /// Make every completed write survive the death of this process (not a power cut): write
    /// out what is held only in memory, such as qcow2's dirty metadata. A frontend whose
    /// device outlives its server (a ublk device, taken back by `--recover`) calls it before
    /// it completes a write-type request: the kernel and the guest never learn that the
    /// server died, so a FLUSH served by the next server must find every completed write in
    /// the file. The default: nothing is held in memory (a write reached the file, or the
    /// page cache, which a killed process does not take with it).
    fn settle(&self) -> Result<()> {
        Ok(())
    }

    /// Whether [`settle`](Self::settle) has anything to do: completed writes that live only
    /// in memory. Cheap, so a frontend can keep the common case off its slow path.
    fn unsettled(&self) -> bool {
        false
    }

    /// [`read`](Self::read), if it can finish without waiting for a device: the bytes are in
    /// memory (the page cache, a cache of the format's own). False when it would wait, when
    /// it failed, or when this backend cannot tell; the caller then calls `read` from a thread
    /// that may block, which reports any error. A frontend uses it to serve a request on the
    /// thread that read it from the network, without handing it to another thread.
    fn try_read(&self, offset: u64, buf: &mut [u8]) -> bool {
        let _ = (offset, buf);
        false
    }

    /// [`write`](Self::write) without FUA, if it is not expected to wait for a device: the
    /// bytes go to memory (the page cache) and nothing has to be read or allocated on disk
    /// first. False when it cannot, or failed: part of `buf` may have been written, and the
    /// caller writes all of it with `write` from a thread that may block, which reports any
    /// error. A completed `try_write` is a completed write for every rule (flush, settle).
    fn try_write(&self, offset: u64, buf: &[u8]) -> bool {
        let _ = (offset, buf);
        false
    }

    /// Where `[offset, offset + len)` lies, byte for byte, in one host file read through the
    /// page cache, so a frontend may move the bytes to a socket with splice(2) instead of
    /// copying them through [`read`](Self::read). Reading `len` bytes at the span gives what
    /// `read` would give at that moment; a frontend that gets fewer (the file shrank under
    /// us) falls back to `read`. None, the default, whenever the bytes exist only through
    /// `read`: a format's mapping, a cipher, holes to zero-fill, O_DIRECT alignment.
    ///
    /// Splicing moves page references, not bytes: the client may copy them out after later
    /// writes. So the span must only ever hold this range's bytes. A raw file does; a format
    /// that may free a host cluster and reuse it for another guest range (qcow2 after a
    /// discard) must not return one, or a read could show another range's data.
    fn read_source(&self, offset: u64, len: u64) -> Option<HostSpan<'_>> {
        let _ = (offset, len);
        None
    }

    /// Where a write of `len` bytes at `offset` without FUA may go, byte for byte, into one
    /// host file through the page cache, so a frontend may move a write's payload from the
    /// socket into the file with splice(2) instead of copying it through
    /// [`write`](Self::write). Writing the bytes at the span must be all that `write` would
    /// do with them: no format mapping, cipher, check of the data, write-through or record
    /// of writes. Errors of that write are the frontend's to report (the span names the
    /// file). A completed spliced write is a completed write for every rule (flush, settle).
    /// None, the default, whenever a write needs more than that.
    fn write_sink(&self, offset: u64, len: u64) -> Option<HostSpan<'_>> {
        let _ = (offset, len);
        None
    }
}
