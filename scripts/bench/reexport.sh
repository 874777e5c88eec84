#!/usr/bin/env bash
# Serving an image another NBD server holds: qnbd (`qnbd -f raw nbd+unix:///?socket=…`),
# qemu-nbd (the same name) and nbdkit's nbd plugin re-export one upstream (qnbd on a raw
# file in the page cache, every client allowed), over a Unix socket: 4 KiB random reads and
# writes at QD 32 (fio's nbd engine) and a sequential copy out (nbdcopy: as many connections as
# the server allows, then one: nbdkit passes the upstream's multi-conn on, qnbd and qemu-nbd
# without -e do not, so the first row is 4 connections against 1). Rounds are
# interleaved (qnbd, qemu-nbd, nbdkit, qnbd, ...); each figure is the median, with the
# ratios qnbd / qemu-nbd and qnbd / nbdkit. Not a test: run it on a quiet machine.
# Usage: scripts/bench/reexport.sh [ROUNDS] [SECONDS]   (QNBD= to pick the binary)
set -euo pipefail
cd "$(dirname "$0")/../.."
ROUNDS=${1:-3}
SECS=${2:-4}
QNBD=$(realpath "${QNBD:-target/release/qnbd}")
W=$(mktemp -d /var/tmp/qnbd-reexport.XXXXXX)
UP=
trap '[ -n "$UP" ] && kill "$UP" 2>/dev/null; rm -rf "$W"' EXIT
head -c 512M /dev/urandom >"$W/img.raw"
"$QNBD" -t -e 0 -f raw -k "$W/up.sock" "$W/img.raw" 2>/dev/null &
UP=$!
for _ in $(seq 200); do [ -S "$W/up.sock" ] && break; sleep 0.05; done
UPURI="nbd+unix:///?socket=$W/up.sock"

. scripts/bench/lib.sh
serve() { # serve NAME -> starts the re-exporting server, sets $PID
    case $1 in
    qnbd) serve_on "$W/px.sock" "$QNBD" -t -f raw -k "$W/px.sock" "$UPURI" ;;
    qemu-nbd) serve_on "$W/px.sock" qemu-nbd -t -f raw -k "$W/px.sock" "$UPURI" ;;
    nbdkit) serve_on "$W/px.sock" nbdkit -f -U "$W/px.sock" nbd socket="$W/up.sock" ;;
    esac
}

declare -A res=()
for r in $(seq "$ROUNDS"); do
    for srv in qnbd qemu-nbd nbdkit; do
        serve "$srv"
        res[$srv:randread]+="$(fio_iops "$W/px.sock" randread) "
        res[$srv:randwrite]+="$(fio_iops "$W/px.sock" randwrite) "
        res[$srv:copy]+="$(copy_mibs "$W/px.sock" 512) "
        res[$srv:copy1]+="$(copy_mibs "$W/px.sock" 512 --connections=1) "
        stop
    done
done
echo "| workload | qnbd | qemu-nbd | nbdkit nbd | qnbd / qemu-nbd | qnbd / nbdkit |"
echo "|---|---|---|---|---|---|"
for wl in randread randwrite copy copy1; do
    a=$(echo "${res[qnbd:$wl]}" | median)
    b=$(echo "${res[qemu-nbd:$wl]}" | median)
    c=$(echo "${res[nbdkit:$wl]}" | median)
    case $wl in
    randread) name="4 KiB random read QD32 (IOPS)" ;;
    randwrite) name="4 KiB random write QD32 (IOPS)" ;;
    copy) name="sequential copy out, nbdcopy (MiB/s)" ;;
    copy1) name="the same, one connection (MiB/s)" ;;
    esac
    echo "| $name | $a | $b | $c | $(ratio "$a" "$b") | $(ratio "$a" "$c") |"
done
