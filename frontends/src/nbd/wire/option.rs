//! Option-phase payloads, both ways: what a client sends with INFO/GO and LIST/SET_META_CONTEXT,
//! and what a server answers in NBD_REP_SERVER, NBD_REP_INFO and NBD_REP_META_CONTEXT.
//! Decoders take untrusted bytes and never read past them.

use super::Reader;
use crate::nbd::proto::*;

/// INFO/GO data: `u32 namelen, name, u16 n, n * u16 info type`.
pub fn encode_info_request(out: &mut Vec<u8>, name: &str, items: &[u16]) {
    out.extend_from_slice(&(name.len() as u32).to_be_bytes());
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(&(items.len() as u16).to_be_bytes());
    for i in items {
        out.extend_from_slice(&i.to_be_bytes());
    }
}

/// None when malformed (lengths wrong, name too long or not UTF-8).
pub fn decode_info_request(data: &[u8]) -> Option<(String, Vec<u16>)> {
    let mut r = Reader::new(data);
    let namelen = r.u32()? as usize;
    if namelen > MAX_STRING_SIZE {
        return None;
    }
    let name = String::from_utf8(r.bytes(namelen)?.to_vec()).ok()?;
    let n = r.u16()? as usize;
    let mut items = Vec::with_capacity(n.min(r.remaining() / 2));
    for _ in 0..n {
        items.push(r.u16()?);
    }
    if r.remaining() != 0 {
        return None;
    }
    Some((name, items))
}

/// LIST/SET_META_CONTEXT data: `u32 namelen, name, u32 n, n * (u32 len, query)`.
pub fn encode_meta_request(out: &mut Vec<u8>, name: &str, queries: &[&str]) {
    out.extend_from_slice(&(name.len() as u32).to_be_bytes());
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        out.extend_from_slice(&(q.len() as u32).to_be_bytes());
        out.extend_from_slice(q.as_bytes());
    }
}

pub fn decode_meta_request(data: &[u8]) -> Option<(String, Vec<String>)> {
    let mut r = Reader::new(data);
    let namelen = r.u32()? as usize;
    if namelen > MAX_STRING_SIZE {
        return None;
    }
    let name = String::from_utf8(r.bytes(namelen)?.to_vec()).ok()?;
    let n = r.u32()? as usize;
    // Each query takes at least 4 bytes: bound the allocation by what was sent.
    let mut queries = Vec::with_capacity(n.min(r.remaining() / 4));
    for _ in 0..n {
        // qemu skips a query longer than NBD_MAX_STRING_SIZE and answers the others; such a
        // query matches no context (every name is shorter), so keeping it is the same.
        let len = r.u32()? as usize;
        queries.push(String::from_utf8_lossy(r.bytes(len)?).into_owned());
    }
    if r.remaining() != 0 {
        return None;
    }
    Some((name, queries))
}

/// NBD_REP_SERVER: `u32 namelen, name, description`.
pub fn encode_rep_server(out: &mut Vec<u8>, name: &str, description: &str) {
    out.extend_from_slice(&(name.len() as u32).to_be_bytes());
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(description.as_bytes());
}

pub fn decode_rep_server(data: &[u8]) -> Option<(String, String)> {
    let mut r = Reader::new(data);
    let n = r.u32()? as usize;
    let name = r.bytes(n)?;
    let rest = r.bytes(r.remaining())?;
    Some((
        String::from_utf8_lossy(name).into_owned(),
        String::from_utf8_lossy(rest).into_owned(),
    ))
}

/// One NBD_REP_INFO payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Info {
    Export {
        size: u64,
        flags: u16,
    },
    Name(String),
    Description(String),
    BlockSize {
        min: u32,
        preferred: u32,
        max: u32,
    },
    /// A type this side does not know (clients ignore it).
    Unknown(u16),
}

pub fn encode_info(out: &mut Vec<u8>, info: &Info) {
    match info {
        Info::Export { size, flags } => {
            out.extend_from_slice(&INFO_EXPORT.to_be_bytes());
            out.extend_from_slice(&size.to_be_bytes());
            out.extend_from_slice(&flags.to_be_bytes());
        }
        Info::Name(n) => {
            out.extend_from_slice(&INFO_NAME.to_be_bytes());
            out.extend_from_slice(n.as_bytes());
        }
        Info::Description(d) => {
            out.extend_from_slice(&INFO_DESCRIPTION.to_be_bytes());
            out.extend_from_slice(d.as_bytes());
        }
        Info::BlockSize {
            min,
            preferred,
            max,
        } => {
            out.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
            for v in [min, preferred, max] {
                out.extend_from_slice(&v.to_be_bytes());
            }
        }
        Info::Unknown(t) => out.extend_from_slice(&t.to_be_bytes()),
    }
}

