#!/usr/bin/env bash
# Install the Debian packages qnbd's tests and benchmarks use (run as root, on Debian bookworm).
# qemu-utils stays at the preinstalled version when one is present.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-remove \
    qemu-utils libnbd-bin nbdkit python3-libnbd fio gnutls-bin openssl bc \
    libssl-dev pkg-config python3-fusepy >/dev/null
for t in qemu-img qemu-io qemu-nbd nbdinfo nbdcopy nbdkit fio certtool psktool; do
    command -v "$t" >/dev/null || { echo "install-deps: $t is still missing" >&2; exit 1; }
done
/usr/bin/python3 -c 'import nbd' || { echo "install-deps: python3-libnbd does not load" >&2; exit 1; }
/usr/bin/python3 -c 'import fusepy' || { echo "install-deps: python3-fusepy does not load" >&2; exit 1; }
echo "install-deps: ok ($(qemu-nbd --version | head -1))"
