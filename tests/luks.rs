//! Encrypted images made by qemu-img, served by qnbd with `--object secret` and
//! `--image-opts`, checked against qemu's own tools: `driver=luks` (the default cipher,
//! aes-256-xts-plain64, and aes-128-cbc-essiv) and qcow2 with `encrypt.format=luks`.
//! Bytes written by qemu-io read back through qnbd and the other way round; random writes
//! (unaligned too) through qnbd leave the image equal to a raw copy that got the same writes
//! (`qemu-img compare` with the secret), and a qcow2 checks clean; `-s` leaves the image
//! alone; wrong passphrases, missing secrets and damaged headers fail as qemu-nbd fails.
//!
//! The images use `iter-time=10` (qemu's default is 2 s of PBKDF2, which a debug build of
//! the tests would make slow); the key derivation is the same code at any count.

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;

const SECRET: &str = "secret,id=sec0,data=hunter2";
const WRONG: &str = "secret,id=sec0,data=hunter3";

#[derive(Clone, Copy, Debug)]
enum Kind {
    /// `qemu-img create -f luks` with its defaults.
    LuksDefault,
    LuksCbcEssiv,
    Qcow2,
    Qcow2ExtendedL2,
}

impl Kind {
    fn create(self, dir: &Path, size: &str) -> PathBuf {
        let (fmt, name, opts) = match self {
            Kind::LuksDefault => ("luks", "a.luks", "key-secret=sec0,iter-time=10"),
            Kind::LuksCbcEssiv => (
                "luks",
                "b.luks",
                "key-secret=sec0,iter-time=10,cipher-alg=aes-128,cipher-mode=cbc,ivgen-alg=essiv",
            ),
            Kind::Qcow2 => (
                "qcow2",
                "c.qcow2",
                "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
            ),
            Kind::Qcow2ExtendedL2 => (
                "qcow2",
                "d.qcow2",
                "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10,extended_l2=on",
            ),
        };
        qemu_img(
            dir,
            &[
                "create", "-q", "-f", fmt, "--object", SECRET, "-o", opts, name, size,
            ],
        );
        dir.join(name)
    }

    fn is_qcow2(self) -> bool {
        matches!(self, Kind::Qcow2 | Kind::Qcow2ExtendedL2)
    }

    /// The `--image-opts` string qemu-nbd's man page uses for this kind of image.
    fn opts(self, img: &Path) -> String {
        if self.is_qcow2() {
            format!(
                "driver=qcow2,encrypt.key-secret=sec0,file.filename={}",
                img.display()
            )
        } else {
            format!(
                "driver=luks,key-secret=sec0,file.filename={}",
                img.display()
            )
        }
    }
}

fn tools() -> bool {
    have("qemu-img") && have("qemu-io") && have("qemu-nbd")
}

