//! The fixed-newstyle handshake, server side: one function per option, in a loop bounded in
//! option count, option length and time, producing what the transmission phase needs.

use super::export::{Export, MAX_BLOCK, PREFERRED_BLOCK};
use super::meta::{self, MetaContext};
use crate::nbd::proto::*;
use crate::nbd::wire::{self, Info};
use crate::tls::{self, ServerTls};
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
    /// `--tls-creds`; until STARTTLS succeeds only STARTTLS is served.
    tls: Option<&'a ServerTls>,
    tls_done: bool,
}

fn protocol_error(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// Run the handshake on `stream`. Errors mean "drop the connection".
pub fn negotiate(
    stream: &mut Stream,
    export: &Export,
    deadline: Option<Instant>,
    tls: Option<&ServerTls>,
) -> io::Result<Outcome> {
    let mut hs = Handshake {
        stream,
        export,
        deadline,
        neg: Negotiated::default(),
        meta_export: None,
        out: Vec::new(),
        tls,
        tls_done: false,
    };
    let r = hs.run();
    if let Ok(Outcome::Transmission(_)) = &r {
        tracing::trace!(name: "nbd_negotiate_success", "Negotiation succeeded");
    }
    r
}

/// qemu's "Failed to read WHAT: REASON" for a failed option-phase read. Under TLS, an end
/// of the connection is GnuTLS' premature termination (clients that give up on a server
/// after the handshake close the socket without close_notify).
fn read_error(what: &str, e: io::Error, tls: bool) -> io::Error {
    let reason = match e.kind() {
        io::ErrorKind::UnexpectedEof if tls => {
            "Cannot read from TLS channel: The TLS connection was non-properly terminated."
                .to_string()
        }
        io::ErrorKind::UnexpectedEof | io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => {
            "Unexpected end-of-file before all data were read".to_string()
        }
        _ => format!("Unable to read from socket: {}", backends::errno_text(&e)),
    };
    io::Error::new(e.kind(), format!("Failed to read {what}: {reason}"))
}

fn time_limit() -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, "handshake time limit reached")
}

/// A timeout of the socket is the handshake limit running out.
fn limit_error(e: io::Error) -> io::Error {
    if matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    ) {
        time_limit()
    } else {
        e
    }
}

