//! Pre-shared key credentials (qemu's `tls-creds-psk`) on OpenSSL. rustls has no external
//! PSK (see shared/crates.md); OpenSSL's PSK callbacks serve TLS 1.3 external PSKs with a
//! SHA-256 suite, which is what GnuTLS (qemu) negotiates, and TLS 1.2 (EC)DHE-PSK/PSK.

use super::engine::Engine;
use super::x509::errno_text;
use super::{Endpoint, TlsError, Versions};
use openssl::ex_data::Index;
use openssl::ssl::{
    ErrorCode, Ssl, SslContext, SslContextBuilder, SslMethod, SslStream, SslVersion,
};
use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

const KEYS_FILE: &str = "keys.psk";

/// Where the server callback leaves the username the client gave: OpenSSL's own
/// `SSL_get_psk_identity` answers only for TLS 1.2.
fn identity_index() -> Option<Index<Ssl, String>> {
    static INDEX: OnceLock<Option<Index<Ssl, String>>> = OnceLock::new();
    *INDEX.get_or_init(|| Ssl::new_ex_index().ok())
}
/// qemu's default client username.
pub const DEFAULT_USERNAME: &str = "qemu";

/// What `--object tls-creds-psk,...` says.
#[derive(Clone, Debug)]
pub struct PskOptions {
    pub dir: PathBuf,
    pub endpoint: Endpoint,
    pub username: Option<String>,
    pub versions: Versions,
}

#[derive(Clone)]
pub struct PskCreds {
    ctx: SslContext,
    endpoint: Endpoint,
    username: String,
}

/// `keys.psk`: lines of `username:hexkey`.
fn parse_keys(text: &str, file: &str) -> Result<HashMap<String, Vec<u8>>, TlsError> {
    let mut keys = HashMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() {
            continue;
        }
        let bad = |why: &str| TlsError::Creds(format!("{file}:{}: {why}", n + 1));
        let Some((user, hex)) = line.split_once(':') else {
            return Err(bad("expected 'username:hexkey'"));
        };
        let key = decode_hex(hex.trim()).ok_or_else(|| bad("the key is not hexadecimal"))?;
        if key.is_empty() || key.len() > 256 {
            return Err(bad("the key must be 1 to 256 bytes"));
        }
        keys.entry(user.to_string()).or_insert(key);
    }
    Ok(keys)
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

fn ssl_err(e: impl std::fmt::Display) -> TlsError {
    TlsError::Creds(format!("OpenSSL: {e}"))
}

fn limit_versions(b: &mut SslContextBuilder, v: Versions) -> Result<(), TlsError> {
    let min = if v.tls12 {
        SslVersion::TLS1_2
    } else {
        SslVersion::TLS1_3
    };
    let max = if v.tls13 {
        SslVersion::TLS1_3
    } else {
        SslVersion::TLS1_2
    };
    b.set_min_proto_version(Some(min)).map_err(ssl_err)?;
    b.set_max_proto_version(Some(max)).map_err(ssl_err)
}

impl PskCreds {
    pub fn load(o: &PskOptions) -> Result<PskCreds, TlsError> {
        let path = o.dir.join(KEYS_FILE);
        let file = path.display().to_string();
        let text = std::fs::read(&path).map_err(|e| {
            TlsError::Creds(format!(
                "Unable to access credentials {file}: {}",
                errno_text(&e)
            ))
        })?;
        let keys = parse_keys(&String::from_utf8_lossy(&text), &file)?;
        let method = match o.endpoint {
            Endpoint::Server => SslMethod::tls_server(),
            Endpoint::Client => SslMethod::tls_client(),
        };
        let mut b = SslContextBuilder::new(method).map_err(ssl_err)?;
        limit_versions(&mut b, o.versions)?;
        // TLS 1.2 suites qemu's priority "+ECDHE-PSK:+DHE-PSK:+PSK" allows.
        b.set_cipher_list("ECDHEPSK:DHEPSK:PSK:!aNULL:!eNULL:!3DES:!RC4")
            .map_err(ssl_err)?;
        let username = o
            .username
            .clone()
            .unwrap_or_else(|| DEFAULT_USERNAME.to_string());
        match o.endpoint {
            Endpoint::Server => {
                let dh = openssl::dh::Dh::get_2048_256().map_err(ssl_err)?;
                b.set_tmp_dh(&dh).map_err(ssl_err)?;
                let keys = Arc::new(keys);
                b.set_psk_server_callback(move |ssl, identity, out| {
                    let id = identity.map(String::from_utf8_lossy).unwrap_or_default();
                    match keys.get(id.as_ref()) {
                        Some(k) if k.len() <= out.len() => {
                            if let Some(idx) = identity_index() {
                                ssl.set_ex_data(idx, id.to_string());
                            }
                            out[..k.len()].copy_from_slice(k);
                            Ok(k.len())
                        }
                        _ => {
                            tracing::warn!("TLS PSK: unknown username '{id}'");
                            Ok(0)
                        }
                    }
                });
            }
            Endpoint::Client => {
                let Some(key) = keys.get(&username).cloned() else {
                    return Err(TlsError::Creds(format!(
                        "Username {username} not found in PSK file {file}"
                    )));
                };
                let user = username.clone();
                b.set_psk_client_callback(move |_ssl, _hint, identity, out| {
                    let id = user.as_bytes();
                    if id.len() >= identity.len() || key.len() > out.len() {
                        return Ok(0);
                    }
                    identity[..id.len()].copy_from_slice(id);
                    identity[id.len()] = 0;
                    out[..key.len()].copy_from_slice(&key);
                    Ok(key.len())
                });
            }
        }
        Ok(PskCreds {
            ctx: b.build(),
            endpoint: o.endpoint,
            username,
        })
    }

