//! qcow (version 1) images through the real binary, checked against qemu-nbd and qemu's
//! own reader: fresh, converted, compressed, encrypted images and overlays read and map as
//! qemu-nbd serves them; writes through qnbd read back in qemu (`qemu-img compare`; qcow has
//! no `qemu-img check`) and leave the image mapped as qemu-nbd's same writes do; damaged
//! headers get qemu-nbd's words; hostile tables fail requests, not the server.
//! (The concurrent verifier and the kill -9 loop are in `data_safety.rs`.)

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;

const SIZE: u64 = 8 << 20;
const SECRET: &str = "secret,id=sec0,data=hunter2";

/// A raw image with data, a zero run and a hole, to convert.
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

/// `qemu-img convert -c -O qcow`: qemu 10 writes the whole image, then exits 1 without a
/// word (its closing zero-length compressed write fails in the qcow driver); the image is
/// checked instead.
fn convert_compressed(d: &Path, src: &str, dst: &str) {
    run(Command::new("qemu-img")
        .current_dir(d)
        .args(["convert", "-c", "-f", "raw", "-O", "qcow", src, dst]));
    let out = compare(&d.join(src), "raw", d.join(dst).to_str().unwrap(), "qcow");
    assert!(out.contains("Images are identical"), "{dst}: {out}");
    let b = std::fs::read(d.join(dst)).unwrap();
    let l1 = u64::from_be_bytes(b[40..48].try_into().unwrap()) as usize;
    let l2 = u64::from_be_bytes(b[l1..l1 + 8].try_into().unwrap()) as usize;
    let first = u64::from_be_bytes(b[l2..l2 + 8].try_into().unwrap());
    assert!(
        first >> 63 == 1,
        "{dst}: the first cluster is not compressed"
    );
}

fn map(uri: &str) -> String {
    ok(Command::new("qemu-img").args(["map", "--output=json", "-f", "raw", uri]))
}

fn compare(a: &Path, fa: &str, b: &str, fb: &str) -> String {
    ok(Command::new("qemu-img")
        .args(["compare", "-f", fa, "-F", fb])
        .arg(a)
        .arg(b))
}

/// qnbd serving `args` reads as qemu-nbd serving `theirs` and maps alike.
fn same_as_qemu_nbd(ours: &[&str], theirs: &[&str], what: &str) {
    let mut q = Server::unix(QNBD, ours);
    let s = Server::unix("qemu-nbd", theirs);
    let out = ok(Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(q.uri())
        .arg(s.uri()));
    assert!(out.contains("Images are identical"), "{what}: {out}");
    assert_eq!(
        map(&q.uri()),
        map(&s.uri()),
        "{what}: block status differs from qemu-nbd's"
    );
    q.terminate();
}

/// qnbd (probing) serves `img` as qemu-nbd (told the format) does.
fn reads_and_maps_as_qemu_nbd(d: &Path, img: &str) {
    let path = d.join(img);
    let p = path.to_str().unwrap();
    same_as_qemu_nbd(&["-r", "-t", p], &["-r", "-t", "-f", "qcow", p], img);
}

/// What a test writes: odd sizes and offsets, a cluster's worth, zeroes, the last sector.
const WRITES: [&str; 7] = [
    "write -P 0x11 0 4k",
    "write -P 0x22 65000 70000",
    "write -P 0x33 3M 1M",
    "write -z 6M 128k",
    "write -z 1000 3000",
    "write -P 0x44 7M 512",
    "write -P 0x55 8380416 8192",
];

/// Write `WRITES` (and a trim) through `bin` serving `img`.
fn write_through(d: &Path, bin: &str, img: &Path) {
    let mut s = Server::unix(bin, &["-t", "-f", "qcow", img.to_str().unwrap()]);
    let mut cmds = WRITES.to_vec();
    cmds.push("discard 1M 64k");
    qemu_io(d, "raw", &s.uri(), &cmds);
    s.terminate();
}

