//! Kernel TLS for x509 servers: once rustls has run the handshake, the record layer is
//! handed to the kernel (`setsockopt(TCP_ULP, "tls")`, then the keys with `TLS_TX` and
//! `TLS_RX`), so the connection's threads read and write plaintext on the socket itself and
//! the kernel seals and opens the records (no userspace copy of the ciphertext, and AES in
//! the kernel's own implementation).
//!
//! Only with `QNBD_KTLS=on` (see `kernel_tls_wanted` for why it is not the default). When
//! it is used (`KernelKeys::offload`), and what happens otherwise:
//! - a TCP socket, a kernel with the `tls` module, and AES-GCM (128, 256) or
//!   ChaCha20-Poly1305. Any refusal of the first `setsockopt` leaves the socket as it was,
//!   and the session stays on our own record layer (`records.rs`): nothing is lost.
//! - TLS 1.3 only on kernels that take a new key on an established socket (6.14 and later):
//!   both sides must renew their keys (the peer's KeyUpdate, and our own before
//!   [`KEY_RECORDS`] records); older kernels keep TLS 1.3 on our record layer. TLS 1.2 has
//!   no key update and goes to the kernel wherever it can.
//! - the socket must be at a record boundary: records the client sent right behind its
//!   last handshake message (its first NBD option) were already read; they are opened here
//!   and the rest of a cut record is read exactly, so the kernel starts at the next record.
//!
//! The kernel hands every record that is not application data to userspace on its own,
//! marked with a control message (`TLS_GET_RECORD_TYPE`): reads always ask for it, so an
//! alert or a KeyUpdate never reaches the NBD code as data. A KeyUpdate's new receive key is
//! installed before the next read (the kernel refuses reads until then). Our own records
//! that are not data (KeyUpdate, close_notify) are sent with `TLS_SET_RECORD_TYPE`.

use super::records::{Opened, Records};
use rustls::kernel::KernelConnection;
use rustls::server::ServerConnectionData;
use rustls::{ConnectionTrafficSecrets, ProtocolVersion};
use std::io::{self, Read};
use std::net::TcpStream;
use std::os::fd::{AsRawFd, RawFd};

/// linux/tcp.h and linux/tls.h, which the libc crate does not carry for every target.
const TCP_ULP: libc::c_int = 31;
const SOL_TLS: libc::c_int = 282;
const TLS_TX: libc::c_int = 1;
const TLS_RX: libc::c_int = 2;
const TLS_RX_EXPECT_NO_PAD: libc::c_int = 4;
const TLS_SET_RECORD_TYPE: libc::c_int = 1;
const TLS_GET_RECORD_TYPE: libc::c_int = 2;
const TLS_1_2_VERSION: u16 = 0x0303;
const TLS_1_3_VERSION: u16 = 0x0304;
const TLS_CIPHER_AES_GCM_128: u16 = 51;
const TLS_CIPHER_AES_GCM_256: u16 = 52;
const TLS_CIPHER_CHACHA20_POLY1305: u16 = 54;

pub const ALERT: u8 = 21;
pub const HANDSHAKE: u8 = 22;
pub const APPLICATION_DATA: u8 = 23;
const KEY_UPDATE: u8 = 24;
const UNEXPECTED_MESSAGE: u8 = 10;
const DECODE_ERROR: u8 = 50;

/// Records sent under one TLS 1.3 key before it is renewed, as on our record layer.
const KEY_RECORDS: u64 = 1 << 22;
/// The largest plaintext in a record: a write of n bytes makes at most n / 2^14 + 1 records.
const MAX_PLAIN: u64 = 1 << 14;

/// One direction's key as the kernel takes it (`struct tls12_crypto_info_*`): version and
/// cipher, then IV, key, salt and record sequence number, packed.
pub struct CryptoInfo(Vec<u8>);

