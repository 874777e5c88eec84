//! An established TLS session used in line by the threads that read and write a connection:
//! no pump thread and no socketpair between the NBD code and the network, so a request costs
//! no extra thread hand-off (the pump this replaced cost four context switches a request).
//!
//! The NBD code shares one connection between threads through cloned handles: one thread
//! reads at a time (the connection's read lock) while another writes a reply. A TLS session
//! is one state machine for both directions, so the handles share it under three locks:
//!
//! - `rx`: the receive side (the network handle reads go through, ciphertext read but not
//!   yet given to the session). Held by the reading thread across its blocking network read.
//!   Plaintext is read from the session straight into the caller's buffer.
//! - `tx`: the send side. Every network write happens under it, and every `take_tls` too,
//!   so records leave in the order the session made them.
//! - `engine`: the session itself, held only while bytes are transformed, never across a
//!   network read or write. It is a TLS library's engine, or, for x509 servers, our own
//!   record layer over rustls' keys (`records.rs`), which opens records in place in `rx`'s
//!   buffer and seals them straight into `tx`'s. With kernel TLS (`ktls.rs`) the socket
//!   itself carries plaintext: `engine` holds only the key schedule, taken when a record
//!   that is not data arrives or a send key must be renewed.
//!
//! Order: `rx` before `engine`; `tx` before `engine`; `rx` before `tx` (a reader that must
//! answer, such as an alert after a bad record, drops `engine` first and takes `tx`, then
//! `engine` again). Nobody waits on the network while holding `engine`, so a reply blocked
//! on a full socket never stops the reader from decrypting the next request, which is what
//! keeps a client that sends before it reads from deadlocking against us.

use super::engine::Engine;
use super::ktls::{self, Control, KernelTls};
use super::records::{Batches, Opened, Records, HEADER, MAX_BODY};
use crate::sync::Mutex;
use crate::transport::Stream;
use std::io::{self, IoSlice, Read, Write};
use std::os::fd::BorrowedFd;
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Ciphertext read from the network in one call; also the plaintext encrypted at a time, so
/// the reader can take the session between the pieces of a large reply.
const CHUNK: usize = 64 * 1024;

/// Pieces encrypted in one call; a reply has two or three.
const BATCH_SLOTS: usize = 8;

/// The receive buffer of a session on our record layer: records are opened in it, and a
/// partial record is moved to its front before the next read, so a large buffer moves less.
const RECORDS_RX: usize = 128 * 1024;

/// An established session: a TLS library's, or our record layer over rustls' keys.
pub struct Session {
    kind: Kind,
    /// Ciphertext that arrived with the handshake and is not opened yet.
    cipher: Vec<u8>,
    /// Plaintext that arrived with the handshake, delivered first.
    plain: Vec<u8>,
}

enum Kind {
    Engine(Box<dyn Engine>),
    Records(Box<Records>),
    /// The kernel seals and opens the records (`ktls.rs`); this keeps the key schedule.
    Kernel(Box<KernelTls>),
}

impl Session {
    pub fn engine(engine: Box<dyn Engine>, early_plain: Vec<u8>) -> Session {
        Session {
            kind: Kind::Engine(engine),
            cipher: Vec::new(),
            plain: early_plain,
        }
    }

    pub fn records(records: Records, cipher: Vec<u8>, plain: Vec<u8>) -> Session {
        Session {
            kind: Kind::Records(Box::new(records)),
            cipher,
            plain,
        }
    }

    pub fn kernel(tls: KernelTls, plain: Vec<u8>) -> Session {
        Session {
            kind: Kind::Kernel(Box::new(tls)),
            cipher: Vec::new(),
            plain,
        }
    }
}

impl Kind {
    /// Move what waits to go to the peer into `out`.
    fn take_out(&mut self, out: &mut Vec<u8>) {
        match self {
            Kind::Engine(e) => e.take_tls(out),
            Kind::Records(r) => r.take_pending(out),
            Kind::Kernel(_) => {}
        }
    }

