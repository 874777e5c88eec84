//! Data safety through the real binary and real clients:
//! - the concurrent verifier (`tests/nbdsh/verify.py`, libnbd): many connections, mixed
//!   WRITE/FUA/FLUSH/WRITE_ZEROES/TRIM/READ, every acknowledged write reads back, the image
//!   checks clean — over raw, raw `-n`, and qcow2 with 512 B to 2 MiB clusters, extended L2,
//!   compressed clusters, a backing file and an internal snapshot, and LUKS-encrypted images
//!   (`driver=luks`, qcow2 `encrypt.format=luks` with 4 KiB clusters and extended L2);
//! - the crash loop (`tests/nbdsh/crash.py`): `kill -9` under that load, every write
//!   acknowledged with FUA or before a completed FLUSH is in the file, `qemu-img check` finds
//!   no corruption;
//! - a write that would land on metadata fails, marks the image corrupt and leaves the header
//!   intact; failed starts leave no overlay and no bitmap in use.
//!
//! `QNBD_VERIFY_WRITES` (per variant, default 20000) and `QNBD_CRASH_ROUNDS` (per variant,
//! default 10) scale the runs; `scripts/soak.sh` runs them long.

mod common;
use common::*;
use std::path::Path;
use std::process::Command;

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn script(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/nbdsh")
        .join(name)
        .display()
        .to_string()
}

/// A directory on a real file system (O_DIRECT fails on tmpfs).
fn var_tmpdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("qnbd-safety")
        .tempdir_in("/var/tmp")
        .expect("tempdir")
}

fn sh(cmd: &str) {
    ok(Command::new("sh").args(["-c", cmd]));
}

/// A raw file of `mib` MiB with recognisable, compressible contents.
fn patterned_raw(path: &Path, mib: u64) {
    let mut block = Vec::with_capacity(1 << 20);
    for i in 0..(1u64 << 20) / 64 {
        block.extend_from_slice(format!("{:063}\n", i * 7).as_bytes());
    }
    let mut all = Vec::with_capacity((mib << 20) as usize);
    for _ in 0..mib {
        all.extend_from_slice(&block);
    }
    std::fs::write(path, all).expect("write pattern");
}

/// Serve `img` with `args`, run the verifier with `vopts`, stop the server, check the image.
fn verify(img: &Path, args: &[&str], vopts: &[&str]) {
    if !have("qemu-img") || !have_nbdsh() {
        return;
    }
    let mut all = args.to_vec();
    all.push(img.to_str().unwrap());
    run_verifier(&img.display().to_string(), &all, vopts);
    for format in ["qcow2", "vmdk", "vdi", "vhdx", "qed", "parallels"] {
        if args.contains(&format) {
            check_format_no_corruption(img, format);
        }
    }
}

/// Serve with `args` (the image included), run the verifier with `vopts`, stop the server.
fn run_verifier(name: &str, args: &[&str], vopts: &[&str]) {
    run_verifier_over(false, name, args, vopts)
}

/// As `run_verifier`, over TCP when `tcp`, else a Unix socket.
fn run_verifier_over(tcp: bool, name: &str, args: &[&str], vopts: &[&str]) {
    let mut all = vec!["-t", "-e", "0"];
    all.extend_from_slice(args);
    let mut s = if tcp {
        Server::tcp(QNBD, &all)
    } else {
        Server::unix(QNBD, &all)
    };
    let writes = env_num("QNBD_VERIFY_WRITES", 20000).to_string();
    let out = ok(Command::new(PYTHON)
        .arg(script("verify.py"))
        .arg(s.uri())
        .args(["--conns", "8", "--writes", &writes, "--seed", "7"])
        .args(vopts));
    eprintln!("{name} {args:?}: {}", out.trim());
    assert!(out.contains(" 0 lost"), "{out}");
    s.terminate().expect("server exits on SIGTERM");
}

const SECRET: &str = "secret,id=sec0,data=hunter2";

