//! The anti-forensic information splitter of LUKS1 (cryptsetup's `af.c`, qemu's
//! `crypto/afsplit.c`): a key slot stores the master key spread over `stripes` blocks, so
//! that wiping any part of the slot destroys the key. Merging XORs each block into an
//! accumulator that is diffused (hashed in digest-sized pieces, each prefixed with its
//! big-endian index) between blocks; the last block XORed in gives the key.

use super::hash::{Hash, MAX_DIGEST};
use zeroize::Zeroizing;

/// Hash `block` in place, one digest-sized piece at a time (the last may be shorter).
fn diffuse(hash: Hash, block: &mut [u8]) {
    let d = hash.digest_len();
    let mut out = Zeroizing::new([0u8; MAX_DIGEST]);
    for (i, piece) in block.chunks_mut(d).enumerate() {
        let index = (i as u32).to_be_bytes();
        hash.digest(&[&index, piece], &mut out);
        let n = piece.len();
        piece.copy_from_slice(&out[..n]);
    }
}

fn xor_into(acc: &mut [u8], other: &[u8]) {
    for (a, b) in acc.iter_mut().zip(other) {
        *a ^= b;
    }
}

/// Recover the `key.len()`-byte key from `material` (`stripes` blocks of `key.len()` bytes).
/// The caller checks the sizes: `material.len() == key.len() * stripes`, `stripes >= 1`.
pub fn merge(hash: Hash, stripes: u32, material: &[u8], key: &mut [u8]) {
    let n = key.len();
    debug_assert_eq!(material.len(), n * stripes as usize);
    let mut acc = Zeroizing::new(vec![0u8; n]);
    let mut blocks = material.chunks_exact(n);
    for _ in 1..stripes {
        if let Some(b) = blocks.next() {
            xor_into(&mut acc, b);
            diffuse(hash, &mut acc);
        }
    }
    key.copy_from_slice(&acc);
    if let Some(last) = blocks.next() {
        xor_into(key, last);
    }
}

/// The inverse of [`merge`] with caller-chosen filler for the first `stripes - 1` blocks
/// (LUKS uses random bytes); used to build test images.
#[cfg(test)]
pub fn split(hash: Hash, stripes: u32, key: &[u8], filler: &[u8], material: &mut [u8]) {
    let n = key.len();
    let mut acc = vec![0u8; n];
    for i in 0..(stripes - 1) as usize {
        let b = &mut material[i * n..(i + 1) * n];
        b.copy_from_slice(&filler[i * n..(i + 1) * n]);
        xor_into(&mut acc, b);
        diffuse(hash, &mut acc);
    }
    let last = &mut material[(stripes as usize - 1) * n..stripes as usize * n];
    last.copy_from_slice(key);
    xor_into(last, &acc);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_then_merge_gives_the_key_back() {
        for hash in [Hash::Sha1, Hash::Sha256, Hash::Sha512] {
            // 20-byte keys with sha256/sha512 leave a short last piece in the diffusion.
            for n in [16usize, 20, 32, 64] {
                let key: Vec<u8> = (0..n as u8).collect();
                let filler: Vec<u8> = (0..n * 9).map(|i| (i * 7 + 3) as u8).collect();
                let mut m = vec![0u8; n * 10];
                split(hash, 10, &key, &filler, &mut m);
                let mut out = vec![0u8; n];
                merge(hash, 10, &m, &mut out);
                assert_eq!(out, key, "{hash:?} {n}");
                m[3] ^= 1;
                merge(hash, 10, &m, &mut out);
                assert_ne!(out, key);
            }
        }
    }
}
