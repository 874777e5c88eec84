//! The command line turned into a validated plan: qemu-nbd's checks, in qemu-nbd's order, with
//! its messages. Nothing is opened or created here; each mode has its runner (`serve.rs`,
//! `connect.rs`, `ublk.rs`, `list.rs`), and the process-wide cleanup (`cleanup.rs`) belongs
//! to none of them.

use crate::die;
use backends::aio::AioMode;
use backends::cache_mode::CacheMode;
use backends::detect_zeroes::DetectZeroes;
use backends::open::{Format, ImageOptions};
use frontends::kernel::Api;
use frontends::nbd::proto::{DEFAULT_PORT, MAX_STRING_SIZE};
use frontends::tls::{Creds, Endpoint, ServerTls};
use qnbd::cli::{parse_c_number, Cli};
use qnbd::object::Objects;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// What to open and the layers above it.
pub struct ImagePlan {
    /// The image argument as given (for messages).
    pub file: String,
    pub opts: ImageOptions,
    pub cache: CacheMode,
    pub detect_zeroes: DetectZeroes,
    /// `-o`.
    pub offset: u64,
    pub load_snapshot: bool,
    /// `-B`.
    pub bitmaps: Vec<String>,
    /// `-f` named no driver: qemu-nbd finds out when it opens the image, after listening.
    pub unknown_format: Option<String>,
    /// An error qemu-nbd reports once the image opened (`--image-opts`' unknown options).
    pub after_open: Option<String>,
    /// `--image-opts`: FILE is an option string, read (as qemu-nbd reads it) only when the
    /// image is opened, after listening; see [`resolve_image_opts`].
    pub image_opts: Option<ImageOptsInput>,
}

/// What `--image-opts` needs from the rest of the command line.
#[derive(Clone)]
pub struct ImageOptsInput {
    /// `-f` was given too.
    pub format_given: bool,
    /// `--aio`, when given.
    pub aio: Option<AioMode>,
    /// The secret `key-secret=` names, if there is one.
    pub key: Option<backends::format::Secret>,
    /// FILE is a `json:` file name (not `--image-opts`); `-f`'s driver, if any, replaces
    /// the object's.
    pub json: Option<Option<String>>,
}

/// What clients are told about the export.
pub struct ExportPlan {
    pub name: String,
    pub description: String,
    /// `-e` (0: unlimited).
    pub shared: u32,
    pub allocation_depth: bool,
    /// `--stats`, `--stats-file`.
    pub stats: Option<crate::stats::StatsPlan>,
}

/// Where and how the server listens.
pub struct ListenPlan {
    /// systemd socket activation: serve on the passed socket (fd 3).
    pub activated: bool,
    pub socket: Option<PathBuf>,
    /// `--selinux-label` for the Unix socket.
    pub selinux_label: Option<String>,
    pub bind: String,
    pub port: String,
    pub persistent: bool,
    pub handshake_limit: Option<Duration>,
    pub tls: Option<Arc<ServerTls>>,
}

/// `--fork` (or `-c` without `-v`, as qemu-nbd) and `--pid-file`.
pub struct ProcessPlan {
    pub fork: bool,
    /// `-v`: a forked daemon keeps the caller's stderr for its messages once serving.
    pub keep_stderr: bool,
    pub pid_file: Option<PathBuf>,
}

/// `-L`.
pub struct ListPlan {
    pub socket: Option<String>,
    pub bind: Option<String>,
    pub port: Option<String>,
    pub tls: Option<Creds>,
    pub tls_hostname: Option<String>,
    pub json: bool,
}

pub enum Plan {
    /// `-d DEV`.
    Disconnect {
        device: String,
        api: Api,
    },
    List(ListPlan),
    /// Serve over NBD on a socket.
    Serve {
        image: ImagePlan,
        export: ExportPlan,
        listen: ListenPlan,
        process: ProcessPlan,
    },
    /// `-c /dev/nbdN`: a kernel NBD device served over socket pairs.
    Connect {
        image: ImagePlan,
        export: ExportPlan,
        device: String,
        api: Api,
        connections: usize,
        process: ProcessPlan,
    },
    /// `-c ublk`, `-c /dev/ublkbN`.
    Ublk {
        image: ImagePlan,
        opts: frontends::ublk::UblkOptions,
        /// `--stats`, `--stats-file`.
        stats: Option<crate::stats::StatsPlan>,
        process: ProcessPlan,
    },
}

