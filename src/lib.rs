//! The command-line parsers of qnbd that read user text: `--object`, `--image-opts` and `-l`.
//! They are a library (beside the `qnbd` binary, which uses them from here) so that the fuzz
//! targets in `fuzz/` and their property tests can call them; nothing else lives here.

pub mod image_opts;
pub mod object;

/// `-l`'s argument: `snapshot.id=ID` or `snapshot.name=NAME` (the first non-empty one), or
/// else the whole text (an id or name, as qemu-nbd matches it).
pub fn snapshot_param(s: &str) -> String {
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
