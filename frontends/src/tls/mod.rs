//! TLS for NBD (qemu's `tls-creds-x509`, `tls-creds-psk`, `tls-creds-anon`), shared by the
//! server and the client: x509 on rustls, PSK and anonymous on OpenSSL (rustls has neither), both behind one engine trait
//! and one stream type that the NBD code reads and writes in plaintext.

pub mod anon;
pub mod authz;
pub mod engine;
mod ktls;
mod openssl_engine;
pub mod psk;
mod records;
mod rustls_server;
mod sanity;
pub mod stream;
pub mod x509;
mod x509_client;

use crate::transport::Stream;
use authz::Authz;
use engine::Engine;
use std::sync::Arc;
use std::time::Instant;

/// True when this CPU has AES and carry-less multiply instructions, so AES-128-GCM is the
/// cheapest suite for both ends; without them ChaCha20-Poly1305 is. The server picks the
/// suite by its own order (not the client's, whose GnuTLS default puts AES-256-GCM first and,
/// for TLS 1.3 PSK, ChaCha20), because on a machine the client and server share, the
/// client's cipher cost is the server's throughput too: AES-128 runs 10 rounds to AES-256's
/// 14, and GnuTLS' ChaCha20 ran at a third of its AES-GCM here. Every suite offered is in
/// GnuTLS' NORMAL priority, which is what qemu-nbd uses.
pub(crate) fn aes_is_fast() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("aes")
            && std::arch::is_x86_feature_detected!("pclmulqdq")
    }
    #[cfg(target_arch = "aarch64")]
    {
        std::arch::is_aarch64_feature_detected!("aes")
            && std::arch::is_aarch64_feature_detected!("pmull")
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        false
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Server,
    Client,
}

impl Endpoint {
    pub fn parse(s: &str) -> Option<Endpoint> {
        match s {
            "server" => Some(Endpoint::Server),
            "client" => Some(Endpoint::Client),
            _ => None,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Endpoint::Server => "server",
            Endpoint::Client => "client",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{0}")]
    Creds(String),
    #[error("Expected TLS credentials for a {} endpoint", .0.name())]
    WrongEndpoint(Endpoint),
    #[error("{0}")]
    Handshake(String),
    #[error("{0}")]
    Denied(String),
}

/// Which TLS versions a GnuTLS priority string (`priority=`) leaves enabled. Only the
/// version keywords are honoured: cipher choices stay with each library's secure defaults,
/// which is what GnuTLS' NORMAL gives too.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Versions {
    pub tls12: bool,
    pub tls13: bool,
}

impl Default for Versions {
    fn default() -> Self {
        Versions {
            tls12: true,
            tls13: true,
        }
    }
}

impl Versions {
    pub fn from_priority(p: Option<&str>) -> Result<Versions, TlsError> {
        let mut v = Versions::default();
        let Some(p) = p else { return Ok(v) };
        for tok in p.split(':') {
            match tok {
                "-VERS-ALL" | "-VERS-TLS-ALL" => {
                    v.tls12 = false;
                    v.tls13 = false;
                }
                "+VERS-ALL" | "+VERS-TLS-ALL" => v = Versions::default(),
                "-VERS-TLS1.2" => v.tls12 = false,
                "-VERS-TLS1.3" => v.tls13 = false,
                "+VERS-TLS1.2" => v.tls12 = true,
                "+VERS-TLS1.3" => v.tls13 = true,
                _ => {}
            }
        }
        if !v.tls12 && !v.tls13 {
            return Err(TlsError::Creds(format!(
                "TLS priority '{p}' enables no TLS version this build supports (1.2, 1.3)"
            )));
        }
        Ok(v)
    }

    fn rustls(self) -> &'static [&'static rustls::SupportedProtocolVersion] {
        static BOTH: &[&rustls::SupportedProtocolVersion] =
            &[&rustls::version::TLS13, &rustls::version::TLS12];
        static V12: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS12];
        static V13: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];
        match (self.tls12, self.tls13) {
            (true, false) => V12,
            (false, true) => V13,
            _ => BOTH,
        }
    }
}

/// Loaded credentials of either kind.
#[derive(Clone)]
pub enum Creds {
    X509(x509::X509Creds),
    Psk(psk::PskCreds),
    Anon(anon::AnonCreds),
}

impl Creds {
    pub fn endpoint(&self) -> Endpoint {
        match self {
            Creds::X509(x509::X509Creds::Server { .. }) => Endpoint::Server,
            Creds::X509(x509::X509Creds::Client { .. }) => Endpoint::Client,
            Creds::Psk(p) => p.endpoint(),
            Creds::Anon(a) => a.endpoint(),
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Creds::X509(_) => "x509",
            Creds::Psk(_) => "PSK",
            Creds::Anon(_) => "anonymous",
        }
    }
}

