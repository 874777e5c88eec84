//! Our own TLS record layer for an established rustls session (x509 servers): rustls runs
//! the handshake and keeps the key schedule (`KernelConnection`, the API rustls offers for
//! kernel TLS and other outside record layers); records are sealed and opened here with
//! ring's AEADs, in place in the connection's own buffers. rustls' buffered API copies
//! every received byte twice more (into its deframer, then into a plaintext queue) and every
//! sent byte once more; on a 1 MiB write those copies cost more CPU than the AES itself.
//!
//! What a record layer must do, and where it is done here:
//! - nonces: the static IV XORed with the record's 64-bit sequence number (TLS 1.3 and TLS
//!   1.2 ChaCha20); TLS 1.2 AES-GCM sends the XORed value's last 8 bytes as its explicit
//!   nonce and reads the peer's from the record. Sequence numbers never repeat: 2^64 records
//!   cannot be reached, and TLS 1.3 keys are replaced long before (below).
//! - additional data: the record header (TLS 1.3), or sequence, type, version and plaintext
//!   length (TLS 1.2).
//! - TLS 1.3 inner plaintext: content type after the data, then zero padding, removed here.
//! - sizes: a record's plaintext is at most 2^14 bytes; a larger one is a record_overflow.
//! - non-data records: close_notify ends the stream; other alerts fail it; a TLS 1.3
//!   KeyUpdate renews the receive key (and the send key, with our own KeyUpdate, when the
//!   peer asks). Anything else (renegotiation, post-handshake authentication) fails it.
//! - key limits: after [`KEY_RECORDS`] records under one TLS 1.3 send key, we send a
//!   KeyUpdate and switch keys (rustls and GnuTLS do the same near AES-GCM's limit).
//!   TLS 1.2 has no key update: the peer ends such a session as it would with rustls.
//!
//! A failed decryption, a malformed record or an unexpected message makes the session
//! unusable: the caller sends the fatal alert queued here and drops the connection.

use rustls::kernel::KernelConnection;
use rustls::server::ServerConnectionData;
use rustls::{ConnectionTrafficSecrets, ProtocolVersion};
use std::io::{self, IoSlice};
use std::ops::Range;

/// A record's header: type, version, length.
pub const HEADER: usize = 5;
/// The largest plaintext in a record.
const MAX_PLAIN: usize = 1 << 14;
/// The largest record body accepted (TLS 1.3 allows 2^14 + 256 of ciphertext; TLS 1.2
/// 2^14 + 2048).
pub const MAX_BODY: usize = MAX_PLAIN + 2048;
const TAG: usize = 16;

const CHANGE_CIPHER_SPEC: u8 = 20;
const ALERT: u8 = 21;
const HANDSHAKE: u8 = 22;
const APPLICATION_DATA: u8 = 23;
const KEY_UPDATE: u8 = 24;

/// Records sealed under one TLS 1.3 send key before it is replaced (rustls' own limit for
/// AES-GCM is 2^23 records below the 2^24.5 of RFC 8446 5.5; this stays well under both).
#[cfg(not(test))]
const KEY_RECORDS: u64 = 1 << 22;
/// Small under test, so the renewal runs.
#[cfg(test)]
const KEY_RECORDS: u64 = 5;

/// Alert descriptions sent when a received record is refused.
const BAD_RECORD_MAC: u8 = 20;
const RECORD_OVERFLOW: u8 = 22;
const UNEXPECTED_MESSAGE: u8 = 10;
const DECODE_ERROR: u8 = 50;

#[derive(Clone, Copy)]
enum Direction {
    Receive,
    Transmit,
}

struct Keys {
    key: ring::aead::LessSafeKey,
    iv: [u8; 12],
    seq: u64,
}

