//! Blocking requests (FLUSH, writes with FUA, and the settle of a write whose metadata must
//! reach the file: all wait for the disk) go to a few worker threads, so one slow sync does
//! not hold up the other requests of its queue. A
//! worker puts the result in the queue's completion list and writes the queue's eventfd;
//! the queue keeps a read of that eventfd posted on its ring, and commits the finished
//! requests when it completes (the driver takes commits only from the queue thread).
//! Nothing is allocated per request: the job carries the tag's own buffer, the channel and
//! the lists are sized for every tag at the start.

use super::request::{self, Request, Target};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};

/// Worker threads per device.
pub const WORKERS: usize = 2;

/// Finished requests of one queue, and the eventfd that tells it.
pub struct Completions {
    done: Mutex<Vec<(u16, i32)>>,
    efd: OwnedFd,
}

impl Completions {
    pub fn new(depth: usize) -> std::io::Result<Arc<Completions>> {
        // Blocking: io_uring answers a read of a non-blocking descriptor with EAGAIN.
        // SAFETY: eventfd takes no pointers; the result is checked before use.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Arc::new(Completions {
            done: Mutex::new(Vec::with_capacity(depth)),
            // SAFETY: fd is a fresh descriptor that nothing else owns.
            efd: unsafe { OwnedFd::from_raw_fd(fd) },
        }))
    }

    pub fn eventfd(&self) -> i32 {
        self.efd.as_raw_fd()
    }

    fn push(&self, tag: u16, res: i32) {
        self.done
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((tag, res));
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a local array to our own eventfd. It cannot fail but
        // on counter overflow, which needs 2^64 - 1 unread wake-ups.
        unsafe { libc::write(self.efd.as_raw_fd(), one.as_ptr().cast(), one.len()) };
    }

    /// Move the finished requests into `out` (which has room for every tag).
    pub fn take(&self, out: &mut Vec<(u16, i32)>) {
        out.append(&mut self.done.lock().unwrap_or_else(|p| p.into_inner()));
    }

    /// How many finished requests wait to be taken.
    pub fn pending(&self) -> usize {
        self.done.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

/// One request for a worker: the tag's buffer travels with it.
pub struct Job {
    pub tag: u16,
    pub req: Request,
    /// Some(result): the request was carried out already; only its settle is left.
    pub settle: Option<i32>,
    pub buf: *mut u8,
    pub len: usize,
    pub done: Arc<Completions>,
}

// SAFETY: `buf` is the tag's buffer, which the queue thread leaves alone from the moment it
// sends the job until it takes the job's completion back; nothing else uses it meanwhile.
unsafe impl Send for Job {}

/// Whether `req` may block on the disk, so that it is better served by a worker.
pub fn blocking(req: &Request) -> bool {
    req.op == request::Op::Flush || req.flags.contains(backends::IoFlags::FUA)
}

/// Start the workers for `device`; `capacity` is the number of tags of all queues (the
/// channel never fills up, so queue threads never wait on it).
pub fn start(target: &Target, capacity: usize) -> std::io::Result<SyncSender<Job>> {
    let (tx, rx) = sync_channel::<Job>(capacity);
    let rx = Arc::new(Mutex::new(rx));
    for i in 0..WORKERS {
        let (target, rx) = (target.clone(), rx.clone());
        std::thread::Builder::new()
            .name(format!("ublk-w{i}"))
            .spawn(move || worker(target, rx))?;
    }
    Ok(tx)
}

fn worker(target: Target, rx: Arc<Mutex<Receiver<Job>>>) {
    loop {
        let job = {
            let rx = rx.lock().unwrap_or_else(|p| p.into_inner());
            match rx.recv() {
                Ok(j) => j,
                Err(_) => return,
            }
        };
        // SAFETY: see `Job`: the buffer is this job's alone until its completion is pushed.
        let buf = unsafe { std::slice::from_raw_parts_mut(job.buf, job.len) };
        let res = match job.settle {
            Some(res) => target.settle(&job.req, res),
            None => target.execute(&job.req, buf),
        };
        job.done.push(job.tag, res);
    }
}
