//! ublk: serve a `Device` as a local `/dev/ublkbN` block device through the kernel's ublk
//! driver (libublk). No socket, no NBD framing and no executor: each queue thread takes
//! requests from the driver and calls the synchronous `Device` itself, except for the
//! blocking ones (flush, FUA), which a few workers serve (`offload.rs`).
//!
//! Lifecycle: [`Ublk::create`] adds a device (or, with `recover`, takes back one whose
//! server died), [`Ublk::serve`] runs until the device is stopped, [`Ublk::stop`] and
//! [`Ublk::delete`] end it from any thread (a signal handler's included). [`disconnect`]
//! is `-d`: stop and delete a device served by another process.

mod control;
mod offload;
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
/// Largest request by default, in bytes (the kernel splits larger ones); one buffer of
/// this size per tag.
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
    /// Largest request in bytes (a multiple of the page size).
    pub io_buf_bytes: u32,
    /// Serve flush and FUA requests on worker threads (else on the queue threads too).
    pub offload: bool,
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

/// Move this thread (and the threads it starts later) to a copy of the mount namespace
/// that holds no filesystem on a ublk device, so our exit can never be what unmounts one
/// (libublk-rs#50: that unmount would need I/O from the server that is exiting). The copy
/// follows the original (a slave): later mounts and unmounts there reach it, so it never
/// keeps a filesystem alive that the user unmounted. Copies of filesystems already mounted
/// from a ublk device (a device being recovered) are detached here.
pub fn private_mount_namespace() -> Result<(), String> {
    use nix::mount::{mount, umount2, MntFlags, MsFlags};
    use nix::sched::{unshare, CloneFlags};
    unshare(CloneFlags::CLONE_NEWNS).map_err(|e| format!("unshare(CLONE_NEWNS): {}", e.desc()))?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_SLAVE,
        None::<&str>,
    )
    .map_err(|e| format!("making / a slave mount: {}", e.desc()))?;
    let info = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| format!("reading /proc/self/mountinfo: {e}"))?;
    for target in ublk_mounts(&info).iter().rev() {
        if let Err(e) = umount2(target.as_str(), MntFlags::MNT_DETACH) {
            tracing::debug!("detaching our copy of {target}: {}", e.desc());
        }
    }
    Ok(())
}

/// Mount points (in mount order) of filesystems whose source is a ublk device.
fn ublk_mounts(mountinfo: &str) -> Vec<String> {
    mountinfo
        .lines()
        .filter_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let source = right.split(' ').nth(1)?;
            let target = left.split(' ').nth(4)?;
            source.starts_with(BDEV_PREFIX).then(|| unescape(target))
        })
        .collect()
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
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
    fn ublk_mount_points() {
        let info = "22 1 0:20 / / rw - rootfs rootfs rw\n\
                    40 22 259:0 / /mnt/a\\040b rw,relatime - ext4 /dev/ublkb3 rw\n\
                    41 22 8:1 / /mnt/c rw - ext4 /dev/sda1 rw\n";
        assert_eq!(ublk_mounts(info), vec!["/mnt/a b".to_string()]);
        assert_eq!(unescape("x\\134y\\0"), "x\\y\\0");
    }

    #[test]
    fn errors_read_well() {
        assert_eq!(
            describe(&libublk::UblkError::OtherError(-libc::EEXIST)),
            "File exists"
        );
    }
}
