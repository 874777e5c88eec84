//! The device's life: add (or take back after a crash), start the queue threads, stop and
//! delete — from whichever thread asks (libublk's control ring is per thread, so every
//! control call here first makes sure the calling thread has one).

use super::request::Target;
use super::{
    device_params, device_path, exists, offload, parse_target, queue, UblkError, UblkOptions,
};
use crate::stats::Stats;
use backends::Device;
use libublk::ctrl::{UblkCtrl, UblkCtrlBuilder};
use libublk::io::UblkDev;
use libublk::{sys, UblkFlags};
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

const CONTROL: &str = "/dev/ublk-control";

/// Every device can be recovered; in-flight requests of a dead server are sent again to
/// the next one (so a mounted filesystem sees no error, only a pause).
const CTRL_FLAGS: u64 = (sys::UBLK_F_USER_RECOVERY | sys::UBLK_F_USER_RECOVERY_REISSUE) as u64;

/// How long a stop or a `-d` waits for the server to let go.
const STOP_WAIT: Duration = Duration::from_secs(30);

/// A device of ours, shared by the serving thread and whoever stops it.
#[derive(Clone)]
pub struct Ublk {
    inner: Arc<Inner>,
}

struct Inner {
    ctrl: UblkCtrl,
    id: u32,
    opts: UblkOptions,
    state: Mutex<State>,
    changed: Condvar,
}

#[derive(Default)]
struct State {
    /// `serve` was entered: queue threads may exist.
    serving: bool,
    /// `serve` returned.
    finished: bool,
    /// The queue threads ended and the character device is closed.
    released: bool,
    deleted: bool,
}

/// Give the calling thread a control ring (libublk keeps it thread-local).
fn control_ring() -> Result<(), libublk::UblkError> {
    libublk::ublk_init_ctrl_task_ring(|ring| {
        if ring.is_none() {
            let r = io_uring::IoUring::<io_uring::squeue::Entry128>::builder()
                .build(16)
                .map_err(libublk::UblkError::IOError)?;
            *ring = Some(r);
        }
        Ok(())
    })
}

fn process_alive(pid: i32) -> bool {
    pid > 0 && nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
}

fn have_driver() -> Result<(), UblkError> {
    if Path::new(CONTROL).exists() {
        Ok(())
    } else {
        Err(UblkError::NoDriver(CONTROL))
    }
}

impl Ublk {
    /// Add a device for an image of `size` bytes, or take back `opts.id` with `recover`.
    pub fn create(opts: &UblkOptions, size: u64) -> Result<Ublk, UblkError> {
        have_driver()?;
        if size < 512 {
            return Err(UblkError::TooSmall(size));
        }
        control_ring().map_err(|e| UblkError::Create {
            which: String::new(),
            msg: super::describe(&e),
        })?;
        let ctrl = if opts.recover {
            recover(opts, size)?
        } else {
            add(opts)?
        };
        let info = ctrl.dev_info();
        tracing::debug!(
            "ublk device {}: {} queues, depth {}, flags {:#x}",
            info.dev_id,
            info.nr_hw_queues,
            info.queue_depth,
            info.flags
        );
        if info.flags & u64::from(sys::UBLK_F_USER_RECOVERY) == 0 {
            tracing::warn!("the kernel dropped USER_RECOVERY: this device cannot be recovered");
        }
        Ok(Ublk {
            inner: Arc::new(Inner {
                id: info.dev_id,
                ctrl,
                opts: opts.clone(),
                state: Mutex::new(State::default()),
                changed: Condvar::new(),
            }),
        })
    }

    pub fn id(&self) -> u32 {
        self.inner.id
    }