/// Write `WRITES` through qnbd into `img` and through qemu-nbd into a copy of it: qemu must
/// read `img` as a raw copy of what it held with the same writes, and both images must read
/// and map alike through qemu-nbd.
fn write_and_compare(d: &Path, img: &Path) {
    let reference = d.join("ref.raw");
    ok(Command::new("qemu-img")
        .args(["convert", "-f", "qcow", "-O", "raw"])
        .arg(img)
        .arg(&reference));
    let theirs = d.join("theirs.qcow");
    std::fs::copy(img, &theirs).unwrap();
    write_through(d, QNBD, img);
    write_through(d, "qemu-nbd", &theirs);
    qemu_io(d, "raw", reference.to_str().unwrap(), &WRITES);
    let out = compare(&reference, "raw", img.to_str().unwrap(), "qcow");
    assert!(
        out.contains("Images are identical"),
        "{}: {out}",
        img.display()
    );
    let (a, b) = (img.to_str().unwrap(), theirs.to_str().unwrap());
    let s1 = Server::unix("qemu-nbd", &["-r", "-t", "-f", "qcow", a]);
    let s2 = Server::unix("qemu-nbd", &["-r", "-t", "-f", "qcow", b]);
    assert_eq!(
        map(&s1.uri()),
        map(&s2.uri()),
        "{}: written by qnbd, it maps unlike qemu-nbd's",
        img.display()
    );
}

fn have_all() -> bool {
    have("qemu-img") && have("qemu-io") && have("qemu-nbd")
}

#[test]
fn fresh_converted_and_compressed_images_read_map_and_write_as_qemu_nbd() {
    if !have_all() {
        return;
    }
    let d = tmpdir();
    source(d.path());
    qemu_img(
        d.path(),
        &["create", "-q", "-f", "qcow", "fresh.qcow", "8M"],
    );
    qemu_io(
        d.path(),
        "qcow",
        "fresh.qcow",
        &[
            "write -P 7 0 4k",
            "write -P 8 100k 1000",
            "write -P 9 2M 64k",
        ],
    );
    qemu_img(
        d.path(),
        &["convert", "-f", "raw", "-O", "qcow", "src.raw", "conv.qcow"],
    );
    convert_compressed(d.path(), "src.raw", "z.qcow");
    for img in ["fresh.qcow", "conv.qcow", "z.qcow"] {
        reads_and_maps_as_qemu_nbd(d.path(), img);
        write_and_compare(d.path(), &d.path().join(img));
    }
    // An image that is not a whole number of clusters (or sectors) long.
    qemu_img(
        d.path(),
        &["create", "-q", "-f", "qcow", "odd.qcow", "1000001"],
    );
    reads_and_maps_as_qemu_nbd(d.path(), "odd.qcow");
}

