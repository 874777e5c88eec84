//! `--image-opts driver=qcow2,...`: backing overrides, qcow2's own options and their errors,
//! each compared with qemu-nbd on the same chain.

mod common;
use common::*;
use std::path::Path;
use std::process::{Command, Stdio};

#[test]
fn qcow2_image_opts_behave_like_qemu_nbd() {
    if !have("qemu-img") || !have("qemu-io") || !have("qemu-nbd") {
        return;
    }
    let dir = tmpdir();
    let d = dir.path();
    make_raw(d, "base.raw", 4 << 20, &[(0, b"BASEDATA")]);
    make_raw(d, "other.raw", 4 << 20, &[(0, b"OTHERDAT")]);
    ok(Command::new("qemu-img").current_dir(d).args([
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.raw",
        "-F",
        "raw",
        "top.qcow2",
    ]));
    ok(Command::new("qemu-io").current_dir(d).args([
        "-f",
        "qcow2",
        "-c",
        "write -P 7 1M 4k",
        "top.qcow2",
    ]));
    let top = d.join("top.qcow2");
    let other = d.join("other.raw");
    let base = format!(
        "driver=qcow2,file.driver=file,file.filename={}",
        top.display()
    );
    let works = [
        String::new(),
        ",backing=".to_string(),
        format!(
            ",backing.driver=raw,backing.file.filename={}",
            other.display()
        ),
        format!(",backing.file.filename={}", other.display()),
        ",backing.driver=raw".to_string(),
        ",lazy-refcounts=on,l2-cache-size=1M,cache-clean-interval=0,overlap-check=none".to_string(),
    ];
    for extra in &works {
        let spec = format!("{base}{extra}");
        let mut seen = Vec::new();
        for bin in [QNBD, "qemu-nbd"] {
            let s = Server::unix(bin, &["-r", "-t", "--image-opts", &spec]);
            let out = ok(Command::new("qemu-io").args([
                "-r",
                "-f",
                "raw",
                "-c",
                "read -v 0 8",
                "-c",
                "read -P 7 1M 4k",
                &s.uri(),
            ]));
            let first = out.lines().next().unwrap_or("").to_string();
            assert!(
                !out.contains("Pattern verification failed"),
                "{bin} {extra}: {out}"
            );
            seen.push(first);
        }
        assert_eq!(seen[0], seen[1], "{extra}");
    }
    let fails = [
        ",backing=null",
        ",bogus=1",
        ",overlap-check=x",
        ",file.bogus=1",
        ",backing.driver=bogusfmt",
    ];
    for extra in fails {
        refused_alike(d, &["-r", "--image-opts", &format!("{base}{extra}")]);
    }
}

/// An image with an external data file named relatively (qemu opens it from the current
/// directory): served as it is and with `data-file.filename=`, and refused as qemu-nbd
/// refuses it, with the same message and exit code.
#[test]
fn qcow2_data_file_behaves_like_qemu_nbd() {
    if !have("qemu-img") || !have("qemu-io") || !have("qemu-nbd") {
        return;
    }
    let dir = tmpdir();
    let d = dir.path();
    make_raw(d, "other.raw", 4 << 20, &[(0, b"OTHERDAT")]);
    ok(Command::new("qemu-img").current_dir(d).args([
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "data_file=d.raw",
        "e.qcow2",
        "4M",
    ]));
    ok(Command::new("qemu-img").current_dir(d).args([
        "create",
        "-q",
        "-f",
        "qcow2",
        "plain.qcow2",
        "4M",
    ]));
    ok(Command::new("qemu-io").current_dir(d).args([
        "-f",
        "qcow2",
        "-c",
        "write -P 7 0 64k",
        "e.qcow2",
    ]));
    let img = d.join("e.qcow2");
    let opts = |extra: &str| format!("driver=qcow2,file.filename={}{extra}", img.display());
    let served = [
        vec![img.display().to_string()],
        vec!["--image-opts".into(), opts(",data-file.filename=other.raw")],
        vec![
            "--image-opts".into(),
            opts(",data-file.driver=file,data-file.filename=d.raw"),
        ],
    ];
    for args in &served {
        let mut seen = Vec::new();
        for bin in [QNBD, "qemu-nbd"] {
            let mut all = vec!["-r", "-t"];
            all.extend(args.iter().map(String::as_str));
            let s = Server::unix_in(bin, &all, d);
            let out = ok(Command::new("qemu-io").args([
                "-r",
                "-f",
                "raw",
                "-c",
                "read -v 0 8",
                "-c",
                "read -v 64k 8",
                &s.uri(),
            ]));
            seen.push(
                out.lines()
                    .filter(|l| l.starts_with("000"))
                    .collect::<Vec<_>>()
                    .join("\n"),
            );
        }
        assert_eq!(seen[0], seen[1], "{args:?}");
    }
    let plain = format!(
        "driver=qcow2,file.filename={}",
        d.join("plain.qcow2").display()
    );
    let refused: [(&str, Vec<String>); 4] = [
        ("/", vec![img.display().to_string()]),
        (
            ".",
            vec!["--image-opts".into(), opts(",data-file=other.raw")],
        ),
        (
            ".",
            vec![
                "--image-opts".into(),
                opts(",data-file.filename=/nonexistent.raw"),
            ],
        ),
        (
            ".",
            vec![
                "--image-opts".into(),
                format!("{plain},data-file.filename=other.raw"),
            ],
        ),
    ];
    for (cwd, args) in &refused {
        let cwd = if *cwd == "/" { Path::new("/") } else { d };
        let mut all = vec!["-r"];
        all.extend(args.iter().map(String::as_str));
        refused_alike_in(cwd, d, &all);
    }
}

