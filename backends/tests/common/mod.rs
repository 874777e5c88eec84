//! Helpers shared by the backend tests: required tools, qemu-img, a seeded generator.

#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, Stdio};

/// True if `tool` runs; otherwise a loud SKIP line, or a panic when `QNBD_REQUIRE_TOOLS` is
/// set (CI installs every tool, so a missing one there is a broken CI script).
pub fn have(tool: &str) -> bool {
    let ok = Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("SKIP: {tool} is not installed; this test did not run");
        if std::env::var_os("QNBD_REQUIRE_TOOLS").is_some() {
            panic!("{tool} is required (QNBD_REQUIRE_TOOLS is set)");
        }
    }
    ok
}

/// Run `prog` in `dir`, require success; returns stdout and stderr together.
pub fn run(dir: &Path, prog: &str, args: &[&str]) -> String {
    let out = Command::new(prog)
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{prog} {args:?}: {text}");
    text
}

/// Open `img` as qcow2 through the format layer (read-only or not).
pub fn open_qcow2(
    img: &Path,
    read_only: bool,
) -> backends::Result<std::sync::Arc<dyn backends::BlockBackend>> {
    backends::open::open_image(&backends::open::ImageOptions {
        path: img.to_path_buf(),
        format: backends::open::Format::from_name("qcow2"),
        read_only,
        ..Default::default()
    })
    .map(|o| o.backend)
}

/// Run qemu-img, require success, return stdout.
pub fn qemu_img(args: &[&str]) -> String {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img runs");
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `qemu-img check` reports no errors (and no leaks).
pub fn check_clean(img: &Path) {
    let out = Command::new("qemu-img")
        .args(["check", img.to_str().unwrap()])
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && text.contains("No errors"),
        "check {img:?}: {text}"
    );
}

/// xorshift64: deterministic from its seed.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}