impl Keys {
    fn new(seq: u64, secrets: &ConnectionTrafficSecrets) -> io::Result<Keys> {
        use ring::aead;
        let (alg, key, iv) = match secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (&aead::AES_128_GCM, key, iv),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (&aead::AES_256_GCM, key, iv),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
                (&aead::CHACHA20_POLY1305, key, iv)
            }
            _ => return Err(invalid("the session's cipher has no record layer here")),
        };
        let key = aead::UnboundKey::new(alg, key.as_ref())
            .map_err(|_| invalid("the session's key has the wrong length"))?;
        let iv: [u8; 12] = iv
            .as_ref()
            .try_into()
            .map_err(|_| invalid("the session's IV has the wrong length"))?;
        Ok(Keys {
            key: aead::LessSafeKey::new(key),
            iv,
            seq,
        })
    }

    /// The nonce of the next record, and its sequence number (consumed).
    fn next_nonce(&mut self) -> ([u8; 12], u64) {
        let seq = self.seq;
        self.seq += 1;
        let mut n = self.iv;
        for (a, b) in n[4..].iter_mut().zip(seq.to_be_bytes()) {
            *a ^= b;
        }
        (n, seq)
    }
}

/// What the first record of a buffer held.
pub enum Opened {
    /// Plaintext for the application: `range` within the buffer given to `open`.
    Data { used: usize, range: Range<usize> },
    /// Consumed with nothing to deliver (a key update, an empty record).
    Nothing { used: usize },
    /// The peer closed the session (close_notify).
    Closed,
    /// Not a whole record yet.
    Incomplete,
}

pub struct Records {
    /// rustls' key schedule, for key updates (None only in unit tests).
    conn: Option<KernelConnection<ServerConnectionData>>,
    tls13: bool,
    rx: Keys,
    tx: Keys,
    /// Records to send that the reader produced (a key update, an alert).
    pending: Vec<u8>,
    /// close_notify was queued: nothing more is sealed.
    closed: bool,
    broken: bool,
    /// A key was renewed since the session began.
    rekeyed: bool,
}

impl Records {
    pub fn new(
        conn: KernelConnection<ServerConnectionData>,
        rx: (u64, ConnectionTrafficSecrets),
        tx: (u64, ConnectionTrafficSecrets),
    ) -> io::Result<Records> {
        let tls13 = match conn.protocol_version() {
            ProtocolVersion::TLSv1_3 => true,
            ProtocolVersion::TLSv1_2 => false,
            v => return Err(invalid(&format!("no record layer for {v:?}"))),
        };
        Ok(Records {
            rx: Keys::new(rx.0, &rx.1)?,
            tx: Keys::new(tx.0, &tx.1)?,
            conn: Some(conn),
            tls13,
            pending: Vec::new(),
            closed: false,
            broken: false,
            rekeyed: false,
        })
    }

    /// The sequence number of the next record received.
    pub fn rx_seq(&self) -> u64 {
        self.rx.seq
    }

    /// The sequence number of the next record sent.
    pub fn tx_seq(&self) -> u64 {
        self.tx.seq
    }

    /// True once either direction left its first key.
    pub fn rekeyed(&self) -> bool {
        self.rekeyed
    }

    /// The key schedule, for a record layer elsewhere (kernel TLS).
    pub fn into_kernel_connection(self) -> Option<KernelConnection<ServerConnectionData>> {
        self.conn
    }

    /// True for a TLS 1.2 AES-GCM session, whose records carry an explicit nonce.
    fn explicit_nonce(&self) -> bool {
        !self.tls13 && self.tx_is_gcm()
    }

    fn tx_is_gcm(&self) -> bool {
        self.tx.key.algorithm() != &ring::aead::CHACHA20_POLY1305
    }

