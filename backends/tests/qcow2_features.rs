//! qcow2 header features against qemu-img: lazy refcounts, persistent bitmaps, refused
//! features, the backing depth limit, fast zeroing and zero-cluster status.

mod common;
use backends::open::{open_image, Format, ImageOptions};
use backends::{BlockBackend, Error, ExtentFlags, Extents, IoFlags};
use common::{open_qcow2, run};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

/// Opened with `locking=off`, for the tests that leak the image on purpose (a simulated
/// crash keeps the file, and qemu's locks on it, open in this process).
fn open_unlocked(img: &Path, read_only: bool) -> backends::Result<Arc<dyn BlockBackend>> {
    open_image(&ImageOptions {
        path: img.to_path_buf(),
        format: Some(Format::from_name("qcow2").unwrap()),
        read_only,
        locking: backends::file::lock::Locking::Off,
        ..Default::default()
    })
    .map(|o| o.backend)
}

#[test]
fn lazy_refcounts_image_stays_clean() {
    let dir = tempfile::tempdir().unwrap();
    run(
        dir.path(),
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "lazy_refcounts=on",
            "l.qcow2",
            "8M",
        ],
    );
    let img = dir.path().join("l.qcow2");
    {
        let b = open_qcow2(&img, false).unwrap();
        b.write(12345, &[5u8; 70000], IoFlags::empty()).unwrap();
    }
    let check = run(dir.path(), "qemu-img", &["check", "l.qcow2"]);
    assert!(check.contains("No errors"), "{check}");
    let io = run(
        dir.path(),
        "qemu-io",
        &["-c", "read -P 5 12345 70000", "l.qcow2"],
    );
    assert!(!io.contains("Pattern verification failed"), "{io}");
}

#[test]
fn bitmaps_track_writes_and_are_stored_on_close() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    run(
        d,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "b.qcow2", "8M"],
    );
    run(d, "qemu-img", &["bitmap", "--add", "b.qcow2", "b0"]);
    run(
        d,
        "qemu-img",
        &["bitmap", "--add", "--disable", "b.qcow2", "b1"],
    );
    let img = d.join("b.qcow2");
    {
        // Read-only opens leave the header alone.
        let b = open_qcow2(&img, true).unwrap();
        let mut buf = [0u8; 512];
        b.read(0, &mut buf).unwrap();
        assert!(b.bitmap_check("b0").is_ok());
    }
    assert!(!run(d, "qemu-img", &["info", "b.qcow2"]).contains("in-use"));
    {
        let b = open_qcow2(&img, false).unwrap();
        // While open read-write the bitmaps are marked in use on disk.
        let info = run(d, "qemu-img", &["info", "-U", "b.qcow2"]);
        assert_eq!(info.matches("in-use").count(), 2, "{info}");
        b.write((1 << 20) + 100, &[1u8; 4096], IoFlags::empty())
            .unwrap();
        let mut ext = Extents::new();
        b.bitmap_status("b0", 0, 8 << 20, &mut ext).unwrap();
        let dirty: Vec<(u64, bool)> = ext
            .iter()
            .map(|e| (e.len, e.flags.contains(backends::ExtentFlags::DIRTY)))
            .collect();
        assert_eq!(
            dirty,
            vec![(1 << 20, false), (65536, true), ((7 << 20) - 65536, false)]
        );
        b.close().unwrap();
    }
    // Stored: consistent again, the disabled one untouched, and the image clean.
    let info = run(d, "qemu-img", &["info", "b.qcow2"]);
    assert!(
        !info.contains("in-use") && info.contains("name: b0"),
        "{info}"
    );
    let out = Command::new("qemu-img")
        .current_dir(d)
        .args(["check", "b.qcow2"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("No errors"), "{text}");
    {
        let b = open_qcow2(&img, true).unwrap();
        let mut ext = Extents::new();
        b.bitmap_status("b0", 1 << 20, 65536, &mut ext).unwrap();
        assert!(ext
            .iter()
            .all(|e| e.flags.contains(backends::ExtentFlags::DIRTY)));
        let mut ext = Extents::new();
        b.bitmap_status("b1", 1 << 20, 65536, &mut ext).unwrap();
        assert!(ext
            .iter()
            .all(|e| !e.flags.contains(backends::ExtentFlags::DIRTY)));
    }
    // A process that dies with the image open leaves the bitmaps in use: inconsistent.
    {
        let b = open_unlocked(&img, false).unwrap();
        b.write(0, &[2u8; 512], IoFlags::empty()).unwrap();
        std::mem::forget(b);
    }
    assert!(run(d, "qemu-img", &["info", "-U", "b.qcow2"]).contains("in-use"));
    let b = open_qcow2(&img, true).unwrap();
    let e = b.bitmap_check("b0").unwrap_err();
    assert!(
        matches!(&e, Error::BitmapInconsistent(n) if n == "b0"),
        "{e}"
    );
    assert_eq!(
        e.to_string(),
        "Bitmap 'b0' is inconsistent and cannot be used"
    );
}

