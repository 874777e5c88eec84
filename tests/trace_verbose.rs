//! What qnbd prints while it serves, against qemu-nbd: `-v` adds nothing (with and without
//! `--fork`), failed negotiations are reported in qemu's words, and `-T` writes qemu's
//! `nbd_*` trace lines.

mod common;
use common::*;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

/// Run `bin` with `args` on a private socket, run `clients` against it, stop it; returns
/// (stdout, stderr).
fn session(bin: &str, dir: &Path, args: &[&str], clients: impl Fn(&str)) -> (String, String) {
    let sock = dir.join(format!(
        "{}.sock",
        Path::new(bin).file_name().unwrap().to_string_lossy()
    ));
    let out = dir.join("out");
    let err = dir.join("err");
    let mut child = Command::new(bin)
        .args(args)
        .arg("-k")
        .arg(&sock)
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap())
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    for _ in 0..250 {
        if sock.exists() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    clients(&format!("nbd+unix:///?socket={}", sock.display()));
    let _ = Command::new("kill").arg(child.id().to_string()).status();
    let _ = child.wait();
    (
        std::fs::read_to_string(out).unwrap(),
        std::fs::read_to_string(err).unwrap(),
    )
}

fn use_export(uri: &str) {
    ok(Command::new("qemu-io").args(["-f", "raw", "-c", "write 0 512", "-c", "read 0 512", uri]));
    ok(Command::new("nbdinfo").arg(uri));
}

#[test]
fn verbose_serving_prints_what_qemu_nbd_prints() {
    if !have("qemu-nbd") || !have("qemu-io") || !have("nbdinfo") {
        return;
    }
    let d = tmpdir();
    let img = make_raw(d.path(), "a.img", 1 << 20, &[]);
    let i = img.to_str().unwrap();
    let ours = session(QNBD, d.path(), &["-v", "-t", "-f", "raw", i], use_export);
    let theirs = session(
        "qemu-nbd",
        d.path(),
        &["-v", "-t", "-f", "raw", i],
        use_export,
    );
    assert_eq!(ours, theirs);
    assert_eq!(ours, (String::new(), String::new()));
}

/// (qemu-nbd does the same: it prints nothing and its parent exits 0.)
#[test]
fn fork_with_verbose_starts_and_returns_at_once() {
    let d = tmpdir();
    let img = make_raw(d.path(), "a.img", 1 << 20, &[]);
    {
        let bin = QNBD;
        let sock = d.path().join("f.sock");
        let pid = d.path().join("pid");
        // As qemu-nbd, the daemon keeps the caller's stderr under -v (its later messages go
        // there), so a pipe would stay open: the caller's streams are files here.
        let err = d.path().join("stderr");
        let outf = d.path().join("stdout");
        let status = Command::new(bin)
            .args(["-v", "--fork", "-f", "raw", "--pid-file"])
            .arg(&pid)
            .arg("-k")
            .arg(&sock)
            .arg(&img)
            .stdout(std::fs::File::create(&outf).unwrap())
            .stderr(std::fs::File::create(&err).unwrap())
            .status()
            .unwrap();
        assert!(status.success(), "{bin}: {status:?}");
        let (o, e) = (
            std::fs::read_to_string(&outf).unwrap(),
            std::fs::read_to_string(&err).unwrap(),
        );
        assert!(o.is_empty() && e.is_empty(), "{bin}: {o}{e}");
        let server: String = std::fs::read_to_string(&pid).unwrap().trim().to_string();
        let _ = Command::new("kill").arg(&server).status();
        std::thread::sleep(Duration::from_millis(300));
    }
}

#[test]
fn failed_negotiations_are_reported_as_qemu_nbd_reports_them() {
    if !have("qemu-nbd") {
        return;
    }
    let d = tmpdir();
    let img = make_raw(d.path(), "a.img", 1 << 20, &[]);
    let hostile = |uri: &str| {
        use std::io::{Read, Write};
        let path = uri.split("socket=").nth(1).unwrap().to_string();
        let connect = || {
            let mut s = std::os::unix::net::UnixStream::connect(&path).unwrap();
            let mut g = [0u8; 18];
            s.read_exact(&mut g).unwrap();
            s
        };
        let pause = || std::thread::sleep(Duration::from_millis(150));
        drop(connect());
        pause();
        let mut s = connect();
        s.write_all(&0x80u32.to_be_bytes()).unwrap();
        pause();
        let mut s = connect();
        s.write_all(&3u32.to_be_bytes()).unwrap();
        s.write_all(b"IHAVEOPX\0\0\0\x01\0\0\0\0").unwrap();
        pause();
        let mut s = connect();
        s.write_all(&3u32.to_be_bytes()).unwrap();
        s.write_all(b"IHAVEOPT\0\0\0\x01\0\0\0\x04ab").unwrap();
        drop(s);
        pause();
    };
    let i = img.to_str().unwrap();
    let (_, ours) = session(QNBD, d.path(), &["-t", "-f", "raw", i], hostile);
    let (_, theirs) = session("qemu-nbd", d.path(), &["-t", "-f", "raw", i], hostile);
    assert_eq!(ours.replace("qnbd:", "qemu-nbd:"), theirs);
    assert_eq!(ours.lines().count(), 3, "{ours}");
}

/// (On a fully allocated image: qemu sends short reads over holes as data and hole chunks,
/// qnbd only reads of 64 KiB and more, which the trace would show.)
#[test]
fn trace_points_are_qemus() {
    if !have("qemu-nbd") || !have("qemu-io") || !have("nbdinfo") {
        return;
    }
    let d = tmpdir();
    let img = make_raw(d.path(), "a.img", 1 << 20, &[(0, &[1u8; 1 << 20])]);
    let i = img.to_str().unwrap();
    let lines = |bin: &str| {
        let file = d.path().join(format!(
            "trace-{}",
            Path::new(bin).file_name().unwrap().to_string_lossy()
        ));
        let spec = format!("nbd_*,file={}", file.display());
        session(
            bin,
            d.path(),
            &["-T", &spec, "-t", "-f", "raw", i],
            use_export,
        );
        std::fs::read_to_string(&file)
            .unwrap()
            .lines()
            // The order of "Reading request" depends on the threads; data is a pointer.
            .filter(|l| !l.starts_with("nbd_trip "))
            .map(|l| match l.find("data = 0x") {
                Some(at) => format!(
                    "{}data = P{}",
                    &l[..at],
                    &l[at..].split_once(',').map_or("", |x| x.1)
                ),
                None => l.to_string(),
            })
            .collect::<Vec<_>>()
    };
    let ours = lines(QNBD);
    assert!(ours.len() > 40, "{ours:?}");
    assert_eq!(ours, lines("qemu-nbd"));
    let help = ok(Command::new(QNBD).args(["-T", "help"]));
    assert!(help.lines().any(|l| l == "nbd_negotiate_begin"), "{help}");
}
