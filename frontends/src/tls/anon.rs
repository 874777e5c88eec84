//! Anonymous credentials (qemu's `tls-creds-anon`): encryption without authentication, as
//! GnuTLS' ANON-DH (TLS 1.2 anonymous Diffie-Hellman; TLS 1.3 has no anonymous suites).
//! On OpenSSL, whose `aNULL` suites need security level 0. `dir=` may hold `dh-params.pem`.

use super::engine::Engine;
use super::openssl_engine::{ssl_err, OpensslEngine};
use super::{Endpoint, TlsError};
use backends::errno_text;
use openssl::ssl::{SslContext, SslContextBuilder, SslMethod, SslVersion};
use std::path::PathBuf;

#[derive(Clone)]
pub struct AnonCreds {
    ctx: SslContext,
    endpoint: Endpoint,
}

impl AnonCreds {
    pub fn load(dir: Option<PathBuf>, endpoint: Endpoint) -> Result<AnonCreds, TlsError> {
        let method = match endpoint {
            Endpoint::Server => SslMethod::tls_server(),
            Endpoint::Client => SslMethod::tls_client(),
        };
        let mut b = SslContextBuilder::new(method).map_err(ssl_err)?;
        b.set_min_proto_version(Some(SslVersion::TLS1_2))
            .map_err(ssl_err)?;
        b.set_max_proto_version(Some(SslVersion::TLS1_2))
            .map_err(ssl_err)?;
        b.set_security_level(0);
        b.set_cipher_list("aNULL:!eNULL:!3DES:!RC4:@SECLEVEL=0")
            .map_err(ssl_err)?;
        if endpoint == Endpoint::Server {
            let file = dir.map(|d| d.join("dh-params.pem"));
            let dh = match file.filter(|f| f.exists()) {
                Some(f) => {
                    let pem = std::fs::read(&f).map_err(|e| {
                        TlsError::Creds(format!(
                            "Unable to read {}: {}",
                            f.display(),
                            errno_text(&e)
                        ))
                    })?;
                    openssl::dh::Dh::params_from_pem(&pem).map_err(|e| {
                        TlsError::Creds(format!(
                            "Unable to load DH parameters {}: {e}",
                            f.display()
                        ))
                    })?
                }
                None => openssl::dh::Dh::get_2048_256().map_err(ssl_err)?,
            };
            b.set_tmp_dh(&dh).map_err(ssl_err)?;
            // No session tickets, as qemu's GnuTLS server (see x509.rs `load_server`).
            b.set_num_tickets(0).map_err(ssl_err)?;
        }
        Ok(AnonCreds {
            ctx: b.build(),
            endpoint,
        })
    }

    pub fn endpoint(&self) -> Endpoint {
        self.endpoint
    }

    pub fn engine(&self, want: Endpoint) -> Result<Box<dyn Engine>, TlsError> {
        if self.endpoint != want {
            return Err(TlsError::WrongEndpoint(want));
        }
        let name = (want == Endpoint::Client).then(String::new);
        OpensslEngine::start(&self.ctx, want, name)
    }
}
