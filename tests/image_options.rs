//! Cache, discard, detect-zeroes and offset options, checked the way a user would: the open
//! flags in /proc, the file's allocation, the bytes in the file.

mod common;
use common::*;
use std::os::unix::fs::MetadataExt;
use std::process::Command;

const MIB: u64 = 1 << 20;

const O_DIRECT: u32 = 0o40000;

fn allocated(p: &std::path::Path) -> u64 {
    std::fs::metadata(p).unwrap().blocks() * 512
}

#[test]
fn cache_none_uses_o_direct_and_unaligned_io_works() {
    if !have("qemu-io") {
        return;
    }
    let dir = tempfile::Builder::new()
        .prefix("qnbd-direct")
        .tempdir_in("/var/tmp")
        .unwrap();
    let img = make_raw(dir.path(), "d.raw", 4 * MIB + 1000, &[(0, &[0x33; 8192])]);
    for opt in ["--cache=none", "-n", "--cache=directsync"] {
        let s = Server::unix(QNBD, &["-f", "raw", "-t", opt, img.to_str().unwrap()]);
        let flags = open_flags(s.child.id(), &img);
        assert!(
            flags.iter().any(|f| f & O_DIRECT != 0),
            "{opt}: no O_DIRECT fd in {flags:?}"
        );
        ok(Command::new("qemu-io").args([
            "-f",
            "raw",
            "-c",
            "write -P 0x44 1000 3000",
            "-c",
            "write -P 0x55 4M 1000",
            "-c",
            "read -P 0x44 1000 3000",
            "-c",
            "read -P 0x33 0 1000",
            "-c",
            "read -P 0x55 4M 1000",
            &s.uri(),
        ]));
    }
    let data = std::fs::read(&img).unwrap();
    assert_eq!(data.len() as u64, 4 * MIB + 1000, "file size kept");
    assert!(data[..1000].iter().all(|&b| b == 0x33));
    assert!(data[1000..4000].iter().all(|&b| b == 0x44));
    assert!(data[4000..8192].iter().all(|&b| b == 0x33));
    assert!(data[4 * MIB as usize..].iter().all(|&b| b == 0x55));
    // Without a cache option: no O_DIRECT.
    let s = Server::unix(QNBD, &["-f", "raw", "-t", img.to_str().unwrap()]);
    assert!(open_flags(s.child.id(), &img)
        .iter()
        .all(|f| f & O_DIRECT == 0));
}

#[test]
fn trim_punches_holes_only_with_discard_unmap() {
    if !have("qemu-io") {
        return;
    }
    let dir = tmpdir();
    for (args, expect_hole) in [(vec![], false), (vec!["--discard=unmap"], true)] {
        let img = make_raw(
            dir.path(),
            "t.raw",
            4 * MIB,
            &[(0, &vec![0x66; 4 * MIB as usize])],
        );
        let before = allocated(&img);
        let mut all = vec!["-f", "raw", "-t"];
        all.extend(args.iter());
        all.push(img.to_str().unwrap());
        let s = Server::unix(QNBD, &all);
        ok(Command::new("qemu-io").args(["-f", "raw", "-c", "discard 1M 2M", &s.uri()]));
        drop(s);
        let after = allocated(&img);
        if expect_hole {
            assert!(after <= before - 2 * MIB, "{args:?}: {before} -> {after}");
        } else {
            assert_eq!(after, before, "{args:?}: TRIM is ignored by default");
        }
    }
}

