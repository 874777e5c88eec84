//! `-s` / `--snapshot`: a throw-away copy-on-write overlay over any backend. Writes go to an
//! anonymous temporary file (O_TMPFILE, so nothing is left behind even after SIGKILL), a
//! cluster at a time; reads of clusters never written fall through to the base, which is
//! opened read-only and never changes.

use crate::{BlockBackend, Caps, Error, Extent, ExtentFlags, Extents, IoFlags, Result, Support};
use parking_lot::Mutex;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Copy-on-write granularity.
const CLUSTER: u64 = 64 * 1024;
/// Locks that serialise the first write into a cluster (striped by cluster number).
const STRIPES: usize = 64;

#[derive(Debug)]
pub struct CowOverlay {
    base: Arc<dyn BlockBackend>,
    top: File,
    top_path: PathBuf,
    size: u64,
    /// One bit per cluster: set once the cluster lives in `top`.
    allocated: Vec<AtomicU64>,
    stripes: Vec<Mutex<()>>,
    read_only: bool,
}

/// Where qemu-nbd puts its temporary overlay: $TMPDIR, else /var/tmp.
pub fn temp_dir() -> PathBuf {
    std::env::var_os("TMPDIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/tmp"))
}

impl CowOverlay {
    pub fn new(base: Arc<dyn BlockBackend>, dir: &Path, read_only: bool) -> Result<CowOverlay> {
        let top = tempfile::tempfile_in(dir).map_err(|e| {
            Error::Open(format!(
                "Could not create temporary overlay in '{}': {e}",
                dir.display()
            ))
        })?;
        let size = base.size();
        let clusters = size.div_ceil(CLUSTER);
        let words = clusters.div_ceil(64) as usize;
        let allocated = (0..words).map(|_| AtomicU64::new(0)).collect();
        let stripes = (0..STRIPES).map(|_| Mutex::new(())).collect();
        Ok(CowOverlay {
            base,
            top,
            top_path: dir.join("(overlay)"),
            size,
            allocated,
            stripes,
            read_only,
        })
    }

    fn is_allocated(&self, c: u64) -> bool {
        self.allocated[(c / 64) as usize].load(Ordering::Acquire) & (1 << (c % 64)) != 0
    }

    fn mark(&self, c: u64) {
        self.allocated[(c / 64) as usize].fetch_or(1 << (c % 64), Ordering::Release);
    }

    fn err(&self, op: &'static str, offset: u64, len: u64, e: io::Error) -> Error {
        Error::io(op, &self.top_path, offset, len, e)
    }

    fn read_top(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let mut done = 0;
        while done < buf.len() {
            match self.top.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => {
                    buf[done..].fill(0);
                    break;
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.err("read overlay", offset, buf.len() as u64, e)),
            }
        }
        Ok(())
    }

    /// Split `[offset, offset + len)` at cluster boundaries.
    fn pieces(offset: u64, len: u64) -> impl Iterator<Item = (u64, u64, u64)> {
        let end = offset + len;
        let mut pos = offset;
        std::iter::from_fn(move || {
            if pos >= end {
                return None;
            }
            let c = pos / CLUSTER;
            let n = ((c + 1) * CLUSTER).min(end) - pos;
            let r = (c, pos, n);
            pos += n;
            Some(r)
        })
    }

    /// Write `data` at `pos` inside cluster `c`, copying the cluster up first if needed.
    /// `data` None writes zeroes.
    fn write_piece(&self, c: u64, pos: u64, n: u64, data: Option<&[u8]>) -> Result<()> {
        if !self.is_allocated(c) {
            let _g = self.stripes[(c as usize) % STRIPES].lock();
            if !self.is_allocated(c) {
                let cstart = c * CLUSTER;
                let clen = CLUSTER.min(self.size - cstart);
                let mut buf = vec![0u8; clen as usize];
                if n < clen {
                    self.base.read(cstart, &mut buf)?;
                }
                let at = (pos - cstart) as usize;
                match data {
                    Some(d) => buf[at..at + n as usize].copy_from_slice(d),
                    None => buf[at..at + n as usize].fill(0),
                }
                self.top
                    .write_all_at(&buf, cstart)
                    .map_err(|e| self.err("write overlay", cstart, clen, e))?;
                self.mark(c);
                return Ok(());
            }
        }
        match data {
            Some(d) => self.top.write_all_at(d, pos),
            None => self.top.write_all_at(&vec![0u8; n as usize], pos),
        }
        .map_err(|e| self.err("write overlay", pos, n, e))
    }
}

impl BlockBackend for CowOverlay {
    fn size(&self) -> u64 {
        self.size
    }