    /// Open the record at the start of `buf` in place.
    pub fn open(&mut self, buf: &mut [u8]) -> io::Result<Opened> {
        if self.broken {
            return Err(invalid("the TLS session failed earlier"));
        }
        if buf.len() < HEADER {
            return Ok(Opened::Incomplete);
        }
        let body = usize::from(u16::from_be_bytes([buf[3], buf[4]]));
        if body > MAX_BODY {
            return Err(self.refuse(RECORD_OVERFLOW, "a TLS record is too long"));
        }
        if buf.len() < HEADER + body {
            return Ok(Opened::Incomplete);
        }
        let used = HEADER + body;
        let outer = buf[0];
        if self.tls13 && outer == CHANGE_CIPHER_SPEC {
            // RFC 8446 5: a middlebox-compatibility record, at most one byte 0x01; one that
            // arrives after the handshake must be refused.
            return Err(self.refuse(UNEXPECTED_MESSAGE, "change_cipher_spec after handshake"));
        }
        let (typ, range) = self.unseal(&mut buf[..used])?;
        match typ {
            APPLICATION_DATA if range.is_empty() => Ok(Opened::Nothing { used }),
            APPLICATION_DATA => Ok(Opened::Data { used, range }),
            ALERT => self.alert(&buf[range]),
            HANDSHAKE if self.tls13 => {
                self.handshake(&buf[range])?;
                Ok(Opened::Nothing { used })
            }
            _ => Err(self.refuse(UNEXPECTED_MESSAGE, "an unexpected TLS record")),
        }
    }

