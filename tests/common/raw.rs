//! A raw NBD client for hostile-client tests: every byte is the test's to choose, and every
//! answer is returned as it came (or as "closed"), never interpreted away.

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const EXT_REQUEST_MAGIC: u32 = 0x21e4_1c71;
pub const SIMPLE_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_MAGIC: u32 = 0x668e_33ef;
pub const EXTENDED_MAGIC: u32 = 0x6e8a_278c;

pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;
pub const OPT_EXTENDED_HEADERS: u32 = 11;

pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const ERR_UNSUP: u32 = 0x8000_0001;
pub const ERR_POLICY: u32 = 0x8000_0002;
pub const ERR_INVALID: u32 = 0x8000_0003;
pub const ERR_TLS_REQD: u32 = 0x8000_0005;
pub const ERR_UNKNOWN: u32 = 0x8000_0006;
pub const ERR_EXT_HEADER_REQD: u32 = 0x8000_000a;

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

pub const FLAG_FUA: u16 = 1;
pub const FLAG_NO_HOLE: u16 = 2;
pub const FLAG_DF: u16 = 4;
pub const FLAG_REQ_ONE: u16 = 8;
pub const FLAG_FAST_ZERO: u16 = 16;
pub const FLAG_PAYLOAD_LEN: u16 = 32;

pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;

/// How a connection reaches transmission.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Neg {
    /// NBD_OPT_EXPORT_NAME "": simple replies.
    Simple,
    /// STRUCTURED_REPLY, SET_META_CONTEXT base:allocation, GO.
    Structured,
    /// EXTENDED_HEADERS, SET_META_CONTEXT base:allocation, GO.
    Extended,
}

pub struct Raw {
    pub s: UnixStream,
    pub neg: Neg,
}

/// One option reply: (option, reply type, data).
pub type OptReply = (u32, u32, Vec<u8>);

/// One reply to a request, all chunks gathered.
#[derive(Debug, Default)]
pub struct Resp {
    pub cookie: u64,
    /// 0 for success, else the first error chunk's (or the simple reply's) errno.
    pub errno: u32,
    /// Reply chunk types, in order (empty for a simple reply).
    pub chunks: Vec<u16>,
    /// Data of a read (simple reply), or of OFFSET_DATA chunks in order.
    pub data: Vec<u8>,
    /// The error chunk's message.
    pub msg: String,
}

pub fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().expect("4 bytes"))
}

pub fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().expect("8 bytes"))
}

/// Option data for INFO/GO: name, then the info requests.
pub fn info_request(name: &[u8], items: &[u16]) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name);
    d.extend_from_slice(&(items.len() as u16).to_be_bytes());
    for i in items {
        d.extend_from_slice(&i.to_be_bytes());
    }
    d
}

/// Option data for LIST/SET_META_CONTEXT.
pub fn meta_request(name: &[u8], queries: &[&[u8]]) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name);
    d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        d.extend_from_slice(&(q.len() as u32).to_be_bytes());
        d.extend_from_slice(q);
    }
    d
}

pub fn option(code: u32, data: &[u8]) -> Vec<u8> {
    option_claiming(code, data.len() as u32, data)
}

/// An option header claiming `len` bytes of data, followed by `data` (which may differ).
pub fn option_claiming(code: u32, len: u32, data: &[u8]) -> Vec<u8> {
    let mut m = IHAVEOPT.to_be_bytes().to_vec();
    m.extend_from_slice(&code.to_be_bytes());
    m.extend_from_slice(&len.to_be_bytes());
    m.extend_from_slice(data);
    m
}

