//! qnbd: a qemu-nbd compatible command line over the `backends` and `frontends` crates.
//! This crate only maps options onto them: no protocol and no image format here.

mod cleanup;
mod connect;
mod daemon;
mod export;
mod image;
mod list;
mod listen;
mod logging;
mod optcheck;
mod plan;
mod prog;
mod serve;
mod stats;
mod ublk;

use clap::Parser;
use plan::Plan;
use qnbd::cli::{self, Cli};
use qnbd::object;

/// Print `NAME: MSG` and exit 1, as qemu-nbd's error_report + exit(EXIT_FAILURE); NAME is
/// the program's name (`prog::name`), `qemu-nbd` when installed as qemu-nbd.
/// Whatever was created so far is undone first (the image closed, the overlay removed).
pub fn die(msg: impl std::fmt::Display) -> ! {
    eprintln!("{}: {msg}", prog::name());
    cleanup::run_on_error();
    std::process::exit(1);
}

fn main() {
    let cli = parse_cli();
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
    let trace = logging::TraceSpec::parse(&cli.trace).unwrap_or_else(|e| {
        eprintln!("{e}");
        std::process::exit(1)
    });
    if trace.help {
        for name in logging::EVENTS {
            println!("{name}");
        }
        return;
    }
    if let Err(e) = logging::init(&trace) {
        eprintln!("{e}");
        std::process::exit(1);
    }
    // qemu-nbd creates objects while it reads its options, before any other check.
    let objects =
        std::sync::Arc::new(object::Objects::create(&cli.object).unwrap_or_else(|e| die(e)));
    // Images stored elsewhere: files on web servers, and NBD exports through our client
    // (their secrets and TLS objects are ours).
    let objs = objects.clone();
    backends::file::remote::set_opener(Box::new(move |name, opts| {
        let secret = |id: &str| objs.secret_text(id);
        if let Some(r) = backends::file::http::open(name, opts, &secret) {
            return Some(r);
        }
        let creds = |id: &str| objs.tls_creds(id, frontends::tls::Endpoint::Client);
        frontends::nbd::client::url::open(name, opts, &creds)
    }));
    // `json:{...}` backing names in image headers, read as a `json:` FILE is.
    backends::open::set_json_reader(Box::new(|name| {
        let p = qnbd::json_filename::parse(name, true, None)?;
        match p.unknown_option {
            Some(e) => Err(e),
            None => Ok(p.image),
        }
    }));
    run(plan::build(&cli, &objects))
}

/// The command line, or getopt's and qemu-nbd's complaint about it.
fn parse_cli() -> Cli {
    // Read as qemu-nbd's getopt_long reads it, its option loop's checks run in order.
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let table = qnbd::getopt::table(&<Cli as clap::CommandFactory>::command());
    let parsed = qnbd::getopt::parse(argv.get(1..).unwrap_or_default(), &table);
    optcheck::check(&parsed.opts);
    if let Some(msg) = &parsed.error {
        eprintln!("{}: {msg}", prog::invocation());
        die(format!(
            "Try `{} --help' for more information.",
            prog::invocation()
        ));
    }
    let argv0 = argv.first().cloned().unwrap_or_else(|| "qnbd".into());
    match Cli::try_parse_from(qnbd::getopt::clap_args(argv0, &parsed)) {
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
    }
}

/// One runner per mode; none returns.
fn run(plan: Plan) -> ! {
    match plan {
        Plan::Disconnect { device, .. } if frontends::ublk::is_ublk_target(&device) => {
            ublk::disconnect(&device)
        }
        Plan::Disconnect { device, api } => connect::disconnect(&device, api),
        Plan::List(p) => list::run(&p),
        Plan::Serve {
            image,
            export,
            listen,
            process,
        } => serve::run(image, export, listen, process),
        Plan::Connect {
            image,
            export,
            device,
            api,
            connections,
            process,
        } => connect::run(image, export, &device, api, connections, process),
        Plan::Ublk {
            image,
            opts,
            stats,
            process,
        } => ublk::run(image, opts, stats, process),
    }
}
