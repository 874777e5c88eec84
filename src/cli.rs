//! The qemu-nbd command line: every option of `qemu-nbd --help` (10.0.2), with the same short
//! and long spellings, `=` and separate-argument forms and unambiguous long prefixes.

use clap::{ArgAction, Parser, ValueHint};

#[derive(Parser, Debug, Default)]
#[command(
    name = "qnbd",
    about = "a qemu-nbd compatible NBD server, kernel binder and client",
    long_about = LONG_ABOUT,
    disable_help_flag = true,
    disable_version_flag = true,
    infer_long_args = true,
    allow_negative_numbers = true
)]
pub struct Cli {
    #[arg(short = 'h', long = "help", action = ArgAction::SetTrue,
          help = "display this help and exit")]
    pub help: bool,
    #[arg(short = 'V', long = "version", action = ArgAction::SetTrue,
          help = "output version information and exit")]
    pub version: bool,

    #[arg(
        short = 'p',
        long = "port",
        value_name = "PORT",
        help_heading = "Connection properties",
        help = "port to listen on (default `10809')"
    )]
    pub port: Option<String>,
    #[arg(short = 'b', long = "bind", value_name = "IFACE", value_hint = ValueHint::Hostname,
          help_heading = "Connection properties",
          help = "interface to bind to (default `0.0.0.0')")]
    pub bind: Option<String>,
    #[arg(short = 'k', long = "socket", value_name = "PATH", value_hint = ValueHint::FilePath,
          help_heading = "Connection properties",
          help = "path to the unix socket (default '/var/lock/qemu-nbd-DEVICE')")]
    pub socket: Option<String>,
    #[arg(
        short = 'e',
        long = "shared",
        value_name = "NUM",
        help_heading = "Connection properties",
        help = "device can be shared by NUM clients (default '1')"
    )]
    pub shared: Option<String>,
    #[arg(short = 't', long = "persistent", action = ArgAction::SetTrue,
          help_heading = "Connection properties",
          help = "don't exit on the last connection")]
    pub persistent: bool,
    #[arg(short = 'v', long = "verbose", action = ArgAction::Count,
          help_heading = "Connection properties",
          help = "display extra debugging information")]
    pub verbose: u8,
    #[arg(
        short = 'x',
        long = "export-name",
        value_name = "NAME",
        help_heading = "Connection properties",
        help = "expose export by name (default is empty string)"
    )]
    pub export_name: Option<String>,
    #[arg(
        short = 'D',
        long = "description",
        value_name = "TEXT",
        help_heading = "Connection properties",
        help = "export a human-readable description"
    )]
    pub description: Option<String>,
    #[arg(
        long = "handshake-limit",
        value_name = "N",
        help_heading = "Connection properties",
        help = "limit client's handshake to N seconds (default 10)"
    )]
    pub handshake_limit: Option<String>,

    #[arg(
        short = 'o',
        long = "offset",
        value_name = "OFFSET",
        help_heading = "Exposing part of the image",
        help = "offset into the image"
    )]
    pub offset: Option<String>,
    #[arg(short = 'A', long = "allocation-depth", action = ArgAction::SetTrue,
          help_heading = "Exposing part of the image",
          help = "expose the allocation depth")]
    pub allocation_depth: bool,
    #[arg(
        short = 'B',
        long = "bitmap",
        value_name = "NAME",
        help_heading = "Exposing part of the image",
        help = "expose a persistent dirty bitmap"
    )]
    pub bitmap: Vec<String>,

    #[arg(short = 'L', long = "list", action = ArgAction::SetTrue,
          help_heading = "General purpose options",
          help = "list exports available from another NBD server")]
    pub list: bool,
    #[arg(long = "json", action = ArgAction::SetTrue,
          help_heading = "General purpose options",
          help = "with -L, print the list as JSON")]
    pub json: bool,
    #[arg(
        long = "object",
        value_name = "type,id=ID,...",
        help_heading = "General purpose options",
        help = "define an object such as 'secret' for providing passwords and/or encryption keys"
    )]
    pub object: Vec<String>,
    #[arg(
        long = "tls-creds",
        value_name = "ID",
        help_heading = "General purpose options",
        help = "use id of an earlier --object to provide TLS"
    )]
    pub tls_creds: Option<String>,
    #[arg(
        long = "tls-authz",
        value_name = "ID",
        help_heading = "General purpose options",
        help = "use id of an earlier --object to provide authorization"
    )]
    pub tls_authz: Option<String>,
    #[arg(long = "tls-hostname", value_name = "HOSTNAME", value_hint = ValueHint::Hostname,
          help_heading = "General purpose options",
          help = "override hostname used to check x509 certificate")]
    pub tls_hostname: Option<String>,
    #[arg(
        short = 'T',
        long = "trace",
        value_name = "[[enable=]<pattern>][,events=<file>][,file=<file>]",
        help_heading = "General purpose options",
        help = "specify tracing options"
    )]
    pub trace: Vec<String>,
    #[arg(long = "fork", action = ArgAction::SetTrue,
          help_heading = "General purpose options",
          help = "fork off the server process and exit the parent once the server is running")]
    pub fork: bool,
    #[arg(long = "pid-file", value_name = "PATH", value_hint = ValueHint::FilePath,
          help_heading = "General purpose options",
          help = "store the server's process ID in the given file")]
    pub pid_file: Option<String>,
    #[arg(
        long = "selinux-label",
        value_name = "LABEL",
        help_heading = "General purpose options",
        help = "set SELinux process label on listening socket"
    )]
    pub selinux_label: Option<String>,
    #[arg(long = "stats", num_args = 0..=1, require_equals = true,
          default_missing_value = "text", value_name = "FORMAT",
          help_heading = "General purpose options",
          help = "count requests, bytes, errors and latency per command; report on SIGUSR1 and at exit (FORMAT: text, json)")]
    pub stats: Option<String>,
    #[arg(long = "stats-file", value_name = "PATH", value_hint = ValueHint::FilePath,
          help_heading = "General purpose options",
          help = "append the reports to PATH rather than stderr")]
    pub stats_file: Option<String>,

    #[arg(short = 'c', long = "connect", value_name = "DEV", value_hint = ValueHint::FilePath,
          help_heading = "Kernel NBD client support",
          help = "connect FILE to the local NBD device DEV ('auto': the first free device, printed)")]
    pub connect: Option<String>,
    #[arg(short = 'd', long = "disconnect", action = ArgAction::SetTrue,
          help_heading = "Kernel NBD client support",
          help = "disconnect the specified device")]
    pub disconnect: bool,
    #[arg(
        long = "connections",
        value_name = "N",
        help_heading = "Kernel NBD client support",
        help = "bind N sockets to the device (multi-conn)"
    )]
    pub connections: Option<String>,
    #[arg(
        long = "kernel-api",
        value_name = "API",
        help_heading = "Kernel NBD client support",
        help = "auto (default), netlink or ioctl"
    )]
    pub kernel_api: Option<String>,

    #[arg(long = "ublk-queues", value_name = "N", help_heading = UBLK,
          help = "hardware queues (default: one per CPU, at most 4)")]
    pub ublk_queues: Option<String>,
    #[arg(long = "ublk-depth", value_name = "N", help_heading = UBLK,
          help = "requests in flight per queue (default 128)")]
    pub ublk_depth: Option<String>,
    #[arg(long = "recover", action = ArgAction::SetTrue, help_heading = UBLK,
          help = "with -c /dev/ublkbN: take back the device after its server died (a mounted filesystem carries on)")]
    pub recover: bool,

    #[arg(
        short = 'f',
        long = "format",
        value_name = "FORMAT",
        help_heading = "Block device options",
        help = "set image format (raw, qcow2, ...)"
    )]
    pub format: Option<String>,
    #[arg(short = 'r', long = "read-only", action = ArgAction::SetTrue,
          help_heading = "Block device options",
          help = "export read-only")]
    pub read_only: bool,
    #[arg(short = 's', long = "snapshot", action = ArgAction::SetTrue,
          help_heading = "Block device options",
          help = "use FILE as an external snapshot, create a temporary file with backing_file=FILE, redirect the write to the temporary one")]
    pub snapshot: bool,
    #[arg(
        short = 'l',
        long = "load-snapshot",
        value_name = "SNAPSHOT_PARAM",
        help_heading = "Block device options",
        help = "load an internal snapshot inside FILE and export it as an read-only device, SNAPSHOT_PARAM format is 'snapshot.id=[ID],snapshot.name=[NAME]', or '[ID_OR_NAME]'"
    )]
    pub load_snapshot: Option<String>,
    #[arg(short = 'n', long = "nocache", action = ArgAction::SetTrue,
          help_heading = "Block device options",
          help = "disable host cache")]
    pub nocache: bool,
    #[arg(
        long = "cache",
        value_name = "MODE",
        help_heading = "Block device options",
        help = "set cache mode used to access the disk image, the valid options are: 'none', 'writeback' (default), 'writethrough', 'directsync' and 'unsafe'"
    )]
    pub cache: Option<String>,
    #[arg(
        long = "aio",
        value_name = "MODE",
        help_heading = "Block device options",
        help = "set AIO mode (native, io_uring or threads)"
    )]
    pub aio: Option<String>,
    #[arg(
        long = "discard",
        value_name = "MODE",
        help_heading = "Block device options",
        help = "set discard mode (ignore, unmap)"
    )]
    pub discard: Option<String>,
    #[arg(
        long = "detect-zeroes",
        value_name = "MODE",
        help_heading = "Block device options",
        help = "set detect-zeroes mode (off, on, unmap)"
    )]
    pub detect_zeroes: Option<String>,
    #[arg(long = "image-opts", action = ArgAction::SetTrue,
          help_heading = "Block device options",
          help = "treat FILE as a full set of image options")]
    pub image_opts: bool,

    /// FILE, or with -d the device.
    #[arg(value_name = "FILE", value_hint = ValueHint::FilePath)]
    pub args: Vec<String>,
}