#[test]
fn detect_zeroes_unmap_leaves_holes_where_zeroes_were_written() {
    if !have("qemu-io") || !have("nbdinfo") {
        return;
    }
    let dir = tmpdir();
    let img = make_raw(
        dir.path(),
        "z.raw",
        4 * MIB,
        &[(0, &vec![0x77; 4 * MIB as usize])],
    );
    let before = allocated(&img);
    let s = Server::unix(
        QNBD,
        &[
            "-f",
            "raw",
            "-t",
            // qemu-nbd checks --detect-zeroes=unmap as it reads it: --discard comes first.
            "--discard=unmap",
            "--detect-zeroes=unmap",
            img.to_str().unwrap(),
        ],
    );
    ok(Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 0 1M 1M", &s.uri()]));
    let map = ok(Command::new("nbdinfo").args(["--map", &s.uri()]));
    assert!(map.contains("1048576     1048576    3  hole,zero"), "{map}");
    drop(s);
    assert!(allocated(&img) <= before - MIB);
    let data = std::fs::read(&img).unwrap();
    assert!(data[MIB as usize..2 * MIB as usize].iter().all(|&b| b == 0));
    assert!(data[2 * MIB as usize..].iter().all(|&b| b == 0x77));

    // qemu-nbd's rule: unmap needs --discard=unmap.
    let out =
        run(Command::new(QNBD).args(["-f", "raw", "--detect-zeroes=unmap", img.to_str().unwrap()]));
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains("not allowed without setting discard operation to unmap"));
}

#[test]
fn offset_exports_exactly_the_bytes_after_it() {
    if !have("qemu-io") {
        return;
    }
    let dir = tmpdir();
    let img = make_raw(dir.path(), "o.raw", 4 * MIB, &[(MIB, b"start-of-export")]);
    let s = Server::unix(
        QNBD,
        &["-f", "raw", "-t", "-o", "1048576", img.to_str().unwrap()],
    );
    let info = ok(Command::new("qemu-img").args(["info", "--output=json", &s.uri()]));
    assert!(info.contains("\"virtual-size\": 3145728"), "{info}");
    ok(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "read -v 0 15",
        "-c",
        "write -P 0x99 3145216 512",
        &s.uri(),
    ]));
    drop(s);
    let data = std::fs::read(&img).unwrap();
    assert_eq!(&data[MIB as usize..MIB as usize + 15], b"start-of-export");
    assert!(data[4 * MIB as usize - 512..].iter().all(|&b| b == 0x99));
    assert!(data[..MIB as usize].iter().all(|&b| b == 0));
}

#[test]
fn mode_errors_match_qemu_nbd() {
    let dir = tmpdir();
    let img = make_raw(dir.path(), "e.raw", MIB, &[]);
    let img = img.to_str().unwrap();
    for args in [
        vec!["--cache=bogus", img],
        vec!["--detect-zeroes=bogus", img],
        vec!["--discard=bogus", img],
        vec!["--aio=bogus", img],
        vec!["-f", "raw", "--detect-zeroes=unmap", img],
    ] {
        let ours = run(Command::new(QNBD).args(&args));
        assert_eq!(ours.status.code(), Some(1));
        if have("qemu-nbd") {
            let theirs = run(Command::new("qemu-nbd").args(&args));
            assert_eq!(
                String::from_utf8_lossy(&ours.stderr).replacen("qnbd:", "PROG:", 1),
                String::from_utf8_lossy(&theirs.stderr).replacen("qemu-nbd:", "PROG:", 1),
                "{args:?}"
            );
        }
    }
}

#[test]
fn image_opts_slice_reads_and_writes_exactly_its_bytes() {
    if !have("qemu-io") {
        return;
    }
    let dir = tmpdir();
    let img = make_raw(dir.path(), "s,lice.raw", 8 * MIB, &[(MIB, b"slice-start")]);
    let spec = format!(
        "driver=raw,offset=1M,size=2M,file.driver=file,file.filename={}",
        img.display().to_string().replace(',', ",,")
    );
    let s = Server::unix(QNBD, &["-t", "--image-opts", &spec]);
    let info = ok(Command::new("qemu-img").args(["info", "--output=json", &s.uri()]));
    assert!(info.contains("\"virtual-size\": 2097152"), "{info}");
    let out = ok(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "read -v 0 11",
        "-c",
        "write -P 0xab 0 2M",
        &s.uri(),
    ]));
    assert!(out.contains("slice.start"), "{out}");
    drop(s);
    let data = std::fs::read(&img).unwrap();
    let m = MIB as usize;
    assert!(
        data[..m].iter().all(|&b| b == 0),
        "bytes before the slice untouched"
    );
    assert!(data[m..3 * m].iter().all(|&b| b == 0xab));
    assert!(
        data[3 * m..].iter().all(|&b| b == 0),
        "bytes after the slice untouched"
    );
}