/// Over a raw backing file and a qcow2 one (both probed: qcow has no backing format), and
/// with `backing=` options: reads, maps and writes as qemu-nbd.
#[test]
fn an_overlay_reads_and_writes_through_its_backing_file_as_qemu_nbd() {
    if !have_all() {
        return;
    }
    let d = tmpdir();
    source(d.path());
    qemu_img(
        d.path(),
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "src.raw",
            "base.qcow2",
        ],
    );
    for (base, fmt) in [("src.raw", "raw"), ("base.qcow2", "qcow2")] {
        let _ = std::fs::remove_file(d.path().join("o.qcow"));
        qemu_img(
            d.path(),
            &[
                "create", "-q", "-f", "qcow", "-b", base, "-F", fmt, "o.qcow",
            ],
        );
        qemu_io(d.path(), "qcow", "o.qcow", &["write -P 0x33 1M 64k"]);
        reads_and_maps_as_qemu_nbd(d.path(), "o.qcow");
        write_and_compare(d.path(), &d.path().join("o.qcow"));
    }
    let o = d.path().join("o.qcow");
    let raw = d.path().join("src.raw");
    for opts in [
        format!("driver=qcow,file.filename={},backing=", o.display()),
        format!(
            "driver=qcow,file.filename={},backing.driver=raw,backing.file.filename={}",
            o.display(),
            raw.display()
        ),
    ] {
        let args = ["-r", "-t", "--image-opts", opts.as_str()];
        same_as_qemu_nbd(&args, &args, &opts);
    }
    // A 4 KiB-cluster image given a backing file by options: partial writes to new clusters
    // keep the backing file's bytes around them (qemu would leave zeroes there).
    qemu_img(d.path(), &["create", "-q", "-f", "qcow", "c4.qcow", "8M"]);
    let c4 = d.path().join("c4.qcow");
    let opts = format!(
        "driver=qcow,file.filename={},backing.driver=raw,backing.file.filename={}",
        c4.display(),
        raw.display()
    );
    let mut s = Server::unix(QNBD, &["-t", "--image-opts", opts.as_str()]);
    qemu_io(d.path(), "raw", &s.uri(), &WRITES);
    s.terminate();
    let reference = d.path().join("ref4.raw");
    std::fs::copy(&raw, &reference).unwrap();
    qemu_io(d.path(), "raw", reference.to_str().unwrap(), &WRITES);
    let json = format!(
        r#"json:{{"driver":"qcow","file":{{"driver":"file","filename":"{}"}},"backing":{{"driver":"raw","file":{{"driver":"file","filename":"{}"}}}}}}"#,
        c4.display(),
        raw.display()
    );
    let out = ok(Command::new("qemu-img")
        .args(["compare", "-f", "raw"])
        .arg(&reference)
        .arg(&json));
    assert!(out.contains("Images are identical"), "{out}");
}

#[test]
fn encrypted_images_read_and_write_with_the_key_as_qemu_nbd() {
    if !have_all() {
        return;
    }
    let d = tmpdir();
    qemu_img(
        d.path(),
        &[
            "create",
            "-q",
            "-f",
            "qcow",
            "--object",
            SECRET,
            "-o",
            "encrypt.format=aes,encrypt.key-secret=sec0",
            "e.qcow",
            "8M",
        ],
    );
    let e = d.path().join("e.qcow");
    let opts = format!(
        "driver=qcow,file.filename={},encrypt.key-secret=sec0",
        e.display()
    );
    let qio = |cmds: &[&str]| {
        let mut c = Command::new("qemu-io");
        c.args(["--object", SECRET, "--image-opts", &opts]);
        for cmd in cmds {
            c.args(["-c", cmd]);
        }
        ok(&mut c)
    };
    qio(&["write -P 0x5a 4k 8k", "write -P 0x11 1M 512"]);
    let args = [
        "-r",
        "-t",
        "--object",
        SECRET,
        "--image-opts",
        opts.as_str(),
    ];
    same_as_qemu_nbd(&args, &args, "encrypted");
    // Writes through qnbd, partial clusters and sectors among them, read back in qemu.
    let mut s = Server::unix(
        QNBD,
        &["-t", "--object", SECRET, "--image-opts", opts.as_str()],
    );
    qemu_io(
        d.path(),
        "raw",
        &s.uri(),
        &[
            "write -P 0x77 2M 1000",
            "write -P 0x66 4k 100",
            "write -z 1M 4k",
        ],
    );
    s.terminate();
    let out = qio(&[
        "read -P 0x77 2M 1000",
        "read -P 0 2098152 3096",
        "read -P 0x66 4k 100",
        "read -P 0x5a 4196 8092",
        "read -P 0 1M 4k",
    ]);
    assert!(!out.contains("Pattern verification failed"), "{out}");
    // No key: qemu-nbd's words.
    let ours = refusal(QNBD, d.path(), "e.qcow");
    assert_eq!(ours, refusal("qemu-nbd", d.path(), "e.qcow"));
    assert!(
        ours.contains("Parameter 'encrypt.key-secret' is required"),
        "{ours}"
    );
}

/// Start `bin` on `img`; the first line of its stderr when it refuses to.
fn refusal(bin: &str, d: &Path, img: &str) -> String {
    refusal_line(bin, d, &["-f", "qcow", img])
}

