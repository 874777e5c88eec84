//! Transmission-phase replies, both ways: simple replies and the chunks of structured and
//! extended replies (NONE, OFFSET_DATA, OFFSET_HOLE, BLOCK_STATUS, BLOCK_STATUS_EXT, ERROR).
//! The server encodes them; the client and the tests decode them.

use super::{be16, be32, be64, Reader};
use crate::nbd::proto::*;

/// The header of one structured (or, with extended headers, extended) reply chunk.
/// `offset` is the request's offset; only the extended header carries it.
pub fn encode_chunk_header(
    out: &mut Vec<u8>,
    extended: bool,
    flags: u16,
    typ: u16,
    cookie: u64,
    offset: u64,
    payload_len: u64,
) {
    if extended {
        out.extend_from_slice(&EXTENDED_REPLY_MAGIC.to_be_bytes());
    } else {
        out.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    }
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&typ.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
    if extended {
        out.extend_from_slice(&offset.to_be_bytes());
        out.extend_from_slice(&payload_len.to_be_bytes());
    } else {
        out.extend_from_slice(&(payload_len as u32).to_be_bytes());
    }
}

pub fn encode_simple_reply(out: &mut Vec<u8>, error: u32, cookie: u64) {
    out.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
}

/// A final chunk with no payload (success of a command without data).
pub fn encode_done(out: &mut Vec<u8>, extended: bool, cookie: u64, offset: u64) {
    encode_chunk_header(
        out,
        extended,
        REPLY_FLAG_DONE,
        REPLY_TYPE_NONE,
        cookie,
        offset,
        0,
    );
}

/// An OFFSET_DATA chunk's header and data offset; the `len` data bytes follow it.
pub fn encode_data_header(
    out: &mut Vec<u8>,
    extended: bool,
    flags: u16,
    cookie: u64,
    req_offset: u64,
    data_offset: u64,
    len: u64,
) {
    encode_chunk_header(
        out,
        extended,
        flags,
        REPLY_TYPE_OFFSET_DATA,
        cookie,
        req_offset,
        8 + len,
    );
    out.extend_from_slice(&data_offset.to_be_bytes());
}

/// An OFFSET_HOLE chunk: `len` bytes at `hole_offset` read as zeroes.
pub fn encode_hole(
    out: &mut Vec<u8>,
    extended: bool,
    flags: u16,
    cookie: u64,
    req_offset: u64,
    hole_offset: u64,
    len: u32,
) {
    encode_chunk_header(
        out,
        extended,
        flags,
        REPLY_TYPE_OFFSET_HOLE,
        cookie,
        req_offset,
        12,
    );
    out.extend_from_slice(&hole_offset.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
}

/// A BLOCK_STATUS (compact: 32-bit lengths, which the caller has split to fit) or
/// BLOCK_STATUS_EXT chunk for one meta context: `(length, flags)` runs.
#[allow(clippy::too_many_arguments)]
pub fn encode_block_status(
    out: &mut Vec<u8>,
    extended: bool,
    flags: u16,
    cookie: u64,
    req_offset: u64,
    context: u32,
    runs: &[(u64, u32)],
) {
    if extended {
        let plen = 8 + 16 * runs.len() as u64;
        encode_chunk_header(
            out,
            true,
            flags,
            REPLY_TYPE_BLOCK_STATUS_EXT,
            cookie,
            req_offset,
            plen,
        );
        out.extend_from_slice(&context.to_be_bytes());
        out.extend_from_slice(&(runs.len() as u32).to_be_bytes());
        for (l, v) in runs {
            out.extend_from_slice(&l.to_be_bytes());
            out.extend_from_slice(&u64::from(*v).to_be_bytes());
        }
    } else {
        let plen = 4 + 8 * runs.len() as u64;
        encode_chunk_header(
            out,
            false,
            flags,
            REPLY_TYPE_BLOCK_STATUS,
            cookie,
            req_offset,
            plen,
        );
        out.extend_from_slice(&context.to_be_bytes());
        for (l, v) in runs {
            out.extend_from_slice(&(*l as u32).to_be_bytes());
            out.extend_from_slice(&v.to_be_bytes());
        }
    }
}

/// An NBD_REPLY_TYPE_ERROR chunk with its message (cut to what a u16 length allows).
pub fn encode_error_chunk(
    out: &mut Vec<u8>,
    extended: bool,
    cookie: u64,
    offset: u64,
    error: u32,
    msg: &str,
) {
    let msg = &msg.as_bytes()[..msg.len().min(4096)];
    encode_chunk_header(
        out,
        extended,
        REPLY_FLAG_DONE,
        REPLY_TYPE_ERROR,
        cookie,
        offset,
        6 + msg.len() as u64,
    );
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    out.extend_from_slice(msg);
}

/// A decoded reply header of any style.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplyHeader {
    Simple {
        error: u32,
        cookie: u64,
    },
    Chunk {
        flags: u16,
        typ: u16,
        cookie: u64,
        /// The request's offset (extended headers only; 0 otherwise).
        offset: u64,
        len: u64,
    },
}

