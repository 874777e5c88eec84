//! What to undo when the process ends, however it ends — an error (`die`), a signal, the
//! last client leaving, `-d`: the kernel device unbound (a ublk device stopped, and deleted
//! after the close), the image closed (qemu stores persistent bitmaps then), and the files
//! we created removed (socket, `-s` overlay; not the pid file, which qemu-nbd leaves behind
//! too, and scripts remove themselves). One process-wide record, filled in as things are
//! created.

use backends::BlockBackend;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

pub struct Cleanup {
    /// A kernel device bound with -c: disconnected first, while the server still answers.
    pub unbind: Option<PathBuf>,
    /// A ublk device served with -c: stopped first (the kernel writes back through the
    /// queues), deleted once the image is closed.
    pub ublk: Option<frontends::ublk::Ublk>,
    /// The opened image (closing it closes what it is layered on).
    pub image: Option<Arc<dyn BlockBackend>>,
    pub socket: Option<PathBuf>,
    /// The temporary overlay of `-s`.
    pub overlay: Option<PathBuf>,
    /// `--stats`: the last report, first of all.
    pub stats: Option<crate::stats::Reporter>,
}

static CLEANUP: Mutex<Cleanup> = Mutex::new(Cleanup {
    unbind: None,
    ublk: None,
    image: None,
    socket: None,
    overlay: None,
    stats: None,
});

/// The record, to add what was just created.
pub fn get() -> MutexGuard<'static, Cleanup> {
    CLEANUP.lock().unwrap_or_else(|p| p.into_inner())
}

/// Undo everything recorded (each item once).
pub fn run() {
    get().run();
}

/// From `die`: skipped if the record is held right now (by the caller, in the middle of a
/// change), since waiting would deadlock.
pub fn run_on_error() {
    if let Ok(mut c) = CLEANUP.try_lock() {
        c.run();
    }
}

impl Cleanup {
    fn run(&mut self) {
        if let Some(r) = self.stats.take() {
            r.report("exit");
        }
        if let Some(dev) = self.unbind.take() {
            if let Err(e) = frontends::kernel::disconnect(&dev, frontends::kernel::Api::Auto) {
                tracing::info!("disconnecting {}: {e}", dev.display());
            }
        }
        if let Some(u) = &self.ublk {
            u.stop();
        }
        if let Some(b) = self.image.take() {
            if let Err(e) = b.close() {
                eprintln!("{}: flush on exit failed: {e}", crate::prog::name());
            }
        }
        if let Some(u) = self.ublk.take() {
            u.delete();
        }
        for p in [self.socket.take(), self.overlay.take()]
            .into_iter()
            .flatten()
        {
            let _ = std::fs::remove_file(p);
        }
    }
}
