//! The static binary (scripts/build-static.sh, built by scripts/test.sh) runs in the test
//! guest with nothing beside it: scripts/vm/guest/static.sh.

mod common;
use std::path::Path;

#[test]
fn static_binary_runs_alone_in_the_guest() {
    let bin =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("target/x86_64-unknown-linux-musl/release/qnbd");
    if !bin.exists() {
        eprintln!(
            "SKIP: {} is not built (scripts/build-static.sh); the static binary was not tried",
            bin.display()
        );
        assert!(
            std::env::var_os("QNBD_REQUIRE_TOOLS").is_none(),
            "the static binary is required (QNBD_REQUIRE_TOOLS is set)"
        );
        return;
    }
    common::run_guest_script_with("static.sh", 2, &bin);
}
