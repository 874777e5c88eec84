//! `-B NAME` dirty bitmaps and `-l` internal snapshots, side by side with qemu-nbd: the same
//! `nbdinfo --map=qemu:dirty-bitmap:NAME`, the same refusals, bitmaps marked by writes through
//! qnbd and stored on exit, and `-l` reading what `qemu-img snapshot -a` restores.

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// An image with three bitmaps (enabled, disabled, coarser granularity) and writes since.
fn image_with_bitmaps(d: &Path, name: &str) -> PathBuf {
    qemu_img(d, &["create", "-q", "-f", "qcow2", name, "16M"]);
    qemu_io(d, "qcow2", name, &["write -P 1 0 1M"]);
    qemu_img(d, &["bitmap", "--add", name, "b0"]);
    qemu_img(d, &["bitmap", "--add", "--disable", name, "b1"]);
    qemu_img(d, &["bitmap", "--add", "-g", "128k", name, "b2"]);
    qemu_io(
        d,
        "qcow2",
        name,
        &["write -P 2 100k 8k", "write -z 3M 1M", "write -P 3 9M 100"],
    );
    d.join(name)
}

const WRITES: [&str; 3] = ["write -P 9 5M 4k", "write -z 6M 200k", "write -P 8 15M 1M"];

fn maps(bin: &str, img: &Path, bitmaps: &[&str]) -> Vec<String> {
    let mut args = vec!["-f", "qcow2", "-t", "-r"];
    for b in bitmaps {
        args.extend_from_slice(&["-B", b]);
    }
    args.push(img.to_str().unwrap());
    let s = Server::unix(bin, &args);
    let mut out = vec![ok(Command::new("nbdinfo").arg(s.uri()))
        .lines()
        .filter(|l| l.contains("qemu:") || l.contains("base:"))
        .collect::<Vec<_>>()
        .join("\n")];
    for b in bitmaps {
        out.push(ok(Command::new("nbdinfo")
            .arg(format!("--map=qemu:dirty-bitmap:{b}"))
            .arg(s.uri())));
    }
    out
}

#[test]
fn dirty_bitmap_maps_equal_qemu_nbd() {
    if !have("qemu-img") || !have("qemu-io") || !have("qemu-nbd") || !have("nbdinfo") {
        return;
    }
    let dir = tmpdir();
    let img = image_with_bitmaps(dir.path(), "b.qcow2");
    let ours = maps(QNBD, &img, &["b0", "b1", "b2"]);
    let theirs = maps("qemu-nbd", &img, &["b0", "b1", "b2"]);
    assert_eq!(ours, theirs);
    assert!(ours[1].contains("dirty"), "{}", ours[1]);
    // One bitmap only, and the listing of contexts with -A beside it.
    assert_eq!(maps(QNBD, &img, &["b2"]), maps("qemu-nbd", &img, &["b2"]));
}

/// Run `bin` expecting it to refuse; on a private socket, so parallel tests never meet on
/// the default port (qemu-nbd binds it before it looks at bitmaps or snapshots).
fn refusal(bin: &str, args: &[&str]) -> (Option<i32>, String) {
    let dir = tmpdir();
    let sock = dir.path().join("r.sock");
    let out = run(Command::new(bin)
        .arg("-k")
        .arg(&sock)
        .args(args)
        .stdin(Stdio::null()));
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).replace("qemu-nbd:", "qnbd:"),
    )
}

#[test]
fn missing_and_inconsistent_bitmaps_are_refused_like_qemu_nbd() {
    if !have("qemu-img") || !have("qemu-io") || !have("qemu-nbd") {
        return;
    }
    let dir = tmpdir();
    let d = dir.path();
    let img = image_with_bitmaps(d, "b.qcow2");
    let raw = make_raw(d, "r.raw", 1 << 20, &[]);
    let img_s = img.to_str().unwrap();
    let raw_s = raw.to_str().unwrap();
    let cases: Vec<Vec<&str>> = vec![
        vec!["-f", "qcow2", "-B", "nope", img_s],
        vec!["-f", "qcow2", "-r", "-B", "b0", "-B", "nope", img_s],
        vec!["-f", "raw", "-B", "b0", raw_s],
    ];
    for args in &cases {
        let theirs = refusal("qemu-nbd", args);
        assert_eq!(theirs.0, Some(1), "{args:?}: {}", theirs.1);
        assert_eq!(refusal(QNBD, args), theirs, "{args:?}");
    }
    // Neither refusal left the bitmaps marked in use.
    let info = qemu_img(d, &["info", "b.qcow2"]);
    assert!(!info.contains("in-use"), "{info}");

    // A server killed while the image is open leaves its bitmaps in use: inconsistent.
    let mut s = Server::unix(QNBD, &["-f", "qcow2", "-t", img_s]);
    let _ = s.child.kill();
    let _ = s.child.wait();
    assert!(qemu_img(d, &["info", "b.qcow2"]).contains("in-use"));
    let args = ["-f", "qcow2", "-r", "-B", "b0", img_s];
    let theirs = refusal("qemu-nbd", &args);
    assert!(
        theirs.1.contains("is inconsistent and cannot be used"),
        "{}",
        theirs.1
    );
    assert_eq!(refusal(QNBD, &args), theirs);
}

