//! Parallels images (`.hdd`, qemu's `parallels` driver), read and written: a 64-byte header,
//! a block allocation table (BAT) of 32-bit entries, clusters of `tracks` sectors (1 MiB by
//! default). An entry is a cluster's place in the file in sectors (or, with the
//! `WithouFreSpacExt` magic, in clusters); 0 is a cluster that reads as zeroes (or from a
//! backing file given with `--image-opts`).
//!
//! # The write path's rules
//!
//! **Locks** (in this order): a guest-cluster *stripe* (reads and in-place writes share it;
//! allocating or dropping the cluster holds it exclusively, from the look-up to the BAT
//! entry in memory), the flush *gate*, the *allocation state* (the BAT's dirty entries, the
//! file's end, the free clusters; held for memory only, and for the file's growth by a new
//! cluster, so that growths never cross).
//!
//! **Order on disk**: a new cluster's data (and its zeroes or backing bytes) is written
//! before its BAT entry changes in memory; a flush syncs the file, then writes the dirty BAT
//! entries it copied at its start, then syncs again. So no entry on disk ever points at data
//! that was not durable first. A dropped cluster (discard, zeroing) is punched at once, but
//! reused only after the flush that made its zeroed entry durable: before that, a crash
//! would find the old entry pointing at another cluster's bytes. Writes go to new clusters
//! at the file's end or to such freed ones, which are zeroed first (a cluster past the file's
//! end already reads as zeroes).
//!
//! **inuse**: a read-write open sets the header's `inuse` mark (synced before any write)
//! and a clean close clears it after the last flush, then cuts the file at the end of its
//! data, as qemu does. A read-write open of an image left in use repairs it first, with
//! qemu's messages: entries outside the file dropped, duplicate ones copied to a cluster of
//! their own, a bad `data_off` rewritten. A read-only open reads it as it is.
//!
//! Unlike qemu (which punches and reuses a discarded cluster at once, and reuses the holes
//! of earlier sessions), only clusters freed in this session are reused; the rest is appended.

mod header;

use crate::extent::for_each_unit;
use crate::file::HostFile;
use crate::format::{BackingChoice, Driver, ImageOptions, OpenBacking};
use crate::{backing, BlockBackend, Caps, Error, Extent, ExtentFlags, Extents, IoFlags, Result};
use header::Header;
use parking_lot::{Mutex, RwLock};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;

pub static DRIVER: Driver = Driver {
    name: "parallels",
    probe: header::probe,
    open,
    option,
    has_metadata: true,
};

const STRIPES: usize = 256;

/// `--image-opts` keys: qemu's preallocation options are checked (the file grows by the
/// cluster here), and a backing file may be given.
fn option(key: &str, v: &str, opts: &mut ImageOptions) -> Option<std::result::Result<(), String>> {
    if let Some(r) = crate::format::backing_option(key, v, opts) {
        return Some(r);
    }
    Some(match key {
        "prealloc-mode" => match v {
            "falloc" | "truncate" => Ok(()),
            _ => Err(format!("invalid parameter value: {v}")),
        },
        "prealloc-size" => crate::format::parse_size(key, v).map(|_| ()),
        _ => return None,
    })
}

/// What a writer changes, under one lock.
#[derive(Debug, Default)]
struct Alloc {
    /// BAT entries changed in memory since they were last written: index → value.
    dirty: BTreeMap<u32, u32>,
    /// Where the next appended cluster goes (bytes): past every cluster in use.
    data_end: u64,
    /// Bytes at or past this are known to read as zeroes (past the file's end as it was).
    zero_from: u64,
    /// Clusters dropped whose zeroed entry is not on disk yet.
    pending_free: Vec<u64>,
    /// Clusters free to reuse (their drop is durable).
    free: Vec<u64>,
}

#[derive(Debug)]
pub struct Parallels {
    f: HostFile,
    size: u64,
    cluster: u64,
    /// Bytes per unit of a BAT entry.
    unit: u64,
    read_only: bool,
    discard: bool,
    /// Where the data area starts (bytes).
    data_start: u64,
    bat: Vec<AtomicU32>,
    stripes: Box<[RwLock<()>]>,
    gate: Mutex<()>,
    alloc: Mutex<Alloc>,
    backing: Option<Arc<dyn BlockBackend>>,
    closed: AtomicBool,
}

