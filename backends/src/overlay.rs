//! `-s` as qemu-nbd does it: a temporary qcow2 overlay in $TMPDIR (else /var/tmp) backed by
//! the image, opened writable. The file is removed when the backend is dropped; its path is
//! exposed so a signal handler can remove it too.

use crate::filter::Filter;
use crate::qcow2::{Qcow2, Qcow2Options};
use crate::{BlockBackend, Error, Result};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Where qemu-nbd puts its temporary overlay: $TMPDIR, else /var/tmp.
pub fn temp_dir() -> PathBuf {
    std::env::var_os("TMPDIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/tmp"))
}

#[derive(Debug)]
pub struct TempOverlay {
    // Declared first: dropped (and flushed) before the file is removed.
    inner: Arc<dyn BlockBackend>,
    path: tempfile::TempPath,
}

impl TempOverlay {
    /// Create the overlay over `base` (already open, read-only), which lives at `base_path`
    /// in format `base_format`.
    pub fn create(
        base_path: &Path,
        base_format: &str,
        base: Arc<dyn BlockBackend>,
        dir: &Path,
        discard: bool,
    ) -> Result<TempOverlay> {
        let create_err = |e: std::io::Error| {
            Error::Open(format!(
                "Could not create temporary overlay in '{}': {e}",
                dir.display()
            ))
        };
        let mut tmp = tempfile::Builder::new()
            .prefix("vl.")
            .tempfile_in(dir)
            .map_err(create_err)?;
        let backing = std::fs::canonicalize(base_path).unwrap_or_else(|_| base_path.to_path_buf());
        let image = crate::qcow2::create::overlay_image(
            base.size(),
            &backing.to_string_lossy(),
            base_format,
        )
        .map_err(Error::Open)?;
        tmp.write_all(&image).map_err(create_err)?;
        tmp.flush().map_err(create_err)?;
        let path = tmp.into_temp_path();
        let q = Qcow2::open(
            &path,
            Qcow2Options {
                read_only: false,
                discard,
                ..Default::default()
            },
            &|_, _| Ok(base.clone()),
        )?;
        Ok(TempOverlay {
            inner: Arc::new(q),
            path,
        })
    }

    pub fn path(&self) -> PathBuf {
        self.path.to_path_buf()
    }
}

impl Filter for TempOverlay {
    fn inner(&self) -> &Arc<dyn BlockBackend> {
        &self.inner
    }
}
