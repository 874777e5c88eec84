//! The LUKS1 header (cryptsetup's on-disk format 1.2.1, as qemu writes it): 592 big-endian
//! bytes, parsed from untrusted input and checked exactly as qemu's
//! `qcrypto_block_luks_check_header` does, in its order and with its messages.

use super::cipher::Spec;

pub const MAGIC: [u8; 6] = *b"LUKS\xba\xbe";
/// The header without the key material.
pub const HEADER_LEN: usize = 592;
pub const NUM_SLOTS: usize = 8;
/// Anti-forensic stripes per key slot (the only value qemu accepts).
pub const STRIPES: u32 = 4000;
pub const SLOT_ENABLED: u32 = 0x00ac_71f3;
pub const SLOT_DISABLED: u32 = 0x0000_dead;
/// Key material starts at least this far in (bytes), as qemu lays it out.
const KEY_SLOT_OFFSET: u32 = 4096;
/// Sector size of the header's offsets.
pub const SECTOR: u64 = 512;
pub const DIGEST_LEN: usize = 20;
pub const SALT_LEN: usize = 32;

#[derive(Clone, Debug, Default)]
pub struct Slot {
    pub active: u32,
    pub iterations: u32,
    pub salt: [u8; SALT_LEN],
    pub key_offset_sector: u32,
    pub stripes: u32,
}

#[derive(Clone, Debug)]
pub struct Header {
    pub magic: [u8; 6],
    pub version: u16,
    pub cipher_name: [u8; 32],
    pub cipher_mode: [u8; 32],
    pub hash_spec: [u8; 32],
    pub payload_offset_sector: u32,
    pub key_bytes: u32,
    pub mk_digest: [u8; DIGEST_LEN],
    pub mk_salt: [u8; SALT_LEN],
    pub mk_iterations: u32,
    pub slots: [Slot; NUM_SLOTS],
}

/// Does an image starting with these bytes look like LUKS1? (qemu's probe: the magic and
/// version 1.)
pub fn probe(head: &[u8]) -> bool {
    head.len() >= 8 && head[..6] == MAGIC && head[6..8] == [0, 1]
}

/// A cursor over the fixed layout.
struct Fields<'a> {
    b: &'a [u8; HEADER_LEN],
    at: usize,
}

impl Fields<'_> {
    fn bytes<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        out.copy_from_slice(&self.b[self.at..self.at + N]);
        self.at += N;
        out
    }
    fn u16(&mut self) -> u16 {
        u16::from_be_bytes(self.bytes())
    }
    fn u32(&mut self) -> u32 {
        u32::from_be_bytes(self.bytes())
    }
}

/// The fields of a header (anything goes: [`Header::check`] judges them).
pub fn parse(b: &[u8; HEADER_LEN]) -> Header {
    let mut f = Fields { b, at: 0 };
    let magic = f.bytes();
    let version = f.u16();
    let cipher_name = f.bytes();
    let cipher_mode = f.bytes();
    let hash_spec = f.bytes();
    let payload_offset_sector = f.u32();
    let key_bytes = f.u32();
    let mk_digest = f.bytes();
    let mk_salt = f.bytes();
    let mk_iterations = f.u32();
    let _uuid: [u8; 40] = f.bytes();
    let slots = std::array::from_fn(|_| Slot {
        active: f.u32(),
        iterations: f.u32(),
        salt: f.bytes(),
        key_offset_sector: f.u32(),
        stripes: f.u32(),
    });
    Header {
        magic,
        version,
        cipher_name,
        cipher_mode,
        hash_spec,
        payload_offset_sector,
        key_bytes,
        mk_digest,
        mk_salt,
        mk_iterations,
        slots,
    }
}

/// The text of a NUL-terminated field (checked to be terminated first).
fn text(field: &[u8]) -> String {
    let n = field.iter().position(|&c| c == 0).unwrap_or(field.len());
    String::from_utf8_lossy(&field[..n]).into_owned()
}

/// qemu's `ranges_overlap` on 64-bit wrapping arithmetic (a zero length wraps too).
fn ranges_overlap(first1: u64, len1: u64, first2: u64, len2: u64) -> bool {
    let last1 = first1.wrapping_add(len1).wrapping_sub(1);
    let last2 = first2.wrapping_add(len2).wrapping_sub(1);
    !(last2 < first1 || last1 < first2)
}