/// qemu-io on an encrypted image through `--image-opts` (fails the test on any error or
/// pattern mismatch: qemu-io then exits 1).
fn qemu_io_enc(image_opts: &str, cmds: &[&str]) -> String {
    let mut c = Command::new("qemu-io");
    c.args(["--object", SECRET, "--image-opts"]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    ok(c.arg(image_opts))
}

/// qemu-io on an NBD export.
fn qemu_io_nbd(uri: &str, cmds: &[&str]) -> String {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    ok(c.arg(uri))
}

fn serve(opts: &str, extra: &[&str]) -> Server {
    let mut args = vec!["-t", "--object", SECRET];
    args.extend_from_slice(extra);
    args.extend(["--image-opts", opts]);
    Server::unix(QNBD, &args)
}

/// `qemu-img check` of an encrypted qcow2 (it needs the secret) finds nothing.
fn check_clean_enc(image_opts: &str) {
    let out = run(Command::new("qemu-img").args([
        "check",
        "--object",
        SECRET,
        "--image-opts",
        image_opts,
    ]));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("No errors were found"),
        "qemu-img check {image_opts}: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn round_trip(kind: Kind) {
    if !tools() {
        return;
    }
    let d = tmpdir();
    let img = kind.create(d.path(), "16M");
    let opts = kind.opts(&img);
    qemu_io_enc(
        &opts,
        &[
            "write -P 0x5a 0 1M",
            "write -P 0x11 5M 64k",
            "write -P 0x22 1000 3000",
        ],
    );
    let mut s = serve(&opts, &[]);
    qemu_io_nbd(
        &s.uri(),
        &[
            "read -P 0x5a 0 1000",
            "read -P 0x22 1000 3000",
            "read -P 0x5a 4000 1044576",
            "read -P 0x11 5M 64k",
            // Whole sectors, a cluster, and unaligned bytes (read-modify-write of sectors).
            "write -P 0x77 7M 4k",
            "write -P 0x78 100 1000",
            "write -P 0x79 9M 64k",
            "write -z 9M 4k",
            "write -P 0x7a 12582913 77",
            "read -P 0x78 100 1000",
            "read -P 0x5a 0 100",
            "read -P 0x0 9M 4k",
        ],
    );
    s.terminate().expect("qnbd exits on SIGTERM");
    qemu_io_enc(
        &opts,
        &[
            "read -P 0x5a 0 100",
            "read -P 0x78 100 1000",
            "read -P 0x22 1100 2900",
            "read -P 0x5a 4000 1044576",
            "read -P 0x11 5M 64k",
            "read -P 0x77 7M 4k",
            "read -P 0x0 9M 4k",
            "read -P 0x79 9441280 61440",
            "read -P 0x7a 12582913 77",
        ],
    );
    if kind.is_qcow2() {
        check_clean_enc(&opts);
    }
}

#[test]
fn luks_default_cipher_round_trips_with_qemu_io() {
    round_trip(Kind::LuksDefault);
}

#[test]
fn luks_aes128_cbc_essiv_round_trips_with_qemu_io() {
    round_trip(Kind::LuksCbcEssiv);
}

#[test]
fn qcow2_luks_round_trips_with_qemu_io_and_checks_clean() {
    round_trip(Kind::Qcow2);
}

#[test]
fn qcow2_luks_extended_l2_round_trips_and_checks_clean() {
    round_trip(Kind::Qcow2ExtendedL2);
}

/// A deterministic stream of writes (offsets and lengths of any alignment, some of them
/// zeroes) as qemu-io commands.
fn random_writes(seed: u64, n: usize, size: u64) -> Vec<String> {
    let mut x = seed;
    let mut next = move || {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        x >> 17
    };
    (0..n)
        .map(|i| {
            let aligned = next() % 3 != 0;
            let len = if aligned {
                512 * (1 + next() % 256)
            } else {
                1 + next() % 70000
            };
            let mut off = next() % (size - len);
            if aligned {
                off &= !511;
            }
            if i % 9 == 0 {
                format!("write -z {off} {len}")
            } else {
                format!("write -P {} {off} {len}", 1 + next() % 255)
            }
        })
        .collect()
}

fn random_writes_match_a_raw_copy(kind: Kind) {
    if !tools() {
        return;
    }
    let d = tmpdir();
    let size = 32u64 << 20;
    let img = kind.create(d.path(), "32M");
    let opts = kind.opts(&img);
    // Some data first, so copy-on-write has something to carry.
    qemu_io_enc(&opts, &["write -P 0x42 0 4M", "write -P 0x43 20M 3M"]);
    let copy = d.path().join("copy.raw");
    ok(Command::new("qemu-img")
        .args([
            "convert",
            "--object",
            SECRET,
            "--image-opts",
            &opts,
            "-O",
            "raw",
        ])
        .arg(&copy));
    let cmds = random_writes(11, 300, size);
    let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
    let mut s = serve(&opts, &[]);
    qemu_io_nbd(&s.uri(), &cmds);
    s.terminate().expect("qnbd exits on SIGTERM");
    ok(Command::new("qemu-io")
        .args(["-f", "raw"])
        .args(cmds.iter().flat_map(|c| ["-c", c]))
        .arg(&copy));
    let raw_opts = format!("driver=raw,file.filename={}", copy.display());
    let out = ok(Command::new("qemu-img").args([
        "compare",
        "--object",
        SECRET,
        "--image-opts",
        &opts,
        &raw_opts,
    ]));
    assert!(out.contains("Images are identical"), "{out}");
    if kind.is_qcow2() {
        check_clean_enc(&opts);
    }
}

#[test]
fn luks_random_writes_compare_equal_to_a_raw_copy() {
    random_writes_match_a_raw_copy(Kind::LuksDefault);
}

#[test]
fn luks_cbc_essiv_random_writes_compare_equal_to_a_raw_copy() {
    random_writes_match_a_raw_copy(Kind::LuksCbcEssiv);
}

#[test]
fn qcow2_luks_random_writes_compare_equal_to_a_raw_copy() {
    random_writes_match_a_raw_copy(Kind::Qcow2);
}

#[test]
fn qcow2_luks_extended_l2_random_writes_compare_equal_to_a_raw_copy() {
    random_writes_match_a_raw_copy(Kind::Qcow2ExtendedL2);
}

/// Copy-on-write of clusters shared with an internal snapshot moves encrypted data to new
/// host clusters: it must be re-encrypted for its new offset, and the snapshot kept.
#[test]
fn qcow2_luks_copy_on_write_from_a_snapshot_re_encrypts() {
    if !tools() {
        return;
    }
    let d = tmpdir();
    let img = Kind::Qcow2.create(d.path(), "8M");
    let opts = Kind::Qcow2.opts(&img);
    qemu_io_enc(&opts, &["write -P 0x31 0 2M"]);
    qemu_img(
        d.path(),
        &[
            "snapshot",
            "--object",
            SECRET,
            "-c",
            "s1",
            "--image-opts",
            &opts,
        ],
    );
    let mut s = serve(&opts, &[]);
    qemu_io_nbd(
        &s.uri(),
        &["write -P 0x32 4096 512", "write -P 0x33 1M 64k"],
    );
    s.terminate().expect("qnbd exits on SIGTERM");
    qemu_io_enc(
        &opts,
        &[
            "read -P 0x31 0 4096",
            "read -P 0x32 4096 512",
            "read -P 0x31 4608 1043968",
            "read -P 0x33 1M 64k",
            "read -P 0x31 1114112 983040",
        ],
    );
    check_clean_enc(&opts);
    let snap = d.path().join("s1.raw");
    ok(Command::new("qemu-img")
        .args([
            "convert",
            "--object",
            SECRET,
            "-l",
            "s1",
            "-O",
            "raw",
            "--image-opts",
            &opts,
        ])
        .arg(&snap));
    let bytes = std::fs::read(&snap).unwrap();
    assert!(
        bytes[..2 << 20].iter().all(|&b| b == 0x31),
        "the snapshot changed"
    );
}

/// `-s`: writes go to a temporary overlay over the encrypted image; the image is untouched.
#[test]
fn snapshot_mode_over_encrypted_images_leaves_them_alone() {
    if !tools() {
        return;
    }
    for kind in [Kind::LuksDefault, Kind::Qcow2] {
        let d = tmpdir();
        let img = kind.create(d.path(), "8M");
        let opts = kind.opts(&img);
        qemu_io_enc(&opts, &["write -P 0x5a 0 1M"]);
        let before = std::fs::read(&img).unwrap();
        let s = serve(&opts, &["-s"]);
        qemu_io_nbd(
            &s.uri(),
            &[
                "write -P 0x33 0 4k",
                "write -P 0x34 300 10",
                "read -P 0x33 0 300",
                "read -P 0x34 300 10",
                "read -P 0x5a 4k 1020k",
            ],
        );
        drop(s);
        assert!(
            std::fs::read(&img).unwrap() == before,
            "{kind:?}: -s wrote the image"
        );
    }
}

/// Run qnbd and qemu-nbd with `args`; both must fail with exit 1 and the same message.
fn same_failure(dir: &Path, args: &[&str]) -> String {
    let mut texts = Vec::new();
    for (bin, name) in [("qemu-nbd", "qemu-nbd"), (QNBD, "qnbd")] {
        let sock = dir.join(format!("{name}.sock"));
        let out = run(Command::new(bin)
            .current_dir(dir)
            .arg("-k")
            .arg(&sock)
            .args(args));
        assert_eq!(out.status.code(), Some(1), "{name} {args:?}: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr).replace(&format!("{name}:"), "PROG:");
        assert!(!err.contains("panicked"), "{err}");
        texts.push(err);
    }
    assert_eq!(texts[0], texts[1], "{args:?}");
    texts.remove(0)
}

#[test]
fn unlock_errors_match_qemu_nbd() {
    if !tools() {
        return;
    }
    let d = tmpdir();
    let luks = Kind::LuksDefault.create(d.path(), "4M");
    let qcow2 = Kind::Qcow2.create(d.path(), "4M");
    let lo = Kind::LuksDefault.opts(&luks);
    let qo = Kind::Qcow2.opts(&qcow2);
    let wrong = "Invalid password, cannot unlock any keyslot";
    for o in [&lo, &qo] {
        assert!(same_failure(d.path(), &["--object", WRONG, "--image-opts", o]).contains(wrong));
        // No secret object with the id.
        assert!(same_failure(d.path(), &["--image-opts", o]).contains("No secret with id 'sec0'"));
    }
    // No key-secret at all: probed, -f luks, or the option string without it.
    let l = luks.to_str().unwrap();
    let q = qcow2.to_str().unwrap();
    for args in [
        vec![l],
        vec!["-f", "luks", l],
        vec![q],
        vec!["--image-opts", &format!("driver=luks,file.filename={l}")],
    ] {
        assert!(same_failure(d.path(), &args).contains("key-secret' is required for cipher"));
    }
    // A secret that is no C string, and options qemu refuses.
    let pw = d.path().join("pw");
    std::fs::write(&pw, b"hunt\0er2").unwrap();
    let file_secret = format!("secret,id=sec0,file={}", pw.display());
    let cases: Vec<Vec<String>> = vec![
        vec![
            "--object".into(),
            file_secret,
            "--image-opts".into(),
            lo.clone(),
        ],
        vec![
            "--object".into(),
            SECRET.into(),
            "--image-opts".into(),
            format!("{qo},encrypt.format=aes"),
        ],
        vec![
            "--object".into(),
            SECRET.into(),
            "--image-opts".into(),
            format!("{qo},encrypt.iter-time=10"),
        ],
    ];
    for args in &cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        same_failure(d.path(), &args);
    }
}

#[test]
fn damaged_luks_headers_fail_like_qemu_nbd() {
    if !tools() {
        return;
    }
    let d = tmpdir();
    let luks = Kind::LuksDefault.create(d.path(), "4M");
    let full = std::fs::read(&luks).unwrap();
    // Inside the header, inside the key material, before the magic ends, before the
    // payload: each is a different refusal in qemu.
    for (n, want) in [
        (300usize, "overlapping"),
        (100_000, "Invalid password"),
        (3, "Volume is not in LUKS format"),
        (300_000, "Could not refresh total sector count"),
    ] {
        let t = d.path().join(format!("t{n}.luks"));
        std::fs::write(&t, &full[..n]).unwrap();
        let o = Kind::LuksDefault.opts(&t);
        let err = same_failure(d.path(), &["--object", SECRET, "--image-opts", &o]);
        assert!(err.contains(want), "{n}: {err}");
    }
    // A damaged slot count in an intact file.
    let mut bad = full.clone();
    bad[208 + 48 + 44..208 + 48 + 48].copy_from_slice(&3999u32.to_be_bytes());
    let t = d.path().join("stripes.luks");
    std::fs::write(&t, &bad).unwrap();
    let o = Kind::LuksDefault.opts(&t);
    let err = same_failure(d.path(), &["--object", SECRET, "--image-opts", &o]);
    assert!(
        err.contains("Keyslot 1 is corrupted (stripes 3999 != 4000)"),
        "{err}"
    );
}

/// The passphrase never reaches qnbd's diagnostics, even with everything logged: not when
/// it is wrong, not while an image is served.
#[test]
fn the_passphrase_is_not_logged() {
    if !tools() {
        return;
    }
    let d = tmpdir();
    let img = Kind::LuksDefault.create(d.path(), "4M");
    let opts = Kind::LuksDefault.opts(&img);
    let sock = d.path().join("x.sock");
    let out = run(Command::new(QNBD)
        .env("QNBD_LOG", "trace")
        .args(["-r", "--object", WRONG, "--image-opts", &opts, "-k"])
        .arg(&sock));
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains("Invalid password") && !text.contains("hunter"),
        "{text}"
    );
    let log = d.path().join("log");
    let mut child = Command::new(QNBD)
        .env("QNBD_LOG", "trace")
        .args(["-r", "--object", SECRET, "--image-opts", &opts, "-k"])
        .arg(&sock)
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    for _ in 0..500 {
        if sock.exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    ok(Command::new("qemu-io")
        .args(["-r", "-f", "raw", "-c", "read 0 64k"])
        .arg(format!("nbd+unix:///?socket={}", sock.display())));
    let _ = child.kill();
    let _ = child.wait();
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!text.contains("hunter"), "{text}");
}

