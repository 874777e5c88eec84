#!/usr/bin/env bash
# Throughput of qnbd beside qemu-nbd and nbdkit (file plugin; memory plugin as the loopback
# limit) on one raw image, over a Unix socket and TCP; then qcow2 (fresh and fully
# allocated) beside qemu-nbd; then TLS; then qnbd's --aio/--cache I/O paths. Not a test: it prints
# tables of MiB/s or IOPS and the ratios.
#
#   scripts/bench.sh [RUNTIME_SECONDS]     (default 5; env SIZE_MB=1024, QNBD=path,
#                                           SECTIONS="raw qcow2 tls aio" to pick tables)
set -euo pipefail
cd "$(dirname "$0")/.."
RUNTIME=${1:-5}
SIZE_MB=${SIZE_MB:-1024}
for t in qemu-nbd nbdkit nbdcopy fio; do
    command -v "$t" >/dev/null || { echo "bench: $t is missing (bash scripts/install-deps.sh)" >&2; exit 77; }
done
if [ -z "${QNBD:-}" ]; then
    cargo build --release -q
    QNBD=$PWD/target/release/qnbd
fi
work=$(mktemp -d /var/tmp/qnbd-bench.XXXXXX)
server_pid=""
cleanup() {
    [ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null && wait "$server_pid" 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT

img=$work/disk.raw
src=$work/src.raw
echo "bench: preparing a ${SIZE_MB} MiB image (random data, fully allocated)" >&2
head -c $((SIZE_MB << 20)) /dev/urandom >"$src"
cp "$src" "$img"

fmt=raw
port=$((11000 + RANDOM % 9000))
sock=$work/nbd.sock

# start SERVER TRANSPORT: sets server_pid and uri.
start() {
    local server=$1 transport=$2 addr=()
    rm -f "$sock"
    case $server in
    qnbd | qemu-nbd | qnbd-*)
        local bin=$QNBD extra=()
        [ "$server" = qemu-nbd ] && bin=qemu-nbd
        [ "$server" = qnbd-io_uring ] && extra=(--aio=io_uring)
        [ "$server" = qnbd-native ] && extra=(--aio=native --cache=none)
        [ "$server" = qnbd-cache-none ] && extra=(--cache=none)
        case $transport in
        unix) addr=(-k "$sock") ;;
        tcp) addr=(-b 127.0.0.1 -p "$port") ;;
        tls) addr=(-b 127.0.0.1 -p "$port" --tls-creds tls0
            --object "tls-creds-x509,id=tls0,endpoint=server,dir=$work/pki/server,verify-peer=off") ;;
        esac
        "$bin" -f "$fmt" -t -e 0 "${extra[@]}" "${addr[@]}" "$img" 2>"$work/server.log" &
        ;;
    nbdkit-file | nbdkit-memory)
        case $transport in
        unix) addr=(-U "$sock") ;;
        tcp) addr=(-i 127.0.0.1 -p "$port") ;;
        tls) addr=(-i 127.0.0.1 -p "$port" --tls=require "--tls-certificates=$work/pki/server") ;;
        esac
        local plugin=(file "file=$img")
        [ "$server" = nbdkit-memory ] && plugin=(memory "size=${SIZE_MB}M")
        nbdkit -f "${addr[@]}" "${plugin[@]}" 2>"$work/server.log" &
        ;;
    esac
    server_pid=$!
    case $transport in
    unix) uri="nbd+unix:///?socket=$sock" ;;
    tcp) uri="nbd://127.0.0.1:$port/" ;;
    # fio's nbd engine refuses URIs naming local files (tls-certificates=), so the clients
    # do not verify the server here; the encryption is the same.
    tls) uri="nbds://127.0.0.1:$port/?tls-verify-peer=false" ;;
    esac
    for _ in $(seq 200); do
        nbdinfo --size "$uri" >/dev/null 2>&1 && return 0
        sleep 0.05
    done
    echo "bench: $server did not start" >&2
    cat "$work/server.log" >&2
    exit 1
}

stop() {
    kill "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
    server_pid=""
    port=$((port + 1))
}

now() { date +%s.%N; }

