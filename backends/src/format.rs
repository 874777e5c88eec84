//! What an image format is to the rest of the crate: a driver value — its name, how it
//! recognises its images from their first bytes, how it opens one on a host file, and its own
//! `--image-opts` keys — and the options every open takes. A leaf module: the drivers and the
//! opener (`open.rs`, which keeps the one list of drivers) both depend on it.

use crate::file::HostFile;
use crate::{BlockBackend, Result};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Opens a backing file read-only given its resolved path and format name (None: probe),
/// with the backing-depth limit kept in one place (`open.rs`).
pub type OpenBacking<'a> = dyn Fn(&Path, Option<&str>) -> Result<Arc<dyn BlockBackend>> + 'a;

/// One image format.
pub struct Driver {
    /// The name `-f` and `driver=` use, and `qemu-img info` prints.
    pub name: &'static str,
    /// Does an image starting with these bytes belong to this format? (Raw says no: it is
    /// what probing falls back to.)
    pub probe: fn(head: &[u8]) -> bool,
    /// Open the image on `file` (opened read-only or read-write as `opts` says).
    pub open: fn(
        file: HostFile,
        opts: &ImageOptions,
        backing: &OpenBacking<'_>,
    ) -> Result<Arc<dyn BlockBackend>>,
    /// One of the format's own `--image-opts` keys: None when `key` is not the format's,
    /// else whether its value is valid (qemu's message when not).
    pub option: fn(key: &str, value: &str, opts: &mut ImageOptions) -> Option<Result<(), String>>,
    /// Keeps its own metadata in the file (qemu then also takes the resize permission and
    /// shares neither write nor resize: the lock bytes differ from raw's).
    pub has_metadata: bool,
}

/// A format, by its driver.
#[derive(Clone, Copy)]
pub struct Format(pub &'static Driver);

impl Format {
    pub fn name(self) -> &'static str {
        self.0.name
    }

    pub fn driver(self) -> &'static Driver {
        self.0
    }

    pub fn is(self, name: &str) -> bool {
        self.0.name == name
    }
}

impl PartialEq for Format {
    fn eq(&self, other: &Format) -> bool {
        self.0.name == other.0.name
    }
}

impl Eq for Format {}

impl fmt::Debug for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0.name)
    }
}

/// Which backing file a format with backing files uses (qemu's `backing=` options).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum BackingChoice {
    /// The one the header names, if any.
    #[default]
    FromHeader,
    /// None at all: unallocated clusters read as zeroes.
    None,
    /// This file, with this format (None: probe), instead of the header's.
    File(PathBuf, Option<String>),
    /// The header's file, opened with this format.
    HeaderAs(String),
}

/// Secret bytes (a passphrase from a `secret` object): zeroed when dropped, never printed.
#[derive(Clone, Default)]
pub struct Secret(zeroize::Zeroizing<Vec<u8>>);

impl Secret {
    pub fn new(bytes: Vec<u8>) -> Secret {
        Secret(zeroize::Zeroizing::new(bytes))
    }

