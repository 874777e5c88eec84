//! VMDK, VDI, VHD (vpc), VHDX, QED and Parallels images through the real binary, checked by qemu's own reader: every subformat
//! `qemu-img` makes reads back byte for byte and maps as qemu-nbd maps it; writes through
//! NBD read back in qemu (`qemu-img compare`, `qemu-img check`); stream-optimized VMDKs take
//! whole grains once, as qemu's; damaged headers and descriptors get qemu-nbd's words.
//! (The concurrent verifier and the kill -9 loop over both are in `data_safety.rs`.)

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;

const SIZE: u64 = 8 << 20;

/// A raw image with data, a zero run and a hole, to convert into each subformat.
fn source(d: &Path) -> PathBuf {
    let mut data = Vec::new();
    for i in 0..(SIZE / 64) {
        data.extend_from_slice(format!("{:063}\n", i * 13).as_bytes());
    }
    data[(3 << 20)..(5 << 20)].fill(0);
    let p = d.join("src.raw");
    std::fs::write(&p, data).unwrap();
    p
}

fn convert(d: &Path, opts: &str, name: &str) -> PathBuf {
    convert_to(d, "vmdk", opts, name)
}

fn convert_to(d: &Path, fmt: &str, opts: &str, name: &str) -> PathBuf {
    let mut args = vec!["convert", "-f", "raw", "-O", fmt];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    args.extend(["src.raw", name]);
    qemu_img(d, &args);
    d.join(name)
}

/// qnbd (probing) reads `img` as `src`.
fn reads_as(src: &Path, img: &str) {
    let s = Server::unix(QNBD, &["-r", "-t", img]);
    let out = ok(Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(src)
        .arg(s.uri()));
    assert!(out.contains("Images are identical"), "{img}: {out}");
}

/// qnbd (probing) reads `img` as `src`, and maps it as qemu-nbd does.
fn reads_and_maps_as_qemu_nbd(src: &Path, img: &str, fmt: &str) {
    // A fixed VHD probes as raw, in qemu as here: it is named.
    let named = ["-r", "-t", "-f", fmt, img];
    let probed = ["-r", "-t", img];
    let mut q = Server::unix(QNBD, if fmt == "vpc" { &named } else { &probed });
    let out = ok(Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(src)
        .arg(q.uri()));
    assert!(out.contains("Images are identical"), "{img}: {out}");
    let ours = map(&q.uri());
    q.terminate();
    let s = Server::unix("qemu-nbd", &["-r", "-t", "-f", fmt, img]);
    assert_eq!(
        ours,
        map(&s.uri()),
        "{img}: block status differs from qemu-nbd's"
    );
}

/// qemu-io's output (stdout and stderr), failed commands included.
fn qemu_io_any(d: &Path, fmt: &str, target: &str, cmds: &[&str]) -> String {
    let mut c = Command::new("qemu-io");
    c.current_dir(d).args(["-f", fmt]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    let out = run(c.arg(target));
    String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr)
}

fn map(uri: &str) -> String {
    ok(Command::new("qemu-img").args(["map", "--output=json", "-f", "raw", uri]))
}

const SUBFORMATS: [&str; 6] = [
    "subformat=monolithicSparse",
    "subformat=monolithicFlat",
    "subformat=twoGbMaxExtentSparse",
    "subformat=twoGbMaxExtentFlat",
    "subformat=streamOptimized",
    "zeroed_grain=on",
];

#[test]
fn every_subformat_reads_and_maps_as_qemu_nbd_serves_it() {
    if !have("qemu-img") {
        return;
    }
    let d = tmpdir();
    let src = source(d.path());
    for (i, opts) in SUBFORMATS.iter().enumerate() {
        let img = convert(d.path(), opts, &format!("i{i}.vmdk"));
        reads_and_maps_as_qemu_nbd(&src, img.to_str().unwrap(), "vmdk");
    }
}

/// What a test writes: odd sizes and offsets, a grain's worth, zeroes, a trim (which a VMDK
/// ignores, as qemu's does), the last sector.
const WRITES: [&str; 7] = [
    "write -P 0x11 0 4k",
    "write -P 0x22 65000 70000",
    "write -P 0x33 3M 1M",
    "write -z 6M 128k",
    "write -z 1000 3000",
    "write -P 0x44 7M 512",
    "write -P 0x55 8380416 8192",
];

/// Write `WRITES` (and a trim) through qnbd into `img`, the same into a raw copy of what qemu
/// read before; qemu must then read `img` as that copy, and find it clean.
fn write_and_compare(d: &Path, img: &Path) {
    write_and_compare_as(d, img, "vmdk")
}

fn write_and_compare_as(d: &Path, img: &Path, fmt: &str) {
    let reference = d.join("ref.raw");
    ok(Command::new("qemu-img")
        .args(["convert", "-f", fmt, "-O", "raw"])
        .arg(img)
        .arg(&reference));
    let mut s = Server::unix(QNBD, &["-t", "-f", fmt, img.to_str().unwrap()]);
    let mut cmds = WRITES.to_vec();
    cmds.push("discard 1M 64k");
    qemu_io(d, "raw", &s.uri(), &cmds);
    s.terminate();
    qemu_io(d, "raw", reference.to_str().unwrap(), &WRITES);
    let out = ok(Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", fmt])
        .arg(&reference)
        .arg(img));
    assert!(
        out.contains("Images are identical"),
        "{}: {out}",
        img.display()
    );
    // qemu has no check for VHD images.
    if fmt != "vpc" {
        check_format_no_corruption(img, fmt);
    }
}

#[test]
fn writes_read_back_in_qemu_in_every_writable_subformat() {
    if !have("qemu-img") || !have("qemu-io") {
        return;
    }
    for opts in SUBFORMATS.iter().filter(|o| !o.contains("stream")) {
        let d = tmpdir();
        source(d.path());
        let img = convert(d.path(), opts, "w.vmdk");
        write_and_compare(d.path(), &img);
        let fresh = d.path().join("fresh.vmdk");
        qemu_img(
            d.path(),
            &["create", "-q", "-f", "vmdk", "-o", opts, "fresh.vmdk", "8M"],
        );
        write_and_compare(d.path(), &fresh);
    }
}

