//! The same client-visible checks over every format × transport × TLS combination: bytes
//! written through qemu-io read back through qemu-img and libnbd (nbdinfo), the map says where
//! they are, and a qcow2 image is check-clean afterwards.

mod common;
use common::matrix::cases;
use common::pki::pki;
use common::*;
use std::process::Command;

#[test]
fn writes_read_back_and_map_on_every_combination() {
    if !have("qemu-img") || !have("qemu-io") || !have("nbdinfo") || !have("certtool") {
        return;
    }
    let pki = pki();
    for case in cases() {
        let d = tmpdir();
        let img = match case.format {
            "qcow2" => make_qcow2(d.path(), "m.qcow2", "", "16M"),
            _ => make_raw(d.path(), "m.raw", 16 << 20, &[]),
        };
        let mut served = case.serve(QNBD, &img, &pki, &[]);
        let name = case.name();
        let io = |cmds: &[&str]| {
            let mut c = Command::new("qemu-io");
            for cmd in cmds {
                c.args(["-c", cmd]);
            }
            let out = ok(c.args(&served.qemu));
            assert!(!out.contains("failed"), "{name}: {out}");
            out
        };
        io(&["write -P 0x5a 1M 64k", "write -z 4M 1M", "flush"]);
        io(&["read -P 0x5a 1M 64k", "read -P 0 4M 1M", "read -P 0 0 1M"]);
        let raw = d.path().join("out.raw");
        let mut conv = Command::new("qemu-img");
        conv.arg("convert");
        conv.args(&served.qemu[..served.qemu.len() - 1]);
        let src = served.qemu.last().cloned().unwrap_or_default();
        ok(conv.arg(&src).arg("-O").arg("raw").arg(&raw));
        let bytes = std::fs::read(&raw).unwrap();
        assert!(
            bytes[1 << 20..(1 << 20) + 65536].iter().all(|&b| b == 0x5a),
            "{name}: converted data"
        );
        let map = ok(Command::new("nbdinfo").args(["--map", &served.uri]));
        assert!(
            map.lines()
                .any(|l| l.split_whitespace().nth(3) == Some("data")),
            "{name}: map {map}"
        );
        served.server.terminate().expect("server exits on SIGTERM");
        if case.format == "qcow2" {
            check_clean(&img);
        }
    }
}