# Each workload prints one number: MiB/s or IOPS.
w_seq_read() {
    local t0 t1
    t0=$(now)
    nbdcopy --connections=4 --requests=64 "$uri" null:
    t1=$(now)
    echo "$SIZE_MB / ($t1 - $t0)" | bc -l
}
w_seq_write() {
    local t0 t1
    t0=$(now)
    nbdcopy --connections=4 --requests=64 "$src" "$uri"
    t1=$(now)
    echo "$SIZE_MB / ($t1 - $t0)" | bc -l
}
fio_iops() {
    local rw=$1 qd=$2
    fio --name=b --ioengine=nbd --uri="$uri" --rw="$rw" --bs=4k --iodepth="$qd" \
        --size="${SIZE_MB}M" --time_based --runtime="$RUNTIME" --ramp_time=1 \
        --output-format=json 2>/dev/null | sed -n '/^{/,$p' |
        python3 -c 'import json,sys; j=json.load(sys.stdin)["jobs"][0]; print(j["read"]["iops"]+j["write"]["iops"])'
}
w_rand_read_qd1() { fio_iops randread 1; }
w_rand_read_qd32() { fio_iops randread 32; }
w_rand_write_qd1() { fio_iops randwrite 1; }
w_rand_write_qd32() { fio_iops randwrite 32; }

want() { [[ " ${SECTIONS:-raw qcow2 tls aio} " == *" $1 "* ]]; }

workloads=(seq_read seq_write rand_read_qd1 rand_read_qd32 rand_write_qd1 rand_write_qd32)
if want raw; then
servers=(qnbd qemu-nbd nbdkit-file nbdkit-memory)
declare -A result
for transport in unix tcp; do
    for server in "${servers[@]}"; do
        start "$server" "$transport"
        for w in "${workloads[@]}"; do
            result[$transport/$w/$server]=$("w_$w")
            echo "bench: $transport $w $server ${result[$transport/$w/$server]}" >&2
        done
        stop
    done
done

printf '\n%-6s %-16s %10s %10s %12s %14s %10s %10s\n' transport workload qnbd qemu-nbd nbdkit-file nbdkit-memory qnbd/qemu qnbd/nbdkit
for transport in unix tcp; do
    for w in "${workloads[@]}"; do
        q=${result[$transport/$w/qnbd]}
        m=${result[$transport/$w/qemu-nbd]}
        f=${result[$transport/$w/nbdkit-file]}
        n=${result[$transport/$w/nbdkit-memory]}
        printf '%-6s %-16s %10.0f %10.0f %12.0f %14.0f %9.2fx %9.2fx\n' "$transport" "$w" "$q" "$m" "$f" "$n" \
            "$(echo "$q / $m" | bc -l)" "$(echo "$q / $f" | bc -l)"
    done
done
echo "(seq_*: MiB/s with nbdcopy --connections=4; rand_*: 4 KiB IOPS with fio's nbd engine; runtime ${RUNTIME}s)"
fi

# qcow2: random writes into a fresh image (every write allocates a cluster), and reads and
# writes on a fully allocated one, beside the same workloads on the raw image. nbdkit 1.32
# has no qcow2 plugin or filter, so qemu-nbd is the only peer here.
raw_img=$img
if want qcow2; then
qcow2_fresh() {
    rm -f "$work/disk.qcow2"
    qemu-img create -q -f qcow2 "$work/disk.qcow2" "${SIZE_MB}M"
    sync
}
# qemu-img convert leaves unwritten (fallocated) extents under the clusters it writes, and
# ext4 then converts extents on every later write; a plain copy gives the qcow2 file the
# same host state as the raw image (also made by cp), so the table compares formats only.
qcow2_full() {
    rm -f "$work/disk.qcow2" "$work/conv.qcow2"
    qemu-img convert -q -f raw -O qcow2 "$src" "$work/conv.qcow2"
    cp --sparse=never "$work/conv.qcow2" "$work/disk.qcow2"
    rm -f "$work/conv.qcow2"
    # Let the copy's dirty pages reach the disk now, not during the measurement.
    sync
}
q_workloads=(fresh/rand_write_qd1 fresh/rand_write_qd32 full/seq_read full/rand_read_qd32 full/rand_write_qd32)
declare -A q2
for server in qnbd qemu-nbd qnbd-raw; do
    for wk in "${q_workloads[@]}"; do
        kind=${wk%%/*} w=${wk#*/}
        if [ "$server" = qnbd-raw ]; then
            sync
            fmt=raw img=$raw_img
            start qnbd unix
        else
            "qcow2_$kind"
            fmt=qcow2 img=$work/disk.qcow2
            start "$server" unix
        fi
        q2[$wk/$server]=$("w_$w")
        echo "bench: unix qcow2 $wk $server ${q2[$wk/$server]}" >&2
        stop
    done
