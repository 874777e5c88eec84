//! The qemu-nbd command line: every option of `qemu-nbd --help` (10.0.2), with the same short
//! and long spellings, `=` and separate-argument forms and unambiguous long prefixes.

use clap::{ArgAction, Parser};

#[derive(Parser, Debug, Default)]
#[command(
    name = "qnbd",
    disable_help_flag = true,
    disable_version_flag = true,
    infer_long_args = true,
    allow_negative_numbers = true
)]
pub struct Cli {
    #[arg(short = 'h', long = "help", action = ArgAction::SetTrue)]
    pub help: bool,
    #[arg(short = 'V', long = "version", action = ArgAction::SetTrue)]
    pub version: bool,

    #[arg(short = 'p', long = "port")]
    pub port: Option<String>,
    #[arg(short = 'b', long = "bind")]
    pub bind: Option<String>,
    #[arg(short = 'k', long = "socket")]
    pub socket: Option<String>,
    #[arg(short = 'e', long = "shared")]
    pub shared: Option<String>,
    #[arg(short = 't', long = "persistent", action = ArgAction::SetTrue)]
    pub persistent: bool,
    #[arg(short = 'v', long = "verbose", action = ArgAction::Count)]
    pub verbose: u8,
    #[arg(short = 'x', long = "export-name")]
    pub export_name: Option<String>,
    #[arg(short = 'D', long = "description")]
    pub description: Option<String>,
    #[arg(long = "handshake-limit")]
    pub handshake_limit: Option<String>,

    #[arg(short = 'o', long = "offset")]
    pub offset: Option<String>,
    #[arg(short = 'A', long = "allocation-depth", action = ArgAction::SetTrue)]
    pub allocation_depth: bool,
    #[arg(short = 'B', long = "bitmap")]
    pub bitmap: Vec<String>,

    #[arg(short = 'L', long = "list", action = ArgAction::SetTrue)]
    pub list: bool,
    /// With -L: the export list as JSON.
    #[arg(long = "json", action = ArgAction::SetTrue)]
    pub json: bool,
    /// Count requests per command; report on SIGUSR1 and at exit.
    #[arg(long = "stats", num_args = 0..=1, require_equals = true, default_missing_value = "text")]
    pub stats: Option<String>,
    #[arg(long = "stats-file")]
    pub stats_file: Option<String>,
    #[arg(long = "object")]
    pub object: Vec<String>,
    #[arg(long = "tls-creds")]
    pub tls_creds: Option<String>,
    #[arg(long = "tls-authz")]
    pub tls_authz: Option<String>,
    #[arg(long = "tls-hostname")]
    pub tls_hostname: Option<String>,
    #[arg(short = 'T', long = "trace")]
    pub trace: Vec<String>,
    #[arg(long = "fork", action = ArgAction::SetTrue)]
    pub fork: bool,
    #[arg(long = "pid-file")]
    pub pid_file: Option<String>,
    #[arg(long = "selinux-label")]
    pub selinux_label: Option<String>,

    #[arg(short = 'c', long = "connect")]
    pub connect: Option<String>,
    #[arg(short = 'd', long = "disconnect", action = ArgAction::SetTrue)]
    pub disconnect: bool,
    /// Beyond qemu-nbd: sockets bound to the device with -c (netlink only).
    #[arg(long = "connections")]
    pub connections: Option<String>,
    /// Beyond qemu-nbd: how -c/-d talk to the kernel (auto, netlink, ioctl).
    #[arg(long = "kernel-api")]
    pub kernel_api: Option<String>,
    /// Beyond qemu-nbd: queues of a ublk device (-c ublk, -c /dev/ublkbN).
    #[arg(long = "ublk-queues")]
    pub ublk_queues: Option<String>,
    /// Beyond qemu-nbd: requests in flight per ublk queue.
    #[arg(long = "ublk-depth")]
    pub ublk_depth: Option<String>,
    /// Beyond qemu-nbd: with -c /dev/ublkbN, take back the device after its server died.
    #[arg(long = "recover", action = ArgAction::SetTrue)]
    pub recover: bool,

    #[arg(short = 'f', long = "format")]
    pub format: Option<String>,
    #[arg(short = 'r', long = "read-only", action = ArgAction::SetTrue)]
    pub read_only: bool,
    #[arg(short = 's', long = "snapshot", action = ArgAction::SetTrue)]
    pub snapshot: bool,
    #[arg(short = 'l', long = "load-snapshot")]
    pub load_snapshot: Option<String>,
    #[arg(short = 'n', long = "nocache", action = ArgAction::SetTrue)]
    pub nocache: bool,
    #[arg(long = "cache")]
    pub cache: Option<String>,
    #[arg(long = "aio")]
    pub aio: Option<String>,
    #[arg(long = "discard")]
    pub discard: Option<String>,
    #[arg(long = "detect-zeroes")]
    pub detect_zeroes: Option<String>,
    #[arg(long = "image-opts", action = ArgAction::SetTrue)]
    pub image_opts: bool,

    /// FILE, or with -d the device.
    pub args: Vec<String>,
}

/// `--help` for a program started as `invocation` (argv[0], which qemu-nbd's usage prints).
pub fn help(invocation: &str) -> String {
    format!("Usage: {invocation} [OPTIONS] FILE\n  or:  {invocation} -L [OPTIONS]\n{HELP_BODY}")
}

const HELP_BODY: &str = "\
qnbd: a qemu-nbd compatible Network Block Device server

  -h, --help                display this help and exit
  -V, --version             output version information and exit