impl CryptoInfo {
    fn new(version: u16, seq: u64, secrets: &ConnectionTrafficSecrets) -> Option<CryptoInfo> {
        // AES-GCM: the first 4 bytes of rustls' 12-byte IV are the kernel's salt, the other
        // 8 its IV; ChaCha20-Poly1305 takes all 12 as IV and has no salt.
        let (cipher, key, salt, iv): (u16, &[u8], &[u8], &[u8]) = match secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => {
                let iv = iv.as_ref();
                (TLS_CIPHER_AES_GCM_128, key.as_ref(), &iv[..4], &iv[4..])
            }
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => {
                let iv = iv.as_ref();
                (TLS_CIPHER_AES_GCM_256, key.as_ref(), &iv[..4], &iv[4..])
            }
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => (
                TLS_CIPHER_CHACHA20_POLY1305,
                key.as_ref(),
                &[][..],
                iv.as_ref(),
            ),
            _ => return None,
        };
        let mut b = Vec::with_capacity(64);
        b.extend_from_slice(&version.to_ne_bytes());
        b.extend_from_slice(&cipher.to_ne_bytes());
        b.extend_from_slice(iv);
        b.extend_from_slice(key);
        b.extend_from_slice(salt);
        b.extend_from_slice(&seq.to_be_bytes());
        Some(CryptoInfo(b))
    }

    fn install(&self, fd: RawFd, dir: libc::c_int) -> io::Result<()> {
        setsockopt(fd, SOL_TLS, dir, &self.0)
    }
}

impl Drop for CryptoInfo {
    fn drop(&mut self) {
        // Key material does not linger in freed memory.
        self.0.iter_mut().for_each(|b| *b = 0);
    }
}

fn setsockopt(fd: RawFd, level: libc::c_int, name: libc::c_int, val: &[u8]) -> io::Result<()> {
    // SAFETY: `val` is a live buffer of the length passed; the kernel only reads it.
    let r = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            val.as_ptr().cast(),
            val.len() as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The keys of an established session, taken before our record layer got them, in case the
/// kernel takes the session.
pub struct KernelKeys {
    version: u16,
    rx: CryptoInfo,
    tx: CryptoInfo,
}

impl KernelKeys {
    /// The kernel's form of the session's first keys, when it has one.
    pub fn new(
        version: ProtocolVersion,
        rx: &(u64, ConnectionTrafficSecrets),
        tx: &(u64, ConnectionTrafficSecrets),
    ) -> Option<KernelKeys> {
        let version = match version {
            ProtocolVersion::TLSv1_2 => TLS_1_2_VERSION,
            ProtocolVersion::TLSv1_3 if kernel_renews_keys() => TLS_1_3_VERSION,
            _ => return None,
        };
        Some(KernelKeys {
            version,
            rx: CryptoInfo::new(version, rx.0, &rx.1)?,
            tx: CryptoInfo::new(version, tx.0, &tx.1)?,
        })
    }

    /// Hand the session on `sock` to the kernel. `records` has the keys these were taken from
    /// and `cipher` what was read of the socket past the handshake; both are used to bring
    /// the socket to a record boundary (reading at most one record's rest, with the socket's
    /// timeout). Returns the session in the kernel and the plaintext read on the way, or
    /// gives `records` and `cipher` back (with `plain` added to) when the kernel cannot
    /// take it. Fails only when the socket's state is unknown: the connection must end.
    pub fn offload(
        self,
        sock: &TcpStream,
        mut records: Records,
        mut cipher: Vec<u8>,
        plain: &mut Vec<u8>,
    ) -> io::Result<Result<KernelTls, (Records, Vec<u8>)>> {
        let fd = sock.as_raw_fd();
        if setsockopt(fd, libc::SOL_TCP, TCP_ULP, b"tls\0").is_err() {
            // No tls module (ENOENT), not TCP, or already set: the socket is unchanged.
            return Ok(Err((records, cipher)));
        }
        // Until a key is installed the socket passes bytes through unchanged, so from here
        // on a refusal still leaves our record layer in charge.
        if !open_to_boundary(sock, &mut records, &mut cipher, plain)? || !self.fits(&records) {
            return Ok(Err((records, cipher)));
        }
        let tx = CryptoInfo::new_seq(&self.tx, records.tx_seq());
        if let Err(e) = tx.install(fd, TLS_TX) {
            tracing::debug!("kernel TLS refused the send key: {e}");
            return Ok(Err((records, cipher)));
        }
        let rx = CryptoInfo::new_seq(&self.rx, records.rx_seq());
        rx.install(fd, TLS_RX).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("kernel TLS took the send key but refused the receive key: {e}"),
            )
        })?;
        if self.version == TLS_1_3_VERSION {
            // TLS 1.3 records may carry padding, so the kernel opens them into a buffer of
            // its own and copies; clients do not pad, and this lets it open them straight
            // into ours (a padded record is opened again the slow way: only speed depends
            // on it). Kernels before 6.0 refuse it, and lose nothing.
            let _ = setsockopt(fd, SOL_TLS, TLS_RX_EXPECT_NO_PAD, &1u32.to_ne_bytes());
        }
        let conn = records
            .into_kernel_connection()
            .ok_or_else(|| io::Error::other("no key schedule for kernel TLS"))?;
        tracing::debug!("TLS records are sealed and opened by the kernel");
        Ok(Ok(KernelTls {
            conn,
            tls13: self.version == TLS_1_3_VERSION,
            sent_bound: 0,
            control: Pending::default(),
            key_records: key_records(),
        }))
    }

    /// The session is still on its first keys and has nothing of its own to send.
    fn fits(&self, records: &Records) -> bool {
        !records.rekeyed() && !records.wants_write()
    }
}