    pub fn bytes(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// What an encrypted image is opened with: luks's `key-secret=`, qcow2's `encrypt.*`.
#[derive(Clone, Debug, Default)]
pub struct EncryptOptions {
    /// The id of the `secret` object with the passphrase.
    pub key_secret: Option<String>,
    /// That secret's bytes, looked up by the caller from `key_secret` (None when no such
    /// object exists: the driver then fails with qemu's message, at qemu's point).
    pub key: Option<Secret>,
    /// qcow2's `encrypt.format=`.
    pub format: Option<String>,
    /// The first `encrypt.KEY` qcow2 does not know (qemu refuses it for an encrypted image
    /// only).
    pub unexpected: Option<String>,
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
    /// `--image-opts driver=compress,...`: writes are stored as compressed clusters.
    pub compress: bool,
    /// `--image-opts driver=null-co,...`: no storage at all (a `null-co://` file name says
    /// the same with the defaults).
    pub null: Option<crate::null::NullOptions>,
    /// How deep in a backing chain this image is (0 for the image itself).
    pub chain_depth: u32,
    /// `-l`: export this internal snapshot (by id, then by name) read-only.
    pub load_snapshot: Option<String>,
    /// `backing=` / `backing.file.filename=` from `--image-opts`.
    pub backing: BackingChoice,
    /// `locking=` of the image file (`file.locking` in `--image-opts`).
    pub locking: crate::file::lock::Locking,
    /// `force-share=on`: take no "unshared" locks (read-only only).
    pub force_share: bool,
    /// How an encrypted image is unlocked.
    pub encrypt: EncryptOptions,
    /// qcow2's `cache-size`, `l2-cache-size` and `refcount-cache-size` (ignored, but
    /// checked against each other as qemu checks them).
    pub qcow2_cache_sizes: [Option<u64>; 3],
    /// How a remote image file (`nbd://…`, `driver=nbd`) is reached: its TLS options.
    pub remote: crate::file::remote::RemoteOptions,
    /// qcow2's `data-file.filename=`: the external data file instead of the header's.
    pub data_file: Option<PathBuf>,
    /// vpc's `force_size_calc=`: Some(true) for `chs`, Some(false) for `current_size`.
    pub vpc_size_calc: Option<bool>,
    /// Warnings for the user gathered while the options were read (qemu's deprecations),
    /// printed as `NAME: warning: TEXT`.
    pub warnings: Vec<String>,
}

impl ImageOptions {
    /// How a file of this image is opened: read-only under `-r` and `-s`, O_DIRECT and
    /// `--aio` as asked, and qemu's lock bytes for a file in `role`.
    pub fn file_options(&self, role: crate::file::lock::Role) -> crate::file::FileOptions {
        crate::file::FileOptions {
            read_only: self.read_only || self.snapshot,
            direct: self.direct,
            aio: self.aio,
            lock: Some(crate::file::LockSpec {
                locking: self.locking,
                role,
                force_share: self.force_share,
            }),
        }
    }
}

/// The `backing` keys of `--image-opts` every format with backing files takes (None: not
/// one of them).
pub fn backing_option(
    key: &str,
    v: &str,
    opts: &mut ImageOptions,
) -> Option<std::result::Result<(), String>> {
    let r = match key {
        "backing" => {
            if !v.is_empty() {
                return Some(Err(format!(
                    "Could not open backing file: Cannot find device='{v}' nor node-name='{v}'"
                )));
            }
            opts.warnings.push(
                "Use of \"backing\": \"\" is deprecated; use \"backing\": null instead".into(),
            );
            opts.backing = BackingChoice::None;
            Ok(())
        }
        "backing.driver" => {
            opts.backing = match std::mem::take(&mut opts.backing) {
                BackingChoice::File(p, _) => BackingChoice::File(p, Some(v.to_string())),
                _ => BackingChoice::HeaderAs(v.to_string()),
            };
            Ok(())
        }
        "backing.file" | "backing.file.filename" => {
            let fmt = match std::mem::take(&mut opts.backing) {
                BackingChoice::HeaderAs(d) | BackingChoice::File(_, Some(d)) => Some(d),
                _ => None,
            };
            opts.backing = BackingChoice::File(PathBuf::from(v), fmt);
            Ok(())
        }
        "backing.file.driver" if v != "file" && v != "host_device" => {
            Err(format!("Unknown protocol '{v}'"))
        }
        "backing.file.driver" => Ok(()),
        _ => return None,
    };
    Some(r)
}

/// qemu's size syntax: a number with an optional k/M/G/T/P/E suffix (powers of 1024).
pub fn parse_size(key: &str, v: &str) -> std::result::Result<u64, String> {
    let err = || {
        format!(
            "Parameter '{key}' expects a non-negative number below 2^64\nOptional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\nand exabytes, respectively."
        )
    };
    let (num, mult) = match v.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_lowercase() {
                'b' => 0,
                'k' => 10,
                'm' => 20,
                'g' => 30,
                't' => 40,
                'p' => 50,
                'e' => 60,
                _ => return Err(err()),
            };
            (&v[..i], 1u64 << shift)
        }
        _ => (v, 1),
    };
    let n: u64 = num.trim().parse().map_err(|_| err())?;
    n.checked_mul(mult).ok_or_else(err)
}

/// qemu's boolean option values.
pub fn parse_bool(key: &str, v: &str) -> std::result::Result<bool, String> {
    match v {
        "on" | "yes" | "true" | "y" => Ok(true),
        "off" | "no" | "false" | "n" => Ok(false),
        _ => Err(format!("Parameter '{key}' expects 'on' or 'off'")),
    }
}

/// The calls of a read-only image format that reads whole sectors only, as qemu's bochs,
/// cloop and dmg drivers: writes and trims refused, nothing to flush or close. Expands
/// inside an `impl BlockBackend`, beside the format's own `size`, `caps` and `read`.
macro_rules! read_only_sector_image {
    ($name:literal) => {
        fn write(&self, _offset: u64, _buf: &[u8], _flags: $crate::IoFlags) -> $crate::Result<()> {
            Err($crate::Error::ReadOnly)
        }

        fn flush(&self) -> $crate::Result<()> {
            Ok(())
        }

        fn trim(&self, _offset: u64, _len: u64, _flags: $crate::IoFlags) -> $crate::Result<()> {
            Err($crate::Error::ReadOnly)
        }

        fn format_name(&self) -> &'static str {
            $name
        }

        fn request_alignment(&self) -> u32 {
            512
        }

        fn close(&self) -> $crate::Result<()> {
            Ok(())
        }
    };
}
pub(crate) use read_only_sector_image;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("s", "4096"), Ok(4096));
        assert_eq!(parse_size("s", "2G"), Ok(2 << 30));
        assert!(parse_size("s", "-1").is_err());
        assert!(parse_size("s", "99999999999E").is_err());
    }
}
