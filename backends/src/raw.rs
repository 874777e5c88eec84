//! Raw images: a regular file or a block device over the host-file layer, with no lock of
//! its own. Holes are found with SEEK_DATA/SEEK_HOLE; trim and write-zeroes use fallocate.

use crate::aio::AioMode;
use crate::data_cache::DataCache;
use crate::file::{FileOptions, HostFile};
use crate::format::{parse_size, Driver, ImageOptions, OpenBacking};
use crate::{BlockBackend, Caps, Error, Extent, ExtentFlags, Extents, HostSpan, IoFlags, Result};
use std::path::Path;
use std::sync::Arc;

pub static DRIVER: Driver = Driver {
    name: "raw",
    // Raw is what probing falls back to.
    probe: |_| false,
    open: open_driver,
    option,
    has_metadata: false,
};

fn open_driver(
    file: HostFile,
    opts: &ImageOptions,
    _backing: &OpenBacking<'_>,
) -> Result<Arc<dyn BlockBackend>> {
    let raw = RawFile::from_host_file(file, RawOptions::from_image(opts))?;
    Ok(Arc::new(raw))
}

/// raw's own `--image-opts` keys: a window into the file.
fn option(key: &str, v: &str, opts: &mut ImageOptions) -> Option<std::result::Result<(), String>> {
    Some(match key {
        "offset" => parse_size(key, v).map(|n| opts.offset = n),
        "size" => parse_size(key, v).map(|n| opts.size = Some(n)),
        _ => return None,
    })
}

/// How a raw image is opened (the parts of qemu's `file` driver options we honour).
#[derive(Clone, Debug, Default)]
pub struct RawOptions {
    pub read_only: bool,
    /// `--discard=unmap`: TRIM and MAY_TRIM zeroing punch holes; otherwise TRIM is ignored.
    pub discard: bool,
    /// O_DIRECT (`--cache=none|directsync`, `-n`).
    pub direct: bool,
    /// `--aio`.
    pub aio: AioMode,
}

impl RawOptions {
    /// What a format driver over the whole file takes from the image options (`-s` opens
    /// the file read-only: the overlay takes the writes).
    pub fn from_image(opts: &ImageOptions) -> RawOptions {
        RawOptions {
            read_only: opts.read_only || opts.snapshot,
            discard: opts.discard,
            direct: opts.direct,
            aio: opts.aio,
        }
    }
}

#[derive(Debug)]
pub struct RawFile {
    file: HostFile,
    size: u64,
    /// The file's length at open: bytes past it (the ragged tail rounded up to a sector)
    /// read as zeroes, so they are never spliced.
    file_len: u64,
    opts: RawOptions,
    /// The last data region `lseek` found (rules in data_cache.rs).
    data: DataCache,
}

impl RawFile {
    pub fn open(path: &Path, opts: RawOptions) -> Result<RawFile> {
        let file = HostFile::open(
            path,
            &FileOptions {
                read_only: opts.read_only,
                direct: opts.direct,
                aio: opts.aio,
                lock: None,
            },
        )?;
        RawFile::from_host_file(file, opts)
    }

    pub fn from_host_file(file: HostFile, opts: RawOptions) -> Result<RawFile> {
        // qemu's block layer counts whole 512-byte sectors: a ragged tail reads as zeroes.
        let file_len = file.size()?;
        let size = file_len.div_ceil(512) * 512;
        Ok(RawFile {
            file,
            size,
            file_len,
            opts,
            data: DataCache::default(),
        })
    }

    pub fn path(&self) -> &Path {
        self.file.path()
    }

    pub fn host_file(&self) -> &HostFile {
        &self.file
    }

    fn zero_by_writing(&self, offset: u64, len: u64) -> Result<()> {
        let zeroes = vec![0u8; (len as usize).min(1 << 20)];
        let mut pos = 0u64;
        while pos < len {
            let n = (len - pos).min(zeroes.len() as u64) as usize;
            self.file
                .write("write zeroes", offset + pos, &zeroes[..n], false)?;
            pos += n as u64;
        }
        Ok(())
    }
}

