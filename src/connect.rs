//! `-c DEV` and `-d DEV`: serve the image to ourselves over socket pairs, negotiate as a
//! client (simple replies only, as the kernel needs), and hand the sockets to the kernel.

use crate::die;
use crate::plan::{ExportPlan, ImagePlan, ProcessPlan};
use frontends::kernel::{self, Api, DeviceParams};
use frontends::nbd::client::{Client, ClientError};
use frontends::nbd::proto::OPT_GO;
use frontends::nbd::server::{Server, ServerOptions};
use frontends::transport::Stream;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// `-d DEV`.
pub fn disconnect(dev: &str, api: Api) -> ! {
    match kernel::disconnect(Path::new(dev), api) {
        Ok(()) => {
            println!("{dev} disconnected");
            std::process::exit(0);
        }
        Err(e) => die(e),
    }
}

/// One self-connection: a server thread on one end, a negotiated client on the other.
fn self_connect(
    server: &Arc<Server>,
) -> (
    OwnedFd,
    frontends::nbd::client::ExportInfo,
    std::thread::JoinHandle<()>,
) {
    let (a, b) = match UnixStream::pair() {
        Ok(p) => p,
        Err(e) => die(format!("Failed to create a socket pair: {e}")),
    };
    let srv = server.clone();
    let thread = match std::thread::Builder::new()
        .name("serve".into())
        .spawn(move || srv.serve_one(Stream::Unix(a)))
    {
        Ok(t) => t,
        Err(e) => die(format!("cannot start a server thread: {e}")),
    };
    let go = Client::start(Stream::Unix(b)).and_then(|mut c| {
        // Like qemu-nbd's -c thread: the default export, no structured replies.
        match c.info_or_go(OPT_GO, "", false) {
            Ok(info) => Ok((c, info)),
            Err(e) => {
                c.abort_on_error(&e);
                Err(e)
            }
        }
    });
    match go {
        Ok((c, info)) => match c.into_stream() {
            Stream::Unix(s) => (OwnedFd::from(s), info, thread),
            _ => die("internal error: self-connection is not a Unix socket"),
        },
        Err(ClientError::Refused { msg, .. }) => die(format!(
            "Requested export not available\nserver reported: {msg}"
        )),
        Err(e) => die(format!("Failed to negotiate with ourselves: {e}")),
    }
}

/// `-c DEV`: fork (unless `-v`), open the image, bind the device; returns only when the
/// device is disconnected.
pub fn run(
    image: ImagePlan,
    export: ExportPlan,
    dev: &str,
    api: Api,
    n: usize,
    process: ProcessPlan,
) -> ! {
    let readiness = crate::daemon::fork_if(process.fork, process.keep_stderr);
    let device = crate::image::open(&image);
    crate::daemon::write_pid_file(process.pid_file.as_deref());
    let multi = export.shared != 1 || n > 1;
    let (export, reporter) = crate::export::build(export, device, multi, &image.bitmaps);
    crate::daemon::install_signal_handlers(reporter);
    let server = Arc::new(Server::new(
        export,
        ServerOptions {
            shared: 0,
            persistent: true,
            handshake_limit: None,
            ..Default::default()
        },
    ));
    let mut socks = Vec::with_capacity(n);
    let mut threads = Vec::with_capacity(n);
    let mut info = None;
    for _ in 0..n {
        let (fd, i, t) = self_connect(&server);
        socks.push(fd);
        threads.push(t);
        info = Some(i);
    }
    let Some(info) = info else {
        die("no connection")
    };
    let params = DeviceParams {
        size: info.size,
        flags: info.flags,
        block_size: 512,
        timeout: None,
    };
    let wanted = if dev == "auto" {
        None
    } else {
        Some(PathBuf::from(dev))
    };
    // The cleanup record is held across the bind: a signal arriving meanwhile waits for it
    // (cleanup::run takes it) and then finds the device recorded, so a device the kernel
    // has bound is always disconnected, however early the signal comes.
    let mut record = crate::cleanup::get();
    let binding = match kernel::bind(wanted.as_deref(), socks, params, api) {
        Ok(b) => b,
        Err(e) => {
            drop(record);
            die(e)
        }
    };
    let index = binding.index();
    let path = kernel::device_path(index);
    record.unbind = Some(path.clone());
    drop(record);
    if let Err(e) = kernel::wait_usable(index, info.size) {
        let _ = binding.disconnect();
        die(e);
    }
    tracing::info!("{} is connected to {}", path.display(), image.file);
    if wanted.is_none() {
        crate::daemon::println(readiness.as_ref(), &path.display().to_string());
    }
    if let Some(r) = readiness {
        r.ready();
    }
    for t in threads {
        let _ = t.join();
    }
    binding.wait();
    crate::cleanup::get().unbind = None;
    crate::cleanup::run();
    std::process::exit(0);
}
