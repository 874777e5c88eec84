//! The NBD client's transmission phase: an export as a remote file for the backends
//! ([`backends::file::remote::Remote`]), so qnbd can serve, convert or overlay an image that
//! another NBD server holds (`qnbd -f qcow2 nbd://host/disk`), as qemu's `nbd` block driver.
//!
//! One connection, many requests in flight: a caller sends its request under the writer
//! lock and waits on its own slot; one reader thread reads every reply and fills the slot
//! its cookie names. Structured replies are negotiated (holes arrive as holes), and
//! `base:allocation` for block status. When the connection dies, every waiting request and
//! every later one fails with EIO: nothing is retried, so nothing is written twice.

use super::{Client, ClientError};
use crate::nbd::proto::*;
use crate::nbd::wire::{self, ReplyHeader};
use crate::transport::{write_all_vectored, Stream};
use backends::file::remote::Remote;
use parking_lot::{Condvar, Mutex};
use std::collections::HashMap;
use std::io::{self, IoSlice, Read};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Largest read or write sent at once (the NBD spec's safe maximum).
const MAX_PAYLOAD: u64 = 32 << 20;
/// Largest trim, write-zeroes or block-status length asked at once.
const MAX_EFFECT: u64 = 1 << 30;

#[derive(Debug, Default)]
struct Outcome {
    done: bool,
    /// The first error the server reported (errno), or EIO for a lost connection.
    error: Option<i32>,
    data: Vec<u8>,
    extents: Vec<(u64, bool, bool)>,
}

#[derive(Debug)]
struct Slot {
    /// A read's offset and length (its data chunks must lie inside).
    read: Option<(u64, u64)>,
    state: Mutex<Outcome>,
    cv: Condvar,
}

#[derive(Debug, Default)]
struct Shared {
    pending: Mutex<HashMap<u64, Arc<Slot>>>,
    /// Why the connection ended, once it has.
    dead: Mutex<Option<String>>,
}

/// An export reached over one NBD connection.
#[derive(Debug)]
pub struct NbdRemote {
    name: String,
    /// qemu's pseudo-filename for the export (`nbd_refresh_filename`).
    filename: String,
    size: u64,
    flags: TransmissionFlags,
    /// The id of `base:allocation`, when the server has it.
    allocation: Option<u32>,
    /// The server's minimum block size: reads and writes are aligned to it (1: none).
    align: u64,
    /// Aligned writes share it; a read-modify-write of a partial block holds it alone, so
    /// no write to the same block slips between its read and its write.
    rmw: parking_lot::RwLock<()>,
    writer: Mutex<Stream>,
    shared: Arc<Shared>,
    next_cookie: AtomicU64,
}

fn errno_of(nbd: u32) -> i32 {
    match nbd {
        EPERM => libc::EPERM,
        EIO => libc::EIO,
        ENOMEM => libc::ENOMEM,
        ENOSPC => libc::ENOSPC,
        EOVERFLOW => libc::EOVERFLOW,
        ENOTSUP => libc::ENOTSUP,
        ESHUTDOWN => libc::ESHUTDOWN,
        // The spec: treat anything else as EINVAL.
        _ => libc::EINVAL,
    }
}

impl NbdRemote {
    /// Take over a connection whose handshake ended in transmission (after GO), described
    /// by `info`; `name` names the export in messages.
    pub fn start(
        client: Client,
        info: &super::ExportInfo,
        allocation: Option<u32>,
        name: String,
        filename: String,
    ) -> io::Result<NbdRemote> {
        if info.size > i64::MAX as u64 {
            return Err(io::Error::other(format!(
                "export size {} is too large",
                info.size
            )));
        }
        let align = u64::from(info.min_block.max(1));
        if !info.size.is_multiple_of(align) {
            return Err(io::Error::other(format!(
                "export size {} is not multiple of minimum block size {}",
                info.size, info.min_block
            )));
        }
        let stream = client.into_stream();
        let reader = stream.try_clone()?;
        let shared = Arc::new(Shared::default());
        let s = shared.clone();
        std::thread::Builder::new()
            .name("nbd-client".into())
            .spawn(move || read_replies(reader, &s))?;
        Ok(NbdRemote {
            name,
            filename,
            size: info.size,
            flags: TransmissionFlags::from_bits_retain(info.flags),
            allocation,
            align,
            rmw: parking_lot::RwLock::new(()),
            writer: Mutex::new(stream),
            shared,
            next_cookie: AtomicU64::new(1),
        })
    }

    fn lost(&self) -> io::Error {
        let why = self.shared.dead.lock().clone().unwrap_or_default();
        tracing::error!(export = %self.name, "NBD connection lost: {why}");
        io::Error::from_raw_os_error(libc::EIO)
    }

    /// Send one request (with `payload` for a write) and wait for its whole reply.
    fn call(
        &self,
        cmd: u16,
        flags: CmdFlags,
        offset: u64,
        len: u64,
        payload: &[u8],
    ) -> io::Result<Outcome> {
        if self.shared.dead.lock().is_some() {
            return Err(self.lost());
        }
        let cookie = self.next_cookie.fetch_add(1, Ordering::Relaxed);
        let read = (cmd == CMD_READ).then_some((offset, len));
        let slot = Arc::new(Slot {
            read,
            state: Mutex::new(Outcome {
                data: if read.is_some() {
                    vec![0u8; len as usize]
                } else {
                    Vec::new()
                },
                ..Default::default()
            }),
            cv: Condvar::new(),
        });
        self.shared.pending.lock().insert(cookie, slot.clone());
        let mut hdr = Vec::with_capacity(wire::COMPACT_REQUEST_LEN);
        let req = wire::Request {
            flags,
            cmd,
            cookie,
            offset,
            len,
        };
        wire::encode_request(&mut hdr, &req, false);
        let sent = {
            let mut w = self.writer.lock();
            let mut bufs = [IoSlice::new(&hdr), IoSlice::new(payload)];
            write_all_vectored(&mut *w, &mut bufs)
        };
        if let Err(e) = sent {
            self.shared.pending.lock().remove(&cookie);
            fail_all(&self.shared, format!("sending a request: {e}"));
            return Err(self.lost());
        }
        let mut st = slot.state.lock();
        while !st.done {
            slot.cv.wait(&mut st);
        }
        let out = std::mem::take(&mut *st);
        match out.error {
            Some(libc::EIO) if self.shared.dead.lock().is_some() => Err(self.lost()),
            Some(e) => Err(io::Error::from_raw_os_error(e)),
            None => Ok(out),
        }
    }

    fn has(&self, f: TransmissionFlags) -> bool {
        self.flags.contains(f)
    }

    fn unsupported() -> io::Error {
        io::Error::from(io::ErrorKind::Unsupported)
    }

    /// Split `[offset, offset + len)` into pieces of at most `max`.
    fn pieces(offset: u64, len: u64, max: u64) -> impl Iterator<Item = (u64, u64)> {
        let end = offset + len;
        (offset..end)
            .step_by(max as usize)
            .map(move |at| (at, (end - at).min(max)))
    }
}

impl NbdRemote {
    fn read_aligned(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        for (at, n) in Self::pieces(offset, buf.len() as u64, MAX_PAYLOAD) {
            let out = self.call(CMD_READ, CmdFlags::empty(), at, n, &[])?;
            let start = (at - offset) as usize;
            buf[start..start + n as usize].copy_from_slice(&out.data);
        }
        Ok(())
    }

    fn write_aligned(&self, offset: u64, buf: &[u8], flags: CmdFlags) -> io::Result<()> {
        for (at, n) in Self::pieces(offset, buf.len() as u64, MAX_PAYLOAD) {
            let start = (at - offset) as usize;
            self.call(CMD_WRITE, flags, at, n, &buf[start..start + n as usize])?;
        }
        Ok(())
    }

    /// The aligned blocks around `[offset, offset + len)`: (start, length).
    fn widen(&self, offset: u64, len: u64) -> (u64, u64) {
        let start = offset - offset % self.align;
        let end = (offset + len).next_multiple_of(self.align).min(self.size);
        (start, end - start)
    }
}

impl Remote for NbdRemote {
    fn filename(&self) -> String {
        self.filename.clone()
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        self.has(TransmissionFlags::READ_ONLY)
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let (start, len) = self.widen(offset, buf.len() as u64);
        if (start, len) == (offset, buf.len() as u64) {
            return self.read_aligned(offset, buf);
        }
        let mut whole = vec![0u8; len as usize];
        self.read_aligned(start, &mut whole)?;
        let from = (offset - start) as usize;
        buf.copy_from_slice(&whole[from..from + buf.len()]);
        Ok(())
    }

    fn write(&self, offset: u64, buf: &[u8], fua: bool) -> io::Result<()> {
        let native_fua = fua && self.has(TransmissionFlags::SEND_FUA);
        let flags = if native_fua {
            CmdFlags::FUA
        } else {
            CmdFlags::empty()
        };
        let (start, len) = self.widen(offset, buf.len() as u64);
        if (start, len) == (offset, buf.len() as u64) {
            let _shared = self.rmw.read();
            self.write_aligned(offset, buf, flags)?;
        } else {
            let _alone = self.rmw.write();
            let mut whole = vec![0u8; len as usize];
            self.read_aligned(start, &mut whole)?;
            let from = (offset - start) as usize;
            whole[from..from + buf.len()].copy_from_slice(buf);
            self.write_aligned(start, &whole, flags)?;
        }
        if fua && !native_fua {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        if !self.has(TransmissionFlags::SEND_FLUSH) {
            return Ok(());
        }
        self.call(CMD_FLUSH, CmdFlags::empty(), 0, 0, &[])
            .map(|_| ())
    }

    fn write_zeroes(&self, offset: u64, len: u64, no_hole: bool) -> io::Result<()> {
        if !self.has(TransmissionFlags::SEND_WRITE_ZEROES) {
            return Err(Self::unsupported());
        }
        let flags = if no_hole {
            CmdFlags::NO_HOLE
        } else {
            CmdFlags::empty()
        };
        // Partial blocks at either end get zeroes written (a read-modify-write).
        let end = offset + len;
        let inner = offset.next_multiple_of(self.align).min(end);
        let inner_end = (end - end % self.align).max(inner);
        for (a, b) in [(offset, inner), (inner_end, end)] {
            if a < b {
                self.write(a, &vec![0u8; (b - a) as usize], false)?;
            }
        }
        let _shared = self.rmw.read();
        for (at, n) in Self::pieces(inner, inner_end - inner, MAX_EFFECT) {
            self.call(CMD_WRITE_ZEROES, flags, at, n, &[])?;
        }
        Ok(())
    }

    fn block_status(&self, offset: u64, len: u64) -> io::Result<Vec<(u64, bool, bool)>> {
        let len = len.min(MAX_EFFECT);
        if self.allocation.is_none() || len == 0 {
            return Ok(vec![(len, false, false)]);
        }
        let out = self.call(CMD_BLOCK_STATUS, CmdFlags::empty(), offset, len, &[])?;
        Ok(out.extents)
    }
}

impl Drop for NbdRemote {
    /// NBD_CMD_DISC, then the connection closes (the reader thread sees its end).
    fn drop(&mut self) {
        let mut hdr = Vec::new();
        let req = wire::Request {
            flags: CmdFlags::empty(),
            cmd: CMD_DISC,
            cookie: 0,
            offset: 0,
            len: 0,
        };
        wire::encode_request(&mut hdr, &req, false);
        let w = self.writer.get_mut();
        let _ = std::io::Write::write_all(w, &hdr);
        w.shutdown();
    }
}

/// End the connection: every request waiting fails, and so does every later one.
fn fail_all(shared: &Shared, why: String) {
    shared.dead.lock().get_or_insert(why);
    let slots: Vec<_> = shared.pending.lock().drain().map(|(_, s)| s).collect();
    for s in slots {
        let mut st = s.state.lock();
        st.error.get_or_insert(libc::EIO);
        st.done = true;
        s.cv.notify_all();
    }
}

fn complete(slot: &Slot, error: Option<i32>) {
    let mut st = slot.state.lock();
    if let Some(e) = error {
        st.error.get_or_insert(e);
    }
    st.done = true;
    slot.cv.notify_all();
}

/// The reader thread: every reply to its slot, until the connection ends.
fn read_replies(mut r: Stream, shared: &Shared) {
    let why = loop {
        match read_one(&mut r, shared) {
            Ok(()) => {}
            Err(e) => break e,
        }
    };
    fail_all(shared, why);
}

fn read_exact(r: &mut Stream, buf: &mut [u8]) -> Result<(), String> {
    r.read_exact(buf).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => "the server closed the connection".to_string(),
        _ => e.to_string(),
    })
}

