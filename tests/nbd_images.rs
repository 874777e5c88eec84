//! Images stored on another NBD server (`qnbd nbd+unix:///?socket=…`, `--image-opts
//! driver=nbd,…`, a format over one with `file.driver=nbd`), as qemu-nbd serves them: the
//! same bytes, writes and block status passed through, formats and `-s` over the export,
//! TLS to the upstream server, qemu-nbd's words for every name and option it refuses, and a
//! lost upstream failing requests (EIO), not the server, and reached again when it is back
//! (`reconnect-delay`, `open-timeout`, the flush after a loss).
//! (The concurrent verifier through a re-export is in `data_safety.rs`.)

mod common;
use common::pki::pki;
use common::*;
use std::path::Path;
use std::process::Command;

fn map(uri: &str) -> String {
    ok(Command::new("qemu-img").args(["map", "--output=json", "-f", "raw", uri]))
}

fn compare(a: &str, fmt_a: &str, b: &str) -> String {
    ok(Command::new("qemu-img").args(["compare", "-f", fmt_a, "-F", "raw", a, b]))
}

/// A 16 MiB raw file with data, zeroes and a hole.
fn image(d: &Path) -> String {
    let p = make_raw(
        d,
        "up.raw",
        16 << 20,
        &[(0, &[7u8; 65536]), (5 << 20, &[9u8; 300_000])],
    );
    p.to_str().unwrap().to_string()
}

#[test]
fn a_raw_export_is_served_written_and_mapped_through() {
    if !have("qemu-img") || !have("qemu-io") {
        return;
    }
    let d = tmpdir();
    let up_path = image(d.path());
    let reference = d.path().join("ref.raw");
    std::fs::copy(&up_path, &reference).unwrap();
    // Two clients at once: the re-exporting server and qemu-img.
    let up = Server::unix(QNBD, &["-t", "-e", "2", "-f", "raw", &up_path]);
    let mut proxy = Server::unix(QNBD, &["-t", "-f", "raw", &up.uri()]);
    assert!(compare(&up_path, "raw", &proxy.uri()).contains("Images are identical"));
    assert_eq!(
        map(&proxy.uri()),
        map(&up.uri()),
        "block status passes through"
    );
    let writes = [
        "write -P 0x11 1000 3000",
        "write -P 0x22 1M 2M",
        "write -z 6M 1M",
        "write -z -u 8M 64k",
        "write -P 0x33 -f 15M 4k",
        "flush",
    ];
    qemu_io(d.path(), "raw", &proxy.uri(), &writes);
    qemu_io(d.path(), "raw", reference.to_str().unwrap(), &writes);
    proxy.terminate();
    drop(up);
    let out = ok(Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw", &up_path])
        .arg(&reference));
    assert!(out.contains("Images are identical"), "{out}");
}

/// A qcow2 image held by an NBD server as plain bytes: probed and served as qcow2 through
/// the export, as qemu-nbd does; `-s` keeps the writes out of it.
#[test]
fn a_format_and_an_overlay_sit_on_an_nbd_export() {
    if !have("qemu-img") || !have("qemu-io") || !have("qemu-nbd") {
        return;
    }
    let d = tmpdir();
    let raw = image(d.path());
    let q = d.path().join("img.qcow2");
    ok(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2", &raw])
        .arg(&q));
    // Room to allocate in: an export does not grow.
    ok(Command::new("truncate").args(["-s", "+16M"]).arg(&q));
    let up = Server::unix(QNBD, &["-t", "-e", "2", "-f", "raw", q.to_str().unwrap()]);
    let before = std::fs::read(&q).unwrap();
    {
        let s = Server::unix(QNBD, &["-t", "-r", &up.uri()]);
        assert!(compare(&raw, "raw", &s.uri()).contains("Images are identical"));
        let ours = map(&s.uri());
        drop(s);
        let theirs = Server::unix("qemu-nbd", &["-t", "-r", &up.uri()]);
        assert_eq!(
            ours,
            map(&theirs.uri()),
            "block status differs from qemu-nbd's"
        );
    }
    let s = Server::unix(QNBD, &["-t", "-s", "-f", "qcow2", &up.uri()]);
    qemu_io(
        d.path(),
        "raw",
        &s.uri(),
        &["write -P 0x55 0 1M", "read -P 0x55 0 1M"],
    );
    drop(s);
    let s = Server::unix(QNBD, &["-t", "-f", "qcow2", &up.uri()]);
    qemu_io(
        d.path(),
        "raw",
        &s.uri(),
        &["read -P 7 0 64k", "write -P 0x66 2M 64k"],
    );
    drop(s);
    drop(up);
    assert!(
        std::fs::read(&q).unwrap() != before,
        "the write went nowhere"
    );
    check_clean(&q);
    qemu_io(
        d.path(),
        "qcow2",
        q.to_str().unwrap(),
        &["read -P 0x66 2M 64k", "read -P 7 0 64k"],
    );
}