/// `json:` file names (qemu's pseudo-protocol): served and refused as qemu-nbd serves and
/// refuses them, `-f` replacing the object's driver; a `json:` backing name in a header.
#[test]
fn json_filenames_behave_like_qemu_nbd() {
    if !have("qemu-img") || !have("qemu-nbd") || !have("nbdinfo") {
        return;
    }
    let dir = tmpdir();
    let d = dir.path();
    ok(Command::new("qemu-img")
        .current_dir(d)
        .args(["create", "-q", "-f", "qcow2", "j.qcow2", "1M"]));
    let img = d.join("j.qcow2").display().to_string();
    let file = format!(r#""file":{{"driver":"file","filename":"{img}"}}"#);
    let served: [(Option<&str>, String); 6] = [
        (None, format!(r#"json:{{"driver":"qcow2",{file}}}"#)),
        (None, format!(r#"json:{{{file}}}"#)),
        (Some("qcow2"), format!(r#"json:{{{file}}}"#)),
        (Some("raw"), format!(r#"json:{{"driver":"qcow2",{file}}}"#)),
        (
            None,
            format!(r#"json:{{"driver":"raw",{file},"offset":512,"size":1024}}"#),
        ),
        (
            None,
            format!(
                r#"json:{{"driver":"qcow2","backing":null,"file":{{"driver":"file","filename":"{img}","locking":false}}}}"#
            ),
        ),
    ];
    for (fmt, name) in &served {
        let mut sizes = Vec::new();
        for bin in [QNBD, "qemu-nbd"] {
            let mut args = vec!["-r", "-t"];
            if let Some(f) = fmt {
                args.extend(["-f", f]);
            }
            args.push(name);
            let s = Server::unix(bin, &args);
            sizes.push(ok(Command::new("nbdinfo").args(["--size", &s.uri()])));
        }
        assert_eq!(sizes[0], sizes[1], "{fmt:?} {name}");
    }
    // A backing file named by a `json:` name in the header.
    make_raw(d, "base.raw", 1 << 20, &[(0, b"BASEDATA")]);
    let base = d.join("base.raw").display().to_string();
    let backing =
        format!(r#"json:{{"driver":"raw","file":{{"driver":"file","filename":"{base}"}}}}"#);
    ok(Command::new("qemu-img").current_dir(d).args([
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        &backing,
        "-F",
        "raw",
        "top.qcow2",
    ]));
    let top = d.join("top.qcow2").display().to_string();
    let mut first = Vec::new();
    for bin in [QNBD, "qemu-nbd"] {
        let s = Server::unix(bin, &["-r", "-t", &top]);
        let out =
            ok(Command::new("qemu-io").args(["-r", "-f", "raw", "-c", "read -v 0 8", &s.uri()]));
        first.push(out.lines().next().unwrap_or("").to_string());
    }
    assert!(first[0].contains("42 41 53 45"), "{first:?}");
    assert_eq!(first[0], first[1]);
    let refused = [
        format!(r#"json:{{"driver":"qcow2",{file}"#),
        "json:[1]".to_string(),
        format!(r#"json:{{"driver":"qcow2","file":"{img}"}}"#),
        format!(r#"json:{{"driver":"qcow2",{file},"bogus":1}}"#),
    ];
    for name in &refused {
        refused_alike(d, &["-r", name]);
    }
}

/// qnbd and qemu-nbd refuse `args` alike: the same stderr (but the program's name) and exit
/// code 1. Each gets a private socket in `d`: parallel tests must not meet on the default
/// port.
fn refused_alike(d: &Path, args: &[&str]) {
    refused_alike_in(d, d, args)
}

/// [`refused_alike`] run from `cwd`.
fn refused_alike_in(cwd: &Path, d: &Path, args: &[&str]) {
    let outs: Vec<(Option<i32>, String)> = [QNBD, "qemu-nbd"]
        .iter()
        .map(|bin| {
            let out = run(Command::new(bin)
                .current_dir(cwd)
                .arg("-k")
                .arg(d.join("refused.sock"))
                .args(args)
                .stdin(Stdio::null()));
            (
                out.status.code(),
                String::from_utf8_lossy(&out.stderr).replace("qemu-nbd:", "qnbd:"),
            )
        })
        .collect();
    assert_eq!(outs[0], outs[1], "{args:?}");
    assert_eq!(outs[0].0, Some(1), "{args:?}");
}
