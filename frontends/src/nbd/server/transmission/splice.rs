//! Read replies spliced from the page cache, and write payloads spliced into it. A large read whose bytes lie as they are in a host
//! file (`Device::read_source`) goes file → pipe → socket with splice(2): the pipe takes the
//! page-cache pages by reference and a Unix or TCP socket takes them from the pipe the same
//! way, so the server copies none of the data (the client's receive does the one copy).
//!
//! Order, so that no error can follow a header on the wire: the pipe is filled first, without
//! any lock; only a completely filled pipe leads to a header. A short or failed fill (the file
//! shrank, an I/O error) drains the pipe and the caller serves the read by copying, which
//! reports the error as every other read does. Under the socket's lock the header is sent with
//! MSG_MORE and the pipe's contents follow; a failure there is the socket's, which ends the
//! connection as a failed `writev` does.
//!
//! A client sees the bytes as they are when the pipe is filled, or later if a write that is in
//! flight at the same time changes the page before the socket is done with it: a read and a
//! write in flight together may see either, as NBD allows. A reply is complete in the client's
//! receive queue before the client can learn that the read is done, so a write the client
//! sends after its read completed can never show in that read's data.

//!
//! Writes (when another connection is transmitting too: see `may_splice_write`): the
//! worker holding the read lock moves a large write's payload from the socket
//! into its pipe (`take_from_socket`), lets the lock go, and moves it on into the file
//! (`write_to_file`): the socket's pages are taken by reference, so the one copy is into
//! the page cache. The whole payload is in the pipe before the file sees any of it, so a
//! client that dies mid-payload changes nothing, as with a copied payload; what the read
//! buffer already held is copied into the pipe first (`put`), so the file gets the payload in
//! one splice, which a killed server leaves cut at a page boundary, as a `pwrite`, and never
//! inside a sector. A pipe that fills
//! up first (the socket's buffers are small pieces of pages) is read back into memory and
//! the rest of the payload is read as usual.

use backends::HostSpan;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// Reads shorter than this are copied: three system calls cost more than copying them twice.
pub(super) const SPLICE_MIN: u64 = 64 * 1024;

/// Pipe sizes tried, largest first: above `/proc/sys/fs/pipe-max-size` (1 MiB by default)
/// only a privileged process gets a pipe.
const PIPE_SIZES: [libc::c_int; 2] = [4 << 20, 1 << 20];
pub(super) const PAGE: u64 = 4096;

/// One worker's pipe; empty between replies.
pub(super) struct ReplyPipe {
    rd: OwnedFd,
    wr: OwnedFd,
    /// Buffers the pipe holds: one per page (or part of a page) of a file.
    slots: u64,
}

impl ReplyPipe {
    pub(super) fn new() -> io::Result<ReplyPipe> {
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: pipe2 writes two descriptors into the array it is given.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded, so both are open descriptors that nothing else owns.
        let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let mut size = 0;
        for want in PIPE_SIZES {
            // SAFETY: fcntl on an open pipe descriptor with an integer argument.
            let got = unsafe { libc::fcntl(wr.as_raw_fd(), libc::F_SETPIPE_SZ, want) };
            if got > 0 {
                size = got;
                break;
            }
        }
        if size == 0 {
            // SAFETY: as above; F_GETPIPE_SZ takes no argument.
            size = unsafe { libc::fcntl(wr.as_raw_fd(), libc::F_GETPIPE_SZ) };
        }
        if size <= 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(ReplyPipe {
            rd,
            wr,
            slots: size as u64 / PAGE,
        })
    }

    /// Whether `len` bytes at file offset `offset` fit: one buffer per page they touch.
    pub(super) fn fits(&self, offset: u64, len: u64) -> bool {
        let pages = (offset % PAGE + len).div_ceil(PAGE);
        pages <= self.slots
    }

    /// Move `len` bytes of `src` into the pipe. False (and the pipe empty again) unless all
    /// of them got there.
    pub(super) fn fill(&mut self, src: HostSpan<'_>, len: usize) -> bool {
        let mut off = src.offset as libc::loff_t;
        let mut done = 0usize;
        while done < len {
            // SAFETY: splice between two open descriptors; `off` is a valid loff_t that the
            // kernel advances, leaving the file's own offset alone.
            let n = unsafe {
                libc::splice(
                    src.fd.as_raw_fd(),
                    &mut off,
                    self.wr.as_raw_fd(),
                    std::ptr::null_mut(),
                    len - done,
                    libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
                )
            };
            match n {
                n if n > 0 => done += n as usize,
                0 => break,
                _ if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted => {}
                _ => break,
            }
        }
        if done < len {
            self.drain();
            return false;
        }
        true
    }