#[test]
fn a_delta_disk_reads_through_its_parent_and_writes_only_itself() {
    if !have("qemu-img") || !have("qemu-io") {
        return;
    }
    let d = tmpdir();
    source(d.path());
    let parent = convert(d.path(), "subformat=monolithicSparse", "parent.vmdk");
    let before = std::fs::read(&parent).unwrap();
    qemu_img(
        d.path(),
        &[
            "create",
            "-q",
            "-f",
            "vmdk",
            "-b",
            "parent.vmdk",
            "-F",
            "vmdk",
            "child.vmdk",
        ],
    );
    let child = d.path().join("child.vmdk");
    write_and_compare(d.path(), &child);
    assert!(
        std::fs::read(&parent).unwrap() == before,
        "the parent changed"
    );
    // The child's allocation map shows the parent one level down, as qemu-nbd's does.
    let q = Server::unix(QNBD, &["-r", "-t", "-A", child.to_str().unwrap()]);
    let ours = map(&q.uri());
    drop(q);
    let s = Server::unix("qemu-nbd", &["-r", "-t", "-A", child.to_str().unwrap()]);
    assert_eq!(ours, map(&s.uri()));
}

/// The first write after opening gives the image a new content id, as qemu's does.
#[test]
fn the_first_write_renews_the_cid() {
    if !have("qemu-img") || !have("qemu-io") {
        return;
    }
    let d = tmpdir();
    let img = d.path().join("c.vmdk");
    qemu_img(d.path(), &["create", "-q", "-f", "vmdk", "c.vmdk", "8M"]);
    let cid = |p: &Path| {
        let b = std::fs::read(p).unwrap();
        let t = String::from_utf8_lossy(&b[512..512 + 10240]).to_string();
        let line = |k: &str| t.lines().find(|l| l.starts_with(k)).unwrap().to_string();
        (line("CID="), line("parentCID="))
    };
    let (old, parent) = cid(&img);
    let s = Server::unix(QNBD, &["-t", "-f", "vmdk", img.to_str().unwrap()]);
    qemu_io(d.path(), "raw", &s.uri(), &["read 0 4k"]);
    assert_eq!(cid(&img).0, old, "a read changed the CID");
    qemu_io(d.path(), "raw", &s.uri(), &["write 0 4k"]);
    drop(s);
    let (new, new_parent) = cid(&img);
    assert_ne!(new, old);
    assert_eq!(new_parent, parent);
    check_format_no_corruption(&img, "vmdk");
}

#[test]
fn a_stream_optimized_image_takes_each_whole_grain_once() {
    if !have("qemu-img") || !have("qemu-io") {
        return;
    }
    let d = tmpdir();
    qemu_img(
        d.path(),
        &[
            "create",
            "-q",
            "-f",
            "vmdk",
            "-o",
            "subformat=streamOptimized",
            "s.vmdk",
            "8M",
        ],
    );
    let img = d.path().join("s.vmdk");
    let s = Server::unix(QNBD, &["-t", "-f", "vmdk", img.to_str().unwrap()]);
    qemu_io(
        d.path(),
        "raw",
        &s.uri(),
        &["write -P 0x61 0 1M", "write -P 0x62 4M 64k"],
    );
    let again = qemu_io_any(d.path(), "raw", &s.uri(), &["write -P 0x63 4M 64k"]);
    assert!(
        again.contains("write failed: Input/output error"),
        "{again}"
    );
    let part = qemu_io_any(d.path(), "raw", &s.uri(), &["write -P 0x64 5M 4k"]);
    assert!(part.contains("write failed: Invalid argument"), "{part}");
    drop(s);
    let back = qemu_io(
        d.path(),
        "vmdk",
        "s.vmdk",
        &[
            "read -P 0x61 0 1M",
            "read -P 0x62 4M 64k",
            "read -P 0 5M 64k",
        ],
    );
    assert!(!back.contains("Pattern verification failed"), "{back}");
    check_format_no_corruption(&img, "vmdk");
}

#[test]
fn snapshot_mode_and_a_qcow2_over_a_vmdk_leave_it_alone() {
    if !have("qemu-img") || !have("qemu-io") {
        return;
    }
    let d = tmpdir();
    let src = source(d.path());
    let img = convert(d.path(), "subformat=monolithicSparse", "b.vmdk");
    let before = std::fs::read(&img).unwrap();
    let s = Server::unix(QNBD, &["-t", "-s", img.to_str().unwrap()]);
    qemu_io(d.path(), "raw", &s.uri(), &["write -P 7 0 1M"]);
    let back = qemu_io(d.path(), "raw", &s.uri(), &["read -P 7 0 1M"]);
    assert!(!back.contains("verification failed"), "{back}");
    drop(s);
    qemu_img(
        d.path(),
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "b.vmdk",
            "-F",
            "vmdk",
            "top.qcow2",
        ],
    );
    let top = d.path().join("top.qcow2");
    let s = Server::unix(QNBD, &["-r", "-t", top.to_str().unwrap()]);
    let out = ok(Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&src)
        .arg(s.uri()));
    assert!(out.contains("Images are identical"), "{out}");
    drop(s);
    assert!(std::fs::read(&img).unwrap() == before, "the image changed");
}

/// Start `bin` on `img`; its stderr when it refuses to.
fn refusal(bin: &str, d: &Path, img: &str) -> String {
    refusal_as(bin, d, img, "vmdk")
}

fn refusal_as(bin: &str, d: &Path, img: &str, fmt: &str) -> String {
    refusal_line(bin, d, &["-f", fmt, img])
}