fn open(
    f: HostFile,
    opts: &ImageOptions,
    open_backing: &OpenBacking<'_>,
) -> Result<Arc<dyn BlockBackend>> {
    let file_len = f.size()?;
    let mut head = [0u8; header::HEADER_SIZE as usize];
    let n = head.len().min(file_len as usize);
    f.read("read header", 0, &mut head[..n])?;
    let h = header::parse(&head[..n])?;
    let bat_end = header::HEADER_SIZE + 4 * u64::from(h.bat_entries);
    // A BAT past the file's end is damaged or hostile: refuse it before sizing memory by it.
    if bat_end > file_len {
        return Err(f.corrupt(format!(
            "the BAT ({} entries) lies past the end of the file",
            h.bat_entries
        )));
    }
    let mut raw = vec![0u8; 4 * h.bat_entries as usize];
    f.read("read BAT", header::HEADER_SIZE, &mut raw)?;
    let bat = raw
        .chunks_exact(4)
        .map(|c| AtomicU32::new(u32::from_le_bytes([c[0], c[1], c[2], c[3]])))
        .collect();
    let read_only = opts.read_only || opts.snapshot;
    let backing = match &opts.backing {
        BackingChoice::File(p, fmt) => {
            Some(open_backing(p, fmt.as_deref()).map_err(|e| Error::Backing(Box::new(e)))?)
        }
        _ => None,
    };
    if h.ext_off != 0 && !read_only {
        crate::file::lock::warn("Format Extension ignored in RW mode");
    }
    let (data_start, bad_data_off) = h.data_start(file_len);
    let p = Parallels {
        size: h.nb_sectors * 512,
        cluster: h.cluster(),
        unit: h.entry_unit(),
        read_only,
        discard: opts.discard,
        data_start,
        bat,
        stripes: (0..STRIPES).map(|_| RwLock::new(())).collect(),
        gate: Mutex::new(()),
        alloc: Mutex::new(Alloc {
            data_end: data_start,
            zero_from: file_len,
            ..Default::default()
        }),
        backing,
        closed: AtomicBool::new(read_only),
        f,
    };
    p.find_data_end();
    if !read_only {
        if let Err(e) = p.open_for_writing(&h, data_start, bad_data_off, file_len) {
            // Half repaired: leave the file as it is, with its `inuse` mark.
            p.closed.store(true, Ordering::Release);
            return Err(e);
        }
    }
    Ok(Arc::new(p))
}

impl Parallels {
    /// The file offset of a BAT entry's cluster; None for an unallocated one.
    fn host(&self, e: u32) -> Option<u64> {
        (e != 0).then(|| u64::from(e) * self.unit)
    }

    fn entry(&self, g: u64) -> Option<u64> {
        let e = self.bat.get(g as usize)?.load(Ordering::Acquire);
        self.host(e)
    }

    fn stripe(&self, g: u64) -> &RwLock<()> {
        &self.stripes[g as usize % STRIPES]
    }

    /// The end of the last cluster the BAT uses (at least the data area's start).
    fn used_end(&self) -> u64 {
        self.bat
            .iter()
            .filter_map(|e| self.host(e.load(Ordering::Relaxed)))
            .map(|h| h + self.cluster)
            .fold(self.data_start, u64::max)
    }

    fn find_data_end(&self) {
        let end = self.used_end();
        let mut a = self.alloc.lock();
        a.data_end = a.data_end.max(end);
    }

    /// Repair what qemu repairs when a writer opens an image that needs it, then mark it in
    /// use (synced before anything else is written).
    fn open_for_writing(
        &self,
        h: &Header,
        data_start: u64,
        bad_data_off: bool,
        file_len: u64,
    ) -> Result<()> {
        let unclean = h.inuse == header::INUSE_MAGIC;
        if unclean {
            eprintln!("Repairing image was not closed correctly");
        }
        if bad_data_off {
            eprintln!("Repairing data_off field has incorrect value");
            let off = h.min_data_off() as u32;
            self.f.write(
                "write header",
                header::OFF_DATA_OFF,
                &off.to_le_bytes(),
                false,
            )?;
        }
        self.drop_bad_entries(data_start, file_len)?;
        self.copy_duplicates()?;
        self.flush()?;
        self.f.write(
            "write header",
            header::OFF_INUSE,
            &header::INUSE_MAGIC.to_le_bytes(),
            false,
        )?;
        self.f.sync()
    }