impl CryptoInfo {
    /// `base` with its record sequence number replaced.
    fn new_seq(base: &CryptoInfo, seq: u64) -> CryptoInfo {
        let mut b = base.0.clone();
        let n = b.len();
        b[n - 8..].copy_from_slice(&seq.to_be_bytes());
        CryptoInfo(b)
    }
}

/// Open the whole records in `cipher` into `plain`, then read the rest of a cut record and
/// open it too. False when a record was not application data (the session is left as the
/// record layer made it, which may have changed keys).
fn open_to_boundary(
    sock: &TcpStream,
    records: &mut Records,
    cipher: &mut Vec<u8>,
    plain: &mut Vec<u8>,
) -> io::Result<bool> {
    loop {
        match records.open(cipher)? {
            Opened::Data { used, range } => {
                plain.extend_from_slice(&cipher[range]);
                cipher.drain(..used);
            }
            Opened::Nothing { used } => {
                cipher.drain(..used);
                return Ok(false);
            }
            Opened::Closed => {
                // Nothing after close_notify counts; the socket's end follows.
                cipher.clear();
                return Ok(false);
            }
            Opened::Incomplete if cipher.is_empty() => return Ok(true),
            Opened::Incomplete => {
                let want = match cipher.len() {
                    n if n < super::records::HEADER => super::records::HEADER - n,
                    _ => {
                        let body = usize::from(u16::from_be_bytes([cipher[3], cipher[4]]));
                        super::records::HEADER + body - cipher.len()
                    }
                };
                let at = cipher.len();
                cipher.resize(at + want, 0);
                (&mut &*sock).read_exact(&mut cipher[at..])?;
            }
        }
    }
}

/// Whether the kernel takes a new key on a socket that has one (Linux 6.14's TLS 1.3
/// rekey). Decided by the version, since trying it would leave an older kernel holding a
/// key it cannot renew; a kernel with the feature backported just keeps our record layer.
fn kernel_renews_keys() -> bool {
    static RENEWS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *RENEWS.get_or_init(|| {
        nix::sys::utsname::uname()
            .ok()
            .and_then(|u| parse_release(&u.release().to_string_lossy()))
            .is_some_and(|v| v >= (6, 14))
    })
}

fn parse_release(release: &str) -> Option<(u32, u32)> {
    let mut it = release.split(['.', '-', '+']);
    let major = it.next()?.parse().ok()?;
    let minor = it.next()?.parse().ok()?;
    Some((major, minor))
}