fn patch(src: &Path, dst: &Path, at: usize, bytes: &[u8]) {
    let mut b = std::fs::read(src).unwrap();
    b[at..at + bytes.len()].copy_from_slice(bytes);
    std::fs::write(dst, b).unwrap();
}

#[test]
fn damaged_images_are_refused_in_qemu_nbds_words() {
    if !have("qemu-img") || !have("qemu-nbd") {
        return;
    }
    let d = tmpdir();
    qemu_img(d.path(), &["create", "-q", "-f", "vmdk", "h.vmdk", "8M"]);
    let h = d.path().join("h.vmdk");
    let cases: [(&str, usize, Vec<u8>); 6] = [
        ("version", 4, 4u32.to_le_bytes().to_vec()),
        ("table size", 44, 1024u32.to_le_bytes().to_vec()),
        ("granularity", 20, 0x40_0000u64.to_le_bytes().to_vec()),
        ("zero granularity", 20, 0u64.to_le_bytes().to_vec()),
        ("truncated", 64, 0x10_0000u64.to_le_bytes().to_vec()),
        ("magic", 0, b"KDMX".to_vec()),
    ];
    for (what, at, bytes) in cases {
        patch(&h, &d.path().join("x.vmdk"), at, &bytes);
        let ours = refusal(QNBD, d.path(), "x.vmdk");
        assert_eq!(ours, refusal("qemu-nbd", d.path(), "x.vmdk"), "{what}");
    }
    // Descriptor files: an unknown type, a flat extent without its offset, a missing extent.
    qemu_img(
        d.path(),
        &[
            "create",
            "-q",
            "-f",
            "vmdk",
            "-o",
            "subformat=monolithicFlat",
            "f.vmdk",
            "1M",
        ],
    );
    let text = std::fs::read_to_string(d.path().join("f.vmdk")).unwrap();
    for (what, from, to) in [
        ("type", "monolithicFlat", "fooType"),
        ("line", "FLAT \"f-flat.vmdk\" 0", "FLAT \"f-flat.vmdk\""),
        ("extent", "f-flat.vmdk", "gone-flat.vmdk"),
    ] {
        std::fs::write(d.path().join("x.vmdk"), text.replace(from, to)).unwrap();
        let ours = refusal(QNBD, d.path(), "x.vmdk");
        assert_eq!(ours, refusal("qemu-nbd", d.path(), "x.vmdk"), "{what}");
    }
    // Hostile only (qemu reads such files): a directory past the end of the file.
    patch(
        &h,
        &d.path().join("x.vmdk"),
        56,
        &(1u64 << 32).to_le_bytes(),
    );
    let ours = refusal(QNBD, d.path(), "x.vmdk");
    assert!(ours.contains("lies past the end of the file"), "{ours}");
}

/// A grain table entry pointing into the header: a write there fails with EIO and the header
/// is untouched; a compressed grain that does not inflate fails its read, and the server
/// goes on serving.
#[test]
fn hostile_grain_tables_fail_requests_not_the_server() {
    if !have("qemu-img") || !have("qemu-io") {
        return;
    }
    let d = tmpdir();
    source(d.path());
    let img = convert(d.path(), "subformat=monolithicSparse", "g.vmdk");
    // The first grain table entry (of the primary directory) set to sector 1: the descriptor.
    let b = std::fs::read(&img).unwrap();
    let u64_at = |at: usize| u64::from_le_bytes(b[at..at + 8].try_into().unwrap());
    let gd = u64_at(56) as usize * 512;
    let gt = u32::from_le_bytes(b[gd..gd + 4].try_into().unwrap()) as usize * 512;
    patch(&img, &img, gt, &1u32.to_le_bytes());
    let head = std::fs::read(&img).unwrap()[..512 + 10240].to_vec();
    let s = Server::unix(QNBD, &["-t", "-f", "vmdk", img.to_str().unwrap()]);
    let w = qemu_io_any(d.path(), "raw", &s.uri(), &["write -P 9 0 4k"]);
    assert!(w.contains("write failed: Input/output error"), "{w}");
    let r = qemu_io(d.path(), "raw", &s.uri(), &["read 1M 4k"]);
    assert!(r.contains("read 4096/4096"), "{r}");
    drop(s);
    let after = std::fs::read(&img).unwrap();
    assert!(after[..512] == head[..512], "the header changed");

    let so = convert(d.path(), "subformat=streamOptimized", "so.vmdk");
    let b = std::fs::read(&so).unwrap();
    let gd = u64::from_le_bytes(b[56..64].try_into().unwrap()) as usize * 512;
    let gt = u32::from_le_bytes(b[gd..gd + 4].try_into().unwrap()) as usize * 512;
    let grain = u32::from_le_bytes(b[gt..gt + 4].try_into().unwrap()) as usize * 512;
    patch(&so, &so, grain + 12, &[0xff; 64]);
    let s = Server::unix(QNBD, &["-t", so.to_str().unwrap()]);
    let r = qemu_io_any(d.path(), "raw", &s.uri(), &["read 0 4k"]);
    assert!(r.contains("read failed: Input/output error"), "{r}");
    let r = qemu_io(d.path(), "raw", &s.uri(), &["read 1M 4k"]);
    assert!(r.contains("read 4096/4096"), "{r}");
}

#[test]
fn vdi_images_read_map_and_write_as_qemu_has_them() {
    if !have("qemu-img") || !have("qemu-io") {
        return;
    }
    let d = tmpdir();
    let src = source(d.path());
    for (i, opts) in ["static=off", "static=on"].iter().enumerate() {
        let img = convert_to(d.path(), "vdi", opts, &format!("v{i}.vdi"));
        reads_and_maps_as_qemu_nbd(&src, img.to_str().unwrap(), "vdi");
        write_and_compare_as(d.path(), &img, "vdi");
        let name = format!("fresh{i}.vdi");
        qemu_img(
            d.path(),
            &["create", "-q", "-f", "vdi", "-o", opts, &name, "8M"],
        );
        write_and_compare_as(d.path(), &d.path().join(&name), "vdi");
    }
}

