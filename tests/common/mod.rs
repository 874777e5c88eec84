//! Shared helpers for integration tests: start qnbd (or qemu-nbd beside it) on a private
//! socket, run real clients, and say SKIP loudly when a client is missing.

#![allow(dead_code)]

pub mod matrix;
pub mod pki;
pub mod raw;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const QNBD: &str = env!("CARGO_BIN_EXE_qnbd");

/// True if `tool` runs; otherwise prints a loud SKIP line (CI installs every tool, so a
/// SKIP there is a broken CI script, and `.ci/run` fails on it).
pub fn have(tool: &str) -> bool {
    let ok = Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("SKIP: {tool} is not installed; this test did not run");
        if std::env::var_os("QNBD_REQUIRE_TOOLS").is_some() {
            panic!("{tool} is required (QNBD_REQUIRE_TOOLS is set)");
        }
    }
    ok
}

/// Debian's libnbd Python module loads only under the system interpreter.
pub const PYTHON: &str = "/usr/bin/python3";

pub fn have_nbdsh() -> bool {
    let ok = Command::new(PYTHON)
        .args(["-c", "import nbd"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("SKIP: python3-libnbd is not installed; this test did not run");
        if std::env::var_os("QNBD_REQUIRE_TOOLS").is_some() {
            panic!("python3-libnbd is required (QNBD_REQUIRE_TOOLS is set)");
        }
    }
    ok
}

pub fn tmpdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("qnbd-test")
        .tempdir()
        .expect("tempdir")
}

/// A sparse raw image of `size` bytes with `data` written at each offset.
pub fn make_raw(dir: &Path, name: &str, size: u64, data: &[(u64, &[u8])]) -> PathBuf {
    use std::os::unix::fs::FileExt;
    let p = dir.join(name);
    let f = std::fs::File::create(&p).expect("create image");
    f.set_len(size).expect("set_len");
    for (off, bytes) in data {
        f.write_all_at(bytes, *off).expect("write image");
    }
    p
}

pub fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    out
}

/// Run and require success; returns stdout.
pub fn ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A running server process, killed on drop.
pub struct Server {
    pub child: Child,
    pub socket: Option<PathBuf>,
    pub port: Option<u16>,
    pub name: String,
    _dir: Option<tempfile::TempDir>,
}

pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

impl Server {
    /// Start `bin` (qnbd or qemu-nbd) with `args` on a fresh Unix socket.
    pub fn unix(bin: &str, args: &[&str]) -> Server {
        Server::unix_env(bin, args, &[])
    }

    /// [`Server::unix`] with more environment.
    pub fn unix_env(bin: &str, args: &[&str], env: &[(&str, &str)]) -> Server {
        Server::unix_with(bin, args, env, None)
    }

    /// [`Server::unix`] run from directory `cwd` (relative names in `args` or in images).
    #[allow(dead_code)]
    pub fn unix_in(bin: &str, args: &[&str], cwd: &Path) -> Server {
        Server::unix_with(bin, args, &[], Some(cwd))
    }

    fn unix_with(bin: &str, args: &[&str], env: &[(&str, &str)], cwd: Option<&Path>) -> Server {
        let dir = tmpdir();
        let sock = dir.path().join("nbd.sock");
        let pid = dir.path().join("pid");
        let mut all: Vec<String> = vec!["-k".into(), sock.display().to_string()];
        all.push(format!("--pid-file={}", pid.display()));
        all.extend(args.iter().map(|s| s.to_string()));
        let mut cmd = Command::new(bin);
        if let Some(d) = cwd {
            cmd.current_dir(d);
        }
        let child = cmd
            .args(&all)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn server");
        let mut s = Server {
            child,
            socket: Some(sock),
            port: None,
            name: String::new(),
            _dir: Some(dir),
        };
        s.wait_ready(&pid);
        s
    }

    /// Start `bin` on 127.0.0.1 and a free port.
    pub fn tcp(bin: &str, args: &[&str]) -> Server {
        Server::tcp_env(bin, args, &[])
    }