/// The verifier over a LUKS-encrypted image made by `qemu-img create -f FORMAT -o OPTS`
/// (`iter-time=10` added), served with `--image-opts`; a qcow2 then checks with no corruption.
fn verify_encrypted(format: &str, opts: &str, server: &[&str], vopts: &[&str]) {
    if !have("qemu-img") || !have_nbdsh() {
        return;
    }
    let d = tmpdir();
    let img = d.path().join(format!("e.{format}"));
    let (create, open) = if format == "luks" {
        ("key-secret=sec0,iter-time=10", "key-secret=sec0")
    } else {
        (
            "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
            "encrypt.key-secret=sec0",
        )
    };
    sh(&format!(
        "qemu-img create -q -f {format} --object {SECRET} -o {create},{opts} {} 128M",
        img.display()
    ));
    let image_opts = format!("driver={format},{open},file.filename={}", img.display());
    let mut args = vec!["--object", SECRET, "--image-opts", &image_opts];
    args.extend_from_slice(server);
    run_verifier(&image_opts, &args, vopts);
    if format == "qcow2" {
        let out = run(Command::new("qemu-img").args([
            "check",
            "--object",
            SECRET,
            "--image-opts",
            &image_opts,
        ]));
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(
            matches!(out.status.code(), Some(0) | Some(3)) && !text.contains("ERROR"),
            "qemu-img check {image_opts}: {text}"
        );
    }
}

#[test]
fn verifier_luks_raw_file() {
    verify_encrypted("luks", "cipher-alg=aes-256", &[], &[]);
}

#[test]
fn verifier_qcow2_luks_4k_clusters_discard() {
    verify_encrypted(
        "qcow2",
        "cluster_size=4096",
        &["--discard=unmap"],
        &["--trim-zeroes=4096"],
    );
}

#[test]
fn verifier_qcow2_luks_extended_l2() {
    verify_encrypted("qcow2", "extended_l2=on,cluster_size=65536", &[], &[]);
}

#[test]
fn verifier_raw() {
    let d = tmpdir();
    let img = make_raw(d.path(), "a.raw", 128 << 20, &[]);
    verify(&img, &["-f", "raw"], &[]);
}

/// Whole pages only: small page-aligned writes without FUA take the inline path (written by
/// the thread that read them, their replies batched).
#[test]
fn verifier_raw_page_aligned() {
    let d = tmpdir();
    let img = make_raw(d.path(), "a.raw", 128 << 20, &[]);
    verify(&img, &["-f", "raw"], &["--align", "4096"]);
}

/// Writes up to 2 MiB: large payloads without FUA are spliced from the socket into the page
/// cache, over a Unix socket and TCP (whose socket buffers the kernel splices differently).
#[test]
fn verifier_raw_large_writes() {
    if !have("qemu-img") || !have_nbdsh() {
        return;
    }
    for tcp in [false, true] {
        let d = tmpdir();
        let img = make_raw(d.path(), "a.raw", 128 << 20, &[]);
        let path = img.display().to_string();
        run_verifier_over(
            tcp,
            &path,
            &["-f", "raw", &path],
            &["--max-len", "2M", "--long-share", "0.5"],
        );
    }
}

#[test]
fn verifier_raw_o_direct() {
    let d = var_tmpdir();
    let img = make_raw(d.path(), "a.raw", 128 << 20, &[]);
    verify(&img, &["-f", "raw", "-n"], &[]);
}

#[test]
fn verifier_qcow2_512_byte_clusters() {
    let d = tmpdir();
    let img = make_qcow2(d.path(), "a.qcow2", "cluster_size=512", "128M");
    verify(&img, &["-f", "qcow2"], &[]);
}

#[test]
fn verifier_qcow2_4k_clusters_discard() {
    let d = tmpdir();
    let img = make_qcow2(d.path(), "a.qcow2", "cluster_size=4096", "128M");
    verify(
        &img,
        &["-f", "qcow2", "--discard=unmap"],
        &["--trim-zeroes=4096"],
    );
}

/// Whole pages with discards: overwrites of allocated clusters take the inline path while
/// other requests free and reuse clusters (4 KiB clusters: every page is a cluster; extended
/// L2: subclusters of 2 KiB, so a page touches two, and only whole clusters are discarded).
#[test]
fn verifier_qcow2_page_aligned_discard() {
    for (opts, trimmed) in [
        ("cluster_size=4096", "--trim-zeroes=4096"),
        ("cluster_size=65536,extended_l2=on", "--trim-zeroes=65536"),
    ] {
        let d = tmpdir();
        let img = make_qcow2(d.path(), "a.qcow2", opts, "128M");
        verify(
            &img,
            &["-f", "qcow2", "--discard=unmap"],
            &[trimmed, "--align", "4096"],
        );
    }
}

#[test]
fn verifier_qcow2_64k_clusters_o_direct() {
    let d = var_tmpdir();
    let img = make_qcow2(d.path(), "a.qcow2", "cluster_size=65536", "128M");
    verify(&img, &["-f", "qcow2", "-n"], &[]);
}

