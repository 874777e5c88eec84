//! Power-cut states, CrashMonkey style: the qcow2 engine runs a concurrent workload (writes,
//! FUA writes, write-zeroes, discards, flushes) over an image file whose every write, length
//! change and sync is recorded in order. From the log we build the images a power cut could
//! leave — everything written before a sync, plus a random subset of the writes after it,
//! some of them torn at sector granularity — and check each with independent tools:
//! `qemu-img check` finds no corruption (leaks are allowed), and every guest write that was
//! acknowledged with FUA, or before a flush that returned, reads back (`qemu-img convert`).
//! Every other sector holds the image's initial bytes or a version some request wrote there,
//! never foreign bytes.
//!
//! `QNBD_CRASH_STATES` sets the states per variant (default 40); `QNBD_CRASH_SEED` the seed.

mod common;

use backends::file::record::{Event, Recorder};
use backends::file::{FileOptions, HostFile};
use backends::qcow2::{Qcow2, Qcow2Options};
use backends::{BlockBackend, IoFlags};
use common::{have, qemu_img, Rng};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

const SECTOR: u64 = 512;

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
    q: &Arc<Qcow2>,
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
    // Contents are Some(id) for a write's data, None for zeroes. `any_prior`: a trim after the
    // last guaranteed op may leave whatever was there.
    let last_g = ops.iter().rposition(|o| guaranteed(o));
    let mut ok: Vec<Option<u64>> = Vec::new();
    let from = match last_g {
        Some(i) => i,
        None => {
            ok.push(None); // the image starts zeroed
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
    create: &'static [&'static str],
    discard: bool,
    /// Sectors per thread stripe (ranges stay inside one) and requests per thread.
    stripe: u64,
    ops: u64,
}

fn check_states(v: &Variant, states: usize, seed: u64) -> (usize, usize) {
    let dir = tempfile::tempdir_in("/var/tmp").expect("tempdir");
    let img = dir.path().join("base.qcow2");
    let mut args: Vec<&str> = vec!["create", "-q", "-f", "qcow2"];
    args.extend_from_slice(v.create);
    let img_s = img.to_str().unwrap();
    args.push(img_s);
    args.push("4M");
    qemu_img(&args);
    let base_image = std::fs::read(&img).expect("read base");
    let rec = Arc::new(Recorder::new());
    let mut hf = HostFile::open(&img, &FileOptions::default()).expect("open");
    hf.set_recorder(rec.clone());
    let q = Arc::new(
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
        let state = dir.path().join("state.qcow2");
        build_state(&base_image, &events, base, crash, &state, &mut r);
        let check = std::process::Command::new("qemu-img")
            .args(["check", "-f", "qcow2"])
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
            "qcow2",
            "-O",
            "raw",
            state.to_str().unwrap(),
            raw.to_str().unwrap(),
        ]);
        let got = std::fs::read(&raw).expect("read converted");
        for (&s, ops) in &by_sector {
            let bytes = &got[(s * SECTOR) as usize..((s + 1) * SECTOR) as usize];
            let (ok, any_prior) = allowed(ops, guaranteed);
            let is_zero = bytes.iter().all(|&b| b == 0);
            let tag = u64::from_le_bytes(bytes[..8].try_into().unwrap());
            let matches = |c: &Option<u64>| match c {
                None => is_zero,
                Some(id) => *id == tag && bytes == sector_data(*id, s),
            };
            let fine = ok.iter().any(matches)
                || (any_prior
                    && (is_zero
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
                let bytes = &got[(s * SECTOR) as usize..((s + 1) * SECTOR) as usize];
                assert!(
                    bytes.iter().all(|&b| b == 0),
                    "{} state {n}: untouched sector {s} is not zero",
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
        stripe: 256,
        ops: 200,
        create: &["-o", "extended_l2=on,cluster_size=65536"],
        discard: false,
    });
}
