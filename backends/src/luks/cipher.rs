//! Sector encryption as LUKS1 defines it and qemu implements it: AES-128/192/256 in XTS, CBC
//! or ECB, a fresh IV per 512-byte sector from the IV generator the header names (`plain`:
//! the sector number's low 32 bits, `plain64`: all 64, both little endian; `essiv:HASH`: the
//! sector number encrypted under HASH(master key)). All ciphers are RustCrypto's; `aes`
//! picks AES-NI at run time. Nothing here allocates: callers pass whole sectors in place.

use super::hash::{Hash, MAX_DIGEST};
use aes::cipher::consts::U16;
use aes::cipher::{
    Array, BlockCipherDecrypt, BlockCipherEncrypt, BlockModeDecrypt, BlockModeEncrypt,
    BlockSizeUser, InnerIvInit, KeyInit,
};
use aes::{Aes128, Aes192, Aes256};
use xts_mode::Xts128;
use zeroize::Zeroizing;

/// The unit of encryption: LUKS1 and qemu's LUKS driver use 512-byte sectors.
pub const SECTOR: usize = 512;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Ecb,
    Cbc,
    Xts,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IvKind {
    Plain,
    Plain64,
    /// ESSIV with this hash: the IV cipher is the AES whose key size is the digest's.
    Essiv(Hash),
}

/// What a header's cipher fields say, checked as qemu checks them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Spec {
    /// The master key's length (both halves for XTS).
    pub key_bytes: usize,
    pub mode: Mode,
    pub iv: IvKind,
    /// The key-derivation and anti-forensic hash.
    pub hash: Hash,
}

/// Cipher names qemu knows that qnbd does not implement.
const OTHER_CIPHERS: &[&str] = &["cast5", "serpent", "twofish", "sm4"];

impl Spec {
    /// qemu's `qcrypto_block_luks_parse_header`: `cipher_mode` is `MODE-IVGEN[:IVHASH]`.
    pub fn parse(cipher: &str, mode: &str, hash: &str, key_bytes: u32) -> Result<Spec, String> {
        let (mode_name, iv_spec) = mode
            .split_once('-')
            .ok_or_else(|| format!("Unexpected cipher mode string format '{mode}'"))?;
        let (iv_name, iv_hash) = match iv_spec.split_once(':') {
            Some((n, h)) => (n, Some(Hash::from_name(h)?)),
            None => (iv_spec, None),
        };
        let mode = match mode_name {
            "ecb" => Mode::Ecb,
            "cbc" => Mode::Cbc,
            "xts" => Mode::Xts,
            "ctr" => return Err("Cipher mode 'ctr' is not supported by qnbd".into()),
            m => return Err(format!("Cipher mode '{m}' not supported")),
        };
        let per_cipher = if mode == Mode::Xts {
            key_bytes / 2
        } else {
            key_bytes
        };
        if cipher != "aes" || ![16, 24, 32].contains(&per_cipher) {
            if OTHER_CIPHERS.contains(&cipher) {
                return Err(format!("Cipher '{cipher}' is not supported by qnbd"));
            }
            return Err(format!(
                "Algorithm '{cipher}' with key size {per_cipher} bytes not supported"
            ));
        }
        let hash = Hash::from_name(hash)?;
        let iv = match iv_name {
            "plain" => IvKind::Plain,
            "plain64" => IvKind::Plain64,
            "essiv" => {
                let h = iv_hash.ok_or("Missing IV generator hash specification")?;
                let n = h.digest_len();
                if ![16, 24, 32].contains(&n) {
                    return Err(format!("No AES cipher with key size {n} available"));
                }
                IvKind::Essiv(h)
            }
            n => return Err(format!("IV generator '{n}' not supported")),
        };
        Ok(Spec {
            key_bytes: key_bytes as usize,
            mode,
            iv,
            hash,
        })
    }
}

/// An AES of any key size.
enum Aes {
    A128(Aes128),
    A192(Aes192),
    A256(Aes256),
}

impl Aes {
    /// `key` is 16, 24 or 32 bytes (checked by [`Spec::parse`]).
    fn new(key: &[u8]) -> Aes {
        match key.len() {
            16 => Aes::A128(Aes128::new(&Array::try_from(key).unwrap_or_default())),
            24 => Aes::A192(Aes192::new(&Array::try_from(key).unwrap_or_default())),
            _ => Aes::A256(Aes256::new(&Array::try_from(key).unwrap_or_default())),
        }
    }

    fn encrypt_block(&self, b: &mut Array<u8, U16>) {
        match self {
            Aes::A128(c) => c.encrypt_block(b),
            Aes::A192(c) => c.encrypt_block(b),
            Aes::A256(c) => c.encrypt_block(b),
        }
    }
}

