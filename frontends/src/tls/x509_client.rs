//! The x509 client's view of the server, as qemu's GnuTLS client has it: the server's
//! certificate is checked during the handshake but the verdict is given after it
//! (`Deferred`), and the client's own certificate goes only to a server that names its
//! issuer among the CAs it accepts (`ByIssuer`).
//!
//! Why defer: qemu (crypto/tlssession.c) completes the handshake and then checks the
//! certificate, so a refused server sees a client that closes without an alert, and a
//! server that refused the client's certificate sees none at all ("Verify failed: No
//! certificate was found"); qemu's iotests compare those server logs. The handshake's own
//! proof is still enforced (the server must sign with the certificate's key), and not one
//! byte of NBD travels before `tls::connect` reads the verdict and drops the session.

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::ResolvesClientCert;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, SignatureScheme};
use std::sync::{Arc, Mutex};

/// The first failure of the server's certificate, kept for after the handshake.
pub(super) type Verdict = Arc<Mutex<Option<rustls::Error>>>;

/// Runs `inner` on the server's certificate and records its failure instead of ending the
/// handshake with it. Without `check_name` a name mismatch is no failure: a connection with
/// no host name, which `tls::connect` refuses once the handshake is over, as qemu does,
/// unless `verify-peer=off`.
#[derive(Debug)]
pub(super) struct Deferred {
    pub inner: Arc<dyn ServerCertVerifier>,
    pub check_name: bool,
    pub verdict: Verdict,
}

impl ServerCertVerifier for Deferred {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        use rustls::CertificateError::{NotValidForName, NotValidForNameContext};
        let r = self
            .inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now);
        match r {
            Err(rustls::Error::InvalidCertificate(
                NotValidForName | NotValidForNameContext { .. },
            )) if !self.check_name => {}
            Err(e) => {
                let mut v = self.verdict.lock().unwrap_or_else(|p| p.into_inner());
                v.get_or_insert(e);
            }
            Ok(_) => {}
        }
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The client certificate, offered as GnuTLS offers it: to a server that names no CAs, or
/// that names the issuer of a certificate in our chain; otherwise none is sent (a server
/// that demands one then refuses us with its own words).
#[derive(Debug)]
pub(super) struct ByIssuer {
    key: Arc<CertifiedKey>,
    /// The issuers' names (DER, without the outer SEQUENCE).
    issuers: Vec<Vec<u8>>,
}

impl ByIssuer {
    pub fn new(key: CertifiedKey) -> ByIssuer {
        let issuers = key
            .cert
            .iter()
            .filter_map(|c| {
                let (_, cert) = x509_parser::parse_x509_certificate(c.as_ref()).ok()?;
                Some(name_body(cert.issuer().as_raw()).to_vec())
            })
            .collect();
        ByIssuer {
            key: Arc::new(key),
            issuers,
        }
    }
}

impl ResolvesClientCert for ByIssuer {
    fn resolve(
        &self,
        root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        let named = root_hint_subjects
            .iter()
            .any(|h| self.issuers.iter().any(|i| i.as_slice() == name_body(h)));
        (root_hint_subjects.is_empty() || named).then(|| self.key.clone())
    }
    fn has_certs(&self) -> bool {
        true
    }
}

/// A DER Name's contents: servers send CA names with or without the outer SEQUENCE.
fn name_body(der: &[u8]) -> &[u8] {
    let Some((&0x30, rest)) = der.split_first() else {
        return der;
    };
    let (len, rest) = match rest.split_first() {
        Some((&n, rest)) if n < 0x80 => (n as usize, rest),
        Some((&n, rest)) if (0x81..=0x84).contains(&n) => {
            let k = (n & 0x7f) as usize;
            if rest.len() < k {
                return der;
            }
            let len = rest[..k].iter().fold(0usize, |a, &b| (a << 8) | b as usize);
            (len, &rest[k..])
        }
        _ => return der,
    };
    if len == rest.len() {
        rest
    } else {
        der
    }
}

/// `verify-peer=off` on a client: qemu then accepts any server certificate.
#[derive(Debug)]
pub(super) struct NoVerify(pub Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_is_compared_with_or_without_its_sequence() {
        let body = [0x31u8, 0x03, 0x30, 0x01, 0x00];
        let mut der = vec![0x30, body.len() as u8];
        der.extend_from_slice(&body);
        assert_eq!(name_body(&der), &body);
        assert_eq!(name_body(&body), &body);
        // A length that does not cover the rest is not a SEQUENCE of its own.
        assert_eq!(name_body(&[0x30, 0x05, 0x01]), &[0x30, 0x05, 0x01]);
        let mut long = vec![0x30, 0x81, 0x80];
        long.extend_from_slice(&[7u8; 0x80]);
        assert_eq!(name_body(&long), &[7u8; 0x80][..]);
    }
}