/// What qemu-nbd prints when it refuses `name` (or, with `image_opts`, an option string).
fn refusal(bin: &str, d: &Path, name: &str, image_opts: bool) -> String {
    let sock = d.join("r.sock");
    let mut c = Command::new("timeout");
    c.args(["10", bin, "-k", sock.to_str().unwrap()]);
    if image_opts {
        c.arg("--image-opts");
    } else {
        c.args(["-f", "raw"]);
    }
    let out = run(c.arg(name));
    assert_eq!(out.status.code(), Some(1), "{bin} {name}");
    String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter(|l| !l.contains("GLib"))
        .collect::<Vec<_>>()
        .join("\n")
        .replace("qemu-nbd:", "qnbd:")
}

#[test]
fn names_and_options_are_refused_in_qemu_nbds_words() {
    if !have("qemu-nbd") {
        return;
    }
    let d = tmpdir();
    let raw = image(d.path());
    let up = Server::unix(QNBD, &["-t", "-r", "-f", "raw", "-x", "exp1", &raw]);
    let sock = up.socket.clone().unwrap().display().to_string();
    let names = [
        format!("nbd+unix:///nope?socket={sock}"),
        // A read-only export opened for writing.
        format!("nbd+unix:///exp1?socket={sock}"),
        "nbd+unix:///?socket=/nonexistent.sock".into(),
        "nbd+unix:///exp".into(),
        "nbd://".into(),
        "nbd+bogus://x/".into(),
        "nbd:unix:/nonexistent.sock:exportname=e".into(),
        "nbd:".into(),
        "nbd:foo".into(),
        "nbd://h/?socket=x".into(),
    ];
    for n in &names {
        assert_eq!(
            refusal(QNBD, d.path(), n, false),
            refusal("qemu-nbd", d.path(), n, false),
            "{n}"
        );
    }
    let opts = [
        "driver=nbd".to_string(),
        "driver=nbd,server.type=unix".into(),
        "driver=nbd,server.path=/x".into(),
        "driver=nbd,server.type=inet,server.host=127.0.0.1".into(),
        "driver=nbd,server.type=bogus".into(),
        format!("driver=nbd,server.type=unix,server.path={sock},export=exp1,tls-creds=nope"),
        format!("driver=nbd,server.type=unix,server.path={sock},export=exp1,read-only=on,bogus=1"),
        format!("driver=qcow2,file.driver=nbd,file.server.type=unix,file.server.path={sock},file.export=exp1,read-only=on"),
    ];
    for o in &opts {
        assert_eq!(
            refusal(QNBD, d.path(), o, true),
            refusal("qemu-nbd", d.path(), o, true),
            "{o}"
        );
    }
}

/// `--image-opts driver=nbd` over TLS with x509 certificates, and the refusal of a server
/// that wants TLS when none is offered, as qemu-nbd words it.
#[test]
fn an_export_behind_tls_is_reached_with_tls_creds() {
    if !have("qemu-img") || !have("qemu-nbd") || !have("certtool") {
        return;
    }
    let p = pki();
    let d = tmpdir();
    let raw = image(d.path());
    let server_obj = format!(
        "tls-creds-x509,id=tls0,endpoint=server,dir={},verify-peer=off",
        p.server.display()
    );
    let up = Server::tcp(
        QNBD,
        &[
            "-t",
            "-f",
            "raw",
            "--object",
            &server_obj,
            "--tls-creds",
            "tls0",
            &raw,
        ],
    );
    let port = up.port.unwrap();
    let client_obj = format!(
        "tls-creds-x509,id=tls1,endpoint=client,dir={}",
        p.client.display()
    );
    let opts = format!(
        "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={port},tls-creds=tls1,tls-hostname=localhost"
    );
    let s = Server::unix(
        QNBD,
        &["-t", "-r", "--object", &client_obj, "--image-opts", &opts],
    );
    assert!(compare(&raw, "raw", &s.uri()).contains("Images are identical"));
    drop(s);
    let plain = format!("driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={port}");
    let refuse = |bin: &str| refusal(bin, d.path(), &plain, true);
    assert_eq!(refuse(QNBD), refuse("qemu-nbd"));
}

