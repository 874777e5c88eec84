//! Images on a web server (`qnbd -r https://host/disk.qcow2`, `--image-opts driver=http,…`,
//! `file.driver=https`), as qemu-nbd with qemu's curl driver serves them: the same bytes and
//! block status, formats and `-s` over the file, read-ahead, credentials, cookies, redirects,
//! certificate checks, qemu-nbd's words for what it refuses, and a misbehaving server failing
//! reads (EIO), never the NBD server. The web server is tests/tools/http_server.py.

mod common;
use common::pki::pki;
use common::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// qemu-nbd can serve http:// only with qemu's curl module (Debian's qemu-block-extra).
fn have_qemu_curl() -> bool {
    let ok = Path::new("/usr/lib/x86_64-linux-gnu/qemu/block-curl.so").exists();
    if !ok {
        eprintln!("SKIP: qemu's curl driver (qemu-block-extra) is not installed");
        if std::env::var_os("QNBD_REQUIRE_TOOLS").is_some() {
            panic!("qemu-block-extra is required (QNBD_REQUIRE_TOOLS is set)");
        }
    }
    ok && have("qemu-nbd") && have("qemu-img") && have("qemu-io")
}

/// tests/tools/http_server.py serving one file, killed on drop.
struct Web {
    child: Child,
    host: String,
    port: u16,
    log: PathBuf,
    tls: bool,
    _dir: tempfile::TempDir,
}

impl Web {
    fn start(file: &Path, args: &[&str]) -> Web {
        let dir = tmpdir();
        let port_file = dir.path().join("port");
        let log = dir.path().join("requests.log");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/tools/http_server.py");
        let child = Command::new(PYTHON)
            .arg(script)
            .arg(file)
            .arg(&port_file)
            .arg("--log")
            .arg(&log)
            .args(args)
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the web server");
        let host = args
            .iter()
            .position(|a| *a == "--bind")
            .map_or("127.0.0.1", |i| args[i + 1]);
        let mut web = Web {
            child,
            host: host.to_string(),
            port: 0,
            log,
            tls: args.contains(&"--tls"),
            _dir: dir,
        };
        let start = Instant::now();
        while web.port == 0 {
            if let Ok(p) = std::fs::read_to_string(&port_file) {
                web.port = p.trim().parse().expect("a port");
            }
            assert!(start.elapsed() < Duration::from_secs(10), "no web server");
            std::thread::sleep(Duration::from_millis(10));
        }
        web
    }

    fn url(&self, path: &str) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}:{}/{path}", self.host, self.port)
    }

    /// The GET requests it has answered.
    fn gets(&self) -> usize {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.starts_with("GET"))
            .count()
    }
}

