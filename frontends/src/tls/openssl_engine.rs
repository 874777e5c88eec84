//! OpenSSL as an [`Engine`]: the session runs on memory buffers (OpenSSL's I/O is a reader
//! and writer over two byte vectors), so the handshake and `stream.rs` drive it like rustls. Used by the
//! credential kinds rustls cannot serve: PSK and anonymous.

use super::engine::Engine;
use super::{Endpoint, TlsError, Versions};
use openssl::ex_data::Index;
use openssl::ssl::{
    ErrorCode, Ssl, SslContext, SslContextBuilder, SslOptions, SslStream, SslVersion,
};
use std::io::{self, Read, Write};
use std::sync::OnceLock;

/// Where the server callback leaves the username the client gave: OpenSSL's own
/// `SSL_get_psk_identity` answers only for TLS 1.2.
pub(crate) fn identity_index() -> Option<Index<Ssl, String>> {
    static INDEX: OnceLock<Option<Index<Ssl, String>>> = OnceLock::new();
    *INDEX.get_or_init(|| Ssl::new_ex_index().ok())
}
/// Marks a server session whose client gave a PSK username we do not know.
pub(crate) fn unknown_identity_index() -> Option<Index<Ssl, bool>> {
    static INDEX: OnceLock<Option<Index<Ssl, bool>>> = OnceLock::new();
    *INDEX.get_or_init(|| Ssl::new_ex_index().ok())
}

pub(crate) fn ssl_err(e: impl std::fmt::Display) -> TlsError {
    TlsError::Creds(format!("OpenSSL: {e}"))
}

pub(crate) fn limit_versions(b: &mut SslContextBuilder, v: Versions) -> Result<(), TlsError> {
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

/// TLS 1.3 suites in the order a server picks them (see `super::aes_is_fast`); TLS 1.3 with
/// an external PSK can only use the SHA-256 ones.
pub(crate) fn prefer_fast_suites(b: &mut SslContextBuilder) -> Result<(), TlsError> {
    let suites = if super::aes_is_fast() {
        "TLS_AES_128_GCM_SHA256:TLS_CHACHA20_POLY1305_SHA256:TLS_AES_256_GCM_SHA384"
    } else {
        "TLS_CHACHA20_POLY1305_SHA256:TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384"
    };
    b.set_ciphersuites(suites).map_err(ssl_err)?;
    b.set_options(SslOptions::CIPHER_SERVER_PREFERENCE);
    Ok(())
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

pub(crate) struct OpensslEngine {
    s: SslStream<MemIo>,
    done: bool,
    client_name: Option<String>,
    /// Plaintext gathered into whole records by `write_plain_vectored`.
    stage: Vec<u8>,
}

/// The most plaintext one TLS record carries.
const RECORD: usize = 16 * 1024;

fn io_err(e: openssl::ssl::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

impl OpensslEngine {
    /// A session on `ctx`; a client's first flight is produced at once. `client_name` marks
    /// a client (whose peer, the server, has no identity to report).
    pub(crate) fn start(
        ctx: &SslContext,
        role: Endpoint,
        client_name: Option<String>,
    ) -> Result<Box<dyn Engine>, TlsError> {
        let mut ssl = Ssl::new(ctx).map_err(ssl_err)?;
        match role {
            Endpoint::Server => ssl.set_accept_state(),
            Endpoint::Client => ssl.set_connect_state(),
        }
        let mut engine = OpensslEngine {
            s: SslStream::new(ssl, MemIo::default()).map_err(ssl_err)?,
            done: false,
            client_name,
            stage: Vec::new(),
        };
        if role == Endpoint::Client {
            // Produce the ClientHello now, so the handshake loop has something to send.
            engine.step()?;
        }
        Ok(Box::new(engine))
    }

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
            Err(e) => Err(TlsError::Handshake(self.handshake_error(&e))),
        }
    }

    fn unknown_identity(&self) -> bool {
        unknown_identity_index().is_some_and(|idx| self.s.ssl().ex_data(idx) == Some(&true))
    }

    /// GnuTLS' words where a qemu peer would see them: a PSK username the server does not
    /// know (GnuTLS: an illegal parameter, and no alert), a fatal alert from the peer
    /// (OpenSSL's reasons from 1000 up are the received alert's number); else OpenSSL's own.
    fn handshake_error(&self, e: &openssl::ssl::Error) -> String {
        if self.unknown_identity() {
            return "TLS handshake failed: An illegal parameter has been received.".into();
        }
        let alert = e
            .ssl_error()
            .is_some_and(|st| st.errors().iter().any(|x| x.reason_code() >= 1000));
        if alert {
            return super::engine::ALERT_RECEIVED.into();
        }
        format!("TLS handshake failed: {e}")
    }
}

impl Engine for OpensslEngine {
    fn handshaking(&self) -> bool {
        !self.done
    }

    fn feed_some(&mut self, ciphertext: &[u8]) -> io::Result<usize> {
        self.s.get_mut().input.extend_from_slice(ciphertext);
        if !self.done {
            self.step()
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
        }
        Ok(ciphertext.len())
    }

    fn read_plain(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        if !self.done || buf.is_empty() {
            return Ok(None);
        }
        match self.s.ssl_read(buf) {
            Ok(n) => Ok(Some(n)),
            Err(e) if e.code() == ErrorCode::WANT_READ => Ok(None),
            Err(e) if e.code() == ErrorCode::ZERO_RETURN => Ok(Some(0)),
            Err(e) => Err(io_err(e)),
        }
    }

    fn write_plain(&mut self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            let n = self.s.ssl_write(data).map_err(io_err)?;
            data = &data[n..];
        }
        Ok(())
    }

    fn write_plain_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<()> {
        // OpenSSL writes a record per call: gather the pieces into whole records first.
        let mut stage = std::mem::take(&mut self.stage);
        stage.clear();
        let mut r = Ok(());
        for b in bufs {
            let mut b: &[u8] = b;
            while !b.is_empty() && r.is_ok() {
                let take = b.len().min(RECORD - stage.len());
                if stage.is_empty() && take == RECORD {
                    // A whole record straight from the caller's buffer.
                    r = self.write_plain(&b[..RECORD]);
                } else {
                    stage.extend_from_slice(&b[..take]);
                    if stage.len() == RECORD {
                        r = self.write_plain(&stage);
                        stage.clear();
                    }
                }
                b = &b[take..];
            }
        }
        if r.is_ok() && !stage.is_empty() {
            r = self.write_plain(&stage);
        }
        self.stage = stage;
        r
    }

    fn take_tls(&mut self, out: &mut Vec<u8>) {
        out.append(&mut self.s.get_mut().output);
    }

    fn wants_write(&self) -> bool {
        !self.s.get_ref().output.is_empty()
    }

    fn close(&mut self) {
        let _ = self.s.shutdown();
    }

    fn quiet_refusal(&self) -> bool {
        self.unknown_identity()
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
