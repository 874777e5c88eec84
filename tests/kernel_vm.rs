//! `-c` / `-d` against the Linux kernel's NBD client, in a TCG guest (the host kernel has no
//! nbd module): scripts/vm/run.sh boots it and runs scripts/vm/guest/kernel.sh there.

mod common;

#[test]
fn kernel_nbd_devices_in_a_guest() {
    common::run_guest_script("kernel.sh", 2);
}
