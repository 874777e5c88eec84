//! qnbd: a qemu-nbd compatible command line over the `backends` and `frontends` crates.
//! This crate only maps options onto them: no protocol and no image format here.

mod cleanup;
mod cli;
mod connect;
mod daemon;
mod list;
mod listen;
mod prog;
mod serve;

use clap::Parser;
use cli::Cli;
use qnbd::{image_opts, object};

/// Print `NAME: MSG` and exit 1, as qemu-nbd's error_report + exit(EXIT_FAILURE); NAME is
/// the program's name (`prog::name`), `qemu-nbd` when installed as qemu-nbd.
/// Whatever was created so far is undone first (the image closed, the overlay removed).
pub fn die(msg: impl std::fmt::Display) -> ! {
    eprintln!("{}: {msg}", prog::name());
    cleanup::run_on_error();
    std::process::exit(1);
}

fn init_logging(verbose: u8, trace: bool) {
    use tracing_subscriber::EnvFilter;
    let level = match (verbose, trace) {
        (_, true) | (3.., _) => "trace",
        (2, _) => "debug",
        (1, _) => "info",
        _ => "warn",
    };
    // rustls warns about clients' harmless quirks (an IP address sent as SNI) on every
    // connection; qemu-nbd says nothing there, so only its errors get through by default.
    let filter = EnvFilter::try_from_env("QNBD_LOG")
        .unwrap_or_else(|_| EnvFilter::new(format!("{level},rustls=error")));
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

fn main() {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind;
            let text = e.to_string();
            let first = text
                .lines()
                .next()
                .unwrap_or("")
                .trim_start_matches("error: ");
            let msg = match e.kind() {
                ErrorKind::UnknownArgument => {
                    let arg = first.split('\'').nth(1).unwrap_or(first);
                    if arg.starts_with("--") {
                        format!("unrecognized option '{arg}'")
                    } else {
                        format!("invalid option -- '{}'", arg.trim_start_matches('-'))
                    }
                }
                _ => first.to_string(),
            };
            // getopt's complaint names argv[0] whole; qemu-nbd's hint is an error_report.
            eprintln!("{}: {msg}", prog::invocation());
            die(format!(
                "Try `{} --help' for more information.",
                prog::invocation()
            ));
        }
    };
    if cli.help {
        print!("{}", cli::help(prog::invocation()));
        return;
    }
    for o in &cli.object {
        if let Some(text) = object::help(o) {
            print!("{text}");
            return;
        }
    }
    if cli.version {
        print!("{}", cli::version(prog::invocation()));
        return;
    }
    init_logging(cli.verbose, !cli.trace.is_empty());
    serve::run(cli);
}
