//! External data files (`qemu-img create -o data_file=NAME`, incompatible feature bit 2):
//! the guest data lives in a second file, the image file holds only metadata.
//!
//! # Rules
//! - A data cluster's host offset is its guest offset: a write that needs a cluster takes
//!   the one at its own guest offset (an entry that already names a host cluster keeps
//!   it). Data clusters are not refcounted, so allocating or dropping one changes no
//!   refcount, and nothing else can ever be written there: such a cluster is never "shared"
//!   (the COPIED flag is set on every entry we write, as qemu does, but not required).
//! - No compressed clusters (an entry that says so is corruption, as in qemu) and no
//!   compressed writes; no overlap checks on data writes (the data file has no metadata).
//! - Order on disk: the data file is synced first in every flush, before any pointer in the
//!   image file is written, so no L2 entry can be durable before the data it maps.
//! - `--discard=unmap`: a cluster a discard or an unmapping zeroing drops is punched out of
//!   the data file at once, under the cluster's stripe (qemu's `bdrv_pdiscard` on the data
//!   file). Its guest range is the only one that can ever use it again, and the stripe keeps
//!   that range's writes out until the entry changed, so the punch cannot hit new data; a
//!   crash before the entry is durable leaves zeroes where discarded data was, which a
//!   discard allows and a zeroing asked for.
//! - `data_file_raw` (autoclear bit 1): the data file must stay a valid raw image of the
//!   guest disk, so a zeroing writes zeroes (or punches) into the data file first, then
//!   changes the metadata; the bit is kept set on a read-write open. Block status asks the
//!   data file where its holes are (qemu's BDRV_BLOCK_RECURSE).
//! - Reads may splice from the data file's page cache whatever `--discard` says: a cluster
//!   can only ever hold its own guest range's data, so no quarantine is needed.
//!
//! The data file is opened with the image's options (read-only, O_DIRECT, aio) and qemu's
//! lock bytes for a data child. As in qemu 10.0, a relative name in the header is relative
//! to the current directory, not to the image's (a backing file's is to the image's).

use super::header::{Header, AUTOCLEAR_DATA_FILE_RAW, INCOMPAT_DATA_FILE};
use super::Qcow2Options;
use crate::file::{FileOptions, HostFile};
use crate::{Error, Result};
use std::path::PathBuf;

#[derive(Debug)]
pub(super) struct DataFile {
    pub file: HostFile,
    /// `data_file_raw`: keep the data file a valid raw image.
    pub raw: bool,
}

/// Open the data file the header (or `data-file.filename=`) names, or None for an image
/// without one; refuse the combinations qemu refuses.
pub(super) fn open(h: &Header, opts: &Qcow2Options) -> Result<Option<DataFile>> {
    let wanted = h.incompatible & INCOMPAT_DATA_FILE != 0;
    let raw = h.autoclear & AUTOCLEAR_DATA_FILE_RAW != 0;
    if !wanted {
        if opts.data_file.is_some() {
            return Err(Error::Open(
                "'data-file' can only be set for images with an external data file".into(),
            ));
        }
        if raw {
            return Err(Error::Open("data-file-raw requires a data file".into()));
        }
        return Ok(None);
    }
    // qemu 10.0 opens the header's name as it is: a relative one from the current
    // directory (unlike a backing file's), never as a protocol or json: name.
    let path = match (&opts.data_file, h.data_file.as_deref()) {
        (Some(p), _) => p.clone(),
        (None, Some(name)) if !name.is_empty() => PathBuf::from(name),
        _ => return Err(Error::Open("'data-file' is required for this image".into())),
    };
    let file = HostFile::open(
        &path,
        &FileOptions {
            read_only: opts.read_only,
            ..opts.data_file_opts.clone()
        },
    )?;
    Ok(Some(DataFile { file, raw }))
}

impl super::Qcow2 {
    /// Before a zeroing changes the metadata of `[at, at + len)`: keep a raw data file the
    /// guest's view by zeroing the same range in it (punched when the zeroing may unmap).
    /// Nothing for any other image.
    pub(super) fn zero_raw_data(&self, at: u64, len: u64, unmap: bool) -> Result<()> {
        let Some(d) = self.data.as_ref().filter(|d| d.raw) else {
            return Ok(());
        };
        if unmap && d.file.punch_hole(at, len).is_ok() {
            return Ok(());
        }
        d.file.write_zeroes(at, len)
    }

    /// A discard or an unmapping zeroing dropped the data-file cluster at `host` (under its
    /// stripe, see the module doc): with `--discard=unmap` punch it out of the data file; a
    /// raw data file must read zeroes there whatever the file system can do.
    pub(super) fn drop_data_cluster(&self, host: u64) -> Result<()> {
        let Some(d) = &self.data else {
            return Ok(());
        };
        let cs = self.geo.cs;
        if d.raw {
            return self.zero_raw_data(host, cs, true);
        }
        if self.opts.discard {
            if let Err(e) = d.file.punch_hole(host, cs) {
                tracing::debug!(
                    "'{}': punching a discarded cluster at {host:#x}: {e}",
                    d.file.path().display()
                );
            }
        }
        Ok(())
    }
}