    /// Send `hdr` and then the `len` bytes in the pipe to `sock`.
    pub(super) fn send(&mut self, sock: BorrowedFd<'_>, hdr: &[u8], len: usize) -> io::Result<()> {
        complete(hdr.len(), io::ErrorKind::WriteZero, |at| {
            let rest = &hdr[at..];
            // SAFETY: send from a live buffer of `rest.len()` bytes on an open socket.
            unsafe {
                libc::send(
                    sock.as_raw_fd(),
                    rest.as_ptr().cast(),
                    rest.len(),
                    libc::MSG_MORE | libc::MSG_NOSIGNAL,
                )
            }
        })?;
        complete(len, io::ErrorKind::WriteZero, |done| {
            // SAFETY: splice between two open descriptors, no offsets (a pipe and a socket).
            unsafe {
                libc::splice(
                    self.rd.as_raw_fd(),
                    std::ptr::null_mut(),
                    sock.as_raw_fd(),
                    std::ptr::null_mut(),
                    len - done,
                    libc::SPLICE_F_MOVE,
                )
            }
        })
    }

    /// Move up to `len` bytes of a write's payload from `sock` into the empty pipe, waiting
    /// for them as a blocking read would. Returns how many got there: `len`, or fewer when
    /// the pipe filled up first (they are read back with `read_out`). An error or the end of
    /// the stream leaves the pipe empty.
    pub(super) fn take_from_socket(
        &mut self,
        sock: BorrowedFd<'_>,
        len: usize,
    ) -> io::Result<usize> {
        let mut done = 0usize;
        while done < len {
            // SAFETY: splice between two open descriptors, no offsets (a socket and a pipe).
            let n = unsafe {
                libc::splice(
                    sock.as_raw_fd(),
                    std::ptr::null_mut(),
                    self.wr.as_raw_fd(),
                    std::ptr::null_mut(),
                    len - done,
                    libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
                )
            };
            if n > 0 {
                done += n as usize;
                continue;
            }
            let e = if n == 0 {
                io::ErrorKind::UnexpectedEof.into()
            } else {
                io::Error::last_os_error()
            };
            match e.kind() {
                io::ErrorKind::Interrupted => continue,
                // A full pipe fails the call (EAGAIN; EFAULT from a Unix socket).
                _ if n < 0 && done > 0 && !self.has_room() => return Ok(done),
                io::ErrorKind::WouldBlock => {
                    if let Err(e) = wait_readable(sock) {
                        self.drain();
                        return Err(e);
                    }
                }
                _ => {
                    self.drain();
                    return Err(e);
                }
            }
        }
        Ok(done)
    }

    /// Copy `data` into the empty pipe, which has room for it (see `fits`).
    pub(super) fn put(&mut self, data: &[u8]) -> io::Result<()> {
        let wr = self.wr.as_raw_fd();
        let r = complete(data.len(), io::ErrorKind::WriteZero, |at| {
            let rest = &data[at..];
            // SAFETY: write from a live buffer of `rest.len()` bytes into an open pipe.
            unsafe { libc::write(wr, rest.as_ptr().cast(), rest.len()) }
        });
        if r.is_err() {
            self.drain();
        }
        r
    }

    /// Read exactly `buf.len()` bytes that are in the pipe.
    pub(super) fn read_out(&mut self, buf: &mut [u8]) -> io::Result<()> {
        let rd = self.rd.as_raw_fd();
        complete(buf.len(), io::ErrorKind::UnexpectedEof, |at| {
            let rest = &mut buf[at..];
            // SAFETY: read into a live buffer of `rest.len()` bytes.
            unsafe { libc::read(rd, rest.as_mut_ptr().cast(), rest.len()) }
        })
    }

    /// Move the `len` bytes in the pipe into the file at `dst`. On an error the pipe is
    /// emptied and the error names the file and offset, as a copied write's would.
    pub(super) fn write_to_file(&mut self, dst: HostSpan<'_>, len: usize) -> backends::Result<()> {
        let mut off = dst.offset as libc::loff_t;
        let rd = self.rd.as_raw_fd();
        let written = complete(len, io::ErrorKind::WriteZero, |done| {
            // SAFETY: splice between two open descriptors; `off` is a valid loff_t that the
            // kernel advances, leaving the file's own offset alone.
            unsafe {
                libc::splice(
                    rd,
                    std::ptr::null_mut(),
                    dst.fd.as_raw_fd(),
                    &mut off,
                    len - done,
                    libc::SPLICE_F_MOVE,
                )
            }
        });
        written.map_err(|e| {
            self.drain();
            let at = off as u64;
            let left = dst.offset + len as u64 - at;
            backends::Error::io("write", dst.path, at, left, e)
        })
    }