impl Header {
    /// Sectors of key material a slot with `stripes` takes, rounded up to the 4 KiB
    /// alignment qemu lays slots out with (its arithmetic, truncated to 32 bits as its is).
    fn slot_sectors(&self, stripes: u32) -> u32 {
        let bytes = u64::from(self.key_bytes) * u64::from(stripes);
        let align = u64::from(KEY_SLOT_OFFSET) / SECTOR;
        (bytes.div_ceil(SECTOR).div_ceil(align) * align) as u32
    }

    /// qemu's header checks, in its order and words.
    pub fn check(&self) -> Result<(), String> {
        if self.magic != MAGIC {
            return Err("Volume is not in LUKS format".into());
        }
        if self.version != 1 {
            return Err(format!("LUKS version {} is not supported", self.version));
        }
        for (field, name) in [
            (&self.cipher_name, "cipher name"),
            (&self.cipher_mode, "cipher mode"),
            (&self.hash_spec, "hash spec"),
        ] {
            if !field.contains(&0) {
                return Err(format!("LUKS header {name} is not NUL terminated"));
            }
        }
        let header_sectors = KEY_SLOT_OFFSET / SECTOR as u32;
        if self.payload_offset_sector < header_sectors {
            return Err("LUKS payload is overlapping with the header".into());
        }
        if self.mk_iterations == 0 {
            return Err("LUKS key iteration count is zero".into());
        }
        for (i, s1) in self.slots.iter().enumerate() {
            let start1 = s1.key_offset_sector;
            let len1 = self.slot_sectors(s1.stripes);
            if s1.stripes != STRIPES {
                return Err(format!(
                    "Keyslot {i} is corrupted (stripes {} != {STRIPES})",
                    s1.stripes
                ));
            }
            if s1.active != SLOT_DISABLED && s1.active != SLOT_ENABLED {
                return Err(format!("Keyslot {i} state (active/disable) is corrupted"));
            }
            if s1.active == SLOT_ENABLED && s1.iterations == 0 {
                return Err(format!("Keyslot {i} iteration count is zero"));
            }
            if start1 < header_sectors {
                return Err(format!("Keyslot {i} is overlapping with the LUKS header"));
            }
            if start1.wrapping_add(len1) > self.payload_offset_sector {
                return Err(format!(
                    "Keyslot {i} is overlapping with the encrypted payload"
                ));
            }
            for (j, s2) in self.slots.iter().enumerate().skip(i + 1) {
                let len2 = self.slot_sectors(s2.stripes);
                if ranges_overlap(
                    start1.into(),
                    len1.into(),
                    s2.key_offset_sector.into(),
                    len2.into(),
                ) {
                    return Err(format!(
                        "Keyslots {i} and {j} are overlapping in the header"
                    ));
                }
            }
        }
        Ok(())
    }

    /// The cipher the header names (after [`Header::check`]).
    pub fn spec(&self) -> Result<Spec, String> {
        Spec::parse(
            &text(&self.cipher_name),
            &text(&self.cipher_mode),
            &text(&self.hash_spec),
            self.key_bytes,
        )
    }

    /// Where the encrypted data starts, in bytes.
    pub fn payload_offset(&self) -> u64 {
        u64::from(self.payload_offset_sector) * SECTOR
    }
}

