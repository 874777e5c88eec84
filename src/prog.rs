//! The name qnbd was started under, used as qemu-nbd uses its own: installed as a drop-in
//! (`/usr/bin/qemu-nbd` -> qnbd) it must speak as `qemu-nbd`, and a copy run as `my-nbd` as
//! `my-nbd`. qemu-nbd has two forms of it:
//! - [`name`], argv[0]'s basename: the `NAME: ` prefix of its messages (error_report and
//!   warn_report, whose program name error_init sets from argv[0]'s basename);
//! - [`invocation`], argv[0] as given: its usage and version texts, the "Try `%s --help'"
//!   hint, and glibc getopt's messages about options print argv[0] whole.
//!
//! Run through `$PATH` the two are the same (`qemu-nbd`); run as `/tmp/x/qemu-nbd` they
//! differ just as they do for qemu-nbd.

use std::sync::OnceLock;

/// What a program with no usable argv[0] calls itself.
const DEFAULT: &str = "qnbd";

fn argv0() -> &'static str {
    static ARGV0: OnceLock<String> = OnceLock::new();
    ARGV0.get_or_init(|| {
        std::env::args_os()
            .next()
            .map(|a| a.to_string_lossy().into_owned())
            .filter(|a| !a.is_empty())
            .unwrap_or_else(|| DEFAULT.to_string())
    })
}

/// The last component of `argv0`, as qemu's error_init takes it; "qnbd" if there is none.
fn basename(argv0: &str) -> &str {
    match argv0.rsplit('/').next() {
        Some(b) if !b.is_empty() => b,
        _ => DEFAULT,
    }
}

/// argv[0]'s basename: the prefix of every message (`qemu-nbd: Failed to blk_new_open …`).
pub fn name() -> &'static str {
    basename(argv0())
}

/// argv[0] as given, for the texts where qemu-nbd prints it whole (`--help`, `-V`, the
/// "Try `… --help'" hint, option-parsing errors).
pub fn invocation() -> &'static str {
    argv0()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basename_of_argv0() {
        assert_eq!(basename("qemu-nbd"), "qemu-nbd");
        assert_eq!(basename("/usr/bin/qemu-nbd"), "qemu-nbd");
        assert_eq!(basename("./my-nbd"), "my-nbd");
        assert_eq!(basename("odd/"), "qnbd");
    }
}
