//! x509 credentials (qemu's `tls-creds-x509`) on rustls: the files qemu reads from `dir=`,
//! the server and client configurations, and the peer's distinguished name in the form
//! qemu's `--tls-authz` compares against.

use super::engine::Engine;
use super::rustls_server::ServerHandshake;
use super::x509_client::{ByIssuer, Deferred, NoVerify, Verdict};
use super::{Endpoint, TlsError, Versions};
use rustls::client::danger::ServerCertVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, Connection, RootCertStore, ServerConfig};
use std::io::{self, IoSlice, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// File names inside `dir=`, as qemu's crypto/tlscredsx509.h names them.
const CA_CERT: &str = "ca-cert.pem";
const CA_CRL: &str = "ca-crl.pem";
const SERVER_CERT: &str = "server-cert.pem";
const SERVER_KEY: &str = "server-key.pem";
const CLIENT_CERT: &str = "client-cert.pem";
const CLIENT_KEY: &str = "client-key.pem";

/// What `--object tls-creds-x509,...` says.
#[derive(Clone, Debug)]
pub struct X509Options {
    pub dir: PathBuf,
    pub endpoint: Endpoint,
    pub verify_peer: bool,
    /// The private key's passphrase (`passwordid=` names a secret holding it).
    pub key_password: Option<Vec<u8>>,
    pub versions: Versions,
    /// `sanity-check=on` (qemu's default): check the certificates at load as qemu does.
    pub sanity_check: bool,
}

#[derive(Clone)]
pub enum X509Creds {
    Server {
        config: Arc<ServerConfig>,
        /// `verify-peer=on`: a client must present a certificate the CA signed; one that
        /// presents none is refused after the handshake (`tls::accept`), as qemu does.
        verify_peer: bool,
    },
    Client {
        /// Each connection takes a copy with its own verdict (`x509_client::Deferred`).
        config: Arc<ClientConfig>,
        /// Checks the server certificate's chain and name (or nothing, `verify-peer=off`).
        /// A connection with no name (a Unix socket without `--tls-hostname`) checks the
        /// chain only, and `tls::connect` then refuses the server as qemu does if
        /// `verify_peer` (see `tls::check_server_name`).
        verifier: Arc<dyn ServerCertVerifier>,
        /// `verify-peer=on` (the default): the server certificate is checked at all.
        verify_peer: bool,
    },
}

/// ring's suites, the fastest on this CPU first (see `super::aes_is_fast`); a server follows
/// this order rather than the client's.
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    let mut p = rustls::crypto::ring::default_provider();
    let fast_aes = super::aes_is_fast();
    p.cipher_suites.sort_by_key(|s| {
        let name = format!("{:?}", s.suite());
        match (name.contains("AES_128_GCM"), name.contains("CHACHA20")) {
            (true, _) if fast_aes => 0,
            (_, true) if !fast_aes => 0,
            (true, _) | (_, true) => 1,
            _ => 2,
        }
    });
    Arc::new(p)
}

