//! One queue thread: fetch requests from the driver and serve each on this thread with the
//! synchronous backend call, then commit it (the driver takes commits only from here).
//! One `IoBuf` per tag, allocated once: no allocation per request.

use super::request;
use backends::Device;
use libublk::io::{UblkDev, UblkIOCtx, UblkQueue};
use libublk::{BufDesc, BufDescList, UblkIORes};
use std::sync::mpsc::Sender;

/// What a queue thread reports once, before serving: its kernel thread id, or why it
/// could not start.
pub type Started = (u16, Result<libc::pid_t, String>);

/// Run queue `qid` until the device stops. Reports to `started` once its fetch commands
/// are queued (or it failed), so the caller starts the device only when every queue is in.
pub fn run(qid: u16, dev: &UblkDev, device: Device, started: Sender<Started>) {
    let tid = libublk::ctrl::UblkCtrl::init_queue_thread();
    let bufs = dev.alloc_queue_io_bufs();
    let queue = UblkQueue::new(qid, dev)
        .and_then(|q| q.submit_fetch_commands_unified(BufDescList::Slices(Some(&bufs))));
    let q = match queue {
        Ok(q) => q,
        Err(e) => {
            let _ = started.send((qid, Err(super::describe(&e))));
            return;
        }
    };
    if started.send((qid, Ok(tid))).is_err() {
        return;
    }
    drop(started);
    tracing::debug!("ublk queue {qid} serving (tid {tid})");
    // The buffers move into the handler; their memory (registered above) stays put.
    let mut bufs = bufs;
    q.wait_and_handle_io(move |q: &UblkQueue, tag: u16, _ctx: &UblkIOCtx| {
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
        let res = request::execute(&device, &req, buf.as_mut_slice());
        if let Err(e) = q.complete_io_cmd_unified(
            tag,
            BufDesc::Slice(buf.as_slice()),
            Ok(UblkIORes::Result(res)),
        ) {
            tracing::error!(
                "ublk queue {qid}: committing tag {tag}: {}",
                super::describe(&e)
            );
        }
    });
    tracing::debug!("ublk queue {qid} stopped");
}
