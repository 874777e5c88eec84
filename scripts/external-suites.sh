#!/usr/bin/env bash
# Other projects' test suites with qnbd standing in for qemu-nbd:
#   - libnbd 1.22's interop tests (every one that starts qemu-nbd: TLS, structured reads,
#     block sizes, block status payloads, dirty bitmaps, socket activation, listing) and its
#     nbdcopy/nbdinfo/nbddump tests that start qemu-nbd (compressed qcow2 output included);
#   - qemu 10.0.2's iotests that start qemu-nbd directly and need no VM (233: TLS, with the
#     server's log compared line by line; block-status-cache, 209, 302,
#     nbd-reconnect-on-open) and the generic ones with the image behind qemu-nbd (-nbd);
#   - qemu's iotest sample images, intact and damaged as the iotests damage them, served by
#     qnbd and by qemu-nbd side by side (scripts/compare-samples.py).
# Usage: scripts/external-suites.sh [QNBD]   (default: target/release/qnbd)
# Sources are downloaded once into $QNBD_EXT_CACHE (default /var/tmp/qnbd-ext): Debian's
# tarballs, else upstream's. Exit 0 only if every suite ran and passed; 77 (loudly) when a
# source could not be downloaded.
set -euo pipefail
cd "$(dirname "$0")/.."
QNBD=$(realpath "${1:-target/release/qnbd}")
CACHE=${QNBD_EXT_CACHE:-/var/tmp/qnbd-ext}
LIBNBD=libnbd-1.22.2
QEMU=qemu-10.0.2
mkdir -p "$CACHE"

fetch() { # fetch FILE URL...
    local file=$1
    shift
    [ -s "$CACHE/$file" ] && return 0
    for url in "$@"; do
        if curl -fsSL --retry 3 -o "$CACHE/$file.part" "$url"; then
            mv "$CACHE/$file.part" "$CACHE/$file"
            return 0
        fi
    done
    rm -f "$CACHE/$file.part"
    echo "external-suites: SKIPPED: cannot download $file (tried: $*)" >&2
    exit 77
}

fetch libnbd.tar.gz \
    http://deb.debian.org/debian/pool/main/libn/libnbd/libnbd_1.22.2.orig.tar.gz \
    https://download.libguestfs.org/libnbd/1.22-stable/$LIBNBD.tar.gz
fetch qemu.tar.xz \
    "http://deb.debian.org/debian/pool/main/q/qemu/qemu_10.0.2+ds.orig.tar.xz" \
    https://download.qemu.org/$QEMU.tar.xz

# qnbd under the name qemu-nbd (its messages then say qemu-nbd, as the suites expect), and a
# stand-in for qemu-system that answers the iotests' set-up questions (machines, formats:
# qemu-img's own, devices) and starts nothing: the iotests run here need no VM.
BIN=$CACHE/bin
mkdir -p "$BIN"
ln -sf "$QNBD" "$BIN/qemu-nbd"
cat > "$BIN/qemu-system-x86_64" <<'EOF'
#!/bin/sh
if [ "$1" = "-machine" ] && [ "$2" = "help" ]; then echo "pc (default)"; exit 0; fi
prev=
for a in "$@"; do
    case "$a" in
    format=help)
        f=$(qemu-img --help | sed -n '/^Supported image formats:/,/^See/p' | sed '1d;$d' |
            tr -s ' \n' '\n' | grep -vxE 'ftp|ftps|http|https|gluster|iscsi|iser|nfs|rbd|ssh|' |
            tr '\n' ' ')
        echo "Supported formats: $f"
        exit 0 ;;
    help)
        if [ "$prev" = "-device" ]; then
            echo 'name "virtio-blk-pci", bus PCI'
            echo 'name "virtio-scsi-pci", bus PCI'
            exit 0
        fi ;;
    esac
    prev=$a
done
echo "qemu-system is not installed: this test needs a VM" >&2
exit 1
EOF
chmod +x "$BIN/qemu-system-x86_64"

if [ ! -f "$CACHE/$LIBNBD/.built" ]; then
    rm -rf "${CACHE:?}/$LIBNBD"
    tar -C "$CACHE" -xzf "$CACHE/libnbd.tar.gz"
    (cd "$CACHE/$LIBNBD" &&
        ./configure -q QEMU_NBD="$BIN/qemu-nbd" --disable-ocaml --disable-golang \
            --disable-rust --disable-fuse >configure.log 2>&1 &&
        make -j"$(nproc)" >make.log 2>&1 &&
        make -C tests pki/stamp-pki keys.psk >>make.log 2>&1) || {
        echo "external-suites: building $LIBNBD failed:" >&2
        tail -30 "$CACHE/$LIBNBD"/{configure,make}.log >&2
        exit 1
    }
    touch "$CACHE/$LIBNBD/.built"