    fn close(&mut self) {
        match self {
            Kind::Engine(e) => e.close(),
            Kind::Records(r) => r.close(),
            Kind::Kernel(_) => {}
        }
    }

    /// Encrypt `bufs` onto `out`, after anything already waiting to go.
    fn seal(&mut self, bufs: &[IoSlice<'_>], out: &mut Vec<u8>) -> io::Result<()> {
        match self {
            Kind::Engine(e) => {
                e.write_plain_vectored(bufs)?;
                e.take_tls(out);
                Ok(())
            }
            Kind::Records(r) => {
                r.take_pending(out);
                r.seal(bufs, out)
            }
            Kind::Kernel(_) => Err(super::engine::stalled()),
        }
    }
}

/// A handle on a TLS session over a socket; clones share the session.
pub struct TlsStream {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for TlsStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsStream")
            .field("peer", &self.shared.peer)
            .finish_non_exhaustive()
    }
}

struct Shared {
    engine: Mutex<Kind>,
    /// Who opens and seals the records: a library, our record layer, or the kernel.
    mode: Mode,
    rx: Mutex<Rx>,
    tx: Mutex<Tx>,
    /// The socket, for options, shutdown and the peer's name.
    net: Stream,
    peer: String,
    identity: Option<String>,
    /// Set once we closed (politely or not): nothing more is sent.
    closed: AtomicBool,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Engine,
    Records,
    Kernel,
}

struct Rx {
    net: Stream,
    /// Ciphertext read from the network; `cipher[cpos..clen]` not yet given to the session.
    cipher: Vec<u8>,
    cpos: usize,
    clen: usize,
    /// Record layer only: opened plaintext waiting in `cipher[ppos..pend]`.
    ppos: usize,
    pend: usize,
    /// What arrived with the handshake's last flight, delivered first.
    early: Vec<u8>,
    eof: bool,
}

struct Tx {
    net: Stream,
    out: Vec<u8>,
}

/// Wrap an established session: returns a stream the NBD code reads and writes in plaintext.
pub fn into_stream(session: Session, net: Stream, identity: Option<String>) -> io::Result<Stream> {
    net.set_read_timeout(None)?;
    let mode = match session.kind {
        Kind::Engine(_) => Mode::Engine,
        Kind::Records(_) => Mode::Records,
        Kind::Kernel(_) => Mode::Kernel,
    };
    let size = match mode {
        Mode::Records => RECORDS_RX.max(session.cipher.len()).max(HEADER + MAX_BODY),
        Mode::Engine => CHUNK,
        Mode::Kernel => session.cipher.len(),
    };
    let mut cipher = vec![0; size];
    let clen = session.cipher.len();
    cipher[..clen].copy_from_slice(&session.cipher);
    let shared = Shared {
        engine: Mutex::new(session.kind),
        mode,
        rx: Mutex::new(Rx {
            net: net.try_clone()?,
            cipher,
            cpos: 0,
            clen,
            ppos: 0,
            pend: 0,
            early: session.plain,
            eof: false,
        }),
        tx: Mutex::new(Tx {
            net: net.try_clone()?,
            out: Vec::with_capacity(CHUNK + 1024),
        }),
        peer: net.peer(),
        net,
        identity,
        closed: AtomicBool::new(false),
    };
    Ok(Stream::Tls(Box::new(TlsStream {
        shared: Arc::new(shared),
    })))
}

impl TlsStream {
    /// The distinguished name or PSK username the peer authenticated with.
    pub fn identity(&self) -> Option<&str> {
        self.shared.identity.as_deref()
    }

    pub fn peer(&self) -> String {
        self.shared.peer.clone()
    }

