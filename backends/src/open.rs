//! Opening an image: the one list of format drivers, probing, the backing-chain depth limit,
//! and the layers every open may add (`-s` overlay, byte window).

use crate::file::lock::Role;
use crate::file::HostFile;
use crate::format::Driver;
use crate::slice::Slice;
use crate::{BlockBackend, Error, Result};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use crate::format::{Format, ImageOptions};

/// Every format qnbd knows, in probing order (raw last: it is the fallback).
static DRIVERS: &[&Driver] = &[
    &crate::qcow2::DRIVER,
    &crate::luks::DRIVER,
    &crate::vmdk::DRIVER,
    &crate::vdi::DRIVER,
    &crate::vpc::DRIVER,
    &crate::vhdx::DRIVER,
    &crate::qed::DRIVER,
    &crate::parallels::DRIVER,
    &crate::qcow::DRIVER,
    &crate::bochs::DRIVER,
    &crate::cloop::DRIVER,
    &crate::dmg::DRIVER,
    &crate::raw::DRIVER,
];

/// Longest backing chain followed, counting the top image.
pub const MAX_BACKING_DEPTH: u32 = 16;

impl Format {
    /// The format a `-f` / `driver=` name stands for; None for a name qemu would call an
    /// unknown driver.
    pub fn from_name(name: &str) -> Option<Format> {
        DRIVERS.iter().find(|d| d.name == name).map(|d| Format(d))
    }

    pub fn raw() -> Format {
        Format(&crate::raw::DRIVER)
    }
}

/// Guess an image's format from its first bytes; raw when nothing matches.
pub fn detect_format(head: &[u8]) -> Format {
    DRIVERS
        .iter()
        .find(|d| (d.probe)(head))
        .map_or_else(Format::raw, |d| Format(d))
}

/// Guess an image's format from its first bytes, then from its name: qemu scores a header
/// match above dmg's ".dmg" suffix, and that above raw. (The dmg driver's header probe says
/// no to every image; its name probe is asked here, the one place that knows the name.) An
/// empty file is raw without probing, as in qemu.
fn probe_format(head: &[u8], name: &Path) -> Format {
    let f = detect_format(head);
    if f == Format::raw() && !head.is_empty() && crate::dmg::probe_name(&name.to_string_lossy()) {
        return Format(&crate::dmg::DRIVER);
    }
    f
}

/// Does a first sector look like a format other than raw? (The probed-raw write guard.)
fn looks_formatted(head: &[u8]) -> bool {
    !detect_format(head).is(crate::raw::DRIVER.name)
}

/// What was opened, and what a user should be warned about.
pub struct Opened {
    pub backend: Arc<dyn BlockBackend>,
    pub format: Format,
    pub warnings: Vec<String>,
    /// With `snapshot`: the temporary overlay file, removed when the backend is dropped
    /// (a signal handler should remove it too).
    pub temp_overlay: Option<PathBuf>,
}