#[test]
fn verifier_qcow2_2m_clusters() {
    let d = tmpdir();
    let img = make_qcow2(d.path(), "a.qcow2", "cluster_size=2097152", "128M");
    verify(&img, &["-f", "qcow2"], &[]);
}

#[test]
fn verifier_qcow2_extended_l2() {
    let d = tmpdir();
    let img = make_qcow2(
        d.path(),
        "a.qcow2",
        "extended_l2=on,cluster_size=65536",
        "128M",
    );
    verify(&img, &["-f", "qcow2", "--discard=unmap"], &[]);
}

#[test]
fn verifier_qcow2_compressed_clusters() {
    if !have("qemu-img") {
        return;
    }
    let d = tmpdir();
    let raw = d.path().join("src.raw");
    patterned_raw(&raw, 128);
    let img = d.path().join("c.qcow2");
    sh(&format!(
        "qemu-img convert -c -f raw -O qcow2 {} {}",
        raw.display(),
        img.display()
    ));
    verify(&img, &["-f", "qcow2"], &[]);
}

#[test]
fn verifier_qcow2_over_a_backing_file_leaves_the_base_alone() {
    if !have("qemu-img") {
        return;
    }
    let d = tmpdir();
    let base = d.path().join("base.raw");
    patterned_raw(&base, 128);
    let before = std::fs::read(&base).unwrap();
    let img = d.path().join("top.qcow2");
    sh(&format!(
        "qemu-img create -q -f qcow2 -b {} -F raw {}",
        base.display(),
        img.display()
    ));
    verify(&img, &["-f", "qcow2"], &[]);
    assert!(std::fs::read(&base).unwrap() == before, "the base changed");
}

#[test]
fn verifier_qcow2_with_an_internal_snapshot_keeps_it() {
    if !have("qemu-img") {
        return;
    }
    let d = tmpdir();
    let raw = d.path().join("src.raw");
    patterned_raw(&raw, 128);
    let img = d.path().join("s.qcow2");
    sh(&format!(
        "qemu-img convert -f raw -O qcow2 {} {} && qemu-img snapshot -c s1 {}",
        raw.display(),
        img.display(),
        img.display()
    ));
    verify(&img, &["-f", "qcow2", "--discard=unmap"], &[]);
    let snap = d.path().join("snap.raw");
    sh(&format!(
        "qemu-img convert -f qcow2 -l s1 -O raw {} {}",
        img.display(),
        snap.display()
    ));
    assert!(
        std::fs::read(&snap).unwrap() == std::fs::read(&raw).unwrap(),
        "the snapshot's contents changed"
    );
}

/// An external data file (`data_file=`), and one kept raw (`data_file_raw=on`): the
/// verifier with `--discard=unmap`, `qemu-img check`, and a raw data file must read as the
/// guest disk reads.
#[test]
fn verifier_qcow2_external_data_file() {
    if !have("qemu-img") || !have_nbdsh() {
        return;
    }
    for raw in [false, true] {
        let d = tmpdir();
        // Named absolutely: qemu opens a relative data file name from the current directory.
        let data = d.path().join("d.raw");
        let opts = format!(
            "data_file={},data_file_raw={}",
            data.display(),
            if raw { "on" } else { "off" }
        );
        let img = make_qcow2(d.path(), "a.qcow2", &opts, "128M");
        verify(&img, &["-f", "qcow2", "--discard=unmap"], &[]);
        check_clean(&img);
        if raw {
            let view = d.path().join("view.raw");
            sh(&format!(
                "qemu-img convert -f qcow2 -O raw {} {}",
                img.display(),
                view.display()
            ));
            assert!(
                std::fs::read(&view).unwrap() == std::fs::read(&data).unwrap(),
                "the raw data file differs from the guest disk"
            );
        }
    }
}

/// `kill -9` under load, `rounds` times.
fn crash(format: &str, create: &str, server_opts: &str, rounds: u64) {
    crash_with(format, create, server_opts, rounds, &[]);
}

