//! The NBD client's transmission phase: an export as a remote file for the backends
//! ([`backends::file::remote::Remote`]), so qnbd can serve, convert or overlay an image that
//! another NBD server holds (`qnbd -f qcow2 nbd://host/disk`), as qemu's `nbd` block driver.
//!
//! One connection, many requests in flight: a caller sends its request under the writer
//! lock and waits on its own slot; one reader thread reads every reply and fills the slot
//! its cookie names. Structured replies are negotiated (holes arrive as holes), and
//! `base:allocation` for block status. A lost connection is made again in the background;
//! what requests do meanwhile (wait and go again within `reconnect-delay`, or fail with
//! EIO) is [`super::link`]'s.

use super::link::{Connector, Shared, Slot};
use super::{Client, ClientError};
use crate::nbd::proto::*;
use crate::nbd::wire;
use crate::transport::write_all_vectored;
use backends::file::remote::Remote;
use std::io::{self, IoSlice};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Largest read or write sent at once (the NBD spec's safe maximum).
const MAX_PAYLOAD: u64 = 32 << 20;
/// Largest trim, write-zeroes or block-status length asked at once.
const MAX_EFFECT: u64 = 1 << 30;

/// What a request's reply brought.
type Outcome = super::link::Outcome;

/// An export reached over one NBD connection at a time (see [`super::link`] for a lost one).
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
    shared: Arc<Shared>,
    next_cookie: AtomicU64,
}

impl std::fmt::Debug for NbdRemote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdRemote")
            .field("name", &self.name)
            .finish()
    }
}

/// Why a request failed.
enum Failed {
    /// No connection to send it on, or it was lost (EIO, logged).
    Lost(io::Error),
    /// The server's error (errno).
    Server(i32),
}

impl From<Failed> for io::Error {
    fn from(f: Failed) -> io::Error {
        match f {
            Failed::Lost(e) => e,
            Failed::Server(errno) => io::Error::from_raw_os_error(errno),
        }
    }
}

/// How a lost connection is handled: qemu's `reconnect-delay` (zero: requests fail at once
/// while it is down) and how to connect again (None: never).
pub struct Reconnect {
    pub delay: Duration,
    pub connector: Option<Connector>,
}

impl NbdRemote {
    /// Take over a connection whose handshake ended in transmission (after GO), described
    /// by `info`; `name` names the export in messages; `reconnect` says what a lost
    /// connection becomes.
    pub fn start(
        client: Client,
        info: &super::ExportInfo,
        allocation: Option<u32>,
        name: String,
        filename: String,
        reconnect: Reconnect,
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
        let shared = Shared::start(
            client.into_stream(),
            info.clone(),
            allocation,
            name.clone(),
            reconnect.delay,
            reconnect.connector,
        )?;
        Ok(NbdRemote {
            name,
            filename,
            size: info.size,
            flags: TransmissionFlags::from_bits_retain(info.flags),
            allocation,
            align,
            rmw: parking_lot::RwLock::new(()),
            shared,
            next_cookie: AtomicU64::new(1),
        })
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
        Ok(self.request(cmd, flags, offset, len, payload, None)?)
    }

