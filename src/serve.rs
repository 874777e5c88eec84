//! Serving over NBD on a socket, in qemu-nbd's order: fork if asked, listen, open the image,
//! write the pid file, serve until the last client leaves (or for ever with `-t`), clean up.

use crate::plan::{ExportPlan, ImagePlan, ListenPlan, ProcessPlan};
use crate::{cleanup, daemon, die, listen};
use frontends::nbd::server::{Listener, Server, ServerOptions};
use std::path::PathBuf;

pub fn run(image: ImagePlan, export: ExportPlan, net: ListenPlan, process: ProcessPlan) -> ! {
    let readiness = daemon::fork_if(process.fork, process.keep_stderr);
    daemon::install_exit_handlers();
    let listeners = listen_on(&net, export.shared);
    let device = crate::image::open(&image);
    daemon::write_pid_file(process.pid_file.as_deref());
    let shared = export.shared;
    let (export, reporter) = crate::export::build(export, device, shared != 1, &image.bitmaps);
    if let Some(r) = reporter {
        daemon::install_report_handler(r);
    }
    let server = Server::new(
        export,
        ServerOptions {
            shared,
            persistent: net.persistent,
            handshake_limit: net.handshake_limit,
            threads_per_connection: threads_per_connection(),
            tls: net.tls,
        },
    );
    if let Some(r) = readiness {
        r.ready();
    }
    let result = server.run(listeners);
    cleanup::run();
    if let Err(e) = result {
        die(e);
    }
    std::process::exit(0);
}

/// The listening sockets (a Unix socket is removed again at exit).
fn listen_on(net: &ListenPlan, shared: u32) -> Vec<Listener> {
    if net.activated {
        return vec![listen::activated().unwrap_or_else(|e| die(e))];
    }
    let backlog = listen::backlog(shared, net.persistent);
    match &net.socket {
        Some(path) => match listen::unix(path, backlog, net.selinux_label.as_deref()) {
            Ok(l) => {
                cleanup::get().socket = Some(PathBuf::from(path));
                vec![l]
            }
            Err(e) => die(e),
        },
        None => listen::tcp(&net.bind, &net.port, backlog).unwrap_or_else(|e| die(e)),
    }
}

/// Worker threads per connection; `QNBD_THREADS` overrides the default (for tuning).
/// An image on another NBD server gets 16: each worker waits a network round trip per
/// request, so the workers are how deep the requests to it are pipelined (measured, 4 KiB
/// QD 32 through a Unix-socket re-export on 2 cores, medians of 3 interleaved rounds:
/// 4 workers 21.7k/42.9k IOPS read/write, 16 workers 32.3k/52.0k, qemu-nbd 32.6k/48.5k; in
/// a quieter one-off run 32 workers did no better than 16).
fn threads_per_connection() -> usize {
    let default = if backends::file::remote::opened() {
        ServerOptions::default().threads_per_connection.max(16)
    } else {
        ServerOptions::default().threads_per_connection
    };
    std::env::var("QNBD_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(default)
}