/// The upstream server goes away: requests fail with EIO, the re-exporting server stays up
/// and exits cleanly when told to.
#[test]
fn a_lost_upstream_fails_requests_not_the_server() {
    if !have("qemu-io") {
        return;
    }
    let d = tmpdir();
    let raw = image(d.path());
    let mut up = Server::unix(QNBD, &["-t", "-f", "raw", &raw]);
    let mut s = Server::unix(QNBD, &["-t", "-f", "raw", &up.uri()]);
    qemu_io(d.path(), "raw", &s.uri(), &["read -P 7 0 64k"]);
    up.terminate();
    let out = run(Command::new("qemu-io")
        .args(["-f", "raw", "-c", "read 0 64k", "-c", "write 0 4k"])
        .arg(s.uri()));
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains("read failed: Input/output error")
            && text.contains("write failed: Input/output error"),
        "{text}"
    );
    assert!(s.terminate().is_some(), "the server did not exit");
}

/// A server that refuses requests smaller than its 4 KiB minimum block (nbdkit's
/// blocksize-policy filter): reads are widened and partial blocks written by read-modify-
/// write, so unaligned writes and zeroes land as on a plain file.
#[test]
fn a_server_with_a_minimum_block_size_gets_aligned_requests() {
    if !have("qemu-io") || !have("nbdkit") {
        return;
    }
    let d = tmpdir();
    let up_path = image(d.path());
    let reference = d.path().join("ref.raw");
    std::fs::copy(&up_path, &reference).unwrap();
    let sock = d.path().join("kit.sock");
    let mut kit = Command::new("nbdkit")
        .args(["-f", "-U"])
        .arg(&sock)
        .args([
            "--filter=blocksize-policy",
            "file",
            &up_path,
            "blocksize-minimum=4096",
            "blocksize-error-policy=error",
        ])
        .spawn()
        .expect("nbdkit");
    wait_for_socket(&sock);
    let up = format!("nbd+unix:///?socket={}", sock.display());
    let mut s = Server::unix(QNBD, &["-t", "-f", "raw", &up]);
    let writes = [
        "write -P 0x11 1000 3000",
        "write -P 0x22 4097 100",
        "write -z 7 1000",
        "write -z 8191 70000",
        "write -P 0x33 -f 16776704 512",
        "flush",
    ];
    qemu_io(d.path(), "raw", &s.uri(), &writes);
    qemu_io(d.path(), "raw", reference.to_str().unwrap(), &writes);
    assert!(compare(reference.to_str().unwrap(), "raw", &s.uri()).contains("Images are identical"));
    s.terminate();
    let _ = kit.kill();
    let _ = kit.wait();
    let out = ok(Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw", &up_path])
        .arg(&reference));
    assert!(out.contains("Images are identical"), "{out}");
}