fn crash_with(format: &str, create: &str, server_opts: &str, rounds: u64, extra: &[&str]) {
    if !have("qemu-img") || !have_nbdsh() {
        return;
    }
    let d = var_tmpdir();
    let out = ok(Command::new(PYTHON)
        .arg(script("crash.py"))
        .arg("--server")
        .arg(format!(
            "{QNBD} -t -e 0 -f {format} {server_opts} -k {{sock}} {{img}}"
        ))
        .args(["--create", create, "--format", format, "--prefill"])
        .args(["--rounds", &rounds.to_string(), "--seed", "3"])
        .args(extra)
        .arg("--workdir")
        .arg(d.path()));
    let last = out.lines().last().unwrap_or("").to_string();
    eprintln!("crash {format} {create} {server_opts}: {last}");
    assert!(
        last.contains(" 0 lost") && last.contains(" 0 corrupt"),
        "{out}"
    );
}

fn crash_rounds() -> u64 {
    env_num("QNBD_CRASH_ROUNDS", 10)
}

#[test]
fn crash_loop_raw() {
    crash("raw", "truncate -s 64M {img}", "", crash_rounds());
}

/// Whole pages: writes acknowledged from the inline path, then FLUSH or kill -9.
#[test]
fn crash_loop_raw_page_aligned() {
    crash_with(
        "raw",
        "truncate -s 64M {img}",
        "",
        crash_rounds(),
        &["--align", "4096"],
    );
}

/// Writes up to 1 MiB, spliced into the page cache, then FLUSH or kill -9.
#[test]
fn crash_loop_raw_large_writes() {
    crash_with(
        "raw",
        "truncate -s 64M {img}",
        "",
        crash_rounds(),
        &["--max-len", "1M"],
    );
}

#[test]
fn crash_loop_raw_o_direct() {
    crash("raw", "truncate -s 64M {img}", "-n", crash_rounds());
}

#[test]
fn crash_loop_qcow2_4k_clusters() {
    crash(
        "qcow2",
        "qemu-img create -q -f qcow2 -o cluster_size=4096 {img} 64M",
        "--discard=unmap",
        crash_rounds(),
    );
}

#[test]
fn crash_loop_qcow2_64k_clusters() {
    crash(
        "qcow2",
        "qemu-img create -q -f qcow2 {img} 64M",
        "",
        crash_rounds(),
    );
}

/// Whole pages: overwrites acknowledged from the inline path, then FLUSH or kill -9.
#[test]
fn crash_loop_qcow2_page_aligned() {
    crash_with(
        "qcow2",
        "qemu-img create -q -f qcow2 -o cluster_size=4096 {img} 64M",
        "--discard=unmap",
        crash_rounds(),
        &["--align", "4096"],
    );
}

#[test]
fn crash_loop_qcow2_512_byte_clusters() {
    crash(
        "qcow2",
        "qemu-img create -q -f qcow2 -o cluster_size=512,refcount_bits=64 {img} 16M",
        "",
        crash_rounds(),
    );
}

/// Data clusters in an external data file: it is synced before any pointer in the image.
#[test]
fn crash_loop_qcow2_external_data_file() {
    crash(
        "qcow2",
        "qemu-img create -q -f qcow2 -o cluster_size=4096,data_file={img}.data {img} 64M",
        "--discard=unmap",
        crash_rounds(),
    );
}

/// A raw data file: zeroings write into it before the metadata changes.
#[test]
fn crash_loop_qcow2_data_file_raw() {
    crash(
        "qcow2",
        "qemu-img create -q -f qcow2 -o data_file={img}.data,data_file_raw=on {img} 64M",
        "--discard=unmap",
        crash_rounds(),
    );
}

/// A sparse VMDK made by `qemu-img create -f vmdk -o OPTS` (or converted from a patterned
/// raw image with `from_raw`) under `d`.
fn make_vmdk(d: &Path, opts: &str, from_raw: bool) -> std::path::PathBuf {
    let img = d.join("a.vmdk");
    if from_raw {
        let raw = d.join("src.raw");
        patterned_raw(&raw, 64);
        sh(&format!(
            "qemu-img convert -f raw -O vmdk -o {opts} {} {}",
            raw.display(),
            img.display()
        ));
    } else {
        sh(&format!(
            "qemu-img create -q -f vmdk -o {opts} {} 128M",
            img.display()
        ));
    }
    img
}

#[test]
fn verifier_vmdk_monolithic_sparse() {
    if !have("qemu-img") {
        return;
    }
    let d = tmpdir();
    let img = make_vmdk(d.path(), "subformat=monolithicSparse", false);
    verify(&img, &["-f", "vmdk"], &[]);
}

#[test]
fn verifier_vmdk_zeroed_grains_over_data() {
    if !have("qemu-img") {
        return;
    }
    let d = tmpdir();
    let img = make_vmdk(d.path(), "zeroed_grain=on", true);
    verify(&img, &["-f", "vmdk"], &[]);
}

