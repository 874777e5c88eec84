//! `-s` as qemu-nbd does it: a temporary qcow2 overlay in $TMPDIR (else /var/tmp) backed by
//! the image, opened writable. The file is removed when the backend is dropped; its path is
//! exposed so a signal handler can remove it too.

use crate::filter::Filter;
use crate::open::Format;
use crate::qcow2::{Qcow2, Qcow2Options};
use crate::{BlockBackend, Error, Result};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

const CLUSTER_BITS: u32 = 16;

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
    /// in `base_format`.
    pub fn create(
        base_path: &Path,
        base_format: Format,
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
        let image = new_image(base.size(), &backing.to_string_lossy(), base_format.name())
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

/// The bytes of an empty v3 qcow2 image (64 KiB clusters, 16-bit refcounts) of `size` bytes
/// backed by `backing` in `backing_fmt`: header, refcount table, one refcount block, L1.
pub fn new_image(
    size: u64,
    backing: &str,
    backing_fmt: &str,
) -> std::result::Result<Vec<u8>, String> {
    let cs = 1u64 << CLUSTER_BITS;
    let l2_span = cs * (cs / 8);
    let l1_size = size.div_ceil(l2_span);
    let l1_clusters = (l1_size * 8).div_ceil(cs).max(1);
    let clusters = 3 + l1_clusters;
    if clusters > cs / 2 || backing.len() > 1023 {
        return Err(format!("cannot create an overlay for a {size}-byte image"));
    }
    let mut img = vec![0u8; (clusters * cs) as usize];
    let put32 = |b: &mut [u8], at: usize, v: u32| b[at..at + 4].copy_from_slice(&v.to_be_bytes());
    let put64 = |b: &mut [u8], at: usize, v: u64| b[at..at + 8].copy_from_slice(&v.to_be_bytes());
    // Extensions after the 112-byte header: backing format, end; then the backing name.
    let fmt_len = backing_fmt.len();
    let ext_end = 112 + 8 + fmt_len.div_ceil(8) * 8;
    let name_at = ext_end + 8;
    put32(&mut img, 0, super::qcow2::header::MAGIC);
    put32(&mut img, 4, 3);
    put64(&mut img, 8, name_at as u64);
    put32(&mut img, 16, backing.len() as u32);
    put32(&mut img, 20, CLUSTER_BITS);
    put64(&mut img, 24, size);
    put32(&mut img, 36, l1_size as u32);
    put64(&mut img, 40, 3 * cs);
    put64(&mut img, 48, cs);
    put32(&mut img, 56, 1);
    put32(&mut img, 96, 4);
    put32(&mut img, 100, 112);
    put32(&mut img, 112, 0xe279_2aca);
    put32(&mut img, 116, fmt_len as u32);
    img[120..120 + fmt_len].copy_from_slice(backing_fmt.as_bytes());
    img[name_at..name_at + backing.len()].copy_from_slice(backing.as_bytes());
    put64(&mut img, cs as usize, 2 * cs);
    for c in 0..clusters as usize {
        img[2 * cs as usize + c * 2 + 1] = 1;
    }
    Ok(img)
}