#[test]
fn writes_through_qnbd_mark_bitmaps_and_store_them() {
    if !have("qemu-img") || !have("qemu-io") || !have("qemu-nbd") || !have("nbdinfo") {
        return;
    }
    let dir = tmpdir();
    let d = dir.path();
    let ours = image_with_bitmaps(d, "ours.qcow2");
    let twin = d.join("twin.qcow2");
    std::fs::copy(&ours, &twin).expect("copy");
    // The twin gets the same writes from qemu itself.
    qemu_io(Path::new("."), "qcow2", twin.to_str().unwrap(), &WRITES);

    let mut s = Server::unix(
        QNBD,
        &["-f", "qcow2", "-t", "-B", "b0", ours.to_str().unwrap()],
    );
    let info = qemu_img(d, &["info", "-U", "ours.qcow2"]);
    assert_eq!(
        info.matches("in-use").count(),
        3,
        "marked in use while open: {info}"
    );
    qemu_io(Path::new("."), "raw", &s.uri(), &WRITES);
    // The exported bitmap follows the writes while the server runs.
    let live = ok(Command::new("nbdinfo")
        .arg("--map=qemu:dirty-bitmap:b0")
        .arg(s.uri()));
    assert!(s.terminate().is_some_and(|st| st.success()));

    let info = qemu_img(d, &["info", "ours.qcow2"]);
    assert!(!info.contains("in-use"), "{info}");
    let check = run(Command::new("qemu-img").arg("check").arg(&ours));
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );
    let a = maps("qemu-nbd", &ours, &["b0", "b1", "b2"]);
    let b = maps("qemu-nbd", &twin, &["b0", "b1", "b2"]);
    assert_eq!(
        a, b,
        "bitmaps stored by qnbd differ from qemu's after the same writes"
    );
    assert_eq!(live, a[1]);
    let cmp = qemu_img(d, &["compare", "ours.qcow2", "twin.qcow2"]);
    assert!(cmp.contains("identical"), "{cmp}");
}

#[test]
fn load_snapshot_reads_what_snapshot_apply_restores() {
    if !have("qemu-img") || !have("qemu-io") || !have("qemu-nbd") || !have("nbdinfo") {
        return;
    }
    let dir = tmpdir();
    let d = dir.path();
    qemu_img(d, &["create", "-q", "-f", "qcow2", "s.qcow2", "8M"]);
    let img = d.join("s.qcow2");
    let img_s = img.to_str().unwrap();
    qemu_io(Path::new("."), "qcow2", img_s, &["write -P 1 0 2M"]);
    qemu_img(d, &["snapshot", "-c", "first", "s.qcow2"]);
    qemu_io(Path::new("."), "qcow2", img_s, &["write -P 2 1M 2M"]);
    qemu_img(d, &["snapshot", "-c", "second", "s.qcow2"]);
    qemu_io(
        Path::new("."),
        "qcow2",
        img_s,
        &["write -P 3 0 512k", "write -z 6M 1M"],
    );
    // What each snapshot holds, as qemu-img snapshot -a restores it.
    let restored = |name: &str| {
        let copy = d.join(format!("restored-{name}.qcow2"));
        std::fs::copy(&img, &copy).expect("copy");
        qemu_img(d, &["snapshot", "-a", name, copy.to_str().unwrap()]);
        copy
    };
    let first = restored("first");
    let second = restored("second");
    for (spec, want) in [
        ("snapshot.id=1", &first),
        ("snapshot.name=second", &second),
        ("first", &first),
        ("2", &second),
    ] {
        let s = Server::unix(QNBD, &["-f", "qcow2", "-t", "-l", spec, img_s]);
        let cmp = run(Command::new("qemu-img")
            .args(["compare", "-f", "qcow2", "-F", "raw"])
            .arg(want)
            .arg(s.uri()));
        assert!(
            cmp.status.success(),
            "-l {spec}: {}",
            String::from_utf8_lossy(&cmp.stdout)
        );
        // -l exports read-only, as qemu-nbd does.
        let ro = run(Command::new("nbdinfo").args(["--is", "read-only", &s.uri()]));
        assert!(ro.status.success(), "-l {spec} is not read-only");
        let q = Server::unix("qemu-nbd", &["-f", "qcow2", "-t", "-l", spec, img_s]);
        let ours = ok(Command::new("nbdinfo").args(["--map", &s.uri()]));
        let theirs = ok(Command::new("nbdinfo").args(["--map", &q.uri()]));
        assert_eq!(ours, theirs, "-l {spec}: map differs from qemu-nbd's");
    }
    let missing = ["-f", "qcow2", "-l", "nosuch", img_s];
    let theirs = refusal("qemu-nbd", &missing);
    assert_eq!(theirs.0, Some(1));
    assert_eq!(refusal(QNBD, &missing), theirs);
}
