//! qcow2 images of every kind qemu-img makes, exported by qnbd and by qemu-nbd side by side:
//! the same bytes and the same `nbdinfo --map`; random writes from four connections leave
//! them `qemu-img check` clean (internal snapshots intact); hostile files fail cleanly.

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

const SIZE: u64 = 8 << 20;

/// A raw source with data, runs of written zeroes and holes, so images get every kind of
/// cluster (data, zero, unallocated) and compressed ones compress.
fn source(d: &Path) -> PathBuf {
    let random: Vec<u8> = (0..(600u32 << 10))
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let text: Vec<u8> = b"qnbd qcow2 matrix "
        .iter()
        .cycle()
        .take(300 << 10)
        .cloned()
        .collect();
    make_raw(
        d,
        "src.raw",
        SIZE,
        &[
            (0, &random),
            (1 << 20, &text),
            (1 << 20 | 400 << 10, &[0u8; 200 << 10]),
            ((3 << 20) + 777, &random[..100_000]),
            (5 << 20, &[0x5a; 4096]),
            (SIZE - 4096, &[0xee; 4096]),
        ],
    )
}

/// Every image kind of the issue: (name, file).
fn images(d: &Path, src: &Path) -> Vec<(String, PathBuf)> {
    let src = src.to_str().unwrap();
    let mut out = Vec::new();
    let mut convert = |name: &str, opts: &[&str]| {
        let file = format!("{name}.qcow2");
        let mut args = vec!["convert", "-q", "-f", "raw", "-O", "qcow2"];
        args.extend_from_slice(opts);
        args.extend_from_slice(&[src, &file]);
        qemu_img(d, &args);
        out.push((name.to_string(), d.join(file)));
    };
    convert("v2", &["-o", "compat=0.10"]);
    convert("v3", &[]);
    convert("zlib", &["-c"]);
    convert("zstd", &["-c", "-o", "compression_type=zstd"]);
    convert("cluster-512", &["-o", "cluster_size=512"]);
    convert("cluster-4k", &["-o", "cluster_size=4k"]);
    convert("cluster-64k", &["-o", "cluster_size=64k"]);
    convert("cluster-2M", &["-o", "cluster_size=2M"]);
    convert("extended-l2", &["-o", "extended_l2=on,cluster_size=64k"]);
    convert("snapshot", &[]);
    // Subclusters written piecemeal: allocated, zero and unallocated ones in one cluster.
    qemu_img(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "extended_l2=on,cluster_size=64k",
            "subclusters.qcow2",
            "8M",
        ],
    );
    qemu_io(
        d,
        "qcow2",
        "subclusters.qcow2",
        &[
            "write -P 5 0 4k",
            "write -P 6 70k 3k",
            "write -z 200k 8k",
            "write -P 7 1M 64k",
            "write -z 2M 128k",
            "write -P 8 3000k 1k",
        ],
    );
    out.push(("subclusters".into(), d.join("subclusters.qcow2")));
    // An internal snapshot, then writes on top of it.
    qemu_img(d, &["snapshot", "-c", "s1", "snapshot.qcow2"]);
    qemu_io(
        d,
        "qcow2",
        "snapshot.qcow2",
        &["write -P 9 64k 128k", "write -z 1M 64k", "discard 5M 64k"],
    );
    out
}

#[test]
fn every_image_kind_reads_and_maps_like_qemu_nbd() {
    if !have("qemu-img") || !have("qemu-io") || !have("qemu-nbd") || !have("nbdinfo") {
        return;
    }
    let dir = tmpdir();
    let d = dir.path();
    let src = source(d);
    for (name, img) in images(d, &src) {
        let mut maps = Vec::new();
        for bin in [QNBD, "qemu-nbd"] {
            let s = Server::unix(bin, &["-f", "qcow2", "-t", "-r", img.to_str().unwrap()]);
            maps.push(ok(Command::new("nbdinfo").args(["--map", &s.uri()])));
            if bin == QNBD {
                let cmp = ok(Command::new("qemu-img")
                    .args(["compare", "-f", "qcow2", "-F", "raw"])
                    .arg(&img)
                    .arg(s.uri()));
                assert!(cmp.contains("identical"), "{name}: {cmp}");
            }
        }
        assert_eq!(
            maps[0], maps[1],
            "{name}: nbdinfo --map differs from qemu-nbd's"
        );
    }
}

