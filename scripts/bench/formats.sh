#!/usr/bin/env bash
# qnbd against qemu-nbd on the image formats both serve besides raw and qcow2 (vmdk, vdi,
# vpc, vhdx, qed; FORMATS= picks some), over a Unix socket: 4 KiB random reads and writes at QD 32 (fio's nbd engine)
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

serve() { # serve BIN FMT IMG -> starts the server, sets $PID
    rm -f "$W/s.sock"
    "$1" -t -f "$2" --cache=writeback -k "$W/s.sock" "$3" 2>/dev/null &
    PID=$!
    for _ in $(seq 200); do [ -S "$W/s.sock" ] && return 0; sleep 0.05; done
    echo "server did not start" >&2
    exit 1
}
stop() { kill "$PID" && wait "$PID" 2>/dev/null || true; }

fio_iops() { # fio_iops RW -> IOPS
    fio --name=b --ioengine=nbd --uri="nbd+unix:///?socket=$W/s.sock" --rw="$1" --bs=4k \
        --iodepth=32 --time_based --runtime="$SECS" --ramp_time=1 --output-format=json |
        python3 -c 'import json,sys; t=sys.stdin.read(); j=json.loads(t[t.index("{"):])["jobs"][0]; print(round(j["read"]["iops"]+j["write"]["iops"]))'
}

copy_mibs() { # MiB/s of a sequential copy of the whole export to /dev/null
    local t0 t1
    t0=$(date +%s.%N)
    nbdcopy "nbd+unix:///?socket=$W/s.sock" null: >/dev/null
    t1=$(date +%s.%N)
    python3 -c "print(round(512 / ($t1 - $t0)))"
}

median() { tr ' ' '\n' | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

echo "| format | workload | qnbd | qemu-nbd | ratio |"
echo "|---|---|---|---|---|"
for fmt in ${FORMATS:-vmdk vdi vpc vhdx qed}; do
    declare -A res=()
    for r in $(seq "$ROUNDS"); do
        for srv in qnbd qemu-nbd; do
            bin=$QNBD
            [ "$srv" = qemu-nbd ] && bin=$(command -v qemu-nbd)
            qemu-img convert -f raw -O "$fmt" "$W/src.raw" "$W/full.$fmt"
            sync # the copy's writeback must not run under the measurement
            serve "$bin" "$fmt" "$W/full.$fmt"
            res[$srv:randread]+="$(fio_iops randread) "
            res[$srv:randwrite]+="$(fio_iops randwrite) "
            res[$srv:copy]+="$(copy_mibs) "
            stop
            qemu-img create -q -f "$fmt" "$W/fresh.$fmt" 512M
            serve "$bin" "$fmt" "$W/fresh.$fmt"
            res[$srv:alloc]+="$(fio_iops randwrite) "
            stop
            rm -f "$W/full.$fmt" "$W/fresh.$fmt"
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
        echo "| $fmt | $name | $a $unit | $b $unit | $(python3 -c "print(f'{$a / max($b, 1):.2f}')") |"
    done
    unset res
done
