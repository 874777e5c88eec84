//! The load soak (scripts/load.sh), short: -e 64 with 64 clients of mixed verified I/O for
//! 30 s, RSS/fds/threads sampled, back to idle afterwards, then SIGTERM under load with every
//! acknowledged write read back and the qcow2 image checked. `DURATION=600 scripts/load.sh`
//! is the 10-minute run.

mod common;
use common::*;
use std::process::Command;

#[test]
fn sixty_four_clients_of_verified_io_then_sigterm_under_load() {
    if !have_nbdsh() || !have("qemu-img") {
        return;
    }
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/load.sh");
    let out = run(Command::new("bash")
        .arg(script)
        .env("QNBD", QNBD)
        .env("DURATION", "30")
        .env("SAMPLE", "10")
        .env("SIZE", "256M"));
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    eprintln!("{text}");
    assert!(
        out.status.success() && text.contains("load: PASS"),
        "scripts/load.sh failed:\n{text}"
    );
}
