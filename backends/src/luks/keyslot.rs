//! Unlocking: for each enabled key slot in order, derive a slot key from the passphrase
//! (PBKDF2), decrypt the slot's key material with it (the payload's cipher, sectors numbered
//! from 0), merge the anti-forensic stripes and compare the PBKDF2 digest of the candidate
//! with the header's master-key digest. Every buffer holding key material is zeroed when
//! dropped.

use super::cipher::{SectorCipher, Spec};
use super::header::{Header, DIGEST_LEN, SECTOR, SLOT_ENABLED};
use super::{af, ReadHeader};
use crate::{Error, Result};
use zeroize::Zeroizing;

/// qemu's message when no slot opens with the passphrase.
pub const WRONG_PASSPHRASE: &str = "Invalid password, cannot unlock any keyslot";

/// The master key, or qemu's error.
pub fn unlock(
    h: &Header,
    spec: &Spec,
    password: &[u8],
    read: &mut ReadHeader<'_>,
) -> Result<Zeroizing<Vec<u8>>> {
    let n = spec.key_bytes;
    for slot in h.slots.iter().filter(|s| s.active == SLOT_ENABLED) {
        let mut slot_key = Zeroizing::new(vec![0u8; n]);
        spec.hash
            .pbkdf2(password, &slot.salt, slot.iterations, &mut slot_key);
        // Checked by Header::check: stripes == 4000, so this is at most 256 KB.
        let mut material = Zeroizing::new(vec![0u8; n * slot.stripes as usize]);
        read(u64::from(slot.key_offset_sector) * SECTOR, &mut material)?;
        SectorCipher::new(spec, &slot_key)
            .map_err(Error::Encryption)?
            .decrypt(0, &mut material);
        let mut key = Zeroizing::new(vec![0u8; n]);
        af::merge(spec.hash, slot.stripes, &material, &mut key);
        let mut digest = Zeroizing::new([0u8; DIGEST_LEN]);
        spec.hash
            .pbkdf2(&key, &h.mk_salt, h.mk_iterations, &mut digest[..]);
        if *digest == h.mk_digest {
            return Ok(key);
        }
    }
    Err(Error::Encryption(WRONG_PASSPHRASE.into()))
}
