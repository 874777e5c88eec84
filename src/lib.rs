//! qnbd's command line as a library beside the `qnbd` binary: the clap definition (which
//! `tools/docgen` turns into the man page and shell completions) and the parsers that read
//! user text, `--object`, `--image-opts` and `-l` (which the fuzz targets in `fuzz/` call).
//! Nothing else lives here.

pub mod cli;
pub mod getopt;
pub mod image_opts;
pub mod json_filename;
pub mod object;

/// `-l`'s argument as the image driver takes it: `snapshot.id=ID,snapshot.name=NAME` (a
/// snapshot matching every key given), or else an id or a name (the id tried first), as
/// qemu-nbd tells the two apart by the `snapshot.` prefix.
pub fn snapshot_param(s: &str) -> String {
    s.to_string()
}
