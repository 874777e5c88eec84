//! Wiring for server mode: check the options as qemu-nbd does, open the image, listen, fork,
//! serve, and clean up on exit or signal.

use crate::cli::{parse_c_number, Cli};
use crate::{cleanup, daemon, die, listen};
use backends::aio::AioMode;
use backends::cache_mode::{CacheMode, Cached};
use backends::detect_zeroes::{DetectZeroes, ZeroDetect};
use backends::open::{open_image, Format, ImageOptions};
use backends::Device;
use frontends::nbd::proto::{DEFAULT_PORT, MAX_STRING_SIZE};
use frontends::nbd::server::{Export, Server, ServerOptions};
use frontends::tls::{Creds, Endpoint, ServerTls};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

fn try_help() -> ! {
    // error_report, then an error_printf without the prefix, as qemu-nbd.
    die(format!(
        "Invalid number of arguments\nTry `{} --help' for more information.",
        crate::prog::invocation()
    ));
}

/// Reject, with qemu-nbd's words, combinations it rejects before touching anything.
fn check_modes(cli: &Cli) {
    if cli.list {
        if !cli.args.is_empty() {
            die("List mode is incompatible with a file name");
        }
        if cli.export_name.is_some()
            || cli.description.is_some()
            || cli.offset.is_some()
            || cli.format.is_some()
            || cli.connect.is_some()
            || cli.disconnect
            || !cli.bitmap.is_empty()
            || cli.allocation_depth
            || cli.snapshot
            || cli.load_snapshot.is_some()
            || cli.nocache
            || cli.cache.is_some()
            || cli.aio.is_some()
            || cli.discard.is_some()
            || cli.detect_zeroes.is_some()
            || cli.image_opts
        {
            die("List mode is incompatible with per-device settings");
        }
        if cli.fork {
            die("List mode is incompatible with forking");
        }
    }
    if cli.tls_authz.is_some() && cli.tls_creds.is_none() {
        die("--tls-authz is not permitted without --tls-creds");
    }
    if cli.tls_hostname.is_some() && cli.tls_creds.is_none() {
        die("--tls-hostname is not permitted without --tls-creds");
    }
    if cli.image_opts && cli.format.is_some() {
        die("--image-opts and -f are mutually exclusive");
    }
    if cli.selinux_label.is_some() {
        if cli.socket.is_none() {
            die("--selinux-label is not permitted without --socket");
        }
        die("SELinux support not enabled in this binary");
    }
}

/// `-l`: `snapshot.id=ID`, `snapshot.name=NAME` or a bare ID_OR_NAME.
fn snapshot_param(s: &str) -> String {
    for part in s.split(',') {
        if let Some(v) = part
            .strip_prefix("snapshot.id=")
            .or_else(|| part.strip_prefix("snapshot.name="))
        {
            if !v.is_empty() {
                return v.to_string();
            }
        }
    }
    s.to_string()
}

/// `-n`, `--cache`, `--discard`, `--detect-zeroes`, with qemu-nbd's checks and messages.
fn image_modes(cli: &Cli) -> (CacheMode, DetectZeroes, bool) {
    let cache = match cli.cache.as_deref() {
        None if cli.nocache => CacheMode::None,
        None => CacheMode::Writeback,
        Some(m) => match CacheMode::from_name(m) {
            Some(c) => c,
            None => die(format!("Invalid cache mode `{m}'")),
        },
    };
    let discard = match cli.discard.as_deref() {
        None | Some("ignore") | Some("off") => false,
        Some("unmap") | Some("on") => true,
        Some(m) => die(format!("Invalid discard mode `{m}'")),
    };
    let detect = match cli.detect_zeroes.as_deref() {
        None | Some("off") => DetectZeroes::Off,
        Some("on") => DetectZeroes::On,
        Some("unmap") => DetectZeroes::Unmap,
        Some(m) => die(format!(
            "Failed to parse detect_zeroes mode: invalid parameter value: {m}"
        )),
    };
    if detect == DetectZeroes::Unmap && !discard {
        die("setting detect-zeroes to unmap is not allowed without setting discard operation to unmap");
    }
    (cache, detect, discard)
}

