//! One queue thread: fetch requests from the driver, serve the quick ones right here with
//! the synchronous backend call, hand the blocking ones (flush, FUA, and the settle of a
//! write whose metadata must first reach the file: see `request::settle`) to the workers, and
//! commit every request from here (the driver takes commits only from this thread). One
//! `IoBuf` per tag, allocated once: no allocation per request.

use super::offload::{self, Completions, Job};
use super::request::{self, Target};
use io_uring::{opcode, types};
use libublk::io::{UblkDev, UblkIOCtx, UblkQueue};
use libublk::{BufDesc, BufDescList, UblkIORes};
use std::sync::mpsc::{Sender, SyncSender};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What a queue thread reports once, before serving: its kernel thread id, or why it
/// could not start.
pub type Started = (u16, Result<libc::pid_t, String>);

/// Post a read of the completions' eventfd on this queue's ring (a target I/O of tag 0).
fn watch(q: &UblkQueue, done: &Completions, counter: &mut [u8; 8]) {
    let sqe = opcode::Read::new(types::Fd(done.eventfd()), counter.as_mut_ptr(), 8)
        .build()
        .user_data(UblkIOCtx::build_user_data(0, 0, 0, true));
    if let Err(e) = q.ublk_submit_sqe_sync(sqe) {
        tracing::error!(
            "ublk queue {}: posting the eventfd read: {}",
            q.get_qid(),
            super::describe(&e)
        );
    }
}

fn commit(q: &UblkQueue, tag: u16, buf: &[u8], res: i32) {
    if let Err(e) = q.complete_io_cmd_unified(tag, BufDesc::Slice(buf), Ok(UblkIORes::Result(res)))
    {
        tracing::error!(
            "ublk queue {}: committing tag {tag}: {}",
            q.get_qid(),
            super::describe(&e)
        );
    }
}

type Buffers = Vec<libublk::helpers::IoBuf<u8>>;

/// This thread's completions, buffers and queue with its fetch commands posted; on an error,
/// the reason is sent on `started` and None returned.
fn start<'a>(
    qid: u16,
    dev: &'a UblkDev,
    started: &Sender<Started>,
) -> Option<(libc::pid_t, Arc<Completions>, Buffers, UblkQueue<'a>)> {
    let tid = libublk::ctrl::UblkCtrl::init_queue_thread();
    let done = match Completions::new(usize::from(dev.dev_info.queue_depth)) {
        Ok(d) => d,
        Err(e) => {
            let _ = started.send((qid, Err(format!("eventfd: {e}"))));
            return None;
        }
    };
    let bufs = dev.alloc_queue_io_bufs();
    let queue = UblkQueue::new(qid, dev)
        .and_then(|q| q.submit_fetch_commands_unified(BufDescList::Slices(Some(&bufs))));
    match queue {
        Ok(q) => Some((tid, done, bufs, q)),
        Err(e) => {
            let _ = started.send((qid, Err(super::describe(&e))));
            None
        }
    }
}

/// Requests still with a worker use their tag's buffer: wait for them before the buffers
/// go (the driver normally lets a queue stop only when nothing is in flight).
fn wait_for_workers(qid: u16, done: &Completions, offloaded: usize, bufs: Buffers) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while done.pending() < offloaded && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    if done.pending() < offloaded {
        tracing::error!("ublk queue {qid}: a worker did not finish; keeping its buffers");
        std::mem::forget(bufs);
    }
}

/// Run queue `qid` until the device stops. Reports to `started` once its fetch commands
/// are queued (or it failed), so the caller starts the device only when every queue is in.
pub fn run(
    qid: u16,
    dev: &UblkDev,
    target: Target,
    workers: Option<SyncSender<Job>>,
    started: Sender<Started>,
) {
    let Some((tid, done, mut bufs, q)) = start(qid, dev, &started) else {
        return;
    };
    let depth = usize::from(dev.dev_info.queue_depth);
    if started.send((qid, Ok(tid))).is_err() {
        return;
    }
    drop(started);
    tracing::debug!("ublk queue {qid} serving (tid {tid})");
    let mut counter = [0u8; 8];
    let mut finished: Vec<(u16, i32)> = Vec::with_capacity(depth);
    let mut offloaded = 0usize;
    watch(&q, &done, &mut counter);
    q.wait_and_handle_io(|q: &UblkQueue, tag: u16, ctx: &UblkIOCtx| {
        if ctx.is_tgt_io() {
            // The workers finished some requests.
            done.take(&mut finished);
            for (tag, res) in finished.drain(..) {
                offloaded = offloaded.saturating_sub(1);
                if let Some(b) = bufs.get(usize::from(tag)) {
                    commit(q, tag, b.as_slice(), res);
                }
            }
            if ctx.result() != -libc::ECANCELED {
                watch(q, &done, &mut counter);
            }
            return;
        }
        let iod = *q.get_iod(tag);
        let Some(buf) = bufs.get_mut(usize::from(tag)) else {
            tracing::error!("ublk queue {qid}: tag {tag} out of range");
            return;
        };
        let req = request::decode(&iod);
        tracing::trace!(
            "ublk q{qid} tag {tag} {} offset {:#x} length {:#x}",
            req.op.name(),
            req.offset,
            req.len
        );
        // A quick request is served here; only a settle that must write metadata (which
        // syncs) is left to a worker.
        let settle = if offload::blocking(&req) {
            None
        } else {
            let res = target.run(&req, buf.as_mut_slice());
            if !target.unsettled(&req, res) {
                commit(q, tag, buf.as_slice(), res);
                return;
            }
            Some(res)
        };
        if let Some(workers) = workers.as_ref() {
            let job = Job {
                tag,
                req,
                settle,
                buf: buf.as_mut_ptr(),
                len: buf.len(),
                done: Arc::clone(&done),
            };
            if workers.try_send(job).is_ok() {
                offloaded += 1;
                return;
            }
        }
        let res = match settle {
            Some(res) => target.settle(&req, res),
            None => target.execute(&req, buf.as_mut_slice()),
        };
        commit(q, tag, buf.as_slice(), res);
    });
    wait_for_workers(qid, &done, offloaded, bufs);
    tracing::debug!("ublk queue {qid} stopped");
}
