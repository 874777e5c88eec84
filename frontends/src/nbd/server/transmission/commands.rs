//! Serving one request and building its reply: the command dispatch, reads (sparse ones as
//! OFFSET_HOLE chunks), BLOCK_STATUS over the selected meta contexts, and errors in the
//! reply style the client negotiated.

use super::splice::SPLICE_MIN;
use super::{status, Conn, Scratch};
use crate::nbd::proto::*;
use crate::nbd::server::meta::{ContextKind, MetaContext};
use crate::nbd::server::validate::{self, Reject};
use crate::nbd::wire::{self, Request};
use backends::{Error as BackendError, Extents, IoFlags};
use std::io::{self, IoSlice};

/// Reads shorter than this may be served inline (see "Inline" in mod.rs).
const INLINE_READ_MAX: u64 = 64 * 1024;
/// An inline write that took longer than this stops inline writes for `INLINE_WRITE_PAUSE`.
const SLOW_INLINE_WRITE: std::time::Duration = std::time::Duration::from_millis(1);
/// Most extents gathered for one BLOCK_STATUS reply; the client asks again for the rest.
const MAX_EXTENTS: usize = 65536;

impl Conn<'_> {
    fn structured(&self) -> bool {
        self.neg.structured || self.neg.extended
    }

    pub(super) fn handle(&self, req: &Request, s: &mut Scratch) -> io::Result<()> {
        let len = validate::effect_len(req, &s.data, &self.neg);
        if let Err(r) = validate::validate(req, len, &s.data, &self.neg, self.export.device.size())
        {
            tracing::debug!("{} refused: {}", cmd_name(req.cmd), r.msg);
            if std::mem::take(&mut s.piped) > 0 {
                if let Some(pipe) = s.pipe.get() {
                    pipe.drain();
                }
            }
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
            CMD_WRITE if s.piped > 0 => self.spliced_write(req, s),
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

    fn send_ok(&self, req: &Request, hdr: &mut Vec<u8>) -> io::Result<()> {
        hdr.clear();
        if self.neg.extended {
            trace_done(req.cookie);
            wire::encode_done(hdr, true, req.cookie, req.offset);
        } else {
            trace_simple(req.cookie, 0, 0);
            wire::encode_simple_reply(hdr, 0, req.cookie);
        }
        self.write_reply(&mut [IoSlice::new(hdr)])
    }

    fn send_error(&self, req: &Request, r: Reject, hdr: &mut Vec<u8>) -> io::Result<()> {
        if let Some(stats) = &self.export.stats {
            stats.error(super::stat_op(req.cmd));
        }
        hdr.clear();
        if self.structured() {
            tracing::trace!(
                name: "nbd_co_send_chunk_error",
                "Send structured error reply: cookie = {}, error = {} ({}), msg = '{}'",
                req.cookie,
                r.errno,
                err_name(r.errno),
                r.msg
            );
            wire::encode_error_chunk(
                hdr,
                self.neg.extended,
                req.cookie,
                req.offset,
                r.errno,
                &r.msg,
            );
        } else {
            trace_simple(req.cookie, r.errno, 0);
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
            trace_done(req.cookie);
            wire::encode_done(&mut s.hdr, ext, req.cookie, req.offset);
            return self.write_reply(&mut [IoSlice::new(&s.hdr)]);
        }
        s.data.set_len(n);
        if self.sparse_reads(req) {
            if let Some(r) = self.sparse_read(req, len, s) {
                return r;
            }
        }
        if len >= SPLICE_MIN && self.may_splice_read() {
            if let Some(r) = self.spliced_read(req, len, s) {
                return r;
            }
        }
        if let Err(e) = dev.read(req.offset, &mut s.data[..n]) {
            let r = self.backend_reject(req, &e);
            return self.send_error(req, r, &mut s.hdr);
        }
        self.read_header(req, len, s.data.as_ptr(), &mut s.hdr);
        self.write_reply(&mut [IoSlice::new(&s.hdr), IoSlice::new(&s.data[..n])])
    }

    /// The header of a successful read reply (one data chunk when structured).
    fn read_header(&self, req: &Request, len: u64, data: *const u8, hdr: &mut Vec<u8>) {
        hdr.clear();
        if self.structured() {
            trace_data(req.cookie, req.offset, data, len);
            wire::encode_data_header(
                hdr,
                self.neg.extended,
                REPLY_FLAG_DONE,
                req.cookie,
                req.offset,
                req.offset,
                len,
            );
        } else {
            trace_simple(req.cookie, 0, len);
            wire::encode_simple_reply(hdr, 0, req.cookie);
        }
    }

    /// Serve a small read on the thread that read it, if its bytes are in memory (see
    /// "Inline" in mod.rs); the reply joins `s.batch`. False: serve it the usual way (which
    /// also answers an invalid request).
    pub(super) fn try_inline(&self, req: &Request, s: &mut Scratch) -> bool {
        if req.len == 0 || req.len >= INLINE_READ_MAX || s.piped > 0 {
            return false;
        }
        let dev = &self.export.device;
        if !matches!(req.cmd, CMD_READ | CMD_WRITE)
            || validate::validate(req, req.len, &s.data, &self.neg, dev.size()).is_err()
        {
            return false;
        }
        if req.cmd == CMD_WRITE {
            return self.try_inline_write(req, s);
        }
        let n = req.len as usize;
        s.data.set_len(n);
        // Asked after the read: bytes in memory mean the metadata saying where they are is
        // too, so the look-up cannot wait on the disk. A read with a hole in it goes to a
        // worker, which sends the hole as such.
        if !dev.try_read(req.offset, &mut s.data[..n])
            || (self.sparse_reads(req) && !self.all_data(req.offset, req.len, s))
        {
            s.data.set_len(0);
            return false;
        }
        self.read_header(req, req.len, s.data.as_ptr(), &mut s.hdr);
        s.batch.extend_from_slice(&s.hdr);
        s.batch.extend_from_slice(&s.data[..n]);
        true
    }

    /// A small write without FUA, if the backend takes it without waiting (see "Inline" in
    /// mod.rs). One that took long all the same (the kernel throttled writers) stops inline
    /// writes for a while, so reads are not held up behind writes that wait.
    fn try_inline_write(&self, req: &Request, s: &mut Scratch) -> bool {
        if req.flags.contains(CmdFlags::FUA) || !self.inline_writes_allowed() {
            return false;
        }
        let t = std::time::Instant::now();
        if !self.export.device.try_write(req.offset, &s.data) {
            return false;
        }
        if t.elapsed() > SLOW_INLINE_WRITE {
            self.pause_inline_writes();
        }
        s.hdr.clear();
        if self.neg.extended {
            trace_done(req.cookie);
            wire::encode_done(&mut s.hdr, true, req.cookie, req.offset);
        } else {
            trace_simple(req.cookie, 0, 0);
            wire::encode_simple_reply(&mut s.hdr, 0, req.cookie);
        }
        s.batch.extend_from_slice(&s.hdr);
        true
    }

    /// A write whose payload is in the pipe (see `read_payload` in mod.rs): it goes into the
    /// file in one splice. The payload was read whole before any of it is written, as a
    /// copied one.
    fn spliced_write(&self, req: &Request, s: &mut Scratch) -> Result<(), BackendError> {
        let piped = std::mem::take(&mut s.piped);
        let dev = &self.export.device;
        let Some(pipe) = s.pipe.get() else {
            return Err(BackendError::Invalid("write payload lost".into()));
        };
        let Some(sink) = dev.write_sink(req.offset, piped as u64) else {
            // The backend no longer takes it byte for byte: copy it out of the pipe.
            s.data.set_len(piped);
            if let Err(e) = pipe.read_out(&mut s.data) {
                pipe.drain();
                return Err(BackendError::Invalid(format!("write payload lost: {e}")));
            }
            return dev.write(req.offset, &s.data, IoFlags::empty());
        };
        pipe.write_to_file(sink, piped)
    }

    /// A read sent from the page cache with splice (see `splice.rs`). None: the bytes are
    /// not in a host file as they are, or did not all reach the pipe; copy them instead.
    fn spliced_read(&self, req: &Request, len: u64, s: &mut Scratch) -> Option<io::Result<()>> {
        let src = self.export.device.read_source(req.offset, len)?;
        let pipe = s.pipe.get()?;
        if !pipe.fits(src.offset, len) || !pipe.fill(src, len as usize) {
            return None;
        }
        self.read_header(req, len, std::ptr::null(), &mut s.hdr);
        let hdr = &s.hdr;
        let total = hdr.len() + len as usize;
        Some(self.write_reply_with(|w| {
            w.splice_out(total, |fd| pipe.send(fd, hdr, len as usize))
                .unwrap_or_else(|| {
                    Err(io::Error::other(
                        "spliced reply on a stream that cannot take it",
                    ))
                })
        }))
    }

    /// Whether this read's zero runs are sent as OFFSET_HOLE chunks: as qemu-nbd, every
    /// structured read the client lets us split (no DF), so clients see holes in any read.
    fn sparse_reads(&self, req: &Request) -> bool {
        self.structured() && !req.flags.contains(CmdFlags::DF)
    }

    /// Whether `[offset, offset + len)` is one data extent (fills `s.extents`). An error
    /// counts as data: the read itself will tell.
    fn all_data(&self, offset: u64, len: u64, s: &mut Scratch) -> bool {
        if self
            .export
            .device
            .block_status(offset, len, &mut s.extents)
            .is_err()
        {
            return true;
        }
        s.extents
            .iter()
            .next()
            .is_some_and(|e| e.len >= len && !e.flags.contains(backends::ExtentFlags::ZERO))
    }

    /// A structured read that sends zero runs as OFFSET_HOLE chunks. None: no hole found,
    /// read it plainly.
    fn sparse_read(&self, req: &Request, len: u64, s: &mut Scratch) -> Option<io::Result<()>> {
        let dev = &self.export.device;
        let ext = self.neg.extended;
        // The common case, all data, costs one look-up and no allocation.
        if self.all_data(req.offset, len, s) {
            return None;
        }
        // (offset in request, length, is hole)
        let mut runs: Vec<(u64, u64, bool)> = Vec::new();
        let mut pos = 0u64;
        while pos < len {
            if pos > 0
                && dev
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
                let at = req.offset + off;
                tracing::trace!(
                    name: "nbd_co_send_chunk_read_hole",
                    "Send structured read hole reply: cookie = {}, offset = {at}, len = {l}",
                    req.cookie
                );
                wire::encode_hole(&mut s.hdr, ext, flags, req.cookie, req.offset, at, l as u32);
            } else {
                let at = req.offset + off;
                trace_data(req.cookie, at, s.data[off as usize..].as_ptr(), l);
                wire::encode_data_header(&mut s.hdr, ext, flags, req.cookie, req.offset, at, l);
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
        if contexts.is_empty() {
            // Validation refuses this; a reply without chunks would leave the client waiting.
            let r = Reject {
                errno: EINVAL,
                msg: "no meta context selected".into(),
            };
            return self.send_error(req, r, &mut s.hdr);
        }
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
            let runs = status::runs(&ctx.kind, &sources[which[i]], req_one, ext);
            let flags = if i + 1 == contexts.len() {
                REPLY_FLAG_DONE
            } else {
                0
            };
            tracing::trace!(
                name: "nbd_co_send_extents",
                "Send block status reply: cookie = {}, extents = {}, context = {} (extents cover {} bytes, last chunk = {})",
                req.cookie,
                runs.len(),
                ctx.id,
                runs.iter().map(|r| r.0).sum::<u64>(),
                u8::from(flags == REPLY_FLAG_DONE)
            );
            wire::encode_block_status(
                &mut s.hdr, ext, flags, req.cookie, req.offset, ctx.id, &runs,
            );
        }
        self.write_reply(&mut [IoSlice::new(&s.hdr)])
    }
}

fn trace_simple(cookie: u64, error: u32, len: u64) {
    tracing::trace!(
        name: "nbd_co_send_simple_reply",
        "Send simple reply: cookie = {cookie}, error = {error} ({}), len = {len}",
        err_name(error)
    );
}

fn trace_done(cookie: u64) {
    tracing::trace!(
        name: "nbd_co_send_chunk_done",
        "Send structured reply done: cookie = {cookie}"
    );
}

fn trace_data(cookie: u64, offset: u64, data: *const u8, len: u64) {
    tracing::trace!(
        name: "nbd_co_send_chunk_read",
        "Send structured read data reply: cookie = {cookie}, offset = {offset}, data = {data:p}, len = {len}"
    );
}
