//! A TLS session as a byte transformer (ciphertext in, plaintext out and back), and its
//! handshake over a socket on the caller's thread. rustls (x509) and OpenSSL (PSK,
//! anonymous) both sit behind [`Engine`], so the server, the client and the established
//! session's stream (`stream.rs`) know neither library.

use crate::transport::Stream;
use std::io::{self, IoSlice, Read, Write};
use std::time::Instant;

/// One TLS session, without I/O of its own.
pub trait Engine: Send {
    /// True until the handshake has completed.
    fn handshaking(&self) -> bool;
    /// Take a prefix of `ciphertext` from the peer (as much as the session can hold before
    /// its plaintext is read) and process it; returns how many bytes it took.
    fn feed_some(&mut self, ciphertext: &[u8]) -> io::Result<usize>;
    /// Move received plaintext into `buf`, straight from the session: `Some(n)` with n > 0,
    /// `Some(0)` once the peer has closed the session (close_notify) and all was read, or
    /// None when there is nothing yet.
    fn read_plain(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>>;
    /// Take all of `ciphertext`; append the plaintext it yields to `plain`. Returns true once
    /// the peer has closed the session.
    fn feed(&mut self, mut ciphertext: &[u8], plain: &mut Vec<u8>) -> io::Result<bool> {
        let mut buf = [0u8; 16 * 1024];
        loop {
            loop {
                match self.read_plain(&mut buf)? {
                    Some(0) => return Ok(true),
                    Some(n) => plain.extend_from_slice(&buf[..n]),
                    None => break,
                }
            }
            if ciphertext.is_empty() {
                return Ok(false);
            }
            let used = self.feed_some(ciphertext)?;
            if used == 0 {
                return Err(stalled());
            }
            ciphertext = &ciphertext[used..];
        }
    }
    /// Encrypt plaintext for the peer.
    fn write_plain(&mut self, data: &[u8]) -> io::Result<()>;
    /// Encrypt the concatenation of `bufs`, filling each record before starting the next, so
    /// a reply's small header shares a record with its data (a record per piece would cost
    /// an AEAD seal and 22 bytes on the wire each; GnuTLS' cork does this for nbdkit).
    fn write_plain_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<()>;
    /// Move ciphertext waiting to go to the peer into `out`.
    fn take_tls(&mut self, out: &mut Vec<u8>);
    /// True when ciphertext waits to go to the peer.
    fn wants_write(&self) -> bool;
    /// Queue close_notify.
    fn close(&mut self);
    /// Who the peer proved to be: the certificate's distinguished name in GnuTLS' form, or
    /// the PSK username. None when the peer did not authenticate.
    fn peer_identity(&self) -> Option<String>;
    /// True once the peer presented a certificate that passed verification (x509 only).
    fn peer_certified(&self) -> bool {
        false
    }
    /// True for the x509 server's handshake, which hands the session to our record layer
    /// (`into_server_handshake`).
    fn hands_over(&self) -> bool {
        false
    }
    /// The x509 server's handshake, which hands the session to our record layer.
    fn into_server_handshake(self: Box<Self>) -> Option<super::rustls_server::ServerHandshake> {
        None
    }
    /// A client's verdict on the server, given once the handshake is over (x509: the
    /// certificate's chain and name, see `x509_client.rs`).
    fn server_verdict(&self) -> io::Result<()> {
        Ok(())
    }
    /// True when a failed handshake ends without an alert: a PSK server that did not know
    /// the client's username closes the connection as GnuTLS (qemu-nbd) does.
    fn quiet_refusal(&self) -> bool {
        false
    }
}

/// GnuTLS' words (qemu's "TLS handshake failed: ...") for a peer that closed the connection
/// during the handshake, and for one that sent a fatal alert.
pub const PREMATURE_END: &str =
    "TLS handshake failed: The TLS connection was non-properly terminated.";
pub const ALERT_RECEIVED: &str = "TLS handshake failed: A TLS fatal alert has been received.";

const CHUNK: usize = 64 * 1024;

/// A session that neither yields plaintext nor takes more input: cannot happen with either
/// library, but a loop must not spin on it.
pub(crate) fn stalled() -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        "the TLS session takes no more input",
    )
}

fn timed_out() -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, "TLS handshake time limit reached")
}

/// Run the handshake on `sock` (blocking, bounded by `deadline`). Returns plaintext that
/// arrived together with the handshake's last flight.
pub fn handshake(
    engine: &mut dyn Engine,
    sock: &mut Stream,
    deadline: Option<Instant>,
) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut plain = Vec::new();
    let mut buf = vec![0u8; CHUNK];
    loop {
        engine.take_tls(&mut out);
        if !out.is_empty() {
            if let Some(d) = deadline {
                let left = d.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(timed_out());
                }
                sock.set_write_timeout(Some(left))?;
            }
            sock.write_all(&out).map_err(|e| match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => timed_out(),
                _ => e,
            })?;
            out.clear();
        }
        if !engine.handshaking() {
            return Ok(plain);
        }
        if let Some(d) = deadline {
            let left = d.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(timed_out());
            }
            sock.set_read_timeout(Some(left))?;
        }
        let n = match sock.read(&mut buf) {
            Ok(0) => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, PREMATURE_END)),
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(timed_out())
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if let Err(e) = engine.feed(&buf[..n], &mut plain) {
            // Tell the peer why (an alert), then give up.
            if !engine.quiet_refusal() {
                engine.take_tls(&mut out);
                let _ = sock.write_all(&out);
            }
            return Err(e);
        }
    }
}