fi
if [ ! -d "$CACHE/$QEMU/tests/qemu-iotests" ]; then
    tar -C "$CACHE" -xJf "$CACHE/qemu.tar.xz" \
        "$QEMU/tests/qemu-iotests" "$QEMU/python" "$QEMU/scripts"
fi

failed=()
run_libnbd() { # run_libnbd DIR TEST...
    local dir=$1
    shift
    local log
    log=$(mktemp)
    if (cd "$CACHE/$LIBNBD/$dir" && timeout 900 make check TESTS="$*" >"$log" 2>&1); then
        grep -E '^(PASS|SKIP|XFAIL):' "$log" | sed "s|^|libnbd $dir: |"
        if grep -q '^SKIP:' "$log"; then
            failed+=("libnbd $dir: a test was skipped")
        fi
    else
        grep -E '^(PASS|SKIP|FAIL|ERROR|XFAIL):' "$log" | sed "s|^|libnbd $dir: |"
        for t in $(grep -E '^(FAIL|ERROR):' "$log" | awk '{print $2}'); do
            echo "--- $dir/$t.log (end)"
            tail -40 "$CACHE/$LIBNBD/$dir/$t.log" 2>/dev/null || true
        done
        failed+=("libnbd $dir")
    fi
    rm -f "$log"
}
run_libnbd interop interop-qemu-nbd interop-qemu-nbd-tls-certs interop-qemu-nbd-tls-psk \
    list-exports-qemu-nbd socket-activation-qemu-nbd dirty-bitmap.sh block-status-64.sh \
    structured-read.sh interop-qemu-block-size.sh opt-extended-headers.sh \
    block-status-payload.sh
run_libnbd copy copy-file-to-qcow2.sh copy-file-to-qcow2-compressed.sh
run_libnbd info info-description-qemu.sh info-list-json-qemu.sh info-list-qemu.sh \
    info-map-qemu-allocation-depth.sh info-map-qemu-dirty-bitmap.sh
run_libnbd dump dump-empty-qcow2.sh

# The iotests that start qemu-nbd and need no VM (the others stop at the stand-in, as they
# would with qemu-nbd itself).
run_iotests() { # run_iotests FORMAT[:nbd] TEST...   (:nbd: the image is served by qemu-nbd)
    local fmt=${1%:nbd} proto=()
    [ "$1" != "$fmt" ] && proto=(-nbd)
    shift
    local out
    out=$(cd "$CACHE/$QEMU/tests/qemu-iotests" &&
        QEMU_PROG=$BIN/qemu-system-x86_64 QEMU_IMG_PROG=$(command -v qemu-img) \
            QEMU_IO_PROG=$(command -v qemu-io) QEMU_NBD_PROG=$BIN/qemu-nbd \
            QSD_PROG=$(command -v qemu-storage-daemon || echo "$BIN/qemu-system-x86_64") \
            timeout 900 python3 ./check -"$fmt" "${proto[@]}" "$@" 2>&1) || true
    if grep -qE "^Passed all $# iotests" <<<"$out"; then
        echo "qemu iotests -$fmt${proto[*]:+ ${proto[*]}} $*: pass"
    else
        echo "$out" | tail -60
        failed+=("qemu iotests -$fmt${proto[*]:+ ${proto[*]}} $*")
    fi
}
run_iotests raw 233 block-status-cache
run_iotests qcow2 233 209 302 nbd-reconnect-on-open
# The generic iotests run with every image behind qemu-nbd (`./check -raw -nbd`): all those
# that pass there with qemu-nbd 10.0.2 and need no VM, but the slow 083 (qemu's NBD client
# against a fault injector: no qemu-nbd), 197 and 215 (copy-on-read, 008 again).
run_iotests raw:nbd 001 002 003 004 005 008 009 010 011 021 032 033 077 104 123 241 259 277

# qemu's sample images (the iotests' own: bochs, cloop, dmg, parallels, vmdk, vpc, vhdx),
# as they are and damaged as the iotests damage them, served by qnbd and qemu-nbd side by side.
if out=$(/usr/bin/python3 scripts/compare-samples.py \
    "$CACHE/$QEMU/tests/qemu-iotests/sample_images" "$BIN/qemu-nbd" 2>&1); then
    echo "qemu sample images: $(grep -c ': same:' <<<"$out") cases served or refused alike"
else
    echo "$out" | grep -v ': same:'
    failed+=("qemu sample images")
fi

if [ ${#failed[@]} -gt 0 ]; then
    printf 'external-suites: FAILED: %s\n' "${failed[@]}" >&2
    exit 1
fi
echo "external-suites: every suite passed with $QNBD as qemu-nbd"
