//! Protocol-level checks through Python libnbd (nbdsh's library): structured replies,
//! sparse reads, block status, FUA, fast zero, errors, meta contexts, `-e`.

mod common;
use common::*;

const MIB: u64 = 1 << 20;

fn image(dir: &std::path::Path) -> std::path::PathBuf {
    make_raw(dir, "img.raw", 16 * MIB, &[(MIB, &[b'A'; 65536])])
}

#[test]
fn structured_replies_block_status_fua_zero_and_range_errors() {
    if !have_nbdsh() {
        return;
    }
    for transport in ["unix", "tcp"] {
        let dir = tmpdir();
        let img = image(dir.path());
        let args = ["-f", "raw", "-t", img.to_str().unwrap()];
        let s = if transport == "unix" {
            Server::unix(QNBD, &args)
        } else {
            Server::tcp(QNBD, &args)
        };
        assert_eq!(nbdsh_script("structured.py", &s.uri(), &[]).trim(), "ok");
    }
}

#[test]
fn read_only_export_refuses_writes_with_eperm() {
    if !have_nbdsh() {
        return;
    }
    let dir = tmpdir();
    let img = image(dir.path());
    let s = Server::unix(QNBD, &["-f", "raw", "-r", "-t", img.to_str().unwrap()]);
    assert_eq!(nbdsh_script("readonly.py", &s.uri(), &[]).trim(), "ok");
}

#[test]
fn meta_context_lists_match_qemu_rules() {
    if !have_nbdsh() {
        return;
    }
    let dir = tmpdir();
    let img = image(dir.path());
    let s = Server::unix(QNBD, &["-f", "raw", "-t", img.to_str().unwrap()]);
    assert_eq!(
        nbdsh_script("meta.py", &s.uri(), &["base:allocation"]).trim(),
        "ok"
    );
    let s = Server::unix(QNBD, &["-f", "raw", "-t", "-A", img.to_str().unwrap()]);
    assert_eq!(
        nbdsh_script(
            "meta.py",
            &s.uri(),
            &["base:allocation,qemu:allocation-depth"]
        )
        .trim(),
        "ok"
    );
    // The same script passes against qemu-nbd: the rules are qemu's.
    if have("qemu-nbd") {
        let s = Server::unix(
            "qemu-nbd",
            &["-f", "raw", "-t", "-A", img.to_str().unwrap()],
        );
        assert_eq!(
            nbdsh_script(
                "meta.py",
                &s.uri(),
                &["base:allocation,qemu:allocation-depth"]
            )
            .trim(),
            "ok"
        );
    }
}

#[test]
fn shared_limits_clients_like_qemu_nbd() {
    if !have_nbdsh() {
        return;
    }
    let dir = tmpdir();
    let img = image(dir.path());
    for n in ["1", "4"] {
        let s = Server::unix(QNBD, &["-f", "raw", "-t", "-e", n, img.to_str().unwrap()]);
        assert_eq!(
            nbdsh_script("shared.py", &s.uri(), &[n]).trim(),
            "ok",
            "-e {n}"
        );
    }
}
