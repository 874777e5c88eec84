//! Binding an NBD connection to a Linux `/dev/nbdX` device: generic netlink first (several
//! sockets, a kernel-chosen free device), the ioctl interface when the `nbd` family is absent.
//! The sockets handed over must have negotiated simple replies only: the kernel speaks nothing
//! else.

mod ioctl;
mod netlink;

use std::fs::OpenOptions;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub use ioctl::IoctlBinding;

/// What the kernel needs to know about the export.
#[derive(Clone, Copy, Debug)]
pub struct DeviceParams {
    pub size: u64,
    /// The transmission flags from the handshake.
    pub flags: u16,
    pub block_size: u32,
    /// Seconds before the kernel gives up on a request; None = kernel default.
    pub timeout: Option<u64>,
}

/// Which kernel interface to use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Api {
    /// Netlink, falling back to ioctls when the family is missing.
    Auto,
    Netlink,
    Ioctl,
}

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("Failed to open {path}: {msg}")]
    Open { path: String, msg: String },
    #[error("{0}")]
    Other(String),
    #[error("netlink: {0}")]
    Netlink(String),
    /// The `nbd` generic netlink family is not there (module not loaded, old kernel).
    #[error("the kernel has no 'nbd' netlink family")]
    NoFamily,
    /// The device is bound, or held open while unbound.
    #[error("device is busy (already connected)")]
    Busy,
}

/// `/dev/nbd7` → 7.
pub fn device_index(dev: &Path) -> Option<u32> {
    let name = dev.file_name()?.to_str()?;
    name.strip_prefix("nbd")?.parse().ok()
}

pub fn device_path(index: u32) -> PathBuf {
    PathBuf::from(format!("/dev/nbd{index}"))
}

/// A bound device.
pub enum Binding {
    Netlink { index: u32 },
    Ioctl(IoctlBinding),
}

impl Binding {
    pub fn index(&self) -> u32 {
        match self {
            Binding::Netlink { index } => *index,
            Binding::Ioctl(b) => b.index,
        }
    }

    /// Ask the kernel to disconnect (it sends NBD_CMD_DISC on the sockets).
    pub fn disconnect(&self) -> Result<(), KernelError> {
        disconnect(&device_path(self.index()), Api::Auto)
    }

    /// Block until the kernel lets go of the device (ioctl: NBD_DO_IT returned).
    pub fn wait(self) {
        if let Binding::Ioctl(b) = self {
            b.wait();
        }
    }
}

/// Bind `sockets` to `dev` (None: let the kernel pick a free device; netlink only).
pub fn bind(
    dev: Option<&Path>,
    sockets: Vec<OwnedFd>,
    p: DeviceParams,
    api: Api,
) -> Result<Binding, KernelError> {
    if let Some(d) = dev {
        // The same check and message as qemu-nbd, before anything is sent to the kernel.
        if let Err(e) = OpenOptions::new().read(true).write(true).open(d) {
            return Err(KernelError::Open {
                path: d.display().to_string(),
                msg: backends::errno_text(&e),
            });
        }
    }
    let index = match dev {
        Some(d) => Some(device_index(d).ok_or_else(|| {
            KernelError::Other(format!(
                "{} is not an NBD device (expected /dev/nbdN)",
                d.display()
            ))
        })?),
        None => None,
    };
    if api != Api::Ioctl {
        // A device merely held open (udev, blkid, a script's `head /dev/nbd0`) answers EBUSY
        // for a moment: retry while it is not really bound, which is what makes `-c` safe to
        // run in loops.
        let start = Instant::now();
        loop {
            match netlink::connect(index, &sockets, &p) {
                Ok(index) => return Ok(Binding::Netlink { index }),
                Err(KernelError::NoFamily) if api == Api::Auto => {
                    tracing::info!("no nbd netlink family; using ioctls");
                    break;
                }
                Err(KernelError::Busy)
                    if index.is_some_and(|i| !is_connected(i))
                        && start.elapsed() < Duration::from_secs(10) =>
                {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(KernelError::Busy) => {
                    let name = dev
                        .map(|d| d.display().to_string())
                        .unwrap_or_else(|| "the device".into());
                    return Err(KernelError::Other(format!(
                        "{name} is busy (already connected)"
                    )));
                }
                Err(e) => return Err(e),
            }
        }
    }
    let Some(dev) = dev else {
        return Err(KernelError::Other(
            "picking a free device needs the netlink interface".into(),
        ));
    };
    if sockets.len() != 1 {
        return Err(KernelError::Other(
            "several connections need the netlink interface".into(),
        ));
    }
    let sock = sockets
        .into_iter()
        .next()
        .ok_or_else(|| KernelError::Other("no socket".into()))?;
    Ok(Binding::Ioctl(IoctlBinding::start(dev, sock, &p)?))
}

/// Whether a device has a live connection (sysfs `pid` exists while it is bound).
pub fn is_connected(index: u32) -> bool {
    Path::new(&format!("/sys/block/nbd{index}/pid")).exists()
}

/// Disconnect a device bound by anyone (qnbd, qemu-nbd, nbd-client) and wait until it is free.
pub fn disconnect(dev: &Path, api: Api) -> Result<(), KernelError> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(dev)
        .map_err(|e| {
            KernelError::Other(format!(
                "Cannot open {}: {}",
                dev.display(),
                backends::errno_text(&e)
            ))
        })?;
    let index = device_index(dev).ok_or_else(|| {
        KernelError::Other(format!(
            "{} is not an NBD device (expected /dev/nbdN)",
            dev.display()
        ))
    })?;
    if !is_connected(index) {
        return Err(KernelError::Other(format!(
            "{} is not connected",
            dev.display()
        )));
    }
    let mut done = false;
    if api != Api::Ioctl {
        match netlink::disconnect(index) {
            Ok(()) => done = true,
            Err(KernelError::NoFamily) if api == Api::Auto => {}
            Err(e) => return Err(e),
        }
    }
    if !done {
        ioctl::disconnect(f.as_raw_fd())
            .map_err(|e| KernelError::Other(format!("{}: {e}", dev.display())))?;
    }
    drop(f);
    let start = Instant::now();
    while is_connected(index) {
        if start.elapsed() > Duration::from_secs(30) {
            return Err(KernelError::Other(format!(
                "{} is still connected after 30 s",
                dev.display()
            )));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// Wait until the device can be opened and has its size, then have the kernel read the
/// partition table, so that `/dev/nbdXpN` exist when the caller returns.
pub fn wait_usable(index: u32, size: u64) -> Result<(), KernelError> {
    let dev = device_path(index);
    let sys = format!("/sys/block/nbd{index}/size");
    let start = Instant::now();
    loop {
        let sectors: u64 = std::fs::read_to_string(&sys)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        if sectors * 512 >= size.min(512) && (size == 0 || sectors > 0) {
            break;
        }
        if start.elapsed() > Duration::from_secs(30) {
            return Err(KernelError::Other(format!(
                "{} did not become ready",
                dev.display()
            )));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let f = OpenOptions::new()
        .read(true)
        .open(&dev)
        .map_err(|e| KernelError::Open {
            path: dev.display().to_string(),
            msg: backends::errno_text(&e),
        })?;
    ioctl::reread_partitions(f.as_raw_fd());
    Ok(())
}
