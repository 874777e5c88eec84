//! The fixed-newstyle handshake, server side: one function per option, in a loop bounded in
//! option count, option length and time, producing what the transmission phase needs.

use super::export::{Export, MAX_BLOCK, MIN_BLOCK, PREFERRED_BLOCK};
use super::meta::{self, MetaContext};
use crate::nbd::proto::*;
use crate::nbd::wire::{self, Reader};
use crate::transport::Stream;
use std::io::{self, Read, Write};
use std::time::Instant;

/// Most options one connection may send before we decide it is not a real client.
const MAX_OPTIONS: usize = 4096;
/// Longest option payload we accept (names, queries); longer ones end the connection.
const MAX_OPTION_LEN: u32 = 1 << 20;

/// What the client and server agreed on.
#[derive(Clone, Debug, Default)]
pub struct Negotiated {
    pub structured: bool,
    pub extended: bool,
    pub contexts: Vec<MetaContext>,
    pub flags: u16,
}

pub enum Outcome {
    /// Go on to transmission.
    Transmission(Negotiated),
    /// The client left (ABORT, EOF) before choosing an export.
    Closed,
}

struct Handshake<'a> {
    stream: &'a mut Stream,
    export: &'a Export,
    deadline: Option<Instant>,
    neg: Negotiated,
    /// The export the current meta context selection was made for.
    meta_export: Option<String>,
    out: Vec<u8>,
}