/// Decode a reply header from the front of `buf`: the header and its length, None when
/// `buf` is too short, Err for an unknown magic.
pub fn decode_reply_header(buf: &[u8]) -> Result<Option<(ReplyHeader, usize)>, u32> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let magic = be32(buf);
    let need = match magic {
        SIMPLE_REPLY_MAGIC => 16,
        STRUCTURED_REPLY_MAGIC => 20,
        EXTENDED_REPLY_MAGIC => 32,
        m => return Err(m),
    };
    if buf.len() < need {
        return Ok(None);
    }
    let h = match magic {
        SIMPLE_REPLY_MAGIC => ReplyHeader::Simple {
            error: be32(&buf[4..]),
            cookie: be64(&buf[8..]),
        },
        STRUCTURED_REPLY_MAGIC => ReplyHeader::Chunk {
            flags: be16(&buf[4..]),
            typ: be16(&buf[6..]),
            cookie: be64(&buf[8..]),
            offset: 0,
            len: u64::from(be32(&buf[16..])),
        },
        _ => ReplyHeader::Chunk {
            flags: be16(&buf[4..]),
            typ: be16(&buf[6..]),
            cookie: be64(&buf[8..]),
            offset: be64(&buf[16..]),
            len: be64(&buf[24..]),
        },
    };
    Ok(Some((h, need)))
}

/// A BLOCK_STATUS(_EXT) payload: the context id and its `(length, flags)` runs.
pub fn decode_block_status(payload: &[u8], extended: bool) -> Option<(u32, Vec<(u64, u32)>)> {
    let mut r = Reader::new(payload);
    let id = r.u32()?;
    let mut runs = Vec::new();
    if extended {
        let n = r.u32()? as usize;
        if r.remaining() != n.checked_mul(16)? {
            return None;
        }
        for _ in 0..n {
            let l = r.u64()?;
            let v = u32::try_from(r.u64()?).ok()?;
            runs.push((l, v));
        }
    } else {
        if !r.remaining().is_multiple_of(8) {
            return None;
        }
        while r.remaining() > 0 {
            runs.push((u64::from(r.u32()?), r.u32()?));
        }
    }
    Some((id, runs))
}

/// An OFFSET_HOLE payload: (offset, length).
pub fn decode_hole(payload: &[u8]) -> Option<(u64, u32)> {
    let mut r = Reader::new(payload);
    let v = (r.u64()?, r.u32()?);
    (r.remaining() == 0).then_some(v)
}

