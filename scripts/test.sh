#!/usr/bin/env bash
# The whole test suite: the lint gates, the release artefacts the tests install or boot (the
# Debian package, the static binary), then unit tests and integration tests against real
# clients. Needs what scripts/install-deps.sh installs; a missing client or artefact fails the
# run here (QNBD_REQUIRE_TOOLS) instead of being skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
export QNBD_REQUIRE_TOOLS=1
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
bash scripts/build-deb.sh
bash scripts/build-static.sh
# The guest tests (kernel NBD, ublk, kTLS) run the release binary just built for the package:
# under TCG a debug build's CPU time was most of their time (ublk_vm 213 s → 93 s).
export QNBD_GUEST_BIN="$PWD/target/release/qnbd"
cargo test --workspace
