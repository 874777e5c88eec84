//! The command line side by side with qemu-nbd: errors, exit on last client vs -t, --fork
//! with --pid-file, signals, the handshake limit.

mod common;
use common::*;
use std::io::Read;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// Run `bin args` expecting failure; returns stderr with the program name replaced by PROG
/// (both argv[0] as run, which some lines print whole, and its basename, the messages' prefix).
fn fails(bin: &str, args: &[&str]) -> String {
    let out = run(Command::new(bin).args(args));
    assert_eq!(
        out.status.code(),
        Some(1),
        "{bin} {args:?} should exit 1: {out:?}"
    );
    let name = if bin == QNBD { "qnbd" } else { "qemu-nbd" };
    let mut text = String::from_utf8_lossy(&out.stderr).into_owned();
    for prog in [bin, name] {
        text = text
            .replace(&format!("{prog}:"), "PROG:")
            .replace(&format!("`{prog} "), "`PROG ");
    }
    text
}

/// Held by the tests that run qemu-nbd's failing command lines: qemu-nbd binds the default
/// port (10809) before it opens the image, so two at once would fail with "Failed to find an
/// available port" instead.
static DEFAULT_PORT: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn default_port() -> std::sync::MutexGuard<'static, ()> {
    DEFAULT_PORT.lock().unwrap_or_else(|e| e.into_inner())
}

/// Every command line whose error tests compare with qemu-nbd's; `img` is a 1 MiB raw image.
fn error_cases(img: &str) -> Vec<Vec<&str>> {
    vec![
        vec!["/nonexistent.img"],
        vec!["-f", "bogus", img],
        vec!["-f", "qcow2", img],
        vec!["-e", "-1", img],
        vec!["-e", "abc", img],
        vec!["-o", "1M", img],
        vec!["--handshake-limit=x", img],
        vec!["-k", "rel.sock", img],
        vec![],
        vec![img, img],
        vec!["--bogus-option", img],
        vec!["-L", img],
        vec!["-L", "-x", "foo"],
        vec!["--fork", "-L"],
        vec!["--tls-authz=a", img],
        vec!["--image-opts", "-f", "raw", img],
        vec!["-o", "999999999999", "-f", "raw", img],
        vec!["-c", "/dev/nbd99", "-f", "raw", img],
        vec!["-l", "snap0", "-f", "raw", img],
        vec!["-d", "/dev/nbd99"],
        vec!["-c", "/dev/nbd0", "-x", "foo", "-v", "-f", "raw", img],
        vec!["--selinux-label", "foo", "-f", "raw", img],
        vec![
            "--selinux-label",
            "foo",
            "-k",
            "/tmp/qnbd-cli-se.sock",
            "-f",
            "raw",
            img,
        ],
        // The socket is made before the image is opened, as qemu-nbd does.
        vec!["-k", "/nonexistent/dir/s.sock", "/nonexistent.img"],
    ]
}

#[test]
fn errors_match_qemu_nbd() {
    let dir = tmpdir();
    let img = make_raw(dir.path(), "e.raw", 1 << 20, &[]);
    let img = img.to_str().unwrap();
    let _port = default_port();
    for args in error_cases(img) {
        let ours = fails(QNBD, &args);
        assert!(!ours.is_empty());
        if have("qemu-nbd") {
            let theirs = fails("qemu-nbd", &args);
            assert_eq!(ours, theirs, "stderr differs for {args:?}");
        }
    }
}

#[test]
fn port_in_use_is_an_error() {
    let dir = tmpdir();
    let img = make_raw(dir.path(), "p.raw", 1 << 20, &[]);
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port().to_string();
    let msg = fails(
        QNBD,
        &[
            "-f",
            "raw",
            "-b",
            "127.0.0.1",
            "-p",
            &port,
            img.to_str().unwrap(),
        ],
    );
    assert_eq!(
        msg,
        "PROG: Failed to find an available port: Address already in use\n"
    );
}