    /// Whether another buffer fits in the pipe.
    fn has_room(&self) -> bool {
        let mut p = libc::pollfd {
            fd: self.wr.as_raw_fd(),
            events: libc::POLLOUT,
            revents: 0,
        };
        // SAFETY: poll on one live pollfd, without waiting.
        let n = unsafe { libc::poll(&mut p, 1, 0) };
        n > 0 && p.revents & libc::POLLOUT != 0
    }

    /// Empty the pipe (its read end does not block).
    pub(super) fn drain(&mut self) {
        let mut sink = [0u8; 16 * 1024];
        loop {
            // SAFETY: read into a live stack buffer of its own length.
            let n =
                unsafe { libc::read(self.rd.as_raw_fd(), sink.as_mut_ptr().cast(), sink.len()) };
            if n <= 0 && !(n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted)
            {
                return;
            }
        }
    }
}

/// Call `step` with the bytes done so far until `len` are done; `step` makes one system call
/// and returns its result. An interrupted call is made again, one that moves nothing fails
/// with `at_zero`, any other failure with its error.
fn complete(
    len: usize,
    at_zero: io::ErrorKind,
    mut step: impl FnMut(usize) -> isize,
) -> io::Result<()> {
    let mut done = 0;
    while done < len {
        match step(done) {
            n if n > 0 => done += n as usize,
            0 => return Err(at_zero.into()),
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
    Ok(())
}

/// Wait until `sock` has something to read (or is closed or shut down).
fn wait_readable(sock: BorrowedFd<'_>) -> io::Result<()> {
    let mut p = libc::pollfd {
        fd: sock.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    loop {
        // SAFETY: poll on one live pollfd.
        let n = unsafe { libc::poll(&mut p, 1, -1) };
        if n >= 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;

    fn file_with(data: &[u8]) -> std::fs::File {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(data).unwrap();
        f
    }

    #[test]
    fn header_then_file_bytes_reach_the_socket() {
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let f = file_with(&data);
        let mut p = ReplyPipe::new().unwrap();
        let (a, mut b) = UnixStream::pair().unwrap();
        let src = HostSpan {
            fd: f.as_fd(),
            offset: 4096 + 17,
            path: std::path::Path::new("test"),
        };
        let len = 200_000;
        assert!(p.fits(src.offset, len as u64));
        assert!(p.fill(src, len));
        let reader = std::thread::spawn(move || {
            let mut got = vec![0u8; 5 + len];
            b.read_exact(&mut got).unwrap();
            got
        });
        p.send(a.as_fd(), b"head:", len).unwrap();
        let got = reader.join().unwrap();
        assert_eq!(&got[..5], b"head:");
        assert_eq!(&got[5..], &data[4096 + 17..4096 + 17 + len]);
    }

    #[test]
    fn a_short_file_leaves_the_pipe_empty_and_says_so() {
        let f = file_with(&[7u8; 10_000]);
        let mut p = ReplyPipe::new().unwrap();
        let src = HostSpan {
            fd: f.as_fd(),
            offset: 0,
            path: std::path::Path::new("test"),
        };
        assert!(!p.fill(src, 20_000));
        // Nothing left behind: the next reply starts from an empty pipe.
        assert!(p.fill(src, 10_000));
        let (a, mut b) = UnixStream::pair().unwrap();
        p.send(a.as_fd(), b"", 10_000).unwrap();
        drop(a);
        let mut got = Vec::new();
        b.read_to_end(&mut got).unwrap();
        assert_eq!(got, vec![7u8; 10_000]);
    }

    #[test]
    fn bytes_not_in_the_page_cache_are_read_in() {
        let data: Vec<u8> = (0..1_048_576u32).map(|i| (i * 7 % 253) as u8).collect();
        let f = file_with(&data);
        f.sync_all().unwrap();
        // SAFETY: fadvise on an open descriptor with integer arguments.
        unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        let mut p = ReplyPipe::new().unwrap();
        let src = HostSpan {
            fd: f.as_fd(),
            offset: 0,
            path: std::path::Path::new("test"),
        };
        assert!(
            p.fill(src, 1 << 20),
            "a cold page cache must not fail the fill"
        );
        let (a, mut b) = UnixStream::pair().unwrap();
        let reader = std::thread::spawn(move || {
            let mut got = vec![0u8; 1 << 20];
            b.read_exact(&mut got).unwrap();
            got
        });
        p.send(a.as_fd(), b"", 1 << 20).unwrap();
        assert!(reader.join().unwrap() == data);
    }

    #[test]
    fn more_pages_than_the_pipe_holds_do_not_fit() {
        let p = ReplyPipe::new().unwrap();
        assert!(p.fits(0, p.slots * PAGE));
        assert!(!p.fits(1, p.slots * PAGE));
        assert!(!p.fits(0, p.slots * PAGE + 1));
    }
}
