//! What qemu-nbd does while getopt reads its options, in command-line order: the value
//! checks of its option loop, `-h`/`-V`/`--object help`/`-T help` answered where they
//! stand, objects created and `-T` read as they come. So the first problem reported, or
//! whether help wins over a bad value, is the same as qemu-nbd's (`-e x -V` fails, `-V -e x`
//! prints the version). The later checks (`plan.rs`) run on the whole command line.

use crate::die;
use qnbd::cli::parse_c_number;
use qnbd::getopt::Occurrence;

/// qemu's NBD_MAX_STRING_SIZE.
const MAX_STRING: usize = 4096;

/// qemu_strtoi (base 0): a C int.
fn strtoi(s: &str) -> Option<i32> {
    parse_c_number(s).and_then(|n| i32::try_from(n).ok())
}

/// qemu_strtou64 (base 0): negative values wrap, as strtoull's do.
pub fn strtou64(s: &str) -> Option<u64> {
    let t = s.trim_start();
    let (neg, body) = match t.strip_prefix('-') {
        Some(b) => (true, b),
        None => (false, t.strip_prefix('+').unwrap_or(t)),
    };
    if body.starts_with(['-', '+']) {
        return None;
    }
    let v = if let Some(h) = body.strip_prefix("0x").or_else(|| body.strip_prefix("0X")) {
        u64::from_str_radix(h, 16).ok()?
    } else if body.len() > 1 && body.starts_with('0') {
        u64::from_str_radix(&body[1..], 8).ok()?
    } else {
        body.parse::<u64>().ok()?
    };
    Some(if neg { v.wrapping_neg() } else { v })
}

/// `-l snapshot.id=…,snapshot.name=…`: qemu parses it as an option list at once.
fn snapshot_opts(arg: &str) {
    if !arg.starts_with("snapshot.") {
        return;
    }
    for item in qnbd::image_opts::split_items(arg) {
        if item.is_empty() {
            continue;
        }
        let key = match item.split_once('=') {
            Some((k, _)) => k,
            None => {
                let (k, v) = item
                    .strip_prefix("no")
                    .map_or((item.as_str(), "on"), |k| (k, "off"));
                eprintln!(
                    "{}: warning: short-form boolean option '{item}' deprecated\nPlease use {k}={v} instead",
                    crate::prog::name()
                );
                k
            }
        };
        if key != "snapshot.id" && key != "snapshot.name" {
            eprintln!("{}: Invalid parameter '{key}'", crate::prog::name());
            die(format!("Failed in parsing snapshot param `{arg}'"));
        }
    }
}

/// Run qemu-nbd's option loop over `opts`; returns if nothing in it stops the program.
pub fn check(opts: &[Occurrence]) {
    let mut seen_cache = false;
    let mut seen_aio = false;
    let mut seen_discard = false;
    let mut unmap = false;
    let mut objects: Vec<String> = Vec::new();
    for o in opts {
        let v = o.value.as_deref().unwrap_or("");
        match o.long.as_str() {
            "nocache" | "cache" => {
                if seen_cache {
                    die("-n and --cache can only be specified once");
                }
                seen_cache = true;
                let m = if o.long == "nocache" { "none" } else { v };
                if backends::cache_mode::CacheMode::from_name(m).is_none() {
                    die(format!("Invalid cache mode `{m}'"));
                }
            }
            "aio" => {
                if seen_aio {
                    die("--aio can only be specified once");
                }
                seen_aio = true;
                if backends::aio::AioMode::from_name(v).is_none() {
                    die(format!("Invalid aio mode '{v}'"));
                }
            }
            "discard" => {
                if seen_discard {
                    die("--discard can only be specified once");
                }
                seen_discard = true;
                unmap = match v {
                    "ignore" | "off" => false,
                    "unmap" | "on" => true,
                    _ => die(format!("Invalid discard mode `{v}'")),
                };
            }
            "detect-zeroes" => {
                if !matches!(v, "off" | "on" | "unmap") {
                    die(format!(
                        "Failed to parse detect_zeroes mode: invalid parameter value: {v}"
                    ));
                }
                if v == "unmap" && !unmap {
                    die("setting detect-zeroes to unmap is not allowed without setting discard operation to unmap");
                }
            }
            "offset" if strtou64(v).is_none() => die(format!("Invalid offset '{v}'")),
            "load-snapshot" => snapshot_opts(v),
            "socket" if !v.starts_with('/') => die("socket path must be absolute"),
            "shared" if strtoi(v).is_none_or(|n| n < 0) => {
                die(format!("Invalid shared device number '{v}'"))
            }
            "handshake-limit" if strtoi(v).is_none_or(|n| n < 0) => {
                die(format!("Invalid handshake limit '{v}'"))
            }
            "export-name" if v.len() > MAX_STRING => die(format!("export name '{v}' too long")),
            "description" if v.len() > MAX_STRING => {
                die(format!("export description '{v}' too long"))
            }
            "version" => {
                print!("{}", qnbd::cli::version(crate::prog::invocation()));
                std::process::exit(0);
            }
            "help" => {
                print!("{}", qnbd::cli::help(crate::prog::invocation()));
                std::process::exit(0);
            }
            "object" => {
                if let Some(text) = qnbd::object::help(v) {
                    print!("{text}");
                    std::process::exit(0);
                }
                objects.push(v.to_string());
                if let Err(e) = qnbd::object::Objects::create(&objects) {
                    die(e);
                }
            }
            "trace" => {
                let spec = crate::logging::TraceSpec::parse(&[v.to_string()]).unwrap_or_else(|e| {
                    eprintln!("{e}");
                    std::process::exit(1)
                });
                for w in &spec.warnings {
                    eprintln!("{w}");
                }
                if spec.help {
                    for name in crate::logging::EVENTS {
                        println!("{name}");
                    }
                    std::process::exit(0);
                }
                for name in spec.unknown_events() {
                    eprintln!(
                        "{}: warning: trace event '{name}' does not exist",
                        crate::prog::name()
                    );
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strtou64_wraps_negatives() {
        assert_eq!(strtou64("4096"), Some(4096));
        assert_eq!(strtou64("0x10"), Some(16));
        assert_eq!(strtou64("-1"), Some(u64::MAX));
        assert_eq!(strtou64("18446744073709551615"), Some(u64::MAX));
        assert_eq!(strtou64("1M"), None);
        assert_eq!(strtou64("--1"), None);
    }
}