/// Until a server started in the background has made its socket (4 s at most).
fn wait_for_socket(sock: &Path) {
    for _ in 0..200 {
        if sock.exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// tests/tools/hostile_nbd_server.py in `mode` on `sock`, killed when dropped (also when a
/// test fails: it would hold the test's output pipe open).
struct Hostile(std::process::Child);

impl Hostile {
    fn start(sock: &Path, mode: &str) -> Hostile {
        let tool = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/tools/hostile_nbd_server.py");
        let child = Command::new(PYTHON)
            .arg(&tool)
            .arg(sock)
            .args([mode, "1"])
            .spawn()
            .expect("hostile server");
        wait_for_socket(sock);
        Hostile(child)
    }
}

impl Drop for Hostile {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A server that breaks the protocol: at open, qnbd refuses it (exit 1, no hang, no
/// panic); once serving, the requests it breaks fail with EIO and qnbd stays up.
#[test]
fn a_hostile_upstream_fails_cleanly() {
    if !have("qemu-io") {
        return;
    }
    let d = tmpdir();
    for mode in [
        "magic",
        "cookie",
        "bigchunk",
        "outside",
        "shortdata",
        "holebad",
        "badblock",
        "late",
    ] {
        let sock = d.path().join(format!("{mode}.sock"));
        let _evil = Hostile::start(&sock, mode);
        let up = format!("nbd+unix:///?socket={}", sock.display());
        if mode != "late" {
            // Probing reads the first sector: the hostile reply comes at open.
            let out = run(Command::new("timeout")
                .args(["20", QNBD, "-t", "-k"])
                .arg(d.path().join("p.sock"))
                .arg(&up));
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(1), "{mode}: {err}");
            assert!(!err.contains("panicked"), "{mode}: {err}");
        } else {
            let mut s = Server::unix(QNBD, &["-t", "-f", "raw", &up]);
            let out = run(Command::new("qemu-io")
                .args([
                    "-f",
                    "raw",
                    "-c",
                    "read 0 4k",
                    "-c",
                    "write 0 4k",
                    "-c",
                    "read 1M 4k",
                ])
                .arg(s.uri()));
            let text = String::from_utf8_lossy(&out.stdout);
            // The broken replies fail their requests (the first ones may still be good).
            assert!(text.matches("Input/output error").count() >= 2, "{text}");
            assert!(
                s.terminate().is_some_and(|st| st.success()),
                "{mode}: the server did not exit cleanly"
            );
        }
    }
}

/// A reply that ends without covering its whole read (data for half of it, then DONE) is
/// framed correctly but leaves half the read unsaid: that read fails with EIO (never
/// returning whatever the buffer held before), the connection stays, other requests work.
#[test]
fn a_read_the_upstream_leaves_half_unsaid_fails() {
    if !have("qemu-io") {
        return;
    }
    let d = tmpdir();
    let sock = d.path().join("uncovered.sock");
    let _evil = Hostile::start(&sock, "uncovered");
    let up = format!("nbd+unix:///?socket={}", sock.display());
    let mut s = Server::unix(QNBD, &["-t", "-f", "raw", &up]);
    let out = run(Command::new("qemu-io")
        .args([
            "-f",
            "raw",
            "-c",
            "read 0 64k",
            "-c",
            "write 0 4k",
            "-c",
            "read 1M 4k",
        ])
        .arg(s.uri()));
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().filter(|l| !l.starts_with(' ')).collect();
    assert!(
        lines[0].contains("read failed: Input/output error"),
        "{text}"
    );
    assert!(
        lines.iter().any(|l| l.starts_with("wrote 4096/4096")),
        "{text}"
    );
    assert_eq!(text.matches("Input/output error").count(), 2, "{text}");
    assert!(
        s.terminate().is_some_and(|st| st.success()),
        "the server did not exit cleanly"
    );
}

/// Probing an export (no `-f`) that holds raw data: qemu-nbd's warning, naming the export as
/// qemu names it (`nbd+unix://?socket=…`).
#[test]
fn probing_an_export_warns_as_qemu_nbd() {
    if !have("qemu-nbd") {
        return;
    }
    let d = tmpdir();
    let raw = image(d.path());
    let up = Server::unix(QNBD, &["-t", "-e", "0", "-f", "raw", &raw]);
    let sock = up.socket.clone().unwrap().display().to_string();
    for name in [up.uri(), format!("nbd:unix:{sock}")] {
        let first_line = |bin: &str| {
            let out = run(Command::new("timeout")
                .args(["2", bin, "-t", "-k"])
                .arg(d.path().join("w.sock"))
                .arg(&name));
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .next()
                .unwrap_or("")
                .to_string()
        };
        let ours = first_line(QNBD);
        assert!(
            ours.starts_with("WARNING: Image format was not specified"),
            "{ours}"
        );
        assert_eq!(ours, first_line("qemu-nbd"), "{name}");
    }
}

/// An upstream qnbd, killed (as in a crash) when dropped.
struct Upstream(std::process::Child);

impl Drop for Upstream {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// An upstream qnbd at a fixed socket path (so it can be restarted there), ready.
fn upstream_at(sock: &Path, raw: &str) -> Upstream {
    let _ = std::fs::remove_file(sock);
    let child = Command::new(QNBD)
        .args(["-t", "-f", "raw", "-k"])
        .arg(sock)
        .arg(raw)
        .stdin(std::process::Stdio::null())
        .spawn()
        .expect("spawn the upstream server");
    let up = Upstream(child);
    let start = std::time::Instant::now();
    while std::os::unix::net::UnixStream::connect(sock).is_err() {
        assert!(start.elapsed().as_secs() < 20, "the upstream is not ready");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    up
}

fn crash(up: Upstream) {
    drop(up);
}

/// `driver=raw,file.driver=nbd,…` with `extra` options, over the socket `sock`.
fn nbd_image_opts(sock: &Path, extra: &str) -> String {
    format!(
        "driver=raw,file.driver=nbd,file.server.type=unix,file.server.path={}{extra}",
        sock.display()
    )
}

/// The upstream server dies and comes back within `reconnect-delay`: the requests sent
/// meanwhile wait for it and succeed, as qemu's; the data is all there.
#[test]
fn a_restarted_upstream_is_reached_again_within_reconnect_delay() {
    if !have("qemu-io") {
        return;
    }
    let d = tmpdir();
    let raw = image(d.path());
    let sock = d.path().join("up.sock");
    let up = upstream_at(&sock, &raw);
    let opts = nbd_image_opts(&sock, ",file.reconnect-delay=30");
    let mut s = Server::unix(QNBD, &["-t", "--image-opts", &opts]);
    qemu_io(d.path(), "raw", &s.uri(), &["write -P 0x44 0 64k", "flush"]);
    crash(up);
    let restart = {
        let (sock, raw) = (sock.clone(), raw.clone());
        std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(1500));
            upstream_at(&sock, &raw)
        })
    };
    let out = qemu_io(
        d.path(),
        "raw",
        &s.uri(),
        &[
            "write -P 0x55 64k 64k",
            "read -P 0x44 0 64k",
            "read -P 0x55 64k 64k",
            "flush",
        ],
    );
    assert!(!out.contains("failed"), "{out}");
    let up = restart.join().unwrap();
    assert!(s.terminate().is_some(), "the server did not exit");
    crash(up);
    qemu_io(
        d.path(),
        "raw",
        &raw,
        &["read -P 0x44 0 64k", "read -P 0x55 64k 64k"],
    );
}

/// Without `reconnect-delay`, requests fail while the upstream is away, and work again once
/// the connection has been made again in the background (qemu's connect thread).
#[test]
fn requests_work_again_once_a_lost_upstream_is_back() {
    if !have("qemu-io") {
        return;
    }
    let d = tmpdir();
    let raw = image(d.path());
    let sock = d.path().join("up.sock");
    let up = upstream_at(&sock, &raw);
    let mut s = Server::unix(QNBD, &["-t", "--image-opts", &nbd_image_opts(&sock, "")]);
    qemu_io(d.path(), "raw", &s.uri(), &["read -P 7 0 64k"]);
    crash(up);
    let out = run(Command::new("qemu-io")
        .args(["-f", "raw", "-c", "read 0 64k"])
        .arg(s.uri()));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("read failed: Input/output error"), "{text}");
    let up = upstream_at(&sock, &raw);
    let start = std::time::Instant::now();
    loop {
        let out = run(Command::new("qemu-io")
            .args(["-f", "raw", "-c", "read -P 7 0 64k"])
            .arg(s.uri()));
        if out.status.success() && !String::from_utf8_lossy(&out.stdout).contains("failed") {
            break;
        }
        assert!(start.elapsed().as_secs() < 40, "never reconnected");
        std::thread::sleep(std::time::Duration::from_millis(300));
    }
    assert!(s.terminate().is_some(), "the server did not exit");
    crash(up);
}

/// Writes acknowledged but not flushed when the connection was lost may have died with the
/// server: every flush from then on says so (EIO), as after a local file's failed fsync;
/// reads and writes go on.
#[test]
fn a_flush_after_a_lost_connection_reports_the_unflushed_writes() {
    if !have_nbdsh() {
        return;
    }
    use std::io::{BufRead, Write};
    let d = tmpdir();
    let raw = image(d.path());
    let sock = d.path().join("up.sock");
    let up = upstream_at(&sock, &raw);
    let opts = nbd_image_opts(&sock, ",file.reconnect-delay=30");
    let mut s = Server::unix(QNBD, &["-t", "--image-opts", &opts]);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/nbdsh/flush_after_loss.py");
    let mut client = Command::new(PYTHON)
        .arg(script)
        .arg(s.uri())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(client.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().unwrap().unwrap(), "written");
    crash(up);
    let up = upstream_at(&sock, &raw);
    writeln!(client.stdin.as_mut().unwrap()).unwrap();
    let rest: Vec<String> = lines.map(|l| l.unwrap()).collect();
    assert!(client.wait().unwrap().success(), "{rest:?}");
    assert_eq!(
        rest,
        ["flush: EIO", "second flush: EIO", "first: a", "second: b"],
        "every flush after the loss fails; the data is still read back"
    );
    assert!(s.terminate().is_some(), "the server did not exit");
    crash(up);
}

/// `open-timeout`: the server keeps trying its first connection until the upstream is
/// there (qemu's connect thread); without it, one failed attempt ends the open.
#[test]
fn open_timeout_waits_for_the_upstream() {
    if !have("qemu-io") {
        return;
    }
    let d = tmpdir();
    let raw = image(d.path());
    let sock = d.path().join("up.sock");
    let out = run(Command::new(QNBD)
        .args(["-r", "-k"])
        .arg(d.path().join("x.sock"))
        .args(["--image-opts", &nbd_image_opts(&sock, "")]));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("Failed to connect to"), "{err}");
    let later = {
        let (sock, raw) = (sock.clone(), raw.clone());
        std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(1500));
            upstream_at(&sock, &raw)
        })
    };
    let opts = nbd_image_opts(&sock, ",file.open-timeout=30");
    let mut s = Server::unix(QNBD, &["--image-opts", &opts]);
    qemu_io(d.path(), "raw", &s.uri(), &["read -P 7 0 64k"]);
    assert!(s.terminate().is_some(), "the server did not exit");
    crash(later.join().unwrap());
}

