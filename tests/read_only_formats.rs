//! Bochs and cloop images, which qemu reads but cannot make: built here byte by byte, then
//! served by qnbd and by qemu-nbd side by side. Both must read the same bytes, map them the
//! same way, refuse a read-write open and damaged headers in the same words, and a block
//! that fails to read must fail its request, not the server.

mod common;
use common::*;
use flate2::{write::ZlibEncoder, Compression};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

fn le32(v: u32) -> [u8; 4] {
    v.to_le_bytes()
}

/// A growing Bochs redolog image of `disk` bytes in `extent`-byte extents: every third
/// extent unallocated, every fourth sector of the others clear in its bitmap.
fn bochs(d: &Path, name: &str, disk: u64, extent: u32, v1: bool) -> PathBuf {
    let catalog = disk.div_ceil(u64::from(extent)) as u32;
    let mut h = Vec::new();
    for (text, len) in [
        (&b"Bochs Virtual HD Image"[..], 32),
        (b"Redolog", 16),
        (b"Growing", 16),
    ] {
        h.extend_from_slice(text);
        h.resize(h.len() + len - text.len(), 0);
    }
    h.extend(le32(if v1 { 0x10000 } else { 0x20000 }));
    h.extend(le32(512));
    h.extend(le32(catalog));
    h.extend(le32(512));
    h.extend(le32(extent));
    if !v1 {
        h.extend(le32(0));
    }
    h.extend(disk.to_le_bytes());
    h.resize(512, 0);
    let (mut table, mut data) = (Vec::new(), Vec::new());
    let sectors = extent / 512;
    let mut next = 0u32;
    for e in 0..catalog {
        if e % 3 == 1 {
            table.extend(le32(u32::MAX));
            continue;
        }
        table.extend(le32(next));
        next += 1;
        let mut bitmap = vec![0u8; 512];
        let mut sects = Vec::new();
        for s in 0..sectors {
            if (s + e) % 4 != 0 {
                bitmap[(s / 8) as usize] |= 1 << (s % 8);
            }
            let line = format!("{e:08}:{s:04} ").repeat(37);
            sects.extend_from_slice(&line.as_bytes()[..512]);
        }
        data.extend(bitmap);
        data.extend(sects);
    }
    let p = d.join(name);
    std::fs::write(&p, [h, table, data].concat()).unwrap();
    p
}

const CLOOP_MAGIC: &[u8] =
    b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n";

/// A cloop V2.0 image of `blocks` blocks of `bs` bytes, every fourth one all zeroes.
fn cloop(d: &Path, name: &str, blocks: u32, bs: u32) -> PathBuf {
    let mut h = CLOOP_MAGIC.to_vec();
    h.resize(128, 0);
    h.extend(bs.to_be_bytes());
    h.extend(blocks.to_be_bytes());
    let mut packed = Vec::new();
    let mut at = 128 + 8 + 8 * (u64::from(blocks) + 1);
    let mut table = at.to_be_bytes().to_vec();
    for b in 0..blocks {
        let raw = if b % 4 == 2 {
            vec![0u8; bs as usize]
        } else {
            format!("block {b:06} ")
                .repeat(bs as usize / 13 + 1)
                .into_bytes()[..bs as usize]
                .to_vec()
        };
        let mut z = ZlibEncoder::new(Vec::new(), Compression::default());
        z.write_all(&raw).unwrap();
        let z = z.finish().unwrap();
        at += z.len() as u64;
        table.extend(at.to_be_bytes());
        packed.extend(z);
    }
    let p = d.join(name);
    std::fs::write(&p, [h, table, packed].concat()).unwrap();
    p
}

/// The whole export and its map, as `bin` serves `img` (probed when `fmt` is None).
fn served(bin: &str, img: &Path, fmt: Option<&str>) -> (Vec<u8>, String) {
    let mut args = vec!["-r", "-t"];
    if let Some(f) = fmt {
        args.extend(["-f", f]);
    }
    args.push(img.to_str().unwrap());
    let mut s = Server::unix(bin, &args);
    let out = img.with_extension(format!("{}.out", bin.rsplit('/').next().unwrap()));
    ok(Command::new("nbdcopy").arg(s.uri()).arg(&out));
    let map = ok(Command::new("nbdinfo").args(["--map", &s.uri()]));
    let info = ok(Command::new("nbdinfo").arg(s.uri()));
    let sizes: String = info
        .lines()
        .filter(|l| l.contains("block_size") || l.contains("export-size"))
        .collect();
    s.terminate();
    (std::fs::read(&out).unwrap(), map + &sizes)
}

fn same_as_qemu_nbd(img: &Path, fmt: &str) -> Vec<u8> {
    let ours = served(QNBD, img, None);
    assert_eq!(
        ours,
        served("qemu-nbd", img, Some(fmt)),
        "{}",
        img.display()
    );
    assert_eq!(ours, served(QNBD, img, Some(fmt)));
    ours.0
}

fn tools() -> bool {
    have("qemu-nbd") && have("nbdcopy") && have("nbdinfo")
}