#[test]
fn verifier_vmdk_split_flat_extents() {
    if !have("qemu-img") {
        return;
    }
    let d = tmpdir();
    let img = make_vmdk(d.path(), "subformat=twoGbMaxExtentFlat", true);
    verify(&img, &["-f", "vmdk"], &[]);
}

#[test]
fn verifier_vmdk_delta_disk_leaves_its_parent_alone() {
    if !have("qemu-img") {
        return;
    }
    let d = tmpdir();
    let parent = make_vmdk(d.path(), "subformat=monolithicSparse", true);
    let before = std::fs::read(&parent).unwrap();
    let img = d.path().join("child.vmdk");
    sh(&format!(
        "qemu-img create -q -f vmdk -b {} -F vmdk {}",
        parent.display(),
        img.display()
    ));
    verify(&img, &["-f", "vmdk"], &[]);
    assert!(
        std::fs::read(&parent).unwrap() == before,
        "the parent changed"
    );
}

#[test]
fn crash_loop_vmdk_sparse() {
    crash(
        "vmdk",
        "qemu-img create -q -f vmdk {img} 64M",
        "",
        crash_rounds(),
    );
}

#[test]
fn crash_loop_vmdk_zeroed_grains_page_aligned() {
    crash_with(
        "vmdk",
        "qemu-img create -q -f vmdk -o zeroed_grain=on {img} 64M",
        "",
        crash_rounds(),
        &["--align", "4096"],
    );
}

#[test]
fn verifier_vdi_dynamic_over_data() {
    if !have("qemu-img") {
        return;
    }
    let d = tmpdir();
    let raw = d.path().join("src.raw");
    patterned_raw(&raw, 64);
    let img = d.path().join("a.vdi");
    sh(&format!(
        "qemu-img convert -f raw -O vdi {} {}",
        raw.display(),
        img.display()
    ));
    verify(&img, &["-f", "vdi"], &[]);
}

#[test]
fn verifier_vdi_fresh_and_static() {
    if !have("qemu-img") {
        return;
    }
    for opts in ["static=off", "static=on"] {
        let d = tmpdir();
        let img = d.path().join("a.vdi");
        sh(&format!(
            "qemu-img create -q -f vdi -o {opts} {} 128M",
            img.display()
        ));
        verify(&img, &["-f", "vdi"], &[]);
    }
}

#[test]
fn crash_loop_vdi() {
    crash(
        "vdi",
        "qemu-img create -q -f vdi {img} 64M",
        "",
        crash_rounds(),
    );
}

#[test]
fn verifier_vpc_dynamic_and_fixed() {
    if !have("qemu-img") {
        return;
    }
    for opts in [
        "subformat=dynamic",
        "subformat=fixed",
        "subformat=dynamic,force_size=on",
    ] {
        let d = tmpdir();
        let img = d.path().join("a.vhd");
        sh(&format!(
            "qemu-img create -q -f vpc -o {opts} {} 128M",
            img.display()
        ));
        verify(&img, &["-f", "vpc"], &[]);
    }
}

#[test]
fn crash_loop_vpc_dynamic() {
    crash(
        "vpc",
        "qemu-img create -q -f vpc {img} 64M",
        "",
        crash_rounds(),
    );
}

#[test]
fn verifier_vhdx_dynamic_and_fixed() {
    if !have("qemu-img") {
        return;
    }
    for opts in ["block_size=1M", "subformat=fixed", "block_size=8M"] {
        let d = tmpdir();
        let img = d.path().join("a.vhdx");
        sh(&format!(
            "qemu-img create -q -f vhdx -o {opts} {} 128M",
            img.display()
        ));
        verify(&img, &["-f", "vhdx"], &[]);
    }
}

#[test]
fn crash_loop_vhdx() {
    crash(
        "vhdx",
        "qemu-img create -q -f vhdx -o block_size=1M {img} 64M",
        "",
        crash_rounds(),
    );
}

#[test]
fn verifier_qed_fresh_over_data_and_over_a_backing_file() {
    if !have("qemu-img") {
        return;
    }
    let d = tmpdir();
    let raw = d.path().join("src.raw");
    patterned_raw(&raw, 64);
    let (r, p) = (raw.display(), d.path().display());
    for create in [
        format!("qemu-img create -q -f qed -o cluster_size=4k {p}/a.qed 128M"),
        format!("qemu-img convert -f raw -O qed {r} {p}/a.qed"),
        format!("qemu-img create -q -f qed -b {r} -F raw {p}/a.qed 96M"),
    ] {
        let img = d.path().join("a.qed");
        let _ = std::fs::remove_file(&img);
        sh(&create);
        verify(&img, &["-f", "qed"], &[]);
    }
}

