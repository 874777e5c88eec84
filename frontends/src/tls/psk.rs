//! Pre-shared key credentials (qemu's `tls-creds-psk`) on OpenSSL. rustls has no external
//! PSK (see shared/crates.md); OpenSSL's PSK callbacks serve TLS 1.3 external PSKs with a
//! SHA-256 suite, which is what GnuTLS (qemu) negotiates, and TLS 1.2 (EC)DHE-PSK/PSK.

use super::engine::Engine;
use super::openssl_engine::{
    identity_index, limit_versions, prefer_fast_suites, ssl_err, unknown_identity_index,
    OpensslEngine,
};
use super::{Endpoint, TlsError, Versions};
use backends::errno_text;
use openssl::ssl::{SslContext, SslContextBuilder, SslMethod};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

const KEYS_FILE: &str = "keys.psk";

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
        prefer_fast_suites(&mut b)?;
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
                // No session tickets, as qemu's GnuTLS server (see x509.rs `load_server`).
                b.set_num_tickets(0).map_err(ssl_err)?;
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
                            if let Some(idx) = unknown_identity_index() {
                                ssl.set_ex_data(idx, true);
                            }
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
        let client_name = match want {
            Endpoint::Server => None,
            Endpoint::Client => Some(self.username.clone()),
        };
        OpensslEngine::start(&self.ctx, want, client_name)
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
