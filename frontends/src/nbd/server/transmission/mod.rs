//! The transmission phase. Worker threads share one connection in nbdkit's style: a worker
//! takes the read lock, reads one request with its payload, lets go, serves it straight from
//! the backend, and writes the whole reply with one `writev` under the write lock, or hands
//! it to the worker already writing (see `write_reply`). Requests are served concurrently
//! and replied to out of order; no lock is held across backend I/O.
//! Workers are spawned lazily, when a request is served the usual way and no worker waits to
//! read: a client whose requests are all served inline costs one thread. Before the reader
//! sleeps on an empty socket it may spin on it for a few microseconds (`busy_poll.rs`): a
//! client with one request in flight sends the next before a sleeping thread could wake.
//!
//! Inline: the worker holding the read lock serves a small read or write itself, without
//! letting the lock go, when the backend can do it without waiting for a device
//! (`Device::try_read`: the bytes are in the page cache; `Device::try_write`: whole pages
//! into the page cache, no FUA; a write that waited all the same stops inline writes for a
//! second). Its reply joins a batch that is sent when no further whole request is buffered
//! (before the worker could wait on the socket; over TLS, unless more input has already
//! arrived: see `keep_batching`), when it grows past `BATCH_MAX`, before the
//! worker serves a request the usual way, and before it leaves on a disconnect or an error.
//! So a stream of cached requests costs no hand-over between threads (two context switches
//! a request otherwise) and one `send` for many replies; a request that may wait goes the
//! usual way and the next worker takes over the reading. A reply is sent only after its
//! request completed, so a write's acknowledgement still follows the write.
//!
//! Spliced payloads: a large write without FUA that the backend takes byte for byte into a
//! host file (`Device::write_sink`) has its payload moved from a plain socket into the
//! worker's pipe while the read lock is held (what the read buffer already holds is copied in
//! first), then from the pipe into the file, in one splice, when it is served (see
//! `splice.rs`).
//! The next header is then read alone, so the read buffer does not take the start of a next
//! payload. A payload that does not fit in the pipe is copied, and so are that connection's
//! later ones.
//!
//! This file holds the threads, locks and socket I/O; `commands.rs` serves each request and
//! builds its reply, `status.rs` turns extents into BLOCK_STATUS runs, `splice.rs` moves
//! large reads from the page cache to a plain socket and large write payloads from it to
//! the page cache without copying them through memory of ours.

mod busy_poll;
mod commands;
mod splice;
mod status;

use super::export::Export;
use super::handshake::Negotiated;
use super::validate::{self, Payload};
use crate::nbd::proto::*;
use crate::nbd::wire::{self, Request};
use crate::stats::Op;
use crate::sync::Mutex;
use crate::transport::{write_all_vectored, Stream};
use backends::Extents;
use std::io::{self, BufReader, IoSlice, Read, Write};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::thread::Scope;
use std::time::Instant;

const READ_BUFFER: usize = 256 * 1024;

struct Conn<'a> {
    pub(super) export: &'a Export,
    pub(super) neg: Negotiated,
    reader: Mutex<BufReader<Stream>>,
    writer: Mutex<Stream>,
    outbox: Mutex<Outbox>,
    /// A handle used only to shut the socket down from any thread.
    control: Stream,
    /// When payloads are spliced into the page cache: [`splice_writes_pay`].
    splice_writes: Splice,
    /// When read replies are spliced out of it: [`splice_reads_pay`].
    splice_reads: Splice,
    /// TLS: inline replies wait in their batch while more of the client's input has
    /// arrived (see `keep_batching`).
    batch_while_input: bool,
    /// `keep_batching` found no input this many times in a row (or skipped looking).
    batch_misses: AtomicU32,
    /// When the connection began, and until when (ns after it) writes are not served
    /// inline: one of them waited (see `try_inline_write`).
    started: Instant,
    inline_writes_paused_until: AtomicU64,
    /// The last request read had its payload spliced: the next header is read alone, so
    /// the read buffer does not take (and copy) the start of a next large payload.
    /// Touched only under the read lock.
    header_alone: AtomicBool,
    /// How long the reader spins on an empty socket before it sleeps (`busy_poll.rs`).
    poll: busy_poll::BusyPoll,
    /// A write's payload did not fit in a pipe (the socket's buffers hold small pieces of
    /// pages, as a real network card's may): this connection's payloads are copied.
    no_write_splice: AtomicBool,
    closing: AtomicBool,
    /// Workers waiting for the read lock.
    idle: AtomicUsize,
    threads: AtomicUsize,
    max_threads: usize,
    /// The connection's span, entered by every worker thread.
    span: tracing::Span,
}