    /// [`Self::call`], telling a lost connection from the server's error; a read's data goes
    /// straight into `dest`. Sent again on a new connection when the link says so
    /// (`reconnect-delay`).
    fn request(
        &self,
        cmd: u16,
        flags: CmdFlags,
        offset: u64,
        len: u64,
        payload: &[u8],
        mut dest: Option<&mut [u8]>,
    ) -> Result<Outcome, Failed> {
        loop {
            let cookie = self.next_cookie.fetch_add(1, Ordering::Relaxed);
            // SAFETY: `slot` is dropped at the end of this iteration, before `dest`'s
            // borrow ends, never leaked.
            let slot = unsafe { Slot::start(dest.as_deref_mut().map(|b| (offset, b))) };
            let (gen, writer) = self.shared.register(cookie, &slot).map_err(Failed::Lost)?;
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
                let mut w = writer.lock();
                let mut bufs = [IoSlice::new(&hdr), IoSlice::new(payload)];
                write_all_vectored(&mut *w, &mut bufs)
            };
            if let Err(e) = sent {
                let why = super::link::Loss::Io(format!("sending a request: {e}"));
                self.shared.end(gen, why);
            }
            let out = slot.wait();
            if out.lost {
                if self.shared.retry_lost() {
                    continue;
                }
                return Err(Failed::Lost(self.shared.lost()));
            }
            return match out.error {
                Some(e) => Err(Failed::Server(e)),
                None => Ok(out),
            };
        }
    }

    /// A write was acknowledged: until a FLUSH, it is in the server's cache only (unless
    /// `fua`, or the server has no cache to flush).
    fn acked(&self, fua: bool) {
        if self.has(TransmissionFlags::SEND_FLUSH) {
            self.shared.wrote(fua);
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
            let start = (at - offset) as usize;
            let dest = &mut buf[start..start + n as usize];
            self.request(CMD_READ, CmdFlags::empty(), at, n, &[], Some(dest))?;
        }
        Ok(())
    }

    fn write_aligned(&self, offset: u64, buf: &[u8], flags: CmdFlags) -> io::Result<()> {
        for (at, n) in Self::pieces(offset, buf.len() as u64, MAX_PAYLOAD) {
            let start = (at - offset) as usize;
            self.call(CMD_WRITE, flags, at, n, &buf[start..start + n as usize])?;
            self.acked(flags.contains(CmdFlags::FUA));
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
        let eio = || io::Error::from_raw_os_error(libc::EIO);
        if self.shared.flush_poisoned() {
            return Err(eio());
        }
        let mark = self.shared.flush_mark();
        match self.request(CMD_FLUSH, CmdFlags::empty(), 0, 0, &[], None) {
            // The connection may have been lost, with unflushed writes, while it was sent.
            Ok(_) if self.shared.flush_poisoned() => Err(eio()),
            Ok(_) => {
                self.shared.flushed(mark);
                Ok(())
            }
            Err(Failed::Lost(e)) => Err(e),
            Err(Failed::Server(errno)) => {
                self.shared
                    .poison_flush("the server failed a flush of written data");
                Err(io::Error::from_raw_os_error(errno))
            }
        }
    }

    fn write_zeroes(&self, offset: u64, len: u64, no_hole: bool, fua: bool) -> io::Result<()> {
        if !self.has(TransmissionFlags::SEND_WRITE_ZEROES) {
            return Err(Self::unsupported());
        }
        let native_fua = fua && self.has(TransmissionFlags::SEND_FUA);
        let mut flags = CmdFlags::empty();
        flags.set(CmdFlags::NO_HOLE, no_hole);
        flags.set(CmdFlags::FUA, native_fua);
        // Partial blocks at either end get zeroes written (a read-modify-write).
        let end = offset + len;
        let inner = offset.next_multiple_of(self.align).min(end);
        let inner_end = (end - end % self.align).max(inner);
        for (a, b) in [(offset, inner), (inner_end, end)] {
            if a < b {
                self.write(a, &vec![0u8; (b - a) as usize], native_fua)?;
            }
        }
        {
            let _shared = self.rmw.read();
            for (at, n) in Self::pieces(inner, inner_end - inner, MAX_EFFECT) {
                self.call(CMD_WRITE_ZEROES, flags, at, n, &[])?;
                self.acked(native_fua);
            }
        }
        if fua && !native_fua {
            self.flush()?;
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
    /// NBD_CMD_DISC, then the connection closes (the reader thread sees its end, a
    /// connector thread stops trying).
    fn drop(&mut self) {
        let Some(writer) = self.shared.quit("the image was closed".into()) else {
            return;
        };
        let mut hdr = Vec::new();
        let req = wire::Request {
            flags: CmdFlags::empty(),
            cmd: CMD_DISC,
            cookie: 0,
            offset: 0,
            len: 0,
        };
        wire::encode_request(&mut hdr, &req, false);
        let mut w = writer.lock();
        let _ = std::io::Write::write_all(&mut *w, &hdr);
        w.shutdown();
    }
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
