#!/usr/bin/env bash
# qnbd against qemu-nbd on the image formats both serve besides raw and qcow2 (vmdk, vdi,
# vpc, vhdx, qed, parallels, qcow (v1), and qcow2 with an external data file as
# `qcow2-datafile`;
# FORMATS= picks some), over a Unix socket: 4 KiB random reads and writes at QD 32 (fio's nbd engine)
# on a fully allocated image, 4 KiB random writes at QD 32 into a fresh one (every write
# allocates), and a sequential 1 MiB copy out (nbdcopy). Rounds are interleaved (qnbd,
# qemu-nbd, qnbd, ...); each figure is the median, with the ratio qnbd / qemu-nbd.
# (nbdkit has no plugin for these formats.) Not a test: run it on a quiet machine.
# Usage: scripts/bench/formats.sh [ROUNDS] [SECONDS]   (QNBD= to pick the binary)
set -euo pipefail
cd "$(dirname "$0")/../.."
ROUNDS=${1:-3}
SECS=${2:-5}
QNBD=$(realpath "${QNBD:-target/release/qnbd}")
W=$(mktemp -d /var/tmp/qnbd-fmtbench.XXXXXX)
trap 'rm -rf "$W"' EXIT
head -c 512M /dev/urandom >"$W/src.raw"

. scripts/bench/lib.sh
serve() { # serve BIN FMT IMG -> starts the server, sets $PID
    serve_on "$W/s.sock" "$1" -t -f "$2" --cache=writeback -k "$W/s.sock" "$3"
}

echo "| format | workload | qnbd | qemu-nbd | ratio |"
echo "|---|---|---|---|---|"
for spec in ${FORMATS:-vmdk vdi vpc vhdx qed parallels qcow qcow2-datafile}; do
    fmt=${spec%-datafile}
    declare -A res=()
    for r in $(seq "$ROUNDS"); do
        for srv in qnbd qemu-nbd; do
            bin=$QNBD
            [ "$srv" = qemu-nbd ] && bin=$(command -v qemu-nbd)
            full=() fresh=()
            if [ "$spec" = qcow2-datafile ]; then
                full=(-o "data_file=$W/full.data") fresh=(-o "data_file=$W/fresh.data")
            fi
            qemu-img convert -f raw -O "$fmt" "${full[@]}" "$W/src.raw" "$W/full.$fmt"
            sync # the copy's writeback must not run under the measurement
            serve "$bin" "$fmt" "$W/full.$fmt"
            res[$srv:randread]+="$(fio_iops "$W/s.sock" randread) "
            res[$srv:randwrite]+="$(fio_iops "$W/s.sock" randwrite) "
            res[$srv:copy]+="$(copy_mibs "$W/s.sock" 512) "
            stop
            qemu-img create -q -f "$fmt" "${fresh[@]}" "$W/fresh.$fmt" 512M
            serve "$bin" "$fmt" "$W/fresh.$fmt"
            res[$srv:alloc]+="$(fio_iops "$W/s.sock" randwrite) "
            stop
            rm -f "$W/full.$fmt" "$W/fresh.$fmt" "$W/full.data" "$W/fresh.data"
        done
    done
    for wl in randread randwrite alloc copy; do
        a=$(echo "${res[qnbd:$wl]}" | median)
        b=$(echo "${res[qemu-nbd:$wl]}" | median)
        unit="IOPS"
        [ "$wl" = copy ] && unit="MiB/s"
        name=$wl
        case $wl in
        randread) name="4 KiB random read QD32, allocated" ;;
        randwrite) name="4 KiB random write QD32, allocated" ;;
        alloc) name="4 KiB random write QD32, fresh image" ;;
        copy) name="1 MiB sequential copy out (nbdcopy)" ;;
        esac
        echo "| $spec | $name | $a $unit | $b $unit | $(ratio "$a" "$b") |"
    done
    unset res
done