/// A buffer that only grows, so a worker alternating small and large requests zero-fills
/// memory once, not on every growth.
#[derive(Default)]
struct GrowBuf {
    v: Vec<u8>,
    len: usize,
}

impl GrowBuf {
    pub(super) fn set_len(&mut self, n: usize) {
        if self.v.len() < n {
            self.v.resize(n, 0);
        }
        self.len = n;
    }
}

impl std::ops::Deref for GrowBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.v[..self.len]
    }
}

impl std::ops::DerefMut for GrowBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.v[..self.len]
    }
}

/// Per-worker scratch space, reused across requests.
#[derive(Default)]
struct Scratch {
    pub(super) data: GrowBuf,
    pub(super) hdr: Vec<u8>,
    pub(super) extents: Extents,
    /// For spliced read replies, made by the first one.
    pub(super) pipe: PipeSlot,
    /// Replies of requests served inline, not sent yet.
    pub(super) batch: Vec<u8>,
    /// Bytes of the current write's payload that wait in `pipe` after those in `data` (see
    /// `read_payload`); 0 when the payload is all in `data`.
    pub(super) piped: usize,
}

/// How long writes are not served inline after one of them waited.
const INLINE_WRITE_PAUSE: std::time::Duration = std::time::Duration::from_secs(1);

/// Replies of inline requests are sent once they reach this many bytes.
const BATCH_MAX: usize = 128 * 1024;
/// `keep_batching` looks at the socket every time until this many misses in a row, then
/// once every `PROBE_EVERY` times until it finds input again.
const PROBE_AFTER_MISSES: u32 = 8;
const PROBE_EVERY: u32 = 64;

#[derive(Default)]
enum PipeSlot {
    #[default]
    Unmade,
    Made(splice::ReplyPipe),
    /// The system refused a pipe: reads are copied.
    Refused,
}

impl PipeSlot {
    pub(super) fn get(&mut self) -> Option<&mut splice::ReplyPipe> {
        if let PipeSlot::Unmade = self {
            *self = match splice::ReplyPipe::new() {
                Ok(p) => PipeSlot::Made(p),
                Err(e) => {
                    tracing::debug!("no pipe for spliced reads: {e}");
                    PipeSlot::Refused
                }
            };
        }
        match self {
            PipeSlot::Made(p) => Some(p),
            _ => None,
        }
    }
}

/// Serve requests on `stream` until the client disconnects or breaks the protocol.
pub fn serve(
    stream: Stream,
    export: &Export,
    neg: Negotiated,
    max_threads: usize,
) -> io::Result<()> {
    stream.set_read_timeout(None)?;
    stream.set_write_timeout(None)?;
    stream.set_nodelay();
    let conn = Conn {
        export,
        neg,
        reader: Mutex::new(BufReader::with_capacity(READ_BUFFER, stream.try_clone()?)),
        writer: Mutex::new(stream.try_clone()?),
        outbox: Mutex::new(Outbox::default()),
        splice_writes: splice_writes_pay(&stream),
        splice_reads: splice_reads_pay(&stream),
        batch_while_input: stream.is_tls(),
        batch_misses: AtomicU32::new(0),
        started: Instant::now(),
        inline_writes_paused_until: AtomicU64::new(0),
        header_alone: AtomicBool::new(false),
        no_write_splice: AtomicBool::new(false),
        poll: Default::default(),
        control: stream,
        closing: AtomicBool::new(false),
        idle: AtomicUsize::new(0),
        threads: AtomicUsize::new(1),
        max_threads: max_threads.max(1),
        span: tracing::Span::current(),
    };
    export.transmitting.fetch_add(1, Ordering::Relaxed);
    std::thread::scope(|s| conn.worker(s));
    export.transmitting.fetch_sub(1, Ordering::Relaxed);
    conn.control.shutdown();
    Ok(())
}