    pub fn path(&self) -> PathBuf {
        device_path(self.inner.id)
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn step(&self, step: &'static str) -> impl Fn(libublk::UblkError) -> UblkError + '_ {
        move |e| UblkError::Step {
            path: self.path().display().to_string(),
            step,
            msg: super::describe(&e),
        }
    }

    /// Serve `device` until the device is stopped (by [`Ublk::stop`], `-d` or the kernel).
    /// `ready` runs once the block device exists.
    /// Serve `device` (counting into `stats`) until the device stops; `ready` is called
    /// with the device's path once it exists.
    pub fn serve(
        &self,
        device: Device,
        stats: Option<Arc<Stats>>,
        ready: impl FnOnce(&Path),
    ) -> Result<(), UblkError> {
        self.state().serving = true;
        let r = self.run_queues(Target { device, stats }, ready);
        let mut st = self.state();
        st.finished = true;
        self.inner.changed.notify_all();
        r
    }

    fn run_queues(&self, target: Target, ready: impl FnOnce(&Path)) -> Result<(), UblkError> {
        let dev = Arc::new(self.open_dev(&target)?);
        let (tx, rx) = mpsc::channel();
        let threads = self.spawn_queues(&dev, &target, tx)?;
        self.configure_queues(&dev, &rx)?;
        self.inner
            .ctrl
            .start_dev(&dev)
            .map_err(self.step("starting the device"))?;
        ready(&self.path());
        for t in threads {
            if t.join().is_err() {
                tracing::error!("a ublk queue thread panicked");
            }
        }
        drop(dev);
        self.state().released = true;
        Ok(())
    }

    fn failed(&self, step: &'static str, msg: impl ToString) -> UblkError {
        UblkError::Step {
            path: self.path().display().to_string(),
            step,
            msg: msg.to_string(),
        }
    }

    /// The device's character device, with the parameters the backend's size and
    /// capabilities give.
    fn open_dev(&self, target: &Target) -> Result<UblkDev, UblkError> {
        let ctrl = &self.inner.ctrl;
        let size = target.device.size();
        let params = device_params(size, target.device.caps(), ctrl.dev_info().max_io_buf_bytes);
        UblkDev::new(
            "qnbd".into(),
            |d: &mut UblkDev| {
                d.tgt.dev_size = size;
                d.tgt.params = params;
                Ok(())
            },
            ctrl,
        )
        .map_err(self.step("opening the character device"))
    }

    /// The workers (unless offload is off) and one thread per queue, each reporting on
    /// `started` once it serves.
    fn spawn_queues(
        &self,
        dev: &Arc<UblkDev>,
        target: &Target,
        started: mpsc::Sender<queue::Started>,
    ) -> Result<Vec<std::thread::JoinHandle<()>>, UblkError> {
        let nr = dev.dev_info.nr_hw_queues;
        let tags = usize::from(nr) * usize::from(dev.dev_info.queue_depth);
        let workers = match self.inner.opts.offload {
            true => Some(
                offload::start(target, tags).map_err(|e| self.failed("starting the workers", e))?,
            ),
            false => None,
        };
        let mut threads = Vec::with_capacity(usize::from(nr));
        for qid in 0..nr {
            let (dev, target, tx) = (dev.clone(), target.clone(), started.clone());
            let workers = workers.clone();
            let t = std::thread::Builder::new()
                .name(format!("ublk-q{qid}"))
                .spawn(move || queue::run(qid, &dev, target, workers, tx))
                .map_err(|e| self.failed("starting a queue thread", e))?;
            threads.push(t);
        }
        Ok(threads)
    }

    /// Wait for every queue thread to serve, then tell the driver its thread (and pin it
    /// with `QNBD_UBLK_PIN`).
    fn configure_queues(
        &self,
        dev: &UblkDev,
        started: &mpsc::Receiver<queue::Started>,
    ) -> Result<(), UblkError> {
        let ctrl = &self.inner.ctrl;
        for _ in 0..dev.dev_info.nr_hw_queues {
            match started.recv() {
                Ok((qid, Ok(tid))) => {
                    if self.inner.opts.pin_queues {
                        ctrl.set_thread_affinity(qid, tid);
                    }
                    if let Err(e) = ctrl.configure_queue(dev, qid, tid) {
                        tracing::debug!("ublk queue {qid}: {}", super::describe(&e));
                    }
                }
                Ok((0, Err(msg))) => return Err(self.failed("setting up queue 0", msg)),
                Ok((_, Err(msg))) => return Err(self.failed("setting up a queue", msg)),
                Err(_) => return Err(self.failed("setting up the queues", "a queue thread ended")),
            }
        }
        Ok(())
    }

    /// Stop the device (the kernel writes back what it holds through the queues, then
    /// aborts them) and wait until [`Ublk::serve`] returned. Nothing if it is not serving.
    pub fn stop(&self) {
        {
            let st = self.state();
            if !st.serving || st.finished {
                return;
            }
        }
        if let Err(e) = control_ring().and_then(|()| self.inner.ctrl.kill_dev()) {
            tracing::info!(
                "stopping {}: {}",
                self.path().display(),
                super::describe(&e)
            );
        }
        let deadline = Instant::now() + STOP_WAIT;
        let mut st = self.state();
        while !st.finished {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                tracing::warn!(
                    "{} did not stop within {STOP_WAIT:?}",
                    self.path().display()
                );
                return;
            }
            st = match self.inner.changed.wait_timeout(st, left) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
    }

    /// Delete the device. Called after [`Ublk::stop`] and after the image is closed; if
    /// queue threads could not be ended, the kernel finishes the deletion when we exit.
    pub fn delete(&self) {
        let released = {
            let mut st = self.state();
            if st.deleted {
                return;
            }
            st.deleted = true;
            !st.serving || st.released
        };
        let ctrl = &self.inner.ctrl;
        let r = control_ring().and_then(|()| {
            if released {
                ctrl.del_dev()
            } else {
                ctrl.del_dev_async()
            }
        });
        if let Err(e) = r {
            tracing::info!(
                "deleting {}: {}",
                self.path().display(),
                super::describe(&e)
            );
        }
    }
}

/// ADD_DEV, with the id asked for or the next free one.
fn add(opts: &UblkOptions) -> Result<UblkCtrl, UblkError> {
    let which = opts
        .id
        .map(|id| format!(" {}", device_path(id).display()))
        .unwrap_or_default();
    if let Some(id) = opts.id {
        if exists(id) {
            return Err(UblkError::Exists {
                path: device_path(id).display().to_string(),
            });
        }
    }
    UblkCtrlBuilder::default()
        .name("qnbd")
        .id(opts.id.map_or(-1, |i| i as i32))
        .nr_queues(opts.queues)
        .depth(opts.depth)
        .io_buf_bytes(opts.io_buf_bytes)
        .ctrl_flags(CTRL_FLAGS)
        .dev_flags(UblkFlags::UBLK_DEV_F_ADD_DEV)
        .build()
        .map_err(|e| UblkError::Create {
            which,
            msg: super::describe(&e),
        })
}

/// Take back a device whose server died: it must have been created for recovery, be
/// quiesced (not live, not dead), and have the image's size. START_USER_RECOVERY here;
/// starting the device later sends END_USER_RECOVERY.
fn recover(opts: &UblkOptions, size: u64) -> Result<UblkCtrl, UblkError> {
    let Some(id) = opts.id else {
        return Err(UblkError::Recover {
            path: "ublk".into(),
            msg: "--recover needs the device: -c /dev/ublkbN".into(),
        });
    };
    let path = device_path(id).display().to_string();
    let fail = |msg: String| UblkError::Recover {
        path: path.clone(),
        msg,
    };
    if !exists(id) {
        return Err(UblkError::NoSuchDevice { path: path.clone() });
    }
    let probe = UblkCtrl::new_simple(id as i32).map_err(|e| fail(super::describe(&e)))?;
    // Right after a kill the kernel may not have noticed the death yet.
    let deadline = Instant::now() + Duration::from_secs(10);
    let info = loop {
        let info = probe.dev_info();
        if info.flags & u64::from(sys::UBLK_F_USER_RECOVERY) == 0 {
            return Err(fail("it was not created for recovery".into()));
        }
        match u32::from(info.state) {
            sys::UBLK_S_DEV_QUIESCED | sys::UBLK_S_DEV_FAIL_IO => break info,
            sys::UBLK_S_DEV_LIVE
                if !process_alive(info.ublksrv_pid) && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(50));
                probe
                    .read_dev_info()
                    .map_err(|e| fail(super::describe(&e)))?;
            }
            sys::UBLK_S_DEV_LIVE => {
                return Err(fail(format!(
                    "it is still served by process {}",
                    info.ublksrv_pid
                )))
            }
            _ => return Err(fail("it is not started".into())),
        }
    };
    // The device keeps its queues, depth and buffer size; the new control must match them.
    let ctrl = UblkCtrlBuilder::default()
        .name("qnbd")
        .id(id as i32)
        .nr_queues(info.nr_hw_queues)
        .depth(info.queue_depth)
        .io_buf_bytes(info.max_io_buf_bytes)
        .ctrl_flags(CTRL_FLAGS)
        .dev_flags(UblkFlags::UBLK_DEV_F_RECOVER_DEV)
        .build()
        .map_err(|e| fail(super::describe(&e)))?;
    if (info.nr_hw_queues, info.queue_depth) != (opts.queues, opts.depth) {
        tracing::info!(
            "{path} keeps its {} queues of depth {}",
            info.nr_hw_queues,
            info.queue_depth
        );
    }
    let mut p = sys::ublk_params::default();
    ctrl.get_params(&mut p)
        .map_err(|e| fail(format!("reading its parameters: {}", super::describe(&e))))?;
    if p.basic.dev_sectors != size >> 9 {
        return Err(fail(format!(
            "the device has {} sectors, the image {}",
            p.basic.dev_sectors,
            size >> 9
        )));
    }
    ctrl.start_user_recover()
        .map_err(|e| fail(format!("START_USER_RECOVERY: {}", super::describe(&e))))?;
    Ok(ctrl)
}

