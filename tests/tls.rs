//! TLS: x509 and PSK servers against qemu's and libnbd's clients, `--tls-authz`, `-L` over
//! TLS against qemu-nbd, the plaintext refusals, and the errors for bad `--object`s. All
//! certificates are made here with certtool, PSK keys with psktool.

mod common;
use common::pki::*;
use common::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const CLIENT_DN: &str = "C=GB,ST=London,L=London,O=Example,CN=laptop.example.com";

fn have_all() -> bool {
    have("certtool") && have("qemu-img") && have("qemu-io") && have("qemu-nbd") && have("nbdinfo")
}

/// A server on 127.0.0.1 whose stderr is kept for the test to read.
struct Tls {
    child: Child,
    port: u16,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Tls {
    fn start(bin: &str, args: &[String]) -> Tls {
        let dir = tmpdir();
        let pid = dir.path().join("pid");
        let log = dir.path().join("stderr");
        let port = free_port();
        let child = Command::new(bin)
            .args(["-b", "127.0.0.1", "-p", &port.to_string(), "-t"])
            .arg(format!("--pid-file={}", pid.display()))
            .args(args)
            .stdin(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log"))
            .spawn()
            .expect("spawn server");
        let mut t = Tls {
            child,
            port,
            log,
            _dir: dir,
        };
        let start = Instant::now();
        while !std::fs::read_to_string(&pid).is_ok_and(|s| s.ends_with('\n')) {
            if let Ok(Some(st)) = t.child.try_wait() {
                panic!("{bin} exited: {st}: {}", t.stderr());
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "server not ready"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        t
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// stderr once it has `lines` lines (the server may log just after the client gave up).
    fn stderr_after(&self, lines: usize) -> String {
        let start = Instant::now();
        loop {
            let s = self.stderr();
            if s.lines().count() >= lines || start.elapsed() > Duration::from_secs(5) {
                return s;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// qemu's `--image-opts` for this server with client credentials `creds` (an id).
    fn opts(&self, creds: &str) -> String {
        format!(
            "driver=nbd,host=127.0.0.1,port={},tls-creds={creds}",
            self.port
        )
    }
}

impl Drop for Tls {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `bin` serving `img` (raw) with TLS credentials `creds` as `tls0`, plus `extra` options.
fn tls_server(bin: &str, creds: &str, extra: &[&str], img: &Path) -> Tls {
    let mut args = vec!["--object", creds, "--tls-creds", "tls0"];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["-f", "raw", img.to_str().unwrap()]);
    Tls::start(bin, &s(&args))
}

fn x509_server(dir: &Path, extra: &str) -> String {
    format!(
        "tls-creds-x509,id=tls0,endpoint=server,dir={},verify-peer=on{extra}",
        dir.display()
    )
}

fn x509_client(dir: &Path) -> String {
    format!(
        "tls-creds-x509,id=tls0,endpoint=client,dir={}",
        dir.display()
    )
}

fn patterned_image(dir: &Path) -> PathBuf {
    let data: Vec<u8> = (0..65536u32).map(|i| (i * 7 + 3) as u8).collect();
    make_raw(
        dir,
        "disk.img",
        4 << 20,
        &[(0, &data), (3 << 20, &[0xab; 4096])],
    )
}

/// `qemu-img info` through TLS with the given client creds; (success, stderr).
fn qemu_img_info(server: &Tls, creds_object: &str) -> (bool, String) {
    let out = run(Command::new("qemu-img").args([
        "info",
        "--object",
        creds_object,
        "--image-opts",
        &server.opts("tls0"),
    ]));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

#[test]
fn x509_server_serves_qemu_and_libnbd_clients() {
    if !have_all() || !have_nbdsh() {
        return;
    }
    let p = pki();
    let img = patterned_image(&p.root);
    let srv = tls_server(QNBD, &x509_server(&p.server, ""), &[], &img);
    // qemu-img: the export equals the file.
    let cmp = ok(Command::new("qemu-img").args([
        "compare",
        "--object",
        &x509_client(&p.client),
        "--image-opts",
        &srv.opts("tls0"),
        &format!("driver=raw,file.filename={}", img.display()),
    ]));
    assert!(cmp.contains("identical"), "{cmp}");
    // qemu-io: write, then read the same bytes back.
    let io = ok(Command::new("qemu-io").args([
        "--object",
        &x509_client(&p.client),
        "--image-opts",
        &srv.opts("tls0"),
        "-c",
        "write -P 0x5a 1M 64k",
        "-c",
        "read -P 0x5a 1M 64k",
    ]));
    assert!(
        !io.contains("fail") && !io.contains("Pattern verification failed"),
        "{io}"
    );
    let bytes = std::fs::read(&img).expect("read image");
    assert!(bytes[1 << 20..(1 << 20) + 65536].iter().all(|&b| b == 0x5a));
    // nbdinfo (libnbd, GnuTLS) with the same certificate directory.
    let uri = format!(
        "nbds://localhost:{}/?tls-certificates={}",
        srv.port,
        p.client.display()
    );
    let info = ok(Command::new("nbdinfo").arg(&uri));
    assert!(info.contains("with TLS"), "{info}");
    assert!(info.contains("export-size: 4194304"), "{info}");
    // nbdsh: TLS negotiated, and the bytes read equal the file's.
    let script = format!(
        "import nbd\nh = nbd.NBD()\nh.set_tls(nbd.TLS_REQUIRE)\nh.set_tls_certificates('{}')\nh.connect_uri('nbds://localhost:{}/')\nassert h.get_tls_negotiated()\nprint(h.pread(65536, 0).hex())\n",
        p.client.display(),
        srv.port
    );
    let got = ok(Command::new(PYTHON).args(["-c", &script]));
    let want: String = bytes[..65536].iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(got.trim(), want);
}

#[test]
fn verify_peer_refuses_missing_and_foreign_certificates() {
    if !have_all() {
        return;
    }
    let p = pki();
    let img = patterned_image(&p.root);
    let srv = Tls::start(
        QNBD,
        &s(&[
            "--object",
            &x509_server(&p.server, ""),
            "--tls-creds",
            "tls0",
            "-f",
            "raw",
            "-r",
            img.to_str().unwrap(),
        ]),
    );
    let (good, err) = qemu_img_info(&srv, &x509_client(&p.client));
    assert!(good, "{err}");
    let (no_cert, err) = qemu_img_info(&srv, &x509_client(&p.anonymous));
    assert!(!no_cert, "a client without a certificate got in");
    // What the client hears: see refused_clients_hear_what_qemu_nbd_clients_hear.
    assert!(!err.is_empty(), "refused without a word");
    let (foreign, _) = qemu_img_info(&srv, &x509_client(&p.foreign));
    assert!(!foreign, "a certificate from another CA got in");
    let log = srv.stderr_after(2);
    assert!(
        log.contains("option negotiation failed: Verify failed: No certificate was found."),
        "{log}"
    );
    // GnuTLS sends a client certificate only when its issuer is one the server named, so the
    // foreign one never leaves the client: the server sees no certificate again (as qemu-nbd).
    assert_eq!(log.matches("No certificate was found").count(), 2, "{log}");

    // verify-peer=off: no client certificate needed.
    let open = tls_server(
        QNBD,
        &format!(
            "tls-creds-x509,id=tls0,endpoint=server,dir={},verify-peer=off",
            p.server.display()
        ),
        &["-r"],
        &img,
    );
    let (anon, err) = qemu_img_info(&open, &x509_client(&p.anonymous));
    assert!(anon, "{err}");
}

#[test]
fn tls_authz_allows_one_dn_and_refuses_another() {
    if !have_all() {
        return;
    }
    let p = pki();
    let img = patterned_image(&p.root);
    // The man page's form: commas inside the identity doubled.
    let simple = format!(
        "authz-simple,id=auth0,identity={}",
        CLIENT_DN.replace(',', ",,")
    );
    let list = r#"{"qom-type":"authz-list","id":"auth0","policy":"deny","rules":[{"match":"*CN=laptop.example.com","policy":"allow","format":"glob"}]}"#.to_string();
    let acl = p.root.join("acl.json");
    std::fs::write(
        &acl,
        format!(r#"{{"policy":"deny","rules":[{{"match":"{CLIENT_DN}","policy":"allow","format":"exact"}}]}}"#),
    )
    .expect("acl");
    let listfile = format!(
        "authz-listfile,id=auth0,filename={},refresh=on",
        acl.display()
    );
    for authz in [simple, list, listfile] {
        let srv = tls_server(
            QNBD,
            &x509_server(&p.server, ""),
            &["--object", &authz, "--tls-authz", "auth0", "-r"],
            &img,
        );
        let (allowed, err) = qemu_img_info(&srv, &x509_client(&p.client));
        assert!(allowed, "{authz}: {err}");
        let (refused, err) = qemu_img_info(&srv, &x509_client(&p.intruder));
        assert!(!refused, "{authz}: the intruder got in");
        assert!(!err.is_empty(), "refused without a word");
        let log = srv.stderr_after(1);
        assert!(
            log.contains("TLS x509 authz check for O=Elsewhere,CN=intruder.example.com is denied"),
            "{authz}: {log}"
        );
    }
    // An authz id with no object behind it refuses every client, as qemu-nbd does.
    let srv = tls_server(
        QNBD,
        &x509_server(&p.server, ""),
        &["--tls-authz", "nosuch", "-r"],
        &img,
    );
    let (allowed, _) = qemu_img_info(&srv, &x509_client(&p.client));
    assert!(!allowed, "no authz object, yet the client got in");
    let log = srv.stderr_after(1);
    assert!(
        log.contains("option negotiation failed: Cannot find QAuthZ object ID nosuch"),
        "{log}"
    );
    // qemu-nbd computes the same DN: its authz-simple admits our client with this string.
    let srv = tls_server(
        "qemu-nbd",
        &x509_server(&p.server, ""),
        &[
            "--object",
            &format!(
                "authz-simple,id=auth0,identity={}",
                CLIENT_DN.replace(',', ",,")
            ),
            "--tls-authz",
            "auth0",
            "-r",
        ],
        &img,
    );
    let (allowed, err) = qemu_img_info(&srv, &x509_client(&p.client));
    assert!(allowed, "qemu-nbd refused the DN qnbd uses: {err}");
}

/// A client refused after the handshake (no certificate under verify-peer=on, a DN
/// `--tls-authz` denies) hears from qnbd what it hears from qemu-nbd: GnuTLS' server completes
/// the handshake, checks the client, and closes without an alert, so qemu's client reports
/// a non-properly terminated connection (a fatal alert would read "A TLS fatal alert has been
/// received"). In TLS 1.3 and in 1.2.
#[test]
fn refused_clients_hear_what_qemu_nbd_clients_hear() {
    if !have_all() {
        return;
    }
    let p = pki();
    let img = patterned_image(&p.root);
    let authz = format!(
        "authz-simple,id=auth0,identity={}",
        CLIENT_DN.replace(',', ",,")
    );
    const CLOSED: &str = "Failed to read option reply: Cannot read from TLS channel: The TLS connection was non-properly terminated.";
    for prio in ["", ",priority=NORMAL:-VERS-TLS1.3"] {
        // (server, why the client is refused, what qemu-img said after "Could not open '…': ")
        let mut heard = Vec::new();
        for server in ["qemu-nbd", QNBD] {
            let srv = tls_server(
                server,
                &x509_server(&p.server, prio),
                &["--object", &authz, "--tls-authz", "auth0", "-r"],
                &img,
            );
            let (allowed, err) = qemu_img_info(&srv, &x509_client(&p.client));
            assert!(allowed, "{server}{prio}: {err}");
            for (why, dir) in [
                ("no certificate", &p.anonymous),
                ("a denied DN", &p.intruder),
            ] {
                let (allowed, err) = qemu_img_info(&srv, &x509_client(dir));
                assert!(!allowed, "{server}{prio}: {why} got in");
                let msg = err
                    .split_once("': ")
                    .map_or(err.as_str(), |(_, m)| m)
                    .trim_end()
                    .to_string();
                heard.push((why, msg));
            }
            let log = srv.stderr_after(2);
            assert!(
                log.contains("option negotiation failed: Verify failed: No certificate was found."),
                "{server}{prio}: {log}"
            );
            assert!(
                log.contains(
                    "option negotiation failed: TLS x509 authz check for O=Elsewhere,CN=intruder.example.com is denied"
                ),
                "{server}{prio}: {log}"
            );
        }
        let (theirs, ours) = heard.split_at(2);
        assert_eq!(ours, theirs, "{prio}: qnbd's refusals read differently");
        for (why, msg) in ours {
            assert_eq!(msg, CLOSED, "{prio}: {why}");
        }
    }
}

fn psk_dir(root: &Path, name: &str, user: &str) -> PathBuf {
    let d = root.join(name);
    std::fs::create_dir_all(&d).expect("mkdir");
    ok(Command::new("psktool")
        .args(["-u", user, "-p"])
        .arg(d.join("keys.psk")));
    d
}

#[test]
fn psk_server_serves_qemu_client_and_refuses_a_wrong_key() {
    if !have_all() || !have("psktool") {
        return;
    }
    let tmp = tmpdir();
    let root = tmp.path();
    let img = patterned_image(root);
    let keys = psk_dir(root, "psk", "alice");
    let wrong = psk_dir(root, "wrong", "alice");
    let srv = tls_server(
        QNBD,
        &format!(
            "tls-creds-psk,id=tls0,endpoint=server,dir={}",
            keys.display()
        ),
        &[],
        &img,
    );
    let client = |dir: &Path| {
        format!(
            "tls-creds-psk,id=tls0,endpoint=client,dir={},username=alice",
            dir.display()
        )
    };
    let cmp = ok(Command::new("qemu-img").args([
        "compare",
        "--object",
        &client(&keys),
        "--image-opts",
        &srv.opts("tls0"),
        &format!("driver=raw,file.filename={}", img.display()),
    ]));
    assert!(cmp.contains("identical"), "{cmp}");
    ok(Command::new("qemu-io").args([
        "--object",
        &client(&keys),
        "--image-opts",
        &srv.opts("tls0"),
        "-c",
        "write -P 0x33 2M 4k",
    ]));
    let bytes = std::fs::read(&img).expect("read");
    assert!(bytes[2 << 20..(2 << 20) + 4096].iter().all(|&b| b == 0x33));
    let (ok_wrong, err) = qemu_img_info(&srv, &client(&wrong));
    assert!(!ok_wrong, "a wrong key got in");
    assert!(!err.is_empty(), "refused without a word");

    // libnbd's PSK support too.
    let uri = format!(
        "nbds://alice@127.0.0.1:{}/?tls-psk-file={}",
        srv.port,
        keys.join("keys.psk").display()
    );
    let info = ok(Command::new("nbdinfo").arg(&uri));
    assert!(info.contains("with TLS"), "{info}");
}

#[test]
fn list_over_tls_prints_what_qemu_nbd_prints() {
    if !have_all() || !have("psktool") {
        return;
    }
    let p = pki();
    let img = patterned_image(&p.root);
    let keys = psk_dir(&p.root, "psk", "alice");
    // x509 servers (qemu-nbd's and ours), listed by both.
    for bin in ["qemu-nbd", QNBD] {
        let srv = tls_server(
            bin,
            &x509_server(&p.server, ""),
            &["-x", "exp", "-D", "a disk", "-r"],
            &img,
        );
        let list = |lister: &str, extra: &[&str]| {
            let out = run(Command::new(lister)
                .args(["-L", "-b", "127.0.0.1", "-p", &srv.port.to_string()])
                .args(["--object", &x509_client(&p.client), "--tls-creds", "tls0"])
                .args(extra));
            (
                out.status.code(),
                String::from_utf8_lossy(&out.stdout).into_owned(),
                String::from_utf8_lossy(&out.stderr).replace("qemu-nbd:", "qnbd:"),
            )
        };
        let theirs = list("qemu-nbd", &[]);
        let ours = list(QNBD, &[]);
        assert_eq!(theirs.0, Some(0), "{bin}: {}", theirs.2);
        assert!(theirs.1.contains("export: 'exp'"), "{}", theirs.1);
        assert_eq!(ours, theirs, "{bin}: qnbd -L differs from qemu-nbd -L");
        // A name the certificate does not carry.
        let theirs = list("qemu-nbd", &["--tls-hostname", "wrong.example"]);
        let ours = list(QNBD, &["--tls-hostname", "wrong.example"]);
        assert_eq!(ours, theirs);
        assert!(ours
            .2
            .contains("Certificate does not match the hostname wrong.example"));
    }
    // The man page's PSK example: a PSK server on a Unix socket (qemu-nbd's, then ours),
    // listed by qemu-nbd and by qnbd.
    for server in ["qemu-nbd", QNBD] {
        let dir = tmpdir();
        let sock = dir.path().join("psk.sock");
        let pid = dir.path().join("pid");
        let mut qemu = Command::new(server)
            .args(["-t", "-k"])
            .arg(&sock)
            .arg(format!("--pid-file={}", pid.display()))
            .args([
                "--object",
                &format!(
                    "tls-creds-psk,id=tls0,endpoint=server,dir={}",
                    keys.display()
                ),
                "--tls-creds",
                "tls0",
                "-x",
                "psk-export",
                "-r",
                "-f",
                "raw",
            ])
            .arg(&img)
            .stdin(Stdio::null())
            .spawn()
            .expect("qemu-nbd");
        let start = Instant::now();
        while !std::fs::read_to_string(&pid).is_ok_and(|s| s.ends_with('\n')) {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "qemu-nbd not ready"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let list = |lister: &str, user: &str| {
            let out = run(Command::new(lister).arg("-L").arg("-k").arg(&sock).args([
                "--object",
                &format!(
                    "tls-creds-psk,id=tls0,endpoint=client,dir={},username={user}",
                    keys.display()
                ),
                "--tls-creds",
                "tls0",
            ]));
            (
                out.status.code(),
                String::from_utf8_lossy(&out.stdout).into_owned(),
                String::from_utf8_lossy(&out.stderr).replace("qemu-nbd:", "qnbd:"),
            )
        };
        let theirs = list("qemu-nbd", "alice");
        assert!(theirs.1.contains("psk-export"), "{theirs:?}");
        assert_eq!(list(QNBD, "alice"), theirs);
        // A user the key file does not have: refused before connecting, as qemu-nbd does.
        assert_eq!(list(QNBD, "bob"), list("qemu-nbd", "bob"));
        let _ = qemu.kill();
        let _ = qemu.wait();
    }
}

/// `-L` over a Unix socket with x509 credentials: qemu 10 checks the server certificate
/// against `--tls-hostname` and, without one, refuses the server ("No hostname for certificate
/// validation") once the chain has passed. Against qemu-nbd's server and ours, listed by
/// qemu-nbd and by qnbd: no name refused, the right name accepted, a wrong name refused.
#[test]
fn list_over_a_unix_socket_checks_x509_against_tls_hostname() {
    if !have_all() {
        return;
    }
    let p = pki();
    let img = patterned_image(&p.root);
    let img = img.to_str().unwrap();
    // The server asks for no client certificate, so what the client says depends on its own
    // checks only (a server refusing the foreign client below could otherwise speak first).
    let creds = format!(
        "tls-creds-x509,id=tls0,endpoint=server,dir={},verify-peer=off",
        p.server.display()
    );
    for server in ["qemu-nbd", QNBD] {
        let srv = Server::unix(
            server,
            &[
                "--object",
                &creds,
                "--tls-creds",
                "tls0",
                "-t",
                "-x",
                "exp",
                "-r",
                "-f",
                "raw",
                img,
            ],
        );
        let sock = srv.socket.clone().expect("socket");
        let list = |lister: &str, client: &str, extra: &[&str]| {
            let out = run(Command::new(lister)
                .arg("-L")
                .arg("-k")
                .arg(&sock)
                .args(["--object", client, "--tls-creds", "tls0"])
                .args(extra));
            (
                out.status.code(),
                String::from_utf8_lossy(&out.stdout).into_owned(),
                String::from_utf8_lossy(&out.stderr)
                    .replace("qemu-nbd:", "PROG:")
                    .replace("qnbd:", "PROG:"),
            )
        };
        let client = x509_client(&p.client);
        for lister in ["qemu-nbd", QNBD] {
            let what = format!("{server} listed by {lister}");
            // No --tls-hostname: refused, with qemu's words and nothing listed.
            let none = list(lister, &client, &[]);
            assert_eq!(
                none,
                (
                    Some(1),
                    String::new(),
                    "PROG: No hostname for certificate validation\n".to_string()
                ),
                "{what}"
            );
            // The name the certificate carries: listed.
            let good = list(lister, &client, &["--tls-hostname", "localhost"]);
            assert_eq!(good.0, Some(0), "{what}: {}", good.2);
            assert!(good.1.contains("export: 'exp'"), "{what}: {}", good.1);
            // Another name: refused.
            let wrong = list(lister, &client, &["--tls-hostname=wrong.example"]);
            assert_eq!(
                wrong,
                (
                    Some(1),
                    String::new(),
                    "PROG: Certificate does not match the hostname wrong.example\n".to_string()
                ),
                "{what}"
            );
        }
        assert_eq!(
            list(QNBD, &client, &["--tls-hostname", "localhost"]),
            list("qemu-nbd", &client, &["--tls-hostname", "localhost"]),
            "{server}"
        );
        // The chain is checked before the name: a client trusting another CA hears that first.
        let foreign = x509_client(&p.foreign);
        let theirs = list("qemu-nbd", &foreign, &[]);
        assert!(
            theirs
                .2
                .contains("The certificate hasn't got a known issuer"),
            "{server}: {theirs:?}"
        );
        assert_eq!(list(QNBD, &foreign, &[]), theirs, "{server}");
        // verify-peer=off checks no certificate, so it needs no name.
        let unchecked = format!("{client},verify-peer=off");
        let theirs = list("qemu-nbd", &unchecked, &[]);
        assert_eq!(theirs.0, Some(0), "{server}: {theirs:?}");
        assert_eq!(list(QNBD, &unchecked, &[]), theirs, "{server}");
    }
    // Anonymous credentials have no certificate and so no name either (PSK: see
    // list_over_tls_prints_what_qemu_nbd_prints).
    for server in ["qemu-nbd", QNBD] {
        let srv = Server::unix(
            server,
            &[
                "--object",
                "tls-creds-anon,id=tls0,endpoint=server",
                "--tls-creds",
                "tls0",
                "-t",
                "-x",
                "anon",
                "-r",
                "-f",
                "raw",
                img,
            ],
        );
        let list = |lister: &str| {
            ok(Command::new(lister)
                .arg("-L")
                .arg("-k")
                .arg(srv.socket.as_ref().expect("socket"))
                .args([
                    "--object",
                    "tls-creds-anon,id=tls0,endpoint=client",
                    "--tls-creds",
                    "tls0",
                ]))
        };
        let theirs = list("qemu-nbd");
        assert!(theirs.contains("export: 'anon'"), "{server}: {theirs}");
        assert_eq!(list(QNBD), theirs, "{server}");
    }
}

#[test]
fn plaintext_clients_get_tls_required_and_no_data() {
    if !have_all() || !have_nbdsh() {
        return;
    }
    let p = pki();
    let img = patterned_image(&p.root);
    let srv = tls_server(QNBD, &x509_server(&p.server, ""), &[], &img);
    // libnbd in option mode: every option but STARTTLS is refused with TLS_REQD.
    let script = format!(
        r#"
import nbd
h = nbd.NBD()
h.set_opt_mode(True)
h.set_tls(nbd.TLS_DISABLE)
h.connect_tcp('127.0.0.1', '{port}')
for name, call in [('list', lambda: h.opt_list(lambda n, d: 0)),
                   ('info', lambda: h.opt_info()),
                   ('go', lambda: h.opt_go())]:
    try:
        r = call()
        raise AssertionError(name + ' succeeded before TLS')
    except nbd.Error as e:
        assert 'TLS' in str(e) or 'not permitted' in str(e) or e.errno is not None, str(e)
print('refused')
"#,
        port = srv.port
    );
    let out = ok(Command::new(PYTHON).args(["-c", &script]));
    assert_eq!(out.trim(), "refused");

    // Raw protocol: the exact error text, and EXPORT_NAME ends the connection with no data.
    let script = format!(
        r#"
import socket, struct
def conn():
    s = socket.create_connection(('127.0.0.1', {port}))
    g = s.recv(18, socket.MSG_WAITALL)
    assert g[:8] == b'NBDMAGIC', g
    s.sendall(struct.pack('>I', 1))
    return s
def opt(s, o, data=b''):
    s.sendall(struct.pack('>QII', 0x49484156454F5054, o, len(data)) + data)
s = conn()
opt(s, 3)
h = s.recv(20, socket.MSG_WAITALL)
magic, o, rep, ln = struct.unpack('>QIII', h)
text = s.recv(ln, socket.MSG_WAITALL)
print(hex(rep), text.decode())
opt(s, 1, b'')
rest = b''
while True:
    b = s.recv(4096)
    if not b:
        break
    rest += b
print('after EXPORT_NAME:', len(rest))
"#,
        port = srv.port
    );
    let out = ok(Command::new(PYTHON).args(["-c", &script]));
    assert!(
        out.contains("0x80000005 Option 0x3 not permitted before TLS"),
        "{out}"
    );
    assert!(out.contains("after EXPORT_NAME: 0"), "{out}");
}

#[test]
fn bad_objects_and_credentials_fail_like_qemu_nbd() {
    if !have("qemu-nbd") || !have("certtool") {
        return;
    }
    let tmp = tmpdir();
    let d = tmp.path();
    let img = make_raw(d, "d.img", 1 << 20, &[]);
    let locked = d.join("locked");
    std::fs::create_dir_all(&locked).expect("mkdir");
    let cases: Vec<Vec<String>> = vec![
        s(&["--object", "foo,id=x"]),
        s(&[
            "--object",
            "tls-creds-x509,endpoint=server,dir=/nonexistent",
        ]),
        s(&["--object", "tls-creds-x509,id=t,endpoint=sideways,dir=x"]),
        s(&[
            "--object",
            "tls-creds-x509,id=t,endpoint=server,dir=x,verify-peer=maybe",
        ]),
        s(&[
            "--object",
            "tls-creds-x509,id=t,endpoint=server,dir=/nonexistent",
            "--tls-creds",
            "t",
        ]),
        s(&[
            "--object",
            &format!(
                "tls-creds-x509,id=t,endpoint=server,dir={}",
                locked.display()
            ),
            "--tls-creds",
            "t",
        ]),
        s(&[
            "--object",
            "tls-creds-psk,id=t,endpoint=server,dir=/nonexistent",
            "--tls-creds",
            "t",
        ]),
        s(&[
            "--object",
            "tls-creds-x509,id=t,endpoint=server,dir=/etc/passwd",
            "--tls-creds",
            "t",
        ]),
        s(&[
            "--object",
            "tls-creds-x509,id=t,endpoint=server",
            "--tls-creds",
            "t",
        ]),
        s(&["--object", "secret,id=s0", "-r"]),
        s(&["--object", "secret,id=s0,file=/nonexistent", "-r"]),
        s(&["--object", "secret,id=s0,data=x", "--tls-creds", "s0"]),
        s(&["--tls-creds", "nope"]),
        s(&["--object", "authz-simple,id=a0", "-r"]),
        s(&["--object", "authz-simple,id=a0,identity=x,junk"]),
        s(&[
            "--object",
            "authz-simple,id=a0,identity=x",
            "--object",
            "authz-simple,id=a0,identity=y",
        ]),
        s(&["--object", r#"{"qom-type":"secret""#]),
        s(&[
            "--object",
            r#"{"qom-type":"tls-creds-x509","id":"t","dir":5}"#,
        ]),
        s(&[
            "--object",
            r#"{"qom-type":"authz-list","id":"a","rules":[{"policy":"allow"}]}"#,
        ]),
        s(&["--tls-authz", "a0"]),
    ];
    for args in cases {
        let outs: Vec<(Option<i32>, String)> = ["qemu-nbd", QNBD]
            .iter()
            .map(|bin| {
                let out = run(Command::new(bin)
                    .args(&args)
                    .args(["-f", "raw"])
                    .arg(&img)
                    .stdin(Stdio::null()));
                let err = String::from_utf8_lossy(&out.stderr)
                    .replace("qemu-nbd:", "qnbd:")
                    .lines()
                    .next()
                    .unwrap_or("")
                    .to_string();
                (out.status.code(), err)
            })
            .collect();
        assert_eq!(outs[1], outs[0], "{args:?}");
        assert_eq!(outs[1].0, Some(1), "{args:?}");
    }
}

#[test]
fn encrypted_server_key_needs_its_password() {
    if !have_all() {
        return;
    }
    let p = pki();
    let img = patterned_image(&p.root);
    // The server's key again, encrypted, with a certificate for it.
    let enc = p.root.join("encrypted");
    std::fs::create_dir_all(&enc).expect("mkdir");
    std::fs::copy(p.server.join("ca-cert.pem"), enc.join("ca-cert.pem")).expect("copy");
    certtool(
        &enc,
        &[
            "--generate-privkey",
            "--password",
            "s3cret",
            "--outfile",
            "server-key.pem",
        ],
    );
    let info = template(
        &enc,
        "info",
        "cn = localhost\ndns_name = localhost\nip_address = 127.0.0.1\ntls_www_server\nencryption_key\nsigning_key\n",
    );
    let ca = p.root.join("ca");
    certtool(
        &enc,
        &[
            "--generate-certificate",
            "--load-ca-privkey",
            ca.join("ca-key.pem").to_str().unwrap(),
            "--load-ca-certificate",
            ca.join("ca-cert.pem").to_str().unwrap(),
            "--load-privkey",
            "server-key.pem",
            "--password",
            "s3cret",
            "--template",
            &info,
            "--outfile",
            "server-cert.pem",
        ],
    );
    let creds = format!(
        "tls-creds-x509,id=tls0,endpoint=server,dir={},passwordid=sec0",
        enc.display()
    );
    let srv = Tls::start(
        QNBD,
        &s(&[
            "--object",
            "secret,id=sec0,data=s3cret",
            "--object",
            &creds,
            "--tls-creds",
            "tls0",
            "-r",
            "-f",
            "raw",
            img.to_str().unwrap(),
        ]),
    );
    let (good, err) = qemu_img_info(&srv, &x509_client(&p.client));
    assert!(good, "{err}");
    drop(srv);
    // A wrong password, and none: the same refusal as qemu-nbd's.
    for secret in ["secret,id=sec0,data=wrong", "secret,id=other,data=x"] {
        let creds = if secret.contains("other") {
            creds.replace(",passwordid=sec0", "")
        } else {
            creds.clone()
        };
        let outs: Vec<(Option<i32>, String)> = ["qemu-nbd", QNBD]
            .iter()
            .map(|bin| {
                let out = run(Command::new(bin)
                    .args([
                        "--object",
                        secret,
                        "--object",
                        &creds,
                        "--tls-creds",
                        "tls0",
                    ])
                    .args(["-r", "-f", "raw"])
                    .arg(&img)
                    .stdin(Stdio::null()));
                (
                    out.status.code(),
                    String::from_utf8_lossy(&out.stderr).replace("qemu-nbd:", "qnbd:"),
                )
            })
            .collect();
        assert_eq!(outs[1], outs[0], "{secret}");
        assert!(outs[1].1.contains("Decryption has failed."), "{outs:?}");
    }
}

#[test]
fn psk_authz_checks_the_username_in_tls_1_3_and_1_2() {
    if !have_all() || !have("psktool") {
        return;
    }
    let tmp = tmpdir();
    let root = tmp.path();
    let img = patterned_image(root);
    let keys = psk_dir(root, "psk", "alice");
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(keys.join("keys.psk"))
        .expect("keys");
    std::io::Write::write_all(&mut f, b"mallory:00112233445566778899aabbccddeeff\n")
        .expect("append");
    let srv = tls_server(
        QNBD,
        &format!(
            "tls-creds-psk,id=tls0,endpoint=server,dir={}",
            keys.display()
        ),
        &[
            "--object",
            "authz-simple,id=auth0,identity=alice",
            "--tls-authz",
            "auth0",
            "-r",
        ],
        &img,
    );
    // qemu's own PSK priority, and one limited to TLS 1.2 ((EC)DHE-PSK).
    for priority in ["", ",priority=NORMAL:-VERS-TLS1.3:+ECDHE-PSK:+DHE-PSK:+PSK"] {
        let client = |user: &str| {
            format!(
                "tls-creds-psk,id=tls0,endpoint=client,dir={},username={user}{priority}",
                keys.display()
            )
        };
        let (alice, err) = qemu_img_info(&srv, &client("alice"));
        assert!(alice, "{priority}: {err}");
        let (mallory, _) = qemu_img_info(&srv, &client("mallory"));
        assert!(!mallory, "{priority}: mallory got in");
    }
    let log = srv.stderr_after(2);
    assert_eq!(
        log.matches("TLS PSK authz check for mallory is denied")
            .count(),
        2,
        "{log}"
    );
}

#[test]
fn anonymous_tls_interoperates_both_ways() {
    if !have_all() {
        return;
    }
    let tmp = tmpdir();
    let img = patterned_image(tmp.path());
    let anon = |end: &str| format!("tls-creds-anon,id=tls0,endpoint={end}");
    for server in [QNBD, "qemu-nbd"] {
        let srv = tls_server(server, &anon("server"), &["-x", "anon", "-r"], &img);
        let cmp = ok(Command::new("qemu-img").args([
            "compare",
            "--object",
            &anon("client"),
            "--image-opts",
            &format!("{},export=anon", srv.opts("tls0")),
            &format!("driver=raw,file.filename={}", img.display()),
        ]));
        assert!(cmp.contains("identical"), "{server}: {cmp}");
        let list = |bin: &str| {
            ok(Command::new(bin)
                .args(["-L", "-b", "127.0.0.1", "-p", &srv.port.to_string()])
                .args(["--object", &anon("client"), "--tls-creds", "tls0"]))
        };
        assert_eq!(list(QNBD), list("qemu-nbd"), "{server}");
    }
}

#[test]
fn list_with_tls_against_a_plain_server_is_denied_like_qemu_nbd() {
    if !have_all() {
        return;
    }
    let p = pki();
    let img = patterned_image(&p.root);
    let srv = Tls::start(QNBD, &s(&["-r", "-f", "raw", img.to_str().unwrap()]));
    let list = |bin: &str| {
        let out = run(Command::new(bin)
            .args(["-L", "-b", "127.0.0.1", "-p", &srv.port.to_string()])
            .args(["--object", &x509_client(&p.client), "--tls-creds", "tls0"]));
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).replace("qemu-nbd:", "qnbd:"),
        )
    };
    let theirs = list("qemu-nbd");
    assert!(
        theirs
            .1
            .contains("Denied by server for option 5 (starttls)"),
        "{theirs:?}"
    );
    assert_eq!(list(QNBD), theirs);
}

#[test]
fn certificate_sanity_checks_match_qemu_nbd() {
    if !have_all() {
        return;
    }
    let p = pki();
    let img = patterned_image(&p.root);
    let dir = |name: &str, files: &[(&Path, &str)]| {
        let d = p.root.join(name);
        std::fs::create_dir_all(&d).expect("mkdir");
        for (from, to) in files {
            std::fs::copy(from, d.join(to)).expect("copy");
        }
        d
    };
    let ca = p.server.join("ca-cert.pem");
    let cert = p.server.join("server-cert.pem");
    let key = p.server.join("server-key.pem");
    let junk = p.root.join("junk.pem");
    std::fs::write(&junk, "not a certificate\n").expect("write");
    let other_ca = p.root.join("other-ca").join("ca-cert.pem");
    let cases = [
        // A leaf certificate where the CA should be.
        dir(
            "not-a-ca",
            &[
                (&p.client.join("client-cert.pem"), "ca-cert.pem"),
                (&cert, "server-cert.pem"),
                (&key, "server-key.pem"),
            ],
        ),
        dir(
            "junk-ca",
            &[
                (&junk, "ca-cert.pem"),
                (&cert, "server-cert.pem"),
                (&key, "server-key.pem"),
            ],
        ),
        // Our certificate is not signed by the CA in the directory.
        dir(
            "wrong-ca",
            &[
                (&other_ca, "ca-cert.pem"),
                (&cert, "server-cert.pem"),
                (&key, "server-key.pem"),
            ],
        ),
        dir(
            "good",
            &[
                (&ca, "ca-cert.pem"),
                (&cert, "server-cert.pem"),
                (&key, "server-key.pem"),
            ],
        ),
    ];
    for d in &cases {
        let outs: Vec<(Option<i32>, String)> = ["qemu-nbd", QNBD]
            .iter()
            .map(|bin| {
                let mut child = Command::new(bin)
                    .args([
                        "--object",
                        &format!("tls-creds-x509,id=t,endpoint=server,dir={}", d.display()),
                    ])
                    .args(["--tls-creds", "t", "-r", "-f", "raw", "-k"])
                    .arg(p.root.join(format!("{}.sock", bin.len())))
                    .arg(&img)
                    .stdin(Stdio::null())
                    .stderr(Stdio::piped())
                    .spawn()
                    .expect("spawn");
                // A good directory starts a server: stop it after a moment.
                std::thread::sleep(Duration::from_millis(700));
                let _ = child.kill();
                let out = child.wait_with_output().expect("wait");
                (
                    out.status.code(),
                    String::from_utf8_lossy(&out.stderr).replace("qemu-nbd:", "qnbd:"),
                )
            })
            .collect();
        assert_eq!(outs[1], outs[0], "{}", d.display());
    }
}

#[test]
fn garbage_after_starttls_drops_only_that_client() {
    if !have_all() {
        return;
    }
    let p = pki();
    let img = patterned_image(&p.root);
    let srv = Tls::start(
        QNBD,
        &s(&[
            "--object",
            &format!(
                "tls-creds-x509,id=tls0,endpoint=server,dir={},verify-peer=off",
                p.server.display()
            ),
            "--tls-creds",
            "tls0",
            "--handshake-limit",
            "3",
            "-r",
            "-f",
            "raw",
            img.to_str().unwrap(),
        ]),
    );
    // Random bytes instead of a ClientHello, a truncated ClientHello, and silence: each
    // client is dropped (silence at the handshake limit), and the server goes on.
    let script = format!(
        r#"
import random, socket, struct, time
def starttls():
    s = socket.create_connection(('127.0.0.1', {port}))
    s.settimeout(10)
    assert s.recv(18, socket.MSG_WAITALL)[:8] == b'NBDMAGIC'
    s.sendall(struct.pack('>I', 1))
    s.sendall(struct.pack('>QII', 0x49484156454F5054, 5, 0))
    h = s.recv(20, socket.MSG_WAITALL)
    assert struct.unpack('>QIII', h)[2] == 1, h
    return s
r = random.Random(7)
for payload in [bytes(r.randrange(256) for _ in range(3000)), b'\x16\x03\x01\x02\x00\x01\x00\x01\xfc', b'']:
    s = starttls()
    t0 = time.time()
    if payload:
        s.sendall(payload)
    while True:
        try:
            if not s.recv(4096):
                break
        except ConnectionResetError:
            break
    assert time.time() - t0 < 8, 'not dropped'
    s.close()
print('ok')
"#,
        port = srv.port
    );
    let out = ok(Command::new(PYTHON).args(["-c", &script]));
    assert_eq!(out.trim(), "ok");
    let (good, err) = qemu_img_info(&srv, &x509_client(&p.anonymous));
    assert!(good, "the server stopped serving after bad clients: {err}");
}

/// The concurrent verifier (`tests/nbdsh/verify.py`: 8 libnbd connections, mixed writes,
/// zeroes, trims, flushes and reads in flight together, every acknowledged write read back)
/// through a TLS session on each connection: the session is shared by the threads that read
/// requests and write replies, so this is what finds a record sent out of order or a
/// plaintext byte lost between them.
fn verify_over_tls(creds: &str, uri_query: &str, user: &str) {
    let d = tmpdir();
    let img = make_raw(d.path(), "v.img", 64 << 20, &[]);
    let mut srv = Server::tcp(
        QNBD,
        &[
            "--object",
            creds,
            "--tls-creds",
            "tls0",
            "-t",
            "-e",
            "0",
            "-f",
            "raw",
            img.to_str().unwrap(),
        ],
    );
    let port = srv
        .uri()
        .rsplit(':')
        .next()
        .unwrap()
        .trim_end_matches('/')
        .to_string();
    let uri = format!("nbds://{user}127.0.0.1:{port}/?{uri_query}");
    let out = nbdsh_script(
        "verify.py",
        &uri,
        &[
            "--conns",
            "8",
            "--writes",
            "6000",
            "--seed",
            "11",
            "--max-len",
            "1M",
        ],
    );
    eprintln!("{uri}: {}", out.trim());
    assert!(out.contains(" 0 lost"), "{out}");
    srv.terminate().expect("server exits on SIGTERM");
}

#[test]
fn verifier_over_x509_loses_nothing() {
    if !have_all() || !have_nbdsh() {
        return;
    }
    let p = pki();
    verify_over_tls(
        &x509_server(&p.server, ""),
        &format!("tls-certificates={}", p.client.display()),
        "",
    );
}

#[test]
fn verifier_over_psk_loses_nothing() {
    if !have_all() || !have("psktool") || !have_nbdsh() {
        return;
    }
    let tmp = tmpdir();
    let keys = psk_dir(tmp.path(), "psk", "alice");
    verify_over_tls(
        &format!(
            "tls-creds-psk,id=tls0,endpoint=server,dir={}",
            keys.display()
        ),
        &format!("tls-psk-file={}", keys.join("keys.psk").display()),
        "alice@",
    );
}

/// What clients and the server say of each refused session, side by side with qemu-nbd
/// (qemu's iotest 233 compares both): clients that give up on the server after the handshake
/// (a name its certificate does not carry; a CA that did not sign it, whose client also
/// keeps its own certificate to itself) and a PSK username the server does not know. Each
/// is tried by qemu-img, qemu-nbd -L and qnbd -L.
#[test]
fn refused_sessions_read_as_they_do_with_qemu_nbd() {
    if !have_all() || !have("psktool") {
        return;
    }
    let p = pki();
    let img = patterned_image(&p.root);
    let alice = psk_dir(&p.root, "alice", "alice");
    let bob = psk_dir(&p.root, "bob", "bob");
    let x509 = x509_server(&p.server, "");
    let psk = format!(
        "tls-creds-psk,id=tls0,endpoint=server,dir={}",
        alice.display()
    );
    let stranger = format!(
        "tls-creds-psk,id=tls0,endpoint=client,dir={},username=bob",
        bob.display()
    );
    let other_name: &[&str] = &["--tls-hostname=other.example"];
    // (server credentials, client credentials, qemu-img's extra options, -L's extra options)
    let cases = [
        (
            &x509,
            x509_client(&p.client),
            ",tls-hostname=other.example",
            other_name,
        ),
        (&x509, x509_client(&p.foreign), "", &[][..]),
        (&psk, stranger, "", &[][..]),
    ];
    let mut seen = Vec::new();
    for server in ["qemu-nbd", QNBD] {
        let mut lines = Vec::new();
        for (server_creds, client, img_extra, list_extra) in &cases {
            let srv = tls_server(server, server_creds, &["-r"], &img);
            let port = srv.port.to_string();
            for (n, client_bin) in ["qemu-img", "qemu-nbd", QNBD].into_iter().enumerate() {
                let out = if client_bin == "qemu-img" {
                    let opts = format!("{}{img_extra}", srv.opts("tls0"));
                    run(Command::new("qemu-img").args([
                        "info",
                        "--object",
                        client,
                        "--image-opts",
                        &opts,
                    ]))
                } else {
                    run(Command::new(client_bin)
                        .args(["-L", "-b", "127.0.0.1", "-p", &port])
                        .args(["--object", client, "--tls-creds", "tls0"])
                        .args(*list_extra))
                };
                assert!(!out.status.success(), "{server} let {client_bin} in");
                let said = String::from_utf8_lossy(&out.stderr)
                    .replace(&port, "PORT")
                    .replace("qnbd:", "qemu-nbd:");
                lines.push(format!("client {n}: {said}"));
                // The server logs once the client is gone: wait, to keep the order.
                srv.stderr_after(n + 1);
            }
            let log = srv.stderr_after(3).replace("qnbd:", "qemu-nbd:");
            lines.push(format!("server log:\n{log}"));
        }
        seen.push(lines);
    }
    for lines in &seen[0] {
        eprintln!("{lines}");
    }
    assert_eq!(seen[1], seen[0], "qnbd (left) and qemu-nbd (right) differ");
}