fn patch(src: &Path, dst: &Path, at: usize, bytes: &[u8]) {
    let mut b = std::fs::read(src).unwrap();
    b[at..at + bytes.len()].copy_from_slice(bytes);
    std::fs::write(dst, b).unwrap();
}

#[test]
fn damaged_headers_are_refused_in_qemu_nbds_words() {
    if !have("qemu-img") || !have("qemu-nbd") {
        return;
    }
    let d = tmpdir();
    qemu_img(d.path(), &["create", "-q", "-f", "qcow", "h.qcow", "8M"]);
    let h = d.path().join("h.qcow");
    let x = d.path().join("x.qcow");
    let cases: [(&str, usize, Vec<u8>); 12] = [
        ("magic", 0, b"QFJ".to_vec()),
        ("version 2", 4, 2u32.to_be_bytes().to_vec()),
        ("version 5", 4, 5u32.to_be_bytes().to_vec()),
        ("size 1", 24, 1u64.to_be_bytes().to_vec()),
        ("size overflow", 24, u64::MAX.to_be_bytes().to_vec()),
        ("huge size", 24, (1u64 << 62).to_be_bytes().to_vec()),
        ("cluster_bits 17", 32, vec![17]),
        ("cluster_bits 8", 32, vec![8]),
        ("l2_bits 5", 33, vec![5]),
        ("l2_bits 14", 33, vec![14]),
        ("crypt_method 2", 36, 2u32.to_be_bytes().to_vec()),
        (
            "backing name too long",
            8,
            [48u64.to_be_bytes(), [0, 0, 4, 0, 0, 0, 0, 0]].concat(),
        ),
    ];
    for (what, at, bytes) in cases {
        patch(&h, &x, at, &bytes);
        let ours = refusal(QNBD, d.path(), "x.qcow");
        assert_eq!(ours, refusal("qemu-nbd", d.path(), "x.qcow"), "{what}");
    }
    // A backing file that is gone.
    qemu_img(
        d.path(),
        &[
            "create", "-q", "-f", "qcow", "-u", "-b", "gone.raw", "-F", "raw", "nb.qcow", "1M",
        ],
    );
    let ours = refusal(QNBD, d.path(), "nb.qcow");
    assert_eq!(
        ours,
        refusal("qemu-nbd", d.path(), "nb.qcow"),
        "backing gone"
    );
    // Version 2 gets qemu's hint on the next line.
    patch(&h, &x, 4, &2u32.to_be_bytes());
    let out = run(Command::new("timeout")
        .current_dir(d.path())
        .args(["20", QNBD, "-f", "qcow", "x.qcow"]));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("\nTry the 'qcow2' driver instead."), "{err}");
    // A qcow2 image still probes as qcow2.
    qemu_img(d.path(), &["create", "-q", "-f", "qcow2", "q2", "1M"]);
    let s = Server::unix(QNBD, &["-r", "-t", d.path().join("q2").to_str().unwrap()]);
    drop(s);
    // Hostile only (qemu reads zeroes there): an L1 table past the end of the file, from
    // its offset or from its size.
    for (at, bytes) in [
        (40, (1u64 << 32).to_be_bytes()),
        (24, (1u64 << 44).to_be_bytes()),
    ] {
        patch(&h, &x, at, &bytes);
        let ours = refusal(QNBD, d.path(), "x.qcow");
        assert!(ours.contains("lies past the end of the file"), "{ours}");
    }
}

