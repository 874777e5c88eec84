//! qcow2 as a format driver: recognised by its magic, opened on a host file (an encrypted
//! image behind the sector-aligning layer), and its own `--image-opts` keys checked as qemu
//! checks them.

use super::{Qcow2, Qcow2Options};
use crate::align::Aligned;
use crate::file::lock::Role;
use crate::file::{FileOptions, HostFile};
use crate::format::{backing_option, parse_bool, parse_size, Driver, ImageOptions, OpenBacking};
use crate::{BlockBackend, Result};
use std::sync::Arc;

pub static DRIVER: Driver = Driver {
    name: "qcow2",
    probe,
    open,
    option,
    has_metadata: true,
};

fn probe(head: &[u8]) -> bool {
    head.len() >= 8
        && head[..4] == super::header::MAGIC.to_be_bytes()
        && u32::from_be_bytes([head[4], head[5], head[6], head[7]]) >= 2
}

/// The external data file is opened as the image file is, with qemu's locks for a data
/// child (a backing file's, and the original's under `-s`, are only read).
fn data_file_options(opts: &ImageOptions) -> FileOptions {
    opts.file_options(if opts.chain_depth > 0 || opts.snapshot {
        Role::Backing
    } else {
        Role::DataFile
    })
}

/// qemu's read_cache_sizes: how `cache-size`, `l2-cache-size` and `refcount-cache-size`
/// may be combined (checked once the header is read, as qemu does).
fn check_cache_sizes(opts: &ImageOptions) -> Result<()> {
    let [combined, l2, refcount] = opts.qcow2_cache_sizes;
    let Some(combined) = combined else {
        return Ok(());
    };
    let msg = if l2.is_some() && refcount.is_some() {
        "cache-size, l2-cache-size and refcount-cache-size may not be set at the same time"
    } else if l2.is_some_and(|l| l > combined) {
        "l2-cache-size may not exceed cache-size"
    } else if refcount.unwrap_or(0) > combined {
        "refcount-cache-size may not exceed cache-size"
    } else {
        return Ok(());
    };
    Err(crate::Error::Open(msg.into()))
}

fn open(
    file: HostFile,
    opts: &ImageOptions,
    backing: &OpenBacking<'_>,
) -> Result<Arc<dyn BlockBackend>> {
    let q = Qcow2::open_file(
        file,
        Qcow2Options {
            read_only: opts.read_only || opts.snapshot,
            discard: opts.discard,
            load_snapshot: opts.load_snapshot.clone(),
            backing: opts.backing.clone(),
            direct: opts.direct,
            encrypt: opts.encrypt.clone(),
            data_file: opts.data_file.clone(),
            data_file_opts: data_file_options(opts),
        },
        backing,
    )?;
    check_cache_sizes(opts)?;
    if q.is_encrypted() {
        // Encrypted data is whole sectors: qemu's request_alignment 512.
        return Ok(Arc::new(Aligned::new(Arc::new(q))));
    }
    Ok(Arc::new(q))
}

/// qcow2's own options. The tuning ones (caches, overlap checks, discard passing) are checked
/// as qemu checks them; this engine sizes its caches itself and always runs the `cached`
/// overlap checks.
fn option(key: &str, v: &str, opts: &mut ImageOptions) -> Option<std::result::Result<(), String>> {
    if let Some(r) = backing_option(key, v, opts) {
        return Some(r);
    }
    let r = match key {
        "lazy-refcounts" | "pass-discard-request" | "pass-discard-snapshot"
        | "pass-discard-other" | "discard-no-unref" => parse_bool(key, v).map(|_| ()),
        "l2-cache-size" | "l2-cache-entry-size" | "refcount-cache-size" | "cache-size" => {
            parse_size(key, v).map(|n| {
                let slot = match key {
                    "cache-size" => 0,
                    "l2-cache-size" => 1,
                    "refcount-cache-size" => 2,
                    _ => return,
                };
                opts.qcow2_cache_sizes[slot] = Some(n);
            })
        }
        "cache-clean-interval" => match v.parse::<u64>() {
            Ok(_) => Ok(()),
            Err(_) => Err("Parameter 'cache-clean-interval' expects a non-negative number".into()),
        },
        // qemu's `data-file` is a block node reference, which qemu-nbd never has; its
        // children name a file.
        "data-file.filename" => {
            opts.data_file = Some(std::path::PathBuf::from(v));
            Ok(())
        }
        "data-file.driver" if v == "file" => Ok(()),
        "data-file" => Err(format!(
            "Cannot find device='{v}' nor node-name='{v}'"
        )),
        "encrypt.key-secret" => {
            opts.encrypt.key_secret = Some(v.to_string());
            Ok(())
        }
        "encrypt.format" => {
            opts.encrypt.format = Some(v.to_string());
            Ok(())
        }
        // qemu checks the other LUKS open options only when the image is encrypted.
        k if k.starts_with("encrypt.") => {
            let e = &mut opts.encrypt;
            e.unexpected.get_or_insert_with(|| k["encrypt.".len()..].to_string());
            Ok(())
        }
        "overlap-check" => match v {
            "none" | "constant" | "cached" | "all" => Ok(()),
            _ => Err(format!(
                "Unsupported value '{v}' for qcow2 option 'overlap-check'. Allowed are any of the following: none, constant, cached, all"
            )),
        },
        _ => return None,
    };
    Some(r)
}