fn try_help() -> ! {
    // error_report, then an error_printf without the prefix, as qemu-nbd.
    die(format!(
        "Invalid number of arguments\nTry `{} --help' for more information.",
        crate::prog::invocation()
    ));
}

/// Build the plan; exits with qemu-nbd's message at the first problem.
pub fn build(cli: &Cli, objects: &Objects) -> Plan {
    check_modes(cli);
    if cli.list || cli.connect.is_some() {
        // The conflicts of socket activation with -L and -c are reported early too.
        socket_activation(cli);
    }
    let tls = tls_creds(cli, objects);
    if cli.disconnect {
        if cli.args.len() != 1 {
            try_help();
        }
        return Plan::Disconnect {
            device: cli.args[0].clone(),
            api: kernel_api(cli),
        };
    }
    if cli.list {
        return Plan::List(ListPlan {
            socket: cli.socket.clone(),
            bind: cli.bind.clone(),
            port: cli.port.clone(),
            tls,
            tls_hostname: cli.tls_hostname.clone(),
            json: cli.json,
        });
    }
    if cli.args.len() != 1 {
        try_help();
    }
    let export = export_plan(cli);
    let listen = listen_plan(cli, tls, objects);
    let image = image_plan(cli, objects);
    let ublk = crate::ublk::options(cli);
    let process = ProcessPlan {
        // Like qemu-nbd, -c goes to the background once the device works, unless -v.
        fork: cli.fork || (cli.connect.is_some() && cli.verbose == 0),
        keep_stderr: cli.verbose > 0,
        pid_file: cli.pid_file.as_ref().map(PathBuf::from),
    };
    match (cli.connect.clone(), ublk) {
        (Some(_), Some(opts)) => Plan::Ublk {
            image,
            opts,
            stats: export.stats,
            process,
        },
        (Some(device), None) => Plan::Connect {
            image,
            export,
            device,
            api: kernel_api(cli),
            connections: connections(cli),
            process,
        },
        (None, _) => Plan::Serve {
            image,
            export,
            listen,
            process,
        },
    }
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
            || cli.load_snapshot.is_some()
            || cli.nocache
            || cli.cache.is_some()
            || cli.aio.is_some()
            || cli.discard.is_some()
            || cli.detect_zeroes.is_some()
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
    if cli.selinux_label.is_some() && cli.socket.is_none() {
        die("--selinux-label is not permitted without --socket");
    }
    if cli.json && !cli.list {
        die("JSON output is only supported with export list");
    }
}