fn identical(a: &Path, fa: &str, b: &Path, fb: &str) -> bool {
    let out = run(Command::new("qemu-img")
        .args(["compare", "-f", fa, "-F", fb])
        .arg(a)
        .arg(b));
    out.status.success()
}

/// Four connections of random writes through qnbd; returns the model of what the image
/// must now hold.
fn hammer(d: &Path, img: &Path, seed: u32) -> PathBuf {
    let model = d.join(format!("model-{seed}.raw"));
    let mut s = Server::unix(
        QNBD,
        &["-f", "qcow2", "-t", "-e", "8", img.to_str().unwrap()],
    );
    let out = nbdsh_script(
        "random_writes.py",
        &s.uri(),
        &[model.to_str().unwrap(), &seed.to_string()],
    );
    assert_eq!(out.trim(), "ok");
    assert!(s.terminate().is_some_and(|st| st.success()));
    model
}

#[test]
fn random_writes_on_four_connections_stay_clean_and_keep_snapshots() {
    if !have("qemu-img") || !have("qemu-io") || !have_nbdsh() {
        return;
    }
    let dir = tmpdir();
    let d = dir.path();
    let src = source(d);
    for (i, opts) in [
        vec!["-o", "cluster_size=64k"],
        vec!["-o", "cluster_size=4k"],
        vec!["-o", "extended_l2=on,cluster_size=64k"],
        vec!["-c"],
    ]
    .into_iter()
    .enumerate()
    {
        let img = d.join(format!("w{i}.qcow2"));
        let mut args = vec!["convert", "-q", "-f", "raw", "-O", "qcow2"];
        args.extend_from_slice(&opts);
        args.extend_from_slice(&[src.to_str().unwrap(), img.to_str().unwrap()]);
        qemu_img(d, &args);
        let model = hammer(d, &img, i as u32 + 1);
        check_clean(&img);
        assert!(
            identical(&model, "raw", &img, "qcow2"),
            "{opts:?}: image differs from the writes applied to a raw copy"
        );
    }

    // An image with an internal snapshot: the snapshot survives the writes.
    let img = d.join("snap.qcow2");
    qemu_img(
        d,
        &[
            "convert",
            "-q",
            "-f",
            "raw",
            "-O",
            "qcow2",
            src.to_str().unwrap(),
            "snap.qcow2",
        ],
    );
    qemu_img(d, &["snapshot", "-c", "before", "snap.qcow2"]);
    qemu_io(d, "qcow2", "snap.qcow2", &["write -P 3 2M 1M"]);
    let model = hammer(d, &img, 9);
    check_clean(&img);
    assert!(identical(&model, "raw", &img, "qcow2"));
    qemu_img(d, &["snapshot", "-a", "before", "snap.qcow2"]);
    check_clean(&img);
    assert!(
        identical(&src, "raw", &img, "qcow2"),
        "qemu-img snapshot -a did not restore the contents from before the writes"
    );
}

