//! The host-file layer: one type for an open image file, used by every format.
//!
//! [`HostFile`] gives positional I/O with the file name and offset in every error, the
//! `--cache` modes (O_DIRECT through aligned bounce buffers, [`direct`]), `--aio`, fallocate,
//! hole seeking, qemu's image locks ([`lock`]), and two things formats rely on for safety:
//! - **fdatasync failure is sticky** (as qemu's file-posix): once a sync failed, the kernel may
//!   have dropped the dirty pages, so every later [`HostFile::sync`] fails too. A remote file
//!   keeps that account itself ([`remote::Remote::flush`]).
//! - **The file only grows while it is served**: [`HostFile::grow_to`] never shrinks it, and
//!   nothing here truncates.
//!
//! Tests can attach a [`record::Recorder`] to see every write and sync in issue order (crash
//! states are built from it), and set `QNBD_TEST_DELAY_US` to widen race windows around
//! syncs and lock hand-offs.

pub mod direct;
pub mod http;
pub mod lock;
pub mod record;
pub mod remote;

use crate::aio::{self, AioMode};
use crate::error::errno_text;
use crate::{Error, Result};
use direct::DirectIo;
use lock::{ImageLock, Locking, Perm, Role, Stage};
use record::Recorder;
use remote::Remote;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::Arc;

/// How to open an image file (qemu's `file` driver options that apply here).
#[derive(Clone, Debug, Default)]
pub struct FileOptions {
    pub read_only: bool,
    /// O_DIRECT (`--cache=none|directsync`, `-n`, `cache.direct=on`).
    pub direct: bool,
    /// `--aio`.
    pub aio: AioMode,
    /// qemu's image locks to take (None: none, for files nobody else can know about).
    pub lock: Option<LockSpec>,
}

/// Which of qemu's image locks a file gets.
#[derive(Clone, Copy, Debug)]
pub struct LockSpec {
    /// `locking=auto|on|off`.
    pub locking: Locking,
    pub role: Role,
    /// `force-share=on`: share every permission (read-only opens only).
    pub force_share: bool,
}

#[derive(Debug)]
pub struct HostFile {
    /// The descriptor for I/O: opened with O_DIRECT when `direct` is set. None for a remote
    /// file.
    file: Option<File>,
    /// A file stored elsewhere (`remote.rs`): every call goes to it instead.
    remote: Option<Arc<dyn Remote>>,
    path: PathBuf,
    read_only: bool,
    is_block_device: bool,
    aio: AioMode,
    direct: Option<DirectIo>,
    /// errno of the first failed sync, returned by every later one.
    sync_failed: AtomicI32,
    /// The file system cannot read with RWF_NOWAIT: `try_read` stops trying.
    no_nowait: AtomicBool,
    /// The file system cannot write with RWF_NOWAIT (ext4): `try_write` writes without it.
    no_nowait_write: AtomicBool,
    /// qemu's image locks, released (explicit unlock, then close) when the file is dropped.
    lock: parking_lot::Mutex<Option<ImageLock>>,
    recorder: Option<Arc<Recorder>>,
}

/// qemu's wording: "Could not open 'PATH': No such file or directory".
pub fn open_error(path: &Path, e: &io::Error) -> Error {
    Error::CouldNotOpen {
        path: path.to_path_buf(),
        reason: errno_text(e),
    }
}

impl HostFile {
    pub fn open(path: &Path, opts: &FileOptions) -> Result<HostFile> {
        let open = |flags: i32| {
            OpenOptions::new()
                .read(true)
                .write(!opts.read_only)
                .custom_flags(libc::O_CLOEXEC | flags)
                .open(path)
                .map_err(|e| open_error(path, &e))
        };
        let file = open(if opts.direct { libc::O_DIRECT } else { 0 })?;
        let lock = match opts.lock {
            Some(spec) => Some(take_locks(&file, path, spec, opts.read_only)?),
            None => None,
        };
        let mut hf = HostFile::from_file(file, path, opts.read_only, opts.aio)?;
        *hf.lock.lock() = lock;
        if opts.direct {
            let len = hf.size()?;
            hf.direct = Some(DirectIo::new(open(0)?, len, opts.aio));
        }
        Ok(hf)
    }

