#!/usr/bin/env bash
# The whole test suite: unit tests, integration tests against real clients, and the lint gates.
# Needs the packages from scripts/install-deps.sh; a missing client fails the run here
# (QNBD_REQUIRE_TOOLS) instead of being skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
export QNBD_REQUIRE_TOOLS=1
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo test --workspace
