#!/usr/bin/env bash
# Serving an image from a web server: qnbd (`qnbd -r -f raw http://…`), qemu-nbd (qemu's
# curl driver, Debian's qemu-block-extra) and nbdkit's curl plugin over one nginx on
# 127.0.0.1 (a 512 MiB raw file in the page cache), each exported on a Unix socket: 4 KiB
# random reads at QD 1 and QD 32 (fio's nbd engine) and a sequential copy out (nbdcopy).
# Rounds are interleaved (qnbd, qemu-nbd, nbdkit, qnbd, ...); each figure is the median, with
# the ratios qnbd / qemu-nbd and qnbd / nbdkit; 0 for a run that failed or hung (qemu-nbd's
# curl driver has been seen to stop answering under nbdcopy). Not a test: run it on a quiet
# machine.
# Usage: scripts/bench/web.sh [ROUNDS] [SECONDS]   (QNBD= to pick the binary, SERVERS= to
# run some of qnbd, qemu-nbd, nbdkit; needs nginx)
set -euo pipefail
cd "$(dirname "$0")/../.."
ROUNDS=${1:-3}
SECS=${2:-4}
QNBD=$(realpath "${QNBD:-target/release/qnbd}")
W=$(mktemp -d /var/tmp/qnbd-web.XXXXXX)
NGINX=
trap '[ -n "$NGINX" ] && kill "$NGINX" 2>/dev/null; rm -rf "$W"' EXIT
. scripts/bench/lib.sh
mkdir "$W/www"
head -c 512M /dev/urandom >"$W/www/img.raw"
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
cat >"$W/nginx.conf" <<CONF
daemon off;
user root;
worker_processes 2;
pid $W/nginx.pid;
error_log $W/nginx.err;
events { worker_connections 1024; }
http {
    access_log off;
    sendfile on;
    keepalive_requests 1000000;
    server { listen 127.0.0.1:$PORT; root $W/www; }
}
CONF
nginx -c "$W/nginx.conf" -e "$W/nginx.err" &
NGINX=$!
for _ in $(seq 200); do curl -fsI "http://127.0.0.1:$PORT/img.raw" >/dev/null 2>&1 && break; sleep 0.05; done
URL="http://127.0.0.1:$PORT/img.raw"

serve() { # serve NAME -> starts the server, sets $PID
    case $1 in
    qnbd) serve_on "$W/s.sock" "$QNBD" -r -t -f raw -k "$W/s.sock" "$URL" ;;
    qemu-nbd) serve_on "$W/s.sock" qemu-nbd -r -t -f raw -k "$W/s.sock" "$URL" ;;
    nbdkit) serve_on "$W/s.sock" nbdkit -r -f -U "$W/s.sock" curl url="$URL" ;;
    esac
}

declare -A res=()
for r in $(seq "$ROUNDS"); do
    for srv in ${SERVERS:-qnbd qemu-nbd nbdkit}; do
        serve "$srv"
        res[$srv:qd1]+="$(fio_iops "$W/s.sock" randread 1) "
        res[$srv:qd32]+="$(fio_iops "$W/s.sock" randread 32) "
        res[$srv:copy]+="$(copy_mibs "$W/s.sock" 512) "
        stop
    done
done
echo "| workload | qnbd | qemu-nbd | nbdkit curl | qnbd / qemu-nbd | qnbd / nbdkit |"
echo "|---|---|---|---|---|---|"
for wl in qd1 qd32 copy; do
    a=$(echo "${res[qnbd:$wl]:-0}" | median)
    b=$(echo "${res[qemu-nbd:$wl]:-0}" | median)
    c=$(echo "${res[nbdkit:$wl]:-0}" | median)
    case $wl in
    qd1) name="4 KiB random read QD1 (IOPS)" ;;
    qd32) name="4 KiB random read QD32 (IOPS)" ;;
    copy) name="sequential copy out, nbdcopy (MiB/s)" ;;
    esac
    echo "| $name | $a | $b | $c | $(ratio "$a" "$b") | $(ratio "$a" "$c") |"
done
