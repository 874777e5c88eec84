//! The command line read as qemu-nbd reads it: GNU getopt_long over qemu-nbd's option table
//! (and qnbd's own options), with glibc's messages, unambiguous long prefixes, `=` or
//! separate values, short clusters (`-rt`, `-e3`) and non-options permuted to the end.
//! The result keeps every option in command-line order (qemu-nbd checks some of them as it
//! reads them) and is turned into an argument list clap parses without surprises.
//!
//! A prefix that names one of qemu-nbd's options means that option even where a qnbd-only
//! option shares the prefix (`--co` is `--connect`, not also `--connections`), so that every
//! abbreviation qemu-nbd takes means the same here, and its ambiguities list what qemu-nbd's do.

use std::ffi::OsString;

/// qemu-nbd 10.0.2's long options, in its table's order (getopt lists ambiguous
/// possibilities in this order).
pub const QEMU_LONG: &[&str] = &[
    "help",
    "version",
    "bind",
    "port",
    "socket",
    "offset",
    "read-only",
    "allocation-depth",
    "bitmap",
    "connect",
    "disconnect",
    "list",
    "snapshot",
    "load-snapshot",
    "nocache",
    "cache",
    "aio",
    "discard",
    "detect-zeroes",
    "shared",
    "format",
    "persistent",
    "verbose",
    "object",
    "export-name",
    "description",
    "handshake-limit",
    "tls-creds",
    "tls-hostname",
    "tls-authz",
    "image-opts",
    "trace",
    "fork",
    "pid-file",
    "selinux-label",
];

/// Whether an option takes a value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HasArg {
    No,
    Required,
    /// Only as `--name=VALUE`.
    Optional,
}

/// One option of the table.
#[derive(Clone, Debug)]
pub struct Opt {
    pub long: String,
    pub short: Option<char>,
    pub has_arg: HasArg,
}

/// An option as given: its long name and value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Occurrence {
    pub long: String,
    pub value: Option<String>,
}

/// The options in order, the non-options, and getopt's complaint if it stopped at one
/// (the message without the `PROGRAM: ` prefix).
#[derive(Debug, Default)]
pub struct Parsed {
    pub opts: Vec<Occurrence>,
    pub args: Vec<OsString>,
    pub error: Option<String>,
}

/// The table from clap's definition of the command line.
pub fn table(cmd: &clap::Command) -> Vec<Opt> {
    cmd.get_arguments()
        .filter(|a| !a.is_positional())
        .filter_map(|a| {
            let long = a.get_long()?.to_string();
            let has_arg = if !a.get_action().takes_values() {
                HasArg::No
            } else if a.get_num_args().is_some_and(|n| n.min_values() == 0) {
                HasArg::Optional
            } else {
                HasArg::Required
            };
            Some(Opt {
                long,
                short: a.get_short(),
                has_arg,
            })
        })
        .collect()
}

/// getopt_long's long-option lookup: an exact name, else a unique prefix (qemu-nbd's options
/// first). Err is the ambiguity or unknown-option message.
fn lookup<'a>(table: &'a [Opt], name: &str, shown: &str) -> Result<&'a Opt, String> {
    if let Some(o) = table.iter().find(|o| o.long == name) {
        return Ok(o);
    }
    let qemu: Vec<&Opt> = QEMU_LONG
        .iter()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| table.iter().find(|o| o.long == *l))
        .collect();
    let matches: Vec<&Opt> = if qemu.is_empty() {
        table.iter().filter(|o| o.long.starts_with(name)).collect()
    } else {
        qemu
    };
    match matches.as_slice() {
        [] => Err(format!("unrecognized option '--{shown}'")),
        [one] => Ok(one),
        many => {
            let list: String = many.iter().map(|o| format!(" '--{}'", o.long)).collect();
            Err(format!(
                "option '--{shown}' is ambiguous; possibilities:{list}"
            ))
        }
    }
}

/// Read `args` (without argv[0]) as GNU getopt_long does: with POSIXLY_CORRECT set in the
/// environment the options end at the first non-option, as glibc's do.
pub fn parse(args: &[OsString], table: &[Opt]) -> Parsed {
    parse_with(args, table, std::env::var_os("POSIXLY_CORRECT").is_some())
}