fn protocol_error(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// Run the handshake on `stream`. Errors mean "drop the connection".
pub fn negotiate(
    stream: &mut Stream,
    export: &Export,
    deadline: Option<Instant>,
) -> io::Result<Outcome> {
    let mut hs = Handshake {
        stream,
        export,
        deadline,
        neg: Negotiated::default(),
        meta_export: None,
        out: Vec::new(),
    };
    hs.run()
}

impl Handshake<'_> {
    fn read_exact(&mut self, buf: &mut [u8]) -> io::Result<()> {
        if let Some(d) = self.deadline {
            let left = d.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "handshake time limit reached",
                ));
            }
            self.stream.set_read_timeout(Some(left))?;
        }
        self.stream.read_exact(buf).map_err(|e| {
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) {
                io::Error::new(io::ErrorKind::TimedOut, "handshake time limit reached")
            } else {
                e
            }
        })
    }

    fn send(&mut self) -> io::Result<()> {
        let r = self.stream.write_all(&self.out);
        self.out.clear();
        r
    }

    fn reply(&mut self, opt: u32, rep: u32, data: &[u8]) -> io::Result<()> {
        wire::encode_option_reply(&mut self.out, opt, rep, data);
        self.send()
    }

    fn error(&mut self, opt: u32, rep: u32, msg: &str) -> io::Result<()> {
        tracing::debug!("option {} refused: {msg}", opt_name(opt));
        self.reply(opt, rep, msg.as_bytes())
    }

    fn run(&mut self) -> io::Result<Outcome> {
        let hflags = HandshakeFlags::FIXED_NEWSTYLE | HandshakeFlags::NO_ZEROES;
        self.out.extend_from_slice(&NBDMAGIC.to_be_bytes());
        self.out.extend_from_slice(&IHAVEOPT.to_be_bytes());
        self.out.extend_from_slice(&hflags.bits().to_be_bytes());
        self.send()?;

        let mut cf = [0u8; 4];
        match self.read_exact(&mut cf) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(Outcome::Closed),
            Err(e) => return Err(e),
        }
        let client_flags = u32::from_be_bytes(cf);
        let Some(client_flags) = ClientFlags::from_bits(client_flags) else {
            return Err(protocol_error(format!(
                "unknown client flags {client_flags:#x}"
            )));
        };
        let fixed = client_flags.contains(ClientFlags::C_FIXED_NEWSTYLE);
        let no_zeroes = client_flags.contains(ClientFlags::C_NO_ZEROES);

        for _ in 0..MAX_OPTIONS {
            let mut hdr = [0u8; 16];
            match self.read_exact(&mut hdr) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(Outcome::Closed),
                Err(e) => return Err(e),
            }
            let (opt, len) =
                wire::decode_option_header(&hdr).map_err(|e| protocol_error(e.to_string()))?;
            if len > MAX_OPTION_LEN {
                return Err(protocol_error(format!(
                    "option {opt} length {len} is too long"
                )));
            }
            let mut data = vec![0u8; len as usize];
            self.read_exact(&mut data)?;
            tracing::trace!("option {} ({opt}), {len} bytes", opt_name(opt));

            if opt == OPT_EXPORT_NAME {
                return self.opt_export_name(&data, no_zeroes);
            }
            if !fixed {
                return Err(protocol_error(
                    "option other than EXPORT_NAME without fixed newstyle",
                ));
            }
            match opt {
                OPT_ABORT => {
                    // The client may close before reading this; that is fine.
                    let _ = self.reply(opt, REP_ACK, &[]);
                    return Ok(Outcome::Closed);
                }
                OPT_LIST => self.opt_list(&data)?,
                OPT_STARTTLS => self.opt_starttls(&data)?,
                OPT_INFO | OPT_GO => {
                    if self.opt_info_go(opt, &data)? {
                        return Ok(Outcome::Transmission(std::mem::take(&mut self.neg)));
                    }
                }
                OPT_STRUCTURED_REPLY => self.opt_structured_reply(&data)?,
                OPT_EXTENDED_HEADERS => self.opt_extended_headers(&data)?,
                OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                    self.opt_meta_context(opt, &data)?
                }
                _ => self.error(
                    opt,
                    REP_ERR_UNSUP,
                    &format!("Unsupported option {opt} ({})", opt_name(opt)),
                )?,
            }
        }
        Err(protocol_error("too many options"))
    }

    fn opt_export_name(&mut self, data: &[u8], no_zeroes: bool) -> io::Result<Outcome> {
        if data != self.export.name.as_bytes() {
            // The protocol offers no way to refuse EXPORT_NAME but closing.
            return Err(protocol_error(format!(
                "export '{}' not present",
                String::from_utf8_lossy(data)
            )));
        }
        if self.meta_export.as_deref() != Some(self.export.name.as_str()) {
            self.neg.contexts.clear();
        }
        let flags = self
            .export
            .flags(self.neg.structured, self.neg.extended)
            .bits();
        self.neg.flags = flags;
        self.out
            .extend_from_slice(&self.export.device.size().to_be_bytes());
        self.out.extend_from_slice(&flags.to_be_bytes());
        if !no_zeroes {
            self.out.extend_from_slice(&[0u8; 124]);
        }
        self.send()?;
        Ok(Outcome::Transmission(std::mem::take(&mut self.neg)))
    }

    fn opt_list(&mut self, data: &[u8]) -> io::Result<()> {
        if !data.is_empty() {
            return self.error(
                OPT_LIST,
                REP_ERR_INVALID,
                "option 'list' has unexpected length",
            );
        }
        let name = self.export.name.as_bytes();
        let mut rep = Vec::with_capacity(4 + name.len() + self.export.description.len());
        rep.extend_from_slice(&(name.len() as u32).to_be_bytes());
        rep.extend_from_slice(name);
        rep.extend_from_slice(self.export.description.as_bytes());
        wire::encode_option_reply(&mut self.out, OPT_LIST, REP_SERVER, &rep);
        wire::encode_option_reply(&mut self.out, OPT_LIST, REP_ACK, &[]);
        self.send()
    }

    fn opt_starttls(&mut self, _data: &[u8]) -> io::Result<()> {
        self.error(OPT_STARTTLS, REP_ERR_POLICY, "TLS not configured")
    }

    fn opt_structured_reply(&mut self, data: &[u8]) -> io::Result<()> {
        let opt = OPT_STRUCTURED_REPLY;
        if !data.is_empty() {
            return self.error(
                opt,
                REP_ERR_INVALID,
                "option 'structured reply' has unexpected length",
            );
        }
        if self.neg.extended {
            return self.error(
                opt,
                REP_ERR_EXT_HEADER_REQD,
                "extended headers already negotiated",
            );
        }
        if self.neg.structured {
            return self.error(opt, REP_ERR_INVALID, "structured reply already negotiated");
        }
        self.neg.structured = true;
        self.reply(opt, REP_ACK, &[])
    }

    fn opt_extended_headers(&mut self, data: &[u8]) -> io::Result<()> {
        let opt = OPT_EXTENDED_HEADERS;
        if !data.is_empty() {
            return self.error(
                opt,
                REP_ERR_INVALID,
                "option 'extended headers' has unexpected length",
            );
        }
        if self.neg.extended {
            return self.error(opt, REP_ERR_INVALID, "extended headers already negotiated");
        }
        self.neg.extended = true;
        self.neg.structured = true;
        self.reply(opt, REP_ACK, &[])
    }

    /// Parse `u32 namelen, name, u16 n, n * u16` (INFO/GO).
    fn parse_info_request(data: &[u8]) -> Option<(String, Vec<u16>)> {
        let mut r = Reader::new(data);
        let namelen = r.u32()? as usize;
        if namelen > MAX_STRING_SIZE {
            return None;
        }
        let name = String::from_utf8(r.bytes(namelen)?.to_vec()).ok()?;
        let n = r.u16()? as usize;
        let mut items = Vec::with_capacity(n);
        for _ in 0..n {
            items.push(r.u16()?);
        }
        if r.remaining() != 0 {
            return None;
        }
        Some((name, items))
    }

    /// INFO and GO; true when GO succeeded and transmission begins.
    fn opt_info_go(&mut self, opt: u32, data: &[u8]) -> io::Result<bool> {
        let Some((name, items)) = Self::parse_info_request(data) else {
            self.error(
                opt,
                REP_ERR_INVALID,
                &format!("option '{}' has an invalid length", opt_name(opt)),
            )?;
            return Ok(false);
        };
        if name != self.export.name {
            self.error(
                opt,
                REP_ERR_UNKNOWN,
                &format!("export '{name}' not present"),
            )?;
            return Ok(false);
        }
        if items.contains(&INFO_NAME) {
            let mut p = INFO_NAME.to_be_bytes().to_vec();
            p.extend_from_slice(self.export.name.as_bytes());
            wire::encode_option_reply(&mut self.out, opt, REP_INFO, &p);
        }
        if !self.export.description.is_empty() {
            let mut p = INFO_DESCRIPTION.to_be_bytes().to_vec();
            p.extend_from_slice(self.export.description.as_bytes());
            wire::encode_option_reply(&mut self.out, opt, REP_INFO, &p);
        }
        let mut p = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
        for v in [MIN_BLOCK, PREFERRED_BLOCK, MAX_BLOCK] {
            p.extend_from_slice(&v.to_be_bytes());
        }
        wire::encode_option_reply(&mut self.out, opt, REP_INFO, &p);
        let flags = self
            .export
            .flags(self.neg.structured, self.neg.extended)
            .bits();
        let mut p = INFO_EXPORT.to_be_bytes().to_vec();
        p.extend_from_slice(&self.export.device.size().to_be_bytes());
        p.extend_from_slice(&flags.to_be_bytes());
        wire::encode_option_reply(&mut self.out, opt, REP_INFO, &p);
        wire::encode_option_reply(&mut self.out, opt, REP_ACK, &[]);
        self.send()?;
        if opt == OPT_GO {
            if self.meta_export.as_deref() != Some(name.as_str()) {
                self.neg.contexts.clear();
            }
            self.neg.flags = flags;
            return Ok(true);
        }
        Ok(false)
    }

    /// Parse `u32 namelen, name, u32 n, n * (u32 len, query)`.
    fn parse_meta_request(data: &[u8]) -> Option<(String, Vec<String>)> {
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
            let len = r.u32()? as usize;
            if len > MAX_STRING_SIZE {
                return None;
            }
            queries.push(String::from_utf8_lossy(r.bytes(len)?).into_owned());
        }
        if r.remaining() != 0 {
            return None;
        }
        Some((name, queries))
    }

    fn opt_meta_context(&mut self, opt: u32, data: &[u8]) -> io::Result<()> {
        let set = opt == OPT_SET_META_CONTEXT;
        if set {
            // SET replaces the selection even when it fails.
            self.neg.contexts.clear();
            self.meta_export = None;
        }
        if !self.neg.structured {
            let msg = format!(
                "request option '{}' when structured reply is not negotiated",
                opt_name(opt)
            );
            return self.error(opt, REP_ERR_INVALID, &msg);
        }
        let Some((name, queries)) = Self::parse_meta_request(data) else {
            return self.error(
                opt,
                REP_ERR_INVALID,
                &format!("option '{}' has an invalid length", opt_name(opt)),
            );
        };
        if name != self.export.name {
            return self.error(
                opt,
                REP_ERR_UNKNOWN,
                &format!("export '{name}' not present"),
            );
        }
        let all = &self.export.contexts;
        let mut chosen: Vec<MetaContext> = Vec::new();
        if !set && queries.is_empty() {
            chosen.extend(all.iter().cloned());
        }
        for q in &queries {
            let found: Vec<&MetaContext> = if set {
                meta::set_match(all, q).into_iter().collect()
            } else {
                meta::list_matches(all, q)
            };
            for c in found {
                if !chosen.iter().any(|x| x.id == c.id) {
                    chosen.push(c.clone());
                }
            }
        }
        for c in &chosen {
            let id = if set { c.id } else { 0 };
            let mut p = id.to_be_bytes().to_vec();
            p.extend_from_slice(c.name.as_bytes());
            wire::encode_option_reply(&mut self.out, opt, REP_META_CONTEXT, &p);
        }
        wire::encode_option_reply(&mut self.out, opt, REP_ACK, &[]);
        if set {
            self.neg.contexts = chosen;
            self.meta_export = Some(name);
        }
        self.send()
    }
}