enum Next {
    Request(Request),
    Disconnect,
}

impl<'a> Conn<'a> {
    fn worker<'s>(&'s self, scope: &'s Scope<'s, '_>) {
        let _span = self.span.clone().entered();
        let mut scratch = Scratch::default();
        loop {
            self.idle.fetch_add(1, Ordering::SeqCst);
            let next = {
                let mut rd = self.reader.lock();
                self.idle.fetch_sub(1, Ordering::SeqCst);
                if self.closing.load(Ordering::SeqCst) {
                    return;
                }
                let next = self.next_unserved(&mut rd, &mut scratch);
                if matches!(next, Ok(Next::Disconnect)) {
                    // Before the read lock goes: no worker may wait for a request after it.
                    self.closing.store(true, Ordering::SeqCst);
                }
                next
            };
            let req = match next {
                Ok(Next::Request(r)) => r,
                Ok(Next::Disconnect) => {
                    tracing::debug!("client sent NBD_CMD_DISC");
                    self.closing.store(true, Ordering::SeqCst);
                    return;
                }
                Err(e) => {
                    if e.kind() != io::ErrorKind::UnexpectedEof {
                        tracing::info!("dropping client: {e}");
                    }
                    self.close();
                    return;
                }
            };
            if self.idle.load(Ordering::SeqCst) == 0
                && self.threads.load(Ordering::SeqCst) < self.max_threads
            {
                self.threads.fetch_add(1, Ordering::SeqCst);
                scope.spawn(move || self.worker(scope));
            }
            let started = self.export.stats.as_ref().map(|_| Instant::now());
            let handled = self.handle(&req, &mut scratch);
            if let (Some(stats), Some(t)) = (&self.export.stats, started) {
                stats.request(stat_op(req.cmd), stat_bytes(&req), t.elapsed());
            }
            if let Err(e) = handled {
                tracing::info!("cannot send reply: {e}");
                self.close();
                return;
            }
        }
    }

    /// Read requests, serving inline those that can be (see "Inline" above), until one that
    /// must be served the usual way, a disconnect or an error. Every inline reply has been
    /// sent (or the socket failed) when this returns.
    fn next_unserved(&self, rd: &mut BufReader<Stream>, s: &mut Scratch) -> io::Result<Next> {
        loop {
            if !s.batch.is_empty() && !self.whole_request_buffered(rd) && !self.keep_batching(rd) {
                self.send_batch(s)?;
            }
            let req = match self.next_request(rd, s) {
                Ok(Next::Request(r)) => r,
                Ok(Next::Disconnect) => {
                    self.send_batch(s)?;
                    return Ok(Next::Disconnect);
                }
                Err(e) => {
                    // The connection ends; the client may still read what was done.
                    let _ = self.send_batch(s);
                    return Err(e);
                }
            };
            let started = self.export.stats.as_ref().map(|_| Instant::now());
            if !self.try_inline(&req, s) {
                self.send_batch(s)?;
                return Ok(Next::Request(req));
            }
            if let (Some(stats), Some(t)) = (&self.export.stats, started) {
                stats.request(stat_op(req.cmd), stat_bytes(&req), t.elapsed());
            }
            if s.batch.len() >= BATCH_MAX {
                self.send_batch(s)?;
            }
        }
    }

    /// Whether the read buffer holds a whole request (header and payload), so reading it
    /// cannot wait on the socket.
    fn whole_request_buffered(&self, rd: &BufReader<Stream>) -> bool {
        let buf = rd.buffer();
        let hlen = wire::request_len(self.neg.extended);
        if buf.len() < hlen {
            return false;
        }
        match wire::decode_request(&buf[..hlen], self.neg.extended) {
            Ok(Some(req)) => match validate::payload(&req, &self.neg) {
                Payload::Read(n) | Payload::Drain(n) => buf.len() - hlen >= n,
                Payload::None | Payload::Fatal(_) => true,
            },
            _ => true,
        }
    }

    /// TLS only: whether more of the client's input has arrived already (a request in
    /// flight), so the batch may wait for its reply. A TLS client (GnuTLS, OpenSSL) reads a
    /// whole record at a time, so replies that share a record cost it one read instead of
    /// one each, and a busy client at QD32 is what limits throughput on two cores. Never
    /// waits: a client with nothing more in flight gets its replies at once, and the batch
    /// is still sent at `BATCH_MAX` and before any request served the usual way.
    /// A client that sends one request at a time never has more input here, so after a run
    /// of misses the socket is looked at only now and then (a system call saved per request).
    fn keep_batching(&self, rd: &BufReader<Stream>) -> bool {
        if !self.batch_while_input || !rd.buffer().is_empty() {
            return false;
        }
        // Touched only under the read lock.
        let misses = self.batch_misses.load(Ordering::Relaxed);
        if misses >= PROBE_AFTER_MISSES && !misses.is_multiple_of(PROBE_EVERY) {
            self.batch_misses
                .store(misses.wrapping_add(1), Ordering::Relaxed);
            return false;
        }
        let waiting = rd.get_ref().input_waiting();
        let next = if waiting {
            0
        } else {
            misses.wrapping_add(1).max(1)
        };
        self.batch_misses.store(next, Ordering::Relaxed);
        waiting
    }

    fn send_batch(&self, s: &mut Scratch) -> io::Result<()> {
        if s.batch.is_empty() {
            return Ok(());
        }
        let r = self.write_reply(&mut [IoSlice::new(&s.batch)]);
        s.batch.clear();
        if s.batch.capacity() > 2 * BATCH_MAX {
            s.batch = Vec::new();
        }
        r
    }

    fn inline_writes_allowed(&self) -> bool {
        let now = self.started.elapsed().as_nanos() as u64;
        now >= self.inline_writes_paused_until.load(Ordering::Relaxed)
    }

    fn pause_inline_writes(&self) {
        let until = (self.started.elapsed() + INLINE_WRITE_PAUSE).as_nanos() as u64;
        self.inline_writes_paused_until
            .store(until, Ordering::Relaxed);
        tracing::debug!("an inline write waited: writes go to worker threads for a while");
    }

    fn close(&self) {
        self.closing.store(true, Ordering::SeqCst);
        self.control.shutdown();
    }

    /// Read one request and its payload (into `s.data`, or partly into the pipe: see
    /// `read_payload`). Errors end the connection.
    fn next_request(&self, rd: &mut BufReader<Stream>, s: &mut Scratch) -> io::Result<Next> {
        s.piped = 0;
        let data = &mut s.data;
        let mut hdr = [0u8; wire::EXTENDED_REQUEST_LEN];
        let hdr = &mut hdr[..wire::request_len(self.neg.extended)];
        tracing::trace!(name: "nbd_trip", "Reading request");
        let wait = rd.buffer().is_empty().then(|| {
            let others_busy =
                self.threads.load(Ordering::Relaxed) > self.idle.load(Ordering::Relaxed) + 1;
            self.poll.spin(others_busy, || rd.get_ref().input_waiting())
        });
        if self.header_alone.swap(false, Ordering::Relaxed) && rd.buffer().is_empty() {
            rd.get_mut().read_exact(hdr)?;
        } else {
            rd.read_exact(hdr)?;
        }
        if let Some(began) = wait {
            self.poll.waited(began);
        }
        self.poll.request_read();
        let req = match wire::decode_request(hdr, self.neg.extended) {
            Ok(Some(r)) => r,
            Ok(None) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e.to_string())),
        };
        tracing::trace!(
            name: "nbd_receive_request",
            "Got request: {{ magic = 0x{:x}, .flags = 0x{:x}, .type = 0x{:x}, from = {}, len = {} }}",
            u32::from_be_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]),
            req.flags.bits(),
            req.cmd,
            req.offset,
            req.len
        );
        tracing::trace!(
            name: "nbd_co_receive_request_decode_type",
            "Decoding type: cookie = {}, type = {} ({})",
            req.cookie,
            req.cmd,
            cmd_name(req.cmd)
        );
        if req.cmd == CMD_DISC {
            return Ok(Next::Disconnect);
        }
        match validate::payload(&req, &self.neg) {
            Payload::None => data.set_len(0),
            Payload::Read(n) => {
                self.read_payload(rd, &req, n, s)?;
                tracing::trace!(
                    name: "nbd_co_receive_request_payload_received",
                    "Payload received: cookie = {}, len = {n}",
                    req.cookie
                );
            }
            Payload::Drain(n) => {
                data.set_len(0);
                io::copy(&mut rd.by_ref().take(n as u64), &mut io::sink())?;
            }
            Payload::Fatal(msg) => return Err(io::Error::new(io::ErrorKind::InvalidData, msg)),
        }
        Ok(Next::Request(req))
    }

    /// Read a request's `n` payload bytes into `s.data`; but a large write that may go
    /// straight into a host file (`Device::write_sink`) is put whole into the worker's pipe
    /// (what the read buffer holds copied in, the rest spliced from the socket: see
    /// `splice.rs`), leaving `s.piped` bytes there for `commands::spliced_write`.
    fn read_payload(
        &self,
        rd: &mut BufReader<Stream>,
        req: &Request,
        n: usize,
        s: &mut Scratch,
    ) -> io::Result<()> {
        let buffered = rd.buffer().len().min(n);
        let rest = n - buffered;
        if rest as u64 >= splice::SPLICE_MIN && self.may_splice_write(req) && s.pipe.get().is_some()
        {
            s.data.set_len(n);
            rd.read_exact(&mut s.data[..buffered])?;
            // The read buffer is empty now: the rest is read from the socket itself.
            let (Some(sock), Some(pipe)) = (rd.get_ref().plain_fd(), s.pipe.get()) else {
                return rd.read_exact(&mut s.data[buffered..]);
            };
            // The whole payload goes through the pipe, what the read buffer held first, so
            // the file gets it in one splice: a server killed mid-write leaves it cut at a
            // page boundary, as a `pwrite` would, never inside a sector.
            if !pipe.fits(0, buffered as u64 + splice::PAGE) {
                return rd.read_exact(&mut s.data[buffered..]);
            }
            pipe.put(&s.data[..buffered])?;
            let got = pipe.take_from_socket(sock, rest)?;
            if got == rest {
                s.data.set_len(0);
                s.piped = n;
                self.header_alone.store(true, Ordering::Relaxed);
                return Ok(());
            }
            tracing::debug!("pipe full after {got} of {rest} payload bytes: payloads are copied");
            self.no_write_splice.store(true, Ordering::Relaxed);
            pipe.read_out(&mut s.data[..buffered + got])?;
            return rd.read_exact(&mut s.data[buffered + got..]);
        }
        s.data.set_len(n);
        rd.read_exact(&mut s.data)
    }

    /// Whether a large read's reply may be spliced now (see [`splice_reads_pay`]).
    pub(super) fn may_splice_read(&self) -> bool {
        self.splice_now(self.splice_reads)
    }

    fn splice_now(&self, when: Splice) -> bool {
        let others = || self.export.transmitting.load(Ordering::Relaxed) > 1;
        match when {
            Splice::Never => false,
            Splice::Always => true,
            Splice::WhileAlone => !others(),
            Splice::WhileShared => others(),
        }
    }

    /// Whether a write's payload may be spliced into the file: [`splice_writes_pay`] says
    /// so now, it is a valid write without FUA, and the backend takes it byte for byte.
    fn may_splice_write(&self, req: &Request) -> bool {
        let dev = &self.export.device;
        self.splice_now(self.splice_writes)
            && !self.no_write_splice.load(Ordering::Relaxed)
            && req.cmd == CMD_WRITE
            && !req.flags.contains(CmdFlags::FUA)
            && validate::validate(req, req.len, &[], &self.neg, dev.size()).is_ok()
            && dev.write_sink(req.offset, req.len).is_some()
    }

    /// Send one whole reply. If another worker is sending, a small reply is handed to it
    /// (copied into the outbox) and this worker goes back to the next request; the sender
    /// sends what was handed over before it lets the socket go. Under load that turns many
    /// replies into one `send` (and, over TLS, full records instead of one per reply).
    ///
    /// Rules: a request's reply is one call, so replies of different requests may be
    /// reordered freely (NBD allows it) but no reply is ever split. `busy` is set only by
    /// the holder of `writer`. The holder sends what was handed over until the outbox is
    /// empty, then clears `busy` (under the outbox lock, so nothing handed over is left
    /// behind), or until a worker waits for `writer`: it then leaves `busy` set and the
    /// outbox to that worker, which drains it after its own reply. So a large reply never
    /// waits behind an endless stream of small ones.
    pub(super) fn write_reply(&self, bufs: &mut [IoSlice<'_>]) -> io::Result<()> {
        let len: usize = bufs.iter().map(|b| b.len()).sum();
        {
            let mut ob = self.outbox.lock();
            if len <= HAND_OVER_MAX && ob.busy && ob.queued.len() + len <= OUTBOX_LIMIT {
                for b in bufs.iter() {
                    ob.queued.extend_from_slice(b);
                }
                return Ok(());
            }
            ob.waiting += 1;
        }
        self.send_as_writer(|w| write_all_vectored(w, bufs))
    }

    /// Send one whole reply with `send`, which is never handed over (a spliced read).
    pub(super) fn write_reply_with(
        &self,
        send: impl FnOnce(&mut Stream) -> io::Result<()>,
    ) -> io::Result<()> {
        self.outbox.lock().waiting += 1;
        self.send_as_writer(send)
    }

    /// As a worker counted in `waiting`: take `writer`, send, then what was handed over.
    fn send_as_writer(&self, send: impl FnOnce(&mut Stream) -> io::Result<()>) -> io::Result<()> {
        let mut w = self.writer.lock();
        {
            let mut ob = self.outbox.lock();
            ob.waiting -= 1;
            ob.busy = true;
        }
        let sent = send(&mut w);
        self.send_handed_over(&mut w, sent)
    }

    /// As the holder of `writer`: send what other workers handed over (see `write_reply`).
    fn send_handed_over(&self, w: &mut Stream, mut sent: io::Result<()>) -> io::Result<()> {
        let mut batch = Vec::new();
        loop {
            {
                let mut ob = self.outbox.lock();
                if sent.is_err() {
                    // The connection is broken: what waits can never be sent.
                    ob.queued.clear();
                }
                // Leave when the outbox is empty, or to the next holder of `writer`.
                if ob.queued.is_empty() || ob.waiting > 0 {
                    ob.busy = !ob.queued.is_empty();
                    if batch.capacity() > ob.spare.capacity() && batch.capacity() <= SPARE_MAX {
                        batch.clear();
                        ob.spare = batch;
                    }
                    return sent;
                }
                if batch.capacity() == 0 {
                    batch = std::mem::take(&mut ob.spare);
                }
                batch.clear();
                std::mem::swap(&mut ob.queued, &mut batch);
            }
            sent = w.write_all(&batch);
        }
    }
}

