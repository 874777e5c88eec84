//! The NBD client's handshake: fixed newstyle, LIST, INFO, GO, structured replies, extended
//! headers and meta contexts. Used by `-L` now, and before a kernel bind (`-c`) later, where
//! it must negotiate simple replies only.

mod link;
pub mod remote;
mod replies;
pub mod url;

use crate::nbd::proto::*;
use crate::nbd::wire::{self, Info, Reader};
use crate::tls::{self, Creds};
use crate::transport::Stream;
use std::io::{self, Read, Write};

/// Longest option reply we read; anything longer is a broken server.
const MAX_REPLY_LEN: u32 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("{0}")]
    Protocol(String),
    /// The server refused an option: (what we asked, the reply type, the server's text).
    #[error("{msg}")]
    Refused { opt: u32, rep: u32, msg: String },
    /// The TLS handshake, or the check of the server after it, failed: the connection has
    /// no option channel left to say goodbye on.
    #[error("{0}")]
    Tls(String),
}

fn protocol(msg: impl Into<String>) -> ClientError {
    ClientError::Protocol(msg.into())
}

impl ClientError {
    /// The lines qemu-nbd prints for this error (without the program prefix on the first):
    /// qemu's `nbd_handle_reply_err`, the server's message as a hint when it sent one.
    pub fn report(&self) -> String {
        let ClientError::Refused { opt, rep, msg } = self else {
            return self.to_string();
        };
        let name = opt_name(*opt);
        let mut text = match *rep {
            REP_ERR_TLS_REQD => format!(
                "TLS negotiation required before option {opt} ({name})\nDid you forget a valid tls-creds?"
            ),
            REP_ERR_POLICY => format!("Denied by server for option {opt} ({name})"),
            REP_ERR_UNKNOWN => "Requested export not available".to_string(),
            REP_ERR_INVALID => format!("Invalid parameters for option {opt} ({name})"),
            REP_ERR_PLATFORM => format!("Server lacks support for option {opt} ({name})"),
            REP_ERR_SHUTDOWN => format!("Server shutting down before option {opt} ({name})"),
            REP_ERR_BLOCK_SIZE_REQD => {
                format!("Server requires INFO_BLOCK_SIZE for option {opt} ({name})")
            }
            _ => format!("Option {opt} ({name}) failed"),
        };
        if !msg.is_empty() {
            text.push_str(&format!("\nserver reported: {msg}"));
        }
        text
    }
}

/// What a server says about one export.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExportInfo {
    pub name: String,
    pub description: String,
    pub size: u64,
    pub flags: u16,
    /// 0 when the server sent no NBD_INFO_BLOCK_SIZE.
    pub min_block: u32,
    pub opt_block: u32,
    pub max_block: u32,
    pub contexts: Vec<String>,
}

/// A connection in the handshake phase.
pub struct Client {
    stream: Stream,
    pub structured: bool,
    pub extended: bool,
}

struct OptReply {
    rep: u32,
    data: Vec<u8>,
}

impl Client {
    /// Read the greeting and answer it.
    pub fn start(mut stream: Stream) -> Result<Client, ClientError> {
        let mut g = [0u8; 18];
        stream.read_exact(&mut g)?;
        let magic = u64::from_be_bytes(g[..8].try_into().unwrap_or_default());
        let opts = u64::from_be_bytes(g[8..16].try_into().unwrap_or_default());
        if magic != NBDMAGIC {
            return Err(protocol("Bad initial magic received"));
        }
        if opts != IHAVEOPT {
            return Err(protocol("Server does not support the newstyle protocol"));
        }
        let hflags = HandshakeFlags::from_bits_retain(u16::from_be_bytes([g[16], g[17]]));
        if !hflags.contains(HandshakeFlags::FIXED_NEWSTYLE) {
            return Err(protocol(
                "Server does not support fixed newstyle negotiation",
            ));
        }
        let mut cflags = ClientFlags::C_FIXED_NEWSTYLE;
        if hflags.contains(HandshakeFlags::NO_ZEROES) {
            cflags |= ClientFlags::C_NO_ZEROES;
        }
        stream.write_all(&cflags.bits().to_be_bytes())?;
        Ok(Client {
            stream,
            structured: false,
            extended: false,
        })
    }

    pub fn into_stream(self) -> Stream {
        self.stream
    }

    fn send_opt(&mut self, opt: u32, data: &[u8]) -> Result<(), ClientError> {
        let mut m = Vec::with_capacity(16 + data.len());
        m.extend_from_slice(&IHAVEOPT.to_be_bytes());
        m.extend_from_slice(&opt.to_be_bytes());
        m.extend_from_slice(&(data.len() as u32).to_be_bytes());
        m.extend_from_slice(data);
        self.stream.write_all(&m)?;
        Ok(())
    }

