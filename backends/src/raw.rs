//! Raw images: a regular file or a block device, with positional I/O and no lock.
//! Holes are found with SEEK_DATA/SEEK_HOLE; trim and write-zeroes use fallocate.

use crate::aio::{self, AioMode};
use crate::direct_io::DirectIo;
use crate::{BlockBackend, Caps, Error, Extent, ExtentFlags, Extents, IoFlags, Result, Support};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

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

#[derive(Debug)]
pub struct RawFile {
    file: File,
    path: PathBuf,
    size: u64,
    is_block_device: bool,
    opts: RawOptions,
    /// Set when the file is open with O_DIRECT.
    direct: Option<DirectIo>,
}

impl RawFile {
    pub fn open(path: &Path, opts: RawOptions) -> Result<RawFile> {
        let flags = if opts.direct {
            libc::O_CLOEXEC | libc::O_DIRECT
        } else {
            libc::O_CLOEXEC
        };
        let file = OpenOptions::new()
            .read(true)
            .write(!opts.read_only)
            .custom_flags(flags)
            .open(path)
            .map_err(|e| open_error(path, &e))?;
        let mut raw = RawFile::from_file(file, path, opts.clone())?;
        if opts.direct {
            let plain = OpenOptions::new()
                .read(true)
                .write(!opts.read_only)
                .custom_flags(libc::O_CLOEXEC)
                .open(path)
                .map_err(|e| open_error(path, &e))?;
            let len = plain.metadata().map_err(|e| open_error(path, &e))?.len();
            let len = if raw.is_block_device { raw.size } else { len };
            raw.direct = Some(DirectIo::new(plain, len, opts.aio));
        }
        Ok(raw)
    }

    /// Wrap an already open file (the `-s` overlay, tests).
    pub fn from_file(file: File, path: &Path, opts: RawOptions) -> Result<RawFile> {
        let meta = file.metadata().map_err(|e| open_error(path, &e))?;
        let is_block_device = meta.file_type().is_block_device();
        let len = if is_block_device {
            // SAFETY: lseek on an owned, open fd; no memory is touched.
            let end = unsafe { libc::lseek(file.as_raw_fd(), 0, libc::SEEK_END) };
            if end < 0 {
                return Err(open_error(path, &io::Error::last_os_error()));
            }
            end as u64
        } else {
            meta.len()
        };
        // qemu's block layer counts whole 512-byte sectors: a ragged tail reads as zeroes.
        let size = len.div_ceil(512) * 512;
        Ok(RawFile {
            file,
            path: path.to_path_buf(),
            size,
            is_block_device,
            opts,
            direct: None,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn err(&self, op: &'static str, offset: u64, len: u64, e: io::Error) -> Error {
        Error::io(op, &self.path, offset, len, e)
    }

    fn fallocate(&self, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
        // SAFETY: fallocate on an owned, open fd with plain integer arguments.
        let r = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, offset as i64, len as i64) };
        if r == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        self.fallocate(
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        )
    }

    fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        let mode = if self.is_block_device {
            libc::FALLOC_FL_ZERO_RANGE
        } else {
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
        };
        self.fallocate(mode, offset, len)
    }

    fn seek(&self, offset: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
        // SAFETY: lseek on an owned, open fd; pread/pwrite elsewhere do not use the file position.
        let r = unsafe { libc::lseek(self.file.as_raw_fd(), offset as i64, whence) };
        if r >= 0 {
            return Ok(Some(r as u64));
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENXIO) {
            Ok(None)
        } else {
            Err(e)
        }
    }

    fn write_dsync(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let rest = &buf[done..];
            let iov = libc::iovec {
                iov_base: rest.as_ptr() as *mut libc::c_void,
                iov_len: rest.len(),
            };
            // SAFETY: iov points into `buf`, which outlives the call; pwritev2 only reads it.
            let n = unsafe {
                libc::pwritev2(
                    self.file.as_raw_fd(),
                    &iov,
                    1,
                    (offset + done as u64) as i64,
                    libc::RWF_DSYNC,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            done += n as usize;
        }
        Ok(())
    }
}

/// qemu's wording: "Could not open 'PATH': No such file or directory".
fn open_error(path: &Path, e: &io::Error) -> Error {
    let msg = match e.raw_os_error() {
        Some(code) => nix::errno::Errno::from_raw(code).desc().to_string(),
        None => e.to_string(),
    };
    Error::Open(format!("Could not open '{}': {}", path.display(), msg))
}

impl BlockBackend for RawFile {
    fn size(&self) -> u64 {
        self.size
    }

