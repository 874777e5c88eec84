#!/usr/bin/env bash
# Kernel block-device benchmark in the TCG guest (not a test): fio 4 KiB random read/write at
# QD1 and QD32 and 1 MiB sequential read/write through a loop device, qemu-nbd -c, qnbd -c on
# NBD (1 and 4 connections) and qnbd -c on ublk (raw, qcow2, and tuning variants), same data.
# Prints IOPS and MiB/s, then ratios against qemu-nbd -c and the loop device, and qcow2 vs
# raw through ublk. TCG is slow: compare ratios only.
#   scripts/bench-kernel.sh [RUNTIME_SECONDS] [ONLY_SETUPS_MATCHING]
# QNBD_BIN=path uses that binary instead of building target/release/qnbd.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${QNBD_BIN:-}" ]; then
    cargo build --release -q
    QNBD_BIN=$PWD/target/release/qnbd
fi
share=$(mktemp -d /var/tmp/qnbd-bench-vm.XXXXXX)
trap 'rm -rf "$share"' EXIT
echo "${1:-5}" >"$share/bench-runtime"
[ -n "${2:-}" ] && echo "$2" >"$share/bench-only"
QNBD_BIN=$QNBD_BIN QNBD_VM_MEM=3072 QNBD_VM_TIMEOUT=2400 bash scripts/vm/run.sh scripts/vm/guest/bench.sh "$share" >"$share/out" 2>&1 || {
    cat "$share/out"
    exit 1
}
grep -a '^RESULT' "$share/out" | awk '
    { n=NR; name[n]=$2; for (c=3;c<=8;c++) v[n,c]=$c; if ($2=="qemu-nbd") q=n; if ($2=="loop") l=n; if ($2=="ublk-raw") r=n }
    function row(title, ref,   i, c) {
        if (!ref) return
        printf "\n%s\n%-16s %8s %8s %8s %8s %8s %8s\n", title, "setup", "rr QD1", "rr QD32", "rw QD1", "rw QD32", "seq rd", "seq wr"
        for (i=1;i<=n;i++) {
            printf "%-16s", name[i]
            for (c=3;c<=8;c++) printf " %7.2fx", (v[ref,c] > 0 ? v[i,c]/v[ref,c] : 0)
            printf "\n"
        }
    }
    END {
        printf "%-16s %8s %8s %8s %8s %8s %8s\n", "setup", "rr QD1", "rr QD32", "rw QD1", "rw QD32", "rd MiB/s", "wr MiB/s"
        for (i=1;i<=n;i++) {
            printf "%-16s", name[i]
            for (c=3;c<=8;c++) printf " %8.0f", v[i,c]
            printf "\n"
        }
        row("ratio to qemu-nbd -c", q)
        row("ratio to the loop device", l)
        row("ratio to ublk raw", r)
    }'
grep -a '^FLUSHES' "$share/out" | awk '
    BEGIN { printf "\nslow flushes (each sync sleeps 0-20 ms): reads at QD16 beside a writer flushing after every write\n%-20s %10s %10s\n", "flush served by", "read IOPS", "writes/s" }
    { printf "%-20s %10d %10d\n", $2, $3, $4 }'