/// The server's TLS policy: `--tls-creds` and `--tls-authz`.
#[derive(Clone)]
pub struct ServerTls {
    pub creds: Creds,
    /// `--tls-authz=ID`, and the object if one has that id (qemu looks it up per client).
    pub authz: Option<(String, Option<Arc<dyn Authz>>)>,
}

/// GnuTLS' (qemu's) words for a client without a certificate under `verify-peer=on`.
pub const NO_CLIENT_CERTIFICATE: &str = "Verify failed: No certificate was found.";

/// Run the server side of the TLS handshake on `stream` (after STARTTLS was acknowledged),
/// check the peer against `verify-peer` and `--tls-authz`, and turn `stream` into the
/// session's plaintext.
///
/// How a refused client is let go: as qemu-nbd's GnuTLS does. qemu completes the handshake
/// and checks the client afterwards (no certificate under `verify-peer=on`, a DN or PSK user
/// `--tls-authz` denies), then closes the socket without a TLS alert, so its GnuTLS clients
/// (qemu-img, qemu-io, nbdinfo) report "The TLS connection was non-properly terminated".
/// rustls demanding the certificate itself would end the handshake with a fatal alert
/// instead ("A TLS fatal alert has been received"); so the x509 server only requests one
/// (`allow_unauthenticated`) and this function refuses its absence. This weakens nothing:
/// a certificate that is presented is still verified during the handshake, and the client
/// must still prove it holds the key; every refusal here happens before the session carries
/// one byte of NBD, and the session is dropped unused. Only the alert is missing, which TLS
/// leaves to the implementation (RFC 8446 6.2: SHOULD), and which tells the client no more
/// than the closed connection does. One case still ends with an alert: a client presenting
/// a certificate the CA did not sign (GnuTLS clients send none then, since the server names
/// its CA; qemu-nbd would finish the handshake and close). Deferring that check past the
/// handshake would mean accepting any chain for a while, which is not worth a message.
pub fn accept(
    stream: &mut Stream,
    tls: &ServerTls,
    deadline: Option<Instant>,
) -> Result<(), TlsError> {
    let mut engine: Box<dyn Engine> = match &tls.creds {
        Creds::X509(c) => Box::new(c.server_handshake()?),
        Creds::Psk(p) => p.engine(Endpoint::Server)?,
        Creds::Anon(a) => a.engine(Endpoint::Server)?,
    };
    let early = engine::handshake(engine.as_mut(), stream, deadline)
        .map_err(|e| TlsError::Handshake(e.to_string()))?;
    let identity = engine.peer_identity();
    if let Creds::X509(c) = &tls.creds {
        if c.verifies_peer() && !engine.peer_certified() {
            return Err(TlsError::Handshake(NO_CLIENT_CERTIFICATE.into()));
        }
    }
    if let Some((id, authz)) = &tls.authz {
        let Some(authz) = authz else {
            return Err(TlsError::Denied(format!(
                "Cannot find QAuthZ object ID {id}"
            )));
        };
        let kind = tls.creds.kind();
        let Some(who) = identity.as_deref() else {
            return Err(TlsError::Denied(format!(
                "TLS {kind} authz check failed: the client did not authenticate"
            )));
        };
        match authz.is_allowed(who) {
            Ok(true) => {}
            Ok(false) => {
                return Err(TlsError::Denied(format!(
                    "TLS {kind} authz check for {who} is denied"
                )))
            }
            Err(e) => return Err(TlsError::Denied(e)),
        }
    }
    if let Some(who) = &identity {
        tracing::info!("TLS client authenticated as {who}");
    }
    let net = stream
        .try_clone()
        .map_err(|e| TlsError::Handshake(e.to_string()))?;
    let session = if engine.hands_over() {
        let est = engine
            .into_server_handshake()
            .ok_or_else(|| TlsError::Handshake("no record layer for this session".into()))?
            .establish()
            .map_err(|e| TlsError::Handshake(e.to_string()))?;
        let mut plain = early;
        plain.extend_from_slice(&est.plain);
        match (est.kernel_keys, &*stream) {
            (Some(keys), Stream::Tcp(sock)) if kernel_tls_wanted() => {
                let offloaded = keys
                    .offload(sock, est.records, est.cipher, &mut plain)
                    .map_err(|e| TlsError::Handshake(e.to_string()))?;
                match offloaded {
                    Ok(kernel) => stream::Session::kernel(kernel, plain),
                    Err((records, cipher)) => stream::Session::records(records, cipher, plain),
                }
            }
            _ => stream::Session::records(est.records, est.cipher, plain),
        }
    } else {
        stream::Session::engine(engine, early)
    };
    *stream = stream::into_stream(session, net, identity)
        .map_err(|e| TlsError::Handshake(e.to_string()))?;
    Ok(())
}

