//! Format probing and opening: the one place that turns a file name and options into a backend.

use crate::raw::{RawFile, RawOptions};
use crate::slice::Slice;
use crate::{BlockBackend, Error, Result};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Image formats qnbd knows by name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Raw,
    Qcow2,
}

impl Format {
    /// Parse a `-f` / `driver=` name; None for a name qemu would call an unknown driver.
    pub fn from_name(name: &str) -> Option<Format> {
        match name {
            "raw" => Some(Format::Raw),
            "qcow2" => Some(Format::Qcow2),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
        }
    }
}

/// Everything needed to open one image.
#[derive(Clone, Debug, Default)]
pub struct ImageOptions {
    pub path: PathBuf,
    /// None: probe.
    pub format: Option<Format>,
    pub read_only: bool,
    /// `--discard=unmap`.
    pub discard: bool,
    /// O_DIRECT on the image file (`--cache=none|directsync`, `-n`).
    pub direct: bool,
    /// `--aio`.
    pub aio: crate::aio::AioMode,
    /// Byte window into the image (`-o`, `offset=`/`size=`).
    pub offset: u64,
    pub size: Option<u64>,
    /// `-s`: writes go to a temporary qcow2 overlay; the image is only read.
    pub snapshot: bool,
    /// How deep in a backing chain this image is (0 for the image itself).
    pub chain_depth: u32,
    /// `-l`: export this internal snapshot (by id, then by name) read-only; qcow2 only.
    pub load_snapshot: Option<String>,
    /// qcow2 `backing=` / `backing.file.filename=` from `--image-opts`.
    pub backing: crate::qcow2::BackingChoice,
}

/// Longest backing chain followed, counting the top image.
pub const MAX_BACKING_DEPTH: u32 = 16;

/// What was opened, and what a user should be warned about.
pub struct Opened {
    pub backend: Arc<dyn BlockBackend>,
    pub format: Format,
    pub warnings: Vec<String>,
    /// With `snapshot`: the temporary overlay file, removed when the backend is dropped
    /// (a signal handler should remove it too).
    pub temp_overlay: Option<PathBuf>,
}

const QCOW2_MAGIC: &[u8; 4] = b"QFI\xfb";

/// Guess an image's format from its first bytes; raw when nothing matches.
pub fn detect_format(head: &[u8]) -> Format {
    if head.len() >= 8 && &head[..4] == QCOW2_MAGIC {
        let version = u32::from_be_bytes([head[4], head[5], head[6], head[7]]);
        if version >= 2 {
            return Format::Qcow2;
        }
    }
    Format::Raw
}

fn read_head(path: &Path) -> Result<Vec<u8>> {
    let f = File::open(path).map_err(|e| {
        let msg = e
            .raw_os_error()
            .map(|c| nix::errno::Errno::from_raw(c).desc().to_string());
        Error::Open(format!(
            "Could not open '{}': {}",
            path.display(),
            msg.unwrap_or_else(|| e.to_string())
        ))
    })?;
    let mut head = vec![0u8; 512];
    let mut got = 0;
    while got < head.len() {
        match f.read_at(&mut head[got..], got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                return Err(Error::Open(format!(
                    "Could not read '{}': {e}",
                    path.display()
                )))
            }
        }
    }
    head.truncate(got);
    Ok(head)
}

/// Open an image as qemu's block layer would: probe or check the format, open the format
/// driver over the file, then apply the byte window.
pub fn open_image(opts: &ImageOptions) -> Result<Opened> {
    if opts.aio == crate::aio::AioMode::Native && !opts.direct {
        return Err(Error::Open(
            "aio=native was specified, but it requires cache.direct=on, which was not specified."
                .into(),
        ));
    }
    let head = read_head(&opts.path)?;
    let detected = detect_format(&head);
    let mut warnings = Vec::new();
    let format = match opts.format {
        Some(f) => {
            if f == Format::Qcow2 && detected != Format::Qcow2 {
                return Err(Error::Open("Image is not in qcow2 format".into()));
            }
            f
        }
        None => {
            if detected == Format::Raw {
                let name = opts.path.display();
                warnings.push(format!(
                    "WARNING: Image format was not specified for '{name}' and probing guessed raw.\n         \
                     Automatically detecting the format is dangerous for raw images, write operations on block 0 will be restricted.\n         \
                     Specify the 'raw' format explicitly to remove the restrictions."
                ));
            }
            detected
        }
    };
    let raw_opts = RawOptions {
        read_only: opts.read_only || opts.snapshot,
        discard: opts.discard,
        direct: opts.direct,
        aio: opts.aio,
    };
    let backend: Arc<dyn BlockBackend> = match format {
        Format::Raw => {
            let raw = Arc::new(RawFile::open(&opts.path, raw_opts)?);
            if opts.format.is_none() && !opts.read_only && !opts.snapshot {
                Arc::new(crate::probe_guard::ProbedRaw::new(raw))
            } else {
                raw
            }
        }
        Format::Qcow2 => Arc::new(open_qcow2(opts, opts.read_only || opts.snapshot)?),
    };
    let mut temp_overlay = None;
    let backend: Arc<dyn BlockBackend> = if opts.snapshot {
        let dir = crate::overlay::temp_dir();
        let ov =
            crate::overlay::TempOverlay::create(&opts.path, format, backend, &dir, opts.discard)?;
        temp_overlay = Some(ov.path());
        Arc::new(ov)
    } else {
        backend
    };
    let backend: Arc<dyn BlockBackend> = if opts.offset != 0 || opts.size.is_some() {
        Arc::new(Slice::new(backend, opts.offset, opts.size)?)
    } else {
        backend
    };
    Ok(Opened {
        backend,
        format,
        warnings,
        temp_overlay,
    })
}

fn open_qcow2(opts: &ImageOptions, read_only: bool) -> Result<crate::qcow2::Qcow2> {
    let depth = opts.chain_depth;
    let open_backing = |path: &Path, fmt: Option<&str>| -> Result<Arc<dyn BlockBackend>> {
        if depth + 1 >= MAX_BACKING_DEPTH {
            return Err(Error::Open(format!(
                "Backing chain of '{}' is deeper than {MAX_BACKING_DEPTH} images",
                opts.path.display()
            )));
        }
        let format = match fmt {
            Some(name) => Some(
                Format::from_name(name)
                    .ok_or_else(|| Error::Open(format!("Unknown driver '{name}'")))?,
            ),
            None => None,
        };
        let o = ImageOptions {
            path: path.to_path_buf(),
            format,
            read_only: true,
            chain_depth: depth + 1,
            ..Default::default()
        };
        Ok(open_image(&o)?.backend)
    };
    crate::qcow2::Qcow2::open(
        &opts.path,
        crate::qcow2::Qcow2Options {
            read_only,
            discard: opts.discard,
            load_snapshot: opts.load_snapshot.clone(),
            backing: opts.backing.clone(),
            direct: opts.direct,
        },
        &open_backing,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probes_qcow2_magic_and_falls_back_to_raw() {
        assert_eq!(detect_format(b"QFI\xfb\0\0\0\x03rest"), Format::Qcow2);
        assert_eq!(detect_format(b"QFI\xfb\0\0\0\x01rest"), Format::Raw);
        assert_eq!(detect_format(b"QFI"), Format::Raw);
        assert_eq!(detect_format(&[0u8; 512]), Format::Raw);
    }

    #[test]
    fn unknown_names_are_none() {
        assert_eq!(Format::from_name("bogus"), None);
        assert_eq!(Format::from_name("raw"), Some(Format::Raw));
    }
}