/// The per-sector IV.
enum IvGen {
    Plain,
    Plain64,
    /// Boxed: the other variants hold nothing.
    Essiv(Box<Aes>),
}

impl IvGen {
    fn new(kind: IvKind, key: &[u8]) -> IvGen {
        match kind {
            IvKind::Plain => IvGen::Plain,
            IvKind::Plain64 => IvGen::Plain64,
            IvKind::Essiv(h) => {
                let mut salt = Zeroizing::new([0u8; MAX_DIGEST]);
                h.digest(&[key], &mut salt);
                IvGen::Essiv(Box::new(Aes::new(&salt[..h.digest_len()])))
            }
        }
    }

    fn iv(&self, sector: u64) -> Array<u8, U16> {
        let mut iv = Array::<u8, U16>::default();
        match self {
            IvGen::Plain => iv[..4].copy_from_slice(&(sector as u32).to_le_bytes()),
            IvGen::Plain64 => iv[..8].copy_from_slice(&sector.to_le_bytes()),
            IvGen::Essiv(c) => {
                iv[..8].copy_from_slice(&sector.to_le_bytes());
                c.encrypt_block(&mut iv);
            }
        }
        iv
    }
}

/// One cipher in one mode. XTS keeps its two keys' ciphers for whole-block sectors (see
/// [`xts_blocks`]) and `xts_mode` for a sector that ends in a part block.
enum Engine<C> {
    Ecb(C),
    Cbc(C),
    Xts { data: C, tweak: C, xts: Xts128<C> },
}

/// Sectors per batch of [`xts_blocks`]: 4 KiB of data, 8 tweaks, on the stack.
const XTS_BATCH: usize = 8;
const BLOCKS_PER_SECTOR: usize = SECTOR / 16;

/// XTS (IEEE 1619) over sectors of whole 16-byte blocks, a batch of sectors per cipher call.
/// The `aes` crate encrypts many blocks in one call several times faster than one by one
/// (its AES-NI/VAES backends pipeline them and set the round keys up once per call), which
/// `xts_mode` cannot use: it calls the cipher per block. The tweak of block j of a sector is
/// E_tweak(IV) * alpha^j in GF(2^128), little endian, as in `xts_mode` and the kernel.
fn xts_blocks<C>(data: &C, tweak: &C, iv: &IvGen, first: u64, buf: &mut [u8], encrypt: bool)
where
    C: BlockCipherEncrypt + BlockCipherDecrypt + BlockSizeUser<BlockSize = U16>,
{
    let mut tweaks = [Array::<u8, U16>::default(); XTS_BATCH * BLOCKS_PER_SECTOR];
    let mut starts = [Array::<u8, U16>::default(); XTS_BATCH];
    for (b, batch) in buf.chunks_mut(XTS_BATCH * SECTOR).enumerate() {
        let base = first.wrapping_add((b * XTS_BATCH) as u64);
        let sectors = batch.len().div_ceil(SECTOR);
        for (i, t) in starts[..sectors].iter_mut().enumerate() {
            *t = iv.iv(base.wrapping_add(i as u64));
        }
        tweak.encrypt_blocks(&mut starts[..sectors]);
        let (blocks, _) = Array::<u8, U16>::slice_as_chunks_mut(batch);
        let tweaks = &mut tweaks[..blocks.len()];
        for (chunk, start) in tweaks.chunks_mut(BLOCKS_PER_SECTOR).zip(&starts) {
            let mut t = u128::from_le_bytes(start.0);
            for slot in chunk {
                slot.0 = t.to_le_bytes();
                t = (t << 1) ^ if t >> 127 == 1 { 0x87 } else { 0 };
            }
        }
        xor_blocks(blocks, tweaks);
        if encrypt {
            data.encrypt_blocks(blocks);
        } else {
            data.decrypt_blocks(blocks);
        }
        xor_blocks(blocks, tweaks);
    }
}

fn xor_blocks(blocks: &mut [Array<u8, U16>], with: &[Array<u8, U16>]) {
    for (b, w) in blocks.iter_mut().zip(with) {
        b.0 = (u128::from_ne_bytes(b.0) ^ u128::from_ne_bytes(w.0)).to_ne_bytes();
    }
}