/// qemu's wording for a file it must have and cannot open.
/// An optional credentials file: None when it does not exist.
fn access(path: &Path) -> Result<Option<PathBuf>, TlsError> {
    match std::fs::metadata(path) {
        Ok(_) => Ok(Some(path.to_path_buf())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(access_error(path, &e)),
    }
}

/// A credentials file that must exist.
fn required(path: &Path) -> Result<PathBuf, TlsError> {
    std::fs::metadata(path)
        .map(|_| path.to_path_buf())
        .map_err(|e| access_error(path, &e))
}

fn access_error(path: &Path, e: &io::Error) -> TlsError {
    TlsError::Creds(format!(
        "Unable to access credentials {}: {}",
        path.display(),
        backends::errno_text(e)
    ))
}

/// qemu's load-time sanity checks of the CA and our own certificate (`sanity-check=on`).
fn sanity(
    o: &X509Options,
    ca: &Path,
    own: Option<(&Path, &[CertificateDer<'static>])>,
    server: bool,
) -> Result<(), TlsError> {
    if !o.sanity_check {
        return Ok(());
    }
    let ca_der: Vec<Vec<u8>> = ca_certs(ca)?.iter().map(|c| c.to_vec()).collect();
    let (path, chain): (Option<&Path>, Vec<Vec<u8>>) = match own {
        Some((p, chain)) => (Some(p), chain.iter().map(|c| c.to_vec()).collect()),
        None => (None, Vec::new()),
    };
    super::sanity::check(ca, &ca_der, path, &chain, server)
}

fn cert_key_error(cert: &Path, key: &Path, e: impl std::fmt::Display) -> TlsError {
    TlsError::Creds(format!(
        "Cannot load certificate '{}' & key '{}': {e}",
        cert.display(),
        key.display()
    ))
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| {
        TlsError::Creds(format!(
            "Unable to read {}: {}",
            path.display(),
            backends::errno_text(&e)
        ))
    })
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path)?;
    let certs: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(&pem).collect();
    match certs {
        Ok(c) if !c.is_empty() => Ok(c),
        Ok(_) => Err(TlsError::Creds(format!(
            "Unable to import certificate {}: no PEM certificate in the file",
            path.display()
        ))),
        Err(e) => Err(TlsError::Creds(format!(
            "Unable to import certificate {}: {e}",
            path.display()
        ))),
    }
}

/// The private key, decrypted with `password` if given; Err is GnuTLS' reason text.
fn key(path: &Path, password: Option<&[u8]>) -> Result<PrivateKeyDer<'static>, String> {
    let pem = std::fs::read(path).map_err(|e| backends::errno_text(&e))?;
    let encrypted = pem.windows(9).any(|w| w == b"ENCRYPTED");
    match password {
        // rustls reads only clear keys; OpenSSL decrypts the PKCS#8 and legacy PEM forms
        // that certtool and openssl write.
        Some(pw) => {
            let k = openssl::pkey::PKey::private_key_from_pem_passphrase(&pem, pw)
                .map_err(|_| "Decryption has failed.".to_string())?;
            let der = k.private_key_to_pkcs8().map_err(|e| e.to_string())?;
            Ok(PrivateKeyDer::Pkcs8(der.into()))
        }
        None if encrypted => Err("Decryption has failed.".into()),
        None => PrivateKeyDer::from_pem_slice(&pem).map_err(|e| e.to_string()),
    }
}

fn cert_and_key(
    cert: &Path,
    key_file: &Path,
    password: Option<&[u8]>,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
    let fail = |why: String| {
        TlsError::Creds(format!(
            "Cannot load certificate '{}' & key '{}': {why}",
            cert.display(),
            key_file.display()
        ))
    };
    let chain = certs(cert)?;
    let key = key(key_file, password).map_err(fail)?;
    Ok((chain, key))
}

/// The CA list, with qemu's message when it is not one.
fn ca_certs(ca: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    match std::fs::metadata(ca) {
        Err(_) => certs(ca),
        Ok(_) => certs(ca).map_err(|_| {
            TlsError::Creds(format!(
                "Unable to import CA certificate list {}",
                ca.display()
            ))
        }),
    }
}

fn roots(ca: &Path) -> Result<RootCertStore, TlsError> {
    let mut store = RootCertStore::empty();
    for c in ca_certs(ca)? {
        store.add(c).map_err(|e| {
            TlsError::Creds(format!(
                "Unable to load CA certificate {}: {e}",
                ca.display()
            ))
        })?;
    }
    Ok(store)
}

fn crls(path: &Path) -> Result<Vec<CertificateRevocationListDer<'static>>, TlsError> {
    let pem = read(path)?;
    CertificateRevocationListDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            TlsError::Creds(format!(
                "Unable to load CA revocation list {}: {e}",
                path.display()
            ))
        })
}

impl X509Creds {
    /// Load the files `endpoint` needs from `dir`, in qemu's order (so the first missing
    /// file is the one qemu would name).
    pub fn load(o: &X509Options) -> Result<X509Creds, TlsError> {
        let ca = required(&o.dir.join(CA_CERT))?;
        match o.endpoint {
            Endpoint::Server => load_server(o, &ca),
            Endpoint::Client => load_client(o, &ca),
        }
    }

