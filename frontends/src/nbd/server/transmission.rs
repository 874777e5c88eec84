//! The transmission phase. Worker threads share one connection in nbdkit's style: a worker
//! takes the read lock, reads one request with its payload, lets go, serves it straight from
//! the backend, and writes the whole reply with one `writev` under the write lock. Requests
//! are served concurrently and replied to out of order; no lock is held across backend I/O.
//! Workers are spawned lazily, so a client with one request in flight costs two threads.

use super::export::Export;
use super::handshake::Negotiated;
use super::meta::{ContextKind, MetaContext};
use super::validate::{self, Payload, Reject};
use crate::nbd::proto::*;
use crate::nbd::wire::{self, Request};
use crate::transport::{write_all_vectored, Stream};
use backends::{Error as BackendError, Extents, IoFlags};
use parking_lot::Mutex;
use std::io::{self, BufReader, IoSlice, Read, Write};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::Scope;

/// Reads at least this long look for holes to send as OFFSET_HOLE chunks.
const SPARSE_READ_MIN: u64 = 64 * 1024;
/// Most extents gathered for one BLOCK_STATUS reply; the client asks again for the rest.
const MAX_EXTENTS: usize = 65536;
const READ_BUFFER: usize = 256 * 1024;

struct Conn<'a> {
    export: &'a Export,
    neg: Negotiated,
    reader: Mutex<BufReader<Stream>>,
    writer: Mutex<Stream>,
    /// A handle used only to shut the socket down from any thread.
    control: Stream,
    closing: AtomicBool,
    /// Workers waiting for the read lock.
    idle: AtomicUsize,
    threads: AtomicUsize,
    max_threads: usize,
}

/// A buffer that only grows, so a worker alternating small and large requests zero-fills
/// memory once, not on every growth.
#[derive(Default)]
struct GrowBuf {
    v: Vec<u8>,
    len: usize,
}

impl GrowBuf {
    fn set_len(&mut self, n: usize) {
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
    data: GrowBuf,
    hdr: Vec<u8>,
    extents: Extents,
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
        control: stream,
        closing: AtomicBool::new(false),
        idle: AtomicUsize::new(0),
        threads: AtomicUsize::new(1),
        max_threads: max_threads.max(1),
    };
    std::thread::scope(|s| conn.worker(s));
    conn.control.shutdown();
    Ok(())
}

enum Next {
    Request(Request),
    Disconnect,
}

impl<'a> Conn<'a> {
    fn worker<'s>(&'s self, scope: &'s Scope<'s, '_>) {
        let mut scratch = Scratch::default();
        loop {
            self.idle.fetch_add(1, Ordering::SeqCst);
            let next = {
                let mut rd = self.reader.lock();
                self.idle.fetch_sub(1, Ordering::SeqCst);
                if self.closing.load(Ordering::SeqCst) {
                    return;
                }
                self.next_request(&mut rd, &mut scratch.data)
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
            if let Err(e) = self.handle(&req, &mut scratch) {
                tracing::info!("cannot send reply: {e}");
                self.close();
                return;
            }
        }
    }

    fn close(&self) {
        self.closing.store(true, Ordering::SeqCst);
        self.control.shutdown();
    }

