//! The ublk frontend (`-c ublk`, `-c /dev/ublkbN`, `--recover`, `-d`) against the kernel's
//! ublk driver, in the TCG guest (the host kernel has no ublk_drv): scripts/vm/run.sh boots
//! it and runs scripts/vm/guest/ublk.sh there. A guest without ublk fails the script.
//!
//! The share holds a LUKS image made here by qemu-img and a pattern; the guest writes the
//! pattern through a ublk device and leaves the image, which qemu-img then compares here.

mod common;

use std::process::Command;

const SECRET: &str = "secret,id=sec0,data=hunter2";
// Small: the guest runs the debug build under TCG (no AES-NI there).
const SIZE: usize = 4 << 20;

fn pattern() -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..SIZE)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("run a tool");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{cmd:?} failed: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

#[test]
fn ublk_devices_in_a_guest() {
    if !common::have("qemu-img") {
        return;
    }
    let share = tempfile::Builder::new()
        .prefix("qnbd-vm-share.")
        .tempdir_in("/var/tmp")
        .expect("a share directory");
    let dir = share.path();
    std::fs::write(dir.join("pattern.bin"), pattern()).expect("write the pattern");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "luks", "--object", SECRET])
        .args(["-o", "key-secret=sec0,iter-time=10"])
        .arg(dir.join("luks.img"))
        .arg(SIZE.to_string()));
    // 4 CPUs: the driver gives a device at most one queue per CPU, and the fio check runs
    // on 4 queues.
    if !common::run_guest_script_in("ublk.sh", 4, &common::guest_qnbd(), Some(dir)) {
        return;
    }
    let out = dir.join("luks-out.img");
    let opts = format!(
        "driver=luks,key-secret=sec0,file.filename={}",
        out.display()
    );
    let said = run(Command::new("qemu-img")
        .args(["compare", "--object", SECRET, "--image-opts", &opts])
        .arg(format!(
            "driver=raw,file.filename={}",
            dir.join("pattern.bin").display()
        )));
    assert!(said.contains("Images are identical"), "{said}");
}