const UBLK: &str = "Local ublk block devices (beyond qemu-nbd; needs the ublk_drv module)";

/// What the man page says before the options.
const LONG_ABOUT: &str = "\
qnbd exports a disk image (raw or qcow2, a slice of one with -o, a throw-away snapshot with -s) \
over the NBD protocol, on TCP or a Unix socket, binds one to a kernel NBD device (-c /dev/nbdN) \
or a ublk device (-c ublk), and lists a remote server's exports (-L). It takes every option of \
qemu-nbd 10.0.2, with the same spellings, checks and messages, so a script that runs qemu-nbd \
runs qnbd unchanged.";

/// Lines printed under a heading before its options: usage forms that are no option of
/// their own.
fn heading_notes(heading: &str) -> &'static [(&'static str, &'static str)] {
    match heading {
        UBLK => &[
            (
                "-c ublk",
                "serve FILE as the next free /dev/ublkbN (printed)",
            ),
            ("-c /dev/ublkbN", "serve FILE as /dev/ublkbN"),
            ("-d /dev/ublkbN", "stop and delete the device"),
        ],
        _ => &[],
    }
}

/// The help column starts here; lines end by column 80, as qemu-nbd's.
const HELP_COLUMN: usize = 28;
const WIDTH: usize = 80;

/// An option as the help's left column shows it: `-p, --port=PORT`, `    --fork`.
fn option_column(a: &clap::Arg) -> String {
    let mut s = match a.get_short() {
        Some(c) => format!("  -{c}, "),
        None => "      ".to_string(),
    };
    if let Some(l) = a.get_long() {
        s += &format!("--{l}");
    }
    if a.get_action().takes_values() {
        let name = a
            .get_value_names()
            .and_then(|v| v.first())
            .map(|n| n.to_string())
            .unwrap_or_default();
        let optional = a.get_num_args().is_some_and(|n| n.min_values() == 0);
        s += &if optional {
            format!("[={name}]")
        } else {
            format!("={name}")
        };
    }
    s
}

