//! `-c` / `-d` against the Linux kernel's NBD client, in a TCG guest (the host kernel has no
//! nbd module): scripts/vm/run.sh boots it and runs scripts/vm/guest/kernel.sh there.

mod common;
use common::*;
use std::process::Command;

#[test]
fn kernel_nbd_devices_in_a_guest() {
    let top = env!("CARGO_MANIFEST_DIR");
    let out = Command::new("bash")
        .arg(format!("{top}/scripts/vm/run.sh"))
        .arg(format!("{top}/scripts/vm/guest/kernel.sh"))
        .env("QNBD_BIN", QNBD)
        .output()
        .expect("run scripts/vm/run.sh");
    let console = String::from_utf8_lossy(&out.stdout);
    let errors = String::from_utf8_lossy(&out.stderr);
    if out.status.code() == Some(77) {
        eprintln!("SKIP: the kernel test guest cannot run on this machine:\n{errors}");
        if std::env::var_os("QNBD_REQUIRE_TOOLS").is_some() {
            panic!("the kernel test guest is required (QNBD_REQUIRE_TOOLS is set)");
        }
        return;
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
}