/// L2 entries that are not sector-aligned, past the end of the file, or a compressed
/// cluster that does not inflate: the request fails with EIO, the server goes on, and the
/// header and L1 table are untouched.
#[test]
fn hostile_l2_entries_fail_requests_not_the_server() {
    if !have_all() {
        return;
    }
    let d = tmpdir();
    source(d.path());
    qemu_img(
        d.path(),
        &["convert", "-f", "raw", "-O", "qcow", "src.raw", "g.qcow"],
    );
    convert_compressed(d.path(), "src.raw", "z.qcow");
    let be64 = |b: &[u8], at: usize| u64::from_be_bytes(b[at..at + 8].try_into().unwrap());
    let l2_of = |img: &Path| {
        let b = std::fs::read(img).unwrap();
        be64(&b, be64(&b, 40) as usize) as usize
    };
    let img = d.path().join("g.qcow");
    let l2 = l2_of(&img);
    patch(&img, &img, l2, &0x10u64.to_be_bytes());
    patch(&img, &img, l2 + 8, &(1u64 << 40).to_be_bytes());
    let head = std::fs::read(&img).unwrap()[..l2].to_vec();
    let s = Server::unix(QNBD, &["-t", "-f", "qcow", img.to_str().unwrap()]);
    let out = qemu_io_any(d.path(), &s.uri(), &["read 0 4k"]);
    assert!(out.contains("read failed: Input/output error"), "{out}");
    for w in ["write -P 9 0 4k", "write -P 9 4k 4k"] {
        let out = qemu_io_any(d.path(), &s.uri(), &[w]);
        assert!(
            out.contains("write failed: Input/output error"),
            "{w}: {out}"
        );
    }
    let r = qemu_io(
        d.path(),
        "raw",
        &s.uri(),
        &["read 1M 4k", "write -P 1 2M 4k"],
    );
    assert!(
        r.contains("read 4096/4096") && r.contains("wrote 4096/4096"),
        "{r}"
    );
    drop(s);
    assert!(
        std::fs::read(&img).unwrap()[..l2] == head[..],
        "the metadata before the first L2 table changed"
    );

    let z = d.path().join("z.qcow");
    let b = std::fs::read(&z).unwrap();
    let entry = be64(&b, l2_of(&z));
    let stream = (entry & ((1u64 << 51) - 1)) as usize;
    patch(&z, &z, stream, &[0xff; 64]);
    let s = Server::unix(QNBD, &["-t", "-f", "qcow", z.to_str().unwrap()]);
    let out = qemu_io_any(d.path(), &s.uri(), &["read 0 4k"]);
    assert!(out.contains("read failed: Input/output error"), "{out}");
    let out = qemu_io_any(d.path(), &s.uri(), &["write -P 3 0 512"]);
    assert!(out.contains("write failed: Input/output error"), "{out}");
    let r = qemu_io(d.path(), "raw", &s.uri(), &["read 1M 4k"]);
    assert!(r.contains("read 4096/4096"), "{r}");
}

/// qemu-io's output (stdout and stderr) on a raw NBD target, failed commands included.
fn qemu_io_any(d: &Path, target: &str, cmds: &[&str]) -> String {
    let mut c = Command::new("qemu-io");
    c.current_dir(d).args(["-f", "raw"]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    let out = run(c.arg(target));
    String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr)
}

/// `--image-opts driver=compress,file.driver=qcow,...`: what nbdcopy writes lands as
/// compressed clusters qemu reads back; a compressed write over an allocated cluster fails
/// (EIO) and leaves it alone.
#[test]
fn the_compress_filter_stores_compressed_clusters_qemu_reads() {
    if !have_all() || !have("nbdcopy") {
        return;
    }
    let d = tmpdir();
    let src = source(d.path());
    qemu_img(d.path(), &["create", "-q", "-f", "qcow", "c.qcow", "8M"]);
    let img = d.path().join("c.qcow");
    let opts = format!(
        "driver=compress,file.driver=qcow,file.file.filename={}",
        img.display()
    );
    let mut s = Server::unix(QNBD, &["-t", "--image-opts", opts.as_str()]);
    ok(Command::new("nbdcopy").arg(&src).arg(s.uri()));
    let out = qemu_io_any(d.path(), &s.uri(), &["write -P 4 7M 4k"]);
    assert!(out.contains("write failed: Input/output error"), "{out}");
    s.terminate();
    let out = compare(&src, "raw", img.to_str().unwrap(), "qcow");
    assert!(out.contains("Images are identical"), "{out}");
    let map = ok(Command::new("qemu-img")
        .args(["map", "--output=json", "-f", "qcow"])
        .arg(&img));
    assert!(map.contains("\"compressed\": true"), "{map}");
    assert!(!map.contains("\"compressed\": false"), "{map}");
}