impl BlockBackend for RawFile {
    fn size(&self) -> u64 {
        self.size
    }

    fn caps(&self) -> Caps {
        if self.opts.read_only {
            return Caps::READ_ONLY;
        }
        Caps::NATIVE
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.file.read("read", offset, buf)
    }

    fn try_read(&self, offset: u64, buf: &mut [u8]) -> bool {
        // Past the file's end (the ragged tail) `read` fills zeroes.
        offset + buf.len() as u64 <= self.file_len && self.file.try_read(offset, buf)
    }

    fn try_write(&self, offset: u64, buf: &[u8]) -> bool {
        !self.opts.read_only && self.file.try_write(offset, buf)
    }

    fn read_source(&self, offset: u64, len: u64) -> Option<HostSpan<'_>> {
        if offset.checked_add(len)? > self.file_len {
            return None;
        }
        self.file.page_cache_span(offset)
    }

    /// Within the file as it was opened: a write past it would grow the file.
    fn write_sink(&self, offset: u64, len: u64) -> Option<HostSpan<'_>> {
        if self.opts.read_only || offset.checked_add(len)? > self.file_len {
            return None;
        }
        self.file.page_cache_sink(offset)
    }

    fn write(&self, offset: u64, buf: &[u8], flags: IoFlags) -> Result<()> {
        self.file
            .write("write", offset, buf, flags.contains(IoFlags::FUA))
    }

    fn flush(&self) -> Result<()> {
        self.file.sync()
    }

    fn trim(&self, offset: u64, len: u64, flags: IoFlags) -> Result<()> {
        if !self.opts.discard {
            return Ok(());
        }
        self.data.invalidate(offset, len);
        if flags.contains(IoFlags::FUA) {
            match self.file.remote_zeroes_fua(offset, len, true) {
                Some(Ok(())) => return Ok(()),
                Some(Err(e)) if e.kind() != std::io::ErrorKind::Unsupported => {
                    return Err(self.file.err("trim", offset, len, e));
                }
                _ => {}
            }
        }
        match self.file.punch_hole(offset, len) {
            Ok(()) => {}
            // Discard is advisory: a file system without holes just keeps the data.
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {}
            Err(e) => return Err(self.file.err("trim", offset, len, e)),
        }
        if flags.contains(IoFlags::FUA) {
            self.flush()?;
        }
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: IoFlags) -> Result<()> {
        self.data.invalidate(offset, len);
        let punch = flags.contains(IoFlags::MAY_TRIM) && self.opts.discard;
        if flags.contains(IoFlags::FUA) {
            match self.file.remote_zeroes_fua(offset, len, punch) {
                Some(Ok(())) => return Ok(()),
                Some(Err(e)) if e.kind() != std::io::ErrorKind::Unsupported => {
                    return Err(self.file.err("write zeroes", offset, len, e));
                }
                _ => {}
            }
        }
        let mut done = false;
        if flags.contains(IoFlags::MAY_TRIM) && self.opts.discard && !self.file.is_block_device() {
            done = self.file.punch_hole(offset, len).is_ok();
        }
        if !done {
            match self.file.zero_range(offset, len) {
                Ok(()) => {}
                Err(e) if flags.contains(IoFlags::FAST_ZERO) => {
                    tracing::debug!("fast zero refused: {e}");
                    return Err(Error::NotSupported("fast zero"));
                }
                Err(_) => self.zero_by_writing(offset, len)?,
            }
        }
        if flags.contains(IoFlags::FUA) {
            self.flush()?;
        }
        Ok(())
    }

    fn cache(&self, offset: u64, len: u64) -> Result<()> {
        self.file.will_need(offset, len);
        Ok(())
    }

    fn block_status(&self, offset: u64, len: u64, out: &mut Extents) -> Result<()> {
        let end = offset + len;
        let data = ExtentFlags::empty();
        let hole = ExtentFlags::HOLE | ExtentFlags::ZERO;
        if self.file.is_block_device() {
            out.push(Extent::new(len, data, 1));
            return Ok(());
        }
        if let Some(r) = self.file.remote_file() {
            return crate::file::remote::status(r.as_ref(), offset, len, out)
                .map_err(|e| self.file.err("block status", offset, len, e));
        }
        if let Some(data_end) = self.data.data_end(offset) {
            out.push(Extent::new(data_end.min(end) - offset, data, 1));
            return Ok(());
        }
        let generation = self.data.generation();
        let file_len = self.size;
        let mut pos = offset;
        while pos < end {
            let next_data = match self.file.seek(pos, libc::SEEK_DATA) {
                Ok(v) => v,
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    // No SEEK_DATA support: report data.
                    out.push(Extent::new(end - pos, data, 1));
                    return Ok(());
                }
                Err(e) => return Err(self.file.err("seek data", pos, 0, e)),
            };
            match next_data {
                Some(d) if d <= pos => {
                    let h = self
                        .file
                        .seek(pos, libc::SEEK_HOLE)
                        .map_err(|e| self.file.err("seek hole", pos, 0, e))?
                        .unwrap_or(file_len)
                        .max(pos + 1);
                    // The ragged tail past the file's end inside the last sector is data too.
                    let h = if h >= file_len { file_len } else { h };
                    self.data.fill(generation, pos, h);
                    out.push(Extent::new(h.min(end) - pos, data, 1));
                    pos = h;
                }
                Some(d) => {
                    out.push(Extent::new(d.min(end) - pos, hole, 1));
                    pos = d;
                }
                None => {
                    // Beyond the last data: a hole up to the end of the image.
                    let stop = file_len.max(end);
                    out.push(Extent::new(stop.min(end) - pos, hole, 1));
                    pos = end;
                }
            }
            // Enough for one reply; the caller asks again for the rest.
            if out.len() >= 1024 {
                break;
            }
        }
        Ok(())
    }

    fn format_name(&self) -> &'static str {
        "raw"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::fs::FileExt;

    fn sparse_file() -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(4 << 20).unwrap();
        f.as_file().write_all_at(&[7u8; 65536], 1 << 20).unwrap();
        f.flush().unwrap();
        f
    }

    #[test]
    fn reads_writes_and_reports_holes() {
        let f = sparse_file();
        let raw = RawFile::open(f.path(), RawOptions::default()).unwrap();
        assert_eq!(raw.size(), 4 << 20);
        let mut buf = vec![1u8; 8];
        raw.read(1 << 20, &mut buf).unwrap();
        assert_eq!(buf, vec![7u8; 8]);
        let mut ext = Extents::new();
        raw.block_status(0, 4 << 20, &mut ext).unwrap();
        assert_eq!(ext.total(), 4 << 20);
        let e = ext.as_slice();
        assert_eq!(e[0].flags, ExtentFlags::HOLE | ExtentFlags::ZERO);
        assert_eq!(e[1].flags, ExtentFlags::empty());
        raw.write(0, b"hello", IoFlags::FUA).unwrap();
        raw.read(0, &mut buf[..5]).unwrap();
        assert_eq!(&buf[..5], b"hello");
    }

    #[test]
    fn ragged_tail_reads_as_zero() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&[9u8; 1000]).unwrap();
        let raw = RawFile::open(
            f.path(),
            RawOptions {
                read_only: true,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(raw.size(), 1024);
        let mut buf = vec![1u8; 48];
        raw.read(1000 - 24, &mut buf).unwrap();
        assert_eq!(&buf[..24], &[9u8; 24]);
        assert_eq!(&buf[24..], &[0u8; 24]);
    }

    #[test]
    fn missing_file_has_qemu_message() {
        let e = RawFile::open(Path::new("/nonexistent.img"), RawOptions::default()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "Could not open '/nonexistent.img': No such file or directory"
        );
    }
}
