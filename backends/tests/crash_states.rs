//! Power-cut states, CrashMonkey style: the qcow2 engine (and the QED driver, with and
//! without a backing file) runs a concurrent workload (writes,
//! FUA writes, write-zeroes, discards, flushes) over an image file whose every write, length
//! change and sync is recorded in order. From the log we build the images a power cut could
//! leave — everything written before a sync, plus a random subset of the writes after it,
//! some of them torn at sector granularity — and check each with independent tools:
//! `qemu-img check` finds no corruption (leaks are allowed; a QED image is first opened
//! read-write by our driver, whose check repairs what a crash may leave, as qemu's open
//! does), and every guest write that was
//! acknowledged with FUA, or before a flush that returned, reads back (`qemu-img convert`).
//! Every other sector holds the image's initial bytes (zeroes, or the backing file's) or a
//! version some request wrote there,
//! never foreign bytes.
//!
//! `QNBD_CRASH_STATES` sets the states per variant (default 40); `QNBD_CRASH_SEED` the seed.

mod common;

use backends::file::record::{Event, Recorder};
use backends::file::{FileOptions, HostFile};
use backends::format::{BackingChoice, ImageOptions};
use backends::qcow2::{Qcow2, Qcow2Options};
use backends::{BlockBackend, IoFlags};
use common::{have, qemu_img, Rng};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

const SECTOR: u64 = 512;
/// The content id of a sector's initial bytes (zeroes, or the backing file's).
const INITIAL: u64 = 0;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Write,
    Zero,
    Trim,
}

/// One guest request on a range of sectors.
#[derive(Clone, Debug)]
struct Op {
    id: u64,
    kind: Kind,
    sector: u64,
    count: u64,
    fua: bool,
    /// Log positions of the request's start and acknowledgement marks.
    start: usize,
    ack: usize,
}

#[derive(Clone, Debug)]
struct Flush {
    start: usize,
    done: usize,
}

/// The bytes write `id` puts in `sector`: a tag, then a fill derived from it.
fn sector_data(id: u64, sector: u64) -> [u8; SECTOR as usize] {
    let mut b = [0u8; SECTOR as usize];
    b[..8].copy_from_slice(&id.to_le_bytes());
    b[8..16].copy_from_slice(&sector.to_le_bytes());
    let mut x = id.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ sector;
    for chunk in b[16..].chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    b
}

struct Workload {
    ops: Vec<Op>,
    flushes: Vec<Flush>,
}

/// `threads` workers, each on its own stripes of `stripe` sectors (so requests in flight
/// never overlap, while neighbouring ones share clusters and L2 tables).
fn run_workload(
    q: &Arc<dyn BlockBackend>,
    rec: &Arc<Recorder>,
    seed: u64,
    (threads, per, stripe): (u64, u64, u64),
) -> Workload {
    let sectors = q.size() / SECTOR;
    let out = Arc::new(Mutex::new(Workload {
        ops: Vec::new(),
        flushes: Vec::new(),
    }));
    std::thread::scope(|s| {
        for t in 0..threads {
            let (q, rec, out) = (q.clone(), rec.clone(), out.clone());
            s.spawn(move || {
                let mut r = Rng::new(seed * 1000 + t);
                for k in 0..per {
                    let id = (t << 32) | (k + 1);
                    let roll = r.below(100);
                    if roll < 8 {
                        let start = rec.mark(id);
                        q.flush().expect("flush");
                        let done = rec.mark(id);
                        out.lock().flushes.push(Flush { start, done });
                        continue;
                    }
                    // Ranges inside one of this thread's stripes, mostly small.
                    let stripes = sectors / stripe;
                    let at = (r.below(stripes / threads) * threads + t) * stripe;
                    let first = r.below(stripe);
                    let most = if r.below(4) == 0 { stripe } else { 16 };
                    let count = 1 + r.below((stripe - first).min(most));
                    let sector = at + first;
                    let (kind, fua) = match roll {
                        8..=17 => (Kind::Zero, r.below(4) == 0),
                        18..=23 => (Kind::Trim, false),
                        _ => (Kind::Write, r.below(5) == 0),
                    };
                    let flags = if fua { IoFlags::FUA } else { IoFlags::empty() };
                    let start = rec.mark(id);
                    match kind {
                        Kind::Write => {
                            let mut data = Vec::with_capacity((count * SECTOR) as usize);
                            for s in sector..sector + count {
                                data.extend_from_slice(&sector_data(id, s));
                            }
                            q.write(sector * SECTOR, &data, flags).expect("write");
                        }
                        Kind::Zero => {
                            let f = flags
                                | if r.below(2) == 0 {
                                    IoFlags::MAY_TRIM
                                } else {
                                    IoFlags::empty()
                                };
                            q.write_zeroes(sector * SECTOR, count * SECTOR, f)
                                .expect("zero");
                        }
                        Kind::Trim => q
                            .trim(sector * SECTOR, count * SECTOR, flags)
                            .expect("trim"),
                    }
                    let ack = rec.mark(id);
                    out.lock().ops.push(Op {
                        id,
                        kind,
                        sector,
                        count,
                        fua,
                        start,
                        ack,
                    });
                }
            });
        }
    });
    let mut w = std::mem::replace(
        &mut *out.lock(),
        Workload {
            ops: vec![],
            flushes: vec![],
        },
    );
    w.ops.sort_by_key(|o| o.start);
    w
}