/// The slot a reply is for; it stays pending (so a connection that dies while its reply is
/// read fails it too) until [`finish`] takes it out.
fn slot_of(shared: &Shared, cookie: u64) -> Result<Arc<Slot>, String> {
    shared
        .pending
        .lock()
        .get(&cookie)
        .cloned()
        .ok_or_else(|| format!("reply for unknown cookie {cookie:#x}"))
}

/// The whole reply to `cookie` has been read.
fn finish(shared: &Shared, cookie: u64, slot: &Slot, error: Option<i32>) {
    shared.pending.lock().remove(&cookie);
    complete(slot, error);
}

fn read_one(r: &mut Stream, shared: &Shared) -> Result<(), String> {
    let mut h = [0u8; 20];
    read_exact(r, &mut h[..4])?;
    let need = match u32::from_be_bytes([h[0], h[1], h[2], h[3]]) {
        SIMPLE_REPLY_MAGIC => 16,
        STRUCTURED_REPLY_MAGIC => 20,
        m => return Err(format!("bad reply magic {m:#x}")),
    };
    read_exact(r, &mut h[4..need])?;
    let header = match wire::decode_reply_header(&h[..need]) {
        Ok(Some((h, _))) => h,
        _ => return Err("bad reply header".into()),
    };
    match header {
        ReplyHeader::Simple { error, cookie } => {
            let slot = slot_of(shared, cookie)?;
            if error != 0 {
                finish(shared, cookie, &slot, Some(errno_of(error)));
                return Ok(());
            }
            if slot.read.is_some() {
                let mut st = slot.state.lock();
                let mut data = std::mem::take(&mut st.data);
                drop(st);
                read_exact(r, &mut data)?;
                slot.state.lock().data = data;
            }
            finish(shared, cookie, &slot, None);
            Ok(())
        }
        ReplyHeader::Chunk {
            flags,
            typ,
            cookie,
            len,
            ..
        } => {
            let slot = slot_of(shared, cookie)?;
            read_chunk(r, &slot, typ, len)?;
            if flags & REPLY_FLAG_DONE != 0 {
                finish(shared, cookie, &slot, None);
            }
            Ok(())
        }
    }
}

