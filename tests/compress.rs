//! `--image-opts driver=compress,file.driver=qcow2,...` (qemu's compress filter): what
//! nbdcopy writes lands as compressed clusters qemu reads back; refusals match qemu-nbd's;
//! a server killed while compressing leaves an image `qemu-img check` finds no error in,
//! whose every allocated cluster holds what was written.

mod common;
use common::*;
use std::process::Command;
use std::time::Duration;

const MIB: u64 = 1 << 20;
const CLUSTER: usize = 65536;

/// Compressible but not trivial: each 4 KiB block a run of one byte and its own index.
fn source(dir: &std::path::Path, size: u64) -> std::path::PathBuf {
    let p = dir.join("src.raw");
    let mut data = vec![0u8; size as usize];
    for (i, block) in data.chunks_mut(4096).enumerate() {
        // Every fifth 64 KiB cluster stays a hole (zeroes).
        if (i / 16) % 5 == 4 {
            continue;
        }
        block.fill((i % 251) as u8 | 1);
        block[..8].copy_from_slice(&(i as u64).to_le_bytes());
    }
    std::fs::write(&p, &data).unwrap();
    p
}

fn compress_opts(img: &std::path::Path) -> String {
    format!(
        "driver=compress,file.driver=qcow2,file.file.driver=file,file.file.filename={}",
        img.display()
    )
}

fn map_json(img: &std::path::Path) -> String {
    ok(Command::new("qemu-img")
        .args(["map", "--output=json"])
        .arg(img))
}

#[test]
fn nbdcopy_into_the_compress_filter_writes_what_qemu_reads() {
    if !have("qemu-img") || !have("nbdcopy") {
        return;
    }
    for kind in ["zlib", "zstd"] {
        let dir = tmpdir();
        let src = source(dir.path(), 8 * MIB);
        let img = make_qcow2(
            dir.path(),
            "c.qcow2",
            &format!("compression_type={kind}"),
            "8M",
        );
        let opts = compress_opts(&img);
        let mut s = Server::unix(QNBD, &["--image-opts", &opts]);
        ok(Command::new("nbdcopy").arg(&src).arg(s.uri()));
        // The last client gone, the server flushes and exits by itself.
        let st = s.wait_exit(Duration::from_secs(20));
        assert!(st.is_some_and(|st| st.success()), "{kind}: {st:?}");
        check_clean(&img);
        let cmp = ok(Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "qcow2"])
            .arg(&src)
            .arg(&img));
        assert!(cmp.contains("identical"), "{kind}: {cmp}");
        let map = map_json(&img);
        assert!(map.contains("\"compressed\": true"), "{kind}: {map}");
        assert!(
            !map.contains("\"data\": true, \"compressed\": false"),
            "{kind}: every data cluster is compressed: {map}"
        );
        let size = std::fs::metadata(&img).unwrap().len();
        assert!(size < 2 * MIB, "{kind}: {size} bytes for 6.4 MiB of data");
    }
}

#[test]
fn the_compress_filter_refuses_what_qemu_nbd_refuses() {
    if !have("qemu-img") || !have("qemu-nbd") || !have("qemu-io") {
        return;
    }
    let dir = tmpdir();
    let d = dir.path();
    let raw = make_raw(d, "r.raw", MIB, &[]);
    let q = make_qcow2(d, "q.qcow2", "", "1M");
    let cases = [
        format!(
            "driver=compress,file.driver=raw,file.file.filename={}",
            raw.display()
        ),
        format!("driver=compress,file.filename={}", q.display()),
        format!("{},bogus=1", compress_opts(&q)),
    ];
    for opts in &cases {
        let said = |bin: &str| {
            let sock = d.join("refuse.sock");
            let out = run(Command::new(bin)
                .arg("-k")
                .arg(&sock)
                .args(["--image-opts", opts]));
            (
                out.status.code(),
                String::from_utf8_lossy(&out.stderr).replace("qnbd:", "qemu-nbd:"),
            )
        };
        let theirs = said("qemu-nbd");
        assert_eq!(theirs.0, Some(1), "{opts}: {theirs:?}");
        assert_eq!(said(QNBD), theirs, "{opts}");
    }
    // The block size is the cluster, and an allocated cluster cannot be written again.
    let opts = compress_opts(&q);
    let s = Server::unix(QNBD, &["-t", "--image-opts", &opts]);
    let info = ok(Command::new("nbdinfo").arg(s.uri()));
    assert!(info.contains("block_size_minimum: 65536"), "{info}");
    let uri = s.uri();
    let io = |cmd: &str| run(Command::new("qemu-io").args(["-f", "raw", "-c", cmd, &uri]));
    let first = io("write -P 7 64k 4k");
    assert!(first.status.success(), "{first:?}");
    let again = io("write -P 8 64k 4k");
    assert!(
        String::from_utf8_lossy(&again.stdout).contains("write failed: Input/output error"),
        "{again:?}"
    );
    let read = ok(Command::new("qemu-io").args(["-f", "raw", "-c", "read -P 7 64k 4k", &uri]));
    assert!(read.contains("read 4096/4096"), "{read}");
}

