//! `qemu-nbd -L` (qemu's NBD client) prints the same listing for qnbd as for qemu-nbd.

mod common;
use common::*;
use std::process::Command;

#[test]
fn qemu_nbd_list_sees_qnbd_as_it_sees_qemu_nbd() {
    if !have("qemu-nbd") {
        return;
    }
    let dir = tmpdir();
    let img = make_raw(dir.path(), "l.raw", 64 << 20, &[]);
    let img = img.to_str().unwrap();
    let cases: Vec<Vec<&str>> = vec![
        vec!["-x", "exp2", "-D", "desc two", "-A", "-e", "3"],
        vec!["-x", "exp1", "-D", "my description", "-r"],
        vec![],
    ];
    for args in cases {
        let mut all = vec!["-f", "raw", "-t"];
        all.extend(args.iter());
        all.push(img);
        let mut outs = Vec::new();
        for bin in [QNBD, "qemu-nbd"] {
            let s = Server::unix(bin, &all);
            outs.push(ok(Command::new("qemu-nbd")
                .arg("-L")
                .arg("-k")
                .arg(s.socket.as_ref().unwrap())));
        }
        assert_eq!(outs[0], outs[1], "qemu-nbd -L output for {args:?}");
    }
}

fn lists_equal(target: &[&str]) {
    let ours = run(Command::new(QNBD).arg("-L").args(target));
    let theirs = run(Command::new("qemu-nbd").arg("-L").args(target));
    assert_eq!(
        ours.status.code(),
        theirs.status.code(),
        "exit status for {target:?}"
    );
    assert_eq!(
        String::from_utf8_lossy(&ours.stdout),
        String::from_utf8_lossy(&theirs.stdout),
        "{target:?}"
    );
    let strip =
        |b: &[u8], name: &str| String::from_utf8_lossy(b).replace(&format!("{name}:"), "PROG:");
    assert_eq!(
        strip(&ours.stderr, "qnbd"),
        strip(&theirs.stderr, "qemu-nbd"),
        "stderr for {target:?}"
    );
}

#[test]
fn qnbd_list_prints_what_qemu_nbd_list_prints() {
    if !have("qemu-nbd") || !have("nbdkit") {
        return;
    }
    let dir = tmpdir();
    let img = make_raw(dir.path(), "l.raw", 64 << 20, &[]);
    let img = img.to_str().unwrap();
    // qemu-nbd and qnbd servers, Unix and TCP.
    for bin in ["qemu-nbd", QNBD] {
        let args = [
            "-f", "raw", "-t", "-x", "exp2", "-D", "desc two", "-A", "-e", "3", img,
        ];
        let s = Server::unix(bin, &args);
        lists_equal(&["-k", s.socket.as_ref().unwrap().to_str().unwrap()]);
        let s = Server::tcp(bin, &args);
        lists_equal(&["-b", "127.0.0.1", "-p", &s.port.unwrap().to_string()]);
    }
    // nbdkit with several exports and a description.
    let sock = dir.path().join("nbdkit.sock");
    let mut nbdkit = Command::new("nbdkit")
        .args(["-f", "-U"])
        .arg(&sock)
        .args([
            "--filter=exportname",
            "memory",
            "1M",
            "exportname-list=explicit",
            "exportname=alpha",
            "exportname=beta",
            "exportdesc=fixed:hello",
        ])
        .spawn()
        .expect("nbdkit");
    let start = std::time::Instant::now();
    while !sock.exists() && start.elapsed() < std::time::Duration::from_secs(10) {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    lists_equal(&["-k", sock.to_str().unwrap()]);
    let _ = nbdkit.kill();
    let _ = nbdkit.wait();
    // Nothing listening.
    lists_equal(&["-k", dir.path().join("none.sock").to_str().unwrap()]);
    lists_equal(&["-b", "127.0.0.1", "-p", &free_port().to_string()]);
}

/// The text form rebuilt from `-L --json`, line by line as qemu-nbd lays it out.
fn text_from_json(doc: &serde_json::Value) -> String {
    let mut s = format!("exports available: {}\n", doc["exports-available"]);
    let exports = doc["exports"].as_array().expect("exports is an array");
    for e in exports {
        s += &format!(" export: '{}'\n", e["export"].as_str().unwrap());
        if let Some(d) = e.get("description") {
            s += &format!("  description: {}\n", d.as_str().unwrap());
        }
        if let Some(size) = e.get("size") {
            s += &format!("  size:  {size}\n");
            let names: Vec<&str> = e["flag-names"]
                .as_array()
                .unwrap()
                .iter()
                .map(|n| n.as_str().unwrap())
                .collect();
            let flags = e["flags"].as_u64().unwrap();
            s += &format!("  flags: {flags:#x} ( {} )\n", names.join(" "));
        }
        if let Some(min) = e.get("min-block") {
            s += &format!("  min block: {min}\n");
            s += &format!("  opt block: {}\n", e["opt-block"]);
            s += &format!("  max block: {}\n", e["max-block"]);
        }
        s += &format!(
            "  transaction size: {}\n",
            e["transaction-size"].as_str().unwrap()
        );
        if let Some(c) = e.get("meta-contexts") {
            let c = c.as_array().unwrap();
            s += &format!("  available meta contexts: {}\n", c.len());
            for name in c {
                s += &format!("   {}\n", name.as_str().unwrap());
            }
        }
    }
    s
}

fn json_equals_text(target: &[&str]) {
    let text = ok(Command::new(QNBD).arg("-L").args(target));
    let json = ok(Command::new(QNBD).args(["-L", "--json"]).args(target));
    let doc: serde_json::Value = serde_json::from_str(&json).expect("-L --json is JSON");
    assert_eq!(text_from_json(&doc), text, "{target:?}");
}

#[test]
fn list_json_parses_and_equals_the_text_form() {
    let dir = tmpdir();
    let img = make_raw(dir.path(), "j.raw", 8 << 20, &[]);
    let img = img.to_str().unwrap();
    let s = Server::unix(
        QNBD,
        &["-f", "raw", "-t", "-x", "a", "-D", "desc", "-A", img],
    );
    json_equals_text(&["-k", s.socket.as_ref().unwrap().to_str().unwrap()]);
    let s = Server::tcp(QNBD, &["-f", "raw", "-t", "-r", img]);
    json_equals_text(&["-b", "127.0.0.1", "-p", &s.port.unwrap().to_string()]);
    if have("nbdkit") {
        let sock = dir.path().join("nbdkit.sock");
        let mut nbdkit = Command::new("nbdkit")
            .args(["-f", "-U"])
            .arg(&sock)
            .args(["--filter=exportname", "memory", "1M"])
            .args([
                "exportname-list=explicit",
                "exportname=alpha",
                "exportname=beta",
            ])
            .spawn()
            .expect("nbdkit");
        let start = std::time::Instant::now();
        while !sock.exists() && start.elapsed() < std::time::Duration::from_secs(10) {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        json_equals_text(&["-k", sock.to_str().unwrap()]);
        let _ = nbdkit.kill();
        let _ = nbdkit.wait();
    } else {
        eprintln!("SKIPPED: nbdkit is not installed; the multi-export JSON case did not run");
    }
    // --json belongs to -L.
    let out = run(Command::new(QNBD).args(["--json", img]));
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "qnbd: JSON output is only supported with export list\n"
    );
}