done
fmt=raw img=$raw_img
printf '\n%-24s %12s %12s %12s %10s %12s\n' "qcow2 workload" qnbd qemu-nbd "qnbd raw" qnbd/qemu qcow2/raw
for wk in "${q_workloads[@]}"; do
    q=${q2[$wk/qnbd]} m=${q2[$wk/qemu-nbd]} r=${q2[$wk/qnbd-raw]}
    printf '%-24s %12.0f %12.0f %12.0f %9.2fx %11.2fx\n' "$wk" "$q" "$m" "$r" \
        "$(echo "$q / $m" | bc -l)" "$(echo "$q / $r" | bc -l)"
done
echo "(Unix socket; fresh: a new empty qcow2 per run; full: converted from the random raw image, then copied)"
fi

# TLS (x509, no client certificate) over TCP: the cost of encryption in each server.
make_pki() {
    local d=$work/pki
    mkdir -p "$d/server"
    certtool --generate-privkey --outfile "$d/ca-key.pem" 2>/dev/null
    printf 'cn = bench CA\nca\ncert_signing_key\n' >"$d/ca.info"
    certtool --generate-self-signed --load-privkey "$d/ca-key.pem" --template "$d/ca.info" \
        --outfile "$d/ca-cert.pem" 2>/dev/null
    certtool --generate-privkey --outfile "$d/server/server-key.pem" 2>/dev/null
    printf 'cn = localhost\nip_address = 127.0.0.1\ntls_www_server\nencryption_key\nsigning_key\n' >"$d/server.info"
    certtool --generate-certificate --load-ca-privkey "$d/ca-key.pem" --load-ca-certificate "$d/ca-cert.pem" \
        --load-privkey "$d/server/server-key.pem" --template "$d/server.info" \
        --outfile "$d/server/server-cert.pem" 2>/dev/null
    cp "$d/ca-cert.pem" "$d/server/"
}
if want tls; then
    command -v certtool >/dev/null || { echo "bench: certtool is missing (gnutls-bin)" >&2; exit 77; }
    make_pki
    tls_workloads=(seq_read seq_write rand_read_qd32 rand_write_qd32)
    declare -A tlsr
    for server in qnbd qemu-nbd nbdkit-file; do
        start "$server" tls
        for w in "${tls_workloads[@]}"; do
            tlsr[$w/$server]=$("w_$w")
            echo "bench: tls $w $server ${tlsr[$w/$server]}" >&2
        done
        stop
    done
    printf '\n%-16s %10s %10s %12s %10s %12s\n' "TLS workload" qnbd qemu-nbd nbdkit-file qnbd/qemu qnbd/nbdkit
    for w in "${tls_workloads[@]}"; do
        q=${tlsr[$w/qnbd]} m=${tlsr[$w/qemu-nbd]} f=${tlsr[$w/nbdkit-file]}
        printf '%-16s %10.0f %10.0f %12.0f %9.2fx %11.2fx\n' "$w" "$q" "$m" "$f" \
            "$(echo "$q / $m" | bc -l)" "$(echo "$q / $f" | bc -l)"
    done
    echo "(TCP with x509 TLS, raw image)"
fi

# The I/O paths of --aio and --cache=none, on the Unix socket.
if want aio; then
aio_workloads=(seq_read rand_read_qd1 rand_read_qd32 rand_write_qd32)
aio_servers=(qnbd qnbd-io_uring qnbd-cache-none qnbd-native)
declare -A aio
for server in "${aio_servers[@]}"; do
    start "$server" unix
    for w in "${aio_workloads[@]}"; do
        aio[$w/$server]=$("w_$w")
        echo "bench: unix $w $server ${aio[$w/$server]}" >&2
    done
    stop
done
printf '\n%-16s %12s %14s %16s %22s\n' workload "aio=threads" "aio=io_uring" "cache=none" "aio=native,cache=none"
for w in "${aio_workloads[@]}"; do
    printf '%-16s %12.0f %14.0f %16.0f %22.0f\n' "$w" "${aio[$w/qnbd]}" "${aio[$w/qnbd-io_uring]}" \
        "${aio[$w/qnbd-cache-none]}" "${aio[$w/qnbd-native]}"
done
fi