/// Kill -9 while four connections write clusters and flush now and then: the image is
/// never corrupt (leaks are allowed), every cluster a completed flush covered reads back, and
/// every other cluster reads as what was written or as zeroes (a cluster is linked only after
/// its compressed bytes are written).
#[test]
fn a_compressing_server_killed_mid_copy_leaves_a_consistent_image() {
    if !have("qemu-img") || !have_nbdsh() {
        return;
    }
    let dir = tmpdir();
    let src_path = source(dir.path(), 32 * MIB);
    let src = std::fs::read(&src_path).unwrap();
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/nbdsh/compress_crash.py");
    for round in 0..5u64 {
        let img = make_qcow2(dir.path(), &format!("k{round}.qcow2"), "", "32M");
        let opts = compress_opts(&img);
        let mut s = Server::unix(QNBD, &["-t", "--image-opts", &opts]);
        let log = dir.path().join(format!("k{round}.durable"));
        let mut writer = Command::new(PYTHON)
            .arg(&script)
            .arg(s.uri())
            .arg(&src_path)
            .arg(&log)
            .stderr(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // Kill once some flushes completed, with writes in flight: later each round.
        let want = 8 + 16 * round as usize;
        let start = std::time::Instant::now();
        while start.elapsed() < Duration::from_secs(30)
            && std::fs::read_to_string(&log).map_or(0, |t| t.lines().count()) < want
        {
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(10 * round));
        let _ = s.child.kill();
        let _ = s.child.wait();
        let _ = writer.wait();
        let out = run(Command::new("qemu-img").arg("check").arg(&img));
        let text = String::from_utf8_lossy(&out.stdout);
        // 0: clean, 3: leaked clusters only.
        assert!(
            matches!(out.status.code(), Some(0) | Some(3)),
            "round {round}: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let back = dir.path().join(format!("k{round}.raw"));
        ok(Command::new("qemu-img")
            .args(["convert", "-O", "raw"])
            .arg(&img)
            .arg(&back));
        let got = std::fs::read(&back).unwrap();
        let durable: Vec<usize> = std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.parse().ok())
            .collect();
        assert!(
            !durable.is_empty(),
            "round {round}: nothing was flushed before the kill"
        );
        for &i in &durable {
            assert!(
                got[i * CLUSTER..(i + 1) * CLUSTER] == src[i * CLUSTER..(i + 1) * CLUSTER],
                "round {round}: flushed cluster {i} was lost"
            );
        }
        for (i, (g, want)) in got.chunks(CLUSTER).zip(src.chunks(CLUSTER)).enumerate() {
            assert!(
                g == want || g.iter().all(|&b| b == 0),
                "round {round}: cluster {i} is neither what was written nor zeroes"
            );
        }
        eprintln!(
            "round {round}: {} clusters flushed before the kill",
            durable.len()
        );
    }
}

/// A cluster zeroed and written again compressed gets the same descriptor (its freed bytes
/// come back at the same offset, the same number of sectors long): a read must inflate the
/// new bytes, not serve the cluster it inflated before under that descriptor. Zeroing and
/// discarding both free the bytes; the flush makes the free take effect.
#[test]
fn a_cluster_compressed_again_in_freed_bytes_reads_its_new_data() {
    let dir = tempfile::tempdir().unwrap();
    let q = dir.path().join("c.qcow2");
    ok(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&q)
        .arg("16M"));
    let opts = compress_opts(&q);
    let s = Server::unix(QNBD, &["-t", "--discard=unmap", "--image-opts", &opts]);
    let uri = s.uri();
    for (at, free, before, after) in [
        (0, "write -z", "0xaa", "0xbb"),
        (1, "discard", "0xbb", "0xcc"),
    ] {
        let out = ok(Command::new("qemu-io").args([
            "-f",
            "raw",
            "-c",
            &format!("write -P {before} {at}M 64k"),
            "-c",
            &format!("read -P {before} {at}M 64k"),
            "-c",
            &format!("{free} {at}M 64k"),
            "-c",
            "flush",
            "-c",
            &format!("write -P {after} {at}M 64k"),
            "-c",
            &format!("read -P {after} {at}M 64k"),
            &uri,
        ]));
        assert!(!out.contains("verification failed"), "{free}: {out}");
        assert_eq!(out.matches("read 65536/65536").count(), 2, "{free}: {out}");
    }
    drop(s);
    assert!(map_json(&q).contains("\"compressed\": true"));
    ok(Command::new("qemu-img").args(["check", "-q"]).arg(&q));
}
