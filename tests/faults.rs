//! I/O faults under the server: an image on a full file system (a small tmpfs: ENOSPC) and on
//! a file that fails chosen byte ranges (tests/faults/faultfs.py, a FUSE passthrough: EIO,
//! the portable stand-in for device-mapper's error and flakey targets). The client gets the
//! errno for that request, later requests work, the server never panics and exits cleanly,
//! and qcow2 metadata stays consistent (qemu-img check) once the fault is gone.
//! Needs root (mount), /dev/fuse and Debian's python3-fusepy.

mod common;
use common::raw::*;
use common::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn mounted(p: &Path) -> bool {
    let p = p.display().to_string();
    std::fs::read_to_string("/proc/mounts")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some(p.as_str()))
}

/// Whether this machine lets us mount (root, /dev/fuse, fusepy); a loud SKIP otherwise.
fn can_mount() -> bool {
    let fusepy = Command::new(PYTHON)
        .args(["-c", "import fusepy"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    let ok = fusepy && root && Path::new("/dev/fuse").exists();
    if !ok {
        eprintln!("SKIP: I/O fault tests need root, /dev/fuse and python3-fusepy");
        if std::env::var_os("QNBD_REQUIRE_TOOLS").is_some() {
            panic!("I/O fault tests cannot run here (QNBD_REQUIRE_TOOLS is set)");
        }
    }
    ok
}

/// A faultfs mount: files of `src` under `mnt`, failing what `set` says.
struct FaultFs {
    src: PathBuf,
    mnt: PathBuf,
    control: PathBuf,
    child: Child,
}

impl FaultFs {
    fn mount(dir: &Path) -> FaultFs {
        let src = dir.join("src");
        let mnt = dir.join("mnt");
        let control = dir.join("faults");
        std::fs::create_dir_all(&src).expect("src");
        std::fs::create_dir_all(&mnt).expect("mnt");
        std::fs::write(&control, "").expect("control");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/faults/faultfs.py");
        let child = Command::new(PYTHON)
            .arg(script)
            .args([&src, &mnt, &control])
            .stdin(Stdio::null())
            .spawn()
            .expect("faultfs");
        let fs = FaultFs {
            src,
            mnt,
            control,
            child,
        };
        let t = Instant::now();
        while !mounted(&fs.mnt) {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "faultfs did not mount"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        fs
    }

    /// Replace the fault list (lines of `OP FILE START LENGTH ERRNO`).
    fn set(&self, faults: &str) {
        let tmp = self.control.with_extension("new");
        std::fs::write(&tmp, faults).expect("faults");
        std::fs::rename(&tmp, &self.control).expect("faults");
    }
}

impl Drop for FaultFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A tmpfs of `size` bytes.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Tmpfs {
        let p = dir.join("fs");
        std::fs::create_dir_all(&p).expect("mountpoint");
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&p)
            .status()
            .expect("mount");
        assert!(st.success(), "mount tmpfs");
        Tmpfs(p)
    }

    fn resize(&self, size: &str) {
        let st = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.0)
            .status()
            .expect("remount");
        assert!(st.success(), "remount tmpfs");
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn write(c: &mut Raw, off: u64, data: &[u8]) -> Option<u32> {
    c.errno(0, CMD_WRITE, off, data.len() as u64, data)
}

fn read(c: &mut Raw, off: u64, len: usize) -> (u32, Vec<u8>) {
    c.request(0, CMD_READ, 1, off, len as u64, &[]);
    let r = c.response(len).expect("read reply");
    (r.errno, r.data)
}

/// SIGTERM, and the server exits 0 (nothing panicked, everything flushed).
fn stop(mut s: Server) {
    let st = s.terminate().expect("the server exits on SIGTERM");
    assert!(st.success(), "exit status {st}");
}

/// The host offset qemu-img maps guest offset `guest` to.
fn host_offset(img: &Path, guest: u64) -> u64 {
    let out = ok(Command::new("qemu-img")
        .args(["map", "--output=json", "-f", "qcow2", "-U"])
        .arg(img));
    let v: serde_json::Value = serde_json::from_str(&out).expect("map json");
    for e in v.as_array().expect("array") {
        let start = e["start"].as_u64().unwrap_or(0);
        let len = e["length"].as_u64().unwrap_or(0);
        if (start..start + len).contains(&guest) {
            if let Some(off) = e["offset"].as_u64() {
                return off + (guest - start);
            }
        }
    }
    panic!("guest offset {guest} is not allocated: {out}");
}

#[test]
fn raw_read_and_write_errors_reach_the_client_and_pass() {
    if !can_mount() {
        return;
    }
    let dir = tmpdir();
    let fs = FaultFs::mount(dir.path());
    make_raw(&fs.src, "a.raw", 4 << 20, &[(1 << 20, &[0x11; 4096])]);
    let img = fs.mnt.join("a.raw");
    let s = Server::unix(
        QNBD,
        &["-f", "raw", "-t", "-e", "0", img.to_str().expect("path")],
    );
    let sock = s.socket.clone().expect("socket");
    let mut c = Raw::negotiate(&sock, Neg::Simple);
    let mut other = Raw::negotiate(&sock, Neg::Structured);
    fs.set("read a.raw 1048576 4096 EIO\nwrite a.raw 2097152 65536 EIO\n");
    assert_eq!(
        read(&mut c, 1 << 20, 4096).0,
        EIO,
        "read of the failing sectors"
    );
    assert_eq!(
        read(&mut c, (1 << 20) - 4096, 4096).0,
        0,
        "the sectors before"
    );
    assert_eq!(
        read(&mut c, (1 << 20) + 4096, 4096).0,
        0,
        "the sectors after"
    );
    assert_eq!(
        write(&mut c, 2 << 20, &[0x22; 4096]),
        Some(EIO),
        "write to failing sectors"
    );
    assert_eq!(
        write(&mut c, 3 << 20, &[0x33; 4096]),
        Some(0),
        "write elsewhere"
    );
    // The structured client gets the same errno in an error chunk.
    other.request(0, CMD_READ, 5, 1 << 20, 4096, &[]);
    let r = other.response(0).expect("reply");
    assert_eq!(r.errno, EIO);
    assert_eq!(
        other.errno(0, CMD_WRITE, 2 << 20, 512, &[1; 512]),
        Some(EIO)
    );
    // The fault goes; the same requests work.
    fs.set("");
    let (e, d) = read(&mut c, 1 << 20, 4096);
    assert_eq!((e, d == vec![0x11; 4096]), (0, true));
    assert_eq!(write(&mut c, 2 << 20, &[0x22; 4096]), Some(0));
    assert_eq!(read(&mut c, 2 << 20, 4096).1, vec![0x22; 4096]);
    assert_eq!(c.errno(0, CMD_FLUSH, 0, 0, &[]), Some(0));
    drop((c, other));
    stop(s);
    let data = std::fs::read(fs.src.join("a.raw")).expect("image");
    assert!(data[3 << 20..(3 << 20) + 4096].iter().all(|&b| b == 0x33));
}

#[test]
fn a_failed_fsync_is_reported_and_stays_reported() {
    // After a failed fsync the kernel may have dropped the dirty pages: like qemu (its
    // page_cache_inconsistent), every later flush fails too, while I/O goes on.
    if !can_mount() {
        return;
    }
    let dir = tmpdir();
    let fs = FaultFs::mount(dir.path());
    make_raw(&fs.src, "f.raw", 4 << 20, &[]);
    let img = fs.mnt.join("f.raw");
    let s = Server::unix(QNBD, &["-f", "raw", "-t", img.to_str().expect("path")]);
    let sock = s.socket.clone().expect("socket");
    let mut c = Raw::negotiate(&sock, Neg::Simple);
    assert_eq!(write(&mut c, 0, &[1; 4096]), Some(0));
    fs.set("fsync f.raw 0 0 EIO\n");
    assert_eq!(c.errno(0, CMD_FLUSH, 0, 0, &[]), Some(EIO));
    fs.set("");
    assert_eq!(c.errno(0, CMD_FLUSH, 0, 0, &[]), Some(EIO), "sticky");
    assert_eq!(write(&mut c, 4096, &[2; 4096]), Some(0), "writes go on");
    assert_eq!(read(&mut c, 0, 4096).1, vec![1; 4096], "reads go on");
    drop(c);
    // The server still exits on SIGTERM (its final flush fails, which it reports).
    let mut s = s;
    assert!(s.terminate().is_some(), "exits");
}

#[test]
fn qcow2_io_errors_leave_the_metadata_consistent() {
    if !can_mount() {
        return;
    }
    let dir = tmpdir();
    let fs = FaultFs::mount(dir.path());
    let src = make_qcow2(&fs.src, "q.qcow2", "cluster_size=65536", "16M");
    qemu_io(
        &fs.src,
        "qcow2",
        src.to_str().expect("path"),
        &["write -P 0x44 0 1M"],
    );
    let data_host = host_offset(&src, 0);
    let img = fs.mnt.join("q.qcow2");
    let s = Server::unix(
        QNBD,
        &["-f", "qcow2", "-t", "-e", "0", img.to_str().expect("path")],
    );
    let sock = s.socket.clone().expect("socket");
    let mut c = Raw::negotiate(&sock, Neg::Simple);
    // A data cluster that cannot be read.
    fs.set(&format!("read q.qcow2 {data_host} 65536 EIO\n"));
    assert_eq!(read(&mut c, 0, 4096).0, EIO);
    assert_eq!(
        read(&mut c, 1 << 20, 4096).0,
        0,
        "unallocated reads need no I/O"
    );
    assert_eq!(read(&mut c, 512 << 10, 4096), (0, vec![0x44; 4096]));
    // Nothing past the end of the file can be written: every new allocation fails.
    let len = std::fs::metadata(&src).expect("len").len();
    fs.set(&format!("write q.qcow2 {len} 0 EIO\n"));
    assert_eq!(
        write(&mut c, 8 << 20, &[0x55; 65536]),
        Some(EIO),
        "allocating write"
    );
    assert_eq!(
        write(&mut c, 64 << 10, &[0x66; 4096]),
        Some(0),
        "in-place write"
    );
    assert_eq!(
        c.errno(0, CMD_WRITE_ZEROES, 12 << 20, 1 << 20, &[])
            .map(|e| e == 0 || e == EIO),
        Some(true)
    );
    // No write at all succeeds, metadata included.
    fs.set("write q.qcow2 0 0 EIO\n");
    assert_eq!(write(&mut c, 4 << 20, &[0x77; 65536]), Some(EIO));
    assert_eq!(write(&mut c, 128 << 10, &[0x77; 4096]), Some(EIO));
    let _ = c.errno(0, CMD_FLUSH, 0, 0, &[]);
    // The fault goes: the same writes work and read back.
    fs.set("");
    assert_eq!(write(&mut c, 8 << 20, &[0x55; 65536]), Some(0));
    assert_eq!(write(&mut c, 4 << 20, &[0x77; 65536]), Some(0));
    assert_eq!(read(&mut c, 8 << 20, 65536).1, vec![0x55; 65536]);
    assert_eq!(read(&mut c, 4 << 20, 65536).1, vec![0x77; 65536]);
    assert_eq!(read(&mut c, 0, 4096).1, vec![0x44; 4096]);
    drop(c);
    stop(s);
    check_clean(&src);
    let out = qemu_io(
        &fs.src,
        "qcow2",
        src.to_str().expect("path"),
        &[
            "read -P 0x44 0 64k",
            "read -P 0x66 64k 4k",
            "read -P 0x55 8M 64k",
            "read -P 0x77 4M 64k",
        ],
    );
    assert!(!out.contains("Pattern verification failed"), "{out}");
}

/// Write 64 KiB blocks from `from` on until one fails; returns the offsets written and the
/// errno that stopped it.
fn fill(c: &mut Raw, from: u64, limit: u64) -> (Vec<u64>, u32) {
    let mut done = Vec::new();
    let mut off = from;
    while off < limit {
        let pat = vec![(off >> 16) as u8 | 1; 65536];
        match write(c, off, &pat) {
            Some(0) => done.push(off),
            Some(e) => return (done, e),
            None => panic!("the server dropped the client at {off}"),
        }
        off += 65536;
    }
    (done, 0)
}

fn enospc(format: &str) {
    let dir = tmpdir();
    let fs = Tmpfs::mount(dir.path(), "3M");
    let img = fs.0.join(format!("full.{format}"));
    if format == "qcow2" {
        make_qcow2(&fs.0, "full.qcow2", "cluster_size=65536", "64M");
    } else {
        make_raw(&fs.0, "full.raw", 64 << 20, &[]);
    }
    let s = Server::unix(
        QNBD,
        &["-f", format, "-t", "-e", "0", img.to_str().expect("path")],
    );
    let sock = s.socket.clone().expect("socket");
    let mut c = Raw::negotiate(&sock, Neg::Simple);
    let (done, e) = fill(&mut c, 0, 64 << 20);
    assert_eq!(
        e, ENOSPC,
        "{format}: the write that does not fit gets ENOSPC"
    );
    assert!(!done.is_empty(), "{format}: some writes fit");
    // Reads, in-place writes and flushes go on.
    for &off in &done {
        let (e, d) = read(&mut c, off, 65536);
        assert_eq!(e, 0);
        assert!(
            d.iter().all(|&b| b == (off >> 16) as u8 | 1),
            "{format}: data at {off}"
        );
    }
    assert_eq!(
        write(&mut c, done[0], &vec![1; 65536]),
        Some(0),
        "overwrite in place"
    );
    // A flush may need space too (qcow2 tables in clusters not yet written are holes).
    let flushed = c.errno(0, CMD_FLUSH, 0, 0, &[]);
    assert!(
        matches!(flushed, Some(0) | Some(ENOSPC)),
        "flush while full: {flushed:?}"
    );
    let failed_at = done.last().map_or(0, |o| o + 65536);
    assert_eq!(
        write(&mut c, failed_at, &[9; 65536]),
        Some(ENOSPC),
        "still full"
    );
    // Space comes back: the same write works, and so does the flush.
    fs.resize("96M");
    assert_eq!(
        c.errno(0, CMD_FLUSH, 0, 0, &[]),
        Some(0),
        "flush once there is room"
    );
    assert_eq!(write(&mut c, failed_at, &[9; 65536]), Some(0));
    let (more, e) = fill(&mut c, failed_at + 65536, 16 << 20);
    assert_eq!(e, 0);
    assert!(!more.is_empty());
    assert_eq!(read(&mut c, failed_at, 65536).1, vec![9; 65536]);
    drop(c);
    stop(s);
    if format == "qcow2" {
        check_clean(&img);
    }
}

#[test]
fn qcow2_on_a_full_file_system_gets_enospc_and_recovers() {
    if can_mount() {
        enospc("qcow2");
    }
}

#[test]
fn raw_on_a_full_file_system_gets_enospc_and_recovers() {
    if can_mount() {
        enospc("raw");
    }
}
