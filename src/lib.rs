//! qnbd's command line as a library beside the `qnbd` binary: the clap definition (which
//! `tools/docgen` turns into the man page and shell completions) and the parsers that read
//! user text, `--object`, `--image-opts` and `-l` (which the fuzz targets in `fuzz/` call).
//! Nothing else lives here.

pub mod cli;
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
