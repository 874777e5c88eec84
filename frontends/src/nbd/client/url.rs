//! NBD image names, as qemu's `nbd` block driver reads them: the URIs
//! `nbd[+tcp]://HOST[:PORT]/EXPORT` and `nbd+unix:///EXPORT?socket=PATH`, and the older
//! `nbd:HOST:PORT[:exportname=NAME]` and `nbd:unix:PATH[:exportname=NAME]`; and opening one
//! as a remote file ([`open`], registered by the binary with the backends).

use super::link::{Connected, Connector};
use super::remote::{negotiate, NbdRemote, Reconnect};
use super::Client;
use crate::nbd::proto::DEFAULT_PORT;
use crate::tls::{Creds, Transport};
use crate::transport::Stream;
use backends::file::remote::{unescape, Remote, RemoteOptions};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Where an export is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Server {
    Unix(String),
    Inet { host: String, port: String },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub server: Server,
    pub export: String,
}

const BAD_URL: &str = "No valid URL specified";

/// qemu's `nbd_parse_uri`.
fn parse_uri(name: &str) -> Result<Target, String> {
    let (scheme, rest) = name.split_once("://").ok_or(BAD_URL)?;
    let unix = match scheme {
        "nbd" | "nbd+tcp" => false,
        "nbd+unix" => true,
        _ => return Err(format!("Unknown protocol '{scheme}'")),
    };
    let (rest, query) = match rest.split_once('?') {
        Some((r, q)) => (r, Some(q)),
        None => (rest, None),
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    let export = unescape(path.strip_prefix('/').unwrap_or(path));
    let params: Vec<(String, String)> = query
        .filter(|q| !q.is_empty())
        .map(|q| {
            q.split('&')
                .map(|p| match p.split_once('=') {
                    Some((k, v)) => (unescape(k), unescape(v)),
                    None => (unescape(p), String::new()),
                })
                .collect()
        })
        .unwrap_or_default();
    if params.len() > 1 || unix != (params.len() == 1) {
        return Err(BAD_URL.into());
    }
    if unix {
        if !authority.is_empty() || params[0].0 != "socket" {
            return Err(BAD_URL.into());
        }
        return Ok(Target {
            server: Server::Unix(params[0].1.clone()),
            export,
        });
    }
    // HOST[:PORT], HOST a name, an IPv4 address or a bracketed IPv6 one.
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (h, after) = v6.split_once(']').ok_or(BAD_URL)?;
        (h.to_string(), after.strip_prefix(':').unwrap_or(""))
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), p),
            None => (authority.to_string(), ""),
        }
    };
    if host.is_empty() {
        return Err(BAD_URL.into());
    }
    let port = match port {
        "" => DEFAULT_PORT.to_string(),
        p if p.parse::<u16>().is_ok_and(|n| n != 0) => p.to_string(),
        _ => return Err(BAD_URL.into()),
    };
    Ok(Target {
        server: Server::Inet { host, port },
        export,
    })
}

/// qemu's `nbd_parse_filename` for the colon syntax.
fn parse_legacy(name: &str) -> Result<Target, String> {
    let (spec, export) = match name.find(":exportname=") {
        Some(i) => (&name[..i], name[i + ":exportname=".len()..].to_string()),
        None => (name, String::new()),
    };
    let spec = spec
        .strip_prefix("nbd:")
        .ok_or("File name string for NBD must start with 'nbd:'")?;
    if spec.is_empty() {
        return Err("NBD server address missing".into());
    }
    if let Some(path) = spec.strip_prefix("unix:") {
        return Ok(Target {
            server: Server::Unix(path.to_string()),
            export,
        });
    }
    // qemu's inet_parse: [HOST6]:PORT or HOST:PORT.
    let bad = || format!("error parsing address '{spec}'");
    let (host, port) = match spec.strip_prefix('[') {
        Some(v6) => {
            let (h, p) = v6.split_once("]:").ok_or_else(bad)?;
            (h, p)
        }
        None => spec.split_once(':').ok_or_else(bad)?,
    };
    let port = port.split(',').next().unwrap_or("");
    if host.is_empty() || port.is_empty() {
        return Err(bad());
    }
    Ok(Target {
        server: Server::Inet {
            host: host.to_string(),
            port: port.to_string(),
        },
        export,
    })
}

