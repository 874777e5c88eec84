//! qcow2 images exported over NBD: the same bytes and the same block-status map as qemu-nbd,
//! and writes from several connections leave the image `qemu-img check` clean.

mod common;
use common::*;
use std::process::Command;

#[test]
fn qcow2_chain_map_and_contents_equal_qemu_nbd() {
    if !have("qemu-img") || !have("nbdinfo") || !have("qemu-nbd") {
        return;
    }
    let dir = tmpdir();
    let d = dir.path();
    let base = make_raw(
        d,
        "base.raw",
        8 << 20,
        &[(0, &[1; 70000]), (5 << 20, &[2; 4096])],
    );
    ok(Command::new("qemu-img").current_dir(d).args([
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.raw",
        "-F",
        "raw",
        "mid.qcow2",
    ]));
    ok(Command::new("qemu-io").current_dir(d).args([
        "-f",
        "qcow2",
        "-c",
        "write -P 3 1M 128k",
        "-c",
        "write -z 6M 64k",
        "mid.qcow2",
    ]));
    ok(Command::new("qemu-img").current_dir(d).args([
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "mid.qcow2",
        "-F",
        "qcow2",
        "top.qcow2",
    ]));
    ok(Command::new("qemu-io").current_dir(d).args([
        "-f",
        "qcow2",
        "-c",
        "write -P 4 2M 4k",
        "top.qcow2",
    ]));
    let top = d.join("top.qcow2");
    let mut maps = Vec::new();
    for bin in [QNBD, "qemu-nbd"] {
        let s = Server::unix(
            bin,
            &["-f", "qcow2", "-t", "-r", "-A", top.to_str().unwrap()],
        );
        let base_map = ok(Command::new("nbdinfo").args(["--map", &s.uri()]));
        let depth_map = ok(Command::new("nbdinfo").args(["--map=qemu:allocation-depth", &s.uri()]));
        let cmp = ok(Command::new("qemu-img")
            .args(["compare", "-f", "qcow2", "-F", "raw"])
            .arg(&top)
            .arg(s.uri()));
        assert!(cmp.contains("identical"), "{bin}: {cmp}");
        maps.push((base_map, depth_map));
    }
    assert_eq!(
        maps[0].0, maps[1].0,
        "base:allocation differs from qemu-nbd's"
    );
    assert_eq!(
        maps[0].1, maps[1].1,
        "qemu:allocation-depth differs from qemu-nbd's"
    );
    let _ = base;
}

#[test]
fn writes_on_four_connections_leave_qcow2_clean() {
    if !have("qemu-img") || !have("nbdcopy") {
        return;
    }
    let dir = tmpdir();
    let d = dir.path();
    let src: Vec<u8> = (0..(6u32 << 20))
        .map(|i| (i.wrapping_mul(2654435761) >> 11) as u8)
        .collect();
    let raw = make_raw(d, "src.raw", 16 << 20, &[(4096 + 17, &src)]);
    ok(Command::new("qemu-img").current_dir(d).args([
        "create",
        "-q",
        "-f",
        "qcow2",
        "img.qcow2",
        "16M",
    ]));
    let img = d.join("img.qcow2");
    let mut s = Server::unix(
        QNBD,
        &["-f", "qcow2", "-t", "-e", "8", img.to_str().unwrap()],
    );
    ok(Command::new("nbdcopy")
        .args(["--connections=4", "--request-size=65536"])
        .arg(&raw)
        .arg(s.uri()));
    // nbdcopy does not flush by default: SIGTERM makes qnbd flush its metadata on the way out.
    assert!(s.terminate().is_some_and(|st| st.success()));
    ok(Command::new("qemu-img").args(["check", "-q"]).arg(&img));
    let cmp = ok(Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "qcow2"])
        .arg(&raw)
        .arg(&img));
    assert!(cmp.contains("identical"), "{cmp}");
}