    /// Decrypt `record` (header and body) in place: its content type and plaintext range.
    fn unseal(&mut self, record: &mut [u8]) -> io::Result<(u8, Range<usize>)> {
        use ring::aead::{Aad, Nonce};
        let body = record.len() - HEADER;
        let explicit = if !self.tls13 && self.rx.key.algorithm() != &ring::aead::CHACHA20_POLY1305 {
            8
        } else {
            0
        };
        if body < explicit + TAG {
            return Err(self.refuse(DECODE_ERROR, "a TLS record is too short"));
        }
        let (mut nonce, seq) = self.rx.next_nonce();
        if explicit > 0 {
            nonce[4..].copy_from_slice(&record[HEADER..HEADER + 8]);
        }
        let plain_len = body - explicit - TAG;
        let mut aad = [0u8; 13];
        let aad: &[u8] = if self.tls13 {
            aad[..HEADER].copy_from_slice(&record[..HEADER]);
            &aad[..HEADER]
        } else {
            aad[..8].copy_from_slice(&seq.to_be_bytes());
            aad[8..11].copy_from_slice(&record[..3]);
            aad[11..].copy_from_slice(&(plain_len as u16).to_be_bytes());
            &aad[..]
        };
        let start = HEADER + explicit;
        let opened = self.rx.key.open_in_place(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad),
            &mut record[start..],
        );
        if opened.is_err() {
            return Err(self.refuse(BAD_RECORD_MAC, "a TLS record failed to decrypt"));
        }
        let mut end = start + plain_len;
        let typ = if self.tls13 {
            if record[0] != APPLICATION_DATA {
                return Err(self.refuse(UNEXPECTED_MESSAGE, "a TLS 1.3 record of a bad type"));
            }
            // The content type is the last non-zero byte; zeroes after it are padding.
            while end > start && record[end - 1] == 0 {
                end -= 1;
            }
            if end == start {
                return Err(self.refuse(UNEXPECTED_MESSAGE, "a TLS 1.3 record without a type"));
            }
            end -= 1;
            record[end]
        } else {
            record[0]
        };
        if end - start > MAX_PLAIN {
            return Err(self.refuse(RECORD_OVERFLOW, "a TLS record's plaintext is too long"));
        }
        Ok((typ, start..end))
    }

    fn alert(&mut self, body: &[u8]) -> io::Result<Opened> {
        match body {
            [_, 0] => Ok(Opened::Closed),
            [_, d] => {
                self.broken = true;
                Err(invalid(&format!("the peer sent TLS alert {d}")))
            }
            _ => Err(self.refuse(DECODE_ERROR, "a malformed TLS alert")),
        }
    }

    /// Post-handshake messages of TLS 1.3: only KeyUpdate is expected from a client.
    fn handshake(&mut self, mut msgs: &[u8]) -> io::Result<()> {
        if msgs.is_empty() {
            return Err(self.refuse(UNEXPECTED_MESSAGE, "an empty TLS handshake record"));
        }
        while !msgs.is_empty() {
            if msgs.len() < 4 {
                return Err(self.refuse(DECODE_ERROR, "a truncated TLS handshake message"));
            }
            let len =
                (usize::from(msgs[1]) << 16) | (usize::from(msgs[2]) << 8) | usize::from(msgs[3]);
            if msgs[0] != KEY_UPDATE {
                return Err(self.refuse(UNEXPECTED_MESSAGE, "an unexpected TLS handshake message"));
            }
            if len != 1 || msgs.len() < 5 || msgs[4] > 1 {
                return Err(self.refuse(DECODE_ERROR, "a malformed TLS KeyUpdate"));
            }
            let requested = msgs[4] == 1;
            msgs = &msgs[5..];
            self.rx = self.next_keys(Direction::Receive)?;
            if requested && !self.closed {
                let mut out = std::mem::take(&mut self.pending);
                let r = self.update_tx_key(&mut out);
                self.pending = out;
                r?;
            }
        }
        Ok(())
    }

    /// Send a KeyUpdate (under the old key) and switch to the next send key.
    fn update_tx_key(&mut self, out: &mut Vec<u8>) -> io::Result<()> {
        // update_not_requested: the peer renews its own key when it wants to.
        self.seal_record(
            HANDSHAKE,
            &[IoSlice::new(&[KEY_UPDATE, 0, 0, 1, 0])],
            5,
            out,
        )?;
        self.tx = self.next_keys(Direction::Transmit)?;
        Ok(())
    }

    /// The next keys of one direction, from rustls' key schedule.
    fn next_keys(&mut self, dir: Direction) -> io::Result<Keys> {
        self.rekeyed = true;
        let conn = self
            .conn
            .as_mut()
            .ok_or_else(|| invalid("TLS key update without a key schedule"))?;
        let (seq, secrets) = match dir {
            Direction::Receive => conn.update_rx_secret(),
            Direction::Transmit => conn.update_tx_secret(),
        }
        .map_err(|e| invalid(&format!("TLS key update: {e}")))?;
        Keys::new(seq, &secrets)
    }

    /// Seal a record of `typ` into the records waiting for the peer.
    fn queue_record(&mut self, typ: u8, body: &[u8]) {
        let mut out = std::mem::take(&mut self.pending);
        // Sealing fails only on a broken key, and then there is nothing left to tell.
        let _ = self.seal_record(typ, &[IoSlice::new(body)], body.len(), &mut out);
        self.pending = out;
    }

    /// Queue a fatal alert for the peer, mark the session failed, and make the error.
    fn refuse(&mut self, desc: u8, msg: &str) -> io::Error {
        if !self.broken && !self.closed {
            self.queue_record(ALERT, &[2, desc]);
        }
        self.broken = true;
        self.closed = true;
        invalid(msg)
    }

    /// Seal the concatenation of `pieces` (application data) onto `out`, in records of at
    /// most 2^14 bytes each, every record filled before the next begins.
    pub fn seal(&mut self, pieces: &[IoSlice<'_>], out: &mut Vec<u8>) -> io::Result<()> {
        if self.closed {
            return Err(io::ErrorKind::BrokenPipe.into());
        }
        let mut batches = Batches::new(pieces);
        // The record's pieces: at most a few, since they are long or few.
        let mut parts = [IoSlice::new(&[]); 8];
        loop {
            if self.tls13 && self.tx.seq >= KEY_RECORDS {
                self.update_tx_key(out)?;
            }
            let (used, len) = batches.next(MAX_PLAIN, &mut parts);
            if used == 0 {
                return Ok(());
            }
            self.seal_record(APPLICATION_DATA, &parts[..used], len, out)?;
        }
    }

    /// Seal one record of `len` plaintext bytes (the concatenation of `parts`) onto `out`.
    fn seal_record(
        &mut self,
        typ: u8,
        parts: &[IoSlice<'_>],
        len: usize,
        out: &mut Vec<u8>,
    ) -> io::Result<()> {
        use ring::aead::{Aad, Nonce};
        let explicit = if self.explicit_nonce() { 8 } else { 0 };
        let inner = if self.tls13 { len + 1 } else { len };
        let body = explicit + inner + TAG;
        let start = out.len();
        let outer = if self.tls13 { APPLICATION_DATA } else { typ };
        out.extend_from_slice(&[outer, 3, 3]);
        out.extend_from_slice(&(body as u16).to_be_bytes());
        let (nonce, seq) = self.tx.next_nonce();
        if explicit > 0 {
            out.extend_from_slice(&nonce[4..]);
        }
        let plain = out.len();
        for p in parts {
            out.extend_from_slice(p);
        }
        if self.tls13 {
            out.push(typ);
        }
        let mut aad = [0u8; 13];
        let aad: &[u8] = if self.tls13 {
            aad[..HEADER].copy_from_slice(&out[start..start + HEADER]);
            &aad[..HEADER]
        } else {
            aad[..8].copy_from_slice(&seq.to_be_bytes());
            aad[8..11].copy_from_slice(&[typ, 3, 3]);
            aad[11..].copy_from_slice(&(len as u16).to_be_bytes());
            &aad[..]
        };
        let tag = self
            .tx
            .key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad),
                &mut out[plain..],
            )
            .map_err(|_| invalid("a TLS record could not be sealed"))?;
        out.extend_from_slice(tag.as_ref());
        Ok(())
    }

    /// Queue close_notify; nothing is sealed after it.
    pub fn close(&mut self) {
        if !self.closed && !self.broken {
            self.queue_record(ALERT, &[1, 0]);
        }
        self.closed = true;
    }

    /// Records the reader produced for the peer (alerts, key updates).
    pub fn take_pending(&mut self, out: &mut Vec<u8>) {
        out.append(&mut self.pending);
    }

    pub fn wants_write(&self) -> bool {
        !self.pending.is_empty()
    }
}