/// `--tls-creds`, checked as qemu-nbd checks it before it opens anything.
fn tls_creds(cli: &Cli, objects: &Objects) -> Option<Creds> {
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

/// `-e`, `-x`, `-D`, `-A`.
fn export_plan(cli: &Cli) -> ExportPlan {
    let shared = match cli.shared.as_deref() {
        None => 1,
        Some(s) => match parse_c_number(s) {
            Some(n) if (0..=i32::MAX as i64).contains(&n) => n as u32,
            _ => die(format!("Invalid shared device number '{s}'")),
        },
    };
    // qemu-nbd checks -o and the handshake limit between -e and the names.
    let _ = offset(cli);
    let _ = handshake_limit(cli);
    let name = cli.export_name.clone().unwrap_or_default();
    if name.len() > MAX_STRING_SIZE {
        die(format!("export name '{name}' too long"));
    }
    let description = cli.description.clone().unwrap_or_default();
    if description.len() > MAX_STRING_SIZE {
        die(format!("export description '{description}' too long"));
    }
    ExportPlan {
        name,
        description,
        shared,
        allocation_depth: cli.allocation_depth,
        stats: crate::stats::plan(cli.stats.as_deref(), cli.stats_file.as_deref()),
    }
}

fn offset(cli: &Cli) -> u64 {
    match cli.offset.as_deref() {
        None => 0,
        // qemu_strtou64: a negative offset wraps (and fails once the image is open).
        Some(s) => {
            crate::optcheck::strtou64(s).unwrap_or_else(|| die(format!("Invalid offset '{s}'")))
        }
    }
}

fn handshake_limit(cli: &Cli) -> Option<Duration> {
    match cli.handshake_limit.as_deref() {
        None => Some(Duration::from_secs(10)),
        Some(s) => match parse_c_number(s) {
            Some(0) => None,
            Some(n) if n > 0 => Some(Duration::from_secs(n as u64)),
            _ => die(format!("Invalid handshake limit '{s}'")),
        },
    }
}

/// `-k`, `-b`, `-p`, `-t`, `--handshake-limit`, TLS.
fn listen_plan(cli: &Cli, tls: Option<Creds>, objects: &Objects) -> ListenPlan {
    if let Some(k) = &cli.socket {
        if !k.starts_with('/') {
            die("socket path must be absolute");
        }
    }
    // getaddrinfo reads it when the socket is made (a number, a service name, or empty).
    let port = cli.port.clone().unwrap_or_else(|| DEFAULT_PORT.to_string());
    ListenPlan {
        activated: socket_activation(cli),
        socket: cli.socket.as_ref().map(PathBuf::from),
        selinux_label: cli.selinux_label.clone(),
        bind: cli.bind.clone().unwrap_or_else(|| "0.0.0.0".into()),
        port,
        persistent: cli.persistent,
        handshake_limit: handshake_limit(cli),
        tls: tls.map(|creds| {
            Arc::new(ServerTls {
                creds,
                authz: cli
                    .tls_authz
                    .as_ref()
                    .map(|id| (id.clone(), objects.authz(id))),
            })
        }),
    }
}

/// systemd socket activation, refused with qemu-nbd's messages when options name another
/// socket or when more than one was passed.
fn socket_activation(cli: &Cli) -> bool {
    let n = crate::listen::activation_fds().unwrap_or_else(|e| die(e));
    if n == 0 {
        return false;
    }
    let conflict = if cli.connect.is_some() {
        Some("NBD device can't be set when using socket activation")
    } else if cli.socket.is_some() {
        Some("Unix socket can't be set when using socket activation")
    } else if cli.bind.is_some() {
        Some("The interface can't be set when using socket activation")
    } else if cli.port.is_some() {
        Some("TCP port number can't be set when using socket activation")
    } else if cli.selinux_label.is_some() {
        Some("SELinux label can't be set when using socket activation")
    } else if cli.list {
        Some("List mode is incompatible with socket activation")
    } else {
        None
    };
    if let Some(msg) = conflict {
        die(msg);
    }
    if n > 1 {
        die("qemu-nbd does not support socket activation with LISTEN_FDS > 1");
    }
    true
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

/// The image to open: from `--image-opts`, or from FILE and `-f`, `-r`, `-s`, `-l`, the
/// cache and discard modes.
fn image_plan(cli: &Cli, objects: &Objects) -> ImagePlan {
    let (cache, detect_zeroes, discard) = image_modes(cli);
    let load_snapshot = cli.load_snapshot.as_deref().map(qnbd::snapshot_param);
    let aio = match cli.aio.as_deref() {
        None => AioMode::Threads,
        Some(m) => AioMode::from_name(m).unwrap_or_else(|| die(format!("Invalid aio mode '{m}'"))),
    };
    let file = cli.args[0].clone();
    // A `json:` file name is the image's options, read as `--image-opts` reads them.
    let json = !cli.image_opts && file.starts_with(qnbd::json_filename::PREFIX);
    let opts = if cli.image_opts || json {
        // Completed from the option string by resolve_image_opts.
        ImageOptions {
            read_only: cli.read_only,
            snapshot: cli.snapshot,
            load_snapshot: load_snapshot.clone(),
            discard,
            direct: cache.direct(),
            aio,
            ..Default::default()
        }
    } else {
        let format = cli.format.as_deref().and_then(Format::from_name);
        ImageOptions {
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
        }
    };
    ImagePlan {
        file,
        opts,
        cache,
        detect_zeroes,
        offset: offset(cli),
        load_snapshot: load_snapshot.is_some(),
        bitmaps: cli.bitmap.clone(),
        unknown_format: cli
            .format
            .clone()
            .filter(|f| !cli.image_opts && Format::from_name(f).is_none()),
        after_open: None,
        image_opts: (cli.image_opts || json).then(|| ImageOptsInput {
            format_given: cli.image_opts && cli.format.is_some(),
            aio: cli.aio.is_some().then_some(aio),
            // The passphrase of `key-secret=`, looked up now: the objects are not kept.
            key: parse_image_opts(
                &cli.args[0],
                cli.read_only,
                json.then_some(cli.format.as_deref()),
            )
            .ok()
            .and_then(|p| p.image.encrypt.key_secret)
            .and_then(|id| objects.secret(&id)),
            json: json.then(|| cli.format.clone()),
        }),
    }
}

/// An `--image-opts` string, or (`json` with `-f`'s driver) a `json:` file name.
fn parse_image_opts(
    file: &str,
    read_only: bool,
    json: Option<Option<&str>>,
) -> Result<qnbd::image_opts::ParsedImageOpts, String> {
    match json {
        Some(format) => qnbd::json_filename::parse(file, read_only, format),
        None => qnbd::image_opts::parse(file, read_only),
    }
}

fn kernel_api(cli: &Cli) -> Api {
    match cli.kernel_api.as_deref() {
        None | Some("auto") => Api::Auto,
        Some("netlink") => Api::Netlink,
        Some("ioctl") => Api::Ioctl,
        Some(a) => die(format!("Invalid kernel API '{a}' (auto, netlink or ioctl)")),
    }
}

fn connections(cli: &Cli) -> usize {
    match cli.connections.as_deref() {
        None => 1,
        Some(s) => match parse_c_number(s) {
            Some(n) if (1..=64).contains(&n) => n as usize,
            _ => die(format!("Invalid number of connections '{s}'")),
        },
    }
}

/// The image plan with `--image-opts`' option string read, as qemu-nbd reads it when it
/// opens the image: `-f` refused, qemu's warnings, then the options. The option string
/// decides; command-line modes still apply where it is silent.
pub fn resolve_image_opts(plan: &ImagePlan) -> Option<ImagePlan> {
    let input = plan.image_opts.as_ref()?;
    if input.format_given {
        die("--image-opts and -f are mutually exclusive");
    }
    let file = &plan.file;
    let json = input.json.as_ref().map(|f| f.as_deref());
    if json.is_none() {
        for w in qnbd::image_opts::warnings(file) {
            eprintln!("{}: warning: {w}", crate::prog::name());
        }
    }
    let p = match parse_image_opts(file, plan.opts.read_only, json) {
        Ok(p) => p,
        Err(e) => die(format!("Failed to blk_new_open '{file}': {e}")),
    };
    for w in &p.image.warnings {
        eprintln!("{}: warning: {w}", crate::prog::name());
    }
    let mut cache = plan.cache;
    let mut detect_zeroes = plan.detect_zeroes;
    if p.cache != CacheMode::Writeback {
        cache = p.cache;
    }
    if p.detect_zeroes != DetectZeroes::Off {
        detect_zeroes = p.detect_zeroes;
    }
    // qemu-nbd asks a writable export of a node the options made read-only (-s too).
    let refused_read_only =
        (p.node_read_only && !plan.opts.read_only && plan.opts.load_snapshot.is_none())
            .then(|| "Block node is read-only".to_string());
    let mut image = p.image;
    image.snapshot |= plan.opts.snapshot;
    image.load_snapshot = plan.opts.load_snapshot.clone();
    image.read_only |= plan.opts.load_snapshot.is_some();
    image.discard |= plan.opts.discard;
    image.direct |= cache.direct();
    if let Some(aio) = input.aio {
        image.aio = aio;
    }
    // A missing secret object is the driver's error.
    image.encrypt.key = input.key.clone();
    Some(ImagePlan {
        file: file.clone(),
        opts: image,
        cache,
        detect_zeroes,
        offset: plan.offset,
        load_snapshot: plan.load_snapshot,
        bitmaps: plan.bitmaps.clone(),
        unknown_format: None,
        after_open: p
            .unknown_option
            .or(refused_read_only)
            .map(|e| format!("Failed to blk_new_open '{file}': {e}")),
        image_opts: None,
    })
}