#[test]
fn damaged_vdi_images_are_refused_in_qemu_nbds_words() {
    if !have("qemu-img") || !have("qemu-nbd") {
        return;
    }
    let d = tmpdir();
    qemu_img(d.path(), &["create", "-q", "-f", "vdi", "h.vdi", "8M"]);
    let h = d.path().join("h.vdi");
    let cases: [(&str, usize, Vec<u8>); 7] = [
        ("signature", 0x40, vec![0]),
        ("version", 0x44, 0x0001_0000u32.to_le_bytes().to_vec()),
        ("map offset", 0x154, 0x201u32.to_le_bytes().to_vec()),
        ("block size", 0x178, 4096u32.to_le_bytes().to_vec()),
        ("disk size", 0x170, (9u64 << 20).to_le_bytes().to_vec()),
        ("parent", 0x1b8, vec![1]),
        ("too big", 0x170, (1u64 << 62).to_le_bytes().to_vec()),
    ];
    for (what, at, bytes) in cases {
        patch(&h, &d.path().join("x.vdi"), at, &bytes);
        let ours = refusal_as(QNBD, d.path(), "x.vdi", "vdi");
        assert_eq!(
            ours,
            refusal_as("qemu-nbd", d.path(), "x.vdi", "vdi"),
            "{what}"
        );
    }
    // Hostile only: a block map past the end of the file.
    patch(
        &h,
        &d.path().join("x.vdi"),
        0x154,
        &(1u32 << 30).to_le_bytes(),
    );
    let ours = refusal_as(QNBD, d.path(), "x.vdi", "vdi");
    assert!(ours.contains("lies past the end of the file"), "{ours}");
    // A map entry past the image's blocks: its reads are zeroes, a write there fails.
    let img = d.path().join("e.vdi");
    qemu_img(d.path(), &["create", "-q", "-f", "vdi", "e.vdi", "8M"]);
    patch(&img, &img, 0x200, &0x00ff_ffffu32.to_le_bytes());
    let s = Server::unix(QNBD, &["-t", "-f", "vdi", img.to_str().unwrap()]);
    let w = qemu_io_any(d.path(), "raw", &s.uri(), &["write -P 9 0 4k"]);
    assert!(w.contains("write failed: Input/output error"), "{w}");
    let r = qemu_io_any(
        d.path(),
        "raw",
        &s.uri(),
        &["read -P 0 0 4k", "write -P 3 2M 4k"],
    );
    assert!(!r.contains("failed"), "{r}");
}

#[test]
fn vhd_images_read_map_and_write_as_qemu_has_them() {
    if !have("qemu-img") || !have("qemu-io") {
        return;
    }
    let d = tmpdir();
    let src = source(d.path());
    let subformats = [
        "subformat=dynamic",
        "subformat=fixed",
        "subformat=dynamic,force_size=on",
        "subformat=fixed,force_size=on",
    ];
    for (i, opts) in subformats.iter().enumerate() {
        let img = convert_to(d.path(), "vpc", opts, &format!("p{i}.vhd"));
        if opts.contains("force_size") {
            // Otherwise the geometry rounds the size up past the source's end.
            reads_and_maps_as_qemu_nbd(&src, img.to_str().unwrap(), "vpc");
        }
        write_and_compare_as(d.path(), &img, "vpc");
        let name = format!("fresh{i}.vhd");
        qemu_img(
            d.path(),
            &["create", "-q", "-f", "vpc", "-o", opts, &name, "8M"],
        );
        write_and_compare_as(d.path(), &d.path().join(&name), "vpc");
    }
}

#[test]
fn damaged_vhd_images_are_refused_in_qemu_nbds_words() {
    if !have("qemu-img") || !have("qemu-nbd") {
        return;
    }
    let d = tmpdir();
    qemu_img(d.path(), &["create", "-q", "-f", "vpc", "h.vhd", "8M"]);
    let h = d.path().join("h.vhd");
    let cases: [(&str, usize, Vec<u8>); 6] = [
        ("checksum", 64, vec![0; 4]),
        ("magic", 512, vec![0]),
        ("block size", 512 + 32, 0x1001u32.to_be_bytes().to_vec()),
        ("table small", 512 + 28, 1u32.to_be_bytes().to_vec()),
        (
            "table huge",
            512 + 28,
            0x7fff_ffffu32.to_be_bytes().to_vec(),
        ),
        ("table far", 512 + 16, (1u64 << 32).to_be_bytes().to_vec()),
    ];
    for (what, at, bytes) in cases {
        patch(&h, &d.path().join("x.vhd"), at, &bytes);
        let ours = refusal_as(QNBD, d.path(), "x.vhd", "vpc");
        assert_eq!(
            ours,
            refusal_as("qemu-nbd", d.path(), "x.vhd", "vpc"),
            "{what}"
        );
    }
}

#[test]
fn vhdx_images_read_and_write_as_qemu_has_them() {
    if !have("qemu-img") || !have("qemu-io") {
        return;
    }
    let d = tmpdir();
    let src = source(d.path());
    let subformats = ["subformat=dynamic", "subformat=fixed", "block_size=1M"];
    for (i, opts) in subformats.iter().enumerate() {
        let img = convert_to(d.path(), "vhdx", opts, &format!("x{i}.vhdx"));
        reads_as(&src, img.to_str().unwrap());
        write_and_compare_as(d.path(), &img, "vhdx");
        let name = format!("fresh{i}.vhdx");
        qemu_img(
            d.path(),
            &["create", "-q", "-f", "vhdx", "-o", opts, &name, "8M"],
        );
        write_and_compare_as(d.path(), &d.path().join(&name), "vhdx");
    }
}