/// Cuts a list of pieces into consecutive batches of at most `max` bytes each, filling every
/// batch before the next begins, so records stay full however a reply is cut into pieces.
pub struct Batches<'p, 'a> {
    pieces: &'p [IoSlice<'a>],
    idx: usize,
    off: usize,
}

impl<'p, 'a> Batches<'p, 'a> {
    pub fn new(pieces: &'p [IoSlice<'a>]) -> Self {
        Batches {
            pieces,
            idx: 0,
            off: 0,
        }
    }

    /// Put the next batch into `slots` (fewer bytes when the slots run out): how many slots
    /// it uses and its length; (0, 0) at the end. Empty pieces take no slot.
    pub fn next(&mut self, max: usize, slots: &mut [IoSlice<'p>]) -> (usize, usize) {
        let (mut used, mut len) = (0, 0);
        while len < max && used < slots.len() && self.idx < self.pieces.len() {
            let p: &'p [u8] = &self.pieces[self.idx];
            let take = (p.len() - self.off).min(max - len);
            if take > 0 {
                slots[used] = IoSlice::new(&p[self.off..self.off + take]);
                used += 1;
            }
            len += take;
            self.off += take;
            if self.off == p.len() {
                self.idx += 1;
                self.off = 0;
            }
        }
        (used, len)
    }
}