impl<C> Engine<C>
where
    C: BlockCipherEncrypt + BlockCipherDecrypt + BlockSizeUser<BlockSize = U16> + KeyInit + Clone,
{
    fn new(mode: Mode, key: &[u8]) -> Engine<C> {
        let c = |k: &[u8]| C::new(&Array::try_from(k).unwrap_or_default());
        match mode {
            Mode::Ecb => Engine::Ecb(c(key)),
            Mode::Cbc => Engine::Cbc(c(key)),
            Mode::Xts => {
                let (k1, k2) = key.split_at(key.len() / 2);
                Engine::Xts {
                    data: c(k1),
                    tweak: c(k2),
                    xts: Xts128::new(c(k1), c(k2)),
                }
            }
        }
    }

    fn run(&self, iv: &IvGen, first: u64, buf: &mut [u8], encrypt: bool) {
        if let Engine::Xts { data, tweak, .. } = self {
            if buf.len().is_multiple_of(16) {
                return xts_blocks(data, tweak, iv, first, buf, encrypt);
            }
        }
        // A short last piece (key material of 24-byte keys) is a part sector, as in qemu.
        for (i, sector) in buf.chunks_mut(SECTOR).enumerate() {
            if sector.len() < 16 {
                break;
            }
            let n = first.wrapping_add(i as u64);
            let (blocks, _) = Array::<u8, U16>::slice_as_chunks_mut(sector);
            match self {
                Engine::Ecb(c) if encrypt => c.encrypt_blocks(blocks),
                Engine::Ecb(c) => c.decrypt_blocks(blocks),
                Engine::Cbc(c) if encrypt => {
                    cbc::Encryptor::<C>::inner_iv_init(c.clone(), &iv.iv(n)).encrypt_blocks(blocks)
                }
                Engine::Cbc(c) => {
                    cbc::Decryptor::<C>::inner_iv_init(c.clone(), &iv.iv(n)).decrypt_blocks(blocks)
                }
                Engine::Xts { xts, .. } if encrypt => xts.encrypt_sector(sector, iv.iv(n)),
                Engine::Xts { xts, .. } => xts.decrypt_sector(sector, iv.iv(n)),
            }
        }
    }
}

/// Boxed: the XTS engines hold expanded keys twice (kilobytes).
enum AnyEngine {
    A128(Box<Engine<Aes128>>),
    A192(Box<Engine<Aes192>>),
    A256(Box<Engine<Aes256>>),
}

/// A key in use: encrypts and decrypts whole sectors in place. The round keys are zeroed
/// when it is dropped (the `aes` crate's `zeroize` feature).
pub struct SectorCipher {
    engine: AnyEngine,
    iv: IvGen,
}

impl std::fmt::Debug for SectorCipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SectorCipher(<key>)")
    }
}

impl SectorCipher {
    /// A cipher for `spec` with `key` (of `spec.key_bytes` bytes).
    pub fn new(spec: &Spec, key: &[u8]) -> Result<SectorCipher, String> {
        if key.len() != spec.key_bytes {
            return Err(format!(
                "master key has {} bytes, the header says {}",
                key.len(),
                spec.key_bytes
            ));
        }
        let per = if spec.mode == Mode::Xts {
            key.len() / 2
        } else {
            key.len()
        };
        let engine = match per {
            16 => AnyEngine::A128(Box::new(Engine::new(spec.mode, key))),
            24 => AnyEngine::A192(Box::new(Engine::new(spec.mode, key))),
            _ => AnyEngine::A256(Box::new(Engine::new(spec.mode, key))),
        };
        Ok(SectorCipher {
            engine,
            iv: IvGen::new(spec.iv, key),
        })
    }

    fn run(&self, first_sector: u64, buf: &mut [u8], encrypt: bool) {
        match &self.engine {
            AnyEngine::A128(e) => e.run(&self.iv, first_sector, buf, encrypt),
            AnyEngine::A192(e) => e.run(&self.iv, first_sector, buf, encrypt),
            AnyEngine::A256(e) => e.run(&self.iv, first_sector, buf, encrypt),
        }
    }

    /// Encrypt the sectors of `buf`, numbered from `first_sector`; a last part sector is
    /// encrypted as a shorter sector (whole 16-byte blocks).
    pub fn encrypt(&self, first_sector: u64, buf: &mut [u8]) {
        self.run(first_sector, buf, true)
    }