Connection properties:
  -p, --port=PORT           port to listen on (default `10809')
  -b, --bind=IFACE          interface to bind to (default `0.0.0.0')
  -k, --socket=PATH         path to the unix socket
                            (default '/var/lock/qemu-nbd-DEVICE')
  -e, --shared=NUM          device can be shared by NUM clients (default '1')
  -t, --persistent          don't exit on the last connection
  -v, --verbose             display extra debugging information
  -x, --export-name=NAME    expose export by name (default is empty string)
  -D, --description=TEXT    export a human-readable description
      --handshake-limit=N   limit client's handshake to N seconds (default 10)

Exposing part of the image:
  -o, --offset=OFFSET       offset into the image
  -A, --allocation-depth    expose the allocation depth
  -B, --bitmap=NAME         expose a persistent dirty bitmap

General purpose options:
  -L, --list                list exports available from another NBD server
      --json                with -L, print the list as JSON
  --object type,id=ID,...   define an object such as 'secret' for providing
                            passwords and/or encryption keys
  --tls-creds=ID            use id of an earlier --object to provide TLS
  --tls-authz=ID            use id of an earlier --object to provide
                            authorization
  --tls-hostname=HOSTNAME   override hostname used to check x509 certificate
  -T, --trace [[enable=]<pattern>][,events=<file>][,file=<file>]
                            specify tracing options
  --fork                    fork off the server process and exit the parent
                            once the server is running
  --pid-file=PATH           store the server's process ID in the given file
  --selinux-label=LABEL     set SELinux process label on listening socket
      --stats[=FORMAT]      count requests, bytes, errors and latency per command;
                            report on SIGUSR1 and at exit (FORMAT: text, json)
      --stats-file=PATH     append the reports to PATH rather than stderr

Kernel NBD client support:
  -c, --connect=DEV         connect FILE to the local NBD device DEV
                            ('auto': the first free device, printed)
  -d, --disconnect          disconnect the specified device
      --connections=N       bind N sockets to the device (multi-conn)
      --kernel-api=API      auto (default), netlink or ioctl

Local ublk block devices (beyond qemu-nbd; needs the ublk_drv module):
  -c ublk                   serve FILE as the next free /dev/ublkbN (printed)
  -c /dev/ublkbN            serve FILE as /dev/ublkbN
  -d /dev/ublkbN            stop and delete the device
      --ublk-queues=N       hardware queues (default: one per CPU, at most 4)
      --ublk-depth=N        requests in flight per queue (default 128)
      --recover             with -c /dev/ublkbN: take back the device after its
                            server died (a mounted filesystem carries on)

Block device options:
  -f, --format=FORMAT       set image format (raw, qcow2, ...)
  -r, --read-only           export read-only
  -s, --snapshot            use FILE as an external snapshot, create a temporary
                            file with backing_file=FILE, redirect the write to
                            the temporary one
  -l, --load-snapshot=SNAPSHOT_PARAM
                            load an internal snapshot inside FILE and export it
                            as an read-only device, SNAPSHOT_PARAM format is
                            'snapshot.id=[ID],snapshot.name=[NAME]', or
                            '[ID_OR_NAME]'
  -n, --nocache             disable host cache
      --cache=MODE          set cache mode used to access the disk image, the
                            valid options are: 'none', 'writeback' (default),
                            'writethrough', 'directsync' and 'unsafe'
      --aio=MODE            set AIO mode (native, io_uring or threads)
      --discard=MODE        set discard mode (ignore, unmap)
      --detect-zeroes=MODE  set detect-zeroes mode (off, on, unmap)
      --image-opts          treat FILE as a full set of image options
";

/// `-V` for a program started as `invocation` (argv[0], which qemu-nbd's version prints).
pub fn version(invocation: &str) -> String {
    format!(
        "{invocation} {} (compatible with qemu-nbd 10.0.2)\n\
         A Rust reimplementation of qemu-nbd.\n",
        env!("CARGO_PKG_VERSION")
    )
}

/// Parse a number as qemu_strtoi64 with base 0 does: decimal, 0x hex or 0 octal, no suffix.
pub fn parse_c_number(s: &str) -> Option<i64> {
    let t = s.trim_start();
    let (neg, t) = match t.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, t.strip_prefix('+').unwrap_or(t)),
    };
    let v = if let Some(h) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        i64::from_str_radix(h, 16).ok()?
    } else if t.len() > 1 && t.starts_with('0') {
        i64::from_str_radix(&t[1..], 8).ok()?
    } else {
        t.parse::<i64>().ok()?
    };
    Some(if neg { -v } else { v })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Cli {
        Cli::try_parse_from(std::iter::once("qnbd").chain(args.iter().copied())).unwrap()
    }

    #[test]
    fn spellings_of_qemu_nbd_are_accepted() {
        let c = parse(&[
            "-p",
            "10810",
            "--bind=127.0.0.1",
            "-x",
            "n",
            "--persist",
            "-e3",
            "img",
        ]);
        assert_eq!(c.port.as_deref(), Some("10810"));
        assert_eq!(c.bind.as_deref(), Some("127.0.0.1"));
        assert!(c.persistent);
        assert_eq!(c.shared.as_deref(), Some("3"));
        assert_eq!(c.args, vec!["img"]);
        let c = parse(&["-e", "-1", "img", "-vv"]);
        assert_eq!(c.shared.as_deref(), Some("-1"));
        assert_eq!(c.verbose, 2);
    }

    #[test]
    fn c_numbers() {
        assert_eq!(parse_c_number("4096"), Some(4096));
        assert_eq!(parse_c_number("0x1000"), Some(4096));
        assert_eq!(parse_c_number("010"), Some(8));
        assert_eq!(parse_c_number("1M"), None);
        assert_eq!(parse_c_number("abc"), None);
        assert_eq!(parse_c_number("-1"), Some(-1));
    }
}