#[test]
fn verifier_parallels_fresh_and_over_data() {
    if !have("qemu-img") {
        return;
    }
    let d = tmpdir();
    let raw = d.path().join("src.raw");
    patterned_raw(&raw, 128);
    let p = d.path().display();
    for create in [
        format!("qemu-img create -q -f parallels -o cluster_size=64k {p}/a.hdd 128M"),
        format!(
            "qemu-img convert -f raw -O parallels {} {p}/a.hdd",
            raw.display()
        ),
    ] {
        sh(&create);
        let img = d.path().join("a.hdd");
        verify(&img, &["-f", "parallels", "--discard=unmap"], &[]);
        check_clean(&img);
    }
}

/// Parallels: BAT entries written only after a sync made their clusters durable; a
/// dropped cluster reused only after its zeroed entry is durable; the image left in use is
/// repaired by the next read-write open.
#[test]
fn crash_loop_parallels() {
    crash(
        "parallels",
        "qemu-img create -q -f parallels -o cluster_size=64k {img} 64M",
        "--discard=unmap",
        crash_rounds(),
    );
}

#[test]
fn crash_loop_qed() {
    crash(
        "qed",
        "qemu-img create -q -f qed {img} 64M",
        "",
        crash_rounds(),
    );
}

/// Over a backing file the other bytes of a new cluster are the backing file's: synced
/// before the cluster is linked, so a crash never shows zeroes in their place.
#[test]
fn crash_loop_qed_over_a_backing_file() {
    crash_with(
        "qed",
        "qemu-img create -q -f raw {img}.base 64M && qemu-io -f raw -c 'write -P 0x5a 0 64M' {img}.base >/dev/null && qemu-img create -q -f qed -b {img}.base -F raw {img} 64M",
        "",
        crash_rounds(),
        &["--initial-from-image"],
    );
}

/// Through a re-export (`qnbd nbd+unix:///?socket=…`): every write, FUA and flush passed on
/// to the server that holds the image, raw and a qcow2 whose file is the export.
#[test]
fn verifier_through_an_nbd_image() {
    if !have("qemu-img") || !have_nbdsh() {
        return;
    }
    let d = tmpdir();
    let raw = d.path().join("up.raw");
    patterned_raw(&raw, 64);
    let up = Server::unix(QNBD, &["-t", "-f", "raw", raw.to_str().unwrap()]);
    run_verifier("raw over nbd", &["-f", "raw", &up.uri()], &[]);
    drop(up);
    let q = d.path().join("up.qcow2");
    sh(&format!(
        "qemu-img create -q -f qcow2 {} 64M && truncate -s 96M {}",
        q.display(),
        q.display()
    ));
    let up = Server::unix(QNBD, &["-t", "-f", "raw", q.to_str().unwrap()]);
    run_verifier("qcow2 over nbd", &["-f", "qcow2", &up.uri()], &[]);
    drop(up);
    check_no_corruption(&q);
}