#[test]
fn exits_after_the_last_client_unless_persistent() {
    if !have("qemu-io") {
        return;
    }
    let dir = tmpdir();
    let img = make_raw(dir.path(), "x.raw", 1 << 20, &[]);
    let mut s = Server::unix(QNBD, &["-f", "raw", img.to_str().unwrap()]);
    ok(Command::new("qemu-io").args(["-f", "raw", "-c", "read 0 512", &s.uri()]));
    let st = s
        .wait_exit(Duration::from_secs(10))
        .expect("qnbd should exit after its client left");
    assert!(st.success());
    assert!(
        !s.socket.as_ref().unwrap().exists(),
        "socket file removed on exit"
    );

    let mut s = Server::unix(QNBD, &["-f", "raw", "-t", img.to_str().unwrap()]);
    for _ in 0..2 {
        ok(Command::new("qemu-io").args(["-f", "raw", "-c", "read 0 512", &s.uri()]));
    }
    assert!(
        s.wait_exit(Duration::from_millis(500)).is_none(),
        "-t keeps serving"
    );
    let st = s.terminate().expect("SIGTERM stops qnbd");
    assert!(st.success(), "SIGTERM exit status {st}");
    assert!(
        !s.socket.as_ref().unwrap().exists(),
        "socket file removed on SIGTERM"
    );
}

#[test]
fn fork_returns_once_listening_and_leaves_its_pid_file_as_qemu_nbd_does() {
    if !have("qemu-img") {
        return;
    }
    let dir = tmpdir();
    let img = make_raw(dir.path(), "f.raw", 1 << 20, &[]);
    let sock = dir.path().join("f.sock");
    let pidf = dir.path().join("f.pid");
    let out = run(Command::new(QNBD)
        .args(["--fork", "-t", "-f", "raw", "-k"])
        .arg(&sock)
        .arg(format!("--pid-file={}", pidf.display()))
        .arg(&img));
    assert!(out.status.success(), "{out:?}");
    assert!(out.stderr.is_empty());
    let pid: i32 = std::fs::read_to_string(&pidf)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    ok(Command::new("qemu-img").args(["info", &uri]));
    ok(Command::new("kill").arg(pid.to_string()));
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(10) && sock.exists() {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!sock.exists(), "socket removed after SIGTERM");
    // qemu-nbd never removes its pid file; scripts (qemu's iotests) remove it themselves.
    assert!(pidf.exists(), "pid file left behind, as qemu-nbd leaves it");

    // An error in the child reaches the parent's stderr and exit status.
    let out = run(Command::new(QNBD)
        .args(["--fork", "-f", "raw", "-k"])
        .arg(&sock)
        .arg("/nonexistent.img"));
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("No such file or directory"));
}

/// A client whose negotiation fails (a bad option magic).
fn fail_negotiation(sock: &Path) {
    use std::io::Write;
    let mut c = std::os::unix::net::UnixStream::connect(sock).unwrap();
    let mut greeting = [0u8; 18];
    c.read_exact(&mut greeting).unwrap();
    c.write_all(b"\0\0\0\x03BADMAGIC\0\0\0\0\0\0\0\0").unwrap();
    let _ = c.read_to_end(&mut Vec::new());
}

#[test]
fn fork_with_verbose_keeps_reporting_on_the_callers_stderr() {
    // As qemu-nbd (qemu's iotests read a `-v --fork` server's log this way); without -v
    // the daemon's stderr is /dev/null.
    for verbose in [true, false] {
        let dir = tmpdir();
        let img = make_raw(dir.path(), "v.raw", 1 << 20, &[]);
        let sock = dir.path().join("v.sock");
        let pidf = dir.path().join("v.pid");
        let log = dir.path().join("server.log");
        let mut cmd = Command::new(QNBD);
        if verbose {
            cmd.arg("-v");
        }
        let status = cmd
            .args(["--fork", "-t", "-f", "raw", "-k"])
            .arg(&sock)
            .arg(format!("--pid-file={}", pidf.display()))
            .arg(&img)
            .stderr(std::fs::File::create(&log).unwrap())
            .status()
            .unwrap();
        assert!(status.success());
        fail_negotiation(&sock);
        let want = "qnbd: option negotiation failed: Bad magic received\n";
        let start = Instant::now();
        while verbose
            && start.elapsed() < Duration::from_secs(10)
            && std::fs::read_to_string(&log).unwrap() != want
        {
            std::thread::sleep(Duration::from_millis(20));
        }
        let pid = std::fs::read_to_string(&pidf).unwrap();
        ok(Command::new("kill").arg(pid.trim()));
        let text = std::fs::read_to_string(&log).unwrap();
        assert_eq!(text, if verbose { want } else { "" }, "-v: {verbose}");
    }
}

#[test]
fn handshake_limit_drops_a_silent_client() {
    let dir = tmpdir();
    let img = make_raw(dir.path(), "h.raw", 1 << 20, &[]);
    let s = Server::unix(
        QNBD,
        &[
            "-f",
            "raw",
            "-t",
            "--handshake-limit=1",
            img.to_str().unwrap(),
        ],
    );
    let mut c = std::os::unix::net::UnixStream::connect(s.socket.as_ref().unwrap()).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let start = Instant::now();
    let mut buf = Vec::new();
    let _ = c.read_to_end(&mut buf);
    let took = start.elapsed();
    assert_eq!(buf.len(), 18, "greeting only");
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(5),
        "{took:?}"
    );
}

