#!/bin/sh
# Guest-side block device benchmark (not a test): fio through a loop device, qemu-nbd -c,
# qnbd -c on NBD (1 and 4 connections) and qnbd -c on ublk (raw, qcow2, and variants of the
# ublk settings), all on the same data in guest memory. Every device is set up first, then
# each measurement runs on every device in turn, twice, and the better run counts, so that a
# change of speed of the host during the run hits every setup alike.
# Prints "RESULT NAME rr1 rr32 rw1 rw32 seqr seqw": 4 KiB random read and write IOPS at QD1
# and QD32, 1 MiB sequential read and write MiB/s.
QNBD=${QNBD:-./qnbd}
RT=$(cat /share/bench-runtime 2>/dev/null || echo 4)
ONLY=$(cat /share/bench-only 2>/dev/null)
ROUNDS=2
img=/var/tmp/bench.img
qimg=/var/tmp/bench.qcow2
# 192 MiB each: the raw image and its qcow2 copy both live in the guest's tmpfs.
dd if=/dev/urandom of=$img bs=1M count=192 2>/dev/null
# Fully allocated, so qcow2 and raw do the same work (no cluster allocation in the run).
qemu-img convert -f raw -O qcow2 $img $qimg

want() { case $1 in *"$ONLY"*) return 0 ;; *) return 1 ;; esac; }
names=""
add() { names="$names $1"; eval "dev_$(echo "$1" | tr - _)=$2"; }
dev_of() { eval "echo \$dev_$(echo "$1" | tr - _)"; }
ublk() { # ublk NAME DEV FORMAT IMAGE [QNBD OPTIONS...]
    name=$1 dev=$2 fmt=$3 file=$4
    shift 4
    want "$name" || return 0
    $QNBD -f "$fmt" "$@" -c "$dev" "$file" && add "$name" "$dev"
}

if want loop; then losetup /dev/loop0 $img && add loop /dev/loop0; fi
if want qemu-nbd; then qemu-nbd -f raw -c /dev/nbd1 $img && sleep 1 && add qemu-nbd /dev/nbd1; fi
if want qnbd-nbd; then
    $QNBD -f raw -c /dev/nbd0 $img && add qnbd-nbd /dev/nbd0
    $QNBD -f raw --connections 4 -c /dev/nbd2 $img && add qnbd-nbd-4conn /dev/nbd2
fi
ublk ublk-raw /dev/ublkb0 raw $img
ublk ublk-qcow2 /dev/ublkb1 qcow2 $qimg
# Variants of the ublk settings, for choosing the defaults.
ublk ublk-raw-1queue /dev/ublkb2 raw $img --ublk-queues 1
export QNBD_UBLK_PIN=1
ublk ublk-raw-pinned /dev/ublkb4 raw $img
unset QNBD_UBLK_PIN
export QNBD_UBLK_BUF_KB=1024
ublk ublk-raw-buf1M /dev/ublkb5 raw $img
unset QNBD_UBLK_BUF_KB

fio_run() { # fio_run DEV RW BS QD: prints IOPS (4k) or MiB/s (1M)
    timeout $((RT * 5 + 60)) fio --name=b --filename="$1" --rw="$2" --bs="$3" --iodepth="$4" --ioengine=libaio --direct=1 \
        --time_based --runtime="$RT" --size=192M --output-format=terse 2>/dev/null |
        awk -F';' -v rw="$2" -v bs="$3" '{
            if (bs == "1M") v = (rw ~ /write/) ? $48 / 1024 : $7 / 1024
            else v = (rw ~ /write/) ? $49 : $8
            print v + 0 }'
}
col=0
for t in "randread 4k 1" "randread 4k 32" "randwrite 4k 1" "randwrite 4k 32" "read 1M 4" "write 1M 4"; do
    col=$((col + 1))
    r=0
    while [ $r -lt $ROUNDS ]; do
        for n in $names; do
            # shellcheck disable=SC2086
            v=$(fio_run "$(dev_of "$n")" $t)
            echo "$n $col $v" >>/tmp/bench.raw
            echo "bench: $n $t: $v"
        done
        r=$((r + 1))
    done
done
for n in $names; do
    line="RESULT $n"
    c=1
    while [ $c -le 6 ]; do
        line="$line $(awk -v n="$n" -v c="$c" '$1 == n && $2 == c { if ($3 > m) m = $3 } END { print m + 0 }' /tmp/bench.raw)"
        c=$((c + 1))
    done
    echo "$line"
done

# Slow flushes (each sync of the image sleeps up to 20 ms, QNBD_TEST_DELAY_US): 4 KiB random
# reads at QD16 next to a writer that flushes after every write, with flush served by the
# workers (default) and on the queue threads. Prints "FLUSHES NAME READ-IOPS FLUSHES/S".
flushes() { # flushes NAME DEV OFFLOAD(0|1)
    name=$1 dev=$2
    want "$name" || return 0
    QNBD_UBLK_OFFLOAD=$3 QNBD_TEST_DELAY_US=20000 $QNBD -f raw -c "$dev" $img || return 0
    out=$(fio --name=r --filename="$dev" --rw=randread --bs=4k --iodepth=16 --ioengine=libaio \
        --direct=1 --time_based --runtime="$RT" --size=192M \
        --name=w --filename="$dev" --rw=randwrite --bs=4k --iodepth=1 --ioengine=libaio \
        --direct=1 --fsync=1 --time_based --runtime="$RT" --size=192M --output-format=terse 2>/tmp/fio.err)
    [ -s /tmp/fio.err ] && sed "s/^/fio: /" /tmp/fio.err
    echo "FLUSHES $name $(echo "$out" | awk -F';' '$1 == 3 && $3 == "r" { r = $8 } $1 == 3 && $3 == "w" { w = $49 } END { printf "%d %d", r, w }')"
    $QNBD -d "$dev" >/dev/null
}
flushes slowflush-workers /dev/ublkb6 1
flushes slowflush-queue /dev/ublkb7 0

for n in $names; do
    d=$(dev_of "$n")
    case $n in
    loop) losetup -d "$d" ;;
    qemu-nbd) qemu-nbd -d "$d" >/dev/null ;;
    *) $QNBD -d "$d" >/dev/null ;;
    esac
done
echo "1 passed, 0 failed"