/// What a sector may hold in a crash state.
fn allowed(ops: &[&Op], guaranteed: impl Fn(&Op) -> bool) -> (Vec<Option<u64>>, bool) {
    // Contents are Some(id) for a write's data (Some(INITIAL) for the initial bytes), None
    // for zeroes. `any_prior`: a trim after the last guaranteed op may leave whatever was
    // there.
    let last_g = ops.iter().rposition(|o| guaranteed(o));
    let mut ok: Vec<Option<u64>> = Vec::new();
    let from = match last_g {
        Some(i) => i,
        None => {
            ok.push(Some(INITIAL));
            0
        }
    };
    let mut any_prior = last_g.is_none();
    for (n, o) in ops.iter().enumerate().skip(from) {
        match o.kind {
            Kind::Write => ok.push(Some(o.id)),
            Kind::Zero => ok.push(None),
            Kind::Trim => {
                ok.push(None);
                if n == from {
                    any_prior = true;
                }
            }
        }
    }
    (ok, any_prior)
}

struct Variant {
    name: &'static str,
    /// "qcow2" or "qed".
    format: &'static str,
    /// Over a raw backing file with data in every sector.
    backing: bool,
    create: &'static [&'static str],
    discard: bool,
    /// Sectors per thread stripe (ranges stay inside one) and requests per thread.
    stripe: u64,
    ops: u64,
}

/// What the backing file holds in `sector`: neither zeroes nor any write's data.
fn backing_data(sector: u64) -> [u8; SECTOR as usize] {
    let mut b = [0xbau8; SECTOR as usize];
    b[..8].copy_from_slice(&sector.to_le_bytes());
    b
}

const DISK: u64 = 4 << 20;

/// Create the variant's image in `dir`; its path and the disk's initial bytes.
fn create_image(v: &Variant, dir: &Path) -> (std::path::PathBuf, Vec<u8>) {
    let img = dir.join(format!("base.{}", v.format));
    let mut initial = vec![0u8; DISK as usize];
    let base = dir.join("backing.raw");
    let mut args: Vec<&str> = vec!["create", "-q", "-f", v.format];
    if v.backing {
        for (s, chunk) in initial.chunks_mut(SECTOR as usize).enumerate() {
            chunk.copy_from_slice(&backing_data(s as u64));
        }
        std::fs::write(&base, &initial).expect("write backing file");
        args.extend(["-b", base.to_str().unwrap(), "-F", "raw"]);
    }
    args.extend_from_slice(v.create);
    args.extend([img.to_str().unwrap(), "4M"]);
    qemu_img(&args);
    (img, initial)
}

fn open_raw(path: &Path, _fmt: Option<&str>) -> backends::Result<Arc<dyn BlockBackend>> {
    let opts = ImageOptions {
        path: path.to_path_buf(),
        format: Some(backends::open::Format::raw()),
        read_only: true,
        ..Default::default()
    };
    Ok(backends::open::open_image(&opts)?.backend)
}

/// Open the variant's image on `hf` with our driver.
fn open_image(v: &Variant, img: &Path, hf: HostFile, backing: bool) -> Arc<dyn BlockBackend> {
    if v.format == "qcow2" {
        return Arc::new(
            Qcow2::open_file(
                hf,
                Qcow2Options {
                    discard: v.discard,
                    ..Default::default()
                },
                &|_, _| panic!("no backing"),
            )
            .expect("open qcow2"),
        );
    }
    let opts = ImageOptions {
        path: img.to_path_buf(),
        backing: if backing {
            BackingChoice::FromHeader
        } else {
            BackingChoice::None
        },
        ..Default::default()
    };
    (backends::qed::DRIVER.open)(hf, &opts, &open_raw).expect("open qed")
}