    fn read_reply(&mut self, opt: u32) -> Result<OptReply, ClientError> {
        let mut h = [0u8; 20];
        if let Err(e) = self.stream.read_exact(&mut h) {
            if e.kind() != io::ErrorKind::UnexpectedEof {
                return Err(e.into());
            }
            return Err(protocol(if self.stream.is_tls() {
                "Failed to read option reply: Cannot read from TLS channel: The TLS connection was non-properly terminated."
            } else {
                "Failed to read option reply: Unexpected end-of-file before all data were read"
            }));
        }
        let mut r = Reader::new(&h);
        let magic = r.u64().unwrap_or(0);
        let got_opt = r.u32().unwrap_or(0);
        let rep = r.u32().unwrap_or(0);
        let len = r.u32().unwrap_or(0);
        if magic != REP_MAGIC {
            return Err(protocol("Unexpected option reply magic"));
        }
        if got_opt != opt {
            return Err(protocol(format!(
                "Unexpected option type {got_opt:#x}, expected {opt:#x}"
            )));
        }
        if len > MAX_REPLY_LEN {
            return Err(protocol(format!(
                "server's reply to option {opt} is too long ({len})"
            )));
        }
        let mut data = vec![0u8; len as usize];
        self.stream.read_exact(&mut data)?;
        Ok(OptReply { rep, data })
    }

    fn refused(opt: u32, r: OptReply) -> ClientError {
        ClientError::Refused {
            opt,
            rep: r.rep,
            msg: String::from_utf8_lossy(&r.data).into_owned(),
        }
    }

    /// Ask for an option with an ACK-only answer; Ok(false) when the server refuses it.
    fn simple_opt(&mut self, opt: u32) -> Result<bool, ClientError> {
        self.send_opt(opt, &[])?;
        let r = self.read_reply(opt)?;
        match r.rep {
            REP_ACK => Ok(true),
            rep if rep & 0x8000_0000 != 0 => Ok(false),
            rep => Err(protocol(format!(
                "unexpected reply {rep:#x} to option {}",
                opt_name(opt)
            ))),
        }
    }

    /// NBD_OPT_STARTTLS and the TLS handshake with a server reached over `transport`;
    /// afterwards every option travels encrypted. The server certificate's name is checked by
    /// qemu's rule ([`tls::server_name`]).
    pub fn start_tls(
        &mut self,
        creds: &Creds,
        transport: tls::Transport<'_>,
        tls_hostname: Option<&str>,
    ) -> Result<(), ClientError> {
        self.send_opt(OPT_STARTTLS, &[])?;
        let r = self.read_reply(OPT_STARTTLS)?;
        if r.rep & 0x8000_0000 != 0 {
            return Err(Self::refused(OPT_STARTTLS, r));
        }
        if r.rep != REP_ACK {
            return Err(protocol(format!(
                "Server rejected request to start TLS {:x}",
                r.rep
            )));
        }
        if !r.data.is_empty() {
            return Err(protocol(format!(
                "Start TLS response was not zero {}",
                r.data.len()
            )));
        }
        tls::connect(&mut self.stream, creds, transport, tls_hostname)
            .map_err(|e| ClientError::Tls(e.to_string()))
    }

    /// Extended headers if the server has them, else structured replies if it has those.
    pub fn negotiate_replies(&mut self) -> Result<(), ClientError> {
        if self.simple_opt(OPT_EXTENDED_HEADERS)? {
            self.extended = true;
            self.structured = true;
        } else if self.simple_opt(OPT_STRUCTURED_REPLY)? {
            self.structured = true;
        }
        Ok(())
    }

    /// NBD_OPT_LIST: (name, description) of every export.
    pub fn list(&mut self) -> Result<Vec<(String, String)>, ClientError> {
        self.send_opt(OPT_LIST, &[])?;
        let mut out = Vec::new();
        loop {
            let r = self.read_reply(OPT_LIST)?;
            match r.rep {
                REP_ACK => return Ok(out),
                REP_SERVER => out.push(
                    wire::decode_rep_server(&r.data)
                        .ok_or_else(|| protocol("bad NBD_REP_SERVER name length"))?,
                ),
                _ => return Err(Self::refused(OPT_LIST, r)),
            }
        }
    }