#[test]
fn corrupt_images_open_read_only_only() {
    let dir = tempfile::tempdir().unwrap();
    run(
        dir.path(),
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "c.qcow2", "8M"],
    );
    let img = dir.path().join("c.qcow2");
    let mut bytes = std::fs::read(&img).unwrap();
    bytes[79] |= 2;
    std::fs::write(&img, &bytes).unwrap();
    assert!(open_qcow2(&img, true).is_ok());
    let e = open_qcow2(&img, false).unwrap_err();
    assert!(matches!(e, Error::CorruptReadWrite), "{e}");
}

#[test]
fn backing_chain_depth_is_limited() {
    let dir = tempfile::tempdir().unwrap();
    run(
        dir.path(),
        "qemu-img",
        &["create", "-q", "-f", "raw", "0.img", "1M"],
    );
    for i in 1..=20 {
        let (b, f) = (
            format!("{}.img", i - 1),
            if i == 1 { "raw" } else { "qcow2" },
        );
        run(
            dir.path(),
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                &b,
                "-F",
                f,
                &format!("{i}.img"),
            ],
        );
    }
    assert!(open_qcow2(&dir.path().join("10.img"), true).is_ok());
    let e = open_qcow2(&dir.path().join("20.img"), true).unwrap_err();
    assert!(
        matches!(&e, Error::Backing(inner) if matches!(**inner, Error::Backing(_))),
        "{e}"
    );
    assert!(e.to_string().contains("is deeper than 16 images"), "{e}");
    // A missing backing file names itself as qemu does.
    std::fs::remove_file(dir.path().join("0.img")).unwrap();
    let e = open_qcow2(&dir.path().join("1.img"), true).unwrap_err();
    match &e {
        Error::Backing(inner) => match &**inner {
            Error::CouldNotOpen { path, reason } => {
                assert!(path.ends_with("0.img"), "{e}");
                assert_eq!(reason, "No such file or directory");
            }
            other => panic!("{other}"),
        },
        other => panic!("{other}"),
    }
}

#[test]
fn fast_zero_and_zero_cluster_status() {
    let dir = tempfile::tempdir().unwrap();
    run(
        dir.path(),
        "qemu-img",
        &["create", "-q", "-f", "raw", "base.raw", "4M"],
    );
    run(
        dir.path(),
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x11 0 4M", "base.raw"],
    );
    for (name, opts) in [("v3.qcow2", "compat=1.1"), ("v2.qcow2", "compat=0.10")] {
        run(
            dir.path(),
            "qemu-img",
            &[
                "create", "-q", "-f", "qcow2", "-o", opts, "-b", "base.raw", "-F", "raw", name,
            ],
        );
        let b = open_qcow2(&dir.path().join(name), false).unwrap();
        let whole = b.write_zeroes(0, 65536, IoFlags::FAST_ZERO);
        let partial = b.write_zeroes(65536 + 512, 512, IoFlags::FAST_ZERO);
        assert!(
            matches!(partial, Err(Error::NotSupported(_))),
            "{name}: {partial:?}"
        );
        if name == "v3.qcow2" {
            whole.unwrap();
            let mut ext = Extents::new();
            b.block_status(0, 65536 * 2, &mut ext).unwrap();
            let e = ext.as_slice();
            assert_eq!(
                (e[0].len, e[0].flags, e[0].depth),
                (65536, ExtentFlags::HOLE | ExtentFlags::ZERO, 1)
            );
            assert_eq!((e[1].flags, e[1].depth), (ExtentFlags::empty(), 2));
        } else {
            assert!(
                matches!(whole, Err(Error::NotSupported(_))),
                "{name}: {whole:?}"
            );
            b.write_zeroes(0, 65536, IoFlags::empty()).unwrap();
        }
        let mut buf = vec![1u8; 65536 + 1024];
        b.read(0, &mut buf).unwrap();
        assert!(buf[..65536].iter().all(|&x| x == 0));
        assert!(buf[65536..].iter().all(|&x| x == 0x11));
        drop(b);
        let check = run(dir.path(), "qemu-img", &["check", name]);
        assert!(check.contains("No errors"), "{check}");
    }
}

