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
