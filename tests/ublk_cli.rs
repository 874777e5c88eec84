//! The ublk options on the command line, checked before anything is opened (the devices
//! themselves are tested in the guest: tests/ublk_vm.rs).

mod common;
use common::*;
use std::process::Command;

/// Run qnbd, expecting exit status 1; returns stderr.
fn refused(args: &[&str]) -> String {
    let out = run(Command::new(QNBD).args(args));
    assert_eq!(
        out.status.code(),
        Some(1),
        "{args:?} should exit 1: {out:?}"
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn ublk_options_are_checked() {
    let dir = tmpdir();
    let img = make_raw(dir.path(), "u.raw", 1 << 20, &[]);
    let img = img.to_str().unwrap();
    let cases: &[(&[&str], &str)] = &[
        (
            &["--ublk-queues", "0", "-c", "ublk", img],
            "qnbd: Invalid ublk queue count '0' (1 to 64)\n",
        ),
        (
            &["--ublk-queues=65", "-c", "ublk", img],
            "qnbd: Invalid ublk queue count '65' (1 to 64)\n",
        ),
        (
            &["--ublk-depth", "x", "-c", "/dev/ublkb1", img],
            "qnbd: Invalid ublk queue depth 'x' (1 to 4096)\n",
        ),
        (
            &["--ublk-depth", "4097", "-c", "ublk", img],
            "qnbd: Invalid ublk queue depth '4097' (1 to 4096)\n",
        ),
        (
            &["--recover", "-c", "ublk", img],
            "qnbd: --recover needs the device: -c /dev/ublkbN\n",
        ),
        (
            &["--recover", img],
            "qnbd: --ublk-queues, --ublk-depth and --recover need -c ublk or -c /dev/ublkbN\n",
        ),
        (
            &["--ublk-depth=64", "-c", "/dev/nbd0", img],
            "qnbd: --ublk-queues, --ublk-depth and --recover need -c ublk or -c /dev/ublkbN\n",
        ),
        (
            &["-c", "/dev/ublkbX", img],
            "qnbd: /dev/ublkbX is not a ublk device (expected /dev/ublkbN or 'ublk')\n",
        ),
        (
            &["--connections", "2", "-c", "ublk", img],
            "qnbd: --connections and --kernel-api are for NBD devices, not ublk\n",
        ),
        (
            &["-d", "/dev/ublkbX"],
            "qnbd: /dev/ublkbX is not a ublk device (expected /dev/ublkbN or 'ublk')\n",
        ),
    ];
    for (args, want) in cases {
        assert_eq!(&refused(args), want, "{args:?}");
    }
}

/// On a kernel without ublk_drv (as the host running the tests), `-c ublk` and `-d` say so,
/// with -v (no fork) and without.
#[test]
fn without_the_driver_ublk_says_so() {
    if std::path::Path::new("/dev/ublk-control").exists() {
        eprintln!("SKIP: this kernel has ublk; the guest tests cover it");
        return;
    }
    let dir = tmpdir();
    let img = make_raw(dir.path(), "u.raw", 1 << 20, &[]);
    let img = img.to_str().unwrap();
    let want = "qnbd: ublk is not available: /dev/ublk-control is missing (is the ublk_drv module loaded?)\n";
    assert_eq!(refused(&["-f", "raw", "-c", "ublk", img]), want);
    assert_eq!(
        refused(&["-v", "-f", "raw", "-c", "/dev/ublkb0", img]),
        want
    );
    assert_eq!(refused(&["-d", "/dev/ublkb0"]), want);
}
