//! The consistency check a read-write open runs on an image left with NEED_CHECK set (not
//! closed cleanly), as qemu's `qed_check` with fixing on: table and cluster offsets that
//! are invalid (unaligned, in the header, past the file's end: a link that reached the
//! disk before its data) are cleared and the tables written back; clusters referenced
//! twice are counted as corruption and left alone; leaked clusters are counted. When no
//! corruption is left, the fixes are synced and NEED_CHECK is cleared.

use super::header::{self, Header};
use super::{read_table, table_bytes_of};
use crate::file::HostFile;
use crate::{Error, Result};

#[derive(Debug, Default)]
pub struct Report {
    pub fixed: u64,
    pub corruptions: u64,
    pub leaks: u64,
}

/// Which clusters of the file something references.
struct Used {
    bits: Vec<u64>,
    clusters: u64,
    cluster: u64,
}

impl Used {
    /// Mark `n` clusters from `offset` used; false when any already was.
    fn mark(&mut self, offset: u64, n: u64) -> bool {
        let mut fresh = true;
        for c in offset / self.cluster..offset / self.cluster + n {
            if c >= self.clusters {
                continue;
            }
            let (w, b) = ((c / 64) as usize, c % 64);
            fresh &= self.bits[w] & (1 << b) == 0;
            self.bits[w] |= 1 << b;
        }
        fresh
    }

    fn unused_from(&self, first: u64) -> u64 {
        (first..self.clusters)
            .filter(|c| self.bits[(c / 64) as usize] & (1 << (c % 64)) == 0)
            .count() as u64
    }
}

fn io_failed(f: &HostFile, e: Error) -> Error {
    tracing::error!(path = %f.path().display(), error = %e, "QED consistency check");
    Error::Open("Image corrupted".into())
}

/// Check and repair the image whose L1 table is `l1` (written back when fixed); clears
/// NEED_CHECK in `h` and on disk when the image comes out consistent.
pub fn repair(f: &HostFile, h: &mut Header, l1: &mut [u64], file_end: u64) -> Result<Report> {
    let cluster = h.cluster();
    let clusters = file_end / cluster;
    let mut used = Used {
        bits: vec![0; clusters.div_ceil(64) as usize],
        clusters,
        cluster,
    };
    let mut r = Report::default();
    let table_size = u64::from(h.table_size);
    used.mark(h.l1_offset, table_size);
    let mut l1_fixed = false;
    for e in l1.iter_mut() {
        if *e == 0 {
            continue;
        }
        if !h.table_offset_valid(*e, file_end) {
            *e = 0;
            r.fixed += 1;
            l1_fixed = true;
            continue;
        }
        if !used.mark(*e, table_size) {
            r.corruptions += 1;
            continue;
        }
        let mut t =
            read_table(f, "read L2 table", *e, h.table_bytes()).map_err(|e| io_failed(f, e))?;
        let mut fixed = false;
        for x in t.iter_mut() {
            if *x == 0 || *x == super::ZERO_ENTRY {
                continue;
            }
            if !h.cluster_offset_valid(*x, file_end) {
                *x = 0;
                r.fixed += 1;
                fixed = true;
            } else if !used.mark(*x, 1) {
                r.corruptions += 1;
            }
        }
        if fixed {
            f.write("write L2 table", *e, &table_bytes_of(&t), false)
                .map_err(|e| io_failed(f, e))?;
        }
    }
    if l1_fixed {
        f.write("write L1 table", h.l1_offset, &table_bytes_of(l1), false)
            .map_err(|e| io_failed(f, e))?;
    }
    r.leaks = used.unused_from(u64::from(h.header_size));
    if r.corruptions == 0 {
        f.sync().map_err(|e| io_failed(f, e))?;
        h.features &= !header::F_NEED_CHECK;
        f.write("write QED header", 0, &h.bytes(), false)
            .and_then(|()| f.sync())
            .map_err(|e| io_failed(f, e))?;
    }
    Ok(r)
}
