//! `-c ublk`, `-c /dev/ublkbN` (with `--recover`) and `-d /dev/ublkbN`: the image as a
//! local ublk block device. Maps the options onto `frontends::ublk` and runs its lifecycle
//! with the process-wide cleanup.

use crate::daemon::Readiness;
use crate::plan::{ImagePlan, ProcessPlan};
use crate::stats::{Reporter, StatsPlan};
use crate::{cleanup, die};
use backends::Device;
use frontends::stats::Stats;
use frontends::ublk::{self, Ublk, UblkOptions};
use qnbd::cli::{parse_c_number, Cli};
use std::sync::Arc;

/// The ublk options when `-c` names a ublk device; None for an NBD device. Checked before
/// anything is opened, with the options that make no sense here refused.
pub fn options(cli: &Cli) -> Option<UblkOptions> {
    let target = cli.connect.as_deref().filter(|d| ublk::is_ublk_target(d));
    let Some(dev) = target else {
        if cli.ublk_queues.is_some() || cli.ublk_depth.is_some() || cli.recover {
            die("--ublk-queues, --ublk-depth and --recover need -c ublk or -c /dev/ublkbN");
        }
        return None;
    };
    let Some(id) = ublk::parse_target(dev) else {
        die(ublk::UblkError::NotUblk(dev.to_string()));
    };
    if cli.connections.is_some() || cli.kernel_api.is_some() {
        die("--connections and --kernel-api are for NBD devices, not ublk");
    }
    if cli.recover && id.is_none() {
        die("--recover needs the device: -c /dev/ublkbN");
    }
    let number = |v: &Option<String>, what: &str, max: i64, default: u16| match v.as_deref() {
        None => default,
        Some(s) => match parse_c_number(s) {
            Some(n) if (1..=max).contains(&n) => n as u16,
            _ => die(format!("Invalid {what} '{s}' (1 to {max})")),
        },
    };
    Some(UblkOptions {
        id,
        queues: number(
            &cli.ublk_queues,
            "ublk queue count",
            64,
            UblkOptions::default_queues(),
        ),
        depth: number(
            &cli.ublk_depth,
            "ublk queue depth",
            4096,
            ublk::DEFAULT_DEPTH,
        ),
        recover: cli.recover,
        pin_queues: std::env::var("QNBD_UBLK_PIN").is_ok_and(|v| v == "1"),
        io_buf_bytes: io_buf_bytes(),
        offload: std::env::var("QNBD_UBLK_OFFLOAD").map_or(true, |v| v != "0"),
    })
}

/// Tuning, like `QNBD_THREADS`: `QNBD_UBLK_PIN=1` pins queue threads to their queue's CPUs,
/// `QNBD_UBLK_OFFLOAD=0` serves flush and FUA on the queue threads too.
/// `QNBD_UBLK_BUF_KB`: the largest request, 4 KiB to 4 MiB in
/// whole pages; default [`ublk::IO_BUF_BYTES`].
fn io_buf_bytes() -> u32 {
    std::env::var("QNBD_UBLK_BUF_KB")
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
        .filter(|kb| (4..=4096).contains(kb) && kb.is_multiple_of(4))
        .map_or(ublk::IO_BUF_BYTES, |kb| kb << 10)
}

/// `-c ublk`: fork (unless `-v`), open the image and serve it as a ublk device until it is
/// stopped; never returns.
pub fn run(
    image: ImagePlan,
    opts: UblkOptions,
    stats: Option<StatsPlan>,
    process: ProcessPlan,
) -> ! {
    let readiness = crate::daemon::fork_if(process.fork, process.keep_stderr);
    let device = crate::image::open(&image);
    crate::daemon::write_pid_file(process.pid_file.as_deref());
    // The counters are named after the device as given (`ublk` or `/dev/ublkbN`).
    let name = opts
        .id
        .map_or_else(|| "ublk".to_string(), |id| format!("/dev/ublkb{id}"));
    let reporter = stats.map(|p| Reporter::start(p, &name));
    crate::daemon::install_signal_handlers(reporter.clone());
    serve(&opts, device, reporter.map(|r| r.stats()), readiness)
}

/// Serve `device` as a ublk device until it is stopped.
fn serve(
    opts: &UblkOptions,
    device: Device,
    stats: Option<Arc<Stats>>,
    readiness: Option<Readiness>,
) -> ! {
    if let Err(e) = ublk::private_mount_namespace() {
        die(format!("cannot get a private mount namespace: {e}"));
    }
    // Held across the creation, as for -c on /dev/nbdN: a signal meanwhile finds the
    // device recorded and deletes it.
    let mut record = cleanup::get();
    let u = match Ublk::create(opts, device.size()) {
        Ok(u) => u,
        Err(e) => {
            drop(record);
            die(e)
        }
    };
    record.ublk = Some(u.clone());
    drop(record);
    if !device.size().is_multiple_of(512) {
        tracing::info!(
            "the last {} bytes of the image are not a whole sector and are not exported",
            device.size() % 512
        );
    }
    let print = opts.id.is_none();
    let served = u.serve(device, stats, |path| {
        tracing::info!("{} is ready", path.display());
        if print {
            crate::daemon::println(readiness.as_ref(), &path.display().to_string());
        }
        if let Some(r) = readiness {
            r.ready();
        }
    });
    if let Err(e) = served {
        die(e);
    }
    cleanup::run();
    std::process::exit(0);
}

/// `-d /dev/ublkbN`.
pub fn disconnect(dev: &str) -> ! {
    match ublk::disconnect(dev) {
        Ok(()) => {
            println!("{dev} disconnected");
            std::process::exit(0);
        }
        Err(e) => die(e),
    }
}
