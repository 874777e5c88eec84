//! qcow2 engine against qemu-img: images made by qemu-img read back as `qemu-img convert -O raw`
//! does; writes from several threads leave `qemu-img check` clean and the bytes expected.

use backends::open::{open_image, Format, ImageOptions};
use backends::{BlockBackend, ExtentFlags, Extents, IoFlags};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

mod common;
use common::{check_clean, qemu_img, Rng};

fn to_raw(img: &Path, dir: &Path) -> Vec<u8> {
    let raw = dir.join("converted.raw");
    let _ = std::fs::remove_file(&raw);
    qemu_img(&[
        "convert",
        "-O",
        "raw",
        img.to_str().unwrap(),
        raw.to_str().unwrap(),
    ]);
    std::fs::read(&raw).unwrap()
}

fn open(img: &Path, read_only: bool) -> Arc<dyn BlockBackend> {
    open_image(&ImageOptions {
        path: img.to_path_buf(),
        format: Some(Format::from_name("qcow2").unwrap()),
        read_only,
        discard: true,
        ..Default::default()
    })
    .unwrap_or_else(|e| panic!("open {img:?}: {e}"))
    .backend
}

fn read_all(b: &dyn BlockBackend) -> Vec<u8> {
    let mut buf = vec![0u8; b.size() as usize];
    // Odd-sized reads exercise unaligned pieces.
    let mut pos = 0;
    while pos < buf.len() {
        let n = (buf.len() - pos).min(1_000_003);
        b.read(pos as u64, &mut buf[pos..pos + n]).unwrap();
        pos += n;
    }
    buf
}

/// A raw file with patterned data, a few zero runs and unwritten holes.
fn pattern_raw(dir: &Path, size: usize, seed: u64) -> (PathBuf, Vec<u8>) {
    let mut rng = Rng::new(seed);
    let mut data = vec![0u8; size];
    let mut pos = 0;
    while pos < size {
        let n = (rng.below(200_000) as usize + 1).min(size - pos);
        match rng.below(3) {
            0 => {}
            1 => data[pos..pos + n].fill(rng.next() as u8 | 1),
            _ => data[pos..pos + n]
                .iter_mut()
                .for_each(|b| *b = rng.next() as u8),
        }
        pos += n;
    }
    let p = dir.join(format!("src{seed}.raw"));
    std::fs::write(&p, &data).unwrap();
    (p, data)
}

const CONFIGS: &[(&str, &[&str])] = &[
    ("v2", &["-o", "compat=0.10"]),
    ("v3", &["-o", "compat=1.1"]),
    ("zlib", &["-c"]),
    ("zstd", &["-c", "-o", "compression_type=zstd"]),
    ("extl2", &["-o", "extended_l2=on,cluster_size=64k"]),
    ("c512", &["-o", "cluster_size=512"]),
    ("c4k", &["-o", "cluster_size=4k"]),
    ("c2m", &["-o", "cluster_size=2M"]),
    ("rc1", &["-o", "refcount_bits=1,cluster_size=4k"]),
    ("rc64", &["-o", "refcount_bits=64,cluster_size=4k"]),
];

fn make(dir: &Path, name: &str, opts: &[&str], src: &Path) -> PathBuf {
    let img = dir.join(format!("{name}.qcow2"));
    let mut args = vec!["convert", "-f", "raw", "-O", "qcow2"];
    args.extend_from_slice(opts);
    args.push(src.to_str().unwrap());
    args.push(img.to_str().unwrap());
    qemu_img(&args);
    img
}

#[test]
fn images_read_like_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let (src, data) = pattern_raw(dir.path(), 6 << 20, 7);
    for (name, opts) in CONFIGS {
        let img = make(dir.path(), name, opts, &src);
        let b = open(&img, true);
        assert_eq!(b.size(), data.len() as u64, "{name}");
        assert!(read_all(&*b) == data, "{name}: contents differ");
    }
}