/// A QED state as the next read-write open leaves it: checked and repaired (NEED_CHECK
/// set by a crash), then closed cleanly.
fn repair(v: &Variant, state: &Path) {
    if v.format != "qed" {
        return;
    }
    let hf = HostFile::open(state, &FileOptions::default()).expect("open state");
    let q = open_image(v, state, hf, false);
    q.close().expect("close repaired state");
}

fn check_states(v: &Variant, states: usize, seed: u64) -> (usize, usize) {
    let dir = tempfile::tempdir_in("/var/tmp").expect("tempdir");
    let (img, initial) = create_image(v, dir.path());
    let base_image = std::fs::read(&img).expect("read base");
    let rec = Arc::new(Recorder::new());
    let mut hf = HostFile::open(&img, &FileOptions::default()).expect("open");
    hf.set_recorder(rec.clone());
    let q = open_image(v, &img, hf, true);
    let w = run_workload(&q, &rec, seed, (3, v.ops, v.stripe));
    let q_sectors = q.size() / SECTOR;
    drop(q);
    let events = rec.events();
    let sync_count = events
        .iter()
        .filter(|e| matches!(e, Event::SyncDone(_)))
        .count();
    assert!(
        sync_count > 10,
        "{}: only {sync_count} syncs recorded",
        v.name
    );
    let mut by_sector: HashMap<u64, Vec<&Op>> = HashMap::new();
    for o in &w.ops {
        for s in o.sector..o.sector + o.count {
            by_sector.entry(s).or_default().push(o);
        }
    }
    let mut r = Rng::new(seed ^ 0xc4a5);
    let mut checked = 0;
    for n in 0..states {
        // The crash point: half spread evenly over the log, half at random.
        let half = (states / 2).max(1);
        let crash = if n < half {
            (n + 1) * events.len() / half
        } else {
            1 + r.below(events.len() as u64) as usize
        }
        .min(events.len());
        // Durable: everything logged before the start of the last sync that completed.
        let base = durable_prefix(&events[..crash]);
        let state = dir.path().join(format!("state.{}", v.format));
        build_state(&base_image, &events, base, crash, &state, &mut r);
        repair(v, &state);
        let check = std::process::Command::new("qemu-img")
            .args(["check", "-f", v.format])
            .arg(&state)
            .output()
            .expect("qemu-img check");
        let code = check.status.code().unwrap_or(-1);
        let text = String::from_utf8_lossy(&check.stdout).to_string()
            + &String::from_utf8_lossy(&check.stderr);
        if code != 0 && code != 3 {
            keep_failure(&state, v.name, n);
            panic!(
                "{} state {n} (crash at {crash}, durable to {base}): qemu-img check exit {code}:\n{text}",
                v.name
            );
        }
        // Writes acknowledged with FUA, or before a flush that returned, before the crash.
        let covered_before = w
            .flushes
            .iter()
            .filter(|f| f.done < crash)
            .map(|f| f.start)
            .max();
        let guaranteed =
            |o: &Op| (o.fua && o.ack < crash) || covered_before.is_some_and(|fs| o.ack < fs);
        let raw = dir.path().join("state.raw");
        qemu_img(&[
            "convert",
            "-f",
            v.format,
            "-O",
            "raw",
            state.to_str().unwrap(),
            raw.to_str().unwrap(),
        ]);
        let got = std::fs::read(&raw).expect("read converted");
        for (&s, ops) in &by_sector {
            let range = (s * SECTOR) as usize..((s + 1) * SECTOR) as usize;
            let bytes = &got[range.clone()];
            let (ok, any_prior) = allowed(ops, guaranteed);
            let is_zero = bytes.iter().all(|&b| b == 0);
            let is_initial = bytes == &initial[range];
            let tag = u64::from_le_bytes(bytes[..8].try_into().unwrap());
            let matches = |c: &Option<u64>| match c {
                None => is_zero,
                Some(INITIAL) => is_initial,
                Some(id) => *id == tag && bytes == sector_data(*id, s),
            };
            let fine = ok.iter().any(matches)
                || (any_prior
                    && (is_zero
                        || is_initial
                        || ops
                            .iter()
                            .any(|o| o.kind == Kind::Write && matches(&Some(o.id)))));
            if !fine {
                keep_failure(&state, v.name, n);
                panic!(
                    "{} state {n} (crash at {crash}, durable to {base}): sector {s} holds {} (tag {tag:#x}); allowed {ok:?} any_prior={any_prior}; ops {:?}",
                    v.name,
                    if is_zero { "zeroes" } else { "data" },
                    ops.iter().map(|o| (o.id, o.kind, o.fua, o.start, o.ack)).collect::<Vec<_>>()
                );
            }
        }
        for s in 0..q_sectors {
            if !by_sector.contains_key(&s) {
                let range = (s * SECTOR) as usize..((s + 1) * SECTOR) as usize;
                assert!(
                    got[range.clone()] == initial[range],
                    "{} state {n}: untouched sector {s} does not hold its initial bytes",
                    v.name
                );
            }
        }
        checked += 1;
    }
    (checked, sync_count)
}

