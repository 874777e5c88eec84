//! `--aio`: how the raw backend's positional reads and writes reach the kernel. `threads`
//! is plain pread/pwrite on the calling worker thread; `io_uring` submits each request to a
//! ring owned by that thread; `native` uses Linux AIO (io_submit), which needs O_DIRECT.

use std::cell::RefCell;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AioMode {
    #[default]
    Threads,
    IoUring,
    Native,
}

impl AioMode {
    pub fn from_name(s: &str) -> Option<AioMode> {
        match s {
            "threads" => Some(AioMode::Threads),
            "io_uring" => Some(AioMode::IoUring),
            "native" => Some(AioMode::Native),
            _ => None,
        }
    }
}

thread_local! {
    static RING: RefCell<Option<io_uring::IoUring>> = const { RefCell::new(None) };
    static AIO_CTX: RefCell<Option<AioContext>> = const { RefCell::new(None) };
}

enum Op {
    Read,
    Write,
}

/// One read or write of up to `len` bytes at `offset`; returns bytes done.
fn uring_rw(f: &File, op: Op, ptr: *mut u8, len: usize, offset: u64) -> io::Result<usize> {
    use io_uring::{opcode, types};
    RING.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            *slot = Some(io_uring::IoUring::new(8)?);
        }
        let ring = slot.as_mut().ok_or_else(|| io::Error::other("no ring"))?;
        let fd = types::Fd(f.as_raw_fd());
        let len32 = len.min(1 << 30) as u32;
        let sqe = match op {
            Op::Read => opcode::Read::new(fd, ptr, len32).offset(offset).build(),
            Op::Write => opcode::Write::new(fd, ptr, len32).offset(offset).build(),
        };
        // SAFETY: the buffer behind `ptr` is borrowed by our caller for the whole call, and we
        // wait for the completion below before returning, so the kernel never outlives it.
        unsafe { ring.submission().push(&sqe) }
            .map_err(|_| io::Error::other("io_uring queue full"))?;
        let res = loop {
            if let Some(cqe) = ring.completion().next() {
                break cqe.result();
            }
            match ring.submit_and_wait(1) {
                Ok(_) => {}
                // A signal or a full completion queue: the request may be in flight and
                // still using the buffer, so wait on for it.
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)
                    ) => {}
                Err(e) if !ring.submission().is_empty() => {
                    // Never submitted: drop the ring so the entry can never be.
                    *slot = None;
                    return Err(e);
                }
                Err(_) => std::thread::sleep(std::time::Duration::from_micros(50)),
            }
        };
        if res < 0 {
            Err(io::Error::from_raw_os_error(-res))
        } else {
            Ok(res as usize)
        }
    })
}

/// The kernel's `struct iocb` (linux/aio_abi.h, little-endian layout).
#[repr(C)]
#[derive(Default)]
struct Iocb {
    aio_data: u64,
    aio_key: u32,
    aio_rw_flags: i32,
    aio_lio_opcode: u16,
    aio_reqprio: i16,
    aio_fildes: u32,
    aio_buf: u64,
    aio_nbytes: u64,
    aio_offset: i64,
    aio_reserved2: u64,
    aio_flags: u32,
    aio_resfd: u32,
}

#[repr(C)]
#[derive(Default)]
struct IoEvent {
    data: u64,
    obj: u64,
    res: i64,
    res2: i64,
}

struct AioContext(libc::c_ulong);

impl Drop for AioContext {
    fn drop(&mut self) {
        // SAFETY: destroys a context this thread created; no request is in flight.
        unsafe { libc::syscall(libc::SYS_io_destroy, self.0) };
    }
}

fn native_rw(f: &File, op: Op, ptr: *mut u8, len: usize, offset: u64) -> io::Result<usize> {
    AIO_CTX.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            let mut ctx: libc::c_ulong = 0;
            // SAFETY: io_setup writes the new context id into `ctx`, which is valid.
            let r = unsafe { libc::syscall(libc::SYS_io_setup, 8, &mut ctx as *mut libc::c_ulong) };
            if r < 0 {
                return Err(io::Error::last_os_error());
            }
            *slot = Some(AioContext(ctx));
        }
        let ctx = slot
            .as_ref()
            .map(|c| c.0)
            .ok_or_else(|| io::Error::other("no aio context"))?;
        let mut cb = Iocb {
            aio_lio_opcode: match op {
                Op::Read => 0,
                Op::Write => 1,
            },
            aio_fildes: f.as_raw_fd() as u32,
            aio_buf: ptr as u64,
            aio_nbytes: len as u64,
            aio_offset: offset as i64,
            ..Default::default()
        };
        let mut list = [&mut cb as *mut Iocb];
        // SAFETY: the iocb and the buffer it points to outlive the request: we wait for its
        // completion below before either goes out of scope.
        let r = unsafe {
            libc::syscall(
                libc::SYS_io_submit,
                ctx,
                1 as libc::c_long,
                list.as_mut_ptr(),
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut ev = IoEvent::default();
        loop {
            // SAFETY: one event slot, valid for the call; no timeout.
            let n = unsafe {
                libc::syscall(
                    libc::SYS_io_getevents,
                    ctx,
                    1 as libc::c_long,
                    1 as libc::c_long,
                    &mut ev as *mut IoEvent,
                    std::ptr::null_mut::<libc::timespec>(),
                )
            };
            if n == 1 {
                break;
            }
            let e = io::Error::last_os_error();
            if n < 0 && e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
        if ev.res < 0 {
            Err(io::Error::from_raw_os_error(-ev.res as i32))
        } else {
            Ok(ev.res as usize)
        }
    })
}

/// Read as much of `buf` as the file has at `offset` (fewer bytes only at end of file).
pub fn read_at(mode: AioMode, f: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    match mode {
        AioMode::Threads => f.read_at(buf, offset),
        AioMode::IoUring => uring_rw(f, Op::Read, buf.as_mut_ptr(), buf.len(), offset),
        AioMode::Native => native_rw(f, Op::Read, buf.as_mut_ptr(), buf.len(), offset),
    }
}

pub fn write_at(mode: AioMode, f: &File, buf: &[u8], offset: u64) -> io::Result<usize> {
    match mode {
        AioMode::Threads => f.write_at(buf, offset),
        // The kernel only reads from the buffer for a write.
        AioMode::IoUring => uring_rw(f, Op::Write, buf.as_ptr() as *mut u8, buf.len(), offset),
        AioMode::Native => native_rw(f, Op::Write, buf.as_ptr() as *mut u8, buf.len(), offset),
    }
}

pub fn write_all_at(mode: AioMode, f: &File, mut buf: &[u8], mut offset: u64) -> io::Result<()> {
    while !buf.is_empty() {
        match write_at(mode, f, buf, offset) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                buf = &buf[n..];
                offset += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_mode_round_trips() {
        let f = tempfile::tempfile().unwrap();
        for (i, mode) in [AioMode::Threads, AioMode::IoUring].into_iter().enumerate() {
            let data = vec![i as u8 + 1; 10000];
            match write_all_at(mode, &f, &data, 4096) {
                Ok(()) => {}
                Err(e) => {
                    eprintln!("SKIP: {mode:?} is not available here: {e}");
                    continue;
                }
            }
            let mut back = vec![0u8; 10000];
            let n = read_at(mode, &f, &mut back, 4096).unwrap();
            assert_eq!(n, 10000);
            assert_eq!(back, data);
        }
    }
}