#[test]
fn dirty_lazy_refcount_image_is_repaired() {
    let dir = tempfile::tempdir().unwrap();
    run(
        dir.path(),
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "lazy_refcounts=on,cluster_size=4k",
            "d.qcow2",
            "8M",
        ],
    );
    run(dir.path(), "qemu-img", &["snapshot", "-c", "s0", "d.qcow2"]);
    // A crash after lazy writes: qemu-io aborts with the dirty bit set.
    let _ = Command::new("qemu-io")
        .current_dir(dir.path())
        .args(["-c", "write -P 0x42 0 3M", "-c", "abort", "d.qcow2"])
        .output()
        .unwrap();
    let img = dir.path().join("d.qcow2");
    let bytes = std::fs::read(&img).unwrap();
    assert_ne!(bytes[79] & 1, 0, "qemu-io left the image clean");
    assert!(open_qcow2(&img, true).is_ok());
    {
        let b = open_qcow2(&img, false).unwrap();
        let mut buf = vec![0u8; 3 << 20];
        b.read(0, &mut buf).unwrap();
        assert!(buf.iter().all(|&x| x == 0x42));
        b.write(5 << 20, &[7u8; 10000], IoFlags::empty()).unwrap();
    }
    let check = run(dir.path(), "qemu-img", &["check", "d.qcow2"]);
    assert!(check.contains("No errors"), "{check}");
    let io = run(
        dir.path(),
        "qemu-io",
        &[
            "-c",
            "read -P 7 5M 10000",
            "-c",
            "read -P 0x42 0 3M",
            "d.qcow2",
        ],
    );
    assert!(!io.contains("verification failed"), "{io}");
}

/// Without a final flush (a crash), what is on disk is an older consistent state: at worst
/// leaked clusters, never errors.
#[test]
fn unflushed_metadata_only_leaks() {
    let dir = tempfile::tempdir().unwrap();
    for opts in ["cluster_size=512", "cluster_size=64k", "extended_l2=on"] {
        let _ = std::fs::remove_file(dir.path().join("u.qcow2"));
        run(
            dir.path(),
            "qemu-img",
            &["create", "-q", "-f", "qcow2", "-o", opts, "u.qcow2", "16M"],
        );
        run(dir.path(), "qemu-io", &["-c", "write -P 1 0 2M", "u.qcow2"]);
        run(dir.path(), "qemu-img", &["snapshot", "-c", "s", "u.qcow2"]);
        let b = open_unlocked(&dir.path().join("u.qcow2"), false).unwrap();
        for i in 0..200u64 {
            b.write(i * 40_000, &[2u8; 5000], IoFlags::empty()).unwrap();
            if i == 100 {
                b.flush().unwrap();
                b.write_zeroes(0, 1 << 20, IoFlags::MAY_TRIM).unwrap();
            }
        }
        std::mem::forget(b);
        let out = Command::new("qemu-img")
            .current_dir(dir.path())
            .args(["check", "u.qcow2"])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            matches!(out.status.code(), Some(0) | Some(3)) && !text.contains("ERROR"),
            "{opts}: {text}"
        );
    }
}

/// `settle` after every write-type request (what the ublk frontend does, since its device
/// outlives a killed server): the image left by a "killed" server (leaked, never flushed)
/// holds every settled write, and `qemu-img check` finds not even a leak.
#[test]
fn settled_writes_survive_a_killed_server() {
    let dir = tempfile::tempdir().unwrap();
    for opts in ["cluster_size=512", "cluster_size=64k", "extended_l2=on"] {
        let img = dir.path().join("s.qcow2");
        let _ = std::fs::remove_file(&img);
        run(
            dir.path(),
            "qemu-img",
            &["create", "-q", "-f", "qcow2", "-o", opts, "s.qcow2", "16M"],
        );
        let b = open_unlocked(&img, false).unwrap();
        for i in 0..200u64 {
            b.write(i * 40_000, &[(i % 250) as u8 + 1; 5000], IoFlags::empty())
                .unwrap();
            if i == 0 {
                assert!(
                    b.unsettled(),
                    "{opts}: an allocation leaves metadata to write"
                );
            }
            b.settle().unwrap();
            assert!(!b.unsettled(), "{opts}: settled");
            if i % 50 == 49 {
                // Discards queue refcount decreases: settled too, so nothing leaks.
                b.write_zeroes((i - 9) * 40_000, 10 * 40_000, IoFlags::MAY_TRIM)
                    .unwrap();
                b.settle().unwrap();
            }
        }
        // An overwrite of an allocated cluster leaves nothing to settle.
        b.write(0, &[1u8; 512], IoFlags::empty()).unwrap();
        assert!(!b.unsettled(), "{opts}: an overwrite dirties no metadata");
        std::mem::forget(b);
        let out = Command::new("qemu-img")
            .current_dir(dir.path())
            .args(["check", "s.qcow2"])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(0), "{opts}: {text}");
        let r = open_qcow2(&img, true).unwrap();
        let mut buf = vec![0u8; 5000];
        for i in 0..200u64 {
            r.read(i * 40_000, &mut buf).unwrap();
            let zeroed = i % 50 >= 40;
            let want = if zeroed { 0 } else { (i % 250) as u8 + 1 };
            assert!(buf.iter().all(|&x| x == want), "{opts}: write {i} lost");
        }
    }
}
