//! The byte streams frontends speak NBD over: TCP and Unix sockets, and TLS on either (a
//! session used in line by the connection's threads, see `tls::stream`).

pub use crate::tls::stream::TlsStream;
use std::io::{self, IoSlice, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

#[derive(Debug)]
pub enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
    Tls(Box<TlsStream>),
}

impl Stream {
    pub fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
            Stream::Tls(s) => Stream::Tls(Box::new(s.try_clone()?)),
        })
    }

    pub fn is_tls(&self) -> bool {
        matches!(self, Stream::Tls(_))
    }

    /// A plain TCP connection whose peer is this host (loopback, or our own address).
    pub fn is_local_tcp(&self) -> bool {
        let Stream::Tcp(s) = self else {
            return false;
        };
        match (s.peer_addr(), s.local_addr()) {
            (Ok(peer), Ok(local)) => {
                let ip = peer.ip().to_canonical();
                ip.is_loopback() || ip == local.ip().to_canonical()
            }
            _ => false,
        }
    }

    pub fn shutdown(&self) {
        let _ = match self {
            Stream::Tcp(s) => s.shutdown(Shutdown::Both),
            Stream::Unix(s) => s.shutdown(Shutdown::Both),
            Stream::Tls(s) => {
                s.shutdown();
                Ok(())
            }
        };
    }

    /// Drop the connection at once, without a polite TLS close (which could wait on a peer
    /// that does not read): after a failed handshake.
    pub fn abort(&self) {
        match self {
            Stream::Tls(s) => s.abort(),
            _ => self.shutdown(),
        }
    }

    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_read_timeout(t),
            Stream::Unix(s) => s.set_read_timeout(t),
            Stream::Tls(s) => s.set_read_timeout(t),
        }
    }

    pub fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_write_timeout(t),
            Stream::Unix(s) => s.set_write_timeout(t),
            Stream::Tls(s) => s.set_write_timeout(t),
        }
    }

    /// Latency matters more than packet count for small replies.
    pub fn set_nodelay(&self) {
        match self {
            Stream::Tcp(s) => {
                let _ = s.set_nodelay(true);
            }
            Stream::Tls(s) => s.set_nodelay(),
            Stream::Unix(_) => {}
        }
    }

    /// The socket of a plain (not TLS) stream, which splice(2) can send to.
    pub fn plain_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        use std::os::fd::AsFd;
        match self {
            Stream::Tcp(s) => Some(s.as_fd()),
            Stream::Unix(s) => Some(s.as_fd()),
            Stream::Tls(_) => None,
        }
    }

    /// True when replies may be spliced to the socket: a plain one, or one whose records
    /// the kernel seals (see [`Stream::splice_out`]).
    pub fn can_splice_out(&self) -> bool {
        match self {
            Stream::Tcp(_) | Stream::Unix(_) => true,
            Stream::Tls(s) => s.in_kernel(),
        }
    }

    /// Run `send`, which puts `len` bytes of data on the socket itself (splice(2)), as the
    /// stream needs it done: at once on a plain socket, under the TLS session's send side
    /// with kernel TLS. None when the stream cannot take data that way.
    pub fn splice_out<R>(
        &self,
        len: usize,
        send: impl FnOnce(std::os::fd::BorrowedFd<'_>) -> io::Result<R>,
    ) -> Option<io::Result<R>> {
        match self {
            Stream::Tls(s) => s.splice_out(len, send),
            _ => self.plain_fd().map(send),
        }
    }

    /// True when input has arrived that a read would take without waiting (buffered
    /// plaintext or ciphertext of a TLS session, or bytes on the socket).
    pub fn input_waiting(&self) -> bool {
        match self {
            Stream::Tls(s) => s.input_waiting(),
            _ => socket_readable(self.as_raw_fd()),
        }
    }

    pub fn peer(&self) -> String {
        match self {
            Stream::Tcp(s) => s
                .peer_addr()
                .map(|a| a.to_string())
                .unwrap_or_else(|_| "?".into()),
            Stream::Unix(_) => "unix".into(),
            Stream::Tls(s) => s.peer(),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
            Stream::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
            Stream::Tls(s) => s.write(buf),
        }
    }
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write_vectored(bufs),
            Stream::Unix(s) => s.write_vectored(bufs),
            Stream::Tls(s) => s.write_vectored(bufs),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl AsRawFd for Stream {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Stream::Tcp(s) => s.as_raw_fd(),
            Stream::Unix(s) => s.as_raw_fd(),
            Stream::Tls(s) => s.raw_fd(),
        }
    }
}

/// Whether `fd` has input now (poll without waiting).
pub fn socket_readable(fd: RawFd) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: poll on one valid pollfd, without waiting.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    n > 0 && p.revents & libc::POLLIN != 0
}

/// Write every byte of `bufs`, in as few system calls as the kernel allows.
pub fn write_all_vectored(w: &mut impl Write, mut bufs: &mut [IoSlice<'_>]) -> io::Result<()> {
    IoSlice::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        match w.write_vectored(bufs) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