/// One structured reply chunk's payload, into its slot.
fn read_chunk(r: &mut Stream, slot: &Slot, typ: u16, len: u64) -> Result<(), String> {
    if typ == REPLY_TYPE_OFFSET_DATA {
        let (start, rlen) = slot
            .read
            .ok_or("a data chunk for a request that is no read")?;
        let mut off = [0u8; 8];
        if len < 8 {
            return Err("short data chunk".into());
        }
        read_exact(r, &mut off)?;
        let at = u64::from_be_bytes(off);
        let n = len - 8;
        if at < start || at + n > start + rlen {
            return Err(format!("data chunk at {at:#x} (+{n:#x}) outside its read"));
        }
        let mut st = slot.state.lock();
        let mut data = std::mem::take(&mut st.data);
        drop(st);
        let from = (at - start) as usize;
        let got = read_exact(r, &mut data[from..from + n as usize]);
        slot.state.lock().data = data;
        return got;
    }
    // Every other chunk is small: the largest is a block status reply.
    if len > (1 << 20) {
        return Err(format!("reply chunk of {len} bytes"));
    }
    let mut p = vec![0u8; len as usize];
    read_exact(r, &mut p)?;
    let mut st = slot.state.lock();
    match typ {
        REPLY_TYPE_NONE => {}
        REPLY_TYPE_OFFSET_HOLE => {
            let (start, rlen) = slot
                .read
                .ok_or("a hole chunk for a request that is no read")?;
            let (at, n) = wire::decode_hole(&p).ok_or("bad hole chunk")?;
            let n = u64::from(n);
            if at < start || at + n > start + rlen {
                return Err(format!("hole chunk at {at:#x} (+{n:#x}) outside its read"));
            }
            let from = (at - start) as usize;
            st.data[from..from + n as usize].fill(0);
        }
        REPLY_TYPE_BLOCK_STATUS => {
            let (_, runs) = wire::decode_block_status(&p, false).ok_or("bad block status")?;
            st.extents = runs
                .into_iter()
                .map(|(n, f)| (n, f & STATE_HOLE != 0, f & STATE_ZERO != 0))
                .collect();
        }
        t if t & 0x8000 != 0 => {
            let errno = wire::decode_error(&p).map_or(EIO, |(e, msg)| {
                if !msg.is_empty() {
                    tracing::debug!("NBD server error: {msg}");
                }
                e
            });
            st.error.get_or_insert(errno_of(errno));
        }
        // An unknown chunk type that is not an error: skipped.
        _ => {}
    }
    Ok(())
}

/// The handshake of a connection for [`NbdRemote`]: structured replies, `base:allocation`,
/// GO on `export`. Returns the export and the context's id.
pub fn negotiate(
    c: &mut Client,
    export: &str,
) -> Result<(super::ExportInfo, Option<u32>), ClientError> {
    let mut allocation = None;
    if c.simple_opt(OPT_STRUCTURED_REPLY)? {
        c.structured = true;
        allocation = c.set_meta_context(export, CONTEXT_BASE_ALLOCATION)?;
    }
    let info = c.info_or_go(OPT_GO, export, true)?;
    Ok((info, allocation))
}