pub fn run(cli: Cli) {
    // qemu-nbd creates objects while it reads its options, before any other check.
    let objects = crate::object::Objects::create(&cli.object).unwrap_or_else(|e| die(e));
    check_modes(&cli);
    let tls = tls_creds(&cli, &objects);
    if cli.disconnect {
        if cli.args.len() != 1 {
            try_help();
        }
        crate::connect::disconnect(&cli);
    }
    if cli.list {
        crate::list::run(&cli, tls.as_ref());
        return;
    }
    if cli.args.len() != 1 {
        try_help();
    }

    let shared = match cli.shared.as_deref() {
        None => 1,
        Some(s) => match parse_c_number(s) {
            Some(n) if (0..=i32::MAX as i64).contains(&n) => n as u32,
            _ => die(format!("Invalid shared device number '{s}'")),
        },
    };
    let offset = match cli.offset.as_deref() {
        None => 0,
        Some(s) => match parse_c_number(s) {
            Some(n) if n >= 0 => n as u64,
            _ => die(format!("Invalid offset '{s}'")),
        },
    };
    let handshake_limit = match cli.handshake_limit.as_deref() {
        None => Some(Duration::from_secs(10)),
        Some(s) => match parse_c_number(s) {
            Some(0) => None,
            Some(n) if n > 0 => Some(Duration::from_secs(n as u64)),
            _ => die(format!("Invalid handshake limit '{s}'")),
        },
    };
    let export_name = cli.export_name.clone().unwrap_or_default();
    if export_name.len() > MAX_STRING_SIZE {
        die(format!("export name '{export_name}' too long"));
    }
    let description = cli.description.clone().unwrap_or_default();
    if description.len() > MAX_STRING_SIZE {
        die(format!("description '{description}' too long"));
    }
    if let Some(k) = &cli.socket {
        if !k.starts_with('/') {
            die("socket path must be absolute");
        }
    }
    let port = match cli.port.as_deref() {
        None => DEFAULT_PORT,
        // getaddrinfo truncates to 16 bits; qemu-nbd listens where it lands.
        Some(p) => match p.parse::<u64>() {
            Ok(n) => (n & 0xffff) as u16,
            Err(_) => die(format!("Invalid port '{p}'")),
        },
    };
    let (mut cache, mut detect_zeroes, discard) = image_modes(&cli);
    let load_snapshot = cli.load_snapshot.as_deref().map(snapshot_param);
    let aio = match cli.aio.as_deref() {
        None => AioMode::Threads,
        Some(m) => AioMode::from_name(m).unwrap_or_else(|| die(format!("Invalid aio mode '{m}'"))),
    };
    let image_opts = if cli.image_opts {
        match crate::image_opts::parse(&cli.args[0], cli.read_only) {
            Ok(p) => {
                for w in &p.image.warnings {
                    eprintln!("{}: warning: {w}", crate::prog::name());
                }
                Some(p)
            }
            Err(e) => die(format!("Failed to blk_new_open '{}': {e}", cli.args[0])),
        }
    } else {
        None
    };
    let format = cli.format.as_deref().map(|f| match Format::from_name(f) {
        Some(f) => f,
        None => die(format!(
            "Failed to blk_new_open '{}': Unknown driver '{f}'",
            cli.args[0]
        )),
    });

    // Like qemu-nbd, -c goes to the background once the device works, unless -v.
    let readiness = if cli.fork || (cli.connect.is_some() && cli.verbose == 0) {
        match daemon::fork_and_wait() {
            Ok(r) => Some(r),
            Err(e) => die(format!("Failed to fork: {e}")),
        }
    } else {
        None
    };

    let file = cli.args[0].clone();
    let opts = match image_opts {
        Some(p) => {
            // The option string decides; command-line modes still apply where it is silent.
            if p.cache != CacheMode::Writeback {
                cache = p.cache;
            }
            if p.detect_zeroes != DetectZeroes::Off {
                detect_zeroes = p.detect_zeroes;
            }
            let mut image = p.image;
            image.snapshot |= cli.snapshot;
            image.load_snapshot = load_snapshot.clone();
            image.read_only |= load_snapshot.is_some();
            image.discard |= discard;
            image.direct |= cache.direct();
            if cli.aio.is_some() {
                image.aio = aio;
            }
            // The passphrase of `key-secret=`: a missing object is the driver's error.
            let e = &mut image.encrypt;
            e.key = e.key_secret.as_deref().and_then(|id| objects.secret(id));
            image
        }
        None => ImageOptions {
            path: PathBuf::from(&file),
            format,
            // -l exports a snapshot, which qemu-nbd always makes read-only.
            read_only: cli.read_only || load_snapshot.is_some(),
            snapshot: cli.snapshot,
            load_snapshot: load_snapshot.clone(),
            discard,
            direct: cache.direct(),
            aio,
            ..Default::default()
        },
    };
    let opened = match open_image(&opts) {
        Ok(o) => o,
        // qemu-nbd loads a snapshot after the open succeeded, so its message has no prefix.
        Err(e @ (backends::Error::LoadSnapshot(_) | backends::Error::Export(_))) => die(e),
        Err(e) => die(format!("Failed to blk_new_open '{file}': {e}")),
    };
    for w in &opened.warnings {
        eprintln!("{w}");
    }
    {
        let mut c = cleanup::get();
        c.image = Some(opened.backend.clone());
        c.overlay = opened.temp_overlay.clone();
    }
    if load_snapshot.is_some() && opened.format == Format::raw() {
        die("Failed to load snapshot: Block format 'raw' used by device '' does not support temporarily loading internal snapshots");
    }
    let backend = if offset != 0 {
        let inner_size = opened.backend.size();
        if offset > inner_size {
            die(format!("Offset ({offset}) cannot be greater than size of the containing file ({inner_size})"));
        }
        match backends::slice::Slice::new(opened.backend, offset, None) {
            Ok(s) => Arc::new(s) as Arc<dyn backends::BlockBackend>,
            Err(e) => die(e),
        }
    } else {
        opened.backend
    };
    let backend = Cached::wrap(backend, cache);
    let backend: Arc<dyn backends::BlockBackend> = if detect_zeroes != DetectZeroes::Off {
        Arc::new(ZeroDetect::new(backend, detect_zeroes))
    } else {
        backend
    };
    let device = Device::new(backend);
    for name in &cli.bitmap {
        if let Err(e) = device.bitmap_check(name) {
            // die() releases the image as qemu does (its bitmaps were marked in use at open).
            die(e);
        }
    }

    if let Some(dev) = cli.connect.clone() {
        write_pid_file(&cli);
        install_signal_handlers();
        let multi = shared != 1 || crate::connect::connections(&cli) > 1;
        let export = Export::new(
            export_name,
            description,
            device,
            multi,
            cli.allocation_depth,
        )
        .with_bitmaps(cli.allocation_depth, &cli.bitmap);
        crate::connect::run(&cli, &dev, export, readiness);
    }

    let backlog = listen::backlog(shared, cli.persistent);
    let listeners = if let Some(k) = &cli.socket {
        let path = PathBuf::from(k);
        match listen::unix(&path, backlog) {
            Ok(l) => {
                cleanup::get().socket = Some(path);
                vec![l]
            }
            Err(e) => die(e),
        }
    } else {
        let host = cli.bind.clone().unwrap_or_else(|| "0.0.0.0".into());
        match listen::tcp(&host, port, backlog) {
            Ok(l) => l,
            Err(e) => die(e),
        }
    };
    write_pid_file(&cli);
    install_signal_handlers();

    let export = Export::new(
        export_name,
        description,
        device,
        shared != 1,
        cli.allocation_depth,
    )
    .with_bitmaps(cli.allocation_depth, &cli.bitmap);
    let server = Server::new(
        export,
        ServerOptions {
            shared,
            persistent: cli.persistent,
            handshake_limit,
            threads_per_connection: threads_per_connection(),
            tls: tls.map(|creds| {
                Arc::new(ServerTls {
                    creds,
                    authz: cli
                        .tls_authz
                        .as_ref()
                        .map(|id| (id.clone(), objects.authz(id))),
                })
            }),
        },
    );
    tracing::info!("serving '{file}' ({} bytes)", server.export().device.size());
    if let Some(r) = readiness {
        r.ready();
    }
    let result = server.run(listeners);
    cleanup::run();
    if let Err(e) = result {
        die(e);
    }
}

