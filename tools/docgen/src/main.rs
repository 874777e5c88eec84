//! `qnbd-docgen OUTDIR`: the man page (`OUTDIR/qnbd.1`) and the bash, zsh and fish
//! completions (`OUTDIR/completions/`) from qnbd's clap definition, so that neither can
//! drift from the options the binary takes. The Debian package and `make install`-style
//! installs ship what this writes.

use clap::{Arg, Command, CommandFactory};
use clap_complete::Shell;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// Values the shells can offer; the binary checks them itself (with qemu-nbd's messages),
/// so they are not in its parser.
const VALUES: &[(&str, &[&str])] = &[
    ("format", &["raw", "qcow2", "luks"]),
    (
        "cache",
        &["none", "writeback", "writethrough", "directsync", "unsafe"],
    ),
    ("aio", &["threads", "native", "io_uring"]),
    ("discard", &["ignore", "unmap", "off", "on"]),
    ("detect_zeroes", &["off", "on", "unmap"]),
    ("kernel_api", &["auto", "netlink", "ioctl"]),
    ("stats", &["text", "json"]),
];

fn command() -> Command {
    let mut cmd = qnbd::cli::Cli::command().version(env!("CARGO_PKG_VERSION"));
    for (id, values) in VALUES {
        cmd = cmd.mut_arg(*id, |a| a.value_parser(values.to_vec()));
    }
    cmd
}

fn main() {
    let Some(out) = std::env::args_os().nth(1).map(PathBuf::from) else {
        eprintln!("usage: qnbd-docgen OUTDIR");
        std::process::exit(2);
    };
    if let Err(e) = write_all(&out) {
        eprintln!("qnbd-docgen: {}: {e}", out.display());
        std::process::exit(1);
    }
}

fn write_all(out: &Path) -> std::io::Result<()> {
    let completions = out.join("completions");
    std::fs::create_dir_all(&completions)?;
    std::fs::write(out.join("qnbd.1"), man_page(&command())?)?;
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        clap_complete::generate_to(shell, &mut command(), "qnbd", &completions)?;
    }
    Ok(())
}

/// roff text: backslashes and hyphens escaped, no line starting as a request.
fn esc(s: &str) -> String {
    let t = s.replace('\\', "\\e").replace('-', "\\-");
    if t.starts_with('.') || t.starts_with('\'') {
        format!("\\&{t}")
    } else {
        t
    }
}

fn option_name(a: &Arg) -> String {
    let mut s = String::new();
    if let Some(c) = a.get_short() {
        let _ = write!(s, "\\fB\\-{c}\\fR, ");
    }
    if let Some(l) = a.get_long() {
        let _ = write!(s, "\\fB\\-\\-{}\\fR", esc(l));
    }
    if a.get_action().takes_values() {
        let name = a
            .get_value_names()
            .and_then(|v| v.first())
            .map(|n| esc(n))
            .unwrap_or_default();
        if a.get_num_args().is_some_and(|n| n.min_values() == 0) {
            let _ = write!(s, "[=\\fI{name}\\fR]");
        } else {
            let _ = write!(s, "=\\fI{name}\\fR");
        }
    }
    s
}

/// The options under their `--help` headings, each a tagged paragraph.
fn options_section(cmd: &Command) -> String {
    let mut s = String::from(".SH OPTIONS\n");
    let mut heading: Option<&str> = None;
    for a in cmd.get_arguments().filter(|a| !a.is_positional()) {
        if a.get_help_heading() != heading {
            heading = a.get_help_heading();
            if let Some(h) = heading {
                let _ = writeln!(s, ".SS \"{}\"", esc(h));
            }
        }
        let help = a.get_help().map(|h| h.to_string()).unwrap_or_default();
        let _ = writeln!(s, ".TP\n{}\n{}", option_name(a), esc(&help));
        if let Some(values) = VALUES.iter().find(|(id, _)| *id == a.get_id().as_str()) {
            let _ = writeln!(s, "Values: {}.", esc(&values.1.join(", ")));
        }
    }
    s
}

const SYNOPSIS: &str = r#".SH SYNOPSIS
\fBqnbd\fR [\fIOPTIONS\fR] \fIFILE\fR
.br
\fBqnbd\fR \fB\-L\fR [\fIOPTIONS\fR]
.br
\fBqnbd\fR \fB\-c\fR \fIDEV\fR|\fBauto\fR|\fBublk\fR [\fIOPTIONS\fR] \fIFILE\fR
.br
\fBqnbd\fR \fB\-d\fR \fIDEV\fR
"#;

