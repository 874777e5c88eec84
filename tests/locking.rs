//! qemu's image locks through the real binary: what qnbd holds (`/proc/locks`), and who
//! refuses whom among qnbd, qemu-nbd, qemu-io and qemu-img, both ways, with qemu's messages.

mod common;
use common::*;
use std::collections::BTreeSet;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;

/// The OFD lock bytes on `file`'s inode, from /proc/locks (ranges expanded).
fn locked_bytes(file: &Path) -> BTreeSet<u64> {
    let ino = std::fs::metadata(file).unwrap().ino();
    // The list is printed a page per read and may change meanwhile: take two equal reads.
    let mut last = None;
    for _ in 0..20 {
        let text = std::fs::read_to_string("/proc/locks").unwrap();
        let mut set = BTreeSet::new();
        for line in text.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            let Some(pos) = f.iter().position(|x| x.ends_with(&format!(":{ino}"))) else {
                continue;
            };
            let (Some(a), Some(b)) = (f.get(pos + 1), f.get(pos + 2)) else {
                continue;
            };
            let (a, b): (u64, u64) = (a.parse().unwrap(), b.parse().unwrap());
            set.extend(a..=b);
        }
        if last.as_ref() == Some(&set) {
            return set;
        }
        last = Some(set);
    }
    last.unwrap_or_default()
}

fn bytes(v: &[u64]) -> BTreeSet<u64> {
    v.iter().copied().collect()
}