impl Handshake<'_> {
    /// The time left before the handshake limit, None without one.
    fn left(&self) -> io::Result<Option<std::time::Duration>> {
        let Some(d) = self.deadline else {
            return Ok(None);
        };
        let left = d.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(time_limit());
        }
        Ok(Some(left))
    }

    /// Fill `buf`, as qemu's nbd_read: Ok(false) when the client closed cleanly before the
    /// first byte; otherwise an error in qemu's words, "Failed to read WHAT: REASON" (a
    /// timeout reads as the end-of-file qemu sees once its timer shut the socket).
    fn read_full(&mut self, buf: &mut [u8], what: &str) -> io::Result<bool> {
        let mut got = 0;
        while got < buf.len() {
            let left = match self.left() {
                Ok(l) => l,
                Err(e) => return Err(read_error(what, e, self.tls_done)),
            };
            if let Some(left) = left {
                self.stream.set_read_timeout(Some(left))?;
            }
            match self.stream.read(&mut buf[got..]) {
                Ok(0) if got == 0 => return Ok(false),
                Ok(0) => {
                    return Err(read_error(
                        what,
                        io::ErrorKind::UnexpectedEof.into(),
                        self.tls_done,
                    ));
                }
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(read_error(what, limit_error(e), self.tls_done)),
            }
        }
        Ok(true)
    }

    /// Like [`Handshake::read_full`], where a clean end is an error too.
    fn read_exact(&mut self, buf: &mut [u8], what: &str) -> io::Result<()> {
        if self.read_full(buf, what)? {
            Ok(())
        } else {
            Err(read_error(
                what,
                io::ErrorKind::UnexpectedEof.into(),
                self.tls_done,
            ))
        }
    }

    /// The limit bounds writes too: a client that never reads its replies is dropped.
    fn send(&mut self) -> io::Result<()> {
        let r = match self.left() {
            Ok(Some(left)) => self
                .stream
                .set_write_timeout(Some(left))
                .and_then(|()| self.stream.write_all(&self.out)),
            Ok(None) => self.stream.write_all(&self.out),
            Err(e) => Err(e),
        };
        self.out.clear();
        r.map_err(limit_error)
    }

    /// Queue one option reply (sent by the next `send`).
    fn queue(&mut self, opt: u32, rep: u32, data: &[u8]) {
        tracing::trace!(
            name: "nbd_negotiate_send_rep_len",
            "Reply opt={opt} ({}), type={rep} ({}), len={}",
            opt_name(opt),
            rep_name(rep),
            data.len()
        );
        wire::encode_option_reply(&mut self.out, opt, rep, data);
    }

    /// Queue one NBD_REP_INFO.
    fn info(&mut self, opt: u32, info: &Info) {
        let mut p = Vec::new();
        wire::encode_info(&mut p, info);
        let typ = u16::from_be_bytes([p[0], p[1]]);
        tracing::trace!(
            name: "nbd_negotiate_send_info",
            "Sending NBD_REP_INFO type {typ} ({}) with remaining length {}",
            info_name(typ),
            p.len() - 2
        );
        self.queue(opt, REP_INFO, &p);
    }

    fn reply(&mut self, opt: u32, rep: u32, data: &[u8]) -> io::Result<()> {
        self.queue(opt, rep, data);
        self.send()
    }

    fn error(&mut self, opt: u32, rep: u32, msg: &str) -> io::Result<()> {
        tracing::trace!(name: "nbd_negotiate_send_rep_err", "sending error message \"{msg}\"");
        self.reply(opt, rep, msg.as_bytes())
    }

    fn run(&mut self) -> io::Result<Outcome> {
        tracing::trace!(name: "nbd_negotiate_begin", "Beginning negotiation");
        let Some(client_flags) = self.greet()? else {
            return Ok(Outcome::Closed);
        };
        let fixed = client_flags.contains(ClientFlags::C_FIXED_NEWSTYLE);
        let no_zeroes = client_flags.contains(ClientFlags::C_NO_ZEROES);
        for _ in 0..MAX_OPTIONS {
            let (opt, data) = self.read_option()?;
            let end = if self.tls.is_some() && !self.tls_done {
                self.option_before_tls(opt, &data, fixed)?
            } else {
                self.option(opt, &data, fixed, no_zeroes)?
            };
            if let Some(outcome) = end {
                return Ok(outcome);
            }
        }
        Err(protocol_error("too many options"))
    }

    /// Send the greeting, read the client's flags; None when the client left.
    fn greet(&mut self) -> io::Result<Option<ClientFlags>> {
        let hflags = HandshakeFlags::FIXED_NEWSTYLE | HandshakeFlags::NO_ZEROES;
        self.out.extend_from_slice(&NBDMAGIC.to_be_bytes());
        self.out.extend_from_slice(&IHAVEOPT.to_be_bytes());
        self.out.extend_from_slice(&hflags.bits().to_be_bytes());
        self.send()?;
        let mut cf = [0u8; 4];
        if !self.read_full(&mut cf, "flags")? {
            return Ok(None);
        }
        let bits = u32::from_be_bytes(cf);
        tracing::trace!(name: "nbd_negotiate_options_flags", "Received client flags 0x{bits:x}");
        ClientFlags::from_bits(bits)
            .map(Some)
            .ok_or_else(|| protocol_error(format!("Unknown client flags 0x{bits:x} received")))
    }

    /// The next option and its data. A client that leaves here without NBD_OPT_ABORT is
    /// reported, as qemu does (only one that leaves before its flags is a mere port probe).
    fn read_option(&mut self) -> io::Result<(u32, Vec<u8>)> {
        let mut hdr = [0u8; 16];
        self.read_exact(&mut hdr, "opts magic")?;
        tracing::trace!(
            name: "nbd_negotiate_options_check_magic",
            "Checking opts magic 0x{:x}",
            u64::from_be_bytes([hdr[0], hdr[1], hdr[2], hdr[3], hdr[4], hdr[5], hdr[6], hdr[7]])
        );
        let (opt, len) =
            wire::decode_option_header(&hdr).map_err(|_| protocol_error("Bad magic received"))?;
        if len > MAX_OPTION_LEN {
            return Err(protocol_error(format!(
                "option {opt} length {len} is too long"
            )));
        }
        let mut data = vec![0u8; len as usize];
        let what = if opt == OPT_EXPORT_NAME {
            "export name"
        } else {
            "option data"
        };
        self.read_exact(&mut data, what)?;
        tracing::trace!(
            name: "nbd_negotiate_options_check_option",
            "Checking option {opt} ({})",
            opt_name(opt)
        );
        Ok((opt, data))
    }

    /// With `--tls-creds`, before STARTTLS: only STARTTLS is served (qemu's FORCEDTLS).
    fn option_before_tls(
        &mut self,
        opt: u32,
        data: &[u8],
        fixed: bool,
    ) -> io::Result<Option<Outcome>> {
        if !fixed {
            return Err(protocol_error(format!("Unsupported option {opt:#x}")));
        }
        match opt {
            OPT_STARTTLS => self.start_tls(data)?,
            // EXPORT_NAME cannot be refused but by hanging up.
            OPT_EXPORT_NAME => {
                return Err(protocol_error(format!(
                    "Option {opt:#x} not permitted before TLS"
                )))
            }
            _ => {
                // qemu answers even ABORT with TLS_REQD, then closes.
                let msg = format!("Option {opt:#x} not permitted before TLS");
                let r = self.error(opt, REP_ERR_TLS_REQD, &msg);
                if opt == OPT_ABORT {
                    return Ok(Some(Outcome::Closed));
                }
                r?;
            }
        }
        Ok(None)
    }

    /// One option; Some when the handshake ends (transmission, or the client is done).
    fn option(
        &mut self,
        opt: u32,
        data: &[u8],
        fixed: bool,
        no_zeroes: bool,
    ) -> io::Result<Option<Outcome>> {
        if opt == OPT_EXPORT_NAME {
            return self.opt_export_name(data, no_zeroes).map(Some);
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
                return Ok(Some(Outcome::Closed));
            }
            OPT_LIST => self.opt_list(data)?,
            OPT_STARTTLS => self.opt_starttls(data)?,
            OPT_INFO | OPT_GO => {
                if self.opt_info_go(opt, data)? {
                    return Ok(Some(Outcome::Transmission(std::mem::take(&mut self.neg))));
                }
            }
            OPT_STRUCTURED_REPLY => self.opt_structured_reply(data)?,
            OPT_EXTENDED_HEADERS => self.opt_extended_headers(data)?,
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => self.opt_meta_context(opt, data)?,
            _ => self.error(
                opt,
                REP_ERR_UNSUP,
                &format!("Unsupported option {opt} ({})", opt_name(opt)),
            )?,
        }
        Ok(None)
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
        let contexts = !self.neg.contexts.is_empty();
        let flags = self
            .export
            .flags(self.neg.structured, self.neg.extended, contexts)
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
        tracing::trace!(
            name: "nbd_negotiate_send_rep_list",
            "Advertising export name '{}' description '{}'",
            self.export.name,
            self.export.description
        );
        let mut rep = Vec::new();
        wire::encode_rep_server(&mut rep, &self.export.name, &self.export.description);
        self.queue(OPT_LIST, REP_SERVER, &rep);
        self.reply(OPT_LIST, REP_ACK, &[])
    }

    fn opt_starttls(&mut self, data: &[u8]) -> io::Result<()> {
        if !data.is_empty() {
            return self.error(
                OPT_STARTTLS,
                REP_ERR_INVALID,
                "option 'starttls' has unexpected length",
            );
        }
        if self.tls.is_some() {
            return self.error(OPT_STARTTLS, REP_ERR_INVALID, "TLS already enabled");
        }
        self.error(OPT_STARTTLS, REP_ERR_POLICY, "TLS not configured")
    }

    /// STARTTLS while TLS is required: acknowledge, run the TLS handshake, and carry on with
    /// the options inside the session. A malformed request ends the connection (qemu).
    fn start_tls(&mut self, data: &[u8]) -> io::Result<()> {
        let Some(tls) = self.tls else {
            return Ok(());
        };
        if !data.is_empty() {
            let _ = self.error(
                OPT_STARTTLS,
                REP_ERR_INVALID,
                "option 'starttls' has unexpected length",
            );
            return Err(protocol_error("STARTTLS with a payload"));
        }
        tracing::trace!(name: "nbd_negotiate_handle_starttls", "Setting up TLS");
        self.reply(OPT_STARTTLS, REP_ACK, &[])?;
        tracing::trace!(
            name: "nbd_negotiate_handle_starttls_handshake",
            "Starting TLS handshake"
        );
        if let Err(e) = tls::accept(self.stream, tls, self.deadline) {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                e.to_string(),
            ));
        }
        self.tls_done = true;
        Ok(())
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

    /// INFO and GO; true when GO succeeded and transmission begins.
    fn opt_info_go(&mut self, opt: u32, data: &[u8]) -> io::Result<bool> {
        let Some((name, items)) = wire::decode_info_request(data) else {
            self.error(
                opt,
                REP_ERR_INVALID,
                &format!("option '{}' has an invalid length", opt_name(opt)),
            )?;
            return Ok(false);
        };
        tracing::trace!(
            name: "nbd_negotiate_handle_export_name_request",
            "Client requested export '{name}'"
        );
        tracing::trace!(
            name: "nbd_negotiate_handle_info_requests",
            "Client requested {} items of info",
            items.len()
        );
        for i in &items {
            tracing::trace!(
                name: "nbd_negotiate_handle_info_request",
                "Client requested info {i} ({})",
                info_name(*i)
            );
        }
        if name != self.export.name {
            self.error(
                opt,
                REP_ERR_UNKNOWN,
                &format!("export '{name}' not present"),
            )?;
            return Ok(false);
        }
        if items.contains(&INFO_NAME) {
            self.info(opt, &Info::Name(self.export.name.clone()));
        }
        if !self.export.description.is_empty() {
            self.info(opt, &Info::Description(self.export.description.clone()));
        }
        // As qemu: the real minimum to INFO and to a client that asked for block sizes (it
        // promises to obey them); 1 to a GO that did not ask, whose client may send anything
        // (the device copes with unaligned requests).
        let align = self.export.device.request_alignment();
        let asked = items.contains(&INFO_BLOCK_SIZE);
        let min = if opt == OPT_INFO || asked { align } else { 1 };
        let preferred = PREFERRED_BLOCK.max(min);
        tracing::trace!(
            name: "nbd_negotiate_handle_info_block_size",
            "advertising minimum 0x{min:x}, preferred 0x{preferred:x}, maximum 0x{MAX_BLOCK:x}"
        );
        self.info(
            opt,
            &Info::BlockSize {
                min,
                preferred,
                max: MAX_BLOCK,
            },
        );
        // qemu advertises BLOCK_STAT_PAYLOAD to INFO whenever headers are extended, and to GO
        // only when meta contexts are selected for this export.
        let contexts = opt == OPT_INFO
            || (!self.neg.contexts.is_empty()
                && self.meta_export.as_deref() == Some(name.as_str()));
        let flags = self
            .export
            .flags(self.neg.structured, self.neg.extended, contexts)
            .bits();
        let size = self.export.device.size();
        tracing::trace!(
            name: "nbd_negotiate_new_style_size_flags",
            "advertising size {size} and flags 0x{flags:x}"
        );
        self.info(opt, &Info::Export { size, flags });
        if opt == OPT_INFO && !asked && align > 1 {
            self.error(
                opt,
                REP_ERR_BLOCK_SIZE_REQD,
                "request NBD_INFO_BLOCK_SIZE to use this export",
            )?;
            return Ok(false);
        }
        self.reply(opt, REP_ACK, &[])?;
        if opt == OPT_GO {
            if self.meta_export.as_deref() != Some(name.as_str()) {
                self.neg.contexts.clear();
            }
            self.neg.flags = flags;
            return Ok(true);
        }
        Ok(false)
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
        let Some((name, queries)) = wire::decode_meta_request(data).inspect(|(name, q)| {
            tracing::trace!(
                name: "nbd_negotiate_meta_context",
                "Client requested {} for export {name}, with {} queries",
                opt_name(opt),
                q.len()
            )
        }) else {
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
            // qemu traces the namespace and the leaf it parsed.
            match q.split_once(':') {
                Some((ns, leaf)) => {
                    tracing::trace!(name: "nbd_negotiate_meta_query_parse", "Parsed meta query '{ns}:'");
                    if !leaf.is_empty() {
                        tracing::trace!(name: "nbd_negotiate_meta_query_parse", "Parsed meta query '{leaf}'");
                    }
                }
                None => {
                    tracing::trace!(name: "nbd_negotiate_meta_query_parse", "Parsed meta query '{q}'")
                }
            }
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
            tracing::trace!(
                name: "nbd_negotiate_meta_query_reply",
                "Replying with meta context '{}' id {id}",
                c.name
            );
            let mut p = Vec::new();
            wire::encode_meta_context(&mut p, id, &c.name);
            // qemu sends these without its rep_len trace point.
            wire::encode_option_reply(&mut self.out, opt, REP_META_CONTEXT, &p);
        }
        self.queue(opt, REP_ACK, &[]);
        if set {
            self.neg.contexts = chosen;
            self.meta_export = Some(name);
        }
        self.send()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use backends::raw::{RawFile, RawOptions};
    use backends::Device;
    use std::os::unix::net::UnixStream;
    use std::sync::Arc;

    fn export() -> (Export, tempfile::NamedTempFile) {
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(1 << 20).unwrap();
        let raw = RawFile::open(f.path(), RawOptions::default()).unwrap();
        let dev = Device::new(Arc::new(raw));
        (
            Export::new("exp".into(), "desc".into(), dev, false, false),
            f,
        )
    }

    fn opt(code: u32, data: &[u8]) -> Vec<u8> {
        let mut v = IHAVEOPT.to_be_bytes().to_vec();
        v.extend_from_slice(&code.to_be_bytes());
        v.extend_from_slice(&(data.len() as u32).to_be_bytes());
        v.extend_from_slice(data);
        v
    }

    /// Run the server side on `client_bytes`; returns (outcome, bytes the server sent).
    fn handshake(client_bytes: Vec<u8>) -> (io::Result<Outcome>, Vec<u8>) {
        let (export, _f) = export();
        let (a, mut b) = UnixStream::pair().unwrap();
        let writer = std::thread::spawn(move || {
            let _ = b.write_all(&client_bytes);
            let _ = b.shutdown(std::net::Shutdown::Write);
            let mut got = Vec::new();
            let _ = b.read_to_end(&mut got);
            got
        });
        let mut s = Stream::Unix(a);
        let deadline = Some(Instant::now() + std::time::Duration::from_secs(5));
        let r = negotiate(&mut s, &export, deadline, None);
        drop(s);
        (r, writer.join().unwrap())
    }

    /// Option replies after the 18-byte greeting: (option, type, data).
    fn replies(mut b: &[u8]) -> Vec<(u32, u32, Vec<u8>)> {
        b = &b[18..];
        let mut out = Vec::new();
        while b.len() >= 20 {
            let o = u32::from_be_bytes(b[8..12].try_into().unwrap());
            let t = u32::from_be_bytes(b[12..16].try_into().unwrap());
            let l = u32::from_be_bytes(b[16..20].try_into().unwrap()) as usize;
            out.push((o, t, b[20..20 + l].to_vec()));
            b = &b[20 + l..];
        }
        out
    }

    fn fixed() -> Vec<u8> {
        1u32.to_be_bytes().to_vec()
    }

    #[test]
    fn unknown_client_flags_drop_the_connection() {
        let (r, _) = handshake(0x8000_0001u32.to_be_bytes().to_vec());
        assert!(r.is_err());
    }

    #[test]
    fn bad_option_magic_and_huge_lengths_drop_the_connection() {
        let mut c = fixed();
        c.extend_from_slice(&[0x55; 16]);
        assert!(handshake(c).0.is_err());
        let mut c = fixed();
        c.extend_from_slice(&IHAVEOPT.to_be_bytes());
        c.extend_from_slice(&OPT_GO.to_be_bytes());
        c.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(handshake(c).0.is_err());
    }

    #[test]
    fn option_errors_are_qemus_and_the_handshake_goes_on() {
        let mut c = fixed();
        c.extend(opt(99, b"junk"));
        c.extend(opt(OPT_LIST, b"x"));
        c.extend(opt(OPT_GO, b"\x00\x00"));
        let mut go = 4u32.to_be_bytes().to_vec();
        go.extend_from_slice(b"nope\0\0");
        c.extend(opt(OPT_GO, &go));
        c.extend(opt(OPT_SET_META_CONTEXT, b""));
        c.extend(opt(OPT_STRUCTURED_REPLY, b""));
        c.extend(opt(OPT_STRUCTURED_REPLY, b""));
        c.extend(opt(OPT_STARTTLS, b""));
        c.extend(opt(OPT_ABORT, b""));
        let (r, sent) = handshake(c);
        assert!(matches!(r, Ok(Outcome::Closed)));
        let reps = replies(&sent);
        let types: Vec<u32> = reps.iter().map(|r| r.1).collect();
        assert_eq!(
            types,
            vec![
                REP_ERR_UNSUP,
                REP_ERR_INVALID,
                REP_ERR_INVALID,
                REP_ERR_UNKNOWN,
                REP_ERR_INVALID,
                REP_ACK,
                REP_ERR_INVALID,
                REP_ERR_POLICY,
                REP_ACK
            ]
        );
        assert_eq!(reps[0].2, b"Unsupported option 99 (<unknown>)");
        assert_eq!(reps[3].2, b"export 'nope' not present");
    }

    #[test]
    fn list_then_go_reaches_transmission() {
        let mut c = fixed();
        c.extend(opt(OPT_LIST, b""));
        c.extend(opt(OPT_STRUCTURED_REPLY, b""));
        let mut go = 3u32.to_be_bytes().to_vec();
        go.extend_from_slice(b"exp");
        go.extend_from_slice(&1u16.to_be_bytes());
        go.extend_from_slice(&INFO_NAME.to_be_bytes());
        c.extend(opt(OPT_GO, &go));
        let (r, sent) = handshake(c);
        let Ok(Outcome::Transmission(neg)) = r else {
            panic!("no transmission")
        };
        assert!(neg.structured);
        let reps = replies(&sent);
        assert_eq!(reps[0].1, REP_SERVER);
        assert_eq!(&reps[0].2[4..], b"expdesc");
        let infos: Vec<u16> = reps
            .iter()
            .filter(|r| r.1 == REP_INFO)
            .map(|r| u16::from_be_bytes([r.2[0], r.2[1]]))
            .collect();
        assert_eq!(
            infos,
            vec![INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE, INFO_EXPORT]
        );
    }

    #[test]
    fn export_name_for_a_missing_export_closes_silently() {
        let mut c = fixed();
        c.extend(opt(OPT_EXPORT_NAME, b"other"));
        let (r, sent) = handshake(c);
        assert!(r.is_err());
        assert_eq!(sent.len(), 18, "nothing but the greeting");
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut seed = 0x9e3779b97f4a7c15u64;
        for round in 0..300 {
            let mut c = fixed();
            if round % 2 == 0 {
                c.extend(opt((round % 13) as u32, &[]));
            }
            let n = (seed % 200) as usize;
            for _ in 0..n {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                c.push(seed as u8);
            }
            let _ = handshake(c);
        }
    }
}