#[test]
fn image_opts_errors_match_qemu_nbd() {
    let dir = tmpdir();
    let img = make_raw(dir.path(), "io.raw", 64 * MIB, &[]);
    let f = img.to_str().unwrap();
    let specs = [
        format!("driver=raw,offset=1M,size=100M,file.driver=file,file.filename={f}"),
        format!("driver=raw,file.driver=file,file.filename={f},bogus=1"),
        format!("driver=raw,file.driver=file,file.filename={f},file.bogus=1"),
        format!("driver=bogus,file.filename={f}"),
        "driver=raw,file.driver=file,file.filename=/nonexistent.img".to_string(),
        format!("driver=raw,offset=x,file.filename={f}"),
        format!("driver=qcow2,file.filename={f}"),
        // A node the options make read-only, asked for a writable export.
        format!("driver=raw,read-only=on,file.filename={f}"),
        format!("driver=raw,file.read-only=on,file.filename={f}"),
        format!("driver=file,read-only=on,filename={f}"),
        "driver=null-co,read-only=on".to_string(),
    ];
    for spec in specs {
        let ours = run(Command::new(QNBD).args(["--image-opts", &spec]));
        assert_eq!(ours.status.code(), Some(1), "{spec}");
        if have("qemu-nbd") {
            let theirs = run(Command::new("qemu-nbd").args(["--image-opts", &spec]));
            assert_eq!(
                String::from_utf8_lossy(&ours.stderr).replacen("qnbd:", "PROG:", 1),
                String::from_utf8_lossy(&theirs.stderr).replacen("qemu-nbd:", "PROG:", 1),
                "{spec}"
            );
        }
    }
}

#[test]
fn aio_modes_change_the_io_path() {
    if !have("qemu-io") {
        return;
    }
    let dir = tempfile::Builder::new()
        .prefix("qnbd-aio")
        .tempdir_in("/var/tmp")
        .unwrap();
    for (args, marker) in [
        (vec!["--aio=io_uring"], "anon_inode:[io_uring]"),
        (vec!["--aio=native", "--cache=none"], "[aio]"),
        (vec!["--aio=threads"], ""),
    ] {
        let img = make_raw(dir.path(), "a.raw", 4 * MIB, &[(0, &[0x21; 65536])]);
        let mut all = vec!["-f", "raw", "-t"];
        all.extend(args.iter());
        all.push(img.to_str().unwrap());
        let s = Server::unix(QNBD, &all);
        ok(Command::new("qemu-io").args([
            "-f",
            "raw",
            "-c",
            "read -P 0x21 0 64k",
            "-c",
            "write -P 0x43 1000 100000",
            "-c",
            "read -P 0x43 1000 100000",
            &s.uri(),
        ]));
        if !marker.is_empty() {
            // The rings live in the worker threads of a connection: look while one is open.
            let mut bg = Command::new("qemu-io")
                .args([
                    "-f",
                    "raw",
                    "-c",
                    "read 0 64k",
                    "-c",
                    "sleep 3000",
                    &s.uri(),
                ])
                .stdout(std::process::Stdio::null())
                .spawn()
                .unwrap();
            std::thread::sleep(std::time::Duration::from_millis(1500));
            let pid = s.child.id();
            let mut seen = String::new();
            for e in std::fs::read_dir(format!("/proc/{pid}/fd"))
                .unwrap()
                .flatten()
            {
                if let Ok(l) = std::fs::read_link(e.path()) {
                    seen.push_str(&l.to_string_lossy());
                    seen.push('\n');
                }
            }
            seen.push_str(
                &std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default(),
            );
            let _ = bg.wait();
            assert!(
                seen.contains(marker),
                "{args:?}: no {marker} in the process"
            );
        }
        drop(s);
        let data = std::fs::read(&img).unwrap();
        assert!(data[1000..101000].iter().all(|&b| b == 0x43), "{args:?}");
    }
    // qemu's rule: native AIO needs O_DIRECT.
    let img = make_raw(dir.path(), "b.raw", MIB, &[]);
    let out = run(Command::new(QNBD).args(["-f", "raw", "--aio=native", img.to_str().unwrap()]));
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains("aio=native was specified, but it requires cache.direct=on"));
}