/// A reply up to this size is handed to the worker already sending; a larger one waits for
/// the socket rather than be copied.
const HAND_OVER_MAX: usize = 64 * 1024;
/// Bytes handed over and not yet sent, at most; past it a worker waits for the socket.
const OUTBOX_LIMIT: usize = 1 << 20;

/// Replies handed to the worker that holds the socket.
#[derive(Default)]
struct Outbox {
    busy: bool,
    queued: Vec<u8>,
    /// Workers waiting for `writer`.
    waiting: usize,
    /// A sent batch's buffer, kept for the next one (so handing over allocates nothing in
    /// the steady state).
    spare: Vec<u8>,
}

/// The largest spare buffer kept.
const SPARE_MAX: usize = 256 * 1024;

/// When a connection splices large payloads into the page cache or read replies out of it.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Splice {
    Never,
    Always,
    /// While no other connection is transmitting.
    WhileAlone,
    /// While another connection is transmitting too.
    WhileShared,
}

/// When read replies are spliced to this connection (a plain socket or kernel TLS). A
/// client across a network receives from its own NIC, so it always gets the server's
/// zero-copy, and so does a Unix socket's. A TCP client on this host receives out of
/// page-cache fragments instead, which costs it more than copying: with one connection the
/// server's saving wins, with several the clients' receives are what the CPUs run out on.
/// Measured (fio 1 MiB reads at QD8 per connection, TCP loopback, 512 MiB raw,
/// `qnbd-spliced-reads` / `qnbd-copied-reads` in scripts/bench, medians of 5 and 7
/// interleaved rounds): one connection, spliced 1.50× and 1.57× copied at 42–44 % less
/// server CPU per MiB; four, copied 1.39× and 1.50× spliced. Over Unix splicing won both
/// (1.17× and 1.44×). `QNBD_SPLICE_READS=on|off` overrides.
fn splice_reads_pay(stream: &Stream) -> Splice {
    static FORCED: std::sync::OnceLock<Option<bool>> = std::sync::OnceLock::new();
    if !stream.can_splice_out() {
        return Splice::Never;
    }
    match FORCED.get_or_init(|| on_off("QNBD_SPLICE_READS")) {
        Some(true) => Splice::Always,
        Some(false) => Splice::Never,
        None if stream.is_local_tcp() => Splice::WhileAlone,
        None => Splice::Always,
    }
}

