//! The ublk frontend (`-c ublk`, `-c /dev/ublkbN`, `--recover`, `-d`) against the kernel's
//! ublk driver, in the TCG guest (the host kernel has no ublk_drv): scripts/vm/run.sh boots
//! it and runs scripts/vm/guest/ublk.sh there. A guest without ublk fails the script.

mod common;

#[test]
fn ublk_devices_in_a_guest() {
    // 4 CPUs: the driver gives a device at most one queue per CPU, and the fio check runs
    // on 4 queues.
    common::run_guest_script("ublk.sh", 4);
}