/// An ERROR payload: (errno, message).
pub fn decode_error(payload: &[u8]) -> Option<(u32, String)> {
    let mut r = Reader::new(payload);
    let errno = r.u32()?;
    let n = r.u16()? as usize;
    let msg = r.bytes(n)?;
    Some((errno, String::from_utf8_lossy(msg).into_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(b: &[u8]) -> (ReplyHeader, usize) {
        decode_reply_header(b).unwrap().unwrap()
    }

    #[test]
    fn every_chunk_shape_round_trips_in_both_styles() {
        for ext in [false, true] {
            let mut b = Vec::new();
            encode_done(&mut b, ext, 9, 4096);
            let (h, n) = header(&b);
            assert_eq!(n, b.len());
            assert_eq!(
                h,
                ReplyHeader::Chunk {
                    flags: REPLY_FLAG_DONE,
                    typ: REPLY_TYPE_NONE,
                    cookie: 9,
                    offset: if ext { 4096 } else { 0 },
                    len: 0
                }
            );

            b.clear();
            encode_hole(&mut b, ext, 0, 1, 0, 512, 1024);
            let (h, n) = header(&b);
            assert!(matches!(
                h,
                ReplyHeader::Chunk {
                    typ: REPLY_TYPE_OFFSET_HOLE,
                    len: 12,
                    ..
                }
            ));
            assert_eq!(decode_hole(&b[n..]), Some((512, 1024)));

            b.clear();
            encode_data_header(&mut b, ext, REPLY_FLAG_DONE, 2, 0, 8192, 100);
            let (h, n) = header(&b);
            assert!(matches!(
                h,
                ReplyHeader::Chunk {
                    typ: REPLY_TYPE_OFFSET_DATA,
                    len: 108,
                    ..
                }
            ));
            assert_eq!(b.len() - n, 8);

            b.clear();
            let runs = [(65536, 0), (1 << 20, STATE_HOLE | STATE_ZERO)];
            encode_block_status(&mut b, ext, REPLY_FLAG_DONE, 3, 0, 5, &runs);
            let (h, n) = header(&b);
            let typ = if ext {
                REPLY_TYPE_BLOCK_STATUS_EXT
            } else {
                REPLY_TYPE_BLOCK_STATUS
            };
            assert!(matches!(h, ReplyHeader::Chunk { typ: t, .. } if t == typ));
            assert_eq!(decode_block_status(&b[n..], ext), Some((5, runs.to_vec())));

            b.clear();
            encode_error_chunk(&mut b, ext, 4, 0, EIO, "boom");
            let (h, n) = header(&b);
            assert!(matches!(
                h,
                ReplyHeader::Chunk {
                    typ: REPLY_TYPE_ERROR,
                    len: 10,
                    ..
                }
            ));
            assert_eq!(decode_error(&b[n..]), Some((EIO, "boom".into())));
        }
        let mut b = Vec::new();
        encode_simple_reply(&mut b, EPERM, 77);
        assert_eq!(
            header(&b),
            (
                ReplyHeader::Simple {
                    error: EPERM,
                    cookie: 77
                },
                16
            )
        );
    }

    #[test]
    fn hostile_payloads_are_refused() {
        assert_eq!(decode_reply_header(&[0x67, 0x44]), Ok(None));
        assert_eq!(decode_reply_header(&[1, 2, 3, 4, 5]), Err(0x0102_0304));
        assert_eq!(decode_block_status(&[0, 0, 0, 1, 0, 0], false), None);
        // An extended count far beyond the payload.
        let mut p = 1u32.to_be_bytes().to_vec();
        p.extend_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(decode_block_status(&p, true), None);
        assert_eq!(decode_error(&[0, 0, 0, 5, 0, 9, b'x']), None);
        assert_eq!(decode_hole(&[0; 13]), None);
    }

    #[test]
    fn long_error_messages_are_cut() {
        let mut b = Vec::new();
        encode_error_chunk(&mut b, false, 1, 0, EIO, &"x".repeat(10000));
        let (_, n) = header(&b);
        assert_eq!(decode_error(&b[n..]).map(|e| e.1.len()), Some(4096));
    }
}