/// None when a known type is short.
pub fn decode_info(data: &[u8]) -> Option<Info> {
    let mut r = Reader::new(data);
    let typ = r.u16()?;
    let rest_text = |r: &mut Reader<'_>| {
        String::from_utf8_lossy(r.bytes(r.remaining()).unwrap_or_default()).into_owned()
    };
    Some(match typ {
        INFO_EXPORT => Info::Export {
            size: r.u64()?,
            flags: r.u16()?,
        },
        INFO_NAME => Info::Name(rest_text(&mut r)),
        INFO_DESCRIPTION => Info::Description(rest_text(&mut r)),
        INFO_BLOCK_SIZE => Info::BlockSize {
            min: r.u32()?,
            preferred: r.u32()?,
            max: r.u32()?,
        },
        t => Info::Unknown(t),
    })
}

/// NBD_REP_META_CONTEXT: `u32 id, name`.
pub fn encode_meta_context(out: &mut Vec<u8>, id: u32, name: &str) {
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(name.as_bytes());
}

pub fn decode_meta_context(data: &[u8]) -> Option<(u32, String)> {
    let mut r = Reader::new(data);
    let id = r.u32()?;
    let name = r.bytes(r.remaining())?;
    Some((id, String::from_utf8_lossy(name).into_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip() {
        let mut b = Vec::new();
        encode_info_request(&mut b, "disk", &[INFO_NAME, INFO_BLOCK_SIZE]);
        assert_eq!(
            decode_info_request(&b),
            Some(("disk".into(), vec![INFO_NAME, INFO_BLOCK_SIZE]))
        );
        assert_eq!(decode_info_request(&b[..b.len() - 1]), None);
        b.clear();
        encode_meta_request(&mut b, "", &["base:allocation", "qemu:"]);
        assert_eq!(
            decode_meta_request(&b),
            Some((
                String::new(),
                vec!["base:allocation".into(), "qemu:".into()]
            ))
        );
        b.push(0);
        assert_eq!(decode_meta_request(&b), None, "trailing bytes");
        b.clear();
        let long = "x".repeat(MAX_STRING_SIZE + 1);
        encode_meta_request(&mut b, "", &[&long, "base:allocation"]);
        let (_, q) = decode_meta_request(&b).expect("an over-long query is no error");
        assert_eq!(q.len(), 2);
    }

    #[test]
    fn hostile_counts_do_not_allocate() {
        // A million queries announced, none sent.
        let mut b = 0u32.to_be_bytes().to_vec();
        b.extend_from_slice(&1_000_000u32.to_be_bytes());
        assert_eq!(decode_meta_request(&b), None);
        let mut b = 0u32.to_be_bytes().to_vec();
        b.extend_from_slice(&u16::MAX.to_be_bytes());
        assert_eq!(decode_info_request(&b), None);
    }

    #[test]
    fn replies_round_trip() {
        let mut b = Vec::new();
        encode_rep_server(&mut b, "a", "the disk");
        assert_eq!(decode_rep_server(&b), Some(("a".into(), "the disk".into())));
        assert_eq!(decode_rep_server(&[0, 0, 0, 9, b'x']), None);
        for i in [
            Info::Export {
                size: 1 << 40,
                flags: 0x1234,
            },
            Info::Name("n".into()),
            Info::Description("d".into()),
            Info::BlockSize {
                min: 1,
                preferred: 4096,
                max: 1 << 25,
            },
            Info::Unknown(77),
        ] {
            b.clear();
            encode_info(&mut b, &i);
            assert_eq!(decode_info(&b), Some(i));
        }
        assert_eq!(decode_info(&INFO_EXPORT.to_be_bytes()), None);
        b.clear();
        encode_meta_context(&mut b, 7, "base:allocation");
        assert_eq!(decode_meta_context(&b), Some((7, "base:allocation".into())));
        assert_eq!(decode_meta_context(&[0, 0]), None);
    }
}
