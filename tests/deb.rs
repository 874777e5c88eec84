//! The Debian package (scripts/build-deb.sh, built by scripts/test.sh): it installs, ships the
//! man page and completions, and its qnbd@.socket / qnbd@.service pair serves
//! /var/lib/qnbd/NAME. systemd need not run here: a harness does what systemd does for the
//! pair — it binds the socket unit's ListenStream, passes it as fd 3 with LISTEN_FDS and
//! LISTEN_PID, and runs the service unit's ExecStart with %i and its EnvironmentFile.

mod common;
use common::*;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

fn find_deb() -> Option<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/debian");
    let mut debs: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "deb"))
        .collect();
    debs.sort();
    debs.pop()
}

fn skip(why: &str) {
    eprintln!("SKIP: {why}; the Debian package was not tried");
    assert!(
        std::env::var_os("QNBD_REQUIRE_TOOLS").is_none(),
        "the package test is required (QNBD_REQUIRE_TOOLS is set): {why}"
    );
}

/// `Key=value` of a unit file's lines.
fn unit_value(unit: &str, key: &str) -> String {
    unit.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key}= in the unit"))
        .to_string()
}

/// ExecStart as systemd expands it for instance `i`: `%i`, and `$VAR` from the environment
/// file (split into words, as an unbraced `$VAR` is).
fn exec_start(service: &str, i: &str, env: &str) -> Vec<String> {
    let line = unit_value(service, "ExecStart").replace("%i", i);
    let mut words = Vec::new();
    for w in line.split_whitespace() {
        match w.strip_prefix('$') {
            Some(var) => {
                let value = env
                    .lines()
                    .find_map(|l| l.strip_prefix(&format!("{var}=")))
                    .unwrap_or("")
                    .trim_matches('"');
                words.extend(value.split_whitespace().map(str::to_string));
            }
            None => words.push(w.to_string()),
        }
    }
    words
}

struct Installed;

impl Drop for Installed {
    fn drop(&mut self) {
        let _ = Command::new("dpkg").args(["--purge", "qnbd"]).status();
    }
}

#[test]
fn debian_package_installs_and_its_socket_unit_serves() {
    let Some(deb) = find_deb() else {
        return skip("target/debian/qnbd_*.deb is not built (scripts/build-deb.sh)");
    };
    if !nix_is_root() {
        return skip("dpkg -i needs root");
    }
    ok(Command::new("dpkg").arg("-i").arg(&deb));
    let _installed = Installed;
    for f in [
        "/usr/bin/qnbd",
        "/usr/share/bash-completion/completions/qnbd",
        "/usr/share/zsh/vendor-completions/_qnbd",
        "/usr/share/fish/vendor_completions.d/qnbd.fish",
        "/lib/systemd/system/qnbd@.service",
        "/lib/systemd/system/qnbd@.socket",
    ] {
        assert!(Path::new(f).exists(), "{f} is not installed");
    }
    let man = [
        "/usr/share/man/man1/qnbd.1.gz",
        "/usr/share/man/man1/qnbd.1",
    ];
    assert!(man.iter().any(|m| Path::new(m).exists()), "no man page");
    assert!(
        Path::new("/var/lib/qnbd").is_dir(),
        "postinst makes /var/lib/qnbd"
    );
    assert!(ok(Command::new("/usr/bin/qnbd").arg("--help")).contains("--stats"));

    let socket_unit = std::fs::read_to_string("/lib/systemd/system/qnbd@.socket").unwrap();
    let service_unit = std::fs::read_to_string("/lib/systemd/system/qnbd@.service").unwrap();
    let name = format!("deb-test-{}", std::process::id());
    let image = PathBuf::from(format!("/var/lib/qnbd/{name}"));
    let env_file = format!("/etc/default/qnbd-{name}");
    qemu_img(
        Path::new("/"),
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            image.to_str().unwrap(),
            "64M",
        ],
    );
    std::fs::write(&env_file, "QNBD_OPTS=\"-f qcow2 --discard=unmap\"\n").unwrap();
    let _remove = Remove(vec![image.clone(), PathBuf::from(&env_file)]);

    let sock = PathBuf::from(unit_value(&socket_unit, "ListenStream").replace("%i", &name));
    std::fs::create_dir_all(sock.parent().unwrap()).unwrap();
    let _ = std::fs::remove_file(&sock);
    let listener = std::os::unix::net::UnixListener::bind(&sock).expect("bind ListenStream");
    let argv = exec_start(
        &service_unit,
        &name,
        &std::fs::read_to_string(&env_file).unwrap(),
    );
    assert_eq!(argv[0], "/usr/bin/qnbd");
    let fd = listener.as_raw_fd();
    let mut cmd = Command::new("sh");
    // $$ is the shell's pid, which exec keeps: LISTEN_PID names qnbd itself.
    cmd.args(["-c", "LISTEN_PID=$$ LISTEN_FDS=1 exec \"$@\"", "sh"])
        .args(&argv);
    // SAFETY: dup2 and fcntl are async-signal-safe; the child only moves the listening socket
    // to fd 3 and makes it survive exec.
    unsafe {
        cmd.pre_exec(move || {
            // dup2(3, 3) would do nothing and leave FD_CLOEXEC set, so exec would close it.
            let rc = if fd == 3 {
                libc::fcntl(3, libc::F_SETFD, 0)
            } else {
                libc::dup2(fd, 3)
            };
            if rc < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().expect("start the service's ExecStart");
    drop(listener);
    let uri = format!("nbd+unix:///{name}?socket={}", sock.display());
    let out = qemu_io(
        Path::new("/"),
        "raw",
        &uri,
        &["write -P 0x3c 0 4M", "read -P 0x3c 0 4M", "flush"],
    );
    assert!(!out.contains("failed"), "{out}");
    // A second client while the first is gone: --persistent and --shared=0 keep serving.
    let out = qemu_io(
        Path::new("/"),
        "raw",
        &uri,
        &["read -P 0x3c 0 4M", "read -P 0 4M 60M"],
    );
    assert!(!out.contains("failed"), "{out}");
    assert!(child.try_wait().unwrap().is_none(), "the service ended");
    ok(Command::new("kill").args(["-TERM", &child.id().to_string()]));
    let start = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "SIGTERM did not end qnbd"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(0));
    check_clean(&image);
    let out = qemu_io(
        Path::new("/"),
        "qcow2",
        image.to_str().unwrap(),
        &["read -P 0x3c 0 4M"],
    );
    assert!(!out.contains("failed"), "{out}");
    let _ = std::fs::remove_file(&sock);
}

struct Remove(Vec<PathBuf>);

impl Drop for Remove {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

fn nix_is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}
