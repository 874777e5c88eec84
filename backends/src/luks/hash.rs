//! The hash functions a LUKS1 header may name, under qemu's names: for PBKDF2 (key slots and
//! the master-key digest), the anti-forensic diffusion and ESSIV.

use sha1::Sha1;
use sha2::{Digest, Sha224, Sha256, Sha384, Sha512};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hash {
    Sha1,
    Sha224,
    Sha256,
    Sha384,
    Sha512,
}

/// The longest digest of any [`Hash`].
pub const MAX_DIGEST: usize = 64;

impl Hash {
    /// The hash a header names; Err is qemu's message.
    pub fn from_name(name: &str) -> Result<Hash, String> {
        Ok(match name {
            "sha1" => Hash::Sha1,
            "sha224" => Hash::Sha224,
            "sha256" => Hash::Sha256,
            "sha384" => Hash::Sha384,
            "sha512" => Hash::Sha512,
            _ => return Err(format!("Hash algorithm '{name}' not supported")),
        })
    }

    pub fn digest_len(self) -> usize {
        match self {
            Hash::Sha1 => 20,
            Hash::Sha224 => 28,
            Hash::Sha256 => 32,
            Hash::Sha384 => 48,
            Hash::Sha512 => 64,
        }
    }

    /// PBKDF2 with HMAC over this hash: fills `out`.
    pub fn pbkdf2(self, password: &[u8], salt: &[u8], iterations: u32, out: &mut [u8]) {
        use pbkdf2::pbkdf2_hmac;
        match self {
            Hash::Sha1 => pbkdf2_hmac::<Sha1>(password, salt, iterations, out),
            Hash::Sha224 => pbkdf2_hmac::<Sha224>(password, salt, iterations, out),
            Hash::Sha256 => pbkdf2_hmac::<Sha256>(password, salt, iterations, out),
            Hash::Sha384 => pbkdf2_hmac::<Sha384>(password, salt, iterations, out),
            Hash::Sha512 => pbkdf2_hmac::<Sha512>(password, salt, iterations, out),
        }
    }

    /// The digest of `parts` concatenated, in the first [`Hash::digest_len`] bytes of `out`.
    pub fn digest(self, parts: &[&[u8]], out: &mut [u8; MAX_DIGEST]) {
        fn run<D: Digest>(parts: &[&[u8]], out: &mut [u8]) {
            let mut d = D::new();
            for p in parts {
                d.update(p);
            }
            out.copy_from_slice(&d.finalize());
        }
        let out = &mut out[..self.digest_len()];
        match self {
            Hash::Sha1 => run::<Sha1>(parts, out),
            Hash::Sha224 => run::<Sha224>(parts, out),
            Hash::Sha256 => run::<Sha256>(parts, out),
            Hash::Sha384 => run::<Sha384>(parts, out),
            Hash::Sha512 => run::<Sha512>(parts, out),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    #[test]
    fn pbkdf2_matches_rfc6070_and_known_sha256() {
        let mut out = [0u8; 20];
        Hash::Sha1.pbkdf2(b"password", b"salt", 2, &mut out);
        assert_eq!(hex(&out), "ea6c014dc72d6f8ccd1ed92ace1d41f0d8de8957");
        let mut out = [0u8; 32];
        Hash::Sha256.pbkdf2(b"password", b"salt", 1, &mut out);
        assert_eq!(
            hex(&out),
            "120fb6cffcf8b32c43e7225256c4f837a86548c92ccc35480805987cb70be17b"
        );
    }

    #[test]
    fn digest_of_parts_is_digest_of_concatenation() {
        let mut a = [0u8; MAX_DIGEST];
        let mut b = [0u8; MAX_DIGEST];
        Hash::Sha512.digest(&[b"ab", b"c"], &mut a);
        Hash::Sha512.digest(&[b"abc"], &mut b);
        assert_eq!(a, b);
        assert!(hex(&a).starts_with("ddaf35a193617aba"));
        assert!(Hash::from_name("md5").is_err());
    }
}
