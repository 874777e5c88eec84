//! The command line side by side with the real qemu-nbd (10.0.x, /usr/bin/qemu-nbd): for
//! every row of the table both programs run with the same arguments in the same directory,
//! and their exit status, stderr (the program name normalised) and, unless the row says
//! the output differs on purpose (help, version, trace point and object lists), stdout must
//! be identical. The rows cover GNU getopt_long's reading (abbreviated and ambiguous long
//! options, missing arguments, clusters, `--`, options after the file), qemu-nbd's value
//! checks in command-line order, the conflicting modes, and the errors found only after the
//! socket is made. docs/compat.md lists what differs on purpose.
//!
//! No row reaches the default port: every row that would listen has `-k` in its own
//! directory, and `-L` rows connect to a socket that does not exist or to 127.0.0.1:1.
//! Without qemu-nbd the test fails: it has nothing to compare against.

mod common;
use common::*;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const QEMU_NBD: &str = "/usr/bin/qemu-nbd";

/// What a row compares.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Check {
    /// Status, stderr and stdout.
    All,
    /// Everything, with POSIXLY_CORRECT set (options end at the first non-option).
    Posix,
    /// Status and stderr: stdout is qnbd's own (help, version, lists of what qnbd has).
    NotStdout,
    /// The server starts (its socket `{dir}/s.sock` appears), is stopped with SIGTERM:
    /// status and everything it printed.
    Serves,
}
use Check::*;

