//! The x509 server's handshake on rustls' unbuffered API, which hands the established
//! session to our own record layer (`records.rs`) with its key schedule. The buffered API
//! cannot: it keeps the keys to itself.
//!
//! The unbuffered API reads from our buffer and says how much it used, so nothing the
//! client sent after its last handshake record is lost: those bytes (already the first
//! NBD option, when the client does not wait) go to the record layer unopened, and any
//! record rustls opened itself before it reported the end of the handshake is delivered as
//! plaintext first.

use super::engine::Engine;
use super::ktls::KernelKeys;
use super::records::Records;
use super::x509::{distinguished_name, rustls_error};
use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{ConnectionState, EncodeError, UnbufferedStatus};
use std::io::{self, IoSlice};

pub struct ServerHandshake {
    conn: Option<UnbufferedServerConnection>,
    /// Ciphertext from the client not yet used by rustls.
    incoming: Vec<u8>,
    /// Records for the client, sent by the handshake driver.
    outgoing: Vec<u8>,
    /// Application data rustls opened during the handshake.
    plain: Vec<u8>,
    done: bool,
    peer_closed: bool,
}

/// The established session: the record layer, ciphertext not yet opened, plaintext already
/// opened.
pub struct Established {
    pub records: Records,
    /// The first keys in the kernel's form, when kernel TLS could take the session.
    pub kernel_keys: Option<KernelKeys>,
    pub cipher: Vec<u8>,
    pub plain: Vec<u8>,
}

impl ServerHandshake {
    pub fn new(conn: UnbufferedServerConnection) -> ServerHandshake {
        ServerHandshake {
            conn: Some(conn),
            incoming: Vec::new(),
            outgoing: Vec::new(),
            plain: Vec::new(),
            done: false,
            peer_closed: false,
        }
    }

    /// Run rustls over what arrived until it needs more input or the handshake is over.
    fn process(&mut self) -> io::Result<()> {
        let Self {
            conn,
            incoming,
            outgoing,
            plain,
            done,
            peer_closed,
        } = self;
        let conn = conn.as_mut().ok_or_else(super::engine::stalled)?;
        loop {
            let UnbufferedStatus { mut discard, state } = conn.process_tls_records(incoming);
            let state = match state {
                Ok(s) => s,
                Err(e) => {
                    // rustls queued the alert that tells the client why: send it too.
                    send_alert(conn, outgoing);
                    return Err(rustls_error(e, None));
                }
            };
            let mut more = true;
            match state {
                ConnectionState::EncodeTlsData(mut s) => encode(&mut s, outgoing)?,
                // The driver sends `outgoing` before it reads again.
                ConnectionState::TransmitTlsData(t) => t.done(),
                ConnectionState::BlockedHandshake => more = false,
                ConnectionState::WriteTraffic(_) => {
                    *done = true;
                    more = false;
                }
                ConnectionState::ReadTraffic(mut r) => {
                    while let Some(rec) = r.next_record() {
                        let rec = rec.map_err(|e| rustls_error(e, None))?;
                        discard += rec.discard;
                        plain.extend_from_slice(rec.payload);
                    }
                }
                ConnectionState::PeerClosed | ConnectionState::Closed => {
                    *peer_closed = true;
                    more = false;
                }
                _ => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "an unexpected TLS handshake state",
                    ))
                }
            }
            incoming.drain(..discard);
            if !more {
                return Ok(());
            }
        }
    }

    /// Hand the established session to the record layer.
    pub fn establish(mut self) -> io::Result<Established> {
        let conn = self.conn.take().ok_or_else(super::engine::stalled)?;
        let (secrets, kernel) = conn
            .dangerous_into_kernel_connection()
            .map_err(|e| rustls_error(e, None))?;
        let kernel_keys = KernelKeys::new(kernel.protocol_version(), &secrets.rx, &secrets.tx);
        Ok(Established {
            records: Records::new(kernel, secrets.rx, secrets.tx)?,
            kernel_keys,
            cipher: std::mem::take(&mut self.incoming),
            plain: std::mem::take(&mut self.plain),
        })
    }
}

/// Append the handshake record `s` holds to `outgoing`.
fn encode(
    s: &mut rustls::unbuffered::EncodeTlsData<'_, rustls::server::ServerConnectionData>,
    outgoing: &mut Vec<u8>,
) -> io::Result<()> {
    let start = outgoing.len();
    outgoing.resize(start + 4096, 0);
    let r = match s.encode(&mut outgoing[start..]) {
        Err(EncodeError::InsufficientSize(e)) => {
            outgoing.resize(start + e.required_size, 0);
            s.encode(&mut outgoing[start..])
        }
        r => r,
    };
    match r {
        Ok(n) => {
            outgoing.truncate(start + n);
            Ok(())
        }
        Err(e) => {
            outgoing.truncate(start);
            Err(io::Error::new(io::ErrorKind::InvalidData, e.to_string()))
        }
    }
}

/// After a failed handshake step: move the alert rustls queued into `outgoing`.
fn send_alert(conn: &mut UnbufferedServerConnection, outgoing: &mut Vec<u8>) {
    for _ in 0..4 {
        match conn.process_tls_records(&mut []).state {
            Ok(ConnectionState::EncodeTlsData(mut s)) => {
                if encode(&mut s, outgoing).is_err() {
                    return;
                }
            }
            Ok(ConnectionState::TransmitTlsData(t)) => t.done(),
            _ => return,
        }
    }
}

impl Engine for ServerHandshake {
    fn handshaking(&self) -> bool {
        !self.done && !self.peer_closed
    }

    fn feed_some(&mut self, ciphertext: &[u8]) -> io::Result<usize> {
        self.incoming.extend_from_slice(ciphertext);
        self.process()?;
        Ok(ciphertext.len())
    }

    fn read_plain(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        if !self.plain.is_empty() {
            let n = buf.len().min(self.plain.len());
            buf[..n].copy_from_slice(&self.plain[..n]);
            self.plain.drain(..n);
            return Ok(Some(n));
        }
        Ok(self.peer_closed.then_some(0))
    }

    fn write_plain(&mut self, _data: &[u8]) -> io::Result<()> {
        Err(io::ErrorKind::Unsupported.into())
    }

    fn write_plain_vectored(&mut self, _bufs: &[IoSlice<'_>]) -> io::Result<()> {
        Err(io::ErrorKind::Unsupported.into())
    }

    fn take_tls(&mut self, out: &mut Vec<u8>) {
        out.append(&mut self.outgoing);
    }

    fn wants_write(&self) -> bool {
        !self.outgoing.is_empty()
    }

    fn close(&mut self) {}

    fn peer_certified(&self) -> bool {
        self.done
            && self
                .conn
                .as_ref()
                .and_then(|c| c.peer_certificates())
                .is_some_and(|c| !c.is_empty())
    }

    fn peer_identity(&self) -> Option<String> {
        let cert = self.conn.as_ref()?.peer_certificates()?.first()?;
        distinguished_name(cert.as_ref())
    }

    fn hands_over(&self) -> bool {
        true
    }

    fn into_server_handshake(self: Box<Self>) -> Option<ServerHandshake> {
        Some(*self)
    }
}
