//! Kernel TLS for x509 exports, in the TCG guest (the host kernel has no tls module):
//! scripts/vm/run.sh boots it and runs scripts/vm/guest/ktls.sh there, which checks the
//! bytes real clients read back and the kernel's TLS counters. The certificates are made
//! here (certtool) and reach the guest on its share.

mod common;

use std::path::Path;

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("read the pki") {
        let e = e.expect("a pki entry");
        std::fs::copy(e.path(), to.join(e.file_name())).expect("copy a certificate");
    }
}

#[test]
fn kernel_tls_sessions_in_a_guest() {
    if !common::have("certtool") || !common::have("qemu-img") {
        return;
    }
    let pki = common::pki::pki();
    let share = tempfile::Builder::new()
        .prefix("qnbd-vm-share.")
        .tempdir_in("/var/tmp")
        .expect("a share directory");
    let dir = share.path();
    copy_dir(&pki.server, &dir.join("pki/server"));
    copy_dir(&pki.client, &dir.join("pki/client"));
    common::run_guest_script_in("ktls.sh", 2, Path::new(common::QNBD), Some(dir));
}