    fn caps(&self) -> Caps {
        if self.opts.read_only {
            return Caps::READ_ONLY;
        }
        Caps {
            writable: true,
            flush: true,
            fua: Support::Native,
            trim: true,
            zero: Support::Native,
            fast_zero: true,
            cache: Support::Native,
            multi_conn: true,
            rotational: false,
        }
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        if let Some(d) = &self.direct {
            return d
                .read(&self.file, offset, buf)
                .map_err(|e| self.err("read", offset, buf.len() as u64, e));
        }
        let mut done = 0usize;
        while done < buf.len() {
            match aio::read_at(
                self.opts.aio,
                &self.file,
                &mut buf[done..],
                offset + done as u64,
            ) {
                Ok(0) => {
                    // Past the end of a file whose size is not a sector multiple.
                    buf[done..].fill(0);
                    break;
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.err("read", offset, buf.len() as u64, e)),
            }
        }
        Ok(())
    }

    fn write(&self, offset: u64, buf: &[u8], flags: IoFlags) -> Result<()> {
        if let Some(d) = &self.direct {
            d.write(&self.file, offset, buf)
                .map_err(|e| self.err("write", offset, buf.len() as u64, e))?;
            if flags.contains(IoFlags::FUA) {
                self.flush()?;
            }
            return Ok(());
        }
        let r = if self.opts.aio != AioMode::Threads {
            aio::write_all_at(self.opts.aio, &self.file, buf, offset).and_then(|()| {
                if flags.contains(IoFlags::FUA) {
                    self.file.sync_data()
                } else {
                    Ok(())
                }
            })
        } else if flags.contains(IoFlags::FUA) {
            self.write_dsync(offset, buf)
        } else {
            self.file.write_all_at(buf, offset)
        };
        r.map_err(|e| self.err("write", offset, buf.len() as u64, e))
    }

    fn flush(&self) -> Result<()> {
        if self.opts.read_only {
            return Ok(());
        }
        self.file
            .sync_data()
            .map_err(|e| self.err("flush", 0, 0, e))
    }

    fn trim(&self, offset: u64, len: u64, flags: IoFlags) -> Result<()> {
        if !self.opts.discard {
            return Ok(());
        }
        match self.punch_hole(offset, len) {
            Ok(()) => {}
            // Discard is advisory: a file system without holes just keeps the data.
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {}
            Err(e) => return Err(self.err("trim", offset, len, e)),
        }
        if flags.contains(IoFlags::FUA) {
            self.flush()?;
        }
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: IoFlags) -> Result<()> {
        let mut done = false;
        if flags.contains(IoFlags::MAY_TRIM) && self.opts.discard && !self.is_block_device {
            done = self.punch_hole(offset, len).is_ok();
        }
        if !done {
            match self.zero_range(offset, len) {
                Ok(()) => {}
                Err(e) if flags.contains(IoFlags::FAST_ZERO) => {
                    tracing::debug!("fast zero refused: {e}");
                    return Err(Error::NotSupported("fast zero"));
                }
                Err(_) => {
                    let zeroes = vec![0u8; (len as usize).min(1 << 20)];
                    let mut pos = 0u64;
                    while pos < len {
                        let n = (len - pos).min(zeroes.len() as u64) as usize;
                        self.write(offset + pos, &zeroes[..n], IoFlags::empty())?;
                        pos += n as u64;
                    }
                }
            }
        }
        if flags.contains(IoFlags::FUA) {
            self.flush()?;
        }
        Ok(())
    }

    fn cache(&self, offset: u64, len: u64) -> Result<()> {
        // SAFETY: posix_fadvise on an owned, open fd with integer arguments.
        let r = unsafe {
            libc::posix_fadvise(
                self.file.as_raw_fd(),
                offset as i64,
                len as i64,
                libc::POSIX_FADV_WILLNEED,
            )
        };
        if r != 0 {
            tracing::debug!(
                "posix_fadvise WILLNEED failed: {}",
                io::Error::from_raw_os_error(r)
            );
        }
        Ok(())
    }

    fn block_status(&self, offset: u64, len: u64, out: &mut Extents) -> Result<()> {
        let end = offset + len;
        let data = ExtentFlags::empty();
        let hole = ExtentFlags::HOLE | ExtentFlags::ZERO;
        if self.is_block_device {
            out.push(Extent::new(len, data, 1));
            return Ok(());
        }
        let file_len = self.size;
        let mut pos = offset;
        while pos < end {
            let next_data = match self.seek(pos, libc::SEEK_DATA) {
                Ok(v) => v,
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    // No SEEK_DATA support: report data.
                    out.push(Extent::new(end - pos, data, 1));
                    return Ok(());
                }
                Err(e) => return Err(self.err("seek data", pos, 0, e)),
            };
            match next_data {
                Some(d) if d <= pos => {
                    let h = self
                        .seek(pos, libc::SEEK_HOLE)
                        .map_err(|e| self.err("seek hole", pos, 0, e))?
                        .unwrap_or(file_len)
                        .max(pos + 1);
                    // The ragged tail past the file's end inside the last sector is data too.
                    let h = if h >= file_len { file_len } else { h };
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