    pub fn try_clone(&self) -> io::Result<TlsStream> {
        Ok(TlsStream {
            shared: self.shared.clone(),
        })
    }

    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.shared.net.set_read_timeout(t)
    }

    pub fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.shared.net.set_write_timeout(t)
    }

    pub fn set_nodelay(&self) {
        self.shared.net.set_nodelay()
    }

    pub fn raw_fd(&self) -> std::os::unix::io::RawFd {
        self.shared.net.as_raw_fd()
    }

    /// True when a read would find input without waiting for the network: plaintext or
    /// ciphertext already read, or bytes on the socket. False while another thread reads.
    pub fn input_waiting(&self) -> bool {
        let Some(rx) = self.shared.rx.try_lock() else {
            return false;
        };
        !rx.early.is_empty()
            || rx.ppos < rx.pend
            || rx.cpos < rx.clen
            || crate::transport::socket_readable(rx.net.as_raw_fd())
    }

    /// True when the kernel seals the records: data may be spliced to the socket.
    pub fn in_kernel(&self) -> bool {
        self.shared.mode == Mode::Kernel
    }

    /// Kernel TLS: run `send`, which puts `len` bytes of data on the socket itself (splice),
    /// with the send side held and the send key renewed first if it must be. None on a
    /// session the kernel does not seal.
    pub fn splice_out<R>(
        &self,
        len: usize,
        send: impl FnOnce(BorrowedFd<'_>) -> io::Result<R>,
    ) -> Option<io::Result<R>> {
        if !self.in_kernel() {
            return None;
        }
        let shared = &*self.shared;
        let mut tx = shared.tx.lock();
        Some(shared.before_kernel_send(&mut tx, len).and_then(|()| {
            let fd = tx.net.plain_fd().ok_or_else(super::engine::stalled)?;
            send(fd)
        }))
    }

    /// Close politely: close_notify if the send side is free (never waiting on the peer),
    /// then both directions of the socket, which wakes a thread blocked reading.
    pub fn shutdown(&self) {
        self.shared.close_notify();
        self.shared.net.shutdown();
    }

    /// Drop the connection at once, without close_notify (after a failed handshake).
    pub fn abort(&self) {
        self.shared.closed.store(true, Ordering::SeqCst);
        self.shared.net.shutdown();
    }
}

impl Shared {
    /// Queue close_notify and send it without blocking, unless a writer is busy or we
    /// already closed.
    fn close_notify(&self) {
        if self.closed.swap(true, Ordering::SeqCst) {
            return;
        }
        let Some(mut tx) = self.tx.try_lock() else {
            return;
        };
        let Tx { net, out } = &mut *tx;
        if self.mode == Mode::Kernel {
            KernelTls::close_notify(net.as_raw_fd());
            return;
        }
        out.clear();
        {
            let mut kind = self.engine.lock();
            kind.close();
            kind.take_out(out);
        }
        send_nowait(net, out);
    }

    /// Send whatever the session has queued (answers the reader's input produced).
    fn send_queued(&self) -> io::Result<()> {
        let mut tx = self.tx.lock();
        let Tx { net, out } = &mut *tx;
        out.clear();
        self.engine.lock().take_out(out);
        if out.is_empty() || self.closed.load(Ordering::SeqCst) {
            return Ok(());
        }
        net.write_all(out)
    }

    /// Read plaintext into `buf`: from the session if it has some, else by giving it the
    /// ciphertext already read, else by reading the network (without the session's lock).
    fn read_plain(&self, rx: &mut Rx, buf: &mut [u8]) -> io::Result<usize> {
        match self.mode {
            Mode::Records => return self.read_records(rx, buf),
            Mode::Kernel => return self.read_kernel(rx, buf),
            Mode::Engine => {}
        }
        let mut n = 0;
        loop {
            let mut kind = self.engine.lock();
            let Kind::Engine(eng) = &mut *kind else {
                return Err(super::engine::stalled());
            };
            match eng.read_plain(&mut buf[n..]) {
                Ok(Some(0)) if n > 0 => return Ok(n),
                Ok(Some(0)) => return Ok(0),
                Ok(Some(k)) => {
                    n += k;
                    if n == buf.len() {
                        return Ok(n);
                    }
                    continue;
                }
                Ok(None) => {}
                Err(e) => return Err(self.broken(rx, e)),
            }
            if rx.cpos < rx.clen {
                let fed = eng.feed_some(&rx.cipher[rx.cpos..rx.clen]);
                let answer = eng.wants_write();
                drop(kind);
                if answer {
                    self.send_queued()?;
                }
                match fed {
                    Ok(0) => return Err(self.broken(rx, super::engine::stalled())),
                    Ok(k) => rx.cpos += k,
                    Err(e) => return Err(self.broken(rx, e)),
                }
                continue;
            }
            drop(kind);
            // Never wait on the network with plaintext in hand.
            if n > 0 {
                return Ok(n);
            }
            if rx.eof {
                return Ok(0);
            }
            match rx.net.read(&mut rx.cipher) {
                Ok(0) => rx.eof = true,
                Ok(k) => (rx.cpos, rx.clen) = (0, k),
                Err(e) => return Err(e),
            }
        }
    }