/// When write payloads are spliced from this connection into the file (a plain socket or
/// kernel TLS): while another connection is transmitting. Splicing saves a copy but not the
/// memory traffic: the one copy, from the socket's pages into the page cache, cost as much
/// as the two through a worker's buffer (`perf`, TCP, one connection: memcpy 35 % of the
/// server's samples, against 17 % + 16 % copied) while those buffers stay in the CPU's
/// caches, as they do for one connection's workers and not for several. Measured (1 MiB
/// writes at QD8 per connection, 512 MiB raw, `qnbd-copied-writes` / `qnbd-spliced-writes`
/// in scripts/bench, three runs of 5–9 interleaved rounds): one connection, copying 1.09–
/// 1.14× splicing on Unix and TCP, at 4–18 % less CPU per request; four, splicing 1.05–
/// 1.12× (one run 1.39× on TCP) at less CPU. `QNBD_SPLICE_WRITES=on|off` overrides.
fn splice_writes_pay(stream: &Stream) -> Splice {
    static FORCED: std::sync::OnceLock<Option<bool>> = std::sync::OnceLock::new();
    if !stream.can_splice_out() {
        return Splice::Never;
    }
    match FORCED.get_or_init(|| on_off("QNBD_SPLICE_WRITES")) {
        Some(true) => Splice::Always,
        Some(false) => Splice::Never,
        None => Splice::WhileShared,
    }
}

fn on_off(var: &str) -> Option<bool> {
    match std::env::var(var).as_deref() {
        Ok("on") => Some(true),
        Ok("off") => Some(false),
        Ok(v) => {
            tracing::warn!("{var}={v:?} is neither on nor off");
            None
        }
        Err(_) => None,
    }
}

/// The counter a command is recorded under.
pub(super) fn stat_op(cmd: u16) -> Op {
    match cmd {
        CMD_READ => Op::Read,
        CMD_WRITE => Op::Write,
        CMD_FLUSH => Op::Flush,
        CMD_TRIM => Op::Trim,
        CMD_WRITE_ZEROES => Op::WriteZeroes,
        CMD_CACHE => Op::Cache,
        CMD_BLOCK_STATUS => Op::BlockStatus,
        _ => Op::Other,
    }
}

/// The bytes a request named (none for a flush, whose length must be 0 anyway).
fn stat_bytes(req: &Request) -> u64 {
    match req.cmd {
        CMD_FLUSH => 0,
        _ => req.len,
    }
}