/// Thread `t` writes random extents inside its own quarter, in order; then all threads
/// write interleaved small pieces into the same clusters.
fn hammer(b: &Arc<dyn BlockBackend>, model: &mut [u8], seed: u64) {
    let size = model.len() as u64;
    // Phase A uses the first half, phase B the second.
    let quarter = size / 8;
    let mut plans: Vec<Vec<(u64, Vec<u8>)>> = Vec::new();
    for t in 0..4u64 {
        let mut rng = Rng::new(seed * 31 + t + 1);
        let mut plan = Vec::new();
        for _ in 0..40 {
            let len = if rng.below(4) == 0 {
                512 + rng.below(1 << 20)
            } else {
                512 + rng.below(16384)
            };
            let len = len.min(quarter - 1);
            let mut off = t * quarter + rng.below(quarter - len);
            if rng.below(2) == 0 {
                off &= !511;
            }
            let fill = if rng.below(8) == 0 {
                vec![0u8; len as usize]
            } else {
                (0..len).map(|_| rng.next() as u8).collect()
            };
            plan.push((off, fill));
        }
        // Phase B: cluster-sharing pieces, byte-disjoint between threads.
        for k in 0..64u64 {
            let base = (size / 2) + k * ((size / 2 - 4000) / 64);
            let off = base + t * 1000;
            plan.push((off, vec![(t as u8) * 50 + 1; 1000]));
        }
        plans.push(plan);
    }
    std::thread::scope(|s| {
        for plan in &plans {
            let b = b.clone();
            s.spawn(move || {
                for (off, data) in plan {
                    b.write(*off, data, IoFlags::empty()).unwrap();
                }
            });
        }
    });
    for plan in &plans {
        for (off, data) in plan.iter().take(40) {
            model[*off as usize..*off as usize + data.len()].copy_from_slice(data);
        }
    }
    for plan in &plans {
        for (off, data) in plan.iter().skip(40) {
            model[*off as usize..*off as usize + data.len()].copy_from_slice(data);
        }
    }
}

#[test]
fn threaded_writes_stay_consistent() {
    let dir = tempfile::tempdir().unwrap();
    let (src, data) = pattern_raw(dir.path(), 24 << 20, 3);
    let mut cases: Vec<(String, PathBuf, Vec<u8>)> = Vec::new();
    for (name, opts) in CONFIGS {
        cases.push((
            name.to_string(),
            make(dir.path(), name, opts, &src),
            data.clone(),
        ));
    }
    for (name, create) in [
        ("fresh64k", vec!["-o", "cluster_size=64k"]),
        ("fresh512", vec!["-o", "cluster_size=512,refcount_bits=2"]),
        ("freshext", vec!["-o", "extended_l2=on"]),
        ("freshv2", vec!["-o", "compat=0.10"]),
    ] {
        let img = dir.path().join(format!("{name}.qcow2"));
        let mut args = vec!["create", "-q", "-f", "qcow2"];
        args.extend(create);
        args.push(img.to_str().unwrap());
        args.push("24M");
        qemu_img(&args);
        cases.push((name.to_string(), img, vec![0u8; 24 << 20]));
    }
    let mut bad = Vec::new();
    for (i, (name, img, mut model)) in cases.into_iter().enumerate() {
        {
            let b = open(&img, false);
            hammer(&b, &mut model, i as u64 + 1);
            b.flush().unwrap();
            let got = read_all(&*b);
            if let Some(p) = (0..model.len()).find(|&p| got[p] != model[p]) {
                bad.push(format!("{name}: read-back differs at {p:#x}"));
                continue;
            }
        }
        check_clean(&img);
        if to_raw(&img, dir.path()) != model {
            bad.push(format!("{name}: qemu sees other bytes"));
        }
    }
    assert!(bad.is_empty(), "{bad:#?}");
}

#[test]
fn writes_keep_internal_snapshots() {
    let dir = tempfile::tempdir().unwrap();
    let (src, data) = pattern_raw(dir.path(), 8 << 20, 11);
    for (name, opts) in [
        ("snapv3", &["-o", "compat=1.1"][..]),
        ("snapext", &["-o", "extended_l2=on"][..]),
    ] {
        let img = make(dir.path(), name, opts, &src);
        qemu_img(&["snapshot", "-c", "s1", img.to_str().unwrap()]);
        let mut model = data.clone();
        {
            let b = open(&img, false);
            hammer(&b, &mut model, 5);
            b.write_zeroes(0, 1 << 20, IoFlags::MAY_TRIM).unwrap();
            model[..1 << 20].fill(0);
            b.trim(2 << 20, 1 << 20, IoFlags::empty()).unwrap();
            let mut after = vec![0u8; 1 << 20];
            b.read(2 << 20, &mut after).unwrap();
            model[2 << 20..3 << 20].copy_from_slice(&after);
        }
        check_clean(&img);
        assert!(to_raw(&img, dir.path()) == model, "{name}: active layer");
        // -l: the snapshot itself, read-only, by name.
        let snap = open_image(&ImageOptions {
            path: img.clone(),
            format: Some(Format::from_name("qcow2").unwrap()),
            read_only: true,
            load_snapshot: Some("s1".into()),
            ..Default::default()
        })
        .unwrap()
        .backend;
        assert!(read_all(&*snap) == data, "{name}: -l s1");
        drop(snap);
        qemu_img(&["snapshot", "-a", "s1", img.to_str().unwrap()]);
        check_clean(&img);
        assert!(
            to_raw(&img, dir.path()) == data,
            "{name}: snapshot s1 changed"
        );
    }
}