    /// Decrypt what [`SectorCipher::encrypt`] encrypted.
    pub fn decrypt(&self, first_sector: u64, buf: &mut [u8]) {
        self.run(first_sector, buf, false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(mode: &str, key_bytes: u32) -> Spec {
        Spec::parse("aes", mode, "sha256", key_bytes).unwrap()
    }

    #[test]
    fn parse_errors_are_qemus() {
        let e = |c: &str, m: &str, h: &str, k: u32| Spec::parse(c, m, h, k).unwrap_err();
        assert_eq!(
            e("aes", "xts", "sha256", 64),
            "Unexpected cipher mode string format 'xts'"
        );
        assert_eq!(
            e("aes", "xts-plain65:sha257", "sha256", 64),
            "Hash algorithm 'sha257' not supported"
        );
        assert_eq!(
            e("aes", "cfb-plain64", "sha256", 32),
            "Cipher mode 'cfb' not supported"
        );
        assert_eq!(
            e("foo", "xts-plain64", "sha256", 64),
            "Algorithm 'foo' with key size 32 bytes not supported"
        );
        assert_eq!(
            e("aes", "xts-plain64", "sha2566", 64),
            "Hash algorithm 'sha2566' not supported"
        );
        assert_eq!(
            e("aes", "cbc-plain65", "sha256", 32),
            "IV generator 'plain65' not supported"
        );
        assert_eq!(
            e("aes", "cbc-essiv", "sha256", 32),
            "Missing IV generator hash specification"
        );
        assert_eq!(
            e("aes", "cbc-essiv:sha1", "sha256", 16),
            "No AES cipher with key size 20 available"
        );
        assert!(e("serpent", "xts-plain64", "sha256", 64).contains("not supported by qnbd"));
    }

    /// `xts_mode` sector by sector: what the batched path must equal.
    fn xts_reference<C>(k1: &[u8], k2: &[u8], first: u64, buf: &mut [u8])
    where
        C: BlockCipherEncrypt + BlockCipherDecrypt + BlockSizeUser<BlockSize = U16> + KeyInit,
    {
        let xts = Xts128::new(
            C::new_from_slice(k1).unwrap(),
            C::new_from_slice(k2).unwrap(),
        );
        for (i, sector) in buf.chunks_mut(SECTOR).enumerate() {
            xts.encrypt_sector(sector, IvGen::Plain64.iv(first.wrapping_add(i as u64)));
        }
    }

    #[test]
    fn batched_xts_equals_xts_mode_sector_by_sector() {
        let key: Vec<u8> = (0..64u8).map(|i| i.wrapping_mul(37)).collect();
        for k in [32usize, 64] {
            let c = SectorCipher::new(&spec("xts-plain64", k as u32), &key[..k]).unwrap();
            let (k1, k2) = key[..k].split_at(k / 2);
            // 19.5 sectors: two whole batches, a third cut short, a last part sector.
            let plain: Vec<u8> = (0..19 * SECTOR + 256)
                .map(|i| (i * 7 % 253) as u8)
                .collect();
            for first in [0u64, 5, u64::MAX - 3] {
                let mut want = plain.clone();
                match k {
                    32 => xts_reference::<Aes128>(k1, k2, first, &mut want),
                    _ => xts_reference::<Aes256>(k1, k2, first, &mut want),
                }
                let mut got = plain.clone();
                c.encrypt(first, &mut got);
                assert!(got == want, "key {k} first {first}");
                c.decrypt(first, &mut got);
                assert!(got == plain, "key {k} first {first}");
            }
        }
    }

    #[test]
    fn round_trips_in_every_mode() {
        let key: Vec<u8> = (0..64u8).collect();
        for (m, k) in [
            ("xts-plain64", 64),
            ("xts-plain64", 32),
            ("xts-plain", 48),
            ("cbc-essiv:sha256", 16),
            ("cbc-plain64", 32),
            ("cbc-plain", 24),
            ("ecb-plain64", 32),
        ] {
            let s = spec(m, k);
            let c = SectorCipher::new(&s, &key[..k as usize]).unwrap();
            let plain: Vec<u8> = (0..2048).map(|i| (i * 31 % 251) as u8).collect();
            let mut b = plain.clone();
            c.encrypt(77, &mut b);
            assert_ne!(b, plain, "{m}");
            // Sector numbers matter (except in ECB).
            let mut other = plain.clone();
            c.encrypt(78, &mut other);
            assert_eq!(b[..512] == other[..512], m.starts_with("ecb"), "{m}");
            c.decrypt(77, &mut b);
            assert_eq!(b, plain, "{m}");
        }
    }

    #[test]
    fn xts_plain64_matches_ieee_1619_vector_2() {
        // IEEE P1619 XTS-AES-128 vector 2: keys 0x11.., 0x22.., sector 0x3333333333,
        // 32 bytes of 0x44.
        let mut key = [0x11u8; 32];
        key[16..].fill(0x22);
        let c = SectorCipher::new(&spec("xts-plain64", 32), &key).unwrap();
        let mut buf = [0x44u8; 512];
        c.encrypt(0x33_3333_3333, &mut buf);
        let want = [
            0xc4, 0x54, 0x18, 0x5e, 0x6a, 0x16, 0x93, 0x6e, 0x39, 0x33, 0x40, 0x38, 0xac, 0xef,
            0x83, 0x8b, 0xfb, 0x18, 0x6f, 0xff, 0x74, 0x80, 0xad, 0xc4, 0x28, 0x93, 0x82, 0xec,
            0xd6, 0xd3, 0x94, 0xf0,
        ];
        assert_eq!(&buf[..32], &want);
    }
}