    /// NBD_OPT_INFO or NBD_OPT_GO for `name`, asking for the block sizes (and the name and
    /// description). After a successful GO the connection is in transmission.
    pub fn info_or_go(
        &mut self,
        opt: u32,
        name: &str,
        block_size: bool,
    ) -> Result<ExportInfo, ClientError> {
        let items: &[u16] = if block_size {
            &[INFO_BLOCK_SIZE, INFO_NAME, INFO_DESCRIPTION]
        } else {
            &[]
        };
        let mut d = Vec::new();
        wire::encode_info_request(&mut d, name, items);
        self.send_opt(opt, &d)?;
        let mut info = ExportInfo {
            name: name.to_string(),
            ..Default::default()
        };
        let mut have_export = false;
        loop {
            let r = self.read_reply(opt)?;
            match r.rep {
                REP_ACK => {
                    if !have_export {
                        return Err(protocol("server sent no NBD_INFO_EXPORT"));
                    }
                    return Ok(info);
                }
                REP_INFO => match wire::decode_info(&r.data) {
                    Some(Info::Export { size, flags }) => {
                        info.size = size;
                        info.flags = flags;
                        have_export = true;
                    }
                    Some(Info::Name(n)) => info.name = n,
                    Some(Info::Description(d)) => info.description = d,
                    Some(Info::BlockSize {
                        min,
                        preferred,
                        max,
                    }) => {
                        info.min_block = min;
                        info.opt_block = preferred;
                        info.max_block = max;
                    }
                    // Clients ignore information they do not know.
                    Some(Info::Unknown(_)) => {}
                    None => return Err(protocol("short NBD_REP_INFO")),
                },
                _ => return Err(Self::refused(opt, r)),
            }
        }
    }

    /// NBD_OPT_SET_META_CONTEXT for one context of `export`: its id, None when the server
    /// does not have it (or has no meta contexts at all).
    pub fn set_meta_context(
        &mut self,
        export: &str,
        context: &str,
    ) -> Result<Option<u32>, ClientError> {
        let mut d = Vec::new();
        wire::encode_meta_request(&mut d, export, &[context]);
        self.send_opt(OPT_SET_META_CONTEXT, &d)?;
        let mut id = None;
        loop {
            let r = self.read_reply(OPT_SET_META_CONTEXT)?;
            match r.rep {
                REP_ACK => return Ok(id),
                REP_META_CONTEXT => {
                    let (i, name) = wire::decode_meta_context(&r.data)
                        .ok_or_else(|| protocol("short NBD_REP_META_CONTEXT"))?;
                    if name == context {
                        id = Some(i);
                    }
                }
                rep if rep & 0x8000_0000 != 0 => return Ok(None),
                _ => return Err(Self::refused(OPT_SET_META_CONTEXT, r)),
            }
        }
    }

    /// NBD_OPT_LIST_META_CONTEXT with no query: every context the export offers.
    pub fn list_meta_contexts(&mut self, name: &str) -> Result<Vec<String>, ClientError> {
        let mut d = Vec::new();
        wire::encode_meta_request(&mut d, name, &[]);
        self.send_opt(OPT_LIST_META_CONTEXT, &d)?;
        let mut out = Vec::new();
        loop {
            let r = self.read_reply(OPT_LIST_META_CONTEXT)?;
            match r.rep {
                REP_ACK => return Ok(out),
                REP_META_CONTEXT => {
                    let (_, ctx) = wire::decode_meta_context(&r.data)
                        .ok_or_else(|| protocol("short NBD_REP_META_CONTEXT"))?;
                    out.push(ctx);
                }
                rep if rep & 0x8000_0000 != 0 => return Ok(Vec::new()),
                _ => return Err(Self::refused(OPT_LIST_META_CONTEXT, r)),
            }
        }
    }

    /// After a failed option, as qemu's client (`nbd_send_opt_abort`): NBD_OPT_ABORT as a
    /// courtesy, without waiting for the answer, so the server sees a client that said
    /// goodbye rather than one that vanished (which it reports). Not after a failed TLS
    /// handshake, whose session cannot carry it.
    pub fn abort_on_error(&mut self, e: &ClientError) {
        if !matches!(e, ClientError::Tls(_)) {
            let _ = self.send_opt(OPT_ABORT, &[]);
        }
    }

    /// NBD_OPT_ABORT; the server may close before answering.
    pub fn abort(mut self) {
        if self.send_opt(OPT_ABORT, &[]).is_ok() {
            let _ = self.read_reply(OPT_ABORT);
        }
        self.stream.shutdown();
    }
}