/// `left` and `help`, the help wrapped at word boundaries into the right column.
fn help_entry(out: &mut String, left: &str, help: &str) {
    let pad = " ".repeat(HELP_COLUMN);
    let mut line = if left.len() + 2 > HELP_COLUMN {
        format!("{left}\n{pad}")
    } else {
        format!("{left:<HELP_COLUMN$}")
    };
    let mut used = 0;
    for word in help.split_whitespace() {
        if used > 0 && HELP_COLUMN + used + 1 + word.len() > WIDTH {
            out.push_str(line.trim_end());
            out.push('\n');
            line = pad.clone();
            used = 0;
        }
        if used > 0 {
            line.push(' ');
            used += 1;
        }
        line.push_str(word);
        used += word.len();
    }
    out.push_str(line.trim_end());
    out.push('\n');
}

/// The option list of `--help`, built from the definition above, grouped under qemu-nbd's
/// headings in its order.
fn options_help() -> String {
    let cmd = <Cli as clap::CommandFactory>::command();
    let mut out = String::new();
    let mut heading: Option<&str> = None;
    for a in cmd.get_arguments().filter(|a| !a.is_positional()) {
        if a.get_help_heading() != heading {
            heading = a.get_help_heading();
            let name = heading.unwrap_or_default();
            out += &format!("\n{name}:\n");
            for (form, help) in heading_notes(name) {
                help_entry(&mut out, &format!("  {form}"), help);
            }
        }
        let help = a.get_help().map(|h| h.to_string()).unwrap_or_default();
        help_entry(&mut out, &option_column(a), &help);
    }
    out
}

/// `--help` for a program started as `invocation` (argv[0], which qemu-nbd's usage prints).
pub fn help(invocation: &str) -> String {
    format!(
        "Usage: {invocation} [OPTIONS] FILE\n  or:  {invocation} -L [OPTIONS]\n\
         qnbd: a qemu-nbd compatible Network Block Device server\n\n{}",
        options_help()
    )
}

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
    fn help_shows_every_option_under_its_heading() {
        let text = help("qnbd");
        let cmd = <Cli as clap::CommandFactory>::command();
        for a in cmd.get_arguments().filter(|a| !a.is_positional()) {
            let long = format!("--{}", a.get_long().unwrap());
            assert!(text.contains(&long), "{long} missing from --help");
            assert!(a.get_help().is_some(), "{long} has no help text");
        }
        for heading in [
            "Connection properties:",
            "Exposing part of the image:",
            "General purpose options:",
            "Kernel NBD client support:",
            "Block device options:",
        ] {
            assert_eq!(text.matches(heading).count(), 1, "{heading}");
        }
        assert!(text.lines().all(|l| l.len() <= WIDTH || !l.contains(' ')));
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