impl Drop for Web {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn map(uri: &str) -> String {
    ok(Command::new("qemu-img").args(["map", "--output=json", "-f", "raw", uri]))
}

fn identical(a: &str, b: &Path) {
    let out = ok(Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw", a])
        .arg(b));
    assert!(out.contains("Images are identical"), "{out}");
}

/// A 12 MiB raw file with data at several places, and the same as qcow2.
fn images(d: &Path) -> (PathBuf, PathBuf) {
    let raw = make_raw(
        d,
        "disk.raw",
        12 << 20,
        &[
            (0, &[7u8; 65536]),
            (3 << 20, &[9u8; 300_000]),
            ((12 << 20) - 4096, &[5u8; 4096]),
        ],
    );
    let q = d.join("disk.qcow2");
    ok(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(&raw)
        .arg(&q));
    (raw, q)
}

#[test]
fn raw_and_qcow2_files_are_served_and_mapped_as_qemu_nbd_serves_them() {
    if !have_qemu_curl() {
        return;
    }
    let d = tmpdir();
    let (raw, q) = images(d.path());
    let web_raw = Web::start(&raw, &[]);
    let web_q = Web::start(&q, &[]);
    for (web, name, fmt) in [
        (&web_raw, "disk.raw", "raw"),
        (&web_q, "disk.qcow2", "qcow2"),
    ] {
        let url = web.url(name);
        let ours = Server::unix(QNBD, &["-t", "-r", "-f", fmt, &url]);
        identical(&ours.uri(), &raw);
        let theirs = Server::unix("qemu-nbd", &["-t", "-r", "-f", fmt, &url]);
        assert_eq!(map(&ours.uri()), map(&theirs.uri()), "{fmt}: block status");
    }
    // Probed, and a throw-away overlay over the web file that takes writes.
    let s = Server::unix(QNBD, &["-t", "-r", &web_q.url("disk.qcow2")]);
    identical(&s.uri(), &raw);
    drop(s);
    let s = Server::unix(QNBD, &["-t", "-s", &web_q.url("disk.qcow2")]);
    qemu_io(
        d.path(),
        "raw",
        &s.uri(),
        &[
            "write -P 0x55 1M 1M",
            "read -P 0x55 1M 1M",
            "read -P 9 3M 300000",
        ],
    );
}

/// A qcow2 image whose backing file is beside it on the web server: the relative name
/// resolves against the image's URL, as qemu resolves it.
#[test]
fn a_backing_file_beside_the_image_is_found_on_the_server() {
    if !have_qemu_curl() {
        return;
    }
    let d = tmpdir();
    let web_dir = d.path().join("web");
    std::fs::create_dir(&web_dir).unwrap();
    let base = make_qcow2(&web_dir, "base.qcow2", "", "16M");
    qemu_io(
        d.path(),
        "qcow2",
        base.to_str().unwrap(),
        &["write -P 0x11 0 4M"],
    );
    let top = web_dir.join("top.qcow2");
    ok(Command::new("qemu-img")
        .args([
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
        ])
        .arg(&top));
    qemu_io(
        d.path(),
        "qcow2",
        top.to_str().unwrap(),
        &["write -P 0x22 1M 1M"],
    );
    let expect = d.path().join("expect.raw");
    ok(Command::new("qemu-img")
        .args(["convert", "-O", "raw"])
        .arg(&top)
        .arg(&expect));
    let web = Web::start(&web_dir, &[]);
    let url = web.url("top.qcow2");
    let ours = Server::unix(QNBD, &["-t", "-r", "-A", &url]);
    identical(&ours.uri(), &expect);
    let theirs = Server::unix("qemu-nbd", &["-t", "-r", "-A", &url]);
    let depth = |uri: &str| ok(Command::new("nbdinfo").args(["--map=qemu:allocation-depth", uri]));
    assert_eq!(map(&ours.uri()), map(&theirs.uri()));
    assert_eq!(depth(&ours.uri()), depth(&theirs.uri()));
}

#[test]
fn sequential_reads_are_served_from_the_read_ahead() {
    if !have_qemu_curl() {
        return;
    }
    let d = tmpdir();
    let (raw, _) = images(d.path());
    let web = Web::start(&raw, &[]);
    let s = Server::unix(QNBD, &["-t", "-r", "-f", "raw", &web.url("disk.raw")]);
    // 64 reads of 64 KiB in order: with 256 KiB read-ahead, one request per 320 KiB.
    let reads: Vec<String> = (0..64).map(|i| format!("read {} 64k", i * 65536)).collect();
    let reads: Vec<&str> = reads.iter().map(String::as_str).collect();
    read(&s.uri(), &reads);
    let gets = web.gets();
    assert!(gets <= 16, "{gets} requests for 4 MiB read in order");
    // Reads that continue none: each fetches only what it asks for (qemu fetches 256 KiB
    // more every time).
    // (11.5 MiB down to 4.5 MiB: past what the reads in order fetched.)
    let scattered: Vec<String> = (0..8)
        .map(|i| format!("read {}k 64k", 11776 - i * 1024))
        .collect();
    let scattered: Vec<&str> = scattered.iter().map(String::as_str).collect();
    read(&s.uri(), &scattered);
    let log = std::fs::read_to_string(&web.log).unwrap();
    let last: Vec<&str> = log
        .lines()
        .filter(|l| l.starts_with("GET"))
        .skip(gets)
        .collect();
    assert_eq!(last.len(), 8, "{last:?}");
    for l in &last {
        let range = l.split(' ').nth(2).unwrap().trim_start_matches("bytes=");
        let (a, b) = range.split_once('-').unwrap();
        let n = b.parse::<u64>().unwrap() - a.parse::<u64>().unwrap() + 1;
        assert_eq!(n, 65536, "{l}");
    }
    // `readahead=0`: one request per read.
    let before = web.gets();
    let opts = format!(
        "driver=raw,file.driver=http,file.url={},file.readahead=0",
        web.url("disk.raw")
    );
    let s = Server::unix(QNBD, &["-t", "-r", "--image-opts", &opts]);
    read(&s.uri(), &reads[..8]);
    assert_eq!(web.gets() - before, 8);
}

/// qemu-io's commands on a read-only export.
fn read(uri: &str, cmds: &[&str]) {
    let mut c = Command::new("qemu-io");
    c.args(["-r", "-f", "raw"]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    ok(c.arg(uri));
}

/// What `bin` prints when it refuses to serve `name`, without timings.
fn refusal(bin: &str, d: &Path, args: &[&str], env: &[(&str, &str)]) -> String {
    let sock = d.join("r.sock");
    let out = run(Command::new("timeout")
        .args(["20", bin, "-k", sock.to_str().unwrap()])
        .args(args)
        .envs(env.iter().copied()));
    assert_eq!(out.status.code(), Some(1), "{bin} {args:?}");
    let text = String::from_utf8_lossy(&out.stderr).replace("qemu-nbd:", "qnbd:");
    // curl says how long a connection took: "after 0 ms".
    let re_ms = |s: &str| {
        let mut out = String::new();
        let mut rest = s;
        while let Some(i) = rest.find(" after ") {
            out.push_str(&rest[..i + 7]);
            rest = rest[i + 7..].trim_start_matches(|c: char| c.is_ascii_digit());
            out.push('N');
        }
        out.push_str(rest);
        out
    };
    re_ms(text.trim_end())
}

#[test]
fn what_qemu_nbd_refuses_is_refused_in_its_words() {
    if !have_qemu_curl() {
        return;
    }
    let d = tmpdir();
    let (raw, _) = images(d.path());
    let plain = Web::start(&raw, &[]);
    let no_ranges = Web::start(&raw, &["--no-ranges"]);
    let no_length = Web::start(&raw, &["--no-length"]);
    let auth = Web::start(&raw, &["--auth", "u:p"]);
    let url = plain.url("disk.raw");
    let cases: Vec<Vec<String>> = vec![
        vec!["-f".into(), "raw".into(), url.clone()],
        vec![
            "-r".into(),
            "-f".into(),
            "raw".into(),
            no_ranges.url("disk.raw"),
        ],
        vec![
            "-r".into(),
            "-f".into(),
            "raw".into(),
            no_length.url("disk.raw"),
        ],
        vec!["-r".into(), "-f".into(), "raw".into(), auth.url("disk.raw")],
        vec![
            "-r".into(),
            "-f".into(),
            "raw".into(),
            "http://127.0.0.1:1/x".into(),
        ],
        vec![
            "-r".into(),
            "-f".into(),
            "raw".into(),
            "http://no.such.host.invalid/x".into(),
        ],
        vec![
            "-r".into(),
            "--image-opts".into(),
            format!("driver=https,url={url}"),
        ],
        vec!["-r".into(), "--image-opts".into(), "driver=http".into()],
        vec![
            "-r".into(),
            "--image-opts".into(),
            format!("driver=http,url={url},readahead=1000"),
        ],
        vec![
            "-r".into(),
            "--image-opts".into(),
            format!("driver=http,url={url},timeout=10001"),
        ],
        vec![
            "-r".into(),
            "--image-opts".into(),
            format!("driver=http,url={url},timeout=-1"),
        ],
        vec![
            "-r".into(),
            "--image-opts".into(),
            format!("driver=http,url={url},cookie=a,cookie-secret=s"),
        ],
        vec![
            "-r".into(),
            "--image-opts".into(),
            format!("driver=http,url={url},password-secret=nope"),
        ],
        vec![
            "-r".into(),
            "--image-opts".into(),
            format!("driver=qcow2,file.driver=http,file.url={url}"),
        ],
        vec![
            "-r".into(),
            "--image-opts".into(),
            format!("driver=raw,file.driver=https,file.url={url}"),
        ],
    ];
    for c in &cases {
        let args: Vec<&str> = c.iter().map(String::as_str).collect();
        assert_eq!(
            refusal(QNBD, d.path(), &args, &[]),
            refusal("qemu-nbd", d.path(), &args, &[]),
            "{args:?}"
        );
    }
}

#[test]
fn credentials_cookies_and_redirects_reach_the_file() {
    if !have_qemu_curl() {
        return;
    }
    let d = tmpdir();
    let (raw, _) = images(d.path());
    let auth = Web::start(&raw, &["--auth", "us er:p@ss"]);
    let cookie = Web::start(&raw, &["--cookie", "session=42"]);
    let host = |w: &Web| w.url("").trim_start_matches("http://").to_string();
    let cases = [
        // Credentials in the URL (escaped), through a redirect on the same host.
        vec![
            "-f".to_string(),
            "raw".into(),
            format!("http://us%20er:p%40ss@{}redirect/disk.raw", host(&auth)),
        ],
        vec![
            "--object".into(),
            "secret,id=pw,data=p@ss".into(),
            "--image-opts".into(),
            format!(
                "driver=raw,file.driver=http,file.url={},file.username=us er,file.password-secret=pw",
                auth.url("disk.raw")
            ),
        ],
        vec![
            "--image-opts".into(),
            format!("driver=http,url={},cookie=session=42", cookie.url("disk.raw")),
        ],
        vec![
            "--object".into(),
            "secret,id=c,data=session=42".into(),
            "--image-opts".into(),
            format!("driver=http,url={},cookie-secret=c", cookie.url("disk.raw")),
        ],
    ];
    for c in &cases {
        let mut args = vec!["-t", "-r"];
        args.extend(c.iter().map(String::as_str));
        let s = Server::unix(QNBD, &args);
        identical(&s.uri(), &raw);
        drop(s);
        let s = Server::unix("qemu-nbd", &args);
        identical(&s.uri(), &raw);
    }
    // A wrong password: refused as qemu-nbd refuses it.
    let bad = [
        "-r".to_string(),
        "-f".into(),
        "raw".into(),
        format!("http://us%20er:wrong@{}disk.raw", host(&auth)),
    ];
    let bad: Vec<&str> = bad.iter().map(String::as_str).collect();
    assert_eq!(
        refusal(QNBD, d.path(), &bad, &[]),
        refusal("qemu-nbd", d.path(), &bad, &[])
    );
}

#[test]
fn https_checks_the_certificate_unless_told_not_to() {
    if !have_qemu_curl() || !have("certtool") {
        return;
    }
    let d = tmpdir();
    let (raw, _) = images(d.path());
    let p = pki();
    let cert = p.server.join("server-cert.pem");
    let key = p.server.join("server-key.pem");
    let ca = p.server.join("ca-cert.pem");
    let web = Web::start(
        &raw,
        &["--tls", cert.to_str().unwrap(), key.to_str().unwrap()],
    );
    let url = web.url("disk.raw");
    // Trusted through the system's certificate file, as curl would be.
    let s = Server::unix_env(
        QNBD,
        &["-t", "-r", "-f", "raw", &url],
        &[("SSL_CERT_FILE", ca.to_str().unwrap())],
    );
    identical(&s.uri(), &raw);
    drop(s);
    // Not trusted: refused.
    let said = refusal(QNBD, d.path(), &["-r", "-f", "raw", &url], &[]);
    assert!(
        said.starts_with(&format!(
            "qnbd: Failed to blk_new_open '{url}': CURL: Error opening file: "
        )) && said.contains("certificate"),
        "{said}"
    );
    // sslverify=off, as qemu-nbd's.
    let opts = format!("driver=raw,file.driver=https,file.url={url},file.sslverify=off");
    for bin in [QNBD, "qemu-nbd"] {
        let s = Server::unix(bin, &["-t", "-r", "--image-opts", &opts]);
        identical(&s.uri(), &raw);
    }
    // The certificate must name the host: 127.0.0.2 is not in it.
    let web2 = Web::start(
        &raw,
        &[
            "--tls",
            cert.to_str().unwrap(),
            key.to_str().unwrap(),
            "--bind",
            "127.0.0.2",
        ],
    );
    let other = web2.url("disk.raw");
    let said = refusal(
        QNBD,
        d.path(),
        &["-r", "-f", "raw", &other],
        &[("SSL_CERT_FILE", ca.to_str().unwrap())],
    );
    assert!(said.contains("certificate"), "{said}");
}

#[test]
fn a_misbehaving_web_server_fails_reads_not_the_nbd_server() {
    if !have_qemu_curl() {
        return;
    }
    let d = tmpdir();
    let (raw, _) = images(d.path());
    for mode in [
        "short",
        "wrong-range",
        "full",
        "garbage",
        "close",
        "error",
        "slow",
    ] {
        let web = Web::start(&raw, &["--mode", mode]);
        let opts = format!(
            "driver=raw,file.driver=http,file.url={},file.timeout=1",
            web.url("disk.raw")
        );
        let s = Server::unix(QNBD, &["-t", "-r", "--image-opts", &opts]);
        let started = Instant::now();
        let out =
            run(Command::new("qemu-io").args(["-r", "-f", "raw", "-c", "read 1M 64k", &s.uri()]));
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(text.contains("Input/output error"), "{mode}: {text}");
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{mode}: the read took {:?}",
            started.elapsed()
        );
        // The server goes on serving.
        let size = ok(Command::new("nbdinfo").args(["--size", &s.uri()]));
        assert_eq!(size.trim(), (12u64 << 20).to_string(), "{mode}");
    }
}
