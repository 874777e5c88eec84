//! `--image-opts driver=qcow2,...`: backing overrides, qcow2's own options and their errors,
//! each compared with qemu-nbd on the same chain.

mod common;
use common::*;
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
        let spec = format!("{base}{extra}");
        let outs: Vec<(Option<i32>, String)> = [QNBD, "qemu-nbd"]
            .iter()
            .map(|bin| {
                // A private socket: parallel tests must not meet on the default port.
                let out = run(Command::new(bin)
                    .arg("-k")
                    .arg(d.join("refused.sock"))
                    .args(["-r", "--image-opts", &spec])
                    .stdin(Stdio::null()));
                (
                    out.status.code(),
                    String::from_utf8_lossy(&out.stderr).replace("qemu-nbd:", "qnbd:"),
                )
            })
            .collect();
        assert_eq!(outs[0], outs[1], "{extra}");
        assert_eq!(outs[0].0, Some(1), "{extra}");
    }
}