    fn caps(&self) -> Caps {
        if self.read_only {
            return Caps::READ_ONLY;
        }
        Caps {
            writable: true,
            flush: true,
            fua: Support::Emulate,
            trim: true,
            zero: Support::Native,
            fast_zero: true,
            cache: Support::Emulate,
            multi_conn: true,
            rotational: false,
        }
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let mut done = 0usize;
        for (c, pos, n) in Self::pieces(offset, buf.len() as u64) {
            let part = &mut buf[done..done + n as usize];
            if self.is_allocated(c) {
                self.read_top(pos, part)?;
            } else {
                self.base.read(pos, part)?;
            }
            done += n as usize;
        }
        Ok(())
    }

    fn write(&self, offset: u64, buf: &[u8], _flags: IoFlags) -> Result<()> {
        let mut done = 0usize;
        for (c, pos, n) in Self::pieces(offset, buf.len() as u64) {
            self.write_piece(c, pos, n, Some(&buf[done..done + n as usize]))?;
            done += n as usize;
        }
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        self.top
            .sync_data()
            .map_err(|e| self.err("flush overlay", 0, 0, e))
    }

    fn trim(&self, _offset: u64, _len: u64, _flags: IoFlags) -> Result<()> {
        // Advisory, and the overlay is thrown away anyway.
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64, _flags: IoFlags) -> Result<()> {
        for (c, pos, n) in Self::pieces(offset, len) {
            let whole = pos == c * CLUSTER && n == CLUSTER.min(self.size - pos);
            if whole {
                // A hole in the temporary file reads as zeroes.
                // SAFETY: fallocate on our own open fd with integer arguments.
                let r = unsafe {
                    libc::fallocate(
                        self.top.as_raw_fd(),
                        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                        pos as i64,
                        n as i64,
                    )
                };
                if r == 0 {
                    let _g = self.stripes[(c as usize) % STRIPES].lock();
                    // Make sure the file covers the cluster so reads see zeroes, not EOF.
                    if self.top.metadata().map(|m| m.len()).unwrap_or(0) < pos + n {
                        self.top
                            .set_len(pos + n)
                            .map_err(|e| self.err("extend overlay", pos, n, e))?;
                    }
                    self.mark(c);
                    continue;
                }
            }
            self.write_piece(c, pos, n, None)?;
        }
        Ok(())
    }

    fn block_status(&self, offset: u64, len: u64, out: &mut Extents) -> Result<()> {
        let mut inner = Extents::new();
        for (c, pos, n) in Self::pieces(offset, len) {
            if self.is_allocated(c) {
                out.push(Extent::new(n, ExtentFlags::empty(), 1));
            } else {
                // One cluster of the base at a time; deeper layers count one more.
                inner.clear();
                let mut p = pos;
                while p < pos + n {
                    self.base.block_status(p, pos + n - p, &mut inner)?;
                    let Some(e) = inner.iter().next().copied() else {
                        break;
                    };
                    let l = e.len.min(pos + n - p).max(1);
                    out.push(Extent::new(
                        l,
                        e.flags,
                        if e.depth == 0 { 0 } else { e.depth + 1 },
                    ));
                    p += l;
                    inner.clear();
                }
            }
            if out.len() >= 4096 {
                break;
            }
        }
        Ok(())
    }

    fn format_name(&self) -> &'static str {
        "snapshot overlay"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raw::{RawFile, RawOptions};

    #[test]
    fn writes_stay_in_the_overlay() {
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().write_all_at(&vec![7u8; 300_000], 0).unwrap();
        let raw = RawFile::open(
            f.path(),
            RawOptions {
                read_only: true,
                ..Default::default()
            },
        )
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let o = CowOverlay::new(Arc::new(raw), dir.path(), false).unwrap();
        o.write(65536 - 10, &[1u8; 20], IoFlags::empty()).unwrap();
        o.write_zeroes(131072, 65536, IoFlags::empty()).unwrap();
        let mut b = vec![0u8; 40];
        o.read(65536 - 20, &mut b).unwrap();
        assert_eq!(&b[..10], &[7u8; 10]);
        assert_eq!(&b[10..30], &[1u8; 20]);
        assert_eq!(&b[30..], &[7u8; 10]);
        let mut z = vec![9u8; 65536];
        o.read(131072, &mut z).unwrap();
        assert!(z.iter().all(|&x| x == 0));
        let base = std::fs::read(f.path()).unwrap();
        assert!(
            base[..300_000].iter().all(|&x| x == 7),
            "the base never changes"
        );
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            0,
            "no visible temporary file"
        );
    }
}