    /// Entries whose cluster lies outside the file's data area: over the header or the BAT
    /// (writes there would destroy them) or wholly past the file's end (nothing to lose: it
    /// reads zeroes) are dropped, with qemu's message ("cluster N is outside image"). A last
    /// cluster the file covers only in part is kept (qemu drops it when it repairs) and the
    /// file grown over it, so every entry's cluster lies inside the file.
    fn drop_bad_entries(&self, data_start: u64, file_len: u64) -> Result<()> {
        let mut a = self.alloc.lock();
        for (i, e) in self.bat.iter().enumerate() {
            let Some(h) = self.host(e.load(Ordering::Relaxed)) else {
                continue;
            };
            if h < data_start || h >= file_len {
                eprintln!("Repairing cluster {i} is outside image");
                e.store(0, Ordering::Relaxed);
                a.dirty.insert(i as u32, 0);
            }
        }
        a.data_end = data_start;
        drop(a);
        self.find_data_end();
        self.f.grow_to(self.used_end())
    }

    /// Two entries naming one cluster: a write through either would change both. The later
    /// one gets a copy of its own (qemu's repair).
    fn copy_duplicates(&self) -> Result<()> {
        let mut seen = std::collections::HashSet::new();
        for g in 0..self.bat.len() as u64 {
            let Some(h) = self.entry(g) else { continue };
            if seen.insert(h) {
                continue;
            }
            eprintln!("Repairing duplicate offset in BAT entry {g}");
            let (to, _) = self.new_cluster()?;
            self.copy_in_pieces(to, |at, buf| self.f.read("read", h + at, buf))?;
            self.publish(g, to);
        }
        Ok(())
    }

    /// A cluster to write into: a freed one, or one appended at the end of the data (the
    /// file grown over it, under the lock, so growths never cross). Returns it and whether it
    /// already reads as zeroes.
    fn new_cluster(&self) -> Result<(u64, bool)> {
        let mut a = self.alloc.lock();
        if let Some(h) = a.free.pop() {
            return Ok((h, false));
        }
        let at = a.data_end.next_multiple_of(self.unit);
        if (at / self.unit) > u64::from(u32::MAX) {
            return Err(Error::NoSpace(format!(
                "'{}': no BAT entry can point past {at:#x}",
                self.f.path().display()
            )));
        }
        // The file covers the whole cluster before any entry can point at it: qemu (and a
        // repair) drops an entry whose cluster ends past the file.
        self.f.grow_to(at + self.cluster)?;
        a.data_end = at + self.cluster;
        Ok((at, at >= a.zero_from))
    }

    /// Point guest cluster `g` at `host` in memory (the next flush writes the entry).
    fn publish(&self, g: u64, host: u64) {
        let e = (host / self.unit) as u32;
        let mut a = self.alloc.lock();
        self.bat[g as usize].store(e, Ordering::Release);
        a.dirty.insert(g as u32, e);
    }

    fn read_backing(&self, pos: u64, buf: &mut [u8]) -> Result<()> {
        backing::read(self.backing.as_ref(), pos, buf)
    }

    fn read_cluster(&self, g: u64, in_g: u64, out: &mut [u8]) -> Result<()> {
        let _s = self.stripe(g).read();
        match self.entry(g) {
            Some(h) => self.f.read("read", h + in_g, out),
            None => self.read_backing(g * self.cluster + in_g, out),
        }
    }

    fn check_index(&self, g: u64) -> Result<()> {
        if g >= self.bat.len() as u64 {
            return Err(self.f.corrupt(format!(
                "cluster {g} is past the BAT's {} entries",
                self.bat.len()
            )));
        }
        Ok(())
    }

    /// Write part of guest cluster `g`: in place, or into a new cluster (zeroes or the
    /// backing file's bytes around the data) linked after the data is written.
    fn write_cluster(&self, g: u64, in_g: u64, data: &[u8], fua: bool) -> Result<()> {
        self.check_index(g)?;
        {
            let _s = self.stripe(g).read();
            if let Some(h) = self.entry(g) {
                let dsync = fua && !self.alloc.lock().dirty.contains_key(&(g as u32));
                self.f.write("write", h + in_g, data, dsync)?;
                return if fua && !dsync { self.flush() } else { Ok(()) };
            }
        }
        let _s = self.stripe(g).write();
        if let Some(h) = self.entry(g) {
            self.f.write("write", h + in_g, data, false)?;
        } else {
            let (to, fresh) = self.new_cluster()?;
            if let Err(e) = self.fill_new(g, to, fresh, in_g, data) {
                self.alloc.lock().free.push(to);
                return Err(e);
            }
            self.publish(g, to);
        }
        drop(_s);
        if fua {
            self.flush()?;
        }
        Ok(())
    }