/// Where the durable part of a log ends: the latest start of a sync that completed in it.
fn durable_prefix(events: &[Event]) -> usize {
    events
        .iter()
        .filter_map(|e| match e {
            Event::SyncDone(id) => Some(*id as usize),
            _ => None,
        })
        .max()
        .unwrap_or(0)
}

/// Apply every change logged before `at`, then a random subset of those in `[at, end)`,
/// some torn (only some of their sectors land).
fn build_state(base: &[u8], events: &[Event], at: usize, end: usize, out: &Path, r: &mut Rng) {
    let f = std::fs::File::create(out).expect("create state");
    f.write_all_at(base, 0).expect("write base");
    let keep = r.below(101);
    for (i, e) in events[..end].iter().enumerate() {
        let optional = i >= at;
        if optional && r.below(100) >= keep {
            continue;
        }
        match e {
            Event::Write { offset, data } => {
                if optional && r.below(8) == 0 && data.len() > 512 {
                    // Torn: each sector lands or not.
                    for (k, chunk) in data.chunks(512).enumerate() {
                        if r.below(2) == 0 {
                            f.write_all_at(chunk, offset + (k * 512) as u64)
                                .expect("write");
                        }
                    }
                } else {
                    f.write_all_at(data, *offset).expect("write");
                }
            }
            Event::Zero { offset, len } => f
                .write_all_at(&vec![0u8; *len as usize], *offset)
                .expect("zero"),
            Event::SetLen(len) => {
                let cur = f.metadata().expect("stat").len();
                f.set_len(cur.max(*len)).expect("set_len");
            }
            Event::Sync(_) | Event::SyncDone(_) | Event::Mark(_) => {}
        }
    }
}

fn keep_failure(state: &Path, name: &str, n: usize) {
    let keep = std::env::temp_dir().join(format!("qnbd-crash-{name}-{n}.qcow2"));
    let _ = std::fs::copy(state, &keep);
    eprintln!("kept the failing state as {}", keep.display());
}

fn states_per_variant() -> usize {
    std::env::var("QNBD_CRASH_STATES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(40)
}

fn seed() -> u64 {
    std::env::var("QNBD_CRASH_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
}

fn run_variant(v: Variant) {
    if !have("qemu-img") {
        return;
    }
    let (n, syncs) = check_states(&v, states_per_variant(), seed());
    eprintln!(
        "crash states: {}: {n} states from {syncs} syncs, 0 lost, 0 corrupt",
        v.name
    );
}

#[test]
fn power_cut_states_64k_clusters() {
    run_variant(Variant {
        name: "64k",
        format: "qcow2",
        backing: false,
        stripe: 256,
        ops: 200,
        create: &[],
        discard: true,
    });
}

#[test]
fn power_cut_states_4k_clusters() {
    run_variant(Variant {
        name: "4k",
        format: "qcow2",
        backing: false,
        stripe: 64,
        ops: 200,
        create: &["-o", "cluster_size=4096"],
        discard: true,
    });
}

#[test]
fn power_cut_states_512_byte_clusters_grow_the_refcount_table() {
    run_variant(Variant {
        name: "512",
        format: "qcow2",
        backing: false,
        stripe: 32,
        ops: 250,
        create: &["-o", "cluster_size=512,refcount_bits=64"],
        discard: true,
    });
}

#[test]
fn power_cut_states_extended_l2() {
    run_variant(Variant {
        name: "extl2",
        format: "qcow2",
        backing: false,
        stripe: 256,
        ops: 200,
        create: &["-o", "extended_l2=on,cluster_size=65536"],
        discard: false,
    });
}

/// Without a backing file a link may reach the disk before its cluster: NEED_CHECK is set
/// first, and the repair on the next open clears what points past the file's end.
#[test]
fn power_cut_states_qed() {
    run_variant(Variant {
        name: "qed",
        format: "qed",
        backing: false,
        stripe: 256,
        ops: 200,
        create: &[],
        discard: false,
    });
}

/// Over a backing file a new cluster's other bytes are the backing file's: they must be on
/// disk before the cluster is linked, or a crash shows zeroes in their place.
#[test]
fn power_cut_states_qed_4k_clusters_over_a_backing_file() {
    run_variant(Variant {
        name: "qed-backing",
        format: "qed",
        backing: true,
        stripe: 64,
        ops: 200,
        create: &["-o", "cluster_size=4096"],
        discard: false,
    });
}