    pub fn endpoint(&self) -> Endpoint {
        self.endpoint
    }

    pub fn engine(&self, want: Endpoint) -> Result<Box<dyn Engine>, TlsError> {
        if self.endpoint != want {
            return Err(TlsError::WrongEndpoint(want));
        }
        let mut ssl = Ssl::new(&self.ctx).map_err(ssl_err)?;
        match want {
            Endpoint::Server => ssl.set_accept_state(),
            Endpoint::Client => ssl.set_connect_state(),
        }
        let mut engine = OpensslEngine {
            s: SslStream::new(ssl, MemIo::default()).map_err(ssl_err)?,
            done: false,
            client_name: None,
        };
        match want {
            Endpoint::Server => {}
            Endpoint::Client => {
                engine.client_name = Some(self.username.clone());
                // Produce the ClientHello now, so the handshake loop has something to send.
                engine.step()?;
            }
        }
        Ok(Box::new(engine))
    }
}

/// OpenSSL's view of the network: bytes we were given, bytes it wants sent.
#[derive(Default)]
struct MemIo {
    input: Vec<u8>,
    pos: usize,
    output: Vec<u8>,
}

impl Read for MemIo {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = &self.input[self.pos..];
        if left.is_empty() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = left.len().min(buf.len());
        buf[..n].copy_from_slice(&left[..n]);
        self.pos += n;
        if self.pos == self.input.len() {
            self.input.clear();
            self.pos = 0;
        }
        Ok(n)
    }
}

impl Write for MemIo {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.output.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

struct OpensslEngine {
    s: SslStream<MemIo>,
    done: bool,
    client_name: Option<String>,
}

fn io_err(e: openssl::ssl::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

impl OpensslEngine {
    /// Advance the handshake as far as the input allows.
    fn step(&mut self) -> Result<(), TlsError> {
        if self.done {
            return Ok(());
        }
        match self.s.do_handshake() {
            Ok(()) => {
                self.done = true;
                Ok(())
            }
            Err(e) if e.code() == ErrorCode::WANT_READ => Ok(()),
            Err(e) => Err(TlsError::Handshake(e.to_string())),
        }
    }
}

impl Engine for OpensslEngine {
    fn handshaking(&self) -> bool {
        !self.done
    }

    fn feed(&mut self, ciphertext: &[u8], plain: &mut Vec<u8>) -> io::Result<bool> {
        self.s.get_mut().input.extend_from_slice(ciphertext);
        if !self.done {
            self.step()
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
            if !self.done {
                return Ok(false);
            }
        }
        let mut buf = [0u8; 16384];
        loop {
            match self.s.ssl_read(&mut buf) {
                Ok(0) => return Ok(true),
                Ok(n) => plain.extend_from_slice(&buf[..n]),
                Err(e) if e.code() == ErrorCode::WANT_READ => return Ok(false),
                Err(e) if e.code() == ErrorCode::ZERO_RETURN => return Ok(true),
                Err(e) => return Err(io_err(e)),
            }
        }
    }

    fn write_plain(&mut self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            let n = self.s.ssl_write(data).map_err(io_err)?;
            data = &data[n..];
        }
        Ok(())
    }

    fn take_tls(&mut self, out: &mut Vec<u8>) {
        out.append(&mut self.s.get_mut().output);
    }

    fn close(&mut self) {
        let _ = self.s.shutdown();
    }

    fn peer_identity(&self) -> Option<String> {
        match &self.client_name {
            // As a client we authenticated the server by the key alone.
            Some(_) => None,
            None => identity_index()
                .and_then(|idx| self.s.ssl().ex_data(idx).cloned())
                .or_else(|| {
                    self.s
                        .ssl()
                        .psk_identity()
                        .map(|id| String::from_utf8_lossy(id).into_owned())
                }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_file_is_parsed_and_checked() {
        let k = parse_keys("alice:0123ab\n\nbob:ff\r\n", "k").unwrap();
        assert_eq!(k["alice"], vec![0x01, 0x23, 0xab]);
        assert_eq!(k["bob"], vec![0xff]);
        assert!(parse_keys("alice", "k").is_err());
        assert!(parse_keys("alice:xyz", "k").is_err());
        assert!(parse_keys("alice:", "k").is_err());
    }
}