    fn fill_new(&self, g: u64, to: u64, fresh: bool, in_g: u64, data: &[u8]) -> Result<()> {
        let cs = self.cluster;
        if data.len() as u64 == cs {
            return self.f.write("write", to, data, false);
        }
        if self.backing.is_some() {
            let end = in_g + data.len() as u64;
            return self.copy_in_pieces(to, |at, buf| {
                self.read_backing(g * cs + at, buf)?;
                // The part of the new data in this piece.
                let (lo, hi) = (at.max(in_g), (at + buf.len() as u64).min(end));
                if lo < hi {
                    buf[(lo - at) as usize..(hi - at) as usize]
                        .copy_from_slice(&data[(lo - in_g) as usize..(hi - in_g) as usize]);
                }
                Ok(())
            });
        }
        if !fresh {
            self.f.write_zeroes(to, cs)?;
        }
        self.f.write("write", to + in_g, data, false)
    }

    /// Fill the cluster at `to` piece by piece from `fill(offset in the cluster, piece)`: a
    /// cluster may be as large as 2 GiB.
    fn copy_in_pieces(
        &self,
        to: u64,
        mut fill: impl FnMut(u64, &mut [u8]) -> Result<()>,
    ) -> Result<()> {
        const PIECE: u64 = 1 << 20;
        let mut buf = vec![0u8; PIECE.min(self.cluster) as usize];
        let mut at = 0;
        while at < self.cluster {
            let n = PIECE.min(self.cluster - at) as usize;
            fill(at, &mut buf[..n])?;
            self.f.write("write", to + at, &buf[..n], false)?;
            at += n as u64;
        }
        Ok(())
    }

    /// Drop whole cluster `g`: its entry becomes 0 (reads zeroes), its space is punched, and
    /// it is reused once the flush that wrote the zeroed entry is done.
    fn drop_cluster(&self, g: u64) {
        let _s = self.stripe(g).write();
        let Some(h) = self.entry(g) else { return };
        {
            let mut a = self.alloc.lock();
            self.bat[g as usize].store(0, Ordering::Release);
            a.dirty.insert(g as u32, 0);
            a.pending_free.push(h);
        }
        if let Err(e) = self.f.punch_hole(h, self.cluster) {
            tracing::debug!(
                "'{}': punching cluster {h:#x}: {e}",
                self.f.path().display()
            );
        }
    }

    /// Whole clusters of `[offset, offset + len)` dropped, when there is no backing file
    /// (whose bytes a dropped cluster would show); false when that cannot be done.
    fn drop_range(&self, offset: u64, len: u64) -> bool {
        let cs = self.cluster;
        let end = offset + len;
        if self.backing.is_some()
            || !offset.is_multiple_of(cs)
            || !(end.is_multiple_of(cs) || end == self.size)
        {
            return false;
        }
        for g in offset / cs..end.div_ceil(cs) {
            self.drop_cluster(g);
        }
        true
    }

    /// Write the dirty BAT entries, after a sync makes every cluster they point to durable;
    /// then the clusters their drops freed may be reused.
    fn writeback(&self) -> Result<()> {
        let _gate = self.gate.lock();
        let (dirty, freed) = {
            let mut a = self.alloc.lock();
            (a.dirty.clone(), std::mem::take(&mut a.pending_free))
        };
        let r = self.write_entries(&dirty);
        let mut a = self.alloc.lock();
        if let Err(e) = r {
            a.pending_free.extend(freed);
            return Err(e);
        }
        for (i, v) in dirty {
            if a.dirty.get(&i) == Some(&v) {
                a.dirty.remove(&i);
            }
        }
        a.free.extend(freed);
        Ok(())
    }

    fn write_entries(&self, dirty: &BTreeMap<u32, u32>) -> Result<()> {
        self.f.sync()?;
        if dirty.is_empty() {
            return Ok(());
        }
        let mut run: Vec<u8> = Vec::new();
        let mut start = 0u32;
        let mut next = None;
        for (&i, &v) in dirty {
            if next != Some(i) {
                self.write_run(start, &run)?;
                run.clear();
                start = i;
            }
            run.extend_from_slice(&v.to_le_bytes());
            next = i.checked_add(1);
        }
        self.write_run(start, &run)?;
        self.f.sync()
    }

