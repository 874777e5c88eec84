//! Encrypted qcow2 images (`crypt_method` 2, `encrypt.format=luks`): the LUKS header lives
//! in the image file, at the offset and length of the full disk encryption header pointer
//! extension, and every data cluster holds ciphertext. As in qemu (`crypt_physical_offset`),
//! a sector's IV is its *host* offset in the file divided by 512: data moved to another host
//! cluster (copy-on-write, a shared cluster) is decrypted with the old offset and encrypted
//! with the new one. Compressed clusters are stored in the clear (qemu reads them without
//! decrypting), and zero flags stay metadata: they read as zeroes without decrypting.
//!
//! The image is served behind the sector-aligning layer (`align.rs`), so every data request
//! that reaches the engine is whole 512-byte sectors.

use super::header::{Header, CRYPT_LUKS, CRYPT_NONE};
use super::Qcow2;
use crate::file::HostFile;
use crate::format::EncryptOptions;
use crate::luks::{bounce, passphrase, Luks};
use crate::{Error, Result};

/// qemu's `qcow2_update_options` check of `encrypt.format=` against the header, then the
/// LUKS header read through qemu's bounds check and unlocked with `encrypt.key-secret`.
pub(super) fn open(f: &HostFile, h: &Header, e: &EncryptOptions) -> Result<Option<Luks>> {
    match (h.crypt_method, e.format.as_deref()) {
        (CRYPT_NONE, Some(fmt)) => {
            return Err(Error::Encryption(format!(
                "No encryption in image header, but options specified format '{fmt}'"
            )))
        }
        (CRYPT_LUKS, Some(fmt)) if fmt != "luks" => {
            return Err(Error::Encryption(format!(
                "Header reported 'luks' encryption format but options specify '{fmt}'"
            )))
        }
        _ => {}
    }
    let Some((offset, length)) = h.crypto_header.filter(|_| h.crypt_method == CRYPT_LUKS) else {
        return Ok(None);
    };
    if let Some(k) = &e.unexpected {
        return Err(Error::Encryption(format!("Parameter '{k}' is unexpected")));
    }
    let password = passphrase(e, "encrypt.")?;
    let luks = Luks::open(
        &mut |at, buf| {
            if at + buf.len() as u64 > length {
                return Err(Error::Encryption(
                    "Request for data outside of extension header".into(),
                ));
            }
            f.read("read encryption header", offset + at, buf)
                .map_err(|e| Error::Encryption(format!("Could not read encryption header: {e}")))
        },
        password,
    )?;
    Ok(Some(luks))
}

impl Qcow2 {
    pub fn is_encrypted(&self) -> bool {
        self.crypto.is_some()
    }

    /// Encrypted data I/O must be whole sectors at sector offsets.
    fn check_sectors(&self, host: u64, len: usize) -> Result<()> {
        if host.is_multiple_of(512) && len.is_multiple_of(512) {
            return Ok(());
        }
        Err(Error::Invalid(format!(
            "unaligned encrypted I/O at host offset {host:#x} (length {len:#x})"
        )))
    }

    /// Read guest data stored at host offset `host`, decrypted.
    pub(super) fn read_data(&self, host: u64, buf: &mut [u8]) -> Result<()> {
        let Some(c) = &self.crypto else {
            return self.df().read("read", host, buf);
        };
        self.check_sectors(host, buf.len())?;
        self.df().read("read", host, buf)?;
        c.decrypt(host, buf);
        Ok(())
    }

    /// Write guest data `data` at host offset `host`, encrypted in the per-thread bounce
    /// buffer (the caller's bytes stay as they are).
    pub(super) fn write_data(&self, host: u64, data: &[u8], dsync: bool) -> Result<()> {
        let Some(c) = &self.crypto else {
            return self.df().write("write", host, data, dsync);
        };
        self.check_sectors(host, data.len())?;
        bounce::encrypt_and_write(
            data,
            |at, b| c.encrypt(host + at as u64, b),
            |at, b| self.df().write("write", host + at as u64, b, dsync),
        )
    }

    /// Write a buffer of ours (a copy-on-write cluster): encrypted in place.
    pub(super) fn write_buf(&self, host: u64, buf: &mut [u8]) -> Result<()> {
        if let Some(c) = &self.crypto {
            self.check_sectors(host, buf.len())?;
            c.encrypt(host, buf);
        }
        self.df().write("write", host, buf, false)
    }
}