    /// Wrap a file opened elsewhere (buffered I/O).
    pub fn from_file(file: File, path: &Path, read_only: bool, aio: AioMode) -> Result<HostFile> {
        let meta = file.metadata().map_err(|e| open_error(path, &e))?;
        let is_block_device = meta.file_type().is_block_device();
        Ok(HostFile::new(
            Some(file),
            None,
            path,
            read_only,
            is_block_device,
            aio,
        ))
    }

    /// A local file or a remote one, with nothing attached yet (no lock, O_DIRECT twin or
    /// recorder).
    fn new(
        file: Option<File>,
        remote: Option<Arc<dyn Remote>>,
        path: &Path,
        read_only: bool,
        is_block_device: bool,
        aio: AioMode,
    ) -> HostFile {
        HostFile {
            file,
            remote,
            path: path.to_path_buf(),
            read_only,
            is_block_device,
            aio,
            direct: None,
            sync_failed: AtomicI32::new(0),
            no_nowait: AtomicBool::new(false),
            no_nowait_write: AtomicBool::new(false),
            lock: parking_lot::Mutex::new(None),
            recorder: None,
        }
    }

    /// A file stored elsewhere, named `name` in messages; read-only when asked or when the
    /// server says so.
    pub fn remote(r: Arc<dyn Remote>, name: &Path, read_only: bool) -> HostFile {
        let read_only = read_only || r.read_only();
        HostFile::new(None, Some(r), name, read_only, false, AioMode::Threads)
    }

    /// The remote file this stands for, if it is one.
    pub fn remote_file(&self) -> Option<&Arc<dyn Remote>> {
        self.remote.as_ref()
    }

    /// The local descriptor; a remote file has none (callers ask `remote` first).
    fn local(&self) -> io::Result<&File> {
        self.file
            .as_ref()
            .ok_or_else(|| io::Error::from(io::ErrorKind::Unsupported))
    }

    /// Record every write, length change and sync from now on (crash-state tests).
    pub fn set_recorder(&mut self, r: Arc<Recorder>) {
        self.recorder = Some(r);
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The local file (None for a remote one).
    pub fn file(&self) -> Option<&File> {
        self.file.as_ref()
    }

    pub fn is_block_device(&self) -> bool {
        self.is_block_device
    }

    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// Fill `buf` from the page cache without waiting for the device (preadv2 RWF_NOWAIT).
    /// False if any of it is not there, past the end, or the kernel cannot tell (O_DIRECT).
    /// Only with `--aio=threads`: another mode asked for all I/O through its own engine.
    pub fn try_read(&self, offset: u64, buf: &mut [u8]) -> bool {
        let Some(file) = &self.file else {
            return false;
        };
        if self.direct.is_some()
            || self.aio != AioMode::Threads
            || self.no_nowait.load(Ordering::Relaxed)
        {
            return false;
        }
        let iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: iov points into `buf`, which outlives the call and is written only up to
        // its length.
        let n = unsafe {
            libc::preadv2(
                file.as_raw_fd(),
                &iov,
                1,
                offset as libc::off_t,
                libc::RWF_NOWAIT,
            )
        };
        if n < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::EOPNOTSUPP) {
            self.no_nowait.store(true, Ordering::Relaxed);
        }
        n >= 0 && n as usize == buf.len()
    }

    /// Write `buf` at `offset` into the page cache if that should not wait for the device:
    /// whole pages (no page read first), with RWF_NOWAIT where the file system has it (ext4
    /// does not: a buffered write of whole pages then waits only when the kernel throttles
    /// writers, as every writer would). False if not done; part of it may have been written.
    /// Only with `--aio=threads`, as `try_read`.
    pub fn try_write(&self, offset: u64, buf: &[u8]) -> bool {
        const PAGE: u64 = 4096;
        let Some(file) = &self.file else {
            return false;
        };
        if self.direct.is_some()
            || self.read_only
            || self.aio != AioMode::Threads
            || !offset.is_multiple_of(PAGE)
            || !(buf.len() as u64).is_multiple_of(PAGE)
        {
            return false;
        }
        let flags = if self.no_nowait_write.load(Ordering::Relaxed) {
            0
        } else {
            libc::RWF_NOWAIT
        };
        let iov = libc::iovec {
            iov_base: buf.as_ptr() as *mut libc::c_void,
            iov_len: buf.len(),
        };
        // SAFETY: iov points into `buf`, which outlives the call; pwritev2 only reads it.
        let mut n =
            unsafe { libc::pwritev2(file.as_raw_fd(), &iov, 1, offset as libc::off_t, flags) };
        if n < 0
            && flags != 0
            && io::Error::last_os_error().raw_os_error() == Some(libc::EOPNOTSUPP)
        {
            self.no_nowait_write.store(true, Ordering::Relaxed);
            // SAFETY: as above.
            n = unsafe { libc::pwritev2(file.as_raw_fd(), &iov, 1, offset as libc::off_t, 0) };
        }
        if n < 0 || n as usize != buf.len() {
            return false;
        }
        if let Some(rec) = &self.recorder {
            rec.write(offset, buf);
        }
        true
    }