fn read_head(path: &Path) -> Result<Vec<u8>> {
    let f = File::open(path).map_err(|e| crate::file::open_error(path, &e))?;
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

/// The first sector of a remote file, for probing.
fn remote_head(r: &dyn crate::file::remote::Remote, name: &Path) -> Result<Vec<u8>> {
    let mut head = vec![0u8; (r.size().min(512)) as usize];
    r.read(0, &mut head).map_err(|e| {
        Error::Open(format!(
            "Could not read '{}': {}",
            name.display(),
            crate::errno_text(&e)
        ))
    })?;
    Ok(head)
}

/// qemu's warning when probing guessed raw for a writable image.
fn probed_raw_warning(path: &Path) -> String {
    format!(
        "WARNING: Image format was not specified for '{}' and probing guessed raw.\n         \
         Automatically detecting the format is dangerous for raw images, write operations on block 0 will be restricted.\n         \
         Specify the 'raw' format explicitly to remove the restrictions.",
        path.display()
    )
}

/// Open an image as qemu's block layer would: probe or take the format, open the host file,
/// open the format driver over it, then add the `-s` overlay and the byte window.
pub fn open_image(opts: &ImageOptions) -> Result<Opened> {
    if opts.aio == crate::aio::AioMode::Native && !opts.direct {
        return Err(Error::NativeAioNeedsDirect);
    }
    if let Some(null) = opts.null.or_else(|| crate::null::from_filename(&opts.path)) {
        return open_null(null, opts);
    }
    // Under -s the image itself is only read, as a backing file.
    let read_only = opts.read_only || opts.snapshot;
    let remote_opts = crate::file::remote::RemoteOptions {
        read_only,
        ..opts.remote.clone()
    };
    let remote =
        crate::file::remote::open(&opts.path.to_string_lossy(), &remote_opts).transpose()?;
    // A remote file is read here only to probe its format (each read is a request).
    let head = match (&remote, opts.format) {
        (Some(_), Some(_)) => Vec::new(),
        (Some(r), None) => remote_head(r.as_ref(), &opts.path)?,
        (None, _) => read_head(&opts.path)?,
    };
    let mut warnings = Vec::new();
    let format = match opts.format {
        Some(f) => f,
        None => {
            let name = match &remote {
                Some(r) => PathBuf::from(r.filename()),
                None => opts.path.clone(),
            };
            let f = probe_format(&head, &name);
            // qemu's raw driver warns only when the probed image is opened for writing.
            if f == Format::raw() && !read_only {
                warnings.push(probed_raw_warning(&name));
            }
            f
        }
    };
    if opts.force_share && !opts.read_only {
        return Err(Error::ForceShareReadWrite);
    }
    // qemu's lock bytes: a backing file, and the original under -s, are only read.
    let role = if opts.chain_depth > 0 || opts.snapshot {
        Role::Backing
    } else if format.driver().has_metadata {
        Role::Qcow2
    } else {
        Role::Raw
    };
    let file = match remote {
        Some(r) => HostFile::remote(r, &opts.path, read_only),
        None => HostFile::open(&opts.path, &opts.file_options(role))?,
    };
    let depth = opts.chain_depth;
    let top = &opts.path;
    let locking = opts.locking;
    let open_backing =
        move |path: &Path, fmt: Option<&str>| open_backing(top, depth, locking, path, fmt);
    let backend = (format.driver().open)(file, opts, &open_backing)?;
    // Read-only too: qemu's probed raw reads whole sectors only, whatever the mode.
    let backend: Arc<dyn BlockBackend> = if format == Format::raw() && opts.format.is_none() {
        Arc::new(crate::probe_guard::ProbedRaw::new(backend, looks_formatted))
    } else {
        backend
    };
    let (backend, temp_overlay) = add_layers(backend, format, opts)?;
    Ok(Opened {
        backend,
        format,
        warnings,
        temp_overlay,
    })
}

/// `null-co://`: raw over no storage. Probing finds raw (the first sector reads as zeroes),
/// with qemu's warning; another format finds no header.
fn open_null(null: crate::null::NullOptions, opts: &ImageOptions) -> Result<Opened> {
    let read_only = opts.read_only || opts.snapshot;
    let mut warnings = Vec::new();
    match opts.format {
        Some(f) if f != Format::raw() => {
            return Err(Error::Open(format!("Image is not in {} format", f.name())))
        }
        Some(_) => {}
        None if !read_only => warnings.push(probed_raw_warning(&opts.path)),
        None => {}
    }
    let backend: Arc<dyn BlockBackend> = Arc::new(crate::null::Null::new(null, read_only));
    let (backend, temp_overlay) = add_layers(backend, Format::raw(), opts)?;
    Ok(Opened {
        backend,
        format: Format::raw(),
        warnings,
        temp_overlay,
    })
}

/// The `-s` overlay, the byte window and the `compress` filter over an opened image.
fn add_layers(
    backend: Arc<dyn BlockBackend>,
    format: Format,
    opts: &ImageOptions,
) -> Result<(Arc<dyn BlockBackend>, Option<PathBuf>)> {
    let mut temp_overlay = None;
    let backend: Arc<dyn BlockBackend> = if opts.snapshot {
        let dir = crate::overlay::temp_dir();
        let ov = crate::overlay::TempOverlay::create(
            &opts.path,
            format.name(),
            backend,
            &dir,
            opts.discard,
        )?;
        temp_overlay = Some(ov.path());
        if opts.read_only {
            Arc::new(crate::filter::ReadOnly(Arc::new(ov)))
        } else {
            Arc::new(ov)
        }
    } else {
        backend
    };
    let backend: Arc<dyn BlockBackend> = if opts.offset != 0 || opts.size.is_some() {
        Arc::new(Slice::new(backend, opts.offset, opts.size)?)
    } else {
        backend
    };
    let backend: Arc<dyn BlockBackend> = if opts.compress {
        Arc::new(crate::compress::Compress::new(backend)?)
    } else {
        backend
    };
    Ok((backend, temp_overlay))
}

/// Reads a `json:{...}` file name into image options (qemu's pseudo-protocol); the binary,
/// which reads `--image-opts`, registers it.
pub type JsonReader = dyn Fn(&str) -> std::result::Result<ImageOptions, String> + Send + Sync;

static JSON_READER: std::sync::OnceLock<Box<JsonReader>> = std::sync::OnceLock::new();

/// Register who reads `json:` file names (once, at startup; later calls are ignored).
pub fn set_json_reader(f: Box<JsonReader>) {
    let _ = JSON_READER.set(f);
}

/// A backing name written as `json:{...}` (qemu writes one when the backing node has
/// options), as image options; None for any other name.
fn json_backing(path: &Path, fmt: Option<Format>) -> Option<Result<ImageOptions>> {
    let name = path.to_str().filter(|n| n.starts_with("json:"))?;
    let reader = JSON_READER.get()?;
    Some(
        reader(name)
            .map(|mut o| {
                o.format = o.format.or(fmt);
                o
            })
            .map_err(Error::Open),
    )
}

/// Open a backing file of the image `top` (at `depth` in its chain) read-only.
fn open_backing(
    top: &Path,
    depth: u32,
    locking: crate::file::lock::Locking,
    path: &Path,
    fmt: Option<&str>,
) -> Result<Arc<dyn BlockBackend>> {
    if depth + 1 >= MAX_BACKING_DEPTH {
        return Err(Error::ChainTooDeep {
            path: top.to_path_buf(),
            depth: MAX_BACKING_DEPTH,
        });
    }
    let format = match fmt {
        Some(name) => {
            Some(Format::from_name(name).ok_or_else(|| Error::UnknownDriver(name.to_string()))?)
        }
        None => None,
    };
    if let Some(o) = json_backing(path, format) {
        let o = ImageOptions {
            read_only: true,
            chain_depth: depth + 1,
            ..o?
        };
        return Ok(open_image(&o)?.backend);
    }
    let o = ImageOptions {
        path: path.to_path_buf(),
        format,
        read_only: true,
        chain_depth: depth + 1,
        locking,
        ..Default::default()
    };
    Ok(open_image(&o)?.backend)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probes_qcow2_magic_and_falls_back_to_raw() {
        let qcow2 = Format::from_name("qcow2").unwrap();
        assert_eq!(detect_format(b"QFI\xfb\0\0\0\x03rest"), qcow2);
        assert_eq!(detect_format(b"QFI\xfb\0\0\0\x01rest"), Format::raw());
        let mut v1 = b"QFI\xfb\0\0\0\x01".to_vec();
        v1.resize(48, 0);
        assert!(detect_format(&v1).is(crate::qcow::DRIVER.name));
        let mut v2 = b"QFI\xfb\0\0\0\x02".to_vec();
        v2.resize(512, 0);
        assert_eq!(detect_format(&v2), qcow2);
        assert_eq!(detect_format(b"QFI"), Format::raw());
        assert_eq!(detect_format(&[0u8; 512]), Format::raw());
    }

    #[test]
    fn unknown_names_are_none() {
        assert_eq!(Format::from_name("bogus"), None);
        assert_eq!(Format::from_name("raw"), Some(Format::raw()));
    }
}
