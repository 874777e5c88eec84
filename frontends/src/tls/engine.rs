//! A TLS session as a byte transformer (ciphertext in, plaintext out and back), and the
//! code that runs one over a socket: the handshake on the caller's thread, then two pump
//! threads that give the NBD code a plain socket. rustls (x509) and OpenSSL (PSK) both sit
//! behind [`Engine`], so the server, the client and the pump know neither library.
//!
//! Why a pump and not a TLS stream type: NBD workers share one connection through cloned
//! socket handles (a read lock and a write lock, see the transmission phase). A TLS session
//! is one state machine; the pump gives each direction its own thread and keeps the
//! session's lock only while it transforms bytes, never while it waits on the network.

use crate::transport::{Stream, TlsStream};
use parking_lot::Mutex;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Instant;

/// One TLS session, without I/O of its own.
pub trait Engine: Send {
    /// True until the handshake has completed.
    fn handshaking(&self) -> bool;
    /// Take ciphertext from the peer; append any plaintext it yields to `plain`. Returns true
    /// once the peer has closed the session (close_notify).
    fn feed(&mut self, ciphertext: &[u8], plain: &mut Vec<u8>) -> io::Result<bool>;
    /// Encrypt plaintext for the peer.
    fn write_plain(&mut self, data: &[u8]) -> io::Result<()>;
    /// Move ciphertext waiting to go to the peer into `out`.
    fn take_tls(&mut self, out: &mut Vec<u8>);
    /// Queue close_notify.
    fn close(&mut self);
    /// Who the peer proved to be: the certificate's distinguished name in GnuTLS' form, or
    /// the PSK username. None when the peer did not authenticate.
    fn peer_identity(&self) -> Option<String>;
    /// True once the peer presented a certificate that passed verification (x509 only).
    fn peer_certified(&self) -> bool {
        false
    }
}

const CHUNK: usize = 64 * 1024;

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
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the peer closed the connection during the TLS handshake",
                ))
            }
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
            engine.take_tls(&mut out);
            let _ = sock.write_all(&out);
            return Err(e);
        }
    }
}

struct Shared {
    engine: Mutex<Box<dyn Engine>>,
    /// Held from taking ciphertext out of the engine until it is on the wire, so records
    /// leave in the order the engine made them.
    net_write: Mutex<Stream>,
}

impl Shared {
    /// Send what the engine has queued; `engine` is the caller's guard, released before the
    /// network write so the other direction can go on meanwhile.
    /// `out` is the caller's scratch buffer, reused so a pump allocates nothing per record.
    fn flush(
        &self,
        mut engine: parking_lot::MutexGuard<'_, Box<dyn Engine>>,
        out: &mut Vec<u8>,
    ) -> io::Result<()> {
        out.clear();
        engine.take_tls(out);
        if out.is_empty() {
            return Ok(());
        }
        let mut w = self.net_write.lock();
        drop(engine);
        w.write_all(out)
    }
}

/// Wrap an established session: returns a stream the NBD code reads and writes in plaintext.
pub fn into_stream(
    engine: Box<dyn Engine>,
    net: Stream,
    early_plain: Vec<u8>,
    identity: Option<String>,
) -> io::Result<Stream> {
    net.set_read_timeout(None)?;
    let (user, pump) = UnixStream::pair()?;
    let shared = Arc::new(Shared {
        engine: Mutex::new(engine),
        net_write: Mutex::new(net.try_clone()?),
    });
    let peer = net.peer();

    let mut net_rd = net.try_clone()?;
    let mut plain_wr = pump.try_clone()?;
    let s = shared.clone();
    let net_ctl = net.try_clone()?;
    std::thread::Builder::new()
        .name("tls-in".into())
        .spawn(move || {
            if let Err(e) = pump_in(&s, &mut net_rd, &mut plain_wr, early_plain) {
                tracing::debug!("TLS receive side ended: {e}");
                net_ctl.shutdown();
            }
            let _ = plain_wr.shutdown(std::net::Shutdown::Write);
        })?;

    let mut plain_rd = pump;
    let s = shared;
    let net_ctl = net.try_clone()?;
    std::thread::Builder::new()
        .name("tls-out".into())
        .spawn(move || {
            if let Err(e) = pump_out(&s, &mut plain_rd) {
                tracing::debug!("TLS send side ended: {e}");
            }
            // Our side is done: say so in TLS, then stop both directions on the wire (the
            // peer's own close ends the receive pump).
            let mut eng = s.engine.lock();
            eng.close();
            let _ = s.flush(eng, &mut Vec::new());
            net_ctl.shutdown();
            let _ = plain_rd.shutdown(std::net::Shutdown::Both);
        })?;

    Ok(Stream::Tls(Box::new(TlsStream::new(
        user, net, peer, identity,
    ))))
}

fn pump_in(
    s: &Shared,
    net: &mut Stream,
    plain_out: &mut UnixStream,
    early: Vec<u8>,
) -> io::Result<()> {
    if !early.is_empty() {
        plain_out.write_all(&early)?;
    }
    let mut buf = vec![0u8; CHUNK];
    let mut plain = Vec::with_capacity(CHUNK);
    let mut out = Vec::new();
    loop {
        let n = match net.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        plain.clear();
        let mut eng = s.engine.lock();
        let fed = eng.feed(&buf[..n], &mut plain);
        s.flush(eng, &mut out)?;
        let closed = fed?;
        if !plain.is_empty() {
            plain_out.write_all(&plain)?;
        }
        if closed {
            return Ok(());
        }
    }
}

fn pump_out(s: &Shared, plain_in: &mut UnixStream) -> io::Result<()> {
    let mut buf = vec![0u8; CHUNK];
    let mut out = Vec::with_capacity(CHUNK + 1024);
    loop {
        let n = match plain_in.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        let mut eng = s.engine.lock();
        eng.write_plain(&buf[..n])?;
        s.flush(eng, &mut out)?;
    }
}