/// Placeholders: `{img}` a 1 MiB raw image, `{qcow}` a qcow2 image with snapshot `snap1`,
/// `{dir}` the row's directory (also the working directory), `{long}` 4097 bytes.
const ROWS: &[(Check, &[&str])] = &[
    // getopt_long: unknown options, missing arguments, abbreviations, ambiguity.
    (All, &["--bogus"]),
    (All, &["--bogus=1", "{img}"]),
    (All, &["-Z"]),
    (All, &["-rZ", "{img}"]),
    (All, &["--co"]),
    (All, &["--d"]),
    (All, &["--d=unmap"]),
    (All, &["--de"]),
    (All, &["--dis", "{img}"]),
    (All, &["--tls"]),
    (All, &["--p"]),
    (All, &["--tls-c"]),
    (All, &["--expo"]),
    (All, &["--version=1"]),
    (All, &["--re=1", "{img}"]),
    (All, &["--help=x"]),
    (All, &["-x"]),
    (All, &["-rte"]),
    (All, &["--pid-file"]),
    (All, &["{img}", "--bogus"]),
    (All, &["{img}", "-e", "x"]),
    (All, &["-e3x"]),
    (All, &["-rte3", "-k", "{dir}/nodir/s.sock", "{img}"]),
    (All, &["--sh=0x10", "-k", "{dir}/nodir/s.sock", "{img}"]),
    (All, &["--det=on", "-k", "{dir}/nodir/s.sock", "{img}"]),
    (All, &["-f", "raw", "-k", "{dir}/s.sock", "--", "-r"]),
    (All, &["--", "{img}", "-r"]),
    (All, &["-f", "raw", "-k", "{dir}/s.sock", "-"]),
    (All, &[]),
    (Posix, &["{img}", "-e", "x"]),
    (Posix, &["-e", "x", "{img}"]),
    (Posix, &["--bogus", "{img}"]),
    (All, &["---foo"]),
    (All, &["--=x"]),
    (All, &["--h"]),
    (All, &["--v"]),
    (All, &["-r-"]),
    (All, &["-?"]),
    (All, &["--fork=1"]),
    (All, &["--list=x"]),
    (All, &["-x", "--", "-k", "{dir}/nodir/s.sock", "{img}"]),
    (All, &["{img}", "{img}"]),
    // Help and version answered where they stand in the option loop.
    (NotStdout, &["-V", "-e", "x"]),
    (All, &["-e", "x", "-V"]),
    (NotStdout, &["-h", "--bogus"]),
    (All, &["--bogus", "-h"]),
    (NotStdout, &["--vers"]),
    (NotStdout, &["-hV"]),
    // Values checked as they are read.
    (All, &["-e", "x"]),
    (All, &["-e", "-1", "{img}"]),
    (All, &["-e", "2147483648", "{img}"]),
    (All, &["-e", "1.5", "{img}"]),
    (All, &["-o", "x", "{img}"]),
    (All, &["-o", "1M", "{img}"]),
    (
        All,
        &["-o", "-1", "-f", "raw", "-k", "{dir}/s.sock", "{img}"],
    ),
    (
        All,
        &["-o", "99999999", "-f", "raw", "-k", "{dir}/s.sock", "{img}"],
    ),
    (All, &["--cache=bogus", "{img}"]),
    (All, &["--cache="]),
    (All, &["--cache=none", "--cache=none", "{img}"]),
    (All, &["-n", "--cache=none", "{img}"]),
    (All, &["--aio=bogus", "{img}"]),
    (All, &["--aio=native", "--aio=native", "{img}"]),
    (
        All,
        &["--aio=native", "-f", "raw", "-k", "{dir}/s.sock", "{img}"],
    ),
    (All, &["--discard=bogus", "{img}"]),
    (All, &["--discard=on", "--discard=on", "{img}"]),
    (All, &["--detect-zeroes=bogus", "{img}"]),
    (All, &["--detect-zeroes=unmap", "{img}"]),
    (All, &["--detect-zeroes=unmap", "--discard=unmap", "{img}"]),
    (
        All,
        &[
            "--discard=unmap",
            "--detect-zeroes=unmap",
            "-k",
            "{dir}/nodir/s.sock",
            "{img}",
        ],
    ),
    (All, &["--handshake-limit=x", "{img}"]),
    (All, &["--handshake-limit=-1", "{img}"]),
    (All, &["-x", "{long}", "{img}"]),
    (All, &["-D", "{long}", "{img}"]),
    (All, &["-k", "relative.sock", "{img}"]),
    (All, &["-p", "x", "-f", "raw", "{img}"]),
    // Formats and drivers: found when the image is opened, after the socket is made.
    (All, &["-f", "bogus", "-k", "{dir}/s.sock", "{img}"]),
    (All, &["-f", "bogus", "-k", "{dir}/nodir/s.sock", "{img}"]),
    (All, &["-f", "qcow2", "-k", "{dir}/s.sock", "{img}"]),
    (
        All,
        &["-f", "raw", "-k", "{dir}/s.sock", "{dir}/missing.img"],
    ),
    (
        All,
        &["--image-opts", "-f", "raw", "-k", "{dir}/s.sock", "{img}"],
    ),
    (All, &["--image-opts", "-k", "{dir}/s.sock", "{img}"]),
    (
        All,
        &["--image-opts", "-k", "{dir}/s.sock", "driver=raw,bogus=1"],
    ),
    (
        All,
        &[
            "--image-opts",
            "-k",
            "{dir}/s.sock",
            "driver=raw,file.filename={img},bogus=1",
        ],
    ),
    (
        All,
        &[
            "--image-opts",
            "-k",
            "{dir}/s.sock",
            "driver=raw,file.filename={img},nofoo",
        ],
    ),
    (
        All,
        &[
            "--image-opts",
            "-k",
            "{dir}/s.sock",
            "driver=file,file.filename={img}",
        ],
    ),
    (
        All,
        &[
            "--image-opts",
            "-k",
            "{dir}/s.sock",
            "driver=raw,file.driver=file,file.bogus=1",
        ],
    ),
    (
        All,
        &[
            "--image-opts",
            "-k",
            "{dir}/nodir/s.sock",
            "driver=raw,bogus",
        ],
    ),
    (All, &["-f", "luks", "-k", "{dir}/s.sock", "{img}"]),
    (
        All,
        &[
            "--object",
            "secret,id=k,data=x",
            "--image-opts",
            "-k",
            "{dir}/s.sock",
            "driver=luks,key-secret=k,file.filename={img}",
        ],
    ),
    (
        All,
        &[
            "--image-opts",
            "-k",
            "{dir}/s.sock",
            "driver=luks,key-secret=nok,file.filename={img}",
        ],
    ),
    (All, &["--image-opts", "-k", "{dir}/s.sock", "driver=qcow2,file.filename={qcow},l2-cache-size=x"]),
    (All, &["--image-opts", "-k", "{dir}/s.sock", "driver=qcow2,file.filename={qcow},l2-cache-size=8M,cache-size=4M"]),
    (All, &["--image-opts", "-k", "{dir}/s.sock", "driver=qcow2,file.filename={qcow},refcount-cache-size=8M,cache-size=4M,bogus=1"]),
    (All, &["--image-opts", "-k", "{dir}/s.sock", "driver=qcow2,file.filename={img},cache-size=4M,l2-cache-size=1M,refcount-cache-size=1M"]),
    // Snapshots.
    (All, &["-l", "snapshot.foo=1", "{img}"]),
    (All, &["-l", "snapshot.id=1,bogus", "{img}"]),
    (All, &["-l", "snap1", "-k", "{dir}/s.sock", "{img}"]),
    (All, &["-l", "nosnap", "-k", "{dir}/s.sock", "{qcow}"]),
    (All, &["-s", "-l", "snap1", "-k", "{dir}/s.sock", "{qcow}"]),
    // Modes that exclude each other.
    (All, &["-L", "{img}"]),
    (All, &["-L", "-c", "/nonexistent/nbd0"]),
    (All, &["-L", "-x", "foo", "-D", "bar"]),
    (All, &["-L", "-B", "x"]),
    (All, &["--fork", "-L"]),
    (All, &["-L", "-k", "{dir}/nodir/s.sock"]),
    (
        All,
        &["-L", "-s", "--image-opts", "-k", "{dir}/nodir/s.sock"],
    ),
    (All, &["-L", "-b", "127.0.0.1", "-p", "1"]),
    (All, &["-L", "-b", "", "-p", "1"]),
    (All, &["-L", "-b", "127.0.0.1", "-p", "x"]),
    (All, &["-c", "/nonexistent/nbd0", "-d"]),
    (All, &["-d"]),
    (All, &["-d", "/nonexistent/nbd0"]),
    (All, &["-d", "/nonexistent/nbd0", "extra"]),
    (
        All,
        &[
            "-c",
            "/nonexistent/nbd0",
            "-k",
            "{dir}/c.sock",
            "-f",
            "raw",
            "{img}",
        ],
    ),
    (All, &["--tls-authz=a", "{img}"]),
    (All, &["--tls-authz=a", "-L"]),
    (All, &["--tls-hostname=x", "{img}"]),
    (All, &["--tls-creds=x", "{img}"]),
    (All, &["--tls-creds=x", "-c", "/nonexistent/nbd0", "{img}"]),
    (
        All,
        &[
            "--object",
            "tls-creds-anon,id=t,endpoint=server",
            "--tls-creds=t",
            "--tls-hostname=h",
            "{img}",
        ],
    ),
    (
        All,
        &[
            "--object",
            "tls-creds-anon,id=t,endpoint=client",
            "--tls-creds=t",
            "-k",
            "{dir}/s.sock",
            "{img}",
        ],
    ),
    (All, &["--selinux-label=x", "{img}"]),
    (
        All,
        &[
            "--selinux-label=x",
            "-k",
            "{dir}/s.sock",
            "-f",
            "raw",
            "{img}",
        ],
    ),
    (
        All,
        &[
            "--selinux-label=",
            "-k",
            "{dir}/s.sock",
            "-f",
            "raw",
            "{img}",
        ],
    ),
    // -T syntax.
    (NotStdout, &["-T", "help"]),
    (NotStdout, &["--tr=help"]),
    (All, &["-T", "foo,bar", "{img}"]),
    (All, &["-T", "x,nobogus", "{img}"]),
    (
        All,
        &["-T", "x,nofile", "-k", "{dir}/nodir/s.sock", "{img}"],
    ),
    (All, &["-T", "", "-k", "{dir}/nodir/s.sock", "{img}"]),
    (All, &["-T", ",", "-k", "{dir}/nodir/s.sock", "{img}"]),
    (
        All,
        &["-T", "no_such_event", "-k", "{dir}/nodir/s.sock", "{img}"],
    ),
    (
        All,
        &[
            "-T",
            "enable=nbd*,file={dir}/nodir/f",
            "-k",
            "{dir}/nodir/s.sock",
            "{img}",
        ],
    ),
    // --object.
    (NotStdout, &["--object", "help"]),
    (All, &["--object", "secret,help"]),
    (All, &["--object", "secret,id=s,help"]),
    (All, &["--object", "qom-type=secret,help,id=s"]),
    (NotStdout, &["--object", "bogus,help"]),
    (All, &["--object", "help,secret"]),
    (All, &["--object", "bogus,id=x"]),
    (All, &["--object", "secret,id="]),
    (All, &["--object", "secret,id=1s,data=x"]),
    (All, &["--object", "secret,data=x"]),
    (All, &["--object", "secret,id=s,data=x,bogus"]),
    (
        All,
        &[
            "--object",
            "secret,id=s,data=x",
            "--object",
            "secret,id=s,data=y",
            "{img}",
        ],
    ),
    // Started servers: what they print (nothing, or qemu's probing warning) and how
    // SIGTERM ends them.
    (Serves, &["-k", "{dir}/s.sock", "{img}"]),
    (Serves, &["-v", "-f", "raw", "-k", "{dir}/s.sock", "{img}"]),
    (Serves, &["-r", "-k", "{dir}/s.sock", "{img}"]),
    (Serves, &["-s", "-k", "{dir}/s.sock", "{img}"]),
    (
        Serves,
        &[
            "-rt",
            "-e",
            "3",
            "-x",
            "name",
            "-D",
            "text",
            "-k",
            "{dir}/s.sock",
            "{img}",
        ],
    ),
    (
        Serves,
        &[
            "--image-opts",
            "-k",
            "{dir}/s.sock",
            "driver=raw,file.filename={img}",
        ],
    ),
];

