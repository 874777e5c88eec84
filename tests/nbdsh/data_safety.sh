#!/bin/bash
# Runs verify.py and crash.py against NBD servers on raw, raw -n (O_DIRECT), qcow2 with
# 64 KiB clusters and qcow2 with 4 KiB clusters, and prints a markdown table of the results.
#
# usage: tests/nbdsh/data_safety.sh [SERVER...]      (default: qemu-nbd)
#   e.g. tests/nbdsh/data_safety.sh qemu-nbd /tmp/qnbd-old
# environment: SEEDS="1 2 3" (verify.py runs, one per seed), WRITES=20000, CONNS=8,
#   ROUNDS=20 (crash.py), SIZE=256M (image size: big enough that fresh qcow2 clusters keep
#   being allocated all run long), VARIANTS="raw raw-n qcow2-64k qcow2-4k" (also
#   qcow2-64k-unmap, qcow2-4k-unmap: --discard=unmap), WORK=/var/tmp/... (images;
#   not a tmpfs, O_DIRECT needs a real file system), LOG=file for the full output.
# Needs /usr/bin/python3 with Debian's python3-libnbd, and qemu-img.
set -u
here=$(cd "$(dirname "$0")" && pwd)
py=/usr/bin/python3
servers=("$@")
[ ${#servers[@]} -eq 0 ] && servers=(qemu-nbd)
SEEDS=${SEEDS:-"1 2 3"}
WRITES=${WRITES:-20000}
CONNS=${CONNS:-8}
ROUNDS=${ROUNDS:-20}
SIZE=${SIZE:-256M}
VARIANTS=${VARIANTS:-"raw raw-n qcow2-64k qcow2-4k"}
WORK=${WORK:-$(mktemp -d /var/tmp/data-safety.XXXXXX)}
LOG=${LOG:-$WORK/log}
mkdir -p "$WORK"
: >"$LOG"

variant() { # sets fmt, opts (server), vopts (verify.py), create (uses {img}) for variant $1
    vopts=""
    case $1 in
    raw) fmt=raw opts="" create="truncate -s $SIZE {img}" ;;
    raw-n) fmt=raw opts="-n" create="truncate -s $SIZE {img}" ;;
    qcow2-64k) fmt=qcow2 opts="" create="qemu-img create -q -f qcow2 {img} $SIZE" ;;
    qcow2-4k) fmt=qcow2 opts="" create="qemu-img create -q -f qcow2 -o cluster_size=4096 {img} $SIZE" ;;
    # TRIM really discards: whole trimmed clusters must read back as zeroes.
    qcow2-64k-unmap) fmt=qcow2 opts="--discard=unmap" vopts="--trim-zeroes=65536"
        create="qemu-img create -q -f qcow2 {img} $SIZE" ;;
    qcow2-4k-unmap) fmt=qcow2 opts="--discard=unmap" vopts="--trim-zeroes=4096"
        create="qemu-img create -q -f qcow2 -o cluster_size=4096 {img} $SIZE" ;;
    *) echo "unknown variant $1" >&2; exit 2 ;;
    esac
}

run_verify() { # server variant seed -> prints one cell
    local srv=$1 seed=$3 img=$WORK/verify.img sock=$WORK/verify.sock pid out rc check=""
    variant "$2"
    rm -f "$img" "$sock"
    sh -c "${create//\{img\}/$img}"
    $srv -t -e 0 -f $fmt $opts -k "$sock" "$img" 2>>"$LOG" &
    pid=$!
    for _ in $(seq 200); do [ -S "$sock" ] && break; sleep 0.05; done
    out=$($py "$here/verify.py" "nbd+unix:///?socket=$sock" --conns "$CONNS" \
        --writes "$WRITES" --seed "$seed" $vopts 2>&1)
    rc=$?
    kill "$pid"; wait "$pid" 2>/dev/null
    if [ "$fmt" = qcow2 ]; then
        qemu-img check -q -f qcow2 "$img" >>"$LOG" 2>&1
        case $? in 0|3) ;; *) check=" CORRUPT IMAGE" ;; esac
    fi
    printf '%s\n' "== verify $srv $2 seed $seed (rc $rc)$check" "$out" >>"$LOG"
    local lost secs
    lost=$(sed -n 's/.*, \([0-9]*\) lost.*/\1/p' <<<"$out" | head -1)
    secs=$(sed -n 's/.*, \([0-9.]*\) s[],].*/\1/p' <<<"$out" | head -1)
    if [ $rc -eq 0 ] && [ -z "$check" ]; then echo "ok (${secs}s)"
    else echo "FAIL ${lost:-?} lost$check"; fi
}

run_crash() { # server variant -> prints one cell
    local srv=$1 out rc
    variant "$2"
    out=$($py "$here/crash.py" --server "$srv -t -e 0 -f $fmt $opts -k {sock} {img}" \
        --create "$create" --format $fmt --rounds "$ROUNDS" --conns "$CONNS" \
        --workdir "$WORK/crash" --keep-failed "$WORK/failed-$(basename "$srv")-$2" 2>&1)
    rc=$?
    printf '%s\n' "== crash $srv $2 (rc $rc)" "$out" >>"$LOG"
    local sum
    sum=$(grep '^crash:' <<<"$out" | sed 's/^crash: //; s/ \[.*//')
    if [ $rc -eq 0 ]; then echo "ok: ${sum:-?}"; else echo "FAIL: ${sum:-$(tail -1 <<<"$out")}"; fi
}

echo "| server | variant | verify.py (seeds $SEEDS, $WRITES writes, $CONNS conns) | crash.py ($ROUNDS rounds, $CONNS conns) |"
echo "|---|---|---|---|"
for srv in "${servers[@]}"; do
    for v in $VARIANTS; do
        cells=()
        for seed in $SEEDS; do cells+=("$(run_verify "$srv" "$v" "$seed")"); done
        vcell=$(IFS=';'; echo "${cells[*]}" | sed 's/;/; /g')
        ccell=$(run_crash "$srv" "$v")
        echo "| $(basename "$srv") | $v | $vcell | $ccell |"
    done
done
echo "full output: $LOG" >&2