/// The export an image name stands for: None when the name is no NBD name.
pub fn parse(name: &str) -> Option<Result<Target, String>> {
    let scheme = name.split_once(':')?.0;
    if scheme.contains('/') || !(scheme == "nbd" || scheme.starts_with("nbd+")) {
        return None;
    }
    Some(if name.contains("://") {
        parse_uri(name)
    } else if scheme == "nbd" {
        parse_legacy(name)
    } else {
        Err(format!("Unknown protocol '{scheme}'"))
    })
}

impl Target {
    /// qemu's name for an open NBD image (`nbd_refresh_filename`).
    pub fn filename(&self) -> String {
        match (&self.server, self.export.is_empty()) {
            (Server::Unix(path), true) => format!("nbd+unix://?socket={path}"),
            (Server::Unix(path), false) => format!("nbd+unix:///{}?socket={path}", self.export),
            (Server::Inet { host, port }, true) => format!("nbd://{host}:{port}"),
            (Server::Inet { host, port }, false) => {
                format!("nbd://{host}:{port}/{}", self.export)
            }
        }
    }
}

/// Connect to where `t` says (qemu's words when it cannot).
pub fn connect(t: &Target) -> Result<Stream, String> {
    match &t.server {
        Server::Unix(path) => std::os::unix::net::UnixStream::connect(path)
            .map(Stream::Unix)
            .map_err(|e| {
                format!(
                    "Failed to connect to '{path}': {}",
                    backends::errno_text(&e)
                )
            }),
        Server::Inet { host, port } => {
            use std::net::ToSocketAddrs;
            let addr = format!("{host}:{port}");
            let fail = |e: std::io::Error| {
                format!(
                    "Failed to connect to '{addr}': {}",
                    backends::errno_text(&e)
                )
            };
            let targets: Vec<_> = (host.as_str(), port.parse::<u16>().unwrap_or(0))
                .to_socket_addrs()
                .map_err(|_| {
                    format!("address resolution failed for {addr}: Name or service not known")
                })?
                .collect();
            let s = std::net::TcpStream::connect(&targets[..]).map_err(fail)?;
            let _ = s.set_nodelay(true);
            Ok(Stream::Tcp(s))
        }
    }
}

/// Open the export `name` names as a remote file; None when it names none (a local file).
/// `creds` finds a `tls-creds` object by id (qemu's message when there is none).
pub fn open(
    name: &str,
    opts: &RemoteOptions,
    creds: &dyn Fn(&str) -> Result<Creds, String>,
) -> Option<backends::Result<Arc<dyn Remote>>> {
    let target = match parse(name)? {
        Ok(t) => t,
        Err(msg) => return Some(Err(backends::Error::Open(msg))),
    };
    let tls = match opts.tls_creds.as_deref().map(creds).transpose() {
        Ok(t) => t,
        Err(msg) => return Some(Err(backends::Error::Open(msg))),
    };
    let r = open_target(target, name, tls, opts).map_err(backends::Error::Open);
    Some(r.and_then(|r| {
        // A read-only export opened for writing: refused, in qemu-nbd's words.
        if !opts.read_only && r.read_only() {
            return Err(backends::Error::Open(
                "Could not open image: Permission denied".into(),
            ));
        }
        Ok(r)
    }))
}

