//! Test certificates made with certtool: a CA, a server certificate for localhost and
//! 127.0.0.1, client certificates (ours, a foreign CA's, another DN), laid out as qemu's
//! `dir=` expects.

use super::{run, tmpdir};
use std::path::{Path, PathBuf};
use std::process::Command;

pub fn certtool(dir: &Path, args: &[&str]) {
    let out = run(Command::new("certtool").current_dir(dir).args(args));
    assert!(
        out.status.success(),
        "certtool {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn template(dir: &Path, name: &str, text: &str) -> String {
    std::fs::write(dir.join(name), text).expect("template");
    name.to_string()
}

/// A CA; returns its directory (ca-cert.pem, ca-key.pem).
pub fn make_ca(root: &Path, name: &str) -> PathBuf {
    let d = root.join(name);
    std::fs::create_dir_all(&d).expect("mkdir");
    certtool(&d, &["--generate-privkey", "--outfile", "ca-key.pem"]);
    let t = template(
        &d,
        "ca.info",
        &format!("cn = {name}\nca\ncert_signing_key\n"),
    );
    certtool(
        &d,
        &[
            "--generate-self-signed",
            "--load-privkey",
            "ca-key.pem",
            "--template",
            &t,
            "--outfile",
            "ca-cert.pem",
        ],
    );
    d
}

/// A certificate signed by `ca`, written as `{role}-cert.pem`/`{role}-key.pem` into a new
/// directory `out` beside the CA's certificate, the layout qemu's `dir=` expects.
pub fn make_cert(root: &Path, ca: &Path, out: &str, role: &str, info: &str) -> PathBuf {
    let d = root.join(out);
    std::fs::create_dir_all(&d).expect("mkdir");
    std::fs::copy(ca.join("ca-cert.pem"), d.join("ca-cert.pem")).expect("copy ca");
    let key = format!("{role}-key.pem");
    let cert = format!("{role}-cert.pem");
    certtool(&d, &["--generate-privkey", "--outfile", &key]);
    let t = template(&d, "info", info);
    let ca_key = ca.join("ca-key.pem").display().to_string();
    let ca_cert = ca.join("ca-cert.pem").display().to_string();
    certtool(
        &d,
        &[
            "--generate-certificate",
            "--load-ca-privkey",
            &ca_key,
            "--load-ca-certificate",
            &ca_cert,
            "--load-privkey",
            &key,
            "--template",
            &t,
            "--outfile",
            &cert,
        ],
    );
    d
}

pub struct Pki {
    _tmp: tempfile::TempDir,
    pub root: PathBuf,
    pub server: PathBuf,
    pub client: PathBuf,
    /// A client certificate from another CA.
    pub foreign: PathBuf,
    /// The right CA, a different DN.
    pub intruder: PathBuf,
    /// The CA only: no client certificate.
    pub anonymous: PathBuf,
}

pub fn pki() -> Pki {
    let tmp = tmpdir();
    let root = tmp.path().to_path_buf();
    let ca = make_ca(&root, "ca");
    let other = make_ca(&root, "other-ca");
    let server = make_cert(
        &root,
        &ca,
        "server",
        "server",
        "organization = Example\ncn = localhost\ndns_name = localhost\nip_address = 127.0.0.1\ntls_www_server\nencryption_key\nsigning_key\n",
    );
    let client_info = "country = GB\nstate = London\nlocality = London\norganization = Example\ncn = laptop.example.com\ntls_www_client\nencryption_key\nsigning_key\n";
    let client = make_cert(&root, &ca, "client", "client", client_info);
    let foreign = make_cert(&root, &other, "foreign", "client", client_info);
    let intruder = make_cert(
        &root,
        &ca,
        "intruder",
        "client",
        "organization = Elsewhere\ncn = intruder.example.com\ntls_www_client\nencryption_key\nsigning_key\n",
    );
    let anonymous = root.join("anonymous");
    std::fs::create_dir_all(&anonymous).expect("mkdir");
    std::fs::copy(ca.join("ca-cert.pem"), anonymous.join("ca-cert.pem")).expect("copy");
    Pki {
        _tmp: tmp,
        root,
        server,
        client,
        foreign,
        intruder,
        anonymous,
    }
}
