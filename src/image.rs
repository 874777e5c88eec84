//! Opening the planned image as a `Device`: the format driver, `-o`, the cache mode and
//! zero detection above it, and the `-B` checks; every step that fails after the open
//! releases the image through the cleanup record (qemu stores persistent bitmaps then).

use crate::plan::ImagePlan;
use crate::{cleanup, die};
use backends::cache_mode::Cached;
use backends::detect_zeroes::{DetectZeroes, ZeroDetect};
use backends::open::open_image;
use backends::{BlockBackend, Device};
use std::sync::Arc;

pub fn open(plan: &ImagePlan) -> Device {
    let resolved = crate::plan::resolve_image_opts(plan);
    let plan = resolved.as_ref().unwrap_or(plan);
    let file = &plan.file;
    if let Some(f) = &plan.unknown_format {
        die(format!(
            "Failed to blk_new_open '{file}': Unknown driver '{f}'"
        ));
    }
    // The record is held across the open: a SIGTERM meanwhile (qemu-nbd only notes it until
    // its main loop runs) waits for the image, then closes it, instead of exiting in the
    // middle of a repair or before an image marked in use is marked clean again.
    let mut record = cleanup::get();
    let opened = match open_image(&plan.opts) {
        Ok(o) => o,
        Err(e) => {
            drop(record);
            match e {
                // qemu-nbd loads a snapshot and adds the export after the open succeeded,
                // so their messages have no prefix.
                backends::Error::LoadSnapshot(_) | backends::Error::Export(_) => die(e),
                e => die(format!("Failed to blk_new_open '{file}': {e}")),
            }
        }
    };
    record.image = Some(opened.backend.clone());
    record.overlay = opened.temp_overlay.clone();
    drop(record);
    for w in &opened.warnings {
        eprintln!("{w}");
    }
    if let Some(e) = &plan.after_open {
        die(e);
    }
    // Under -s qemu-nbd loads the snapshot from the new temporary overlay, which has none.
    if plan.load_snapshot && opened.temp_overlay.is_some() {
        die("Failed to load snapshot: Can't find snapshot");
    }
    // Only qcow2 has internal snapshots.
    if plan.load_snapshot && opened.format.name() != "qcow2" {
        die(format!(
            "Failed to load snapshot: Block format '{}' used by device '' does not support temporarily loading internal snapshots",
            opened.format.name()
        ));
    }
    let backend = window(opened.backend, plan.offset);
    let backend = Cached::wrap(backend, plan.cache);
    let backend: Arc<dyn BlockBackend> = if plan.detect_zeroes != DetectZeroes::Off {
        Arc::new(ZeroDetect::new(backend, plan.detect_zeroes))
    } else {
        backend
    };
    let device = Device::new(backend);
    // qemu-nbd keeps its -B list last first.
    for name in plan.bitmaps.iter().rev() {
        if let Err(e) = device.bitmap_check(name) {
            die(e);
        }
    }
    device
}

/// `-o OFFSET`: the image from that byte on.
fn window(backend: Arc<dyn BlockBackend>, offset: u64) -> Arc<dyn BlockBackend> {
    if offset == 0 {
        return backend;
    }
    let inner_size = backend.size();
    // qemu-nbd hands the offset to the raw driver as a signed number.
    if (offset as i64) < 0 {
        die(format!(
            "Value '{}' is out of range for parameter 'offset'",
            offset as i64
        ));
    }
    if offset > inner_size {
        die(format!(
            "Offset ({offset}) cannot be greater than size of the containing file ({inner_size})"
        ));
    }
    match backends::slice::Slice::new(backend, offset, None) {
        Ok(s) => Arc::new(s),
        Err(e) => die(e),
    }
}
