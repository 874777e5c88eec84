#!/bin/sh
# Guest-side block device benchmark (not a test): fio through a loop device, qemu-nbd -c and
# qnbd -c with 1 and 4 connections, on the same raw image in guest memory.
QNBD=${QNBD:-./qnbd}
RT=$(cat /share/bench-runtime 2>/dev/null || echo 5)
img=/var/tmp/bench.img
dd if=/dev/urandom of=$img bs=1M count=256 2>/dev/null
iops() { # iops DEV RW BS QD
    fio --name=b --filename="$1" --rw="$2" --bs="$3" --iodepth="$4" --ioengine=libaio --direct=1 \
        --time_based --runtime="$RT" --size=256M --output-format=terse 2>/dev/null |
        awk -F';' -v rw="$2" '{ if (rw ~ /write/) print $49; else print $8 }'
}
mibs() { # mibs DEV: sequential 1 MiB reads, MiB/s
    fio --name=b --filename="$1" --rw=read --bs=1M --iodepth=4 --ioengine=libaio --direct=1 \
        --time_based --runtime="$RT" --size=256M --output-format=terse 2>/dev/null |
        awk -F';' '{ print $7 / 1024 }'
}
run() { # run NAME DEV
    a=$(iops "$2" randread 4k 32)
    b=$(iops "$2" randwrite 4k 32)
    c=$(mibs "$2")
    echo "RESULT $1 $a $b $c"
}
losetup /dev/loop0 $img && run loop /dev/loop0 && losetup -d /dev/loop0
qemu-nbd -f raw -c /dev/nbd0 $img && sleep 1 && run qemu-nbd /dev/nbd0 && qemu-nbd -d /dev/nbd0 >/dev/null
sleep 1
$QNBD -f raw -c /dev/nbd1 $img && run qnbd-1conn /dev/nbd1 && $QNBD -d /dev/nbd1 >/dev/null
$QNBD -f raw --connections 4 -c /dev/nbd2 $img && run qnbd-4conn /dev/nbd2 && $QNBD -d /dev/nbd2 >/dev/null
echo "1 passed, 0 failed"
