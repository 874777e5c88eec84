//! systemd socket activation (LISTEN_PID/LISTEN_FDS, the socket at fd 3): qnbd serves on the
//! passed socket, and refuses the options that name another socket with qemu-nbd's words.

mod common;
use common::*;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

/// `bin args` started as systemd starts a socket-activated service: `listener` at fd 3,
/// LISTEN_PID its own pid, LISTEN_FDS=`fds`.
fn activated(bin: &str, args: &[&str], listener: &UnixListener, fds: u32) -> Command {
    let mut c = Command::new("sh");
    c.arg("-c")
        .arg(format!("LISTEN_PID=$$ LISTEN_FDS={fds} exec \"$0\" \"$@\""))
        .arg(bin)
        .args(args)
        .stdin(Stdio::null());
    let fd = listener.as_raw_fd();
    // SAFETY: runs in the forked child before exec; dup2 and fcntl are async-signal-safe and
    // touch only descriptors.
    unsafe {
        c.pre_exec(move || {
            if libc::dup2(fd, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            libc::fcntl(3, libc::F_SETFD, 0);
            Ok(())
        });
    }
    c
}

#[test]
fn serves_on_the_passed_socket() {
    if !have("qemu-io") {
        return;
    }
    let d = tmpdir();
    let img = make_raw(d.path(), "a.img", 1 << 20, &[(4096, b"activated")]);
    let sock = d.path().join("act.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    let mut child = activated(QNBD, &["-f", "raw", img.to_str().unwrap()], &listener, 1)
        .spawn()
        .unwrap();
    drop(listener);
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    let out = ok(Command::new("qemu-io").args(["-f", "raw", "-c", "read -v 4096 9", &uri]));
    assert!(out.contains("activated"), "{out}");
    // The last client left (no -t): the server exits by itself.
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");
}

#[test]
fn conflicting_options_are_refused_like_qemu_nbd() {
    if !have("qemu-nbd") {
        return;
    }
    let d = tmpdir();
    let img = make_raw(d.path(), "a.img", 1 << 20, &[]);
    let i = img.to_str().unwrap();
    let cases: [(&[&str], u32); 7] = [
        (&["-k", "/tmp/x.sock", i], 1),
        (&["-b", "127.0.0.1", i], 1),
        (&["-p", "10999", i], 1),
        (&["-c", "/dev/nbd0", i], 1),
        (&["--selinux-label", "x", "-k", "/tmp/x.sock", i], 1),
        (&["-L"], 1),
        (&["-f", "raw", i], 2),
    ];
    for (args, fds) in cases {
        let sock = d.path().join("c.sock");
        let _ = std::fs::remove_file(&sock);
        let listener = UnixListener::bind(&sock).unwrap();
        let err = |bin: &str| {
            let out = activated(bin, args, &listener, fds).output().unwrap();
            assert_eq!(out.status.code(), Some(1), "{bin} {args:?}");
            String::from_utf8_lossy(&out.stderr).replace("qnbd:", "qemu-nbd:")
        };
        assert_eq!(err(QNBD), err("qemu-nbd"), "{args:?} with {fds} fds");
    }
}