/// `--tls-creds`, checked as qemu-nbd checks it before it opens anything.
fn tls_creds(cli: &Cli, objects: &crate::object::Objects) -> Option<Creds> {
    let id = cli.tls_creds.as_ref()?;
    if cli.connect.is_some() {
        die("TLS is not supported with a host device");
    }
    if cli.tls_authz.is_some() && cli.list {
        die("TLS authorization is incompatible with export list");
    }
    if cli.tls_hostname.is_some() && !cli.list {
        die("TLS hostname is only supported with export list");
    }
    let want = if cli.list {
        Endpoint::Client
    } else {
        Endpoint::Server
    };
    match objects.tls_creds(id, want) {
        Ok(c) => Some(c),
        Err(e) => die(format!("Failed to get TLS creds: {e}")),
    }
}

/// Worker threads per connection; `QNBD_THREADS` overrides the default (for tuning).
fn threads_per_connection() -> usize {
    std::env::var("QNBD_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(ServerOptions::default().threads_per_connection)
}

fn write_pid_file(cli: &Cli) {
    if let Some(p) = &cli.pid_file {
        if let Err(e) = std::fs::write(p, format!("{}\n", std::process::id())) {
            die(format!("Failed to write pid file '{p}': {e}"));
        }
        cleanup::get().pid_file = Some(PathBuf::from(p));
    }
}

/// SIGTERM, SIGINT and SIGHUP: flush, remove what we created, exit 0 (as qemu-nbd).
fn install_signal_handlers() {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = match signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP]) {
        Ok(s) => s,
        Err(e) => die(format!("cannot install signal handlers: {e}")),
    };
    let spawned = std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Some(sig) = signals.forever().next() {
                tracing::info!("signal {sig}: shutting down");
                cleanup::run();
                std::process::exit(0);
            }
        });
    if let Err(e) = spawned {
        die(format!("cannot start the signal thread: {e}"));
    }
}
