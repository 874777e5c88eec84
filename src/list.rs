//! `-L`: list a server's exports in qemu-nbd's layout, or as JSON with `--json`.

use crate::die;
use crate::plan::ListPlan;
use frontends::nbd::client::{format_list, format_list_json, list_exports};
use frontends::nbd::proto::DEFAULT_PORT;
use frontends::tls::Transport;
use frontends::transport::Stream;

pub fn run(cli: &ListPlan) -> ! {
    let stream = if let Some(path) = &cli.socket {
        match std::os::unix::net::UnixStream::connect(path) {
            Ok(s) => Stream::Unix(s),
            Err(e) => die(format!(
                "Failed to connect to '{path}': {}",
                backends::errno_text(&e)
            )),
        }
    } else {
        let host = cli.bind.clone().unwrap_or_else(|| "0.0.0.0".into());
        let port = cli.port.clone().unwrap_or_else(|| DEFAULT_PORT.to_string());
        let addr = format!("{host}:{port}");
        let targets = crate::listen::resolve(&host, &port, false).unwrap_or_else(|e| die(e));
        match std::net::TcpStream::connect(&targets[..]) {
            Ok(s) => {
                // Options and TLS records go back to back: no Nagle delay between them.
                let _ = s.set_nodelay(true);
                Stream::Tcp(s)
            }
            Err(e) => die(format!(
                "Failed to connect to '{addr}': {}",
                backends::errno_text(&e)
            )),
        }
    };
    // The certificate's name is the TLS client's business (frontends::tls::server_name):
    // --tls-hostname, else the -b address; an x509 client over a Unix socket needs the former.
    let transport = match &cli.socket {
        Some(_) => Transport::Unix,
        None => Transport::Tcp {
            host: cli.bind.as_deref().unwrap_or("0.0.0.0"),
        },
    };
    let tls = cli
        .tls
        .as_ref()
        .map(|c| (c, transport, cli.tls_hostname.as_deref()));
    match list_exports(stream, tls) {
        Ok((exports, extended)) => {
            if cli.json {
                println!("{}", format_list_json(&exports, extended));
            } else {
                print!("{}", format_list(&exports, extended));
            }
            std::process::exit(0);
        }
        Err(e) => die(e.report()),
    }
}