fn open_target(
    t: Target,
    name: &str,
    tls: Option<Creds>,
    opts: &RemoteOptions,
) -> Result<Arc<dyn Remote>, String> {
    let hostname = opts.tls_hostname.clone();
    let timeout = Duration::from_secs(opts.open_timeout);
    let (c, info, allocation) = connect_first(&t, tls.as_ref(), hostname.as_deref(), timeout)?;
    let filename = t.filename();
    let connector: Connector =
        Box::new(move || connect_export(&t, tls.as_ref(), hostname.as_deref()));
    let reconnect = Reconnect {
        delay: Duration::from_secs(opts.reconnect_delay),
        connector: Some(connector),
    };
    let r = NbdRemote::start(c, &info, allocation, name.to_string(), filename, reconnect)
        .map_err(|e| e.to_string())?;
    Ok(Arc::new(r))
}

/// The first connection, tried again until `open_timeout` has passed (qemu's
/// `open-timeout`, with its connect thread's pauses: 1, 2, 4, 8, 16 seconds); the last
/// attempt's error when it never works.
fn connect_first(
    t: &Target,
    tls: Option<&Creds>,
    hostname: Option<&str>,
    open_timeout: Duration,
) -> Result<Connected, String> {
    let deadline = Instant::now() + open_timeout;
    let mut pause = Duration::from_secs(1);
    loop {
        match connect_export(t, tls, hostname) {
            Ok(c) => return Ok(c),
            Err(e) => {
                let now = Instant::now();
                if now >= deadline {
                    return Err(e);
                }
                tracing::debug!("connecting to the NBD server: {e}");
                std::thread::sleep(pause.min(deadline - now));
                pause = (pause * 2).min(Duration::from_secs(16));
            }
        }
    }
}

/// One connection to the export `t` names, through TLS and the handshake to transmission.
fn connect_export(
    t: &Target,
    tls: Option<&Creds>,
    tls_hostname: Option<&str>,
) -> Result<Connected, String> {
    let stream = connect(t)?;
    let mut c = Client::start(stream).map_err(|e| e.report())?;
    if let Some(creds) = tls {
        let transport = match &t.server {
            Server::Unix(_) => Transport::Unix,
            Server::Inet { host, .. } => Transport::Tcp { host },
        };
        if let Err(e) = c.start_tls(creds, transport, tls_hostname) {
            c.abort_on_error(&e);
            return Err(e.report());
        }
    }
    match negotiate(&mut c, &t.export) {
        Ok((info, allocation)) => Ok((c, info, allocation)),
        Err(e) => {
            c.abort_on_error(&e);
            Err(e.report())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unix(path: &str, export: &str) -> Target {
        Target {
            server: Server::Unix(path.into()),
            export: export.into(),
        }
    }

    fn inet(host: &str, port: &str, export: &str) -> Target {
        Target {
            server: Server::Inet {
                host: host.into(),
                port: port.into(),
            },
            export: export.into(),
        }
    }

    #[test]
    fn parses_qemus_names() {
        let ok = |n: &str| parse(n).unwrap().unwrap();
        let err = |n: &str| parse(n).unwrap().unwrap_err();
        assert_eq!(ok("nbd+unix:///?socket=/s"), unix("/s", ""));
        assert_eq!(ok("nbd+unix:///disk%20a?socket=/s"), unix("/s", "disk a"));
        assert_eq!(ok("nbd://h"), inet("h", "10809", ""));
        assert_eq!(ok("nbd+tcp://h:99/e"), inet("h", "99", "e"));
        assert_eq!(ok("nbd://[::1]:7/e"), inet("::1", "7", "e"));
        assert_eq!(ok("nbd:unix:/s:exportname=e"), unix("/s", "e"));
        assert_eq!(ok("nbd:h:5"), inet("h", "5", ""));
        assert_eq!(err("nbd+unix:///e"), BAD_URL);
        assert_eq!(err("nbd://"), BAD_URL);
        assert_eq!(err("nbd+unix://h/?socket=/x"), BAD_URL);
        assert_eq!(err("nbd://h/?socket=x"), BAD_URL);
        assert_eq!(err("nbd+bogus://x/"), "Unknown protocol 'nbd+bogus'");
        assert!(parse("disk.img").is_none());
        assert!(parse("./nbd:x").is_none());
        assert!(parse("nbdx:y").is_none());
    }
}