/// `-d /dev/ublkbN`: a live server is asked to stop (it writes back, closes its image and
/// deletes the device itself); a device whose server is gone is deleted here. Returns once
/// the device is gone.
pub fn disconnect(dev: &str) -> Result<(), UblkError> {
    let Some(Some(id)) = parse_target(dev) else {
        return Err(UblkError::NotUblk(dev.to_string()));
    };
    have_driver()?;
    if !exists(id) {
        return Err(UblkError::NoSuchDevice {
            path: dev.to_string(),
        });
    }
    let step = |step: &'static str| {
        move |e: libublk::UblkError| UblkError::Step {
            path: dev.to_string(),
            step,
            msg: super::describe(&e),
        }
    };
    control_ring().map_err(step("opening the control device"))?;
    let ctrl = UblkCtrl::new_simple(id as i32).map_err(step("reading the device"))?;
    let info = ctrl.dev_info();
    let pid = info.ublksrv_pid;
    if u32::from(info.state) == sys::UBLK_S_DEV_LIVE && process_alive(pid) {
        ctrl.kill_dev().map_err(step("stopping the device"))?;
        let deadline = Instant::now() + STOP_WAIT;
        while (exists(id) || process_alive(pid)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    if exists(id) {
        ctrl.del_dev().map_err(step("deleting the device"))?;
    }
    Ok(())
}
