//! The backend error type: what failed, where, and the errno a frontend reports for it.

use std::io;
use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O call on the image failed.
    #[error("{op} '{path}' at offset {offset:#x} (length {len:#x}): {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        offset: u64,
        len: u64,
        #[source]
        source: io::Error,
    },
    /// Opening or probing an image failed; the message is complete (qemu's wording).
    #[error("{0}")]
    Open(String),
    /// The image's metadata is inconsistent or hostile.
    #[error("corrupt image '{path}': {msg}")]
    Corrupt { path: PathBuf, msg: String },
    /// The call cannot be done this way (a FAST_ZERO that would be slow, a missing feature).
    #[error("operation not supported: {0}")]
    NotSupported(&'static str),
    /// A write on a read-only image.
    #[error("image is read-only")]
    ReadOnly,
    /// A request outside what the backend can address.
    #[error("invalid request: {0}")]
    Invalid(String),
    /// No room left to allocate.
    #[error("no space left: {0}")]
    NoSpace(String),
    /// `-l`: the image opened, the snapshot did not (qemu reports it apart from the open).
    #[error("Failed to load snapshot: {0}")]
    LoadSnapshot(String),
    /// Adding the export failed after the image opened (qemu-nbd reports it without the
    /// open's prefix): a raw image's lock conflict on the resize permission.
    #[error("{0}")]
    Export(String),
    /// The image was marked corrupt and is no longer served (qemu detaches its driver).
    #[error("No medium found")]
    NoMedium,
}

/// The C library's text for an error, as qemu prints it (no "(os error N)" suffix).
pub fn errno_text(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(code) => nix::errno::Errno::from_raw(code).desc().to_string(),
        None => e.to_string(),
    }
}

impl Error {
    pub fn io(
        op: &'static str,
        path: &std::path::Path,
        offset: u64,
        len: u64,
        e: io::Error,
    ) -> Error {
        Error::Io {
            op,
            path: path.to_path_buf(),
            offset,
            len,
            source: e,
        }
    }

    /// The errno this error stands for, squashed to the set a block protocol can carry
    /// (EPERM, EIO, ENOMEM, EINVAL, ENOSPC, EOVERFLOW, ENOTSUP, ESHUTDOWN).
    pub fn errno(&self) -> i32 {
        match self {
            Error::Io { source, .. } => match source.raw_os_error() {
                Some(libc::EPERM) | Some(libc::EROFS) | Some(libc::EACCES) => libc::EPERM,
                Some(libc::ENOSPC) | Some(libc::EDQUOT) | Some(libc::EFBIG) => libc::ENOSPC,
                Some(libc::ENOMEM) => libc::ENOMEM,
                Some(libc::EINVAL) => libc::EINVAL,
                Some(libc::EOPNOTSUPP) => libc::ENOTSUP,
                _ => libc::EIO,
            },
            Error::Open(_) | Error::Corrupt { .. } | Error::LoadSnapshot(_) | Error::Export(_) => {
                libc::EIO
            }
            Error::NotSupported(_) => libc::ENOTSUP,
            Error::ReadOnly => libc::EPERM,
            Error::Invalid(_) => libc::EINVAL,
            Error::NoSpace(_) => libc::ENOSPC,
            Error::NoMedium => libc::ENOMEDIUM,
        }
    }
}
