#!/usr/bin/env bash
# Build target/debian/qnbd_*.deb: the release binary, the man page and completions written by
# tools/docgen, the qnbd@.service/.socket pair. Needs cargo-deb (scripts/install-deps.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p qnbd -p qnbd-docgen
target/release/qnbd-docgen target/docs
cargo deb --no-build --strip -p qnbd
ls target/debian/qnbd_*.deb