#[test]
fn bochs_images_read_and_map_as_qemu_nbd_serves_them() {
    if !tools() {
        return;
    }
    let d = tmpdir();
    let data = same_as_qemu_nbd(&bochs(d.path(), "a.bochs", 1 << 20, 4096, false), "bochs");
    // Extent 0, sector 0 is clear in its bitmap; sector 1 is data; extent 1 unallocated.
    assert!(data[..512].iter().all(|&b| b == 0));
    assert!(data[512..].starts_with(b"00000000:0001 "));
    assert!(data[4096..8192].iter().all(|&b| b == 0));
    same_as_qemu_nbd(&bochs(d.path(), "v1.bochs", 1 << 20, 4096, true), "bochs");
    // A size that is not a whole extent, in 64 KiB extents.
    same_as_qemu_nbd(
        &bochs(d.path(), "odd.bochs", 300 * 1024 + 512, 65536, false),
        "bochs",
    );
}

#[test]
fn cloop_images_read_and_map_as_qemu_nbd_serves_them() {
    if !tools() {
        return;
    }
    let d = tmpdir();
    let data = same_as_qemu_nbd(&cloop(d.path(), "a.cloop", 16, 65536), "cloop");
    assert!(data.starts_with(b"block 000000 block 000000 "));
    assert!(data[2 * 65536..3 * 65536].iter().all(|&b| b == 0));
    same_as_qemu_nbd(&cloop(d.path(), "small.cloop", 7, 512), "cloop");
}

fn refused_alike(d: &Path, args: &[&str]) -> String {
    let ours = refusal_line(QNBD, d, args);
    assert_eq!(ours, refusal_line("qemu-nbd", d, args), "{args:?}");
    ours
}

fn patched(src: &Path, name: &str, at: usize, bytes: &[u8]) -> String {
    let mut b = std::fs::read(src).unwrap();
    b[at..at + bytes.len()].copy_from_slice(bytes);
    std::fs::write(src.with_file_name(name), b).unwrap();
    name.to_string()
}

#[test]
fn read_write_opens_and_damaged_headers_are_refused_in_qemu_nbds_words() {
    if !tools() {
        return;
    }
    let d = tmpdir();
    let b = bochs(d.path(), "a.bochs", 1 << 20, 4096, false);
    let c = cloop(d.path(), "a.cloop", 8, 65536);
    let msg = refused_alike(d.path(), &["a.bochs"]);
    assert!(msg.ends_with("Image is read-only"), "{msg}");
    refused_alike(d.path(), &["-f", "cloop", "a.cloop"]);
    let bochs_cases = [
        patched(&b, "magic.bochs", 0, b"b"),
        patched(&b, "catalog.bochs", 72, &le32(0x10_0001)),
        patched(&b, "small-extent.bochs", 80, &le32(256)),
        patched(&b, "odd-extent.bochs", 80, &le32(4097)),
        patched(&b, "huge-extent.bochs", 80, &le32(16 << 20)),
        patched(&b, "short-catalog.bochs", 72, &le32(100)),
    ];
    for img in &bochs_cases {
        refused_alike(d.path(), &["-r", "-f", "bochs", img]);
    }
    let cloop_cases = [
        patched(&c, "bs-odd.cloop", 128, &1000u32.to_be_bytes()),
        patched(&c, "bs-zero.cloop", 128, &0u32.to_be_bytes()),
        patched(&c, "bs-huge.cloop", 128, &(128u32 << 20).to_be_bytes()),
        patched(&c, "n-huge.cloop", 132, &0x2000_0000u32.to_be_bytes()),
        patched(&c, "n-many.cloop", 132, &0x1000_0000u32.to_be_bytes()),
        patched(&c, "order.cloop", 136 + 8 * 3, &1u64.to_be_bytes()),
        patched(&c, "gap.cloop", 136 + 8 * 8, &u64::MAX.to_be_bytes()),
        // More blocks than the file has offsets for: the table runs into zeroes.
        patched(&c, "cut.cloop", 132, &100_000u32.to_be_bytes()),
    ];
    for img in &cloop_cases {
        refused_alike(d.path(), &["-r", "-f", "cloop", img]);
    }
}

/// A block that does not inflate fails its read (EIO, as qemu-nbd) and only that read.
#[test]
fn a_damaged_cloop_block_fails_its_read_not_the_server() {
    if !tools() || !have("qemu-io") {
        return;
    }
    let d = tmpdir();
    let c = cloop(d.path(), "a.cloop", 8, 65536);
    let mut bytes = std::fs::read(&c).unwrap();
    let table = 136;
    let third = u64::from_be_bytes(bytes[table + 16..table + 24].try_into().unwrap()) as usize;
    bytes[third + 10..third + 40].fill(0xa5);
    std::fs::write(d.path().join("bad.cloop"), bytes).unwrap();
    for bin in [QNBD, "qemu-nbd"] {
        let bad = d.path().join("bad.cloop");
        let mut s = Server::unix(bin, &["-r", "-t", "-f", "cloop", bad.to_str().unwrap()]);
        let r = qemu_io_any(d.path(), &s.uri(), &["read 128k 4k"]);
        assert!(r.contains("Input/output error"), "{bin}: {r}");
        let r = qemu_io_any(d.path(), &s.uri(), &["read -P 0 384k 4k", "read 0 64k"]);
        assert!(!r.contains("error") && !r.contains("fail"), "{bin}: {r}");
        s.terminate();
    }
}

fn qemu_io_any(d: &Path, target: &str, cmds: &[&str]) -> String {
    let mut c = Command::new("qemu-io");
    c.current_dir(d).args(["-r", "-f", "raw"]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    let out = run(c.arg(target));
    String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr)
}