    /// Where `offset` lies in this file, for a caller that splices bytes out of the page
    /// cache (`BlockBackend::read_source`); None with O_DIRECT (where the page cache may be
    /// stale and is not ours to use), and with an `--aio` engine other than threads (asked
    /// for all I/O).
    pub fn page_cache_span(&self, offset: u64) -> Option<crate::HostSpan<'_>> {
        use std::os::fd::AsFd;
        if self.direct.is_some() || self.aio != AioMode::Threads {
            return None;
        }
        Some(crate::HostSpan {
            fd: self.file.as_ref()?.as_fd(),
            offset,
            path: &self.path,
        })
    }

    /// As `page_cache_span`, for a caller that splices writes into the page cache
    /// (`BlockBackend::write_sink`); also None read-only or when a test records the writes
    /// (it could not see these).
    pub fn page_cache_sink(&self, offset: u64) -> Option<crate::HostSpan<'_>> {
        if self.read_only || self.recorder.is_some() {
            return None;
        }
        self.page_cache_span(offset)
    }

    pub fn is_direct(&self) -> bool {
        self.direct.is_some()
    }

    pub fn err(&self, op: &'static str, offset: u64, len: u64, e: io::Error) -> Error {
        Error::io(op, &self.path, offset, len, e)
    }

    pub fn corrupt(&self, msg: String) -> Error {
        Error::Corrupt {
            path: self.path.clone(),
            msg,
        }
    }

    /// Fill `buf` from `offset`; bytes past the end of the file read as zeroes.
    pub fn read(&self, op: &'static str, offset: u64, buf: &mut [u8]) -> Result<()> {
        if let Some(r) = &self.remote {
            let n = r.size().saturating_sub(offset).min(buf.len() as u64) as usize;
            buf[n..].fill(0);
            return match n {
                0 => Ok(()),
                n => r.read(offset, &mut buf[..n]),
            }
            .map_err(|e| self.err(op, offset, n as u64, e));
        }
        let file = self.local().map_err(|e| self.err(op, offset, 0, e))?;
        let r = match &self.direct {
            Some(d) => d.read(file, offset, buf),
            None => read_full_at(self.aio, file, offset, buf),
        };
        r.map_err(|e| self.err(op, offset, buf.len() as u64, e))
    }

    /// Write all of `buf` at `offset`; with `dsync` it is durable when this returns.
    pub fn write(&self, op: &'static str, offset: u64, buf: &[u8], dsync: bool) -> Result<()> {
        if let Some(r) = &self.remote {
            let end = offset.saturating_add(buf.len() as u64);
            if end > r.size() {
                return Err(remote::cannot_grow(&self.path.display().to_string(), end));
            }
            return r
                .write(offset, buf, dsync)
                .map_err(|e| self.err(op, offset, buf.len() as u64, e));
        }
        let file = self
            .local()
            .map_err(|e| self.err(op, offset, buf.len() as u64, e))?;
        let r =
            match &self.direct {
                Some(d) => d.write(file, offset, buf).and_then(|()| {
                    if dsync {
                        self.sync_raw()
                    } else {
                        Ok(())
                    }
                }),
                None if dsync && self.aio == AioMode::Threads => write_dsync(file, offset, buf),
                None => aio::write_all_at(self.aio, file, buf, offset).and_then(|()| {
                    if dsync {
                        self.sync_raw()
                    } else {
                        Ok(())
                    }
                }),
            };
        match r {
            Ok(()) => {
                if let Some(rec) = &self.recorder {
                    rec.write(offset, buf);
                    if dsync {
                        let id = rec.sync();
                        rec.sync_done(id);
                    }
                }
                Ok(())
            }
            Err(e) => {
                if dsync && self.direct.is_none() && self.remote.is_none() {
                    // As with a failed sync, the page cache may now hold pages marked clean.
                    let code = e.raw_os_error().unwrap_or(libc::EIO);
                    self.sync_failed.store(code, Ordering::Release);
                }
                Err(self.err(op, offset, buf.len() as u64, e))
            }
        }
    }

    fn sync_raw(&self) -> io::Result<()> {
        record::test_delay();
        match &self.remote {
            Some(r) => r.flush(),
            None => self.local()?.sync_data(),
        }
    }

    /// fdatasync. A failure is remembered: the kernel may have marked the failed pages clean,
    /// so no later sync may report success (qemu's `page_cache_inconsistent`).
    pub fn sync(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        let failed = self.sync_failed.load(Ordering::Acquire);
        if failed != 0 {
            return Err(self.err("flush", 0, 0, io::Error::from_raw_os_error(failed)));
        }
        // Recorded at the start: writes logged before it completed before it began.
        let id = self.recorder.as_ref().map(|r| r.sync());
        match self.sync_raw() {
            Ok(()) => {
                if let (Some(rec), Some(id)) = (&self.recorder, id) {
                    rec.sync_done(id);
                }
                Ok(())
            }
            Err(e) => {
                // A remote file keeps its own account (a lost connection with nothing
                // unflushed is no lost data; see the NBD client's link).
                if self.direct.is_none() && self.remote.is_none() {
                    let code = e.raw_os_error().unwrap_or(libc::EIO);
                    self.sync_failed.store(code, Ordering::Release);
                }
                Err(self.err("flush", 0, 0, e))
            }
        }
    }

    /// The file's length (a block device's size).
    pub fn size(&self) -> Result<u64> {
        if let Some(r) = &self.remote {
            return Ok(r.size());
        }
        let file = self.local().map_err(|e| self.err("stat", 0, 0, e))?;
        if self.is_block_device {
            // SAFETY: lseek on an owned, open fd; positional I/O elsewhere ignores the offset.
            let end = unsafe { libc::lseek(file.as_raw_fd(), 0, libc::SEEK_END) };
            if end < 0 {
                return Err(self.err("seek", 0, 0, io::Error::last_os_error()));
            }
            return Ok(end as u64);
        }
        file.metadata()
            .map(|m| m.len())
            .map_err(|e| self.err("stat", 0, 0, e))
    }

    /// Make the file at least `len` bytes long (a sparse extension); never shrinks it. The
    /// caller keeps concurrent calls apart (the length read here must be current).
    pub fn grow_to(&self, len: u64) -> Result<()> {
        if self.is_block_device || self.size()? >= len {
            return Ok(());
        }
        if self.remote.is_some() {
            return Err(remote::cannot_grow(&self.path.display().to_string(), len));
        }
        self.local()
            .and_then(|f| f.set_len(len))
            .map_err(|e| self.err("extend", len, 0, e))?;
        if let Some(rec) = &self.recorder {
            rec.set_len(len);
        }
        Ok(())
    }

    /// Cut a regular file to `len` bytes (a format's close drops what lies past its data, as
    /// qemu's parallels driver does). Nothing for a block device or a remote file.
    pub fn truncate_to(&self, len: u64) -> Result<()> {
        if self.is_block_device || self.remote.is_some() || self.size()? <= len {
            return Ok(());
        }
        self.local()
            .and_then(|f| f.set_len(len))
            .map_err(|e| self.err("truncate", len, 0, e))?;
        if let Some(rec) = &self.recorder {
            rec.set_len(len);
        }
        Ok(())
    }

    fn fallocate(&self, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
        if let Some(r) = &self.remote {
            // A punched hole reads as zeroes: write-zeroes that may deallocate.
            return r.write_zeroes(offset, len, mode & libc::FALLOC_FL_PUNCH_HOLE == 0, false);
        }
        let file = self.local()?;
        // An unaligned O_DIRECT read-modify-write must not interleave with this.
        let _x = self.direct.as_ref().map(|d| d.shared());
        // SAFETY: fallocate on an owned, open fd with plain integer arguments.
        let r = unsafe { libc::fallocate(file.as_raw_fd(), mode, offset as i64, len as i64) };
        if r == 0 {
            if let Some(rec) = &self.recorder {
                rec.zero(offset, len);
            }
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// Deallocate the range; it reads as zeroes afterwards. The size is kept.
    pub fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        self.fallocate(
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        )
    }

    /// A remote file's zeroes with FUA, durable when this returns, in one request (None:
    /// a local file, which has no per-range sync). Unlike a zero then a flush, it does
    /// not vouch for other writes, so it works where a flush would fail.
    pub fn remote_zeroes_fua(&self, offset: u64, len: u64, punch: bool) -> Option<io::Result<()>> {
        let r = self.remote.as_ref()?;
        Some(r.write_zeroes(offset, len, !punch, true))
    }

    /// Make the range read as zeroes without writing them; a regular file keeps its size.
    pub fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        let mode = if self.is_block_device {
            libc::FALLOC_FL_ZERO_RANGE
        } else {
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
        };
        self.fallocate(mode, offset, len)
    }

    /// SEEK_DATA / SEEK_HOLE: None where the kernel says ENXIO (no more data).
    pub fn seek(&self, offset: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
        if let Some(r) = &self.remote {
            return remote::seek(r.as_ref(), offset, whence);
        }
        let file = self.local()?;
        // SAFETY: lseek on an owned, open fd; pread/pwrite elsewhere do not use the position.
        let r = unsafe { libc::lseek(file.as_raw_fd(), offset as i64, whence) };
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

    /// Zeroes into `len` bytes at `at`: deallocated when the file system can (FALLOC
    /// zero-range), written in bounded pieces otherwise.
    pub fn write_zeroes(&self, at: u64, len: u64) -> Result<()> {
        if self.zero_range(at, len).is_ok() {
            return Ok(());
        }
        let chunk = vec![0u8; len.min(1 << 20) as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(chunk.len() as u64) as usize;
            self.write("write zeroes", at + done, &chunk[..n], false)?;
            done += n as u64;
        }
        Ok(())
    }

    /// Block status of `len` bytes at `at` that are an image's own (depth 1): zero where the
    /// file has a hole or ends (qemu's recursion into the file for formats that map to it
    /// byte for byte: VMDK flat extents, static VDI images, fixed VHDs). A file that
    /// cannot say where its holes are (a device, an old file system) is all data.
    pub fn zero_status(&self, at: u64, len: u64, out: &mut crate::Extents) {
        use crate::{Extent, ExtentFlags};
        let end = at + len;
        let mut pos = at;
        while pos < end {
            let Ok(data) = self.seek(pos, libc::SEEK_DATA) else {
                out.push(Extent::new(end - pos, ExtentFlags::empty(), 1));
                break;
            };
            let (n, flags) = match data {
                Some(d) if d <= pos => {
                    let hole = self
                        .seek(pos, libc::SEEK_HOLE)
                        .ok()
                        .flatten()
                        .unwrap_or(end);
                    (hole.clamp(pos + 1, end) - pos, ExtentFlags::empty())
                }
                d => (d.unwrap_or(u64::MAX).min(end) - pos, ExtentFlags::ZERO),
            };
            out.push(Extent::new(n, flags, 1));
            pos += n;
        }
    }

    /// Prefetch hint.
    pub fn will_need(&self, offset: u64, len: u64) {
        let Some(file) = &self.file else {
            return;
        };
        // SAFETY: posix_fadvise on an owned, open fd with integer arguments.
        let r = unsafe {
            libc::posix_fadvise(
                file.as_raw_fd(),
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
    }
}

/// qemu's locks for a file opened with `spec`; a refusal carries qemu's message, and says
/// whether qemu-nbd reports it at open or when the export is added (raw's second step).
fn take_locks(file: &File, path: &Path, spec: LockSpec, read_only: bool) -> Result<ImageLock> {
    let name = path.display().to_string();
    if spec.force_share {
        let (perm, _) = lock::perms_for(spec.role, read_only);
        return ImageLock::acquire(file, &name, spec.locking, perm, Perm::ALL)
            .map_err(|e| Error::Locked(e.to_string()));
    }
    ImageLock::acquire_role(file, &name, spec.locking, spec.role, read_only).map_err(|e| {
        match e.stage {
            Stage::Open => Error::Locked(e.to_string()),
            Stage::Export => Error::Export(e.to_string()),
        }
    })
}

/// Fill `buf` from `start`; bytes past the end of the file read as zeroes.
pub(crate) fn read_full_at(mode: AioMode, f: &File, start: u64, buf: &mut [u8]) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match aio::read_at(mode, f, &mut buf[done..], start + done as u64) {
            Ok(0) => {
                buf[done..].fill(0);
                break;
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// A write that is durable when it returns (pwritev2 with RWF_DSYNC).
fn write_dsync(f: &File, offset: u64, buf: &[u8]) -> io::Result<()> {
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
                f.as_raw_fd(),
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
