//! The classic NBD ioctls (linux/nbd.h): what qemu-nbd -c uses, and our fallback.

use super::{DeviceParams, KernelError};
use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::thread::JoinHandle;

const NBD_SET_SOCK: libc::c_ulong = 0xab00;
const NBD_SET_BLKSIZE: libc::c_ulong = 0xab01;
const NBD_DO_IT: libc::c_ulong = 0xab03;
const NBD_CLEAR_SOCK: libc::c_ulong = 0xab04;
const NBD_CLEAR_QUE: libc::c_ulong = 0xab05;
const NBD_SET_SIZE_BLOCKS: libc::c_ulong = 0xab07;
const NBD_DISCONNECT: libc::c_ulong = 0xab08;
const NBD_SET_TIMEOUT: libc::c_ulong = 0xab09;
const NBD_SET_FLAGS: libc::c_ulong = 0xab0a;
const BLKROSET: libc::c_ulong = 0x125d;
const BLKRRPART: libc::c_ulong = 0x125f;

fn ioctl(fd: RawFd, req: libc::c_ulong, arg: libc::c_ulong) -> std::io::Result<()> {
    // SAFETY: the NBD ioctls take their argument by value; no memory is passed.
    let r = unsafe { libc::ioctl(fd, req as _, arg) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// A device bound with NBD_SET_SOCK; NBD_DO_IT runs in its own thread until disconnect.
pub struct IoctlBinding {
    pub index: u32,
    thread: JoinHandle<()>,
}

impl IoctlBinding {
    pub fn start(dev: &Path, sock: OwnedFd, p: &DeviceParams) -> Result<IoctlBinding, KernelError> {
        let index = super::device_index(dev).unwrap_or(0);
        let f: File = OpenOptions::new()
            .read(true)
            .write(true)
            .open(dev)
            .map_err(|e| KernelError::Open {
                path: dev.display().to_string(),
                msg: backends::errno_text(&e),
            })?;
        let fd = f.as_raw_fd();
        let err = |what: &str, e: std::io::Error| {
            KernelError::Other(format!("{}: {what}: {e}", dev.display()))
        };
        let bs = p.block_size.max(512) as u64;
        ioctl(fd, NBD_SET_BLKSIZE, bs as libc::c_ulong).map_err(|e| err("NBD_SET_BLKSIZE", e))?;
        let blocks = p.size / bs;
        ioctl(fd, NBD_SET_SIZE_BLOCKS, blocks as libc::c_ulong)
            .map_err(|e| err("NBD_SET_SIZE_BLOCKS", e))?;
        if let Err(e) = ioctl(fd, NBD_SET_FLAGS, p.flags as libc::c_ulong) {
            if e.raw_os_error() != Some(libc::ENOTTY) {
                return Err(err("NBD_SET_FLAGS", e));
            }
            // Old kernels: at least honour read-only.
            let ro: libc::c_int = (p.flags & 2 != 0) as libc::c_int;
            // SAFETY: BLKROSET reads one int from the pointer, which is valid for the call.
            unsafe { libc::ioctl(fd, BLKROSET as _, &ro as *const libc::c_int) };
        }
        if let Some(t) = p.timeout {
            ioctl(fd, NBD_SET_TIMEOUT, t as libc::c_ulong)
                .map_err(|e| err("NBD_SET_TIMEOUT", e))?;
        }
        ioctl(fd, NBD_SET_SOCK, sock.as_raw_fd() as libc::c_ulong).map_err(|e| {
            if e.raw_os_error() == Some(libc::EBUSY) {
                KernelError::Other(format!("{} is busy (already connected)", dev.display()))
            } else {
                err("NBD_SET_SOCK", e)
            }
        })?;
        let thread = std::thread::Builder::new()
            .name("nbd-do-it".into())
            .spawn(move || {
                // The kernel holds its own reference to the socket from here on.
                let fd = f.as_raw_fd();
                if let Err(e) = ioctl(fd, NBD_DO_IT, 0) {
                    if e.raw_os_error() != Some(libc::EPIPE) {
                        tracing::info!("NBD_DO_IT ended: {e}");
                    }
                }
                let _ = ioctl(fd, NBD_CLEAR_QUE, 0);
                let _ = ioctl(fd, NBD_CLEAR_SOCK, 0);
                drop(sock);
            })
            .map_err(|e| KernelError::Other(format!("cannot start the NBD_DO_IT thread: {e}")))?;
        Ok(IoctlBinding { index, thread })
    }

    pub fn wait(self) {
        let _ = self.thread.join();
    }
}

/// `-d` through ioctls, as qemu-nbd does it.
pub fn disconnect(fd: RawFd) -> std::io::Result<()> {
    let _ = ioctl(fd, NBD_CLEAR_QUE, 0);
    ioctl(fd, NBD_DISCONNECT, 0)?;
    let _ = ioctl(fd, NBD_CLEAR_SOCK, 0);
    Ok(())
}

/// Have the kernel read the partition table now (needs the module's max_part > 0).
pub fn reread_partitions(fd: RawFd) {
    if let Err(e) = ioctl(fd, BLKRRPART, 0) {
        tracing::debug!("BLKRRPART: {e}");
    }
}