#[test]
fn backing_chain_of_three_with_relative_paths() {
    let dir = tempfile::tempdir().unwrap();
    let sub = dir.path().join("images");
    std::fs::create_dir(&sub).unwrap();
    let (src, _) = pattern_raw(&sub, 4 << 20, 21);
    std::fs::rename(&src, sub.join("base.raw")).unwrap();
    // Make the base shorter than the overlays: the tail reads as zeroes.
    let run = |args: &[&str]| {
        let out = Command::new("qemu-img")
            .current_dir(&sub)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.raw",
        "-F",
        "raw",
        "mid.qcow2",
        "6M",
    ]);
    let io = |img: &str, cmd: &str| {
        let out = Command::new("qemu-io")
            .current_dir(&sub)
            .args(["-c", cmd, img])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    io("mid.qcow2", "write -P 0x55 1M 64k");
    io("mid.qcow2", "write -z 2M 64k");
    run(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4k",
        "-b",
        "mid.qcow2",
        "-F",
        "qcow2",
        "top.qcow2",
    ]);
    io("top.qcow2", "write -P 0x66 1536k 8k");
    let top = sub.join("top.qcow2");
    let want = to_raw(&top, dir.path());
    let b = open(&top, false);
    assert!(read_all(&*b) == want);
    let depth_at = |off: u64| {
        let mut ext = Extents::new();
        b.block_status(off, 4096, &mut ext).unwrap();
        let e = ext.as_slice()[0];
        (e.flags, e.depth)
    };
    assert_eq!(depth_at(1536 << 10), (ExtentFlags::empty(), 1));
    assert_eq!(depth_at(1 << 20), (ExtentFlags::empty(), 2));
    assert_eq!(
        depth_at(2 << 20),
        (ExtentFlags::HOLE | ExtentFlags::ZERO, 2)
    );
    assert_eq!(depth_at(5 << 20).1, 0);
    assert_eq!(depth_at(0).1, 3);
    // Writes allocate in the top layer with COW of the rest of the cluster.
    let mut model = want.clone();
    b.write(1_000_001, &[9u8; 3000], IoFlags::empty()).unwrap();
    model[1_000_001..1_003_001].fill(9);
    b.write(5 << 20, &[7u8; 100], IoFlags::empty()).unwrap();
    model[5 << 20..(5 << 20) + 100].fill(7);
    b.flush().unwrap();
    drop(b);
    check_clean(&top);
    assert!(to_raw(&top, dir.path()) == model);
    assert!(to_raw(&sub.join("mid.qcow2"), dir.path()) != model);
}

#[test]
fn zeroes_and_discard_are_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let (src, data) = pattern_raw(dir.path(), 4 << 20, 5);
    for (name, opts) in [
        ("zv3", &["-o", "compat=1.1"][..]),
        ("zext", &["-o", "extended_l2=on"][..]),
        ("zv2", &["-o", "compat=0.10"][..]),
    ] {
        let img = make(dir.path(), name, opts, &src);
        let mut model = data.clone();
        {
            let b = open(&img, false);
            b.write_zeroes(65536, 3 * 65536, IoFlags::MAY_TRIM).unwrap();
            model[65536..4 * 65536].fill(0);
            b.write_zeroes(5 * 65536 + 100, 70_000, IoFlags::empty())
                .unwrap();
            model[5 * 65536 + 100..5 * 65536 + 70_100].fill(0);
            let mut ext = Extents::new();
            b.block_status(65536, 65536, &mut ext).unwrap();
            let e = ext.as_slice()[0];
            assert!(e.flags.contains(ExtentFlags::ZERO), "{name}: {e:?}");
            b.trim(10 * 65536, 2 * 65536, IoFlags::empty()).unwrap();
            model[10 * 65536..12 * 65536].fill(0);
            assert!(read_all(&*b) == model, "{name}");
        }
        check_clean(&img);
        assert!(to_raw(&img, dir.path()) == model, "{name}");
    }
}

