//! The format × transport × TLS matrix: every combination a test can run the same checks
//! over, each giving the server (qnbd or qemu-nbd) and how qemu's and libnbd's clients reach
//! it.

use super::pki::Pki;
use super::Server;
use std::path::Path;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Unix,
    Tcp,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tls {
    Plain,
    X509,
}

#[derive(Clone, Copy, Debug)]
pub struct Case {
    pub format: &'static str,
    pub transport: Transport,
    pub tls: Tls,
}

/// raw and qcow2, over a Unix socket and TCP, in plain text and with x509.
pub fn cases() -> Vec<Case> {
    let mut out = Vec::new();
    for format in ["raw", "qcow2"] {
        for transport in [Transport::Unix, Transport::Tcp] {
            for tls in [Tls::Plain, Tls::X509] {
                out.push(Case {
                    format,
                    transport,
                    tls,
                });
            }
        }
    }
    out
}

/// A running server for one case, and how clients reach it.
pub struct Served {
    pub server: Server,
    /// Arguments for qemu-img/qemu-io that open the export (`--object ... --image-opts ...`
    /// or a URI), in format raw.
    pub qemu: Vec<String>,
    /// A libnbd URI (`nbds://...` with the client certificates under TLS).
    pub uri: String,
}

impl Case {
    pub fn name(&self) -> String {
        format!("{} {:?} {:?}", self.format, self.transport, self.tls)
    }

    /// Serve `img` with `bin` (plus `extra` options) as this case says.
    pub fn serve(&self, bin: &str, img: &Path, pki: &Pki, extra: &[&str]) -> Served {
        let server_creds = format!(
            "tls-creds-x509,id=tls0,endpoint=server,dir={}",
            pki.server.display()
        );
        let mut args: Vec<&str> = vec!["-t", "-e", "0", "-f", self.format];
        if self.tls == Tls::X509 {
            args.extend(["--object", &server_creds, "--tls-creds", "tls0"]);
        }
        args.extend_from_slice(extra);
        let img_s = img.to_str().unwrap_or_default();
        args.push(img_s);
        let server = match self.transport {
            Transport::Unix => Server::unix(bin, &args),
            Transport::Tcp => Server::tcp(bin, &args),
        };
        let (qemu, uri) = self.clients(&server, pki);
        Served { server, qemu, uri }
    }

    fn clients(&self, s: &Server, pki: &Pki) -> (Vec<String>, String) {
        let client_dir = pki.client.display().to_string();
        match (self.transport, self.tls) {
            (_, Tls::Plain) => (vec!["-f".into(), "raw".into(), s.uri()], s.uri()),
            (t, Tls::X509) => {
                let addr = match t {
                    Transport::Unix => format!(
                        "path={},file.tls-hostname=localhost",
                        s.socket
                            .as_ref()
                            .map(|p| p.display().to_string())
                            .unwrap_or_default()
                    ),
                    Transport::Tcp => format!("host=127.0.0.1,file.port={}", s.port.unwrap_or(0)),
                };
                let qemu = vec![
                    "--object".into(),
                    format!("tls-creds-x509,id=tls0,endpoint=client,dir={client_dir}"),
                    "--image-opts".into(),
                    format!("driver=raw,file.driver=nbd,file.{addr},file.tls-creds=tls0"),
                ];
                let uri = match t {
                    Transport::Unix => format!(
                        "nbds+unix:///?socket={}&tls-certificates={client_dir}&tls-hostname=localhost",
                        s.socket.as_ref().map(|p| p.display().to_string()).unwrap_or_default()
                    ),
                    Transport::Tcp => format!(
                        "nbds://127.0.0.1:{}/?tls-certificates={client_dir}",
                        s.port.unwrap_or(0)
                    ),
                };
                (qemu, uri)
            }
        }
    }
}