/// What a run printed and how it ended.
#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    status: String,
    stdout: String,
    stderr: String,
}

fn expand(arg: &str, dir: &Path, img: &Path, qcow: &Path) -> String {
    arg.replace("{img}", img.to_str().unwrap())
        .replace("{qcow}", qcow.to_str().unwrap())
        .replace("{dir}", dir.to_str().unwrap())
        .replace("{long}", &"a".repeat(4097))
}

/// The program's name as run and as its messages' prefix both become PROG; the row's
/// directory becomes DIR.
fn normalise(text: &[u8], bin: &str, dir: &Path) -> String {
    let base = Path::new(bin).file_name().unwrap().to_str().unwrap();
    String::from_utf8_lossy(text)
        .replace(bin, "PROG")
        .replace(&format!("{base}:"), "PROG:")
        .replace(dir.to_str().unwrap(), "DIR")
}

fn status_text(st: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (st.code(), st.signal()) {
        (Some(c), _) => format!("exit {c}"),
        (None, Some(s)) => format!("signal {s}"),
        _ => "?".into(),
    }
}

/// Run one row with `bin` in a fresh directory holding the images.
fn run_row(bin: &str, check: Check, args: &[&str]) -> Outcome {
    let d = tmpdir();
    let dir = d.path();
    let img = make_raw(dir, "img.raw", 1 << 20, &[]);
    let qcow = dir.join("img.qcow2");
    std::fs::copy(qcow_template(), &qcow).expect("copy qcow2 image");
    let args: Vec<String> = args.iter().map(|a| expand(a, dir, &img, &qcow)).collect();
    let mut cmd = Command::new(bin);
    cmd.args(&args)
        .current_dir(dir)
        .env_remove("LISTEN_PID")
        .env_remove("LISTEN_FDS")
        .env_remove("QNBD_LOG")
        .env_remove("POSIXLY_CORRECT")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if check == Posix {
        cmd.env("POSIXLY_CORRECT", "1");
    }
    let child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {bin}: {e}"));
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut child = child;
    if check == Serves {
        let sock = dir.join("s.sock");
        while !sock.exists() && child.try_wait().unwrap().is_none() {
            assert!(
                Instant::now() < deadline,
                "{bin} {args:?}: no socket after 10 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    }
    let mut next_term = Instant::now() + Duration::from_secs(1);
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        // qemu-nbd creates its socket before it sets `state = RUNNING`, so a SIGTERM in
        // between is forgotten (seen once in CI); ask again until it goes.
        if check == Serves && Instant::now() > next_term {
            // SAFETY: kill(2) on our own child's pid, not yet reaped.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            next_term += Duration::from_secs(1);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!("{bin} {args:?} still running after 10 s: {out:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let out = child.wait_with_output().unwrap();
    Outcome {
        status: status_text(out.status),
        stdout: normalise(&out.stdout, bin, dir),
        stderr: normalise(&out.stderr, bin, dir),
    }
}

/// A qcow2 image with an internal snapshot `snap1`, made once with qemu-img.
fn qcow_template() -> &'static Path {
    static T: std::sync::OnceLock<(tempfile::TempDir, std::path::PathBuf)> =
        std::sync::OnceLock::new();
    &T.get_or_init(|| {
        let d = tmpdir();
        let p = make_qcow2(d.path(), "t.qcow2", "", "1M");
        ok(Command::new("qemu-img").args(["snapshot", "-c", "snap1", p.to_str().unwrap()]));
        (d, p)
    })
    .1
}

/// Fail loudly, never skip: without qemu-nbd there is nothing to compare with.
fn require_qemu_nbd() {
    let out = Command::new(QEMU_NBD).arg("--version").output();
    let version = match out {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).into_owned(),
        other => panic!(
            "FAIL: {QEMU_NBD} is required by tests/compat.rs (install qemu-utils 10.0): {other:?}"
        ),
    };
    assert!(
        version.contains("qemu-nbd 10.0."),
        "FAIL: tests/compat.rs compares with qemu-nbd 10.0.x, found: {version}"
    );
}

#[test]
fn command_lines_match_qemu_nbd() {
    require_qemu_nbd();
    assert!(ROWS.len() >= 60);
    let mut bad = Vec::new();
    for (check, args) in ROWS {
        let theirs = run_row(QEMU_NBD, *check, args);
        let ours = run_row(QNBD, *check, args);
        let same = ours.status == theirs.status
            && ours.stderr == theirs.stderr
            && (*check == NotStdout || ours.stdout == theirs.stdout);
        if !same {
            bad.push(format!(
                "{args:?}\n  qemu-nbd: {theirs:?}\n  qnbd:     {ours:?}"
            ));
        }
    }
    assert!(
        bad.is_empty(),
        "{} of {} command lines differ from qemu-nbd:\n{}",
        bad.len(),
        ROWS.len(),
        bad.join("\n")
    );
}