#[test]
fn hostile_qcow2_files_fail_with_the_file_named() {
    if !have("qemu-img") || !have("qemu-io") {
        return;
    }
    let dir = tmpdir();
    let d = dir.path();
    qemu_img(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4k",
            "good.qcow2",
            "8M",
        ],
    );
    qemu_io(d, "qcow2", "good.qcow2", &["write -P 1 0 1M"]);
    let good = std::fs::read(d.join("good.qcow2")).expect("read");
    let field = |at: usize, val: &[u8]| {
        let mut v = good.clone();
        v[at..at + val.len()].copy_from_slice(val);
        v
    };
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("truncated", good[..50].to_vec(), "header is truncated"),
        (
            "truncated-table",
            good[..4096].to_vec(),
            "beyond the end of the file",
        ),
        (
            "l1-beyond-eof",
            field(40, &(1u64 << 40).to_be_bytes()),
            "beyond the end of the file",
        ),
        (
            "refcount-over-header",
            field(48, &0u64.to_be_bytes()),
            "overlaps the qcow2 header",
        ),
        ("huge-size", field(24, &u64::MAX.to_be_bytes()), "too big"),
        (
            "cluster-bits-30",
            field(20, &30u32.to_be_bytes()),
            "Unsupported cluster size: 2^30",
        ),
        (
            "cluster-bits-8",
            field(20, &8u32.to_be_bytes()),
            "Unsupported cluster size: 2^8",
        ),
        (
            "l1-size",
            field(36, &u32::MAX.to_be_bytes()),
            "Active L1 table too large",
        ),
        (
            "refcount-clusters",
            field(56, &u32::MAX.to_be_bytes()),
            "Reference count table too large",
        ),
        (
            "version",
            field(4, &9u32.to_be_bytes()),
            "Unsupported qcow2 version 9",
        ),
        (
            "incompatible",
            field(72, &(1u64 << 40).to_be_bytes()),
            "Unknown incompatible feature: 10000000000",
        ),
    ];
    for (name, bytes, why) in cases {
        let path = d.join(format!("{name}.qcow2"));
        std::fs::write(&path, &bytes).expect("write");
        for probe in [false, true] {
            let mut c = Command::new(QNBD);
            if !probe {
                c.args(["-f", "qcow2"]);
            }
            let out = run(c.arg("-t").arg(&path).stdin(Stdio::null()));
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(1), "{name}: {err}");
            let want = format!("qnbd: Failed to blk_new_open '{}': ", path.display());
            assert!(err.starts_with(&want), "{name}: {err}");
            assert!(err.contains(why), "{name}: {err}");
            assert!(!err.contains("panicked"), "{name}: {err}");
            assert!(
                std::fs::read(&path).unwrap() == bytes,
                "{name}: the file was changed"
            );
        }
    }
}

#[test]
fn cache_none_opens_qcow2_with_o_direct() {
    if !have("qemu-img") || !have("qemu-io") || !have_nbdsh() {
        return;
    }
    const O_DIRECT: u32 = 0o40000;
    // tmpfs has no O_DIRECT: use a disk-backed directory.
    let dir = tempfile::Builder::new()
        .prefix("qnbd-test")
        .tempdir_in("/var/tmp")
        .expect("tempdir");
    let d = dir.path();
    let src = source(d);
    qemu_img(
        d,
        &[
            "convert",
            "-q",
            "-f",
            "raw",
            "-O",
            "qcow2",
            src.to_str().unwrap(),
            "img.qcow2",
        ],
    );
    let img = d.join("img.qcow2");
    for mode in [["--cache=none"], ["-n"]] {
        let model = d.join("model.raw");
        let mut s = Server::unix(
            QNBD,
            &[
                "-f",
                "qcow2",
                "-t",
                "-e",
                "8",
                mode[0],
                img.to_str().unwrap(),
            ],
        );
        let flags = open_flags(s.child.id(), &img);
        assert!(
            flags.iter().any(|f| f & O_DIRECT != 0),
            "{mode:?}: no O_DIRECT descriptor for the image: {flags:?}"
        );
        let out = nbdsh_script(
            "random_writes.py",
            &s.uri(),
            &[model.to_str().unwrap(), "5"],
        );
        assert_eq!(out.trim(), "ok");
        assert!(s.terminate().is_some_and(|st| st.success()));
        check_clean(&img);
        assert!(identical(&model, "raw", &img, "qcow2"), "{mode:?}");
    }
}