/// An image closed uncleanly (a log entry the file does not hold yet): a read-only open is
/// refused in qemu-nbd's words; a read-write open replays the log, as `qemu-img check -r
/// all` does.
#[test]
fn a_vhdx_log_is_replayed_as_qemu_replays_it() {
    if !have("qemu-img") || !have("qemu-nbd") || !have("qemu-io") {
        return;
    }
    let d = tmpdir();
    source(d.path());
    convert_to(d.path(), "vhdx", "block_size=1M", "dirty.vhdx");
    let tool = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/tools/vhdx_dirty_log.py");
    ok(Command::new(PYTHON).arg(&tool).args([
        d.path().join("dirty.vhdx").to_str().unwrap(),
        "0x100000",
        "0x5a",
    ]));
    for copy in ["ours.vhdx", "theirs.vhdx"] {
        std::fs::copy(d.path().join("dirty.vhdx"), d.path().join(copy)).unwrap();
    }
    let refuse = |bin: &str| {
        let sock = d.path().join("r.sock");
        let out = run(Command::new(bin).current_dir(d.path()).args([
            "-r",
            "-k",
            sock.to_str().unwrap(),
            "dirty.vhdx",
        ]));
        assert!(
            !out.status.success(),
            "{bin} served a dirty image read-only"
        );
        String::from_utf8_lossy(&out.stderr).replace("qemu-nbd:", "qnbd:")
    };
    let ours = refuse(QNBD);
    assert_eq!(ours, refuse("qemu-nbd"));
    assert!(
        ours.contains("contains a log that needs to be replayed"),
        "{ours}"
    );

    let ours_img = d.path().join("ours.vhdx");
    let s = Server::unix(QNBD, &["-t", "-f", "vhdx", ours_img.to_str().unwrap()]);
    let r = qemu_io_any(d.path(), "raw", &s.uri(), &["read -P 0x5a 1M 4k"]);
    assert!(
        !r.contains("verification failed") && !r.contains("failed"),
        "{r}"
    );
    drop(s);
    ok(Command::new("qemu-img").current_dir(d.path()).args([
        "check",
        "-q",
        "-r",
        "all",
        "-f",
        "vhdx",
        "theirs.vhdx",
    ]));
    let out = qemu_img(
        d.path(),
        &[
            "compare",
            "-f",
            "vhdx",
            "-F",
            "vhdx",
            "ours.vhdx",
            "theirs.vhdx",
        ],
    );
    assert!(out.contains("Images are identical"), "{out}");
    check_format_no_corruption(&ours_img, "vhdx");
}

#[test]
fn damaged_vhdx_images_are_refused_in_qemu_nbds_words() {
    if !have("qemu-img") || !have("qemu-nbd") {
        return;
    }
    let d = tmpdir();
    source(d.path());
    let h = convert_to(d.path(), "vhdx", "block_size=1M", "h.vhdx");
    let cases: [(&str, &[(usize, u8)]); 4] = [
        ("signature", &[(0, 0)]),
        ("both headers", &[(65536 + 20, 0), (131072 + 20, 0)]),
        ("region table", &[(196608 + 20, 0)]),
        ("metadata", &[(3 << 20, 0)]),
    ];
    for (what, bytes) in cases {
        let mut b = std::fs::read(&h).unwrap();
        for (at, v) in bytes {
            b[*at] = *v;
        }
        std::fs::write(d.path().join("x.vhdx"), b).unwrap();
        let ours = refusal_as(QNBD, d.path(), "x.vhdx", "vhdx");
        assert_eq!(
            ours,
            refusal_as("qemu-nbd", d.path(), "x.vhdx", "vhdx"),
            "{what}"
        );
    }
    // Truncated: qemu-nbd names the first block past the end, then refuses the image.
    let b = std::fs::read(&h).unwrap();
    std::fs::write(d.path().join("t.vhdx"), &b[..5 << 20]).unwrap();
    let all = |bin: &str| {
        let sock = d.path().join("t.sock");
        let out = run(Command::new(bin).current_dir(d.path()).args([
            "-k",
            sock.to_str().unwrap(),
            "-f",
            "vhdx",
            "t.vhdx",
        ]));
        String::from_utf8_lossy(&out.stderr).replace("qemu-nbd:", "qnbd:")
    };
    assert_eq!(all(QNBD), all("qemu-nbd"));
}

/// `-l` names an internal snapshot: only qcow2 has them, and every other format is refused
/// in qemu-nbd's words.
#[test]
fn loading_a_snapshot_of_a_format_without_them_is_refused() {
    if !have("qemu-img") || !have("qemu-nbd") {
        return;
    }
    let d = tmpdir();
    source(d.path());
    for (fmt, name) in [
        ("vmdk", "l.vmdk"),
        ("vdi", "l.vdi"),
        ("vpc", "l.vhd"),
        ("vhdx", "l.vhdx"),
        ("qed", "l.qed"),
    ] {
        convert_to(d.path(), fmt, "", name);
        let refuse = |bin: &str| {
            let sock = d.path().join("l.sock");
            let out = run(Command::new("timeout").current_dir(d.path()).args([
                "20",
                bin,
                "-l",
                "snap1",
                "-f",
                fmt,
                "-k",
                sock.to_str().unwrap(),
                name,
            ]));
            assert_eq!(out.status.code(), Some(1), "{bin} {fmt}");
            String::from_utf8_lossy(&out.stderr).replace("qemu-nbd:", "qnbd:")
        };
        assert_eq!(refuse(QNBD), refuse("qemu-nbd"), "{fmt}");
    }
}