    /// Read one request and its payload (into `data`). Errors end the connection.
    fn next_request(&self, rd: &mut BufReader<Stream>, data: &mut GrowBuf) -> io::Result<Next> {
        let mut hdr = [0u8; wire::EXTENDED_REQUEST_LEN];
        let hdr = &mut hdr[..wire::request_len(self.neg.extended)];
        rd.read_exact(hdr)?;
        let req = match wire::decode_request(hdr, self.neg.extended) {
            Ok(Some(r)) => r,
            Ok(None) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e.to_string())),
        };
        tracing::trace!(
            cmd = cmd_name(req.cmd),
            offset = req.offset,
            len = req.len,
            flags = req.flags.bits(),
            "request"
        );
        if req.cmd == CMD_DISC {
            return Ok(Next::Disconnect);
        }
        match validate::payload(&req, &self.neg) {
            Payload::None => data.set_len(0),
            Payload::Read(n) => {
                data.set_len(n);
                rd.read_exact(data)?;
            }
            Payload::Drain(n) => {
                data.set_len(0);
                io::copy(&mut rd.by_ref().take(n as u64), &mut io::sink())?;
            }
            Payload::Fatal(msg) => return Err(io::Error::new(io::ErrorKind::InvalidData, msg)),
        }
        Ok(Next::Request(req))
    }

    fn structured(&self) -> bool {
        self.neg.structured || self.neg.extended
    }

    fn handle(&self, req: &Request, s: &mut Scratch) -> io::Result<()> {
        let len = validate::effect_len(req, &s.data, &self.neg);
        if let Err(r) = validate::validate(req, len, &s.data, &self.neg, self.export.device.size())
        {
            tracing::debug!("{} refused: {}", cmd_name(req.cmd), r.msg);
            return self.send_error(req, r, &mut s.hdr);
        }
        let dev = &self.export.device;
        let fua = if req.flags.contains(CmdFlags::FUA) {
            IoFlags::FUA
        } else {
            IoFlags::empty()
        };
        let result = match req.cmd {
            CMD_READ => return self.read(req, len, s),
            CMD_BLOCK_STATUS => return self.block_status(req, len, s),
            CMD_WRITE => dev.write(req.offset, &s.data, fua),
            CMD_FLUSH => dev.flush(),
            CMD_TRIM => dev.trim(req.offset, len, fua),
            CMD_WRITE_ZEROES => {
                let mut f = fua;
                if !req.flags.contains(CmdFlags::NO_HOLE) {
                    f |= IoFlags::MAY_TRIM;
                }
                if req.flags.contains(CmdFlags::FAST_ZERO) {
                    f |= IoFlags::FAST_ZERO;
                }
                dev.write_zeroes(req.offset, len, f)
            }
            CMD_CACHE => dev.cache(req.offset, len),
            _ => Err(BackendError::Invalid(format!(
                "invalid request type ({}) received",
                req.cmd
            ))),
        };
        match result {
            Ok(()) => self.send_ok(req, &mut s.hdr),
            Err(e) => self.send_error(req, self.backend_reject(req, &e), &mut s.hdr),
        }
    }

    fn backend_reject(&self, req: &Request, e: &BackendError) -> Reject {
        let mut errno = wire_errno(e.errno());
        if errno == ENOTSUP && !req.flags.contains(CmdFlags::FAST_ZERO) {
            errno = EINVAL;
        }
        if errno == EOVERFLOW && !req.flags.contains(CmdFlags::DF) {
            errno = EINVAL;
        }
        // qemu-nbd reports failed requests only to the client.
        tracing::debug!(
            "{} at {:#x} length {:#x} failed: {e}",
            cmd_name(req.cmd),
            req.offset,
            req.len
        );
        Reject {
            errno,
            msg: e.to_string(),
        }
    }

    fn write_reply(&self, bufs: &mut [IoSlice<'_>]) -> io::Result<()> {
        let mut w = self.writer.lock();
        write_all_vectored(&mut *w, bufs)
    }

    fn send_ok(&self, req: &Request, hdr: &mut Vec<u8>) -> io::Result<()> {
        hdr.clear();
        if self.neg.extended {
            wire::encode_chunk_header(
                hdr,
                true,
                REPLY_FLAG_DONE,
                REPLY_TYPE_NONE,
                req.cookie,
                req.offset,
                0,
            );
        } else {
            wire::encode_simple_reply(hdr, 0, req.cookie);
        }
        self.write_reply(&mut [IoSlice::new(hdr)])
    }

    fn send_error(&self, req: &Request, r: Reject, hdr: &mut Vec<u8>) -> io::Result<()> {
        hdr.clear();
        if self.structured() {
            wire::encode_error_chunk(
                hdr,
                self.neg.extended,
                req.cookie,
                req.offset,
                r.errno,
                &r.msg,
            );
        } else {
            wire::encode_simple_reply(hdr, r.errno, req.cookie);
        }
        self.write_reply(&mut [IoSlice::new(hdr)])
    }

    fn read(&self, req: &Request, len: u64, s: &mut Scratch) -> io::Result<()> {
        let dev = &self.export.device;
        let n = len as usize;
        let ext = self.neg.extended;
        if self.structured() && n == 0 {
            s.hdr.clear();
            wire::encode_chunk_header(
                &mut s.hdr,
                ext,
                REPLY_FLAG_DONE,
                REPLY_TYPE_NONE,
                req.cookie,
                req.offset,
                0,
            );
            return self.write_reply(&mut [IoSlice::new(&s.hdr)]);
        }
        s.data.set_len(n);
        if self.structured() && len >= SPARSE_READ_MIN && !req.flags.contains(CmdFlags::DF) {
            if let Some(r) = self.sparse_read(req, len, s) {
                return r;
            }
        }
        if let Err(e) = dev.read(req.offset, &mut s.data[..n]) {
            let r = self.backend_reject(req, &e);
            return self.send_error(req, r, &mut s.hdr);
        }
        s.hdr.clear();
        if self.structured() {
            wire::encode_chunk_header(
                &mut s.hdr,
                ext,
                REPLY_FLAG_DONE,
                REPLY_TYPE_OFFSET_DATA,
                req.cookie,
                req.offset,
                8 + len,
            );
            s.hdr.extend_from_slice(&req.offset.to_be_bytes());
        } else {
            wire::encode_simple_reply(&mut s.hdr, 0, req.cookie);
        }
        self.write_reply(&mut [IoSlice::new(&s.hdr), IoSlice::new(&s.data[..n])])
    }

    /// A structured read that sends zero runs as OFFSET_HOLE chunks. None: no hole found,
    /// read it plainly.
    fn sparse_read(&self, req: &Request, len: u64, s: &mut Scratch) -> Option<io::Result<()>> {
        let dev = &self.export.device;
        let ext = self.neg.extended;
        // (offset in request, length, is hole)
        let mut runs: Vec<(u64, u64, bool)> = Vec::new();
        let mut pos = 0u64;
        while pos < len {
            if dev
                .block_status(req.offset + pos, len - pos, &mut s.extents)
                .is_err()
            {
                return None;
            }
            for e in s.extents.iter() {
                if pos >= len {
                    break;
                }
                let l = e.len.min(len - pos);
                let hole = e.flags.contains(backends::ExtentFlags::ZERO);
                match runs.last_mut() {
                    Some(last) if last.2 == hole => last.1 += l,
                    _ => runs.push((pos, l, hole)),
                }
                pos += l;
            }
        }
        if !runs.iter().any(|r| r.2) {
            return None;
        }
        for &(off, l, hole) in &runs {
            if !hole {
                let range = off as usize..(off + l) as usize;
                if let Err(e) = dev.read(req.offset + off, &mut s.data[range]) {
                    let r = self.backend_reject(req, &e);
                    return Some(self.send_error(req, r, &mut s.hdr));
                }
            }
        }
        s.hdr.clear();
        let mut marks = Vec::with_capacity(runs.len());
        for (i, &(off, l, hole)) in runs.iter().enumerate() {
            let flags = if i + 1 == runs.len() {
                REPLY_FLAG_DONE
            } else {
                0
            };
            let start = s.hdr.len();
            if hole {
                wire::encode_chunk_header(
                    &mut s.hdr,
                    ext,
                    flags,
                    REPLY_TYPE_OFFSET_HOLE,
                    req.cookie,
                    req.offset,
                    12,
                );
                s.hdr.extend_from_slice(&(req.offset + off).to_be_bytes());
                s.hdr.extend_from_slice(&(l as u32).to_be_bytes());
            } else {
                wire::encode_chunk_header(
                    &mut s.hdr,
                    ext,
                    flags,
                    REPLY_TYPE_OFFSET_DATA,
                    req.cookie,
                    req.offset,
                    8 + l,
                );
                s.hdr.extend_from_slice(&(req.offset + off).to_be_bytes());
            }
            marks.push((start, s.hdr.len()));
        }
        let mut iov = Vec::with_capacity(runs.len() * 2);
        for (&(off, l, hole), &(a, b)) in runs.iter().zip(&marks) {
            iov.push(IoSlice::new(&s.hdr[a..b]));
            if !hole {
                iov.push(IoSlice::new(&s.data[off as usize..(off + l) as usize]));
            }
        }
        Some(self.write_reply(&mut iov))
    }

    /// Extents of `[offset, offset + len)` for one source (allocation, or a dirty bitmap),
    /// at most MAX_EXTENTS, only the first call's worth with REQ_ONE.
    fn gather(
        &self,
        bitmap: Option<&str>,
        offset: u64,
        len: u64,
        req_one: bool,
        scratch: &mut Extents,
    ) -> Result<Vec<backends::Extent>, BackendError> {
        let dev = &self.export.device;
        let mut all: Vec<backends::Extent> = Vec::new();
        let mut pos = 0u64;
        while pos < len && all.len() < MAX_EXTENTS {
            match bitmap {
                None => dev.block_status(offset + pos, len - pos, scratch)?,
                Some(name) => dev.bitmap_status(name, offset + pos, len - pos, scratch)?,
            }
            for e in scratch.iter() {
                if pos >= len {
                    break;
                }
                let l = e.len.min(len - pos);
                all.push(backends::Extent::new(l, e.flags, e.depth));
                pos += l;
            }
            if req_one {
                break;
            }
        }
        Ok(all)
    }

    fn block_status(&self, req: &Request, len: u64, s: &mut Scratch) -> io::Result<()> {
        let req_one = req.flags.contains(CmdFlags::REQ_ONE);
        let contexts: Vec<&MetaContext> =
            if self.neg.extended && req.flags.contains(CmdFlags::PAYLOAD_LEN) {
                let ids: Vec<u32> = s.data[8..]
                    .chunks_exact(4)
                    .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
                    .collect();
                self.neg
                    .contexts
                    .iter()
                    .filter(|c| ids.contains(&c.id))
                    .collect()
            } else {
                self.neg.contexts.iter().collect()
            };
        // Allocation once for the contexts that share it, each bitmap on its own.
        let mut sources: Vec<Vec<backends::Extent>> = Vec::with_capacity(contexts.len());
        let mut allocation: Option<usize> = None;
        let mut which = Vec::with_capacity(contexts.len());
        for ctx in &contexts {
            let bitmap = match &ctx.kind {
                ContextKind::DirtyBitmap(name) => Some(name.as_str()),
                _ => None,
            };
            if bitmap.is_none() {
                if let Some(i) = allocation {
                    which.push(i);
                    continue;
                }
            }
            match self.gather(bitmap, req.offset, len, req_one, &mut s.extents) {
                Ok(v) => sources.push(v),
                Err(e) => {
                    let r = self.backend_reject(req, &e);
                    return self.send_error(req, r, &mut s.hdr);
                }
            }
            if bitmap.is_none() {
                allocation = Some(sources.len() - 1);
            }
            which.push(sources.len() - 1);
        }
        s.hdr.clear();
        let ext = self.neg.extended;
        for (i, ctx) in contexts.iter().enumerate() {
            let mut runs: Vec<(u64, u32)> = Vec::new();
            for e in &sources[which[i]] {
                let v = match ctx.kind {
                    ContextKind::BaseAllocation => e.flags.bits() & (STATE_HOLE | STATE_ZERO),
                    ContextKind::AllocationDepth => e.depth,
                    ContextKind::DirtyBitmap(_) => {
                        u32::from(e.flags.contains(backends::ExtentFlags::DIRTY))
                    }
                };
                match runs.last_mut() {
                    Some(last) if last.1 == v => last.0 += e.len,
                    _ => runs.push((e.len, v)),
                }
            }
            if req_one {
                runs.truncate(1);
            }
            if !ext {
                // Compact replies carry 32-bit lengths: split what does not fit.
                let mut split = Vec::with_capacity(runs.len());
                for (l, v) in runs {
                    let mut rest = l;
                    while rest > 0 {
                        let piece = rest.min(u32::MAX as u64 & !511);
                        split.push((piece, v));
                        rest -= piece;
                    }
                }
                runs = split;
                if req_one {
                    runs.truncate(1);
                }
            }
            let flags = if i + 1 == contexts.len() {
                REPLY_FLAG_DONE
            } else {
                0
            };
            if ext {
                let plen = 8 + 16 * runs.len() as u64;
                wire::encode_chunk_header(
                    &mut s.hdr,
                    true,
                    flags,
                    REPLY_TYPE_BLOCK_STATUS_EXT,
                    req.cookie,
                    req.offset,
                    plen,
                );
                s.hdr.extend_from_slice(&ctx.id.to_be_bytes());
                s.hdr.extend_from_slice(&(runs.len() as u32).to_be_bytes());
                for (l, v) in &runs {
                    s.hdr.extend_from_slice(&l.to_be_bytes());
                    s.hdr.extend_from_slice(&(*v as u64).to_be_bytes());
                }
            } else {
                let plen = 4 + 8 * runs.len() as u64;
                wire::encode_chunk_header(
                    &mut s.hdr,
                    false,
                    flags,
                    REPLY_TYPE_BLOCK_STATUS,
                    req.cookie,
                    req.offset,
                    plen,
                );
                s.hdr.extend_from_slice(&ctx.id.to_be_bytes());
                for (l, v) in &runs {
                    s.hdr.extend_from_slice(&(*l as u32).to_be_bytes());
                    s.hdr.extend_from_slice(&v.to_be_bytes());
                }
            }
        }
        let mut w = self.writer.lock();
        w.write_all(&s.hdr)
    }
}
