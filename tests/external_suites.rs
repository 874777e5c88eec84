//! Other projects' test suites with qnbd standing in for qemu-nbd: libnbd's interop, copy,
//! info and dump tests that start qemu-nbd, and qemu's iotest 233 (TLS, server log compared
//! line by line). `scripts/external-suites.sh` downloads, builds and runs them.

mod common;
use common::*;
use std::process::Command;

#[test]
fn libnbd_and_qemu_suites_pass_with_qnbd_as_qemu_nbd() {
    for tool in [
        "curl", "make", "gcc", "qemu-img", "qemu-io", "nbdkit", "certtool", "jq",
    ] {
        if !have(tool) {
            return;
        }
    }
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/external-suites.sh");
    let out = run(Command::new("bash").arg(script).arg(QNBD));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.code() == Some(77) {
        // No network for the sources: say so loudly, as a test that could not run.
        eprintln!("SKIP: other projects' test suites did not run:\n{text}");
        return;
    }
    assert!(out.status.success(), "{text}");
    eprintln!("{text}");
}