fn invalid(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secrets(chacha: bool, seed: u8) -> ConnectionTrafficSecrets {
        let key = rustls::crypto::cipher::AeadKey::from([seed; 32]);
        let iv = rustls::crypto::cipher::Iv::new([seed ^ 0x5a; 12]);
        if chacha {
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv }
        } else {
            ConnectionTrafficSecrets::Aes256Gcm { key, iv }
        }
    }

    fn side(tls13: bool, chacha: bool, rx: u8, tx: u8) -> Records {
        Records {
            conn: None,
            tls13,
            rx: Keys::new(0, &secrets(chacha, rx)).unwrap(),
            tx: Keys::new(0, &secrets(chacha, tx)).unwrap(),
            pending: Vec::new(),
            closed: false,
            broken: false,
            rekeyed: false,
        }
    }

    /// A server and the peer whose send keys are its receive keys.
    fn pair(tls13: bool, chacha: bool) -> (Records, Records) {
        (side(tls13, chacha, 1, 2), side(tls13, chacha, 2, 1))
    }

    /// Open every record of `wire` on `r`: the plaintext, or the first error.
    fn open_all(r: &mut Records, wire: &mut [u8]) -> io::Result<(Vec<u8>, bool)> {
        let (mut pos, mut plain) = (0, Vec::new());
        while pos < wire.len() {
            match r.open(&mut wire[pos..])? {
                Opened::Data { used, range } => {
                    plain.extend_from_slice(&wire[pos..][range]);
                    pos += used;
                }
                Opened::Nothing { used } => pos += used,
                Opened::Closed => return Ok((plain, true)),
                Opened::Incomplete => break,
            }
        }
        Ok((plain, false))
    }

    const KINDS: [(bool, bool); 4] = [(true, false), (true, true), (false, false), (false, true)];

    #[test]
    fn records_round_trip_in_pieces() {
        for (tls13, chacha) in KINDS {
            let (mut server, mut peer) = pair(tls13, chacha);
            let data: Vec<u8> = (0..40_000u32).map(|i| (i * 7) as u8).collect();
            let mut wire = Vec::new();
            let pieces = [
                IoSlice::new(&data[..16]),
                IoSlice::new(&[]),
                IoSlice::new(&data[16..30_000]),
                IoSlice::new(&data[30_000..]),
            ];
            peer.seal(&pieces, &mut wire).unwrap();
            assert_eq!(
                wire.len(),
                40_000 + 3 * (HEADER + TAG) + extra(tls13, chacha) * 3
            );
            // A partial record waits for the rest.
            assert!(matches!(
                server.open(&mut wire.clone()[..100]),
                Ok(Opened::Incomplete)
            ));
            let (plain, closed) = open_all(&mut server, &mut wire).unwrap();
            assert!(plain == data && !closed, "tls13={tls13} chacha={chacha}");
            // And back, then close_notify.
            let mut wire = Vec::new();
            server.seal(&[IoSlice::new(b"reply")], &mut wire).unwrap();
            server.close();
            server.take_pending(&mut wire);
            assert!(server
                .seal(&[IoSlice::new(b"late")], &mut Vec::new())
                .is_err());
            assert_eq!(
                open_all(&mut peer, &mut wire).unwrap(),
                (b"reply".to_vec(), true)
            );
        }
    }

    /// Per-record overhead besides header and tag: TLS 1.3's type byte, TLS 1.2 AES-GCM's
    /// explicit nonce.
    fn extra(tls13: bool, chacha: bool) -> usize {
        match (tls13, chacha) {
            (true, _) => 1,
            (false, false) => 8,
            (false, true) => 0,
        }
    }

    #[test]
    fn a_changed_record_is_refused_with_an_alert() {
        for (tls13, chacha) in KINDS {
            let (mut server, mut peer) = pair(tls13, chacha);
            let mut wire = Vec::new();
            peer.seal(&[IoSlice::new(&[9u8; 1000])], &mut wire).unwrap();
            wire[HEADER + 20] ^= 1;
            assert!(server.open(&mut wire).is_err());
            assert!(server.wants_write(), "a bad_record_mac alert is queued");
            let mut alert = Vec::new();
            server.take_pending(&mut alert);
            let e = open_all(&mut peer, &mut alert).unwrap_err();
            assert!(e.to_string().contains("alert 20"), "{e}");
            // The session stays failed.
            let mut again = Vec::new();
            peer.seal(&[IoSlice::new(b"x")], &mut again).unwrap();
            assert!(server.open(&mut again).is_err());
        }
    }

    #[test]
    fn tls13_padding_types_and_limits() {
        let (mut server, mut peer) = pair(true, false);
        // Data, its type, then zero padding: the padding is removed.
        let mut wire = Vec::new();
        let parts = [
            IoSlice::new(b"padded"),
            IoSlice::new(&[APPLICATION_DATA, 0, 0]),
        ];
        peer.seal_record(0, &parts, 9, &mut wire).unwrap();
        assert_eq!(
            open_all(&mut server, &mut wire).unwrap(),
            (b"padded".to_vec(), false)
        );
        // Only zeroes: no content type.
        let mut wire = Vec::new();
        peer.seal_record(0, &[IoSlice::new(&[0, 0])], 2, &mut wire)
            .unwrap();
        assert!(server.open(&mut wire).is_err());

        for (typ, body) in [
            (HANDSHAKE, &[4u8, 0, 0, 0][..]), // NewSessionTicket from a client
            (HANDSHAKE, &[KEY_UPDATE, 0, 0, 1, 7][..]), // a bad KeyUpdate value
            (HANDSHAKE, &[KEY_UPDATE, 0, 0][..]), // truncated
            (ALERT, &[2, 40][..]),            // a fatal alert
            (ALERT, &[1][..]),                // malformed
            (CHANGE_CIPHER_SPEC, &[1][..]),   // inside a TLS 1.3 record
        ] {
            let (mut server, mut peer) = pair(true, false);
            let mut wire = Vec::new();
            peer.seal_record(typ, &[IoSlice::new(body)], body.len(), &mut wire)
                .unwrap();
            assert!(server.open(&mut wire).is_err(), "type {typ} {body:?}");
        }
        // A header announcing more than a record may hold.
        let (mut server, _) = pair(true, false);
        let mut big = vec![APPLICATION_DATA, 3, 3, 0x48, 0x01];
        big.resize(HEADER + 0x4801, 0);
        let e = server.open(&mut big).err().expect("refused");
        assert!(e.to_string().contains("too long"), "{e}");
        // A plaintext change_cipher_spec after the handshake.
        let (mut server, _) = pair(true, false);
        let mut ccs = vec![CHANGE_CIPHER_SPEC, 3, 3, 0, 1, 1];
        assert!(server.open(&mut ccs).is_err());
    }

    /// Whatever a peer that holds the keys seals (any inner bytes and type, any length up to
    /// the limit), opening it returns a result and never panics; data comes back intact.
    #[test]
    fn arbitrary_sealed_records_never_panic() {
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for (tls13, chacha) in KINDS {
            for _ in 0..2000 {
                let (mut server, mut peer) = pair(tls13, chacha);
                let len = (next() % 64) as usize + if next() % 8 == 0 { MAX_PLAIN - 40 } else { 0 };
                let body: Vec<u8> = (0..len).map(|_| next() as u8).collect();
                let typ = [
                    0,
                    ALERT,
                    HANDSHAKE,
                    APPLICATION_DATA,
                    CHANGE_CIPHER_SPEC,
                    99,
                ][(next() % 6) as usize];
                let mut wire = Vec::new();
                peer.seal_record(typ, &[IoSlice::new(&body)], body.len(), &mut wire)
                    .unwrap();
                let cut = if next() % 10 == 0 {
                    (next() as usize) % wire.len()
                } else {
                    wire.len()
                };
                if let Ok(Opened::Data { range, .. }) = server.open(&mut wire[..cut]) {
                    assert!(range.len() <= MAX_PLAIN);
                }
            }
        }
    }

    #[test]
    fn tls12_refuses_renegotiation_and_reads_empty_records() {
        let (mut server, mut peer) = pair(false, false);
        let mut wire = Vec::new();
        peer.seal_record(APPLICATION_DATA, &[], 0, &mut wire)
            .unwrap();
        peer.seal(&[IoSlice::new(b"after")], &mut wire).unwrap();
        assert_eq!(
            open_all(&mut server, &mut wire).unwrap(),
            (b"after".to_vec(), false)
        );
        let mut hello = Vec::new();
        peer.seal_record(HANDSHAKE, &[IoSlice::new(&[1, 0, 0, 0])], 4, &mut hello)
            .unwrap();
        assert!(server.open(&mut hello).is_err());
    }
}
