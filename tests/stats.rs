//! `--stats`: a known workload counted exactly, reported on SIGUSR1 and at exit, as JSON
//! and as text.

mod common;
use common::*;
use std::io::Write;
use std::process::Command;
use std::time::{Duration, Instant};

fn signal(pid: u32, sig: &str) {
    assert!(Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .expect("kill")
        .success());
}

/// Wait until `path` holds `n` reports (JSON lines, or text tables by their heading).
fn reports(path: &std::path::Path, n: usize, json: bool) -> String {
    let start = Instant::now();
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let have = if json {
            text.lines().count()
        } else {
            text.matches("statistics for export").count()
        };
        if have >= n {
            return text;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{n} reports: {text}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A client whose negotiation fails (a bad option magic).
fn failed_negotiation(sock: &std::path::Path) {
    let mut s = std::os::unix::net::UnixStream::connect(sock).expect("connect");
    let mut greeting = [0u8; 18];
    std::io::Read::read_exact(&mut s, &mut greeting).expect("greeting");
    let _ = s.write_all(&[0, 0, 0, 1]);
    let _ = s.write_all(b"not the option magic....");
    let mut rest = Vec::new();
    let _ = std::io::Read::read_to_end(&mut s, &mut rest);
}

#[test]
fn stats_count_a_known_workload_exactly() {
    if !have_nbdsh() {
        return;
    }
    let dir = tmpdir();
    let img = make_raw(dir.path(), "s.raw", 64 << 20, &[]);
    let file = dir.path().join("stats.json");
    let stats_file = format!("--stats-file={}", file.display());
    let mut s = Server::unix(
        QNBD,
        &[
            "-f",
            "raw",
            "-t",
            "-e",
            "2",
            "--stats=json",
            &stats_file,
            img.to_str().unwrap(),
        ],
    );
    let expected = nbdsh_script("stats_workload.py", &s.uri(), &[]);
    let expected: serde_json::Value = serde_json::from_str(&expected).expect("workload output");
    failed_negotiation(s.socket.as_ref().unwrap());
    // The client has gone, but the server may still be closing its connection: ask until
    // the report shows it closed (each SIGUSR1 adds a line).
    let start = Instant::now();
    let mut n = 0;
    let doc = loop {
        n += 1;
        signal(s.child.id(), "-USR1");
        let text = reports(&file, n, true);
        assert!(
            s.child.try_wait().unwrap().is_none(),
            "SIGUSR1 ended the server"
        );
        let doc: serde_json::Value =
            serde_json::from_str(text.lines().nth(n - 1).unwrap()).unwrap();
        if doc["connections"]["open"] == 0 || start.elapsed() > Duration::from_secs(10) {
            break doc;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(doc["when"], "SIGUSR1");
    assert_eq!(doc["export"], "");
    let c = &doc["connections"];
    assert_eq!(
        (&c["accepted"], &c["open"], &c["negotiated"], &c["failed"]),
        (&2.into(), &0.into(), &1.into(), &1.into()),
        "{doc}"
    );
    for (op, counts) in doc["commands"].as_object().unwrap() {
        let want = expected
            .get(op)
            .cloned()
            .unwrap_or(serde_json::json!([0, 0, 0]));
        let got = serde_json::json!([counts["requests"], counts["bytes"], counts["errors"]]);
        assert_eq!(got, want, "{op}: {doc}");
        let lat = &counts["latency-us"];
        if counts["requests"] != 0 {
            let (p50, max) = (lat["p50"].as_f64().unwrap(), lat["max"].as_f64().unwrap());
            assert!(p50 > 0.0 && p50 <= max, "{op} latency {lat}");
        }
    }
    assert_eq!(s.terminate().and_then(|st| st.code()), Some(0));
    let all = reports(&file, n + 1, true);
    let last: serde_json::Value = serde_json::from_str(all.lines().nth(n).unwrap()).unwrap();
    assert_eq!(last["when"], "exit");
    assert_eq!(
        last["commands"], doc["commands"],
        "nothing happened in between"
    );
}

#[test]
fn stats_as_text_and_refused_formats() {
    if !have_nbdsh() {
        return;
    }
    let dir = tmpdir();
    let img = make_raw(dir.path(), "t.raw", 64 << 20, &[]);
    let file = dir.path().join("stats.txt");
    let stats_file = format!("--stats-file={}", file.display());
    let mut s = Server::unix(
        QNBD,
        &["-f", "raw", "-x", "e1", &stats_file, img.to_str().unwrap()],
    )
    .with_name("e1");
    nbdsh_script("stats_workload.py", &s.uri(), &[]);
    // Without -t the server ends with its client and reports once.
    assert!(s.wait_exit(Duration::from_secs(10)).is_some());
    let text = reports(&file, 1, false);
    assert!(
        text.starts_with("statistics for export 'e1' (exit, after "),
        "{text}"
    );
    assert!(text.contains("connections: 1 accepted, 0 open, 1 negotiated, 0 failed"));
    let row = |op: &str| -> Vec<String> {
        let line = text
            .lines()
            .find(|l| l.split_whitespace().next() == Some(op))
            .unwrap_or_else(|| panic!("no {op} row: {text}"));
        line.split_whitespace()
            .skip(1)
            .take(3)
            .map(str::to_string)
            .collect()
    };
    assert_eq!(row("write"), ["10", "40960", "0"]);
    assert_eq!(row("read"), ["8", "57856", "1"]);
    assert_eq!(row("flush"), ["2", "0", "0"]);
    assert_eq!(row("write-zeroes"), ["3", "196608", "0"]);
    assert!(
        !text.contains("\nother "),
        "commands never sent are left out"
    );

    let out = run(Command::new(QNBD).args(["--stats=xml", img.to_str().unwrap()]));
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "qnbd: Invalid statistics format 'xml' (expected 'text' or 'json')\n"
    );
}