    /// Read plaintext on our record layer: records are opened in place in `rx.cipher` and
    /// copied once, into `buf`; every whole record already read is opened into it, so the
    /// caller sees every request that arrived together.
    fn read_records(&self, rx: &mut Rx, buf: &mut [u8]) -> io::Result<usize> {
        let mut n = 0;
        loop {
            if rx.ppos < rx.pend {
                let k = (buf.len() - n).min(rx.pend - rx.ppos);
                buf[n..n + k].copy_from_slice(&rx.cipher[rx.ppos..rx.ppos + k]);
                rx.ppos += k;
                n += k;
                if n == buf.len() {
                    return Ok(n);
                }
                continue;
            }
            if rx.cpos < rx.clen {
                let mut kind = self.engine.lock();
                let Kind::Records(r) = &mut *kind else {
                    return Err(super::engine::stalled());
                };
                let opened = r.open(&mut rx.cipher[rx.cpos..rx.clen]);
                let answer = r.wants_write();
                drop(kind);
                if answer {
                    // An alert for a refused record, or our KeyUpdate.
                    self.send_queued()?;
                }
                match opened {
                    Ok(Opened::Data { used, range }) => {
                        (rx.ppos, rx.pend) = (rx.cpos + range.start, rx.cpos + range.end);
                        rx.cpos += used;
                        continue;
                    }
                    Ok(Opened::Nothing { used }) => {
                        rx.cpos += used;
                        continue;
                    }
                    Ok(Opened::Closed) => {
                        rx.eof = true;
                        rx.cpos = rx.clen;
                        return Ok(n);
                    }
                    Ok(Opened::Incomplete) => {}
                    // What was copied already goes with the session: it is broken.
                    Err(e) => return Err(self.broken(rx, e)),
                }
            }
            // Never wait on the network with plaintext in hand: the caller may be able to
            // act on it (and batch the replies of every whole request it holds).
            if n > 0 {
                return Ok(n);
            }
            if rx.eof {
                return Ok(0);
            }
            // Only a partial record is left: move it to the front and read more.
            rx.cipher.copy_within(rx.cpos..rx.clen, 0);
            rx.clen -= rx.cpos;
            (rx.cpos, rx.ppos, rx.pend) = (0, 0, 0);
            match rx.net.read(&mut rx.cipher[rx.clen..]) {
                Ok(0) => rx.eof = true,
                Ok(k) => rx.clen += k,
                Err(e) => return Err(e),
            }
        }
    }

    /// Read plaintext from a kernel TLS socket, acting on the records that are not data.
    fn read_kernel(&self, rx: &mut Rx, buf: &mut [u8]) -> io::Result<usize> {
        let fd = rx.net.as_raw_fd();
        loop {
            if rx.eof {
                return Ok(0);
            }
            let (n, typ) = ktls::recv(fd, buf)?;
            if typ == ktls::APPLICATION_DATA {
                rx.eof = n == 0;
                return Ok(n);
            }
            let control = match &mut *self.engine.lock() {
                Kind::Kernel(k) => k.control(fd, typ, &buf[..n]),
                _ => Err(super::engine::stalled()),
            };
            match control {
                Ok(Control::Handled) => {}
                Ok(Control::Closed) => rx.eof = true,
                Ok(Control::RenewSendKey) => {
                    if let Err(e) = self.renew_send_key(&mut self.tx.lock(), false) {
                        return Err(self.broken(rx, e));
                    }
                }
                Err(e) => return Err(self.broken(rx, e)),
            }
        }
    }

