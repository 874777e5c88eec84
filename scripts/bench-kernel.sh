#!/usr/bin/env bash
# Kernel block-device benchmark in the TCG guest (not a test): fio 4 KiB random read/write at
# QD32 and 1 MiB sequential read through a loop device, qemu-nbd -c, and qnbd -c with 1 and 4
# connections. Prints IOPS (and MiB/s for the sequential read) and ratios. TCG is slow:
# compare ratios only.   scripts/bench-kernel.sh [RUNTIME_SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q
share=$(mktemp -d /var/tmp/qnbd-bench-vm.XXXXXX)
trap 'rm -rf "$share"' EXIT
echo "${1:-5}" >"$share/bench-runtime"
QNBD_BIN=$PWD/target/release/qnbd QNBD_VM_TIMEOUT=900 bash scripts/vm/run.sh scripts/vm/guest/bench.sh "$share" >"$share/out" 2>&1 || {
    cat "$share/out"
    exit 1
}
grep '^RESULT' "$share/out" | awk '
    { name[NR]=$2; rr[NR]=$3; rw[NR]=$4; sr[NR]=$5; if ($2=="qemu-nbd") q=NR }
    END {
        printf "%-12s %12s %12s %14s %10s\n", "setup", "randread/32", "randwrite/32", "seqread MiB/s", "rr vs qemu"
        for (i=1;i<=NR;i++) printf "%-12s %12.0f %12.0f %14.0f %9.2fx\n", name[i], rr[i], rw[i], sr[i], rr[i]/rr[q]
    }'