/// A server that comes back with another export (here: another size) is not taken: the
/// requests keep failing, and the log says why.
#[test]
fn a_different_export_after_a_restart_is_refused() {
    if !have("qemu-io") {
        return;
    }
    let d = tmpdir();
    let raw = image(d.path());
    let bigger = make_raw(d.path(), "bigger.raw", 32 << 20, &[]);
    let sock = d.path().join("up.sock");
    let up = upstream_at(&sock, &raw);
    let log = d.path().join("proxy.log");
    let psock = d.path().join("proxy.sock");
    let mut proxy = Command::new(QNBD)
        .args(["-t", "-k"])
        .arg(&psock)
        .args(["--image-opts", &nbd_image_opts(&sock, "")])
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let uri = format!("nbd+unix:///?socket={}", psock.display());
    // Served once a read works: qnbd listens before it opens the image, as qemu-nbd, and
    // a crash during that open would make the proxy exit instead.
    let start = std::time::Instant::now();
    while !run(Command::new("qemu-io").args(["-f", "raw", "-c", "read 0 4k", &uri]))
        .status
        .success()
    {
        assert!(start.elapsed().as_secs() < 20, "the proxy is not ready");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    crash(up);
    let other = upstream_at(&sock, bigger.to_str().unwrap());
    std::thread::sleep(std::time::Duration::from_millis(2500));
    let out = run(Command::new("qemu-io").args(["-f", "raw", "-c", "read 0 64k", &uri]));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("read failed: Input/output error"),
        "{text}{}{}",
        String::from_utf8_lossy(&out.stderr),
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    let _ = proxy.kill();
    let _ = proxy.wait();
    drop(other);
    let err = std::fs::read_to_string(&log).unwrap();
    assert!(
        err.contains("not the same export: the export's size is now 33554432 (was 16777216)"),
        "{err}"
    );
}
