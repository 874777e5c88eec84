//! Pure encoding and decoding of NBD messages: no I/O, lengths checked before use, so every
//! decoder can be fed hostile bytes in unit tests and fuzzers.

mod chunk;
mod option;

pub use chunk::*;
pub use option::*;

use super::proto::*;

/// A transmission-phase request, from either header style.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    pub flags: CmdFlags,
    pub cmd: u16,
    pub cookie: u64,
    pub offset: u64,
    /// The effect length, or with PAYLOAD_LEN the payload length.
    pub len: u64,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("invalid request magic {0:#x}")]
    BadMagic(u32),
    #[error("invalid option magic {0:#x}")]
    BadOptionMagic(u64),
}

pub const COMPACT_REQUEST_LEN: usize = 28;
pub const EXTENDED_REQUEST_LEN: usize = 32;

pub fn request_len(extended: bool) -> usize {
    if extended {
        EXTENDED_REQUEST_LEN
    } else {
        COMPACT_REQUEST_LEN
    }
}

pub(crate) fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}
pub(crate) fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}
pub(crate) fn be64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

/// Decode one request header. `Ok(None)`: not enough bytes yet.
pub fn decode_request(buf: &[u8], extended: bool) -> Result<Option<Request>, WireError> {
    let need = request_len(extended);
    if buf.len() < need {
        return Ok(None);
    }
    let magic = be32(buf);
    let want = if extended {
        EXTENDED_REQUEST_MAGIC
    } else {
        REQUEST_MAGIC
    };
    if magic != want {
        return Err(WireError::BadMagic(magic));
    }
    let flags = CmdFlags::from_bits_retain(be16(&buf[4..]));
    let cmd = be16(&buf[6..]);
    let cookie = be64(&buf[8..]);
    let offset = be64(&buf[16..]);
    let len = if extended {
        be64(&buf[24..])
    } else {
        be32(&buf[24..]) as u64
    };
    Ok(Some(Request {
        flags,
        cmd,
        cookie,
        offset,
        len,
    }))
}

pub fn encode_request(out: &mut Vec<u8>, r: &Request, extended: bool) {
    if extended {
        out.extend_from_slice(&EXTENDED_REQUEST_MAGIC.to_be_bytes());
    } else {
        out.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
    }
    out.extend_from_slice(&r.flags.bits().to_be_bytes());
    out.extend_from_slice(&r.cmd.to_be_bytes());
    out.extend_from_slice(&r.cookie.to_be_bytes());
    out.extend_from_slice(&r.offset.to_be_bytes());
    if extended {
        out.extend_from_slice(&r.len.to_be_bytes());
    } else {
        out.extend_from_slice(&(r.len as u32).to_be_bytes());
    }
}

/// A client's option header: (option, data length).
pub fn decode_option_header(buf: &[u8; 16]) -> Result<(u32, u32), WireError> {
    let magic = be64(buf);
    if magic != IHAVEOPT {
        return Err(WireError::BadOptionMagic(magic));
    }
    Ok((be32(&buf[8..]), be32(&buf[12..])))
}

pub fn encode_option_reply(out: &mut Vec<u8>, opt: u32, rep: u32, data: &[u8]) {
    out.extend_from_slice(&REP_MAGIC.to_be_bytes());
    out.extend_from_slice(&opt.to_be_bytes());
    out.extend_from_slice(&rep.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

/// A cursor over option data that never reads past its end.
pub struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Reader<'a> {
        Reader { buf }
    }
    pub fn remaining(&self) -> usize {
        self.buf.len()
    }
    pub fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.buf.len() < n {
            return None;
        }
        let (a, b) = self.buf.split_at(n);
        self.buf = b;
        Some(a)
    }
    pub fn u16(&mut self) -> Option<u16> {
        self.bytes(2).map(be16)
    }
    pub fn u32(&mut self) -> Option<u32> {
        self.bytes(4).map(be32)
    }
    pub fn u64(&mut self) -> Option<u64> {
        self.bytes(8).map(be64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trips_in_both_styles() {
        let r = Request {
            flags: CmdFlags::FUA,
            cmd: CMD_WRITE,
            cookie: 0x1122,
            offset: 4096,
            len: 512,
        };
        for ext in [false, true] {
            let mut b = Vec::new();
            encode_request(&mut b, &r, ext);
            assert_eq!(b.len(), request_len(ext));
            assert_eq!(decode_request(&b, ext).unwrap(), Some(r));
            assert_eq!(decode_request(&b[..b.len() - 1], ext).unwrap(), None);
        }
    }

    #[test]
    fn wrong_magic_is_an_error_not_a_panic() {
        let mut b = Vec::new();
        let r = Request {
            flags: CmdFlags::empty(),
            cmd: 0,
            cookie: 0,
            offset: 0,
            len: 0,
        };
        encode_request(&mut b, &r, false);
        assert_eq!(decode_request(&b, true), Ok(None));
        b.extend_from_slice(&[0; 4]);
        assert!(matches!(
            decode_request(&b, true),
            Err(WireError::BadMagic(REQUEST_MAGIC))
        ));
        assert!(matches!(
            decode_request(&[0xffu8; 28], false),
            Err(WireError::BadMagic(_))
        ));
    }

    #[test]
    fn unknown_flags_are_kept_for_the_validator() {
        let mut b = Vec::new();
        let r = Request {
            flags: CmdFlags::from_bits_retain(0x8000),
            cmd: 99,
            cookie: 1,
            offset: 0,
            len: 0,
        };
        encode_request(&mut b, &r, false);
        let d = decode_request(&b, false).unwrap().unwrap();
        assert_eq!(d.flags.bits(), 0x8000);
        assert_eq!(d.cmd, 99);
    }

    #[test]
    fn reader_stops_at_the_end() {
        let mut r = Reader::new(&[0, 0, 0, 5, 1]);
        assert_eq!(r.u32(), Some(5));
        assert_eq!(r.u16(), None);
        assert_eq!(r.bytes(1), Some(&[1u8][..]));
        assert_eq!(r.u64(), None);
    }

    #[test]
    fn option_header_checks_magic() {
        let mut h = [0u8; 16];
        h[..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
        h[8..12].copy_from_slice(&7u32.to_be_bytes());
        h[12..].copy_from_slice(&3u32.to_be_bytes());
        assert_eq!(decode_option_header(&h), Ok((7, 3)));
        h[0] = 0;
        assert!(decode_option_header(&h).is_err());
    }
}