    /// [`Server::tcp`] with more environment.
    pub fn tcp_env(bin: &str, args: &[&str], env: &[(&str, &str)]) -> Server {
        let dir = tmpdir();
        let pid = dir.path().join("pid");
        let port = free_port();
        let mut all: Vec<String> = vec![
            "-b".into(),
            "127.0.0.1".into(),
            "-p".into(),
            port.to_string(),
        ];
        all.push(format!("--pid-file={}", pid.display()));
        all.extend(args.iter().map(|s| s.to_string()));
        let child = Command::new(bin)
            .args(&all)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn server");
        let mut s = Server {
            child,
            socket: None,
            port: Some(port),
            name: String::new(),
            _dir: Some(dir),
        };
        s.wait_ready(&pid);
        s
    }

    pub fn with_name(mut self, name: &str) -> Server {
        self.name = name.to_string();
        self
    }

    fn wait_ready(&mut self, pid: &Path) {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(20) {
            if std::fs::read_to_string(pid).is_ok_and(|s| s.ends_with('\n')) {
                return;
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!("server exited before it was ready: {st}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("server not ready after 20 s");
    }

    /// An NBD URI for qemu and libnbd clients.
    pub fn uri(&self) -> String {
        match (&self.socket, self.port) {
            (Some(s), _) => format!("nbd+unix:///{}?socket={}", self.name, s.display()),
            (None, Some(p)) => format!("nbd://127.0.0.1:{p}/{}", self.name),
            _ => unreachable!("server has an address"),
        }
    }

    /// Wait for the server to exit by itself.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Ok(Some(st)) = self.child.try_wait() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    pub fn terminate(&mut self) -> Option<std::process::ExitStatus> {
        let _ = nix_kill(self.child.id(), libc_sigterm());
        self.wait_exit(Duration::from_secs(10))
    }
}

fn libc_sigterm() -> i32 {
    15
}

fn nix_kill(pid: u32, sig: i32) -> std::io::Result<()> {
    let st = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()?;
    if st.success() {
        Ok(())
    } else {
        Err(std::io::Error::other("kill failed"))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Run a Python libnbd script (from tests/nbdsh/) with the URI as its argument.
pub fn nbdsh_script(script: &str, uri: &str, extra: &[&str]) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/nbdsh")
        .join(script);
    ok(Command::new(PYTHON).arg(path).arg(uri).args(extra))
}

/// Run qemu-img in `dir` (so messages name files as given) and require success.
pub fn qemu_img(dir: &Path, args: &[&str]) -> String {
    ok(Command::new("qemu-img").current_dir(dir).args(args))
}

/// Run qemu-io commands on `target` (a file in `dir`, or a URI) in format `fmt`.
pub fn qemu_io(dir: &Path, fmt: &str, target: &str, cmds: &[&str]) -> String {
    let mut c = Command::new("qemu-io");
    c.current_dir(dir).args(["-f", fmt]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    ok(c.arg(target))
}

/// A new qcow2 image `name` in `dir` of `size`, with `-o opts` when not empty.
pub fn make_qcow2(dir: &Path, name: &str, opts: &str, size: &str) -> PathBuf {
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    args.extend([name, size]);
    qemu_img(dir, &args);
    dir.join(name)
}

/// `qemu-img check` finds no errors and no leaks.
pub fn check_clean(img: &Path) {
    let out = run(Command::new("qemu-img").args(["check"]).arg(img));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("No errors were found"),
        "qemu-img check {}: {text}{}",
        img.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `qemu-img check` finds no corruption (leaked clusters are allowed: exit 0 or 3).
pub fn check_no_corruption(img: &Path) {
    check_format_no_corruption(img, "qcow2");
}

/// `qemu-img check -f FORMAT` finds nothing worse than leaks.
pub fn check_format_no_corruption(img: &Path, format: &str) {
    let out = run(Command::new("qemu-img")
        .args(["check", "-f", format])
        .arg(img));
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        matches!(out.status.code(), Some(0) | Some(3)) && !text.contains("ERROR"),
        "qemu-img check {}: {text}",
        img.display()
    );
}

/// The open flags (octal `flags:` of /proc/PID/fdinfo) of each of `pid`'s descriptors on `img`.
pub fn open_flags(pid: u32, img: &Path) -> Vec<u32> {
    let img = std::fs::canonicalize(img).expect("canonicalize");
    let mut out = Vec::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("fd dir")
        .flatten()
    {
        if std::fs::read_link(e.path()).ok().as_deref() == Some(img.as_path()) {
            let info = std::fs::read_to_string(format!(
                "/proc/{pid}/fdinfo/{}",
                e.file_name().to_string_lossy()
            ))
            .unwrap_or_default();
            if let Some(f) = info.lines().find_map(|l| l.strip_prefix("flags:")) {
                out.push(u32::from_str_radix(f.trim(), 8).unwrap_or(0));
            }
        }
    }
    out
}

/// Boot the kernel test guest (scripts/vm/run.sh) with `cpus` CPUs and the built qnbd, and
/// run `script` (a file in scripts/vm/guest/) there; the guest's checks must all pass. A
/// machine that cannot run the guest is a loud SKIP, and a failure under QNBD_REQUIRE_TOOLS.
pub fn run_guest_script(script: &str, cpus: u32) {
    run_guest_script_with(script, cpus, &guest_qnbd());
}

/// The qnbd the guest tests run: `QNBD_GUEST_BIN` when set, else this build's. Under TCG a
/// debug build's CPU time is most of a guest test's time, so scripts/test.sh, which has just
/// built the release binary for the Debian package, points this at it.
pub fn guest_qnbd() -> PathBuf {
    match std::env::var_os("QNBD_GUEST_BIN") {
        Some(bin) => {
            let bin = PathBuf::from(bin);
            assert!(
                bin.is_file(),
                "QNBD_GUEST_BIN={} is not a file",
                bin.display()
            );
            bin
        }
        None => PathBuf::from(QNBD),
    }
}

/// [`run_guest_script`] with the qnbd binary `bin` in the guest's share.
pub fn run_guest_script_with(script: &str, cpus: u32, bin: &Path) {
    run_guest_script_in(script, cpus, bin, None);
}

/// [`run_guest_script_with`] on the share directory `share` (the guest's cwd), so the caller
/// can put files there first and read what the guest left after. False when the guest could
/// not run (a loud SKIP).
pub fn run_guest_script_in(script: &str, cpus: u32, bin: &Path, share: Option<&Path>) -> bool {
    run_guest_script_env(script, cpus, bin, share, &[])
}

/// [`run_guest_script_in`] with more environment for scripts/vm/run.sh (such as
/// `QNBD_VM_KERNEL=backports`, another kernel).
pub fn run_guest_script_env(
    script: &str,
    cpus: u32,
    bin: &Path,
    share: Option<&Path>,
    env: &[(&str, &str)],
) -> bool {
    let top = env!("CARGO_MANIFEST_DIR");
    let mut run = Command::new("bash");
    run.envs(env.iter().copied());
    run.arg(format!("{top}/scripts/vm/run.sh"))
        .arg(format!("{top}/scripts/vm/guest/{script}"));
    if let Some(dir) = share {
        run.arg(dir);
    }
    let out = run
        .env("QNBD_BIN", bin)
        .env("QNBD_VM_SMP", cpus.to_string())
        .output()
        .expect("run scripts/vm/run.sh");
    let console = String::from_utf8_lossy(&out.stdout);
    let errors = String::from_utf8_lossy(&out.stderr);
    if out.status.code() == Some(77) {
        eprintln!("SKIP: the kernel test guest cannot run on this machine:\n{errors}");
        if std::env::var_os("QNBD_REQUIRE_TOOLS").is_some() {
            panic!("the kernel test guest is required (QNBD_REQUIRE_TOOLS is set)");
        }
        return false;
    }
    for line in console
        .lines()
        .filter(|l| l.starts_with("PASS") || l.starts_with("FAIL") || l.starts_with("SKIP"))
    {
        eprintln!("guest: {line}");
    }
    assert!(
        out.status.success(),
        "guest tests failed ({}):\n{console}\n{errors}",
        out.status
    );
    assert!(console.contains(" passed, 0 failed"), "{console}");
    true
}

/// `bin` started in `dir` with `args` (its socket added first) must refuse them: exit status
/// 1 within 20 s (`timeout`: a server that does serve fails the test instead of hanging it).
/// Returns the first line of its stderr, the program's name written `qnbd:`.
pub fn refusal_line(bin: &str, dir: &Path, args: &[&str]) -> String {
    let sock = dir.join("r.sock");
    let out = run(Command::new("timeout")
        .current_dir(dir)
        .args(["20", bin, "-k", sock.to_str().unwrap()])
        .args(args));
    assert_eq!(out.status.code(), Some(1), "{bin} served {args:?}");
    String::from_utf8_lossy(&out.stderr)
        .lines()
        .next()
        .unwrap_or("")
        .replace("qemu-nbd:", "qnbd:")
}