/// The bytes of `h` as written on disk (for test images).
#[cfg(test)]
pub fn encode(h: &Header) -> [u8; HEADER_LEN] {
    let mut b = Vec::with_capacity(HEADER_LEN);
    b.extend_from_slice(&h.magic);
    b.extend_from_slice(&h.version.to_be_bytes());
    b.extend_from_slice(&h.cipher_name);
    b.extend_from_slice(&h.cipher_mode);
    b.extend_from_slice(&h.hash_spec);
    b.extend_from_slice(&h.payload_offset_sector.to_be_bytes());
    b.extend_from_slice(&h.key_bytes.to_be_bytes());
    b.extend_from_slice(&h.mk_digest);
    b.extend_from_slice(&h.mk_salt);
    b.extend_from_slice(&h.mk_iterations.to_be_bytes());
    b.extend_from_slice(&[b'0'; 40]);
    for s in &h.slots {
        b.extend_from_slice(&s.active.to_be_bytes());
        b.extend_from_slice(&s.iterations.to_be_bytes());
        b.extend_from_slice(&s.salt);
        b.extend_from_slice(&s.key_offset_sector.to_be_bytes());
        b.extend_from_slice(&s.stripes.to_be_bytes());
    }
    let mut out = [0u8; HEADER_LEN];
    out.copy_from_slice(&b);
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn field(s: &str) -> [u8; 32] {
        let mut f = [0u8; 32];
        f[..s.len()].copy_from_slice(s.as_bytes());
        f
    }

    /// A header laid out as qemu-img lays out aes-256-xts-plain64/sha256.
    pub fn qemu_like() -> Header {
        let key_bytes = 64u32;
        let slot_sectors = 504u32;
        Header {
            magic: MAGIC,
            version: 1,
            cipher_name: field("aes"),
            cipher_mode: field("xts-plain64"),
            hash_spec: field("sha256"),
            payload_offset_sector: 4040,
            key_bytes,
            mk_digest: [0; DIGEST_LEN],
            mk_salt: [7; SALT_LEN],
            mk_iterations: 1000,
            slots: std::array::from_fn(|i| Slot {
                active: if i == 0 { SLOT_ENABLED } else { SLOT_DISABLED },
                iterations: if i == 0 { 1000 } else { 0 },
                salt: [i as u8; SALT_LEN],
                key_offset_sector: 8 + i as u32 * slot_sectors,
                stripes: STRIPES,
            }),
        }
    }

    #[test]
    fn a_qemu_layout_passes_and_round_trips() {
        let h = qemu_like();
        h.check().unwrap();
        let back = parse(&encode(&h));
        back.check().unwrap();
        assert_eq!(
            back.slots[7].key_offset_sector,
            h.slots[7].key_offset_sector
        );
        assert_eq!(back.spec().unwrap().key_bytes, 64);
        assert!(probe(&encode(&h)));
        assert!(!probe(b"LUKS\xba\xbe\0\x02"));
    }

    #[test]
    fn corruptions_have_qemus_messages() {
        let corrupt = |f: &dyn Fn(&mut Header)| {
            let mut h = qemu_like();
            f(&mut h);
            parse(&encode(&h)).check().unwrap_err()
        };
        assert_eq!(
            corrupt(&|h| h.magic[0] = b'X'),
            "Volume is not in LUKS format"
        );
        assert_eq!(
            corrupt(&|h| h.version = 2),
            "LUKS version 2 is not supported"
        );
        assert_eq!(
            corrupt(&|h| h.hash_spec = [b'a'; 32]),
            "LUKS header hash spec is not NUL terminated"
        );
        assert_eq!(
            corrupt(&|h| h.payload_offset_sector = 2),
            "LUKS payload is overlapping with the header"
        );
        assert_eq!(
            corrupt(&|h| h.mk_iterations = 0),
            "LUKS key iteration count is zero"
        );
        assert_eq!(
            corrupt(&|h| h.slots[3].stripes = 5),
            "Keyslot 3 is corrupted (stripes 5 != 4000)"
        );
        assert_eq!(
            corrupt(&|h| h.slots[2].active = 1),
            "Keyslot 2 state (active/disable) is corrupted"
        );
        assert_eq!(
            corrupt(&|h| h.slots[0].iterations = 0),
            "Keyslot 0 iteration count is zero"
        );
        assert_eq!(
            corrupt(&|h| h.slots[0].key_offset_sector = 2),
            "Keyslot 0 is overlapping with the LUKS header"
        );
        assert_eq!(
            corrupt(&|h| h.slots[7].key_offset_sector = 4000),
            "Keyslot 7 is overlapping with the encrypted payload"
        );
        assert_eq!(
            corrupt(&|h| h.slots[5].key_offset_sector = h.slots[4].key_offset_sector),
            "Keyslots 4 and 5 are overlapping in the header"
        );
    }

    #[test]
    fn a_truncated_header_reads_as_zeroes_like_qemu() {
        // qemu reads past the end of a short file as zeroes: 300 bytes of a real header
        // leave slot 1's offset and zeroed slots 2..7, which overlap slot 0.
        let full = encode(&qemu_like());
        let mut b = [0u8; HEADER_LEN];
        b[..300].copy_from_slice(&full[..300]);
        assert_eq!(
            parse(&b).check().unwrap_err(),
            "Keyslots 0 and 2 are overlapping in the header"
        );
        assert_eq!(
            parse(&[0u8; HEADER_LEN]).check().unwrap_err(),
            "Volume is not in LUKS format"
        );
    }
}