/// With `--discard=unmap`, discarded clusters give their space back to the host file system
/// as qemu-nbd's do (the image file's allocated blocks shrink; qnbd punches them once the
/// pointers that dropped them are durable, at the flush), the image stays clean and the
/// clusters are reused by later writes. Without it a discard changes nothing, as qemu-nbd's.
#[test]
fn discarded_qcow2_clusters_give_their_space_back() {
    if !have("qemu-img") || !have("qemu-io") {
        return;
    }
    use std::os::unix::fs::MetadataExt;
    let dir = tmpdir();
    let d = dir.path();
    let blocks = |img: &std::path::Path| std::fs::metadata(img).unwrap().blocks() * 512;
    for (program, unmap) in [(QNBD, true), ("qemu-nbd", true), (QNBD, false)] {
        let img = d.join("d.qcow2");
        let _ = std::fs::remove_file(&img);
        qemu_img(d, &["create", "-q", "-f", "qcow2", "d.qcow2", "128M"]);
        qemu_io(d, "qcow2", "d.qcow2", &["write -P 1 0 64M"]);
        let before = blocks(&img);
        let mut args = vec!["-f", "qcow2", "-t"];
        if unmap {
            args.push("--discard=unmap");
        }
        args.push(img.to_str().unwrap());
        let mut s = Server::unix(program, &args);
        qemu_io(d, "raw", &s.uri(), &["discard 0 32M", "flush"]);
        let after = blocks(&img);
        if unmap {
            assert!(
                after + (30 << 20) < before,
                "{program}: {before} bytes allocated before the discard, {after} after"
            );
        } else {
            assert!(after >= before, "{program}: {before} then {after}");
        }
        let out = qemu_io(
            d,
            "raw",
            &s.uri(),
            &[
                "write -P 2 64M 16M",
                "read -P 2 64M 16M",
                "read -P 1 32M 32M",
            ],
        );
        assert!(!out.contains("verification failed"), "{program}: {out}");
        let grown = blocks(&img);
        assert!(s.terminate().is_some_and(|st| st.success()));
        check_clean(&img);
        if unmap {
            // The 16 MiB went into the punched clusters, not past the end of the file.
            assert!(grown < before, "{program}: {before} then {grown}");
            let out = qemu_io(d, "qcow2", "d.qcow2", &["read -P 0 0 32M"]);
            assert!(!out.contains("verification failed"), "{program}: {out}");
        }
    }
}

/// A v2 image has no zero flag: a discard over a backing file would show the backing file's
/// stale bytes, so it does nothing, as qemu-nbd's; without a backing file it deallocates.
#[test]
fn discard_of_a_v2_image_over_a_backing_file_keeps_the_data() {
    if !have("qemu-img") || !have("qemu-io") {
        return;
    }
    let dir = tmpdir();
    let d = dir.path();
    qemu_img(d, &["create", "-q", "-f", "raw", "b.raw", "4M"]);
    qemu_io(d, "raw", "b.raw", &["write -P 0x33 0 4M"]);
    for (backing, after) in [(true, "7"), (false, "0")] {
        let _ = std::fs::remove_file(d.join("v2.qcow2"));
        let mut args = vec!["create", "-q", "-f", "qcow2", "-o", "compat=0.10"];
        if backing {
            args.extend(["-b", "b.raw", "-F", "raw"]);
        }
        args.extend(["v2.qcow2", "4M"]);
        qemu_img(d, &args);
        let img = d.join("v2.qcow2");
        for program in [QNBD, "qemu-nbd"] {
            let s = Server::unix(
                program,
                &["-f", "qcow2", "--discard=unmap", img.to_str().unwrap()],
            );
            let out = qemu_io(
                d,
                "raw",
                &s.uri(),
                &[
                    "write -P 7 64k 128k",
                    "discard 64k 64k",
                    &format!("read -P {after} 64k 64k"),
                    "read -P 7 128k 64k",
                ],
            );
            assert!(
                !out.contains("verification failed"),
                "{program} {backing}: {out}"
            );
        }
    }
}
