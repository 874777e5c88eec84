//! nbdcopy round trips over several connections at once.

mod common;
use common::*;
use std::process::Command;

const MIB: u64 = 1 << 20;

#[test]
fn round_trip_with_multi_conn() {
    if !have("nbdcopy") {
        return;
    }
    let dir = tmpdir();
    let data: Vec<u8> = (0..(5 * MIB) as u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let src = make_raw(
        dir.path(),
        "src.raw",
        24 * MIB,
        &[(MIB, &data), (20 * MIB, &data[..MIB as usize])],
    );

    // Export -> file.
    let s = Server::unix(
        QNBD,
        &["-f", "raw", "-t", "-e", "8", "-r", src.to_str().unwrap()],
    );
    let out = dir.path().join("out.raw");
    ok(Command::new("nbdcopy")
        .args(["--connections=4", &s.uri()])
        .arg(&out));
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&src).unwrap());
    drop(s);

    // File -> export.
    let dst = make_raw(dir.path(), "dst.raw", 24 * MIB, &[(0, &[0xff; 65536])]);
    let s = Server::unix(QNBD, &["-f", "raw", "-t", "-e", "8", dst.to_str().unwrap()]);
    ok(Command::new("nbdcopy")
        .args(["--connections=4"])
        .arg(&src)
        .arg(s.uri()));
    drop(s);
    assert_eq!(std::fs::read(&dst).unwrap(), std::fs::read(&src).unwrap());
}
