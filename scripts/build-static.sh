#!/usr/bin/env bash
# Build target/x86_64-unknown-linux-musl/release/qnbd: one static binary (musl, OpenSSL built
# in) to drop into a VM or a rescue system with nothing beside it. Needs musl-tools and the
# rust-std of x86_64-unknown-linux-musl (scripts/install-deps.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
target=x86_64-unknown-linux-musl
# Without the release profile's line tables, stripped: a binary to copy around is better
# small (13 MiB; with the line tables some 70, as target/release/qnbd).
CARGO_PROFILE_RELEASE_DEBUG=0 CARGO_PROFILE_RELEASE_STRIP=symbols \
    cargo build --release --target "$target" -p qnbd --features static
bin="target/$target/release/qnbd"
if ldd "$bin" 2>&1 | grep -q '=>'; then
    echo "build-static: $bin is dynamically linked" >&2
    exit 1
fi
echo "$bin"