#[test]
fn snapshot_overlay_leaves_image_alone() {
    let dir = tempfile::tempdir().unwrap();
    let (src, data) = pattern_raw(dir.path(), 2 << 20, 9);
    let img = make(dir.path(), "base", &[], &src);
    for (path, format) in [
        (src.clone(), Format::raw()),
        (img.clone(), Format::from_name("qcow2").unwrap()),
    ] {
        let before = std::fs::read(&path).unwrap();
        let opened = open_image(&ImageOptions {
            path: path.clone(),
            format: Some(format),
            snapshot: true,
            ..Default::default()
        })
        .unwrap();
        let b = opened.backend;
        assert!(b.caps().writable);
        b.write(4096, &[1u8; 10_000], IoFlags::empty()).unwrap();
        let mut model = data.clone();
        model[4096..14_096].fill(1);
        assert!(read_all(&*b) == model);
        let tmp = opened.temp_overlay.clone().unwrap();
        assert!(tmp.exists());
        drop(b);
        assert!(!tmp.exists());
        assert!(std::fs::read(&path).unwrap() == before);
    }
}

#[test]
fn hostile_images_fail_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let (src, _) = pattern_raw(dir.path(), 1 << 20, 13);
    let good = std::fs::read(make(dir.path(), "good", &["-o", "cluster_size=4k"], &src)).unwrap();
    let bad = dir.path().join("bad.qcow2");
    let mut variants: Vec<Vec<u8>> = Vec::new();
    for n in [0, 3, 50, 100, 104, 4095, 4096, 8192, 20000, good.len() / 2] {
        variants.push(good[..n.min(good.len())].to_vec());
    }
    let rounds: u64 = std::env::var("QNBD_FUZZ_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    let mut rng = Rng::new(
        std::env::var("QNBD_FUZZ_SEED")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(99),
    );
    for _ in 0..rounds {
        let mut v = good.clone();
        for _ in 0..1 + rng.below(4) {
            let lim = if rng.below(2) == 0 { 112 } else { 4096 * 8 };
            let at = rng.below(lim) as usize;
            v[at] ^= 1 << rng.below(8);
        }
        variants.push(v);
    }
    let field = |at: usize, val: &[u8]| {
        let mut v = good.clone();
        v[at..at + val.len()].copy_from_slice(val);
        v
    };
    variants.push(field(40, &(1u64 << 40).to_be_bytes())); // L1 beyond EOF
    variants.push(field(48, &0u64.to_be_bytes())); // refcount table over the header
    variants.push(field(24, &u64::MAX.to_be_bytes())); // huge size
    variants.push(field(20, &30u32.to_be_bytes())); // cluster_bits out of range
    variants.push(field(56, &u32::MAX.to_be_bytes()));
    variants.push(field(36, &u32::MAX.to_be_bytes()));
    let mut errors = 0;
    for v in &variants {
        std::fs::write(&bad, v).unwrap();
        for ro in [true, false] {
            let r = open_image(&ImageOptions {
                path: bad.clone(),
                format: Some(Format::from_name("qcow2").unwrap()),
                read_only: ro,
                ..Default::default()
            });
            match r {
                Err(_) => errors += 1,
                Ok(o) => {
                    let b = o.backend;
                    let mut buf = vec![0u8; 65536];
                    let size = b.size();
                    for k in 0..16u64 {
                        let off = (k * 70_001) % size.max(1);
                        let n = (size - off).min(65536) as usize;
                        let _ = b.read(off, &mut buf[..n]);
                        if !ro {
                            let _ = b.write(off, &buf[..n.min(5000)], IoFlags::empty());
                        }
                        let mut ext = Extents::new();
                        let _ = b.block_status(off, n as u64, &mut ext);
                    }
                    let _ = b.flush();
                }
            }
        }
    }
    assert!(errors > 10);
}

#[test]
fn hostile_bitmaps_fail_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let (src, _) = pattern_raw(dir.path(), 1 << 20, 21);
    let img = make(dir.path(), "bm", &["-o", "cluster_size=4k"], &src);
    for (name, extra) in [("b0", &[][..]), ("b1", &["-g", "512"][..])] {
        let mut args = vec!["bitmap", "--add"];
        args.extend_from_slice(extra);
        args.extend_from_slice(&[img.to_str().unwrap(), name]);
        qemu_img(&args);
    }
    let good = std::fs::read(&img).unwrap();
    let bad = dir.path().join("bad.qcow2");
    let mut rng = Rng::new(4242);
    // Flip bytes anywhere in the metadata: the header cluster holds the bitmaps extension,
    // the directory and tables sit in the clusters qemu-img allocated last.
    let meta_end = good.len().min(64 * 4096);
    for round in 0..200 {
        let mut v = good.clone();
        for _ in 0..1 + rng.below(3) {
            let at = if round % 2 == 0 {
                rng.below(4096) as usize
            } else {
                good.len() - 1 - rng.below((good.len() - 4096).min(meta_end) as u64) as usize
            };
            v[at] ^= 1 << rng.below(8);
        }
        std::fs::write(&bad, &v).unwrap();
        for ro in [true, false] {
            if let Ok(o) = open_image(&ImageOptions {
                path: bad.clone(),
                format: Some(Format::from_name("qcow2").unwrap()),
                read_only: ro,
                ..Default::default()
            }) {
                let b = o.backend;
                let _ = b.bitmap_check("b0");
                let mut ext = Extents::new();
                let _ = b.bitmap_status("b1", 0, b.size().min(1 << 20), &mut ext);
                if !ro {
                    let _ = b.write(4096, &[7u8; 8192], IoFlags::empty());
                }
                let _ = b.close();
            }
        }
    }
}

