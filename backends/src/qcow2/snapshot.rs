//! The internal snapshot table. Writes keep snapshots intact through refcounts and the COPIED
//! flag; this table is parsed so it is validated at open, and for listing/loading snapshots.

use crate::file::HostFile;
use crate::Result;

/// qemu's QCOW_MAX_SNAPSHOTS_SIZE: the table may not exceed 64 MiB.
const MAX_TABLE_BYTES: u64 = 64 << 20;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    pub id: String,
    pub name: String,
    pub l1_table_offset: u64,
    pub l1_size: u32,
    pub date_sec: u32,
    pub date_nsec: u32,
    pub vm_clock_nsec: u64,
    pub vm_state_size: u64,
    /// Guest size when the snapshot was taken (from the extra data, else the image's).
    pub disk_size: Option<u64>,
}

/// Parse `count` entries at `offset`. The table is bounded: 64 KiB entries, each at most
/// 40 + 64 KiB extra + 2 × 64 KiB strings, read in pieces.
pub fn read_table(
    f: &HostFile,
    offset: u64,
    count: u32,
    cluster_size: u64,
) -> Result<(Vec<Snapshot>, u64)> {
    let mut out = Vec::with_capacity(count.min(1024) as usize);
    let mut pos = offset;
    for i in 0..count {
        let mut fixed = [0u8; 40];
        f.read("read snapshot table", pos, &mut fixed)?;
        let be32 =
            |a: usize| u32::from_be_bytes([fixed[a], fixed[a + 1], fixed[a + 2], fixed[a + 3]]);
        let be64 = |a: usize| (u64::from(be32(a)) << 32) | u64::from(be32(a + 4));
        let l1_table_offset = be64(0);
        let l1_size = be32(8);
        let id_len = u16::from_be_bytes([fixed[12], fixed[13]]) as u64;
        let name_len = u16::from_be_bytes([fixed[14], fixed[15]]) as u64;
        let extra_len = u64::from(be32(36));
        if extra_len > 1024 {
            return Err(f.corrupt(format!("snapshot {i}: extra data too large ({extra_len})")));
        }
        if l1_table_offset % cluster_size != 0
            || u64::from(l1_size) * 8 > super::header::MAX_L1_BYTES
        {
            return Err(f.corrupt(format!("snapshot {i}: invalid L1 table")));
        }
        let var = extra_len + id_len + name_len;
        let mut rest = vec![0u8; var as usize];
        f.read("read snapshot table", pos + 40, &mut rest)?;
        let extra = &rest[..extra_len as usize];
        let mut vm_state_size = u64::from(be32(32));
        let mut disk_size = None;
        if extra.len() >= 8 {
            vm_state_size = u64::from_be_bytes(extra[..8].try_into().unwrap_or([0; 8]));
        }
        if extra.len() >= 16 {
            disk_size = Some(u64::from_be_bytes(
                extra[8..16].try_into().unwrap_or([0; 8]),
            ));
        }
        let id_end = (extra_len + id_len) as usize;
        out.push(Snapshot {
            id: String::from_utf8_lossy(&rest[extra_len as usize..id_end]).into_owned(),
            name: String::from_utf8_lossy(&rest[id_end..]).into_owned(),
            l1_table_offset,
            l1_size,
            date_sec: be32(16),
            date_nsec: be32(20),
            vm_clock_nsec: be64(24),
            vm_state_size,
            disk_size,
        });
        pos += (40 + var).div_ceil(8) * 8;
        if pos - offset > MAX_TABLE_BYTES {
            return Err(crate::Error::Header("Snapshot table is too big".into()));
        }
    }
    Ok((out, pos - offset))
}
