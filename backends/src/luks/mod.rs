//! LUKS1 encryption as qemu reads and writes it (`crypto/block-luks.c`), usable under any
//! backend: the whole raw file for `driver=luks` ([`DRIVER`], a [`LuksVolume`] over the raw
//! file), or the data clusters of a qcow2 image with `encrypt.format=luks`, whose LUKS header
//! lives in the qcow2 file (the qcow2 engine calls [`Luks::encrypt`] and [`Luks::decrypt`]).
//!
//! - `header.rs`: the 592-byte header and qemu's checks, with its messages;
//! - `keyslot.rs`: unlocking (PBKDF2, key material decryption, `af.rs` merge, digest check);
//! - `cipher.rs`: AES in XTS/CBC/ECB with plain/plain64/essiv IVs per 512-byte sector
//!   (`hash.rs`: the header's hash functions);
//! - `volume.rs` and `driver.rs`: the `luks` format; `bounce.rs`: the per-thread buffer
//!   writes are encrypted in, so no request allocates.
//!
//! Sector numbers (the IVs) count 512-byte sectors from the start of the payload for
//! `driver=luks`, and from the start of the qcow2 *file* (the host offset) for qcow2. Key
//! material lives in zeroizing buffers and the cipher's round keys are zeroed on drop; no
//! message or log line carries a passphrase or key.

mod af;
pub mod bounce;
pub mod cipher;
mod driver;
mod hash;
pub mod header;
mod keyslot;
mod volume;

pub use driver::DRIVER;
pub use keyslot::WRONG_PASSPHRASE;
pub use volume::LuksVolume;

use crate::format::EncryptOptions;
use crate::{Error, Result};
use cipher::{SectorCipher, Spec, SECTOR};
use header::HEADER_LEN;

/// Fills `buf` from `offset` of the LUKS header area; bytes past the end of the file read as
/// zeroes (as qemu reads them).
pub type ReadHeader<'a> = dyn FnMut(u64, &mut [u8]) -> Result<()> + 'a;

/// An unlocked LUKS volume: the payload's cipher and where the payload starts.
#[derive(Debug)]
pub struct Luks {
    cipher: SectorCipher,
    spec: Spec,
    payload_offset: u64,
}

impl Luks {
    /// Read and check the header through `read`, then unlock a key slot with `password`.
    pub fn open(read: &mut ReadHeader<'_>, password: &[u8]) -> Result<Luks> {
        let mut raw = [0u8; HEADER_LEN];
        read(0, &mut raw)?;
        let h = header::parse(&raw);
        h.check().map_err(Error::Encryption)?;
        let spec = h.spec().map_err(Error::Encryption)?;
        let key = keyslot::unlock(&h, &spec, password, read)?;
        let cipher = SectorCipher::new(&spec, &key).map_err(Error::Encryption)?;
        Ok(Luks {
            cipher,
            spec,
            payload_offset: h.payload_offset(),
        })
    }

    /// Where the payload starts in the volume (bytes).
    pub fn payload_offset(&self) -> u64 {
        self.payload_offset
    }

    pub fn spec(&self) -> &Spec {
        &self.spec
    }

    /// Encrypt `buf` in place; `offset` (512-aligned) numbers its first sector.
    pub fn encrypt(&self, offset: u64, buf: &mut [u8]) {
        debug_assert!(offset.is_multiple_of(SECTOR as u64));
        self.cipher.encrypt(offset / SECTOR as u64, buf)
    }

    /// Decrypt `buf` in place; `offset` (512-aligned) numbers its first sector.
    pub fn decrypt(&self, offset: u64, buf: &mut [u8]) {
        debug_assert!(offset.is_multiple_of(SECTOR as u64));
        self.cipher.decrypt(offset / SECTOR as u64, buf)
    }
}

/// The passphrase for an open, looked up as qemu does: `prefix` is the option's prefix
/// (`encrypt.` for qcow2). The bytes must be UTF-8 without NUL (qemu passes a C string).
pub fn passphrase<'a>(e: &'a EncryptOptions, prefix: &str) -> Result<&'a [u8]> {
    let Some(id) = e.key_secret.as_deref() else {
        return Err(Error::Encryption(format!(
            "Parameter '{prefix}key-secret' is required for cipher"
        )));
    };
    let Some(s) = &e.key else {
        return Err(Error::Encryption(format!("No secret with id '{id}'")));
    };
    let b = s.bytes();
    if b.contains(&0) || std::str::from_utf8(b).is_err() {
        return Err(Error::Encryption(format!(
            "Data from secret {id} is not valid UTF-8"
        )));
    }
    Ok(b)
}