const AFTER: &str = r#".SH SIGNALS
SIGTERM, SIGINT and SIGHUP end the server cleanly: a device bound with \fB\-c\fR is
disconnected, the image is flushed and closed, and the Unix socket, the temporary
overlay of \fB\-s\fR and the pid file are removed.
With \fB\-\-stats\fR, SIGUSR1 prints the counters and the server goes on.
.SH ENVIRONMENT
.TP
\fBLISTEN_PID\fR, \fBLISTEN_FDS\fR
systemd socket activation: serve on the socket passed as file descriptor 3.
.TP
\fBQNBD_LOG\fR
qnbd's own diagnostics on stderr, as a tracing filter (for example \fIdebug\fR or
\fIfrontends=trace\fR); \fB\-v\fR prints only what qemu\-nbd's prints.
.SH EXIT STATUS
0 when the server ends normally (the last client left, or a signal); 1 on an error, with
a message on stderr as qemu\-nbd prints it.
.SH EXAMPLES
Serve a qcow2 image read\-only on a Unix socket:
.RS
.nf
qnbd \-r \-f qcow2 \-k /run/disk.sock disk.qcow2
.fi
.RE
Mount a guest image's first partition through the kernel, then let it go:
.RS
.nf
qnbd \-c /dev/nbd0 disk.qcow2
mount /dev/nbd0p1 /mnt
umount /mnt
qnbd \-d /dev/nbd0
.fi
.RE
Serve a throw\-away snapshot to several clients over TCP, with statistics as JSON:
.RS
.nf
qnbd \-s \-t \-e 0 \-b 127.0.0.1 \-\-stats=json \-\-stats\-file=stats.json disk.raw
kill \-USR1 $(pidof qnbd)
.fi
.RE
List a server's exports as JSON:
.RS
.nf
qnbd \-L \-\-json \-k /run/disk.sock
.fi
.RE
.SH SEE ALSO
\fBqemu\-nbd\fR(8), \fBnbd\-client\fR(8), \fBnbdinfo\fR(1), \fBqemu\-img\fR(1)
"#;

fn man_page(cmd: &Command) -> std::io::Result<Vec<u8>> {
    let man = clap_mangen::Man::new(cmd.clone())
        .section("1")
        .manual("qnbd manual");
    let mut out = Vec::new();
    man.render_title(&mut out)?;
    man.render_name_section(&mut out)?;
    out.extend_from_slice(SYNOPSIS.as_bytes());
    man.render_description_section(&mut out)?;
    out.extend_from_slice(options_section(cmd).as_bytes());
    out.extend_from_slice(AFTER.as_bytes());
    man.render_version_section(&mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command as Run;

    /// Say loudly what did not run; under scripts/test.sh (QNBD_REQUIRE_TOOLS) fail.
    fn missing(tool: &str, what: &str) {
        eprintln!("SKIPPED: {tool} is not installed; {what}");
        assert!(
            std::env::var_os("QNBD_REQUIRE_TOOLS").is_none(),
            "{tool} is required (QNBD_REQUIRE_TOOLS is set)"
        );
    }

    #[test]
    fn man_page_names_every_option_and_renders_cleanly() {
        let cmd = command();
        let page = String::from_utf8(man_page(&cmd).unwrap()).unwrap();
        for a in cmd.get_arguments().filter(|a| !a.is_positional()) {
            let long = format!("\\-\\-{}", esc(a.get_long().unwrap()));
            assert!(page.contains(&long), "{long} missing");
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qnbd.1");
        std::fs::write(&path, &page).unwrap();
        // groff's warnings name any malformed request.
        match Run::new("groff")
            .args(["-man", "-Tutf8", "-ww", "-z"])
            .arg(&path)
            .output()
        {
            Ok(out) => assert!(
                out.status.success() && out.stderr.is_empty(),
                "groff: {}",
                String::from_utf8_lossy(&out.stderr)
            ),
            Err(_) => missing("groff", "the man page was not rendered"),
        }
    }

    #[test]
    fn completions_load_in_their_shells() {
        let dir = tempfile::tempdir().unwrap();
        write_all(dir.path()).unwrap();
        let c = dir.path().join("completions");
        let checks = [
            (
                "bash",
                vec!["-n".to_string(), c.join("qnbd.bash").display().to_string()],
            ),
            (
                "zsh",
                vec!["-n".to_string(), c.join("_qnbd").display().to_string()],
            ),
            (
                "fish",
                vec!["-n".to_string(), c.join("qnbd.fish").display().to_string()],
            ),
        ];
        for (shell, args) in checks {
            match Run::new(shell).args(&args).output() {
                Ok(out) => assert!(
                    out.status.success(),
                    "{shell}: {}",
                    String::from_utf8_lossy(&out.stderr)
                ),
                Err(_) => missing(shell, "its completion was not parsed"),
            }
        }
        let bash = std::fs::read_to_string(c.join("qnbd.bash")).unwrap();
        assert!(bash.contains("--detect-zeroes") && bash.contains("writethrough"));
    }
}
