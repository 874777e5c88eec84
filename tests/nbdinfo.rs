//! nbdinfo (libnbd) against qnbd: listing, JSON, and block-status maps equal to qemu-nbd's.

mod common;
use common::*;
use std::process::Command;

const MIB: u64 = 1 << 20;

#[test]
fn list_shows_name_and_description() {
    if !have("nbdinfo") {
        return;
    }
    let dir = tmpdir();
    let img = make_raw(dir.path(), "l.raw", 2 * MIB, &[]);
    let s = Server::unix(
        QNBD,
        &[
            "-f",
            "raw",
            "-t",
            "-x",
            "disk0",
            "-D",
            "my description",
            img.to_str().unwrap(),
        ],
    );
    let out = ok(Command::new("nbdinfo").args(["--list", &s.uri()]));
    assert!(out.contains("export=\"disk0\""), "{out}");
    assert!(out.contains("description: my description"), "{out}");
    assert!(out.contains("export-size: 2097152"), "{out}");
}

#[test]
fn json_reports_size_and_capabilities() {
    if !have("nbdinfo") {
        return;
    }
    let dir = tmpdir();
    let img = make_raw(dir.path(), "j.raw", 3 * MIB, &[]);
    let s = Server::unix(QNBD, &["-f", "raw", "-t", img.to_str().unwrap()]);
    let out = ok(Command::new("nbdinfo").args(["--json", &s.uri()]));
    for want in [
        "\"export-size\": 3145728",
        "\"can_trim\": true",
        "\"can_flush\": true",
        "\"is_read_only\": false",
    ] {
        assert!(out.contains(want), "missing {want} in {out}");
    }
    let s = Server::unix(QNBD, &["-f", "raw", "-t", "-r", img.to_str().unwrap()]);
    let out = ok(Command::new("nbdinfo").args(["--json", &s.uri()]));
    assert!(out.contains("\"is_read_only\": true"), "{out}");
}

#[test]
fn map_matches_qemu_nbd_on_a_sparse_image() {
    if !have("nbdinfo") || !have("qemu-nbd") {
        return;
    }
    let dir = tmpdir();
    let img = make_raw(
        dir.path(),
        "sparse.raw",
        32 * MIB,
        &[
            (0, &[1; 4096]),
            (MIB, &[2; 65536]),
            (5 * MIB + 4096, &[3; 300_000]),
            (32 * MIB - 512, &[4; 512]),
        ],
    );
    let mut maps = Vec::new();
    for bin in [QNBD, "qemu-nbd"] {
        let s = Server::unix(bin, &["-f", "raw", "-t", "-r", "-A", img.to_str().unwrap()]);
        let base = ok(Command::new("nbdinfo").args(["--map", &s.uri()]));
        let depth = ok(Command::new("nbdinfo").args(["--map=qemu:allocation-depth", &s.uri()]));
        maps.push((base, depth));
    }
    assert_eq!(maps[0].0, maps[1].0, "base:allocation: qnbd vs qemu-nbd");
    assert_eq!(
        maps[0].1, maps[1].1,
        "qemu:allocation-depth: qnbd vs qemu-nbd"
    );
}

/// A probed raw image is restricted to whole sectors, as qemu does to protect its first
/// sector: the minimum block size is 512 without `-f`, 1 with `-f raw`, as qemu-nbd says.
#[test]
fn block_sizes_of_probed_and_named_raw_equal_qemu_nbds() {
    if !have("nbdinfo") || !have("qemu-nbd") {
        return;
    }
    let dir = tmpdir();
    let img = make_raw(dir.path(), "odd.img", 0, &[(0, &[7u8; 1000])]);
    let field = |bin: &str, fmt: &[&str]| {
        let mut args = vec!["-t"];
        args.extend_from_slice(fmt);
        args.push(img.to_str().unwrap());
        let s = Server::unix(bin, &args);
        let json = ok(Command::new("nbdinfo").args(["--json", &s.uri()]));
        json.lines()
            .filter(|l| l.contains("block_size_") || l.contains("\"export-size\""))
            .map(|l| l.trim().to_string())
            .collect::<Vec<_>>()
    };
    for fmt in [&[][..], &["-f", "raw"][..]] {
        let ours = field(QNBD, fmt);
        assert_eq!(ours, field("qemu-nbd", fmt), "{fmt:?}");
        let min = if fmt.is_empty() { "512" } else { "1" };
        assert!(
            ours.iter()
                .any(|l| l == &format!("\"block_size_minimum\": {min},")),
            "{fmt:?}: {ours:?}"
        );
    }
}
