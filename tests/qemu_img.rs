//! qemu-img and qemu-io as NBD clients, over Unix and TCP sockets.

mod common;
use common::*;
use std::process::Command;

const MIB: u64 = 1 << 20;

fn servers(img: &std::path::Path, extra: &[&str]) -> Vec<Server> {
    let mut args = vec!["-f", "raw", "-t"];
    args.extend_from_slice(extra);
    args.push(img.to_str().unwrap());
    vec![Server::unix(QNBD, &args), Server::tcp(QNBD, &args)]
}

#[test]
fn info_convert_and_compare() {
    if !have("qemu-img") {
        return;
    }
    let dir = tmpdir();
    let pattern: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let img = make_raw(
        dir.path(),
        "src.raw",
        8 * MIB,
        &[(4096, &pattern), (5 * MIB + 3, b"tail")],
    );
    for s in servers(&img, &["-x", "exp"]) {
        let s = s.with_name("exp");
        let info = ok(Command::new("qemu-img").args(["info", "--output=json", &s.uri()]));
        assert!(info.contains("\"virtual-size\": 8388608"), "{info}");
        let out = dir.path().join("out.raw");
        ok(Command::new("qemu-img")
            .args(["convert", "-O", "raw", &s.uri()])
            .arg(&out));
        assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&img).unwrap());
        let cmp = ok(Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&img)
            .arg(s.uri()));
        assert!(cmp.contains("Images are identical"), "{cmp}");
    }
}

#[test]
fn convert_into_the_export_lands_in_the_file() {
    if !have("qemu-img") {
        return;
    }
    let dir = tmpdir();
    let src: Vec<u8> = (0..(3 * MIB) as u32).map(|i| (i % 253) as u8).collect();
    let srcimg = make_raw(dir.path(), "src.raw", 4 * MIB, &[(MIB / 2, &src)]);
    let dst = make_raw(dir.path(), "dst.raw", 4 * MIB, &[(0, &[0xee; 8192])]);
    let s = Server::unix(QNBD, &["-f", "raw", "-t", dst.to_str().unwrap()]);
    ok(Command::new("qemu-img")
        .args(["convert", "-n", "-f", "raw", "-O", "raw"])
        .arg(&srcimg)
        .arg(s.uri()));
    drop(s);
    assert_eq!(
        std::fs::read(&dst).unwrap(),
        std::fs::read(&srcimg).unwrap()
    );
}

#[test]
fn qemu_io_patterns_zeroes_discard_and_aio() {
    if !have("qemu-io") {
        return;
    }
    let dir = tmpdir();
    let img = make_raw(dir.path(), "io.raw", 4 * MIB, &[(0, &[0x11; 65536])]);
    for s in servers(&img, &[]) {
        let out = ok(Command::new("qemu-io").args([
            "-f",
            "raw",
            "-c",
            "read -P 0x11 0 64k",
            "-c",
            "write -P 0x5a 1M 128k",
            "-c",
            "read -P 0x5a 1M 128k",
            "-c",
            "write -z 1M 4k",
            "-c",
            "read -P 0 1M 4k",
            "-c",
            "discard 2M 64k",
            "-c",
            "aio_write -P 0x77 3M 64k",
            "-c",
            "aio_write -P 0x78 3200k 64k",
            "-c",
            "aio_flush",
            "-c",
            "read -P 0x77 3M 64k",
            "-c",
            "write -P 0x42 4095k 1k",
            &s.uri(),
        ]));
        assert!(!out.contains("Pattern verification failed"), "{out}");
        assert!(!out.to_lowercase().contains("error"), "{out}");
    }
    // What NBD wrote is in the file, byte for byte.
    let data = std::fs::read(&img).unwrap();
    let m = MIB as usize;
    assert!(data[..65536].iter().all(|&b| b == 0x11));
    assert!(data[m..m + 4096].iter().all(|&b| b == 0));
    assert!(data[m + 4096..m + 131072].iter().all(|&b| b == 0x5a));
    assert!(data[3 * m..3 * m + 65536].iter().all(|&b| b == 0x77));
    assert!(data[3200 * 1024..3264 * 1024].iter().all(|&b| b == 0x78));
    assert!(data[4095 * 1024..].iter().all(|&b| b == 0x42));
}

#[test]
fn map_over_extended_headers_matches_qemu_nbd() {
    // qemu 10's client negotiates extended headers, so this exercises BLOCK_STATUS_EXT.
    if !have("qemu-img") || !have("qemu-nbd") {
        return;
    }
    let dir = tmpdir();
    let img = make_raw(
        dir.path(),
        "m.raw",
        64 * MIB,
        &[
            (0, &[9; 512]),
            (3 * MIB, &[8; 70000]),
            (40 * MIB, &[7; 4096]),
        ],
    );
    let mut maps = Vec::new();
    for bin in [QNBD, "qemu-nbd"] {
        let s = Server::unix(bin, &["-f", "raw", "-t", "-r", img.to_str().unwrap()]);
        maps.push(ok(Command::new("qemu-img").args([
            "map",
            "--output=json",
            "-f",
            "raw",
            &s.uri(),
        ])));
    }
    assert_eq!(maps[0], maps[1]);
}
