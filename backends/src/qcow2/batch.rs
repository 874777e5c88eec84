//! Multi-cluster requests: look up a batch of clusters under one metadata lock and issue one
//! positional read or write per run of host-contiguous, plainly allocated clusters. Stripe
//! locks are taken in index order so batched and single-cluster callers cannot deadlock.

use super::meta::Entry;
use super::{Qcow2, STRIPES};
use crate::Result;
use parking_lot::RwLockReadGuard;

/// Clusters looked up (and stripes held) at once.
const BATCH: usize = 64;

struct Piece {
    g: u64,
    in_off: u64,
    n: u64,
    /// Offset in the caller's buffer.
    at: usize,
    /// Host offset when the piece is plain data owned by this image (readable and writable
    /// in place), else None.
    host: Option<u64>,
}

impl Qcow2 {
    fn lock_stripes(&self, pieces: &[Piece]) -> Vec<RwLockReadGuard<'_, ()>> {
        let mut idx: Vec<usize> = pieces.iter().map(|p| (p.g as usize) % STRIPES).collect();
        idx.sort_unstable();
        idx.dedup();
        idx.into_iter().map(|i| self.stripes[i].read()).collect()
    }

    fn plan(&self, offset: u64, len: u64) -> Vec<Piece> {
        let mut at = 0usize;
        self.pieces(offset, len)
            .map(|(g, in_off, n)| {
                let p = Piece {
                    g,
                    in_off,
                    n,
                    at,
                    host: None,
                };
                at += n as usize;
                p
            })
            .collect()
    }

    /// Look up every piece; for a write, in-place targets are overlap-checked too.
    fn resolve(&self, batch: &mut [Piece], entries: &mut Vec<Entry>, write: bool) -> Result<()> {
        entries.clear();
        let mut m = self.meta.lock();
        for p in batch.iter_mut() {
            let e = m.entry(&self.f, &self.geo, p.g)?.unwrap_or_default();
            if self.in_place(e, self.touched_mask(p.in_off, p.n)) {
                let host = e.host() + p.in_off;
                if write {
                    self.check_data(&m, host, p.n)?;
                }
                p.host = Some(host);
            }
            entries.push(e);
        }
        Ok(())
    }

    /// Runs of pieces `[i, j)` that are contiguous on the host.
    fn runs(batch: &[Piece]) -> Vec<(usize, usize)> {
        let mut out = Vec::new();
        let mut i = 0;
        while i < batch.len() {
            let mut j = i + 1;
            if let Some(h) = batch[i].host {
                let mut next = h + batch[i].n;
                while j < batch.len() && batch[j].host == Some(next) {
                    next += batch[j].n;
                    j += 1;
                }
            }
            out.push((i, j));
            i = j;
        }
        out
    }

    pub(super) fn read_batched(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let mut plan = self.plan(offset, buf.len() as u64);
        let mut entries = Vec::with_capacity(BATCH);
        for batch in plan.chunks_mut(BATCH) {
            let _guards = self.lock_stripes(batch);
            self.resolve(batch, &mut entries, false)?;
            for (i, j) in Self::runs(batch) {
                let first = &batch[i];
                let last = &batch[j - 1];
                let dst = &mut buf[first.at..last.at + last.n as usize];
                match first.host {
                    Some(h) => self.read_data(h, dst)?,
                    None => self.read_mapped(first.g, entries[i], first.in_off, dst)?,
                }
            }
        }
        Ok(())
    }

    pub(super) fn write_batched(&self, offset: u64, buf: &[u8]) -> Result<()> {
        let mut plan = self.plan(offset, buf.len() as u64);
        let mut entries = Vec::with_capacity(BATCH);
        let mut slow = Vec::new();
        for batch in plan.chunks_mut(BATCH) {
            {
                let _guards = self.lock_stripes(batch);
                self.resolve(batch, &mut entries, true)?;
                for (i, j) in Self::runs(batch) {
                    let first = &batch[i];
                    let last = &batch[j - 1];
                    let src = &buf[first.at..last.at + last.n as usize];
                    match first.host {
                        Some(h) => self.write_data(h, src, false)?,
                        None => slow.push((first.g, first.in_off, first.at, first.n)),
                    }
                }
            }
            // Allocation takes a stripe exclusively: only after the shared ones are released.
            for (g, in_off, at, n) in slow.drain(..) {
                self.write_piece(g, in_off, &buf[at..at + n as usize])?;
            }
        }
        Ok(())
    }
}