    fn write_run(&self, first: u32, bytes: &[u8]) -> Result<()> {
        if bytes.is_empty() {
            return Ok(());
        }
        let at = header::HEADER_SIZE + 4 * u64::from(first);
        self.f.write("write BAT", at, bytes, false)
    }

    /// qemu's close: everything flushed, `inuse` cleared, the file cut after the last cluster
    /// in use (qemu cuts at its allocation mark, which leaves dropped clusters at the end as
    /// a leak).
    fn close_image(&self) -> Result<()> {
        if self.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        self.writeback()?;
        self.f.write(
            "write header",
            header::OFF_INUSE,
            &0u32.to_le_bytes(),
            false,
        )?;
        self.f.sync()?;
        let end = self.used_end();
        if let Err(e) = self.f.truncate_to(end) {
            tracing::debug!("'{}': cutting at {end:#x}: {e}", self.f.path().display());
        }
        self.f.sync()?;
        Ok(())
    }
}

impl Drop for Parallels {
    fn drop(&mut self) {
        if let Err(e) = self.close_image() {
            tracing::error!("closing '{}': {e}", self.f.path().display());
        }
    }
}

impl BlockBackend for Parallels {
    fn size(&self) -> u64 {
        self.size
    }

    fn caps(&self) -> Caps {
        if self.read_only {
            return Caps::READ_ONLY;
        }
        Caps {
            cache: crate::Support::Emulate,
            // One state for the image: a flush covers every connection's writes.
            ..Caps::NATIVE
        }
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        for_each_unit(offset, buf.len() as u64, self.cluster, |g, in_g, n, at| {
            self.read_cluster(g, in_g, &mut buf[at as usize..(at + n) as usize])
        })
    }

    fn write(&self, offset: u64, buf: &[u8], flags: IoFlags) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        let fua = flags.contains(IoFlags::FUA);
        for_each_unit(offset, buf.len() as u64, self.cluster, |g, in_g, n, at| {
            self.write_cluster(g, in_g, &buf[at as usize..(at + n) as usize], fua)
        })
    }

    fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.writeback()
    }

    /// With `--discard=unmap`, whole clusters are dropped (qemu's pdiscard); anything else
    /// is a no-op, as qemu's.
    fn trim(&self, offset: u64, len: u64, flags: IoFlags) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        if self.discard {
            self.drop_range(offset, len);
        }
        if flags.contains(IoFlags::FUA) {
            self.flush()?;
        }
        Ok(())
    }

    /// Whole clusters are dropped (there is no zero marker: a dropped cluster reads zeroes);
    /// other pieces are written with zeroes, except where they read as zeroes already.
    /// FAST_ZERO is refused for anything but whole clusters without a backing file, as qemu
    /// refuses it.
    fn write_zeroes(&self, offset: u64, len: u64, flags: IoFlags) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        let cs = self.cluster;
        let end = offset + len;
        let whole =
            |in_g: u64, n: u64, at: u64| in_g == 0 && (n == cs || offset + at + n == self.size);
        if flags.contains(IoFlags::FAST_ZERO) {
            let aligned = offset.is_multiple_of(cs) && (end.is_multiple_of(cs) || end == self.size);
            if !aligned || self.backing.is_some() {
                return Err(Error::NotSupported("fast zero"));
            }
        }
        for_each_unit(offset, len, cs, |g, in_g, n, at| {
            if self.backing.is_none() {
                if whole(in_g, n, at) {
                    self.drop_cluster(g);
                    return Ok(());
                }
                if self.entry(g).is_none() {
                    return Ok(());
                }
            }
            self.write_cluster(g, in_g, &vec![0u8; n as usize], false)
        })?;
        if flags.contains(IoFlags::FUA) {
            self.flush()?;
        }
        Ok(())
    }

    fn block_status(&self, offset: u64, len: u64, out: &mut Extents) -> Result<()> {
        // At most 1024 clusters per call: the client asks again for the rest.
        let len = len.min(1024 * self.cluster - offset % self.cluster);
        for_each_unit(offset, len, self.cluster, |g, _, n, pos| {
            if self.entry(g).is_some() {
                out.push(Extent::new(n, ExtentFlags::empty(), 1));
                return Ok(());
            }
            backing::status(self.backing.as_ref(), offset + pos, n, out)
        })
    }

    fn format_name(&self) -> &'static str {
        "parallels"
    }

    fn close(&self) -> Result<()> {
        self.close_image()
    }
}