#[test]
fn qed_images_read_map_and_write_as_qemu_has_them() {
    if !have("qemu-img") || !have("qemu-io") || !have("qemu-nbd") {
        return;
    }
    let d = tmpdir();
    let src = source(d.path());
    let geometries = [
        "",
        "cluster_size=4k,table_size=16",
        "cluster_size=1M,table_size=2",
    ];
    for (i, opts) in geometries.iter().enumerate() {
        let img = convert_to(d.path(), "qed", opts, &format!("q{i}.qed"));
        reads_and_maps_as_qemu_nbd(&src, img.to_str().unwrap(), "qed");
        write_and_compare_as(d.path(), &img, "qed");
        let name = format!("fresh{i}.qed");
        let mut args = vec!["create", "-q", "-f", "qed"];
        if !opts.is_empty() {
            args.extend(["-o", opts]);
        }
        args.extend([name.as_str(), "8M"]);
        qemu_img(d.path(), &args);
        write_and_compare_as(d.path(), &d.path().join(&name), "qed");
    }
}

/// Serve `img` with `bin`, apply `WRITES`, stop; then qemu-nbd's block status and
/// allocation depth of the result, read-only.
fn write_then_map(d: &Path, bin: &str, img: &str) -> (String, String) {
    let img = d.join(img);
    let img = img.to_str().unwrap();
    let mut s = Server::unix(bin, &["-t", "-f", "qed", img]);
    qemu_io(d, "raw", &s.uri(), &WRITES);
    s.terminate();
    let s = Server::unix("qemu-nbd", &["-r", "-t", "-A", "-f", "qed", img]);
    let depth = ok(Command::new("nbdinfo")
        .arg("--map=qemu:allocation-depth")
        .arg(s.uri()));
    (map(&s.uri()), depth)
}

/// An overlay over a raw backing file (named raw in the header: not probed) and over a
/// qcow2 one (probed): written by qnbd and by qemu-nbd, the two images read and map alike.
#[test]
fn a_qed_overlay_writes_through_its_backing_file_as_qemu_nbd() {
    if !have("qemu-img") || !have("qemu-io") || !have("qemu-nbd") || !have("nbdinfo") {
        return;
    }
    let d = tmpdir();
    source(d.path());
    convert_to(d.path(), "qcow2", "", "base.qcow2");
    for (base, fmt) in [("src.raw", "raw"), ("base.qcow2", "qcow2")] {
        for name in ["ours.qed", "theirs.qed"] {
            let _ = std::fs::remove_file(d.path().join(name));
            qemu_img(
                d.path(),
                &["create", "-q", "-f", "qed", "-b", base, "-F", fmt, name],
            );
        }
        let ours = write_then_map(d.path(), QNBD, "ours.qed");
        let theirs = write_then_map(d.path(), "qemu-nbd", "theirs.qed");
        assert_eq!(ours, theirs, "over {base}: block status differs");
        let out = ok(Command::new("qemu-img").current_dir(d.path()).args([
            "compare",
            "-f",
            "qed",
            "-F",
            "qed",
            "ours.qed",
            "theirs.qed",
        ]));
        assert!(out.contains("Images are identical"), "over {base}: {out}");
        check_format_no_corruption(&d.path().join("ours.qed"), "qed");
    }
}

#[test]
fn damaged_qed_images_are_refused_in_qemu_nbds_words() {
    if !have("qemu-img") || !have("qemu-nbd") {
        return;
    }
    let d = tmpdir();
    qemu_img(d.path(), &["create", "-q", "-f", "qed", "h.qed", "8M"]);
    let h = d.path().join("h.qed");
    let le32 = |v: u32| v.to_le_bytes().to_vec();
    let le64 = |v: u64| v.to_le_bytes().to_vec();
    let cases: Vec<(&str, usize, Vec<u8>)> = vec![
        ("magic", 0, b"QEE\0".to_vec()),
        ("features", 16, le64(0x18)),
        ("cluster size", 4, le32(3000)),
        ("cluster size huge", 4, le32(128 << 20)),
        ("table size", 8, le32(3)),
        ("table size 1", 8, le32(1)),
        ("image size", 48, le64(1000)),
        ("image size huge", 48, le64(1 << 62)),
        ("L1 offset", 40, le64(0)),
        ("L1 past the end", 40, le64(1 << 30)),
        ("header size", 12, le32(0x10_0000)),
        // The backing file flag with a name past the header.
        ("backing name", 56, [le32(65530), le32(100)].concat()),
    ];
    for (what, at, bytes) in cases {
        patch(&h, &d.path().join("x.qed"), at, &bytes);
        if what == "backing name" {
            patch(
                &d.path().join("x.qed"),
                &d.path().join("x.qed"),
                16,
                &le64(1),
            );
        }
        let ours = refusal_as(QNBD, d.path(), "x.qed", "qed");
        assert_eq!(
            ours,
            refusal_as("qemu-nbd", d.path(), "x.qed", "qed"),
            "{what}"
        );
    }
    // A backing file name longer than qemu takes, and one that does not exist.
    for (size, name) in [(5000u32, "x"), (7, "missing")] {
        let mut b = std::fs::read(&h).unwrap();
        b[16..24].copy_from_slice(&le64(1));
        b[56..64].copy_from_slice(&[le32(64), le32(size)].concat());
        b[64..64 + name.len()].copy_from_slice(name.as_bytes());
        std::fs::write(d.path().join("x.qed"), b).unwrap();
        let ours = refusal_as(QNBD, d.path(), "x.qed", "qed");
        assert_eq!(
            ours,
            refusal_as("qemu-nbd", d.path(), "x.qed", "qed"),
            "backing name {size}"
        );
    }
}