/// [`KEY_RECORDS`], or a smaller count from `QNBD_TEST_TLS_KEY_RECORDS` so tests reach a
/// key renewal.
fn key_records() -> u64 {
    std::env::var("QNBD_TEST_TLS_KEY_RECORDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(KEY_RECORDS)
}

/// A session whose records the kernel seals and opens; what is left for us is its key
/// schedule and the records that are not application data.
pub struct KernelTls {
    conn: KernelConnection<ServerConnectionData>,
    tls13: bool,
    /// At least the number of records sent under the current send key.
    sent_bound: u64,
    /// A control record's type and bytes received so far (a message may come in pieces).
    control: Pending,
    key_records: u64,
}

/// What a received control record meant.
pub enum Control {
    /// Nothing for the reader (a key was renewed); read on.
    Handled,
    /// close_notify: the stream ends.
    Closed,
    /// The peer asked us to renew our send key: [`send_key_update`] and
    /// [`KernelTls::next_send_key`], with the send side held.
    RenewSendKey,
}

impl KernelTls {
    /// Before sending `len` bytes of data: true when the send key must be renewed first
    /// ([`send_key_update`], then [`KernelTls::next_send_key`]), because the records sent
    /// under it may reach the limit. The renewal comes before the write that could cross
    /// it, so one write's own records (a reply of 32 MiB makes 2049) may go past the limit:
    /// a margin far below the one between [`KEY_RECORDS`] and AES-GCM's 2^24.5.
    pub fn before_send(&mut self, fd: RawFd, len: usize) -> bool {
        let records = len as u64 / MAX_PLAIN + 1;
        self.sent_bound += records;
        if !self.tls13 || self.sent_bound < self.key_records {
            return false;
        }
        // The bound counts a record per call however small; the kernel knows the truth.
        match sent_records(fd) {
            Some(n) if n + records < self.key_records => {
                self.sent_bound = n + records;
                false
            }
            _ => true,
        }
    }

    /// Give the kernel the next send key, after [`send_key_update`] went out under the old.
    pub fn next_send_key(&mut self, fd: RawFd) -> io::Result<()> {
        let (seq, secrets) = self
            .conn
            .update_tx_secret()
            .map_err(|e| io::Error::other(format!("TLS key update: {e}")))?;
        let info = CryptoInfo::new(TLS_1_3_VERSION, seq, &secrets)
            .ok_or_else(|| io::Error::other("TLS key update: a cipher the kernel lacks"))?;
        info.install(fd, TLS_TX)
            .map_err(|e| io::Error::new(e.kind(), format!("kernel TLS send key update: {e}")))?;
        self.sent_bound = 0;
        Ok(())
    }

    /// A piece of a record that is not application data, as the kernel handed it over.
    pub fn control(&mut self, fd: RawFd, typ: u8, data: &[u8]) -> io::Result<Control> {
        let messages = match take_messages(&mut self.control, typ, data, self.tls13) {
            Ok(m) => m,
            Err(Refusal::Alert(desc, msg)) => return Err(self.refuse(fd, desc, msg)),
            Err(Refusal::PeerAlert(d)) => {
                return Err(invalid(format!("the peer sent TLS alert {d}")))
            }
        };
        let mut answer = Control::Handled;
        for m in messages {
            match m {
                Message::CloseNotify => return Ok(Control::Closed),
                Message::KeyUpdate { requested } => {
                    self.next_receive_key(fd)?;
                    if requested {
                        answer = Control::RenewSendKey;
                    }
                }
            }
        }
        Ok(answer)
    }

    /// Give the kernel the peer's next key, after its KeyUpdate.
    fn next_receive_key(&mut self, fd: RawFd) -> io::Result<()> {
        let (seq, secrets) = self
            .conn
            .update_rx_secret()
            .map_err(|e| invalid(format!("TLS key update: {e}")))?;
        let info = CryptoInfo::new(TLS_1_3_VERSION, seq, &secrets)
            .ok_or_else(|| invalid("TLS key update: a cipher the kernel lacks".into()))?;
        info.install(fd, TLS_RX)
            .map_err(|e| io::Error::new(e.kind(), format!("kernel TLS receive key update: {e}")))
    }

    /// Tell the peer why the session ends (best effort), and make the error.
    fn refuse(&mut self, fd: RawFd, desc: u8, msg: &str) -> io::Error {
        let _ = send_record(fd, ALERT, &[2, desc], libc::MSG_DONTWAIT);
        invalid(msg.into())
    }

    /// close_notify, without waiting on a peer that does not read.
    pub fn close_notify(fd: RawFd) {
        let _ = send_record(fd, ALERT, &[1, 0], libc::MSG_DONTWAIT);
    }
}

/// The bytes of control messages not whole yet, and their record type.
#[derive(Default)]
struct Pending {
    typ: u8,
    bytes: Vec<u8>,
}

/// A whole control message from the peer.
#[derive(Debug, PartialEq, Eq)]
enum Message {
    CloseNotify,
    KeyUpdate { requested: bool },
}

/// Why the session ends on a control message.
#[derive(Debug, PartialEq, Eq)]
enum Refusal {
    /// Ours to send: an alert description and what went wrong.
    Alert(u8, &'static str),
    /// The peer's fatal alert.
    PeerAlert(u8),
}

/// The most control bytes held while a message is cut: a KeyUpdate is 5, an alert 2.
const PENDING_MAX: usize = 1024;

/// Add `data` (from a record of type `typ`) to what `pending` holds and take the whole
/// messages off its front; a cut one stays for the next piece. Only alerts and, in TLS 1.3,
/// KeyUpdate may come from a client once the handshake is over.
fn take_messages(
    pending: &mut Pending,
    typ: u8,
    data: &[u8],
    tls13: bool,
) -> Result<Vec<Message>, Refusal> {
    if !pending.bytes.is_empty() && pending.typ != typ {
        return Err(Refusal::Alert(
            UNEXPECTED_MESSAGE,
            "a TLS message cut by another",
        ));
    }
    if pending.bytes.len() + data.len() > PENDING_MAX {
        return Err(Refusal::Alert(
            UNEXPECTED_MESSAGE,
            "an oversized TLS control record",
        ));
    }
    pending.typ = typ;
    pending.bytes.extend_from_slice(data);
    let mut out = Vec::new();
    loop {
        let b = &pending.bytes;
        let used = match typ {
            ALERT if b.len() < 2 => break,
            ALERT if b[1] == 0 => {
                out.push(Message::CloseNotify);
                // Nothing after close_notify counts.
                pending.bytes.clear();
                return Ok(out);
            }
            ALERT => return Err(Refusal::PeerAlert(b[1])),
            HANDSHAKE if tls13 => {
                if b.len() < 4 {
                    break;
                }
                if b[0] != KEY_UPDATE {
                    return Err(Refusal::Alert(
                        UNEXPECTED_MESSAGE,
                        "an unexpected TLS handshake",
                    ));
                }
                if b[1..4] != [0, 0, 1] || b.get(4).is_some_and(|&v| v > 1) {
                    return Err(Refusal::Alert(DECODE_ERROR, "a malformed TLS KeyUpdate"));
                }
                let Some(&v) = b.get(4) else { break };
                out.push(Message::KeyUpdate { requested: v == 1 });
                5
            }
            _ => {
                return Err(Refusal::Alert(
                    UNEXPECTED_MESSAGE,
                    "an unexpected TLS record",
                ))
            }
        };
        pending.bytes.drain(..used);
    }
    Ok(out)
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// Our KeyUpdate, sent under the send key it retires. The caller holds the send side, so
/// no data record goes between it and the next key. `request`: ask the peer to renew its
/// key too (when ours reached its limit, since the peer's carried about as many records);
/// never when answering the peer's request, which would make the two ask each other forever.
pub fn send_key_update(fd: RawFd, request: bool) -> io::Result<()> {
    send_record(fd, HANDSHAKE, &[KEY_UPDATE, 0, 0, 1, u8::from(request)], 0)
}

/// Records sent under the current send key, as the kernel counts them.
fn sent_records(fd: RawFd) -> Option<u64> {
    let mut buf = [0u8; 64];
    let mut len = buf.len() as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes into `buf` and stores the length.
    let r = unsafe { libc::getsockopt(fd, SOL_TLS, TLS_TX, buf.as_mut_ptr().cast(), &mut len) };
    let len = len as usize;
    if r < 0 || !(8..=buf.len()).contains(&len) {
        return None;
    }
    Some(u64::from_be_bytes(buf[len - 8..len].try_into().ok()?))
}

/// Send one record of type `typ` (not application data) holding `data`.
fn send_record(fd: RawFd, typ: u8, data: &[u8], flags: libc::c_int) -> io::Result<()> {
    let mut cbuf = [0u64; 4];
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // SAFETY: a zeroed msghdr is valid; every pointer set below outlives the sendmsg call,
    // and the control buffer is large enough for one cmsg of one byte (CMSG_SPACE(1)).
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.as_mut_ptr().cast();
        msg.msg_controllen = libc::CMSG_SPACE(1) as _;
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = SOL_TLS;
        (*cmsg).cmsg_type = TLS_SET_RECORD_TYPE;
        (*cmsg).cmsg_len = libc::CMSG_LEN(1) as _;
        *libc::CMSG_DATA(cmsg) = typ;
        let r = libc::sendmsg(fd, &msg, flags | libc::MSG_NOSIGNAL);
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        if r as usize != data.len() {
            return Err(io::Error::other("a TLS control record was cut short"));
        }
    }
    Ok(())
}

/// Read plaintext from a kernel TLS socket: the bytes and the type of the record they come
/// from (the kernel never mixes two types in one read).
pub fn recv(fd: RawFd, buf: &mut [u8]) -> io::Result<(usize, u8)> {
    let mut cbuf = [0u64; 4];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: a zeroed msghdr is valid; the iovec and control buffer outlive the call, and
    // the control message is read only within the length the kernel reports.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&cbuf) as _;
        let r = libc::recvmsg(fd, &mut msg, 0);
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut typ = APPLICATION_DATA;
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == SOL_TLS && (*cmsg).cmsg_type == TLS_GET_RECORD_TYPE {
                typ = *libc::CMSG_DATA(cmsg);
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
        Ok((r as usize, typ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_messages_whole_cut_and_hostile() {
        let mut p = Pending::default();
        let ku = |r| Message::KeyUpdate { requested: r };
        // Two KeyUpdates in one record, the second cut after 3 bytes.
        let got = take_messages(&mut p, HANDSHAKE, &[24, 0, 0, 1, 1, 24, 0, 0], true);
        assert_eq!(got, Ok(vec![ku(true)]));
        assert_eq!(take_messages(&mut p, HANDSHAKE, &[1], true), Ok(vec![]));
        assert_eq!(
            take_messages(&mut p, HANDSHAKE, &[0], true),
            Ok(vec![ku(false)])
        );
        assert!(p.bytes.is_empty());
        // A cut alert, then close_notify.
        assert_eq!(take_messages(&mut p, ALERT, &[1], true), Ok(vec![]));
        assert_eq!(
            take_messages(&mut p, ALERT, &[0], true),
            Ok(vec![Message::CloseNotify])
        );
        // Refusals.
        let bad =
            |typ, data: &[u8], tls13| take_messages(&mut Pending::default(), typ, data, tls13);
        assert_eq!(bad(ALERT, &[2, 40], true), Err(Refusal::PeerAlert(40)));
        assert!(matches!(
            bad(HANDSHAKE, &[24, 0, 0, 1, 2], true),
            Err(Refusal::Alert(DECODE_ERROR, _))
        ));
        assert!(matches!(
            bad(HANDSHAKE, &[24, 0, 0, 2, 0, 0], true),
            Err(Refusal::Alert(DECODE_ERROR, _))
        ));
        assert!(matches!(
            bad(HANDSHAKE, &[4, 0, 0, 1, 0], true),
            Err(Refusal::Alert(UNEXPECTED_MESSAGE, _))
        ));
        // Renegotiation (TLS 1.2) and unknown record types.
        assert!(matches!(
            bad(HANDSHAKE, &[1, 0, 0, 1, 0], false),
            Err(Refusal::Alert(UNEXPECTED_MESSAGE, _))
        ));
        assert!(matches!(
            bad(20, &[1], true),
            Err(Refusal::Alert(UNEXPECTED_MESSAGE, _))
        ));
        assert!(matches!(
            bad(HANDSHAKE, &[0; 2000], true),
            Err(Refusal::Alert(UNEXPECTED_MESSAGE, _))
        ));
        // A cut message interrupted by another type.
        let mut p = Pending::default();
        assert_eq!(take_messages(&mut p, HANDSHAKE, &[24, 0], true), Ok(vec![]));
        assert!(take_messages(&mut p, ALERT, &[1, 0], true).is_err());
    }

    #[test]
    fn kernel_releases_parse() {
        assert_eq!(parse_release("6.12.117+deb12-amd64"), Some((6, 12)));
        assert_eq!(parse_release("6.18.44-fc-v669"), Some((6, 18)));
        assert_eq!(parse_release("5.4.0"), Some((5, 4)));
        assert_eq!(parse_release("junk"), None);
    }

    #[test]
    fn crypto_info_layouts_match_the_kernel() {
        use rustls::crypto::cipher::{AeadKey, Iv};
        let aes256 = ConnectionTrafficSecrets::Aes256Gcm {
            key: AeadKey::from([1; 32]),
            iv: Iv::new([7; 12]),
        };
        // struct tls12_crypto_info_aes_gcm_256: 4 + 8 + 32 + 4 + 8.
        let i = CryptoInfo::new(TLS_1_3_VERSION, 5, &aes256).unwrap();
        assert_eq!(i.0.len(), 56);
        assert_eq!(&i.0[4..12], &[7; 8]);
        assert_eq!(&i.0[44..48], &[7; 4]);
        assert_eq!(&i.0[48..], &5u64.to_be_bytes());
        let chacha = ConnectionTrafficSecrets::Chacha20Poly1305 {
            key: AeadKey::from([1; 32]),
            iv: Iv::new([7; 12]),
        };
        // struct tls12_crypto_info_chacha20_poly1305: 4 + 12 + 32 + 0 + 8.
        assert_eq!(
            CryptoInfo::new(TLS_1_2_VERSION, 0, &chacha)
                .unwrap()
                .0
                .len(),
            56
        );
        let n = CryptoInfo::new_seq(&i, 9);
        assert_eq!(&n.0[48..], &9u64.to_be_bytes());
    }
}