#[test]
fn help_and_version() {
    // Both name the program by argv[0] as run, as qemu-nbd's do.
    let out = ok(Command::new(QNBD).arg("--help"));
    assert!(out.contains("--handshake-limit=N"));
    assert!(out.starts_with(&format!("Usage: {QNBD} [OPTIONS] FILE\n  or:  {QNBD} -L")));
    let out = ok(Command::new(QNBD).arg("-V"));
    assert!(out.starts_with(&format!("{QNBD} ")), "{out}");
}

/// Where `tool` is on $PATH.
fn which(tool: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

/// The `qemu-nbd` in `dir`, run through $PATH (argv[0] `qemu-nbd`) or as a shell runs
/// `./qemu-nbd` in `dir`.
fn as_qemu_nbd(dir: &Path, via_path: bool) -> Command {
    use std::os::unix::process::CommandExt;
    if via_path {
        let path = std::env::var("PATH").unwrap_or_default();
        let mut c = Command::new("qemu-nbd");
        c.env("PATH", format!("{}:{path}", dir.display()));
        c
    } else {
        let mut c = Command::new(dir.join("qemu-nbd"));
        c.arg0("./qemu-nbd").current_dir(dir);
        c
    }
}

/// qnbd installed as qemu-nbd (a symlink named `qemu-nbd`) speaks as qemu-nbd: for every
/// error case, stderr and the exit code equal the real qemu-nbd's byte for byte, run through
/// $PATH (argv[0] `qemu-nbd`) and as `./qemu-nbd` (where getopt's complaints, the "Try"
/// hint, --help and -V print argv[0] whole and the messages' prefix is its basename).
#[test]
fn a_symlink_named_qemu_nbd_speaks_as_qemu_nbd() {
    if !have("qemu-nbd") {
        return;
    }
    let real = which("qemu-nbd").expect("qemu-nbd runs, so it is on $PATH");
    let dir = tmpdir();
    let img = make_raw(dir.path(), "e.raw", 1 << 20, &[]);
    let img = img.to_str().unwrap();
    // Two directories, each with a `qemu-nbd`: ours and the real one.
    let ours = dir.path().join("ours");
    let theirs = dir.path().join("theirs");
    for (d, target) in [(&ours, Path::new(QNBD)), (&theirs, real.as_path())] {
        std::fs::create_dir(d).expect("mkdir");
        std::os::unix::fs::symlink(target, d.join("qemu-nbd")).expect("symlink");
    }
    let held = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = held.local_addr().expect("addr").port().to_string();
    let mut cases = error_cases(img);
    cases.push(vec!["-f", "raw", "-b", "127.0.0.1", "-p", &port, img]);
    let _port = default_port();
    for via_path in [true, false] {
        // Ours is the one that runs from `ours` (qnbd's -V says it is compatible).
        let v = ok(as_qemu_nbd(&ours, via_path).arg("-V"));
        assert!(v.contains("compatible with qemu-nbd"), "not qnbd: {v}");
        for args in &cases {
            let stderr_and_code = |d: &Path| {
                let out = run(as_qemu_nbd(d, via_path).args(args));
                (
                    String::from_utf8_lossy(&out.stderr).into_owned(),
                    out.status.code(),
                )
            };
            let mine = stderr_and_code(&ours);
            assert_eq!(
                mine,
                stderr_and_code(&theirs),
                "{args:?} (via $PATH: {via_path}): qnbd as qemu-nbd differs"
            );
            assert_eq!(mine.1, Some(1), "{args:?}");
            assert!(
                mine.0.starts_with("qemu-nbd: ") || mine.0.starts_with("./qemu-nbd: "),
                "{mine:?}"
            );
        }
        // --help's usage lines and -V's first word name the program as qemu-nbd's do.
        let usage = |d: &Path| {
            let out = ok(as_qemu_nbd(d, via_path).arg("--help"));
            out.lines().take(2).collect::<Vec<_>>().join("\n")
        };
        assert_eq!(usage(&ours), usage(&theirs), "via $PATH: {via_path}");
        let version = |d: &Path| {
            let out = ok(as_qemu_nbd(d, via_path).arg("-V"));
            out.split_whitespace().next().unwrap_or("").to_string()
        };
        assert_eq!(version(&ours), version(&theirs), "via $PATH: {via_path}");
    }
    drop(held);
}
