//! The VHDX log: metadata updates a writer (Hyper-V, qemu) logged before making them. An
//! image whose header names a log with valid entries was not closed cleanly; its last
//! sequence of entries is replayed into the file before the image is used, as qemu does on
//! a read-write open (a read-only open is refused with qemu's words).

use super::meta::{checksum, le32, le64};
use crate::file::HostFile;
use crate::{Error, Result};

const SECTOR: u64 = 4096;

/// One valid log entry: where it is, its sequence number, where its sequence starts, and
/// its bytes.
struct Entry {
    at: u64,
    sequence: u64,
    tail: u64,
    bytes: Vec<u8>,
    last_file_offset: u64,
}

/// A write the log asks for: `data` (or `len` zeroes) at `at`.
pub struct Update {
    pub at: u64,
    pub data: Option<Vec<u8>>,
    pub len: u64,
}

/// Read `len` bytes of the circular log at `pos`.
fn read_log(f: &HostFile, log_at: u64, log_len: u64, pos: u64, len: u64) -> Result<Vec<u8>> {
    let mut out = vec![0u8; len as usize];
    let mut done = 0u64;
    while done < len {
        let p = (pos + done) % log_len;
        let n = (len - done).min(log_len - p);
        f.read(
            "read log",
            log_at + p,
            &mut out[done as usize..(done + n) as usize],
        )?;
        done += n;
    }
    Ok(out)
}

fn entry_at(
    f: &HostFile,
    log_at: u64,
    log_len: u64,
    guid: &[u8; 16],
    pos: u64,
) -> Result<Option<Entry>> {
    let h = read_log(f, log_at, log_len, pos, 64)?;
    let len = u64::from(le32(&h, 8));
    let descs = u64::from(le32(&h, 24));
    let ok = &h[..4] == b"loge"
        && len >= SECTOR
        && len % SECTOR == 0
        && len <= log_len
        && h[32..48] == *guid
        && le64(&h, 16) != 0
        && (64 + 32 * descs).next_multiple_of(SECTOR) <= len;
    if !ok {
        return Ok(None);
    }
    let bytes = read_log(f, log_at, log_len, pos, len)?;
    if checksum(&bytes, 4) != le32(&bytes, 4) {
        return Ok(None);
    }
    Ok(Some(Entry {
        at: pos,
        sequence: le64(&h, 16),
        tail: u64::from(le32(&h, 12)),
        last_file_offset: le64(&h, 56),
        bytes,
    }))
}

/// The updates of the log's active sequence, in order (empty when the log holds none).
pub fn pending(
    f: &HostFile,
    log_at: u64,
    log_len: u64,
    guid: &[u8; 16],
) -> Result<(Vec<Update>, u64)> {
    let corrupt = |m: &str| f.corrupt(format!("VHDX log: {m}"));
    if log_len == 0 || !log_len.is_multiple_of(SECTOR) {
        return Err(corrupt("bad log length"));
    }
    // The newest valid entry ends the active sequence; its tail says where it starts.
    let mut newest: Option<Entry> = None;
    let mut pos = 0;
    while pos < log_len {
        if let Some(e) = entry_at(f, log_at, log_len, guid, pos)? {
            if newest.as_ref().is_none_or(|n| e.sequence > n.sequence) {
                newest = Some(e);
            }
        }
        pos += SECTOR;
    }
    let Some(last) = newest else {
        return Ok((Vec::new(), 0));
    };
    let mut seq = Vec::new();
    let mut pos = last.tail % log_len;
    loop {
        let e = entry_at(f, log_at, log_len, guid, pos)?
            .ok_or_else(|| corrupt("the active sequence has a gap"))?;
        if let Some(prev) = seq.last() {
            let prev: &Entry = prev;
            if e.sequence != prev.sequence + 1 {
                return Err(corrupt("the active sequence is out of order"));
            }
        }
        let done = e.at == last.at;
        pos = (e.at + e.bytes.len() as u64) % log_len;
        seq.push(e);
        if done {
            break;
        }
        if seq.len() as u64 > log_len / SECTOR {
            return Err(corrupt("the active sequence does not end"));
        }
    }
    let mut updates = Vec::new();
    for e in &seq {
        updates.extend(entry_updates(e).map_err(|m| corrupt(&m))?);
    }
    Ok((updates, last.last_file_offset))
}

/// The descriptors of one entry, with their data sectors.
fn entry_updates(e: &Entry) -> std::result::Result<Vec<Update>, String> {
    let b = &e.bytes;
    let count = le32(b, 24) as usize;
    let mut data_at = (64 + 32 * count as u64).next_multiple_of(SECTOR) as usize;
    let mut out = Vec::new();
    for i in 0..count {
        let d = &b[64 + i * 32..96 + i * 32];
        if le64(d, 24) != e.sequence {
            return Err(format!(
                "descriptor {i} of entry {} has another sequence",
                e.sequence
            ));
        }
        let at = le64(d, 16);
        if !at.is_multiple_of(SECTOR) {
            return Err(format!(
                "descriptor {i} writes at an unaligned offset {at:#x}"
            ));
        }
        match &d[..4] {
            b"zero" => out.push(Update {
                at,
                data: None,
                len: le64(d, 8),
            }),
            b"desc" => {
                let s = b
                    .get(data_at..data_at + SECTOR as usize)
                    .ok_or_else(|| format!("entry {} lacks a data sector", e.sequence))?;
                let ok = &s[..4] == b"data"
                    && u64::from(le32(s, 4)) == e.sequence >> 32
                    && u64::from(le32(s, 4092)) == e.sequence & 0xffff_ffff;
                if !ok {
                    return Err(format!(
                        "data sector {i} of entry {} is not its own",
                        e.sequence
                    ));
                }
                let mut sector = s.to_vec();
                sector[..8].copy_from_slice(&d[8..16]);
                sector[4092..].copy_from_slice(&d[4..8]);
                out.push(Update {
                    at,
                    data: Some(sector),
                    len: SECTOR,
                });
                data_at += SECTOR as usize;
            }
            _ => return Err(format!("descriptor {i} of entry {} is unknown", e.sequence)),
        }
    }
    Ok(out)
}

/// Apply `updates` to the file, then make sure it is as long as the log says, and sync.
pub fn replay(f: &HostFile, updates: &[Update], last_file_offset: u64) -> Result<()> {
    for u in updates {
        if u.at.saturating_add(u.len) > last_file_offset.max(f.size()?) {
            return Err(f.corrupt(format!(
                "VHDX log: an update at {:#x} lies past the file's logged end {last_file_offset:#x}",
                u.at
            )));
        }
        match &u.data {
            Some(d) => f.write("replay log", u.at, d, false)?,
            None => {
                let zero = vec![0u8; u.len.min(1 << 20) as usize];
                let mut done = 0;
                while done < u.len {
                    let n = (u.len - done).min(zero.len() as u64) as usize;
                    f.write("replay log", u.at + done, &zero[..n], false)?;
                    done += n as u64;
                }
            }
        }
    }
    if f.size()? < last_file_offset {
        f.grow_to(last_file_offset)?;
    }
    f.sync()
}

/// qemu's refusal of a read-only open that would need the log replayed.
pub fn needs_replay(f: &HostFile) -> Error {
    let p = f.path().display();
    Error::Open(format!(
        "VHDX image file '{p}' opened read-only, but contains a log that needs to be replayed\nTo replay the log, run:\nqemu-img check -r all '{p}'"
    ))
}