/// Requests that are not whole sectors (libnbd without its alignment checks) are read,
/// patched and written back by qnbd, and land as qemu reads them.
#[test]
fn unaligned_requests_are_read_modify_written() {
    if !tools() || !have_nbdsh() {
        return;
    }
    for kind in [Kind::LuksCbcEssiv, Kind::Qcow2] {
        let d = tmpdir();
        let img = kind.create(d.path(), "4M");
        let opts = kind.opts(&img);
        qemu_io_enc(&opts, &["write -P 0x5a 0 64k"]);
        let mut s = serve(&opts, &[]);
        let script = "import nbd, sys\n\
            h = nbd.NBD()\n\
            h.connect_uri(sys.argv[1])\n\
            h.set_strict_mode(0)\n\
            h.pwrite(b'A' * 1000, 12345)\n\
            h.zero(50, 12400)\n\
            got = h.pread(1100, 12300)\n\
            assert got == b'Z' * 45 + b'A' * 55 + bytes(50) + b'A' * 895 + b'Z' * 55, got\n";
        ok(Command::new(PYTHON).args(["-c", script, &s.uri()]));
        s.terminate().expect("qnbd exits on SIGTERM");
        qemu_io_enc(
            &opts,
            &[
                "read -P 0x5a 0 12345",
                "read -P 0x41 12345 55",
                "read -P 0 12400 50",
                "read -P 0x41 12450 895",
                "read -P 0x5a 13345 52191",
            ],
        );
    }
}
