//! The reader thread of one connection of an [`super::remote::NbdRemote`]: every reply
//! into the slot its cookie names, until the connection ends (then [`Shared::end`] says
//! how: a socket error is worth connecting again, a protocol error is not).

use super::link::{Loss, Shared, Slot};
use crate::nbd::proto::*;
use crate::nbd::wire::{self, ReplyHeader};
use crate::transport::Stream;
use std::io::{self, BufRead, BufReader, Read};
use std::sync::Arc;

/// Bytes read from the socket at once: at a queue depth of 32, the 4 KiB replies waiting
/// there come in one or two recvs instead of three each (magic, header, data). Not more: a
/// large read's data that came in with its header is copied out of this buffer, only the
/// rest goes straight to its own (with 256 KiB, nbdcopy's reads were copied twice).
const READ_BUFFER: usize = 64 << 10;

/// Every reply of connection `gen`, until it ends.
pub fn read_replies(r: Stream, shared: &Arc<Shared>, gen: u64) {
    let mut r = BufReader::with_capacity(READ_BUFFER, r);
    let why = loop {
        if let Err(e) = read_one(&mut r, shared) {
            break e;
        }
    };
    shared.end(gen, why);
}

pub fn errno_of(nbd: u32) -> i32 {
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

type Replies = BufReader<Stream>;

fn bad(msg: impl Into<String>) -> Loss {
    Loss::Protocol(msg.into())
}

fn read_exact(r: &mut Replies, buf: &mut [u8]) -> Result<(), Loss> {
    r.read_exact(buf).map_err(lost)
}

fn lost(e: io::Error) -> Loss {
    Loss::Io(match e.kind() {
        io::ErrorKind::UnexpectedEof => "the server closed the connection".to_string(),
        _ => e.to_string(),
    })
}

/// The slot a reply is for; it stays pending (so a connection that dies while its reply is
/// read fails it too) until [`finish`] takes it out.
fn slot_of(shared: &Shared, cookie: u64) -> Result<Arc<Slot>, Loss> {
    shared
        .pending
        .lock()
        .get(&cookie)
        .cloned()
        .ok_or_else(|| bad(format!("reply for unknown cookie {cookie:#x}")))
}

/// The whole reply to `cookie` has been read.
fn finish(shared: &Shared, cookie: u64, slot: &Slot, error: Option<i32>) {
    shared.pending.lock().remove(&cookie);
    let error = error.or_else(|| {
        slot.short().then(|| {
            tracing::warn!(cookie, "NBD server's reply did not cover the whole read");
            libc::EIO
        })
    });
    slot.complete(error, false);
}

fn read_one(r: &mut Replies, shared: &Shared) -> Result<(), Loss> {
    let mut h = [0u8; 20];
    read_exact(r, &mut h[..4])?;
    let need = match u32::from_be_bytes([h[0], h[1], h[2], h[3]]) {
        SIMPLE_REPLY_MAGIC => 16,
        STRUCTURED_REPLY_MAGIC => 20,
        m => return Err(bad(format!("bad reply magic {m:#x}"))),
    };
    read_exact(r, &mut h[4..need])?;
    let header = match wire::decode_reply_header(&h[..need]) {
        Ok(Some((h, _))) => h,
        _ => return Err(bad("bad reply header")),
    };
    match header {
        ReplyHeader::Simple { error, cookie } => {
            let slot = slot_of(shared, cookie)?;
            if error != 0 {
                finish(shared, cookie, &slot, Some(errno_of(error)));
                return Ok(());
            }
            if slot.read.is_some() {
                read_into(r, &slot, 0, None)?;
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

/// Read a read's data into its buffer at `from` (`n` bytes, or all of it), or past it
/// when its requester is gone.
fn read_into(r: &mut Replies, slot: &Slot, from: usize, n: Option<usize>) -> Result<(), Loss> {
    let n = n.unwrap_or_else(|| slot.read.map_or(0, |(_, len)| len as usize));
    slot.fill(from, n, |buf| match buf {
        Some(buf) => read_payload(r, buf),
        None => skip(r, n),
    })
}

/// What the read-ahead buffer holds, then the rest straight from the socket into `buf`:
/// a large read's data is not copied through the buffer.
fn read_payload(r: &mut Replies, buf: &mut [u8]) -> Result<(), Loss> {
    let held = r.buffer();
    let k = held.len().min(buf.len());
    buf[..k].copy_from_slice(&held[..k]);
    r.consume(k);
    if k == buf.len() {
        return Ok(());
    }
    // The read-ahead buffer is empty now, so reading past it loses nothing.
    r.get_mut().read_exact(&mut buf[k..]).map_err(lost)
}

fn skip(r: &mut Replies, mut n: usize) -> Result<(), Loss> {
    while n > 0 {
        let held = r.fill_buf().map_err(lost)?;
        if held.is_empty() {
            return Err(lost(io::ErrorKind::UnexpectedEof.into()));
        }
        let k = held.len().min(n);
        r.consume(k);
        n -= k;
    }
    Ok(())
}

/// One structured reply chunk's payload, into its slot.
fn read_chunk(r: &mut Replies, slot: &Slot, typ: u16, len: u64) -> Result<(), Loss> {
    if typ == REPLY_TYPE_OFFSET_DATA {
        let (start, rlen) = slot
            .read
            .ok_or_else(|| bad("a data chunk for a request that is no read"))?;
        let mut off = [0u8; 8];
        if len < 8 {
            return Err(bad("short data chunk"));
        }
        read_exact(r, &mut off)?;
        let at = u64::from_be_bytes(off);
        let n = len - 8;
        if at < start || at + n > start + rlen {
            return Err(bad(format!(
                "data chunk at {at:#x} (+{n:#x}) outside its read"
            )));
        }
        return read_into(r, slot, (at - start) as usize, Some(n as usize));
    }
    // Every other chunk is small: the largest is a block status reply.
    if len > (1 << 20) {
        return Err(bad(format!("reply chunk of {len} bytes")));
    }
    let mut p = vec![0u8; len as usize];
    read_exact(r, &mut p)?;
    match typ {
        REPLY_TYPE_NONE => {}
        REPLY_TYPE_OFFSET_HOLE => {
            let (start, rlen) = slot
                .read
                .ok_or_else(|| bad("a hole chunk for a request that is no read"))?;
            let (at, n) = wire::decode_hole(&p).ok_or_else(|| bad("bad hole chunk"))?;
            let n = u64::from(n);
            if at < start || at + n > start + rlen {
                return Err(bad(format!(
                    "hole chunk at {at:#x} (+{n:#x}) outside its read"
                )));
            }
            slot.zero((at - start) as usize, n as usize);
        }
        REPLY_TYPE_BLOCK_STATUS => {
            let (_, runs) =
                wire::decode_block_status(&p, false).ok_or_else(|| bad("bad block status"))?;
            slot.state.lock().extents = runs
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
            slot.state.lock().error.get_or_insert(errno_of(errno));
        }
        // An unknown chunk type that is not an error: skipped.
        _ => {}
    }
    Ok(())
}