/// qemu's `null-co` protocol: `null-co://` (1 GiB) and `--image-opts driver=null-co,...`
/// serve zeroes and forget writes; size, block status and the probing warning as qemu-nbd's.
#[test]
fn null_co_serves_nothing_like_qemu_nbd() {
    if !have("qemu-nbd") || !have("nbdinfo") || !have("qemu-io") {
        return;
    }
    let cases: [&[&str]; 3] = [
        &["-f", "raw", "null-co://"],
        &["null-co://"],
        &["--image-opts", "driver=null-co,size=1M,read-zeroes=on"],
    ];
    for args in cases {
        let seen = |bin: &str| {
            let mut all = vec!["-t"];
            all.extend_from_slice(args);
            let s = Server::unix(bin, &all);
            let size = ok(Command::new("nbdinfo").args(["--size", &s.uri()]));
            let map = ok(Command::new("nbdinfo").args(["--map", &s.uri()]));
            let io = ok(Command::new("qemu-io").args([
                "-f",
                "raw",
                "-c",
                "write -P 7 0 4k",
                "-c",
                "read 0 4k",
                &s.uri(),
            ]));
            (size, map, io.contains("read 4096/4096"))
        };
        let theirs = seen("qemu-nbd");
        assert!(theirs.2, "{args:?}: qemu-nbd takes the write and the read");
        assert_eq!(seen(QNBD), theirs, "{args:?}");
        // What qnbd reads is zeroes (qemu's buffer, without read-zeroes=on, is whatever it
        // held).
        let mut all = vec!["-t"];
        all.extend_from_slice(args);
        let s = Server::unix(QNBD, &all);
        let io =
            ok(Command::new("qemu-io").args(["-f", "raw", "-c", "read -P 0 512 4k", &s.uri()]));
        assert!(io.contains("read 4096/4096"), "{io}");
    }
}

/// What `nbdinfo` reports of an export (flags, block sizes, size) is qemu-nbd's in every
/// mode over a probed or named raw image whose size is not a whole sector: `-r -s` exports
/// read-only, a probed raw image takes whole sectors only, read-only or not.
#[test]
fn export_flags_match_qemu_nbd_in_every_mode() {
    if !have("qemu-nbd") || !have("nbdinfo") {
        return;
    }
    let dir = tmpdir();
    let img = dir.path().join("odd.raw");
    std::fs::write(&img, vec![7u8; 3000]).unwrap();
    let f = img.to_str().unwrap();
    let info = |bin: &str, mode: &[&str]| {
        let mut args = vec!["-t"];
        args.extend_from_slice(mode);
        args.push(f);
        let mut s = Server::unix(bin, &args);
        let out = ok(Command::new("nbdinfo").arg(s.uri()));
        s.terminate();
        out.lines()
            .filter(|l| !l.contains("uri:") && !l.contains("export="))
            .collect::<Vec<_>>()
            .join("\n")
    };
    for mode in [
        &["-r"][..],
        &["-r", "-s"],
        &["-s"],
        &[],
        &["-f", "raw", "-r"],
        &["-f", "raw"],
    ] {
        assert_eq!(info(QNBD, mode), info("qemu-nbd", mode), "{mode:?}");
    }
}
