//! Image files stored elsewhere: a protocol (an NBD export, a file on a web server) that a [`HostFile`] can
//! stand on instead of a local file, so every format works over it unchanged (`qnbd -f
//! qcow2 nbd://host/disk`). This crate knows only the trait; the binary registers who opens
//! which names ([`set_opener`]), so the backends never depend on a network client.
//!
//! [`HostFile`]: super::HostFile

use crate::{Error, Extent, ExtentFlags, Extents, Result};
use std::fmt;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

/// A remote disk of fixed size, addressed by byte; every call may block on the network and
/// is safe from many threads at once.
pub trait Remote: Send + Sync + fmt::Debug {
    /// The name qemu gives the file once open (its `exact_filename`), for messages.
    fn filename(&self) -> String;
    /// The disk's size in bytes (fixed for the connection's life).
    fn size(&self) -> u64;
    /// The server serves the disk read-only.
    fn read_only(&self) -> bool;
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// With `fua`, durable when this returns.
    fn write(&self, offset: u64, buf: &[u8], fua: bool) -> io::Result<()>;
    /// Every write acknowledged before it is durable when this returns. A remote that may
    /// have lost acknowledged writes (its server died before a flush, or failed one) fails
    /// this, and every later flush: no later success may vouch for them.
    fn flush(&self) -> io::Result<()>;
    /// Zeroes without sending them; with `no_hole` the space stays allocated, else it may
    /// be deallocated; with `fua`, durable when this returns. Unsupported
    /// (`ErrorKind::Unsupported`) when the server cannot.
    fn write_zeroes(&self, offset: u64, len: u64, no_hole: bool, fua: bool) -> io::Result<()>;
    /// Allocation of `[offset, offset + len)` from `offset`, as the server reports it (maybe
    /// less than asked, never nothing): (length, hole, zero) runs. Without a way to ask,
    /// everything is data.
    fn block_status(&self, offset: u64, len: u64) -> io::Result<Vec<(u64, bool, bool)>>;
}

/// How a remote file is opened.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RemoteOptions {
    pub read_only: bool,
    /// The id of the `tls-creds-*` object to reach the server with (qemu's `tls-creds`).
    pub tls_creds: Option<String>,
    /// The name the server's certificate must carry (qemu's `tls-hostname`).
    pub tls_hostname: Option<String>,
    /// NBD: seconds requests wait for a lost connection to come back, to be sent again
    /// (qemu's `reconnect-delay`; 0: they fail at once while it is down).
    pub reconnect_delay: u64,
    /// NBD: seconds to keep trying the first connection (qemu's `open-timeout`; 0: once).
    pub open_timeout: u64,
    /// A file on a web server: the `http` / `https` driver's options.
    pub http: super::http::HttpOptions,
}

/// Opens a remote file by its name: None when the name is not one of the opener's (a local
/// file then), else the connection or why it failed (qemu's words).
pub type Opener = dyn Fn(&str, &RemoteOptions) -> Option<Result<Arc<dyn Remote>>> + Send + Sync;

static OPENER: OnceLock<Box<Opener>> = OnceLock::new();
static OPENED: AtomicBool = AtomicBool::new(false);

/// Register who opens remote names (once, at startup; later calls are ignored).
pub fn set_opener(f: Box<Opener>) {
    let _ = OPENER.set(f);
}

/// The remote file `name` stands for (None: a local file).
pub fn open(name: &str, opts: &RemoteOptions) -> Option<Result<Arc<dyn Remote>>> {
    let r = OPENER.get().and_then(|f| f(name, opts));
    if matches!(r, Some(Ok(_))) {
        OPENED.store(true, Ordering::Relaxed);
    }
    r
}

/// Has this process opened a remote file? (Its requests wait on the network: a frontend
/// then keeps more of them in flight.)
pub fn opened() -> bool {
    OPENED.load(Ordering::Relaxed)
}

/// Block status of `[offset, offset + len)` of `r` as extents of an image that maps byte for
/// byte onto it (depth 1; holes and zeroes as the server says).
pub fn status(r: &dyn Remote, offset: u64, len: u64, out: &mut Extents) -> io::Result<()> {
    let runs = r.block_status(offset, len)?;
    let mut pos = offset;
    for (n, hole, zero) in runs {
        let n = n.min(offset + len - pos);
        if n == 0 {
            break;
        }
        let mut flags = ExtentFlags::empty();
        flags.set(ExtentFlags::HOLE, hole);
        flags.set(ExtentFlags::ZERO, zero);
        out.push(Extent::new(n, flags, 1));
        pos += n;
    }
    if pos == offset {
        // A server that answered nothing: data.
        out.push(Extent::new(len, ExtentFlags::empty(), 1));
    }
    Ok(())
}

/// SEEK_DATA / SEEK_HOLE over a remote file, from its block status (None: no more data).
pub fn seek(r: &dyn Remote, offset: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
    let size = r.size();
    let mut pos = offset;
    while pos < size {
        let runs = r.block_status(pos, size - pos)?;
        if runs.is_empty() {
            break;
        }
        for (n, hole, _) in runs {
            let is_data = !hole;
            if (whence == libc::SEEK_DATA) == is_data {
                return Ok(Some(pos));
            }
            pos += n.max(1);
            if pos >= size {
                break;
            }
        }
    }
    Ok(if whence == libc::SEEK_HOLE {
        Some(size.max(offset))
    } else {
        None
    })
}

/// `%XX` escapes decoded, as qemu's URI parser does (a `%` without two hex digits stays):
/// the names of remote files are URLs.
pub fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A write or length change a remote file cannot make.
pub fn cannot_grow(name: &str, len: u64) -> Error {
    Error::NoSpace(format!(
        "'{name}' cannot grow to {len} bytes: a remote disk has a fixed size"
    ))
}