/// Run in `dir` (so messages name the file as given) and return (exit code, stderr).
fn try_run(dir: &Path, prog: &str, args: &[&str]) -> (i32, String) {
    let out = run(Command::new(prog).current_dir(dir).args(args));
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn conflict(prog_prefix: &str, what: &str, file: &str) -> String {
    format!("{prog_prefix}{what} lock\nIs another process using the image [{file}]?\n")
}

fn tools() -> bool {
    have("qemu-img") && have("qemu-io") && have("qemu-nbd")
}

#[test]
fn qnbd_serving_qcow2_read_write_locks_as_qemu_nbd() {
    if !tools() {
        return;
    }
    let d = tmpdir();
    let img = make_qcow2(d.path(), "a.qcow2", "", "64M");
    let mut s = Server::unix(QNBD, &["-t", "-f", "qcow2", img.to_str().unwrap()]);
    assert_eq!(locked_bytes(&img), bytes(&[100, 101, 103, 201, 203]));
    let dir = d.path();
    assert_eq!(
        try_run(dir, "qemu-img", &["info", "a.qcow2"]),
        (
            1,
            conflict(
                "qemu-img: Could not open 'a.qcow2': ",
                "Failed to get shared \"write\"",
                "a.qcow2"
            )
        )
    );
    assert_eq!(try_run(dir, "qemu-img", &["info", "-U", "a.qcow2"]).0, 0);
    assert_eq!(
        try_run(dir, "qemu-io", &["-c", "write 0 512", "a.qcow2"]),
        (
            1,
            conflict(
                "qemu-io: can't open device a.qcow2: ",
                "Failed to get \"write\"",
                "a.qcow2"
            )
        )
    );
    let sock = d.path().join("q.sock");
    let (code, err) = try_run(
        dir,
        "qemu-nbd",
        &["-f", "qcow2", "-k", sock.to_str().unwrap(), "a.qcow2"],
    );
    assert_eq!(code, 1);
    assert_eq!(
        err,
        conflict(
            "qemu-nbd: Failed to blk_new_open 'a.qcow2': ",
            "Failed to get \"write\"",
            "a.qcow2"
        )
    );
    s.terminate().expect("qnbd exits on SIGTERM");
    assert!(locked_bytes(&img).is_empty(), "locks left after SIGTERM");
}

/// qemu-nbd holding the image: qnbd refuses read-write and read-only with qemu's words (its
/// own name as prefix), exits 1 and leaves no lock behind.
#[test]
fn qnbd_refuses_an_image_qemu_nbd_serves() {
    if !tools() {
        return;
    }
    let d = tmpdir();
    let img = make_qcow2(d.path(), "a.qcow2", "", "64M");
    let held = bytes(&[100, 101, 103, 201, 203]);
    let _q = Server::unix("qemu-nbd", &["-t", "-f", "qcow2", img.to_str().unwrap()]);
    assert_eq!(locked_bytes(&img), held);
    let sock = d.path().join("n.sock");
    for extra in [&[][..], &["-r"][..]] {
        let mut args = vec!["-f", "qcow2", "-k", sock.to_str().unwrap()];
        args.extend_from_slice(extra);
        args.push("a.qcow2");
        let (code, err) = try_run(d.path(), QNBD, &args);
        let what = if extra.is_empty() {
            "Failed to get \"write\""
        } else {
            "Failed to get shared \"write\""
        };
        assert_eq!(code, 1, "{extra:?}");
        assert_eq!(
            err,
            conflict("qnbd: Failed to blk_new_open 'a.qcow2': ", what, "a.qcow2"),
            "{extra:?}"
        );
        assert_eq!(locked_bytes(&img), held, "qnbd left a lock ({extra:?})");
    }
}

#[test]
fn read_only_holders_coexist_and_a_writer_is_refused() {
    if !tools() {
        return;
    }
    let d = tmpdir();
    let img = make_qcow2(d.path(), "a.qcow2", "", "64M");
    let i = img.to_str().unwrap();
    let _a = Server::unix(QNBD, &["-t", "-r", "-f", "qcow2", i]);
    let _b = Server::unix("qemu-nbd", &["-t", "-r", "-f", "qcow2", i]);
    assert_eq!(locked_bytes(&img), bytes(&[100, 201, 203]));
    assert_eq!(
        try_run(d.path(), "qemu-io", &["-r", "-c", "read 0 512", "a.qcow2"]).0,
        0
    );
    let (code, err) = try_run(d.path(), "qemu-io", &["-c", "write 0 512", "a.qcow2"]);
    assert_eq!(code, 1);
    assert!(err.contains("Failed to get \"write\" lock"), "{err}");
}

/// Raw shares writing (qemu's raw unshares only resize): a qemu-io writer coexists, a resize
/// is refused; qnbd refuses to serve a raw image whose resize someone holds with the export
/// step's message (no open prefix).
#[test]
fn raw_images_share_writes_but_not_resize() {
    if !tools() {
        return;
    }
    let d = tmpdir();
    let img = make_raw(d.path(), "a.raw", 1 << 20, &[]);
    let mut s = Server::unix(QNBD, &["-t", "-f", "raw", img.to_str().unwrap()]);
    assert_eq!(locked_bytes(&img), bytes(&[100, 101, 203]));
    assert_eq!(
        try_run(
            d.path(),
            "qemu-io",
            &["-f", "raw", "-c", "write 0 512", "a.raw"]
        )
        .0,
        0
    );
    let (code, err) = try_run(
        d.path(),
        "qemu-img",
        &["resize", "-f", "raw", "a.raw", "2M"],
    );
    assert_eq!(code, 1);
    assert_eq!(
        err,
        conflict(
            "qemu-img: Could not open 'a.raw': ",
            "Failed to get \"resize\"",
            "a.raw"
        )
    );
    s.terminate();
    // A holder of resize (qemu-io after `truncate`) refuses qnbd when the export is added.
    let mut holder = Command::new("qemu-io")
        .current_dir(d.path())
        .args(["-f", "raw", "a.raw"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let stdin = holder.stdin.as_mut().unwrap();
        writeln!(stdin, "truncate 1M").unwrap();
        stdin.flush().unwrap();
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !locked_bytes(&img).contains(&103) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let sock = d.path().join("r.sock");
    let (code, err) = try_run(
        d.path(),
        QNBD,
        &["-f", "raw", "-k", sock.to_str().unwrap(), "a.raw"],
    );
    let _ = holder.kill();
    let _ = holder.wait();
    assert_eq!(code, 1);
    assert_eq!(
        err,
        conflict("qnbd: ", "Failed to get shared \"resize\"", "a.raw")
    );
}

/// Every file of a chain is locked: the base as a backing file, so it can be read by others
/// but not written.
#[test]
fn backing_files_are_locked_read_only() {
    if !tools() {
        return;
    }
    let d = tmpdir();
    let base = make_qcow2(d.path(), "base.qcow2", "", "64M");
    ok(Command::new("qemu-img").current_dir(d.path()).args([
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        "top.qcow2",
    ]));
    let top = d.path().join("top.qcow2");
    let _s = Server::unix(QNBD, &["-t", "-f", "qcow2", top.to_str().unwrap()]);
    assert_eq!(locked_bytes(&base), bytes(&[100, 201, 203]));
    assert_eq!(
        try_run(
            d.path(),
            "qemu-io",
            &["-r", "-c", "read 0 512", "base.qcow2"]
        )
        .0,
        0
    );
    let (code, err) = try_run(d.path(), "qemu-io", &["-c", "write 0 512", "base.qcow2"]);
    assert_eq!(code, 1);
    assert!(err.contains("Failed to get \"write\" lock"), "{err}");
}

/// `-s` reads the original as a backing file: other readers may open it, writers may not.
#[test]
fn snapshot_mode_locks_the_original_as_a_backing_file() {
    if !tools() {
        return;
    }
    let d = tmpdir();
    let img = make_qcow2(d.path(), "a.qcow2", "", "64M");
    let _s = Server::unix(QNBD, &["-t", "-s", "-f", "qcow2", img.to_str().unwrap()]);
    assert_eq!(locked_bytes(&img), bytes(&[100, 201, 203]));
}

/// `file.locking=off` takes no locks at all (qemu's meaning); a bad value is refused with
/// qemu's text; kill -9 leaves nothing behind.
#[test]
fn locking_off_and_kill_9() {
    if !tools() {
        return;
    }
    let d = tmpdir();
    let img = make_qcow2(d.path(), "a.qcow2", "", "64M");
    let opts = format!(
        "driver=qcow2,file.driver=file,file.locking=off,file.filename={}",
        img.display()
    );
    let s = Server::unix(QNBD, &["-t", "--image-opts", &opts]);
    assert!(locked_bytes(&img).is_empty());
    drop(s);
    let bad = format!(
        "driver=qcow2,file.driver=file,file.locking=maybe,file.filename={}",
        img.display()
    );
    let (code, err) = try_run(d.path(), QNBD, &["--image-opts", &bad]);
    assert_eq!(code, 1);
    assert_eq!(
        err,
        format!("qnbd: Failed to blk_new_open '{bad}': invalid parameter value: maybe\n")
    );
    let mut s = Server::unix(QNBD, &["-t", "-f", "qcow2", img.to_str().unwrap()]);
    assert!(!locked_bytes(&img).is_empty());
    let _ = s.child.kill();
    let _ = s.child.wait();
    assert!(locked_bytes(&img).is_empty(), "locks left after kill -9");
}
