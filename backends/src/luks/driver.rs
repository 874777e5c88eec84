//! `driver=luks`: a LUKS1 volume in a raw file, recognised by its magic, unlocked with the
//! passphrase of `key-secret=`, served as [`LuksVolume`] over the raw file, with the
//! sector-aligning layer above it.

use super::{header, passphrase, Luks, LuksVolume};
use crate::align::Aligned;
use crate::file::HostFile;
use crate::format::{Driver, ImageOptions, OpenBacking};
use crate::raw::{RawFile, RawOptions};
use crate::{BlockBackend, Error, Result};
use std::sync::Arc;

pub static DRIVER: Driver = Driver {
    name: "luks",
    probe: header::probe,
    open,
    option,
    // qemu's lock bytes for a LUKS file are raw's (the export's permissions pass through).
    has_metadata: false,
};

fn open(
    file: HostFile,
    opts: &ImageOptions,
    _backing: &OpenBacking<'_>,
) -> Result<Arc<dyn BlockBackend>> {
    let password = passphrase(&opts.encrypt, "")?;
    let luks = Luks::open(
        &mut |off, buf| {
            file.read("read encryption header", off, buf)
                .map_err(|e| Error::Encryption(format!("Could not read encryption header: {e}")))
        },
        password,
    )?;
    let raw = RawFile::from_host_file(file, RawOptions::from_image(opts))?;
    let volume = LuksVolume::new(Arc::new(raw), luks)?;
    Ok(Arc::new(Aligned::new(Arc::new(volume))))
}

/// luks's own `--image-opts` key: the secret holding the passphrase.
fn option(key: &str, v: &str, opts: &mut ImageOptions) -> Option<std::result::Result<(), String>> {
    match key {
        "key-secret" => {
            opts.encrypt.key_secret = Some(v.to_string());
            Some(Ok(()))
        }
        _ => None,
    }
}