/// Kernel TLS is tried only with `QNBD_KTLS=on`: in the one place it could be measured (a
/// TCG guest, `scripts/bench-ktls.sh`) it cost 26-47 % more CPU per MiB or request than our
/// record layer and was slower on four workloads of five; on real hardware it is unmeasured.
fn kernel_tls_wanted() -> bool {
    static WANTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *WANTED.get_or_init(|| std::env::var("QNBD_KTLS").is_ok_and(|v| v == "on"))
}

/// How a TLS client reaches its server: all that qemu's rule for the certificate name needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport<'a> {
    /// A Unix socket: it has no host name.
    Unix,
    /// TCP to `host`, as the user gave it (`-b`, a block device's `host=`): a name or an address.
    Tcp { host: &'a str },
}

/// qemu's words when an x509 client has no name to check the server's certificate against.
pub const NO_HOSTNAME: &str = "No hostname for certificate validation";

/// The name the server's x509 certificate must carry, decided as every qemu TLS client
/// decides it: `--tls-hostname` (a block device's `tls-hostname=`) when given, else the TCP
/// host it connects to; over a Unix socket without `--tls-hostname`, none. Every TLS client
/// (`-L` today, the nbd client of `--image-opts driver=nbd` and the handshake before `-c`
/// against a remote server tomorrow) goes through [`connect`], which applies this rule and
/// [`check_server_name`]'s refusal, so none of them can connect without a name to check.
pub fn server_name<'a>(transport: Transport<'a>, tls_hostname: Option<&'a str>) -> Option<&'a str> {
    match (tls_hostname, transport) {
        (Some(name), _) => Some(name),
        (None, Transport::Tcp { host }) => Some(host),
        (None, Transport::Unix) => None,
    }
}

/// qemu 10 (crypto/tlssession.c) refuses an x509 server whose certificate it verifies when
/// it has no name to check it against, after the chain passed ("The certificate hasn't got a
/// known issuer" comes first) and after the handshake completed, with [`NO_HOSTNAME`]. It
/// checks no name with `verify-peer=off`, nor for PSK and anonymous credentials (which have
/// no certificate), so those connect over a Unix socket without `--tls-hostname`.
fn check_server_name(creds: &Creds, name: Option<&str>) -> Result<(), TlsError> {
    match creds {
        Creds::X509(c) if c.verifies_peer() && name.is_none() => {
            Err(TlsError::Handshake(NO_HOSTNAME.into()))
        }
        _ => Ok(()),
    }
}

/// Run the client side of the handshake towards a server reached over `transport`, checking
/// an x509 server certificate against the name [`server_name`] gives.
pub fn connect(
    stream: &mut Stream,
    creds: &Creds,
    transport: Transport<'_>,
    tls_hostname: Option<&str>,
) -> Result<(), TlsError> {
    let name = server_name(transport, tls_hostname);
    let mut engine = match creds {
        Creds::X509(c) => c.client_engine(name)?,
        Creds::Psk(p) => p.engine(Endpoint::Client)?,
        Creds::Anon(a) => a.engine(Endpoint::Client)?,
    };
    let early = engine::handshake(engine.as_mut(), stream, None)
        .map_err(|e| TlsError::Handshake(e.to_string()))?;
    // As qemu: the certificate's chain and name, then a missing name, refuse the server
    // now, before one byte of NBD travels in the session. The session is dropped without
    // close_notify, as qemu's client drops it.
    engine
        .server_verdict()
        .map_err(|e| TlsError::Handshake(e.to_string()))?;
    check_server_name(creds, name)?;
    let net = stream
        .try_clone()
        .map_err(|e| TlsError::Handshake(e.to_string()))?;
    *stream = stream::into_stream(stream::Session::engine(engine, early), net, None)
        .map_err(|e| TlsError::Handshake(e.to_string()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_name_follows_qemu() {
        let tcp = Transport::Tcp { host: "10.0.0.1" };
        assert_eq!(server_name(tcp, None), Some("10.0.0.1"));
        assert_eq!(server_name(tcp, Some("nbd.example")), Some("nbd.example"));
        assert_eq!(server_name(Transport::Unix, None), None);
        assert_eq!(
            server_name(Transport::Unix, Some("nbd.example")),
            Some("nbd.example")
        );
    }
}