/// A write that would land on metadata (here: the refcount table's first entry zeroed, so
/// the next allocation would put a refcount block over the header) fails with EIO, the image
/// gets qemu's corrupt bit and message, later requests fail, and nothing else changed.
#[test]
fn a_write_onto_metadata_is_refused_and_marks_the_image_corrupt() {
    if !have("qemu-img") || !have("qemu-io") {
        return;
    }
    let d = tmpdir();
    let img = d.path().join("img.qcow2");
    sh(&format!(
        "qemu-img create -q -f qcow2 {} 64M",
        img.display()
    ));
    let mut bytes = std::fs::read(&img).unwrap();
    let rt = u64::from_be_bytes(bytes[48..56].try_into().unwrap()) as usize;
    bytes[rt..rt + 8].fill(0);
    std::fs::write(&img, &bytes).unwrap();
    let log = d.path().join("stderr");
    let sock = d.path().join("s.sock");
    let mut child = Command::new(QNBD)
        .args(["-t", "-f", "qcow2", "-k"])
        .arg(&sock)
        .arg(&img)
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    for _ in 0..200 {
        if sock.exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    let w = run(Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 0x55 0 64k", &uri]));
    let text = String::from_utf8_lossy(&w.stdout).to_string() + &String::from_utf8_lossy(&w.stderr);
    assert!(text.contains("write failed: Input/output error"), "{text}");
    let r = run(Command::new("qemu-io").args(["-f", "raw", "-c", "read 0 512", &uri]));
    let text = String::from_utf8_lossy(&r.stdout).to_string() + &String::from_utf8_lossy(&r.stderr);
    assert!(text.contains("read failed: Invalid argument"), "{text}");
    let _ = Command::new("kill").arg(child.id().to_string()).status();
    let _ = child.wait();
    let err = std::fs::read_to_string(&log).unwrap();
    assert!(
        err.contains(
            "qcow2: Marking image as corrupt: Preventing invalid write on metadata (overlaps with "
        ) && err.contains("; further corruption events will be suppressed"),
        "{err}"
    );
    let after = std::fs::read(&img).unwrap();
    let changed: Vec<usize> = (0..bytes.len().min(after.len()))
        .filter(|&i| bytes[i] != after[i])
        .collect();
    assert_eq!(changed, vec![79], "only the corrupt bit changes");
    let info = ok(Command::new("qemu-img").arg("info").arg(&img));
    assert!(
        info.contains("file format: qcow2") && info.contains("corrupt: true"),
        "{info}"
    );
    let again = run(Command::new(QNBD).args(["-f", "qcow2"]).arg(&img));
    assert_eq!(
        String::from_utf8_lossy(&again.stderr).trim(),
        format!(
            "qnbd: Failed to blk_new_open '{}': qcow2: Image is corrupt; cannot be opened read/write",
            img.display()
        )
    );
}

/// Failing after the image is open (`-o` past the end, a socket that cannot be bound, a
/// missing `-B` bitmap) releases the image: no bitmap stays in use, no `-s` overlay remains.
#[test]
fn failed_starts_leave_nothing_behind() {
    if !have("qemu-img") {
        return;
    }
    let d = tmpdir();
    let img = d.path().join("a.qcow2");
    sh(&format!(
        "qemu-img create -q -f qcow2 {0} 64M && qemu-img bitmap --add {0} b0",
        img.display()
    ));
    let tmp = d.path().join("tmp");
    std::fs::create_dir(&tmp).unwrap();
    let i = img.to_str().unwrap();
    let cases: [&[&str]; 4] = [
        &["-o", "1073741824", "-f", "qcow2", i],
        &["-s", "-o", "1073741824", "-f", "qcow2", i],
        &["-s", "-f", "qcow2", "-k", "/nonexistent/dir/s.sock", i],
        &["-s", "-f", "qcow2", "-B", "nope", i],
    ];
    for args in cases {
        let out = run(Command::new(QNBD).env("TMPDIR", &tmp).args(args));
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let info = ok(Command::new("qemu-img")
            .args(["info", "--output=json"])
            .arg(&img));
        assert!(
            !info.contains("in-use"),
            "{args:?} left the bitmap in use: {info}"
        );
        let left: Vec<_> = std::fs::read_dir(&tmp).unwrap().collect();
        assert!(left.is_empty(), "{args:?} left {left:?}");
    }
}

/// The verifier through a re-export whose upstream server is killed (`kill -9`) and started
/// again four times while it runs, with `reconnect-delay`: requests in flight at a loss are
/// sent again on the new connection, so every acknowledged write is read back. The upstream
/// serves a raw file (its writes are in the page cache before they are acknowledged, so they
/// survive the kill); flushes after a loss with unflushed writes fail with EIO, as designed.
#[test]
fn verifier_across_upstream_restarts() {
    if !have("qemu-img") || !have_nbdsh() {
        return;
    }
    let d = tmpdir();
    let raw = d.path().join("up.raw");
    patterned_raw(&raw, 64);
    let sock = d.path().join("up.sock");
    let start_upstream = {
        let (sock, raw) = (sock.clone(), raw.clone());
        move || {
            let _ = std::fs::remove_file(&sock);
            let child = Command::new(QNBD)
                .args(["-t", "-e", "0", "-f", "raw", "-k"])
                .arg(&sock)
                .arg(&raw)
                .spawn()
                .expect("spawn the upstream");
            while std::os::unix::net::UnixStream::connect(&sock).is_err() {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            KillOnDrop(child)
        }
    };
    let up = start_upstream();
    let opts = format!(
        "driver=raw,file.driver=nbd,file.server.type=unix,file.server.path={},file.reconnect-delay=30",
        sock.display()
    );
    let mut s = Server::unix(QNBD, &["-t", "-e", "0", "--image-opts", &opts]);
    let killer = std::thread::spawn(move || {
        let mut up = up;
        for _ in 0..4 {
            std::thread::sleep(std::time::Duration::from_millis(1500));
            drop(up);
            std::thread::sleep(std::time::Duration::from_millis(300));
            up = start_upstream();
        }
        up
    });
    let out = ok(Command::new(PYTHON)
        .arg(script("verify.py"))
        .arg(s.uri())
        .args([
            "--conns",
            "4",
            "--writes",
            "1000000",
            "--seconds",
            "9",
            "--seed",
            "11",
        ])
        .arg("--flush-may-fail"));
    eprintln!("across upstream restarts: {}", out.trim());
    assert!(out.contains(" 0 lost") && out.contains("verified"), "{out}");
    let up = killer.join().unwrap();
    s.terminate().expect("server exits on SIGTERM");
    drop(up);
}

struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// qcow (v1) has no `qemu-img check`: qemu must read the image as qnbd reads it.
fn qemu_reads_qcow_as_qnbd(img: &Path) {
    let s = Server::unix(QNBD, &["-r", "-t", "-f", "qcow", img.to_str().unwrap()]);
    let out = ok(Command::new("qemu-img")
        .args(["compare", "-f", "qcow", "-F", "raw"])
        .arg(img)
        .arg(s.uri()));
    assert!(out.contains("Images are identical"), "{out}");
}

/// A fresh qcow (v1) image (4 KiB clusters, 2 MiB per L2 table), one converted compressed
/// from data (every write replaces a compressed cluster by a normal one), and an overlay
/// over the data (512-byte clusters, each synced before its L2 entry).
#[test]
fn verifier_qcow_v1() {
    if !have("qemu-img") || !have_nbdsh() {
        return;
    }
    let d = tmpdir();
    let raw = d.path().join("src.raw");
    patterned_raw(&raw, 64);
    for create in [
        "qemu-img create -q -f qcow {img} 128M",
        // qemu 10 exits 1 after writing the whole image (its closing zero-length
        // compressed write fails): the image is compared instead.
        "qemu-img convert -c -f raw -O qcow {raw} {img}; qemu-img compare -q {raw} {img}",
        "qemu-img create -q -f qcow -b {raw} -F raw {img}",
    ] {
        let img = d.path().join("a.qcow");
        let _ = std::fs::remove_file(&img);
        sh(&create
            .replace("{img}", img.to_str().unwrap())
            .replace("{raw}", raw.to_str().unwrap()));
        verify(&img, &["-f", "qcow"], &[]);
        qemu_reads_qcow_as_qnbd(&img);
    }
}

#[test]
fn crash_loop_qcow_v1() {
    crash(
        "qcow",
        "qemu-img create -q -f qcow {img} 64M",
        "",
        crash_rounds(),
    );
    // An overlay: its clusters are synced before their L2 entries.
    crash(
        "qcow",
        "qemu-img create -q -f raw {img}.base 64M && qemu-img create -q -f qcow -b {img}.base -F raw {img}",
        "",
        crash_rounds(),
    );
}

/// An AES-encrypted qcow (v1) image: partial sectors read-modify-written under the
/// sector-aligning layer, new clusters' other sectors written as encrypted zeroes; qemu then
/// decrypts it as qnbd does.
#[test]
fn verifier_qcow_v1_aes() {
    if !have("qemu-img") || !have_nbdsh() {
        return;
    }
    let d = tmpdir();
    let img = d.path().join("e.qcow");
    sh(&format!(
        "qemu-img create -q -f qcow --object {SECRET} -o encrypt.format=aes,encrypt.key-secret=sec0 {} 128M",
        img.display()
    ));
    let opts = format!(
        "driver=qcow,encrypt.key-secret=sec0,file.filename={}",
        img.display()
    );
    let args = ["--object", SECRET, "--image-opts", opts.as_str()];
    run_verifier(&opts, &args, &[]);
    let plain = d.path().join("plain.raw");
    ok(Command::new("qemu-img")
        .args([
            "convert",
            "--object",
            SECRET,
            "--image-opts",
            &opts,
            "-O",
            "raw",
        ])
        .arg(&plain));
    let mut all = vec!["-r", "-t"];
    all.extend_from_slice(&args);
    let s = Server::unix(QNBD, &all);
    let out = ok(Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&plain)
        .arg(s.uri()));
    assert!(out.contains("Images are identical"), "{out}");
}
