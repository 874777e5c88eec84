#!/usr/bin/env bash
# Install the Debian packages qnbd's build, tests and benchmarks use (run as root, on Debian
# bookworm), the musl target and cargo-deb. libclang-dev: libublk's bindgen step needs
# libclang; musl-tools and perl/make: the static binary (OpenSSL built from source); zsh, fish
# and groff: the completion and man page checks; gnuplot-nox: the benchmark chart;
# libgnutls28-dev, libxml2-dev, gcc, python3-dev and jq: building and running libnbd's own
# tests against qnbd (scripts/external-suites.sh); nginx-light: the web-image benchmark.
# qemu-utils stays at the preinstalled version when one is present; qemu-block-extra (qemu's
# curl driver, for the http image tests) is taken at that same version.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-remove \
    qemu-utils libnbd-bin nbdkit python3-libnbd fio gnutls-bin openssl bc gnuplot-nox curl xz-utils \
    libssl-dev pkg-config libclang-dev musl-tools perl make zsh fish groff-base python3-fusepy \
    libgnutls28-dev libxml2-dev jq gcc python3-dev nginx-light >/dev/null
# qemu's curl driver (qemu-nbd serving http:// images, the reference for qnbd's), from the
# suite that gave the installed qemu-utils when no configured one has that version.
qv=$(dpkg-query -W -f '${Version}' qemu-utils)
if [ "$(dpkg-query -W -f '${db:Status-Abbrev}${Version}' qemu-block-extra 2>/dev/null || true)" != "ii $qv" ]; then
    if ! apt-get install -y -qq --no-remove "qemu-block-extra=$qv" >/dev/null 2>&1; then
        mirror=http://deb.debian.org/debian
        for suite in bookworm-backports trixie trixie-updates trixie-security; do
            base=$mirror
            [ "$suite" = trixie-security ] && base=http://deb.debian.org/debian-security
            file=$(curl -fsS "$base/dists/$suite/main/binary-amd64/Packages.xz" | xz -d |
                awk -v v="$qv" '/^Package: /{p=$2} /^Version: /{ver=$2}
                    /^Filename: /{if (p=="qemu-block-extra" && ver==v) {print $2; exit}}') || true
            [ -n "$file" ] || continue
            curl -fsS -o /tmp/qemu-block-extra.deb "$base/$file"
            apt-get install -y -qq --no-remove /tmp/qemu-block-extra.deb >/dev/null
            rm -f /tmp/qemu-block-extra.deb
            break
        done
    fi
fi
[ -e /usr/lib/x86_64-linux-gnu/qemu/block-curl.so ] ||
    { echo "install-deps: qemu-block-extra $qv (qemu's curl driver) is missing" >&2; exit 1; }
rustup target add x86_64-unknown-linux-musl >/dev/null 2>&1 ||
    rustup target list --installed | grep -qx x86_64-unknown-linux-musl ||
    { echo "install-deps: cannot add the x86_64-unknown-linux-musl target" >&2; exit 1; }
command -v cargo-deb >/dev/null || cargo install -q --locked cargo-deb
for t in qemu-img qemu-io qemu-nbd nbdinfo nbdcopy nbdkit fio certtool psktool gnuplot musl-gcc zsh fish groff cargo-deb curl xz jq gcc make; do
    command -v "$t" >/dev/null || { echo "install-deps: $t is still missing" >&2; exit 1; }
done
/usr/bin/python3 -c 'import nbd' || { echo "install-deps: python3-libnbd does not load" >&2; exit 1; }
/usr/bin/python3 -c 'import fusepy' || { echo "install-deps: python3-fusepy does not load" >&2; exit 1; }
echo "install-deps: ok ($(qemu-nbd --version | head -1))"