/// [`parse`], `posix` saying whether the first non-option ends the options.
pub fn parse_with(args: &[OsString], table: &[Opt], posix: bool) -> Parsed {
    let mut p = Parsed::default();
    let mut i = 0;
    while i < args.len() {
        let raw = &args[i];
        i += 1;
        let Some(arg) = raw.to_str() else {
            if posix {
                p.args.extend(args[i - 1..].iter().cloned());
                break;
            }
            p.args.push(raw.clone());
            continue;
        };
        if arg == "--" {
            p.args.extend(args[i..].iter().cloned());
            break;
        }
        if let Some(body) = arg.strip_prefix("--") {
            let (name, inline) = match body.split_once('=') {
                Some((n, v)) => (n, Some(v)),
                None => (body, None),
            };
            let o = match lookup(table, name, body) {
                Ok(o) => o,
                Err(e) => {
                    p.error = Some(e);
                    return p;
                }
            };
            let value = match (o.has_arg, inline) {
                (HasArg::No, Some(_)) => {
                    p.error = Some(format!("option '--{}' doesn't allow an argument", o.long));
                    return p;
                }
                (HasArg::No, None) | (HasArg::Optional, None) => None,
                (_, Some(v)) => Some(v.to_string()),
                (HasArg::Required, None) => match args.get(i) {
                    Some(v) => {
                        i += 1;
                        Some(v.to_string_lossy().into_owned())
                    }
                    None => {
                        p.error = Some(format!("option '--{}' requires an argument", o.long));
                        return p;
                    }
                },
            };
            p.opts.push(Occurrence {
                long: o.long.clone(),
                value,
            });
            continue;
        }
        let Some(cluster) = arg.strip_prefix('-').filter(|c| !c.is_empty()) else {
            // A non-option (or a lone `-`): getopt moves it after the options, or under
            // POSIXLY_CORRECT stops there.
            if posix {
                p.args.extend(args[i - 1..].iter().cloned());
                break;
            }
            p.args.push(raw.clone());
            continue;
        };
        for (at, c) in cluster.char_indices() {
            let Some(o) = table.iter().find(|o| o.short == Some(c)) else {
                p.error = Some(format!("invalid option -- '{c}'"));
                return p;
            };
            if o.has_arg == HasArg::No {
                p.opts.push(Occurrence {
                    long: o.long.clone(),
                    value: None,
                });
                continue;
            }
            let rest = &cluster[at + c.len_utf8()..];
            let value = if !rest.is_empty() {
                rest.to_string()
            } else if let Some(v) = args.get(i) {
                i += 1;
                v.to_string_lossy().into_owned()
            } else {
                p.error = Some(format!("option requires an argument -- '{c}'"));
                return p;
            };
            p.opts.push(Occurrence {
                long: o.long.clone(),
                value: Some(value),
            });
            break;
        }
    }
    p
}

/// The argument list for clap: argv[0], each option as `--NAME` or `--NAME=VALUE` in order,
/// then `--` and the non-options.
pub fn clap_args(argv0: OsString, p: &Parsed) -> Vec<OsString> {
    let mut out = vec![argv0];
    for o in &p.opts {
        out.push(match &o.value {
            Some(v) => format!("--{}={v}", o.long).into(),
            None => format!("--{}", o.long).into(),
        });
    }
    out.push("--".into());
    out.extend(p.args.iter().cloned());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(args: &[&str]) -> Parsed {
        let cmd = <crate::cli::Cli as clap::CommandFactory>::command();
        let v: Vec<OsString> = args.iter().map(OsString::from).collect();
        parse(&v, &table(&cmd))
    }

    fn occ(long: &str, value: Option<&str>) -> Occurrence {
        Occurrence {
            long: long.into(),
            value: value.map(String::from),
        }
    }

    #[test]
    fn every_qemu_option_is_in_the_table() {
        let cmd = <crate::cli::Cli as clap::CommandFactory>::command();
        let t = table(&cmd);
        for l in QEMU_LONG {
            assert!(t.iter().any(|o| o.long == *l), "{l}");
        }
    }

    #[test]
    fn spellings() {
        let p = run(&[
            "img",
            "-rte3",
            "--export=a",
            "--bind",
            "::1",
            "-x",
            "--foo",
            "-fraw",
        ]);
        assert_eq!(p.error, None);
        assert_eq!(
            p.opts,
            vec![
                occ("read-only", None),
                occ("persistent", None),
                occ("shared", Some("3")),
                occ("export-name", Some("a")),
                occ("bind", Some("::1")),
                occ("export-name", Some("--foo")),
                occ("format", Some("raw")),
            ]
        );
        assert_eq!(p.args, vec![OsString::from("img")]);
        let p = run(&["--", "-f", "--x"]);
        assert!(p.opts.is_empty() && p.args.len() == 2);
    }

    #[test]
    fn posixly_correct_stops_at_the_first_non_option() {
        let cmd = <crate::cli::Cli as clap::CommandFactory>::command();
        let v: Vec<OsString> = ["-r", "img", "-e", "x"]
            .iter()
            .map(OsString::from)
            .collect();
        let p = parse_with(&v, &table(&cmd), true);
        assert_eq!(p.opts, vec![occ("read-only", None)]);
        assert_eq!(p.args.len(), 3);
    }

    #[test]
    fn qemu_prefixes_win_over_qnbd_options() {
        assert_eq!(
            run(&["--co", "/dev/nbd0"]).opts,
            vec![occ("connect", Some("/dev/nbd0"))]
        );
        assert_eq!(run(&["--r"]).opts, vec![occ("read-only", None)]);
        assert_eq!(run(&["--stats"]).opts, vec![occ("stats", None)]);
        assert_eq!(
            run(&["--stats=json"]).opts,
            vec![occ("stats", Some("json"))]
        );
    }

    #[test]
    fn glibc_messages() {
        let e = |a: &[&str]| run(a).error.unwrap();
        assert_eq!(
            e(&["--d=unmap"]),
            "option '--d=unmap' is ambiguous; possibilities: '--disconnect' '--discard' '--detect-zeroes' '--description'"
        );
        assert_eq!(e(&["--bogus=1"]), "unrecognized option '--bogus=1'");
        assert_eq!(
            e(&["--vers=2"]),
            "option '--version' doesn't allow an argument"
        );
        assert_eq!(
            e(&["--export"]),
            "option '--export-name' requires an argument"
        );
        assert_eq!(e(&["-tZ"]), "invalid option -- 'Z'");
        assert_eq!(e(&["-x"]), "option requires an argument -- 'x'");
    }
}