    /// `verify-peer=on`: a client checks the server certificate (and so needs a name to check
    /// it against); a server requires a client certificate.
    pub fn verifies_peer(&self) -> bool {
        match self {
            X509Creds::Server { verify_peer, .. } | X509Creds::Client { verify_peer, .. } => {
                *verify_peer
            }
        }
    }

    /// A server session whose handshake hands over to our record layer (`records.rs`).
    pub fn server_handshake(&self) -> Result<ServerHandshake, TlsError> {
        match self {
            X509Creds::Server { config, .. } => {
                let conn = rustls::server::UnbufferedServerConnection::new(config.clone())
                    .map_err(|e| TlsError::Handshake(e.to_string()))?;
                Ok(ServerHandshake::new(conn))
            }
            X509Creds::Client { .. } => Err(TlsError::WrongEndpoint(Endpoint::Server)),
        }
    }

    pub fn client_engine(&self, hostname: Option<&str>) -> Result<Box<dyn Engine>, TlsError> {
        match self {
            X509Creds::Client {
                config, verifier, ..
            } => {
                let name = match hostname {
                    Some(h) => ServerName::try_from(h.to_string()).map_err(|_| {
                        TlsError::Handshake(format!("'{h}' is not a valid TLS host name"))
                    })?,
                    // An address sends no SNI; the verifier ignores the name.
                    None => ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()),
                };
                let verdict = Verdict::default();
                let mut config = ClientConfig::clone(config);
                config
                    .dangerous()
                    .set_certificate_verifier(Arc::new(Deferred {
                        inner: verifier.clone(),
                        check_name: hostname.is_some(),
                        verdict: verdict.clone(),
                    }));
                let conn = rustls::ClientConnection::new(Arc::new(config), name)
                    .map_err(|e| TlsError::Handshake(e.to_string()))?;
                let mut engine = RustlsEngine::new(conn.into(), hostname.map(String::from));
                engine.verdict = Some(verdict);
                Ok(Box::new(engine))
            }
            X509Creds::Server { .. } => Err(TlsError::WrongEndpoint(Endpoint::Client)),
        }
    }
}

struct RustlsEngine {
    conn: Connection,
    /// The name the server certificate was checked against (client side), for messages.
    hostname: Option<String>,
    /// The client's verdict on the server's certificate, given after the handshake.
    verdict: Option<Verdict>,
}

impl RustlsEngine {
    fn new(mut conn: Connection, hostname: Option<String>) -> Self {
        // `stream.rs` encrypts a reply's 64 KiB piece in one call and takes the records out
        // at once; rustls' default limit would refuse part of it.
        conn.set_buffer_limit(None);
        RustlsEngine {
            conn,
            hostname,
            verdict: None,
        }
    }

    fn error(&self, e: rustls::Error) -> io::Error {
        rustls_error(e, self.hostname.as_deref())
    }
}

