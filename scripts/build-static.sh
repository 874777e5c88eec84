#!/usr/bin/env bash
# Build target/x86_64-unknown-linux-musl/release/qnbd: one static binary (musl, OpenSSL built
# in) to drop into a VM or a rescue system with nothing beside it. Needs musl-tools and the
# rust-std of x86_64-unknown-linux-musl (scripts/install-deps.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
target=x86_64-unknown-linux-musl
cargo build --release --target "$target" -p qnbd --features static
bin="target/$target/release/qnbd"
if ldd "$bin" 2>&1 | grep -q '=>'; then
    echo "build-static: $bin is dynamically linked" >&2
    exit 1
fi
echo "$bin"