/// Every export of a server, as `qemu-nbd -L` gathers them; `tls` is the credentials, how
/// the server is reached and `--tls-hostname`.
pub fn list_exports(
    stream: Stream,
    tls: Option<(&Creds, tls::Transport<'_>, Option<&str>)>,
) -> Result<(Vec<ExportInfo>, bool), ClientError> {
    let mut c = Client::start(stream)?;
    match gather_exports(&mut c, tls) {
        Ok(out) => {
            let extended = c.extended;
            c.abort();
            Ok((out, extended))
        }
        Err(e) => {
            c.abort_on_error(&e);
            Err(e)
        }
    }
}

fn gather_exports(
    c: &mut Client,
    tls: Option<(&Creds, tls::Transport<'_>, Option<&str>)>,
) -> Result<Vec<ExportInfo>, ClientError> {
    if let Some((creds, transport, tls_hostname)) = tls {
        c.start_tls(creds, transport, tls_hostname)?;
    }
    c.negotiate_replies()?;
    let names = c.list()?;
    let mut out = Vec::new();
    for (name, description) in names {
        let mut info = c.info_or_go(OPT_INFO, &name, true)?;
        info.name = name.clone();
        info.description = description;
        if c.structured {
            info.contexts = c.list_meta_contexts(&name)?;
        }
        out.push(info);
    }
    Ok(out)
}

/// qemu-nbd's `-L` listing.
const FLAG_NAMES: [&str; 13] = [
    "",
    "readonly",
    "flush",
    "fua",
    "rotational",
    "trim",
    "zeroes",
    "df",
    "multi",
    "resize",
    "cache",
    "fast-zero",
    "block-status-payload",
];

/// The names qemu-nbd's list prints for the transmission flags that are set.
pub fn flag_names(flags: u16) -> Vec<&'static str> {
    FLAG_NAMES
        .iter()
        .enumerate()
        .filter(|(bit, name)| !name.is_empty() && flags & (1 << bit) != 0)
        .map(|(_, name)| *name)
        .collect()
}

fn transaction_size(extended: bool) -> &'static str {
    if extended {
        "64-bit"
    } else {
        "32-bit"
    }
}

/// The export list as qemu-nbd's `-L` prints it.
pub fn format_list(exports: &[ExportInfo], extended: bool) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let _ = writeln!(s, "exports available: {}", exports.len());
    for e in exports {
        let _ = writeln!(s, " export: '{}'", e.name);
        if !e.description.is_empty() {
            let _ = writeln!(s, "  description: {}", e.description);
        }
        if e.flags & TransmissionFlags::HAS_FLAGS.bits() != 0 {
            let _ = writeln!(s, "  size:  {}", e.size);
            let _ = write!(s, "  flags: {:#x} (", e.flags);
            for name in flag_names(e.flags) {
                let _ = write!(s, " {name}");
            }
            let _ = writeln!(s, " )");
        }
        if e.min_block != 0 {
            let _ = writeln!(s, "  min block: {}", e.min_block);
            let _ = writeln!(s, "  opt block: {}", e.opt_block);
            let _ = writeln!(s, "  max block: {}", e.max_block);
        }
        let _ = writeln!(s, "  transaction size: {}", transaction_size(extended));
        if !e.contexts.is_empty() {
            let _ = writeln!(s, "  available meta contexts: {}", e.contexts.len());
            for c in &e.contexts {
                let _ = writeln!(s, "   {c}");
            }
        }
    }
    s
}

/// The export list as JSON: the fields of [`format_list`], a field absent where the text
/// form leaves its line out.
pub fn format_list_json(exports: &[ExportInfo], extended: bool) -> String {
    use serde_json::{json, Map, Value};
    let list: Vec<Value> = exports
        .iter()
        .map(|e| {
            let mut o = Map::new();
            o.insert("export".into(), json!(e.name));
            if !e.description.is_empty() {
                o.insert("description".into(), json!(e.description));
            }
            if e.flags & TransmissionFlags::HAS_FLAGS.bits() != 0 {
                o.insert("size".into(), json!(e.size));
                o.insert("flags".into(), json!(e.flags));
                o.insert("flag-names".into(), json!(flag_names(e.flags)));
            }
            if e.min_block != 0 {
                o.insert("min-block".into(), json!(e.min_block));
                o.insert("opt-block".into(), json!(e.opt_block));
                o.insert("max-block".into(), json!(e.max_block));
            }
            o.insert("transaction-size".into(), json!(transaction_size(extended)));
            if !e.contexts.is_empty() {
                o.insert("meta-contexts".into(), json!(e.contexts));
            }
            Value::Object(o)
        })
        .collect();
    let doc = json!({ "exports-available": exports.len(), "exports": list });
    serde_json::to_string_pretty(&doc).unwrap_or_default()
}
