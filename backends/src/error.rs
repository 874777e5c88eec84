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
    /// Opening the image file failed.
    #[error("Could not open '{path}': {reason}")]
    CouldNotOpen { path: PathBuf, reason: String },
    /// qemu's image locks refused the open; the message is qemu's (with its hint line).
    #[error("{0}")]
    Locked(String),
    /// The format's header refused the file (qemu's message).
    #[error("{0}")]
    Header(String),
    #[error("Unknown driver '{0}'")]
    UnknownDriver(String),
    #[error("Could not open backing file: {0}")]
    Backing(Box<Error>),
    #[error("Backing chain of '{}' is deeper than {depth} images", path.display())]
    ChainTooDeep { path: PathBuf, depth: u32 },
    #[error("qcow2: Image is corrupt; cannot be opened read/write")]
    CorruptReadWrite,
    #[error("force-share=on can only be used with read-only images")]
    ForceShareReadWrite,
    #[error("aio=native was specified, but it requires cache.direct=on, which was not specified.")]
    NativeAioNeedsDirect,
    #[error("Bitmap '{0}' is not found")]
    BitmapNotFound(String),
    #[error("Bitmap '{0}' is inconsistent and cannot be used")]
    BitmapInconsistent(String),
    /// An encrypted image could not be unlocked or its encryption header is unusable
    /// (qemu's message: a wrong passphrase, a missing secret, a damaged LUKS header).
    #[error("{0}")]
    Encryption(String),
    /// Any other refusal at open; the message is complete (qemu's wording).
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
        // The C library's strerror (std's Display), without std's suffix.
        Some(code) => {
            let text = io::Error::from_raw_os_error(code).to_string();
            match text.rfind(" (os error ") {
                Some(at) => text[..at].to_string(),
                None => text,
            }
        }
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
            Error::NoMedium => libc::ENOMEDIUM,
            Error::NotSupported(_) => libc::ENOTSUP,
            Error::ReadOnly => libc::EPERM,
            Error::Invalid(_) => libc::EINVAL,
            Error::NoSpace(_) => libc::ENOSPC,
            // Open-time refusals and corruption: the request cannot be served.
            _ => libc::EIO,
        }
    }
}