    /// Kernel TLS: our KeyUpdate under the old send key, then the new key, with the send
    /// side held so no data record goes between them.
    fn renew_send_key(&self, tx: &mut Tx, request: bool) -> io::Result<()> {
        let fd = tx.net.as_raw_fd();
        ktls::send_key_update(fd, request)?;
        match &mut *self.engine.lock() {
            Kind::Kernel(k) => k.next_send_key(fd),
            _ => Err(super::engine::stalled()),
        }
    }

    /// Kernel TLS: the kernel seals what is written to the socket.
    fn send_kernel(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let mut tx = self.tx.lock();
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        self.before_kernel_send(&mut tx, total)?;
        tx.net.write_vectored(bufs)
    }

    /// Kernel TLS, before `len` bytes of data go out: refuse after close, and renew the send
    /// key when its records may reach the limit.
    fn before_kernel_send(&self, tx: &mut Tx, len: usize) -> io::Result<()> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(io::ErrorKind::BrokenPipe.into());
        }
        let renew = match &mut *self.engine.lock() {
            Kind::Kernel(k) => k.before_send(tx.net.as_raw_fd(), len),
            _ => return Err(super::engine::stalled()),
        };
        if renew {
            self.renew_send_key(tx, true)?;
        }
        Ok(())
    }

    /// The session is broken: nothing more can be read or sent in it.
    fn broken(&self, rx: &mut Rx, e: io::Error) -> io::Error {
        rx.eof = true;
        rx.cpos = rx.clen;
        self.closed.store(true, Ordering::SeqCst);
        self.net.shutdown();
        e
    }

    /// Encrypt and send `bufs`, at most [`CHUNK`] bytes at a time so the session is free
    /// for the reader between the pieces of a large reply.
    fn send(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        if self.mode == Mode::Kernel {
            return self.send_kernel(bufs);
        }
        let mut tx = self.tx.lock();
        if self.closed.load(Ordering::SeqCst) {
            return Err(io::ErrorKind::BrokenPipe.into());
        }
        let Tx { net, out } = &mut *tx;
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        // Batches of CHUNK bytes across the pieces, so the session is free for the reader
        // between them.
        let mut batches = Batches::new(bufs);
        let mut batch = [IoSlice::new(&[]); BATCH_SLOTS];
        loop {
            let (used, _) = batches.next(CHUNK, &mut batch);
            if used == 0 {
                return Ok(total);
            }
            out.clear();
            self.engine.lock().seal(&batch[..used], out)?;
            net.write_all(out)?;
        }
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        self.close_notify();
        self.net.shutdown();
    }
}

/// One best-effort send that never blocks: close_notify must not wait on a peer that has
/// stopped reading.
fn send_nowait(net: &Stream, data: &[u8]) {
    if data.is_empty() {
        return;
    }
    // SAFETY: send(2) on an open socket with a valid buffer and its length.
    unsafe {
        libc::send(
            net.as_raw_fd(),
            data.as_ptr().cast(),
            data.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
}

impl Read for TlsStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let mut rx = self.shared.rx.lock();
        if !rx.early.is_empty() {
            let n = buf.len().min(rx.early.len());
            buf[..n].copy_from_slice(&rx.early[..n]);
            rx.early.drain(..n);
            return Ok(n);
        }
        self.shared.read_plain(&mut rx, buf)
    }
}

impl Write for TlsStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.shared.send(&[IoSlice::new(buf)])
    }
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        self.shared.send(bufs)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