/// An image left with NEED_CHECK set and entries a crash may leave (past the file's end,
/// unaligned): read-only it is served as it is (those clusters fail); a read-write open
/// repairs it exactly as `qemu-img check -r all` does, byte for byte; while qnbd allocates
/// the flag is set, and a clean stop clears it.
#[test]
fn a_dirty_qed_image_is_repaired_on_open_as_qemu_repairs_it() {
    if !have("qemu-img") || !have("qemu-io") {
        return;
    }
    let d = tmpdir();
    qemu_img(d.path(), &["create", "-q", "-f", "qed", "a.qed", "8M"]);
    let a = d.path().join("a.qed");
    let a_s = a.to_str().unwrap();
    qemu_io(d.path(), "qed", "a.qed", &["write -P 7 0 1M"]);
    let mut b = std::fs::read(&a).unwrap();
    let l1 = u64::from_le_bytes(b[40..48].try_into().unwrap()) as usize;
    let l2 = u64::from_le_bytes(b[l1..l1 + 8].try_into().unwrap()) as usize;
    b[16] |= 2;
    b[l2 + 50 * 8..l2 + 51 * 8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    b[l2 + 51 * 8..l2 + 52 * 8].copy_from_slice(&0x10_0100u64.to_le_bytes());
    std::fs::write(&a, &b).unwrap();
    std::fs::write(d.path().join("b.qed"), &b).unwrap();
    {
        let s = Server::unix(QNBD, &["-r", "-t", "-f", "qed", a_s]);
        let out = run(Command::new("qemu-io")
            .args([
                "-r",
                "-f",
                "raw",
                "-c",
                "read -P 7 0 1M",
                "-c",
                "read 3276800 4k",
            ])
            .arg(s.uri()));
        let r = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(
            r.contains("read 1048576/1048576") && r.contains("read failed"),
            "{r}"
        );
    }
    assert!(
        std::fs::read(&a).unwrap() == b,
        "a read-only open changed the image"
    );
    let mut s = Server::unix(QNBD, &["-t", "-f", "qed", a_s]);
    qemu_io(
        d.path(),
        "raw",
        &s.uri(),
        &["read -P 7 0 1M", "read -P 0 3200k 128k"],
    );
    s.terminate();
    ok(Command::new("qemu-img")
        .current_dir(d.path())
        .args(["check", "-q", "-r", "all", "-f", "qed", "b.qed"]));
    assert!(
        std::fs::read(&a).unwrap() == std::fs::read(d.path().join("b.qed")).unwrap(),
        "the repair differs from qemu's"
    );
    check_format_no_corruption(&a, "qed");
    // NEED_CHECK while allocating, cleared by a clean stop.
    let mut s = Server::unix(QNBD, &["-t", "-f", "qed", a_s]);
    qemu_io(d.path(), "raw", &s.uri(), &["write -P 9 4M 4k", "flush"]);
    assert_eq!(std::fs::read(&a).unwrap()[16] & 2, 2, "NEED_CHECK not set");
    s.terminate();
    assert_eq!(
        std::fs::read(&a).unwrap()[16] & 2,
        0,
        "NEED_CHECK not cleared"
    );
}

#[test]
fn parallels_images_read_map_and_write_as_qemu_has_them() {
    if !have("qemu-img") || !have("qemu-io") || !have("qemu-nbd") {
        return;
    }
    let d = tmpdir();
    let src = source(d.path());
    for (i, opts) in ["", "cluster_size=64k"].iter().enumerate() {
        let img = convert_to(d.path(), "parallels", opts, &format!("p{i}.hdd"));
        reads_and_maps_as_qemu_nbd(&src, img.to_str().unwrap(), "parallels");
        write_and_compare_as(d.path(), &img, "parallels");
        check_clean(&img);
        let name = format!("fresh{i}.hdd");
        let mut args = vec!["create", "-q", "-f", "parallels"];
        if !opts.is_empty() {
            args.extend(["-o", opts]);
        }
        args.extend([name.as_str(), "8M"]);
        qemu_img(d.path(), &args);
        write_and_compare_as(d.path(), &d.path().join(&name), "parallels");
        check_clean(&d.path().join(&name));
    }
}

/// Whole clusters zeroed or trimmed (with `--discard=unmap`) are dropped from the BAT and
/// the file, as qemu-nbd drops them; the file ends at its last cluster in use, and the
/// image is marked in use while served, clean after.
#[test]
fn parallels_zeroes_trims_and_inuse_as_qemu() {
    if !have("qemu-img") || !have("qemu-io") || !have("nbdinfo") {
        return;
    }
    let d = tmpdir();
    qemu_img(
        d.path(),
        &["create", "-q", "-f", "parallels", "z.hdd", "8M"],
    );
    let img = d.path().join("z.hdd");
    let inuse = || u32::from_le_bytes(std::fs::read(&img).unwrap()[44..48].try_into().unwrap());
    let mut s = Server::unix(QNBD, &["-t", "--discard=unmap", img.to_str().unwrap()]);
    assert_eq!(inuse(), 0x746f_6e59);
    qemu_io(
        d.path(),
        "raw",
        &s.uri(),
        &[
            "write -P 1 0 4M",
            "write -z 1M 1M",
            "discard 2M 1M",
            "write -z -u 3M 4k",
            "flush",
        ],
    );
    let m = ok(Command::new("nbdinfo").args(["--map", &s.uri()]));
    let lines: Vec<Vec<&str>> = m.lines().map(|l| l.split_whitespace().collect()).collect();
    let want = [
        ["0", "1048576", "0", "data"],
        ["1048576", "2097152", "3", "hole,zero"],
        ["3145728", "1048576", "0", "data"],
        ["4194304", "4194304", "3", "hole,zero"],
    ];
    assert_eq!(lines.len(), want.len(), "{m}");
    for (l, w) in lines.iter().zip(want) {
        assert_eq!(l[..4], w[..], "{m}");
    }
    s.terminate();
    assert_eq!(inuse(), 0);
    check_clean(&img);
    let r = qemu_io_any(
        d.path(),
        "parallels",
        img.to_str().unwrap(),
        &[
            "read -P 1 0 1M",
            "read -P 0 1M 2M",
            "read -P 0 3M 4k",
            "read -P 1 3076k 1020k",
        ],
    );
    assert!(!r.contains("fail"), "{r}");
}

#[test]
fn damaged_parallels_images_are_refused_or_repaired_in_qemu_nbds_words() {
    if !have("qemu-img") || !have("qemu-nbd") {
        return;
    }
    let d = tmpdir();
    qemu_img(
        d.path(),
        &["create", "-q", "-f", "parallels", "h.hdd", "8M"],
    );
    let h = d.path().join("h.hdd");
    let cases: [(&str, usize, Vec<u8>); 5] = [
        ("magic", 0, vec![b'x']),
        ("version", 16, 3u32.to_le_bytes().to_vec()),
        ("tracks", 28, 0u32.to_le_bytes().to_vec()),
        ("cluster", 28, 4_186_128u32.to_le_bytes().to_vec()),
        ("catalog", 32, 0x2000_0000u32.to_le_bytes().to_vec()),
    ];
    for (what, at, bytes) in cases {
        patch(&h, &d.path().join("x.hdd"), at, &bytes);
        let ours = refusal_as(QNBD, d.path(), "x.hdd", "parallels");
        assert_eq!(
            ours,
            refusal_as("qemu-nbd", d.path(), "x.hdd", "parallels"),
            "{what}"
        );
    }
    // Left in use: a writer repairs it with qemu's message, a reader leaves it be.
    qemu_io(d.path(), "parallels", "h.hdd", &["write -P 7 0 64k"]);
    patch(&h, &h, 44, &0x746f_6e59u32.to_le_bytes());
    for (bin, ro) in [(QNBD, true), (QNBD, false), ("qemu-nbd", false)] {
        let copy = d.path().join("u.hdd");
        std::fs::copy(&h, &copy).unwrap();
        let sock = d.path().join("u.sock");
        let _ = std::fs::remove_file(&sock);
        let mut cmd = Command::new(bin);
        cmd.arg("-k").arg(&sock).args(["-f", "parallels"]);
        if ro {
            cmd.arg("-r");
        }
        // Without -t the server ends with its one client: its stderr is then complete.
        let child = cmd
            .arg(&copy)
            .stdin(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        for _ in 0..500 {
            if sock.exists() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let uri = format!("nbd+unix:///?socket={}", sock.display());
        let r = qemu_io_any(d.path(), "raw", &uri, &["read -P 7 0 64k"]);
        assert!(!r.contains("fail"), "{bin}: {r}");
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            err.contains("Repairing image was not closed correctly"),
            !ro,
            "{bin} ro={ro}: {err}"
        );
        let inuse = u32::from_le_bytes(std::fs::read(&copy).unwrap()[44..48].try_into().unwrap());
        assert_eq!(inuse, if ro { 0x746f_6e59 } else { 0 }, "{bin} ro={ro}");
    }
    // Hostile: a BAT entry far past the file's end (in clusters, the extended magic). A
    // writer drops it first ("cluster 1 is outside image"), then writes there afresh.
    patch(&h, &h, 44, &0u32.to_le_bytes());
    let bad = d.path().join("b.hdd");
    patch(&h, &bad, 68, &0x8000_0000u32.to_le_bytes());
    // A last cluster the file covers only in part (a cut file): kept, its bytes read back,
    // and the file grown over it, so qemu finds the image clean afterwards.
    qemu_img(
        d.path(),
        &[
            "create",
            "-q",
            "-f",
            "parallels",
            "-o",
            "cluster_size=64k",
            "c.hdd",
            "1M",
        ],
    );
    let cut = d.path().join("c.hdd");
    qemu_io(d.path(), "parallels", "c.hdd", &["write -P 6 0 64k"]);
    let len = std::fs::metadata(&cut).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&cut)
        .unwrap()
        .set_len(len - 32768)
        .unwrap();
    let mut s = Server::unix(QNBD, &["-t", "-f", "parallels", cut.to_str().unwrap()]);
    let r = qemu_io_any(
        d.path(),
        "raw",
        &s.uri(),
        &["read -P 6 0 32k", "read -P 0 32k 32k"],
    );
    assert!(!r.contains("fail"), "{r}");
    s.terminate();
    check_clean(&cut);
    let mut s = Server::unix(QNBD, &["-t", "-f", "parallels", bad.to_str().unwrap()]);
    let r = qemu_io_any(
        d.path(),
        "raw",
        &s.uri(),
        &["read -P 0 1M 1M", "write -P 5 1M 4k", "read -P 5 1M 4k"],
    );
    assert!(!r.contains("fail"), "{r}");
    s.terminate();
    check_clean(&bad);
}

/// A backing file given with `--image-opts` (the header has no place for one): unwritten
/// clusters read from it, a new cluster takes its bytes around the data, zeroes are written.
#[test]
fn parallels_over_a_backing_file_as_qemu_nbd() {
    if !have("qemu-img") || !have("qemu-io") || !have("qemu-nbd") {
        return;
    }
    let d = tmpdir();
    make_raw(d.path(), "base.raw", 4 << 20, &[(0, &[0x5a; 1 << 20])]);
    let cmds = [
        "write -P 1 4k 4k",
        "write -z 64k 64k",
        "discard 128k 64k",
        "read -P 0x5a 0 4k",
        "read -P 1 4k 4k",
        "read -P 0x5a 8k 56k",
        "read -P 0 64k 64k",
        "read -P 0x5a 128k 64k",
    ];
    for bin in [QNBD, "qemu-nbd"] {
        let img = d.path().join("a.hdd");
        let _ = std::fs::remove_file(&img);
        qemu_img(
            d.path(),
            &[
                "create",
                "-q",
                "-f",
                "parallels",
                "-o",
                "cluster_size=64k",
                "a.hdd",
                "4M",
            ],
        );
        let spec = format!(
            "driver=parallels,file.filename={},backing.driver=raw,backing.file.filename={}",
            img.display(),
            d.path().join("base.raw").display()
        );
        let mut s = Server::unix(bin, &["-t", "--discard=unmap", "--image-opts", &spec]);
        let r = qemu_io_any(d.path(), "raw", &s.uri(), &cmds);
        assert!(!r.contains("fail"), "{bin}: {r}");
        s.terminate();
        check_clean(&img);
    }
}