/// Reads of a writable v3 image without discard may be spliced from the page cache, and a
/// client may read a spliced reply's pages long after: a data cluster freed there is never
/// handed out again by this process (it stays free on disk). A cluster is freed without
/// discard when a zeroing drops an entry whose refcount is 1 but whose COPIED flag is
/// clear (here cleared by hand); with `--discard=unmap` reads copy and the cluster is reused.
#[test]
fn freed_clusters_of_spliced_images_are_not_reused() {
    let dir = tempfile::tempdir().unwrap();
    for discard in [false, true] {
        let img = dir.path().join(format!("q-{discard}.qcow2"));
        qemu_img(&["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "4M"]);
        let cs = 65536u64;
        {
            let b = open(&img, false);
            b.write(0, &vec![0x5a; cs as usize], IoFlags::FUA).unwrap();
        }
        clear_copied_flag_of_first_entry(&img);
        let was = first_data_host(&img);
        let b = open_image(&ImageOptions {
            path: img.clone(),
            format: Some(Format::from_name("qcow2").unwrap()),
            discard,
            ..Default::default()
        })
        .unwrap()
        .backend;
        // A read loads the mapping into the cache, where splicing looks for it.
        b.read(0, &mut [0u8; 512]).unwrap();
        let host = b.read_source(0, cs).map(|s| s.offset);
        assert_eq!(host.is_some(), !discard, "spliced unless discard is on");
        if let Some(h) = host {
            assert_eq!(h, was);
        }
        b.write_zeroes(0, cs, IoFlags::empty()).unwrap();
        b.flush().unwrap();
        b.flush().unwrap();
        b.write(3 * cs, &vec![0xa5; cs as usize], IoFlags::FUA)
            .unwrap();
        drop(b);
        let now = data_hosts(&img);
        assert_eq!(now.len(), 1, "{now:?}");
        if discard {
            assert_eq!(now[0], was, "the freed cluster is reused");
        } else {
            assert_ne!(now[0], was, "the freed cluster stays free");
        }
        check_clean(&img);
        let raw = to_raw(&img, dir.path());
        assert!(raw[..cs as usize].iter().all(|&x| x == 0));
        assert!(raw[3 * cs as usize..4 * cs as usize]
            .iter()
            .all(|&x| x == 0xa5));
    }
}

/// Host offsets of the data clusters, as `qemu-img map` tells them.
fn data_hosts(img: &Path) -> Vec<u64> {
    let out = qemu_img(&["map", "--output=json", img.to_str().unwrap()]);
    out.lines()
        .filter(|l| l.contains("\"data\": true"))
        .filter_map(|l| {
            let at = l.find("\"offset\": ")? + 10;
            let rest = &l[at..];
            rest[..rest.find(|c: char| !c.is_ascii_digit())?]
                .parse()
                .ok()
        })
        .collect()
}

fn first_data_host(img: &Path) -> u64 {
    data_hosts(img)[0]
}

/// Clear bit 63 (COPIED) of the first L2 entry: refcount 1, flag clear, as an image
/// another writer left could be.
fn clear_copied_flag_of_first_entry(img: &Path) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(img)
        .unwrap();
    let be = |at: u64| {
        let mut b = [0u8; 8];
        f.read_exact_at(&mut b, at).unwrap();
        u64::from_be_bytes(b)
    };
    let l1 = be(40);
    let l2 = be(l1) & 0x00ff_ffff_ffff_fe00;
    let entry = be(l2);
    assert_ne!(entry & (1 << 63), 0, "{entry:#x}");
    f.write_all_at(&(entry & !(1 << 63)).to_be_bytes(), l2)
        .unwrap();
}
