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

/// The share for ktls.sh: the server's and the client's certificates.
fn share_with_pki() -> tempfile::TempDir {
    let pki = common::pki::pki();
    let share = tempfile::Builder::new()
        .prefix("qnbd-vm-share.")
        .tempdir_in("/var/tmp")
        .expect("a share directory");
    copy_dir(&pki.server, &share.path().join("pki/server"));
    copy_dir(&pki.client, &share.path().join("pki/client"));
    share
}

/// Debian 12's 6.12: TLS 1.2 goes to the kernel, TLS 1.3 stays on our record layer.
#[test]
fn kernel_tls_sessions_in_a_guest() {
    if !common::have("certtool") || !common::have("qemu-img") {
        return;
    }
    let share = share_with_pki();
    common::run_guest_script_in("ktls.sh", 2, &common::guest_qnbd(), Some(share.path()));
}

/// A kernel that renews keys (trixie-backports' newest): TLS 1.3 goes to the kernel too,
/// and our send key is renewed every few records.
#[test]
fn kernel_tls_13_with_key_renewal_on_a_newer_kernel() {
    if !common::have("certtool") || !common::have("qemu-img") {
        return;
    }
    let share = share_with_pki();
    common::run_guest_script_env(
        "ktls.sh",
        2,
        &common::guest_qnbd(),
        Some(share.path()),
        &[("QNBD_VM_KERNEL", "backports")],
    );
}