impl Raw {
    /// Connect; nothing read or sent yet.
    pub fn connect(path: &Path) -> Raw {
        let s = UnixStream::connect(path).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(15)))
            .expect("timeout");
        s.set_write_timeout(Some(Duration::from_secs(15)))
            .expect("timeout");
        Raw {
            s,
            neg: Neg::Simple,
        }
    }

    /// Connect and read the greeting (checked).
    pub fn greeted(path: &Path) -> Raw {
        let mut r = Raw::connect(path);
        let mut g = [0u8; 18];
        r.s.read_exact(&mut g).expect("greeting");
        assert_eq!(&g[..16], b"NBDMAGICIHAVEOPT", "greeting");
        r
    }

    /// Greeting read, client flags sent (fixed newstyle, no zeroes).
    pub fn start(path: &Path) -> Raw {
        let mut r = Raw::greeted(path);
        r.send(&3u32.to_be_bytes());
        r
    }

    /// Send bytes; a failure (the server closed) is not an error here.
    pub fn send(&mut self, b: &[u8]) -> bool {
        self.s.write_all(b).is_ok()
    }

    pub fn opt(&mut self, code: u32, data: &[u8]) -> bool {
        self.send(&option(code, data))
    }

    /// The next option reply; None when the connection ended instead.
    pub fn reply(&mut self) -> Option<OptReply> {
        let mut h = [0u8; 20];
        self.s.read_exact(&mut h).ok()?;
        assert_eq!(be64(&h), OPT_REPLY_MAGIC, "option reply magic");
        let len = be32(&h[16..]) as usize;
        assert!(len <= 1 << 20, "option reply of {len} bytes");
        let mut d = vec![0u8; len];
        self.s.read_exact(&mut d).ok()?;
        Some((be32(&h[8..]), be32(&h[12..]), d))
    }

    /// Replies up to and including the final one (ACK or an error).
    pub fn replies(&mut self) -> Option<Vec<OptReply>> {
        let mut out = Vec::new();
        loop {
            let r = self.reply()?;
            let last = r.1 == REP_ACK || r.1 & 0x8000_0000 != 0;
            out.push(r);
            if last {
                return Some(out);
            }
        }
    }

    /// Send one option and return the type of its final reply (None: closed).
    pub fn ask(&mut self, code: u32, data: &[u8]) -> Option<u32> {
        if !self.opt(code, data) {
            return None;
        }
        self.replies()?.last().map(|r| r.1)
    }

    /// True when the server has closed the connection (EOF or reset) within 15 s.
    pub fn closed(&mut self) -> bool {
        let mut b = [0u8; 4096];
        loop {
            match self.s.read(&mut b) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return !matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
            }
        }
    }

    /// A connection in transmission, negotiated as `neg`.
    pub fn negotiate(path: &Path, neg: Neg) -> Raw {
        let mut r = Raw::start(path);
        r.neg = neg;
        match neg {
            Neg::Simple => {
                r.opt(OPT_EXPORT_NAME, b"");
                let mut info = [0u8; 10];
                r.s.read_exact(&mut info).expect("export info");
            }
            Neg::Structured | Neg::Extended => {
                let code = if neg == Neg::Extended {
                    OPT_EXTENDED_HEADERS
                } else {
                    OPT_STRUCTURED_REPLY
                };
                assert_eq!(r.ask(code, &[]), Some(REP_ACK));
                let meta = meta_request(b"", &[b"base:allocation"]);
                assert_eq!(r.ask(OPT_SET_META_CONTEXT, &meta), Some(REP_ACK));
                assert_eq!(r.ask(OPT_GO, &info_request(b"", &[])), Some(REP_ACK));
            }
        }
        r
    }

    /// One request header (and payload) in this connection's header format.
    pub fn request(
        &mut self,
        flags: u16,
        cmd: u16,
        cookie: u64,
        offset: u64,
        len: u64,
        payload: &[u8],
    ) -> bool {
        let mut m = Vec::with_capacity(32 + payload.len());
        if self.neg == Neg::Extended {
            m.extend_from_slice(&EXT_REQUEST_MAGIC.to_be_bytes());
        } else {
            m.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        }
        m.extend_from_slice(&flags.to_be_bytes());
        m.extend_from_slice(&cmd.to_be_bytes());
        m.extend_from_slice(&cookie.to_be_bytes());
        m.extend_from_slice(&offset.to_be_bytes());
        if self.neg == Neg::Extended {
            m.extend_from_slice(&len.to_be_bytes());
        } else {
            m.extend_from_slice(&(len as u32).to_be_bytes());
        }
        m.extend_from_slice(payload);
        self.send(&m)
    }

    /// The reply to a request; `read_len` is the data a successful simple-reply read
    /// carries. None when the connection ended instead.
    pub fn response(&mut self, read_len: usize) -> Option<Resp> {
        let mut magic = [0u8; 4];
        self.s.read_exact(&mut magic).ok()?;
        match be32(&magic) {
            SIMPLE_MAGIC => {
                let mut h = [0u8; 12];
                self.s.read_exact(&mut h).ok()?;
                let mut r = Resp {
                    errno: be32(&h),
                    cookie: be64(&h[4..]),
                    ..Default::default()
                };
                if r.errno == 0 && read_len > 0 {
                    r.data = vec![0u8; read_len];
                    self.s.read_exact(&mut r.data).ok()?;
                }
                Some(r)
            }
            STRUCTURED_MAGIC | EXTENDED_MAGIC => {
                let extended = be32(&magic) == EXTENDED_MAGIC;
                let mut r = Resp::default();
                let mut first = true;
                loop {
                    if !first {
                        self.s.read_exact(&mut magic).ok()?;
                    }
                    first = false;
                    let mut h = vec![0u8; if extended { 28 } else { 16 }];
                    self.s.read_exact(&mut h).ok()?;
                    let flags = u16::from_be_bytes([h[0], h[1]]);
                    let typ = u16::from_be_bytes([h[2], h[3]]);
                    r.cookie = be64(&h[4..]);
                    let len = if extended {
                        be64(&h[20..])
                    } else {
                        u64::from(be32(&h[12..]))
                    };
                    assert!(len <= 64 << 20, "reply chunk of {len} bytes");
                    let mut p = vec![0u8; len as usize];
                    self.s.read_exact(&mut p).ok()?;
                    r.chunks.push(typ);
                    if typ & 0x8000 != 0 && r.errno == 0 && p.len() >= 6 {
                        r.errno = be32(&p);
                        let ml = u16::from_be_bytes([p[4], p[5]]) as usize;
                        r.msg = String::from_utf8_lossy(&p[6..(6 + ml).min(p.len())]).into();
                    }
                    if typ == 1 && p.len() >= 8 {
                        r.data.extend_from_slice(&p[8..]);
                    }
                    if flags & 1 != 0 {
                        return Some(r);
                    }
                }
            }
            m => panic!("reply magic {m:#x}"),
        }
    }

    /// Send a request and return its reply's errno (None: the connection ended).
    pub fn errno(
        &mut self,
        flags: u16,
        cmd: u16,
        offset: u64,
        len: u64,
        payload: &[u8],
    ) -> Option<u32> {
        if !self.request(flags, cmd, 7, offset, len, payload) {
            return None;
        }
        let read_len = if cmd == CMD_READ { len as usize } else { 0 };
        self.response(read_len).map(|r| r.errno)
    }
}