/// GnuTLS' (qemu's) wording for the verification failures users meet; `hostname` is the name
/// a client checked the server's certificate against.
pub(super) fn rustls_error(e: rustls::Error, hostname: Option<&str>) -> io::Error {
    use rustls::CertificateError as C;
    let msg = match &e {
        rustls::Error::NoCertificatesPresented => super::NO_CLIENT_CERTIFICATE.into(),
        rustls::Error::AlertReceived(_) => super::engine::ALERT_RECEIVED.into(),
        rustls::Error::InvalidCertificate(c) => match c {
            C::UnknownIssuer | C::BadSignature => {
                "The certificate hasn't got a known issuer".into()
            }
            C::Revoked => "The certificate has been revoked".into(),
            C::Expired | C::ExpiredContext { .. } => "The certificate has expired".into(),
            C::NotValidYet | C::NotValidYetContext { .. } => {
                "The certificate is not yet activated".into()
            }
            C::NotValidForName | C::NotValidForNameContext { .. } => format!(
                "Certificate does not match the hostname {}",
                hostname.unwrap_or("")
            ),
            _ => format!("The certificate is not trusted: {e}"),
        },
        _ => e.to_string(),
    };
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

impl Engine for RustlsEngine {
    fn handshaking(&self) -> bool {
        self.conn.is_handshaking()
    }

    fn feed_some(&mut self, ciphertext: &[u8]) -> io::Result<usize> {
        let mut rd = ciphertext;
        match self.conn.read_tls(&mut rd) {
            Ok(_) => {}
            // "received plaintext buffer full": read_plain first.
            Err(e) if e.kind() == io::ErrorKind::Other => return Ok(0),
            Err(e) => return Err(e),
        }
        self.conn.process_new_packets().map_err(|e| self.error(e))?;
        Ok(ciphertext.len() - rd.len())
    }

    fn read_plain(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        if buf.is_empty() {
            return Ok(None);
        }
        // rustls never sees the socket's EOF (we feed it slices), so an empty buffer is
        // WouldBlock and Ok(0) is the peer's close_notify.
        match self.conn.reader().read(buf) {
            Ok(n) => Ok(Some(n)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn write_plain(&mut self, data: &[u8]) -> io::Result<()> {
        self.conn.writer().write_all(data)
    }

    fn write_plain_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<()> {
        // rustls fragments the pieces as one payload, without copying them first. With no
        // buffer limit (see `new`) it takes everything in one call.
        let n = self.conn.writer().write_vectored(bufs)?;
        if n == bufs.iter().map(|b| b.len()).sum::<usize>() {
            Ok(())
        } else {
            Err(io::ErrorKind::WriteZero.into())
        }
    }

    fn take_tls(&mut self, out: &mut Vec<u8>) {
        while self.conn.wants_write() {
            if self.conn.write_tls(out).is_err() {
                break;
            }
        }
    }

    fn wants_write(&self) -> bool {
        self.conn.wants_write()
    }

    fn close(&mut self) {
        self.conn.send_close_notify();
    }

    fn server_verdict(&self) -> io::Result<()> {
        let failure = self
            .verdict
            .as_ref()
            .and_then(|v| v.lock().unwrap_or_else(|p| p.into_inner()).take());
        match failure {
            Some(e) => Err(self.error(e)),
            None => Ok(()),
        }
    }

    fn peer_certified(&self) -> bool {
        // rustls keeps the peer's certificates only once its verifier accepted them.
        !self.handshaking() && self.conn.peer_certificates().is_some_and(|c| !c.is_empty())
    }

    fn peer_identity(&self) -> Option<String> {
        let cert = self.conn.peer_certificates()?.first()?;
        distinguished_name(cert.as_ref())
    }
}

/// The subject of a DER certificate as GnuTLS' `gnutls_x509_crt_get_dn` prints it, which is
/// what qemu's authz objects match: RDNs in certificate order joined by ",", multi-valued
/// RDNs by "+", short names for the usual attributes, RFC 4514 escaping.
pub fn distinguished_name(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let mut out = String::new();
    for (i, rdn) in cert.subject().iter_rdn().enumerate() {
        if i > 0 {
            out.push(',');
        }
        for (j, atv) in rdn.iter().enumerate() {
            if j > 0 {
                out.push('+');
            }
            let oid = atv.attr_type().to_id_string();
            match attribute_name(&oid) {
                Some(name) => {
                    out.push_str(name);
                    out.push('=');
                    match atv.as_str() {
                        Ok(v) => escape_into(&mut out, v),
                        Err(_) => hex_into(&mut out, atv.attr_value().data),
                    }
                }
                None => {
                    out.push_str(&oid);
                    out.push('=');
                    hex_into(&mut out, atv.attr_value().data);
                }
            }
        }
    }
    Some(out)
}

fn attribute_name(oid: &str) -> Option<&'static str> {
    Some(match oid {
        "2.5.4.3" => "CN",
        "2.5.4.4" => "SN",
        "2.5.4.5" => "serialNumber",
        "2.5.4.6" => "C",
        "2.5.4.7" => "L",
        "2.5.4.8" => "ST",
        "2.5.4.9" => "street",
        "2.5.4.10" => "O",
        "2.5.4.11" => "OU",
        "2.5.4.12" => "title",
        "2.5.4.42" => "GN",
        "2.5.4.43" => "initials",
        "2.5.4.44" => "generationQualifier",
        "2.5.4.46" => "dnQualifier",
        "2.5.4.65" => "pseudonym",
        "0.9.2342.19200300.100.1.1" => "UID",
        "0.9.2342.19200300.100.1.25" => "DC",
        "1.2.840.113549.1.9.1" => "EMAIL",
        _ => return None,
    })
}

fn escape_into(out: &mut String, v: &str) {
    let n = v.chars().count();
    for (i, c) in v.chars().enumerate() {
        let special = matches!(c, ',' | '+' | '"' | '\\' | '<' | '>' | ';')
            || (i == 0 && (c == '#' || c == ' '))
            || (i + 1 == n && c == ' ');
        if special {
            out.push('\\');
        }
        out.push(c);
    }
}

/// RFC 4514's form for values that are not strings: `#` and the hex of the DER value.
fn hex_into(out: &mut String, data: &[u8]) {
    out.push('#');
    for b in data {
        out.push_str(&format!("{b:02x}"));
    }
}

fn load_server(o: &X509Options, ca: &Path) -> Result<X509Creds, TlsError> {
    let d = &o.dir;
    let crl = access(&d.join(CA_CRL))?;
    let cert = required(&d.join(SERVER_CERT))?;
    let key_file = required(&d.join(SERVER_KEY))?;
    let (chain, key) = cert_and_key(&cert, &key_file, o.key_password.as_deref())?;
    sanity(o, ca, Some((&cert, &chain)), true)?;
    let builder = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(o.versions.rustls())
        .map_err(|e| TlsError::Creds(e.to_string()))?;
    let builder = if o.verify_peer {
        // A certificate is requested, not demanded, as GnuTLS does for qemu-nbd
        // (GNUTLS_CERT_REQUEST): one that is presented is verified here, during the
        // handshake; a client that presents none completes the handshake and is then refused
        // by tls::accept before any NBD option is read. See `tls::accept` for why.
        let mut v = WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca)?), provider())
            .allow_unauthenticated();
        if let Some(crl) = crl {
            v = v.with_crls(crls(&crl)?);
        }
        let v = v
            .build()
            .map_err(|e| TlsError::Creds(format!("{}: {e}", ca.display())))?;
        builder.with_client_cert_verifier(v)
    } else {
        builder.with_no_client_auth()
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(|e| cert_key_error(&cert, &key_file, e))?;
    config.ignore_client_order = true;
    // No session tickets, as qemu's GnuTLS server sends none (qemu resumes no sessions): a
    // client that refuses us after the handshake would leave them unread, and its close
    // then resets the connection instead of ending it.
    config.send_tls13_tickets = 0;
    // The record layer after the handshake is ours (`records.rs`): rustls hands it the keys.
    config.enable_secret_extraction = true;
    Ok(X509Creds::Server {
        config: Arc::new(config),
        verify_peer: o.verify_peer,
    })
}

fn load_client(o: &X509Options, ca: &Path) -> Result<X509Creds, TlsError> {
    let d = &o.dir;
    let cert = access(&d.join(CLIENT_CERT))?;
    let key_file = access(&d.join(CLIENT_KEY))?;
    let client_auth = match (cert, key_file) {
        (Some(cert), Some(key_file)) => {
            let (chain, key) = cert_and_key(&cert, &key_file, o.key_password.as_deref())?;
            sanity(o, ca, Some((&cert, &chain)), false)?;
            Some((chain, key, cert, key_file))
        }
        _ => {
            sanity(o, ca, None, false)?;
            None
        }
    };
    let verifier: Arc<dyn ServerCertVerifier> = if o.verify_peer {
        rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots(ca)?),
            provider(),
        )
        .build()
        .map_err(|e| TlsError::Creds(format!("{}: {e}", ca.display())))?
    } else {
        Arc::new(NoVerify(provider()))
    };
    let b = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(o.versions.rustls())
        .map_err(|e| TlsError::Creds(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier.clone());
    let config = match client_auth {
        Some((chain, key, cert, key_file)) => {
            let key = CertifiedKey::from_der(chain, key, &provider())
                .map_err(|e| cert_key_error(&cert, &key_file, e))?;
            b.with_client_cert_resolver(Arc::new(ByIssuer::new(key)))
        }
        None => b.with_no_client_auth(),
    };
    Ok(X509Creds::Client {
        config: Arc::new(config),
        verifier,
        verify_peer: o.verify_peer,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_follows_rfc4514() {
        let mut s = String::new();
        escape_into(&mut s, "#a,b+c ");
        assert_eq!(s, "\\#a\\,b\\+c\\ ");
    }
    /// A server on our record layer against a rustls client that renews its keys (and asks
    /// us to renew ours), over TLS 1.3 and 1.2: every byte echoed back intact. The server's
    /// own key limit is tiny under test, so it renews its send key many times too.
    #[test]
    fn record_layer_echoes_across_key_updates() {
        use crate::tls::stream::{into_stream, Session};
        use crate::transport::Stream;
        use std::os::unix::net::UnixStream;
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
        let st = std::process::Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
            ])
            .args(["-nodes", "-subj", "/CN=localhost", "-days", "1", "-keyout"])
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .output()
            .expect("openssl makes a test certificate");
        assert!(
            st.status.success(),
            "{}",
            String::from_utf8_lossy(&st.stderr)
        );
        let (chain, pk) = cert_and_key(&cert, &key, None).unwrap();
        for versions in [&rustls::version::TLS13, &rustls::version::TLS12] {
            let mut sc = ServerConfig::builder_with_provider(provider())
                .with_protocol_versions(&[versions])
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(chain.clone(), pk.clone_key())
                .unwrap();
            sc.enable_secret_extraction = true;
            let creds = X509Creds::Server {
                config: Arc::new(sc),
                verify_peer: false,
            };
            let (a, b) = UnixStream::pair().unwrap();
            let server = std::thread::spawn(move || {
                let mut net = Stream::Unix(a);
                let mut hs = Box::new(creds.server_handshake().unwrap());
                let early = crate::tls::engine::handshake(hs.as_mut(), &mut net, None).unwrap();
                let est = hs.establish().unwrap();
                let mut plain = early;
                plain.extend_from_slice(&est.plain);
                let session = Session::records(est.records, est.cipher, plain);
                let mut s = into_stream(session, net.try_clone().unwrap(), None).unwrap();
                let mut buf = vec![0u8; 100_000];
                loop {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => s.write_all(&buf[..n]).unwrap(),
                    }
                }
            });
            let cc = ClientConfig::builder_with_provider(provider())
                .with_protocol_versions(&[versions])
                .unwrap()
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(NoVerify(provider())))
                .with_no_client_auth();
            let conn = rustls::ClientConnection::new(
                Arc::new(cc),
                ServerName::try_from("localhost").unwrap(),
            )
            .unwrap();
            let mut tls = rustls::StreamOwned::new(conn, b);
            for round in 0..6u8 {
                let msg: Vec<u8> = (0..70_000u32).map(|i| (i as u8) ^ round).collect();
                tls.write_all(&msg).unwrap();
                let mut back = vec![0u8; msg.len()];
                tls.read_exact(&mut back).unwrap();
                assert!(back == msg, "{versions:?}: round {round} came back changed");
                if versions == &rustls::version::TLS13 {
                    tls.conn.refresh_traffic_keys().unwrap();
                }
            }
            tls.conn.send_close_notify();
            let _ = tls.flush();
            drop(tls);
            server.join().unwrap();
        }
    }
}
