//! ublk: serve a `Device` as a local `/dev/ublkbN` block device through the kernel's ublk
//! driver (libublk). No socket and no NBD framing: each queue thread takes requests from
//! the driver and calls the synchronous `Device` itself.
//!
//! Lifecycle: [`Ublk::create`] adds a device (or, with `recover`, takes back one whose
//! server died), [`Ublk::serve`] runs until the device is stopped, [`Ublk::stop`] and
//! [`Ublk::delete`] end it from any thread (a signal handler's included). [`disconnect`]
//! is `-d`: stop and delete a device served by another process.

mod control;
mod params;
mod queue;
mod request;

pub use control::{disconnect, Ublk};
pub use params::device_params;

use std::path::{Path, PathBuf};

/// Block device node prefix.
pub const BDEV_PREFIX: &str = "/dev/ublkb";

/// Default queue depth.
pub const DEFAULT_DEPTH: u16 = 128;
/// Most queues created by default (one per CPU up to this).
pub const DEFAULT_MAX_QUEUES: u16 = 4;
/// Largest request, in bytes (the kernel splits larger ones).
pub const IO_BUF_BYTES: u32 = 512 << 10;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UblkOptions {
    /// Device id (`/dev/ublkbN`); None: the next free one.
    pub id: Option<u32>,
    pub queues: u16,
    pub depth: u16,
    /// Take back the quiesced device `id` after its server died.
    pub recover: bool,
    /// Pin each queue thread to the CPUs the kernel maps to its queue.
    pub pin_queues: bool,
}

impl UblkOptions {
    /// One queue per CPU up to [`DEFAULT_MAX_QUEUES`], depth [`DEFAULT_DEPTH`].
    pub fn default_queues() -> u16 {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        cpus.min(usize::from(DEFAULT_MAX_QUEUES)) as u16
    }
}

#[derive(Debug, thiserror::Error)]
pub enum UblkError {
    #[error("ublk is not available: {0} is missing (is the ublk_drv module loaded?)")]
    NoDriver(&'static str),
    #[error("{0} is not a ublk device (expected /dev/ublkbN or 'ublk')")]
    NotUblk(String),
    #[error("{path} does not exist")]
    NoSuchDevice { path: String },
    #[error(
        "{path} already exists (--recover takes it back after its server died, -d deletes it)"
    )]
    Exists { path: String },
    #[error("cannot create a ublk device{which}: {msg}")]
    Create { which: String, msg: String },
    #[error("cannot recover {path}: {msg}")]
    Recover { path: String, msg: String },
    #[error("{path}: {step}: {msg}")]
    Step {
        path: String,
        step: &'static str,
        msg: String,
    },
    #[error("the image is too small for a block device ({0} bytes)")]
    TooSmall(u64),
}

/// `/dev/ublkbN` → N; `ublk` → None (the next free id). Anything else is not ours.
pub fn parse_target(dev: &str) -> Option<Option<u32>> {
    if dev == "ublk" {
        return Some(None);
    }
    let n = dev.strip_prefix(BDEV_PREFIX)?;
    if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    n.parse().ok().map(Some)
}

/// Whether `-c DEV` / `-d DEV` names a ublk device.
pub fn is_ublk_target(dev: &str) -> bool {
    dev == "ublk" || dev.starts_with(BDEV_PREFIX)
}

pub fn device_path(id: u32) -> PathBuf {
    PathBuf::from(format!("{BDEV_PREFIX}{id}"))
}

/// The device exists (its character device is registered).
pub fn exists(id: u32) -> bool {
    Path::new(&format!("/sys/class/ublk-char/ublkc{id}")).exists()
}

/// Text for a libublk error: the errno's description where there is one.
pub fn describe(e: &libublk::UblkError) -> String {
    use libublk::UblkError as E;
    let errno = |n: i32| nix::errno::Errno::from_raw(n.abs()).desc().to_string();
    match e {
        E::OtherError(n) | E::UringIOError(n) => errno(*n),
        E::IOError(io) => match io.raw_os_error() {
            Some(n) => errno(n),
            None => io.to_string(),
        },
        E::InvalidVal => "invalid parameter".into(),
        other => other.to_string(),
    }
}

/// Move this thread (and the threads it starts later) to a private copy of the mount
/// namespace, so that a filesystem mounted on our own device is never unmounted by our
/// exit (libublk-rs#50: that unmount would need the server that is exiting). Mounts made
/// after this do not propagate into the copy.
pub fn private_mount_namespace() -> Result<(), String> {
    use nix::mount::{mount, MsFlags};
    use nix::sched::{unshare, CloneFlags};
    unshare(CloneFlags::CLONE_NEWNS).map_err(|e| format!("unshare(CLONE_NEWNS): {}", e.desc()))?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(|e| format!("making / private: {}", e.desc()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets() {
        assert_eq!(parse_target("ublk"), Some(None));
        assert_eq!(parse_target("/dev/ublkb0"), Some(Some(0)));
        assert_eq!(parse_target("/dev/ublkb17"), Some(Some(17)));
        assert_eq!(parse_target("/dev/ublkb"), None);
        assert_eq!(parse_target("/dev/ublkb1x"), None);
        assert_eq!(parse_target("/dev/ublkb-1"), None);
        assert_eq!(parse_target("/dev/nbd0"), None);
        assert!(is_ublk_target("/dev/ublkbx"));
        assert!(!is_ublk_target("/dev/nbd0"));
    }

    #[test]
    fn errors_read_well() {
        assert_eq!(
            describe(&libublk::UblkError::OtherError(-libc::EEXIST)),
            "File exists"
        );
    }
}
