#!/bin/sh
# Guest-side tests of `qnbd -c` / `-d` (run inside the VM by scripts/vm/run.sh, cwd = the share
# holding the qnbd binary). Prints one line per check and "N passed, N failed" at the end;
# exits non-zero if anything failed.
set -u
QNBD=${QNBD:-./qnbd}
W=/tmp/kt
mkdir -p $W /mnt/k
pass=0
fail=0
ok() { pass=$((pass + 1)); echo "PASS: $*"; }
bad() { fail=$((fail + 1)); echo "FAIL: $*"; }
check() { # check DESC CMD...
    desc=$1
    shift
    if "$@" >$W/out 2>&1; then ok "$desc"; else bad "$desc"; sed 's/^/    /' $W/out; fi
}

wait_gone() { # wait until /dev/nbdN has no connection
    i=0
    while [ -e /sys/block/$1/pid ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i + 1)); done
    [ ! -e /sys/block/$1/pid ]
}

fs_cycle() { # fs_cycle IMG FORMAT EXTRA-ARGS...: mkfs, write, unmount, disconnect, remount, verify
    img=$1; fmt=$2; shift 2
    $QNBD -f "$fmt" -c /dev/nbd0 "$@" "$img" || return 1
    mkfs.ext4 -q -F /dev/nbd0 || return 1
    mount /dev/nbd0 /mnt/k || return 1
    dd if=/dev/urandom of=/mnt/k/data bs=1M count=8 2>/dev/null || return 1
    sha1=$(sha256sum </mnt/k/data)
    echo hello >/mnt/k/hello
    umount /mnt/k || return 1
    $QNBD -d /dev/nbd0 >/dev/null || return 1
    wait_gone nbd0 || return 1
    if [ "$fmt" = qcow2 ]; then qemu-img check -q "$img" || return 1; fi
    $QNBD -f "$fmt" -c /dev/nbd0 "$@" "$img" || return 1
    mount /dev/nbd0 /mnt/k || return 1
    sha2=$(sha256sum </mnt/k/data)
    grep -q hello /mnt/k/hello || return 1
    umount /mnt/k
    $QNBD -d /dev/nbd0 >/dev/null || return 1
    wait_gone nbd0 || return 1
    [ "$sha1" = "$sha2" ] || return 1
    e2fsck_img=$img
    return 0
}

qemu-img create -q -f raw $W/raw.img 256M
check "raw: -c, mkfs.ext4, mount, write, -d, remount (netlink)" fs_cycle $W/raw.img raw
qemu-img create -q -f raw $W/raw2.img 256M
check "raw: the same through ioctls" fs_cycle $W/raw2.img raw --kernel-api=ioctl
qemu-img create -q -f raw $W/raw3.img 256M
check "raw: the same with --connections 4" fs_cycle $W/raw3.img raw --connections 4
if qemu-img create -q -f qcow2 $W/q.qcow2 256M && $QNBD -f qcow2 -r -c /dev/nbd1 $W/q.qcow2 2>/dev/null; then
    $QNBD -d /dev/nbd1 >/dev/null; wait_gone nbd1
    check "qcow2: -c, mkfs.ext4, mount, write, -d, remount, qemu-img check" fs_cycle $W/q.qcow2 qcow2
else
    echo "SKIP: qcow2 is not supported by this qnbd yet"
fi

# -r: a read-only device.
ro_test() {
    $QNBD -f raw -r -c /dev/nbd0 $W/raw.img || return 1
    [ "$(blockdev --getro /dev/nbd0)" = 1 ] || return 1
    if dd if=/dev/zero of=/dev/nbd0 bs=4096 count=1 oflag=direct 2>/dev/null; then return 1; fi
    $QNBD -d /dev/nbd0 >/dev/null && wait_gone nbd0
}
check "-r gives a read-only device" ro_test

# -s: the image is unchanged.
snap_test() {
    before=$(sha256sum <$W/raw.img)
    $QNBD -f raw -s -c /dev/nbd0 $W/raw.img || return 1
    dd if=/dev/urandom of=/dev/nbd0 bs=1M count=4 oflag=direct 2>/dev/null || return 1
    $QNBD -d /dev/nbd0 >/dev/null && wait_gone nbd0 || return 1
    [ "$before" = "$(sha256sum <$W/raw.img)" ]
}
if $QNBD -f raw -s -r -c /dev/nbd2 $W/raw.img 2>/dev/null; then
    $QNBD -d /dev/nbd2 >/dev/null; wait_gone nbd2
    check "-s leaves the image unchanged" snap_test
else
    echo "SKIP: -s is not supported by this qnbd yet"
fi

# A GPT partition table shows /dev/nbd0p1.
gpt_test() {
    qemu-img create -q -f raw $W/gpt.img 64M
    printf 'label: gpt\n,32M\n,\n' | sfdisk -q $W/gpt.img >/dev/null 2>&1 || return 1
    $QNBD -f raw -c /dev/nbd0 $W/gpt.img || return 1
    [ -b /dev/nbd0p1 ] && [ -b /dev/nbd0p2 ] || return 1
    $QNBD -d /dev/nbd0 >/dev/null && wait_gone nbd0
}
if command -v sfdisk >/dev/null; then check "GPT partitions appear as /dev/nbd0p1" gpt_test; else echo "SKIP: no sfdisk in the guest"; fi

# SIGTERM of a bound qnbd: device unbound, process gone, no temp file left.
term_test() {
    $QNBD -f raw -v -c /dev/nbd0 $W/raw.img >/dev/null 2>&1 &
    pid=$!
    i=0
    while [ ! -e /sys/block/nbd0/pid ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
    [ -e /sys/block/nbd0/pid ] || return 1
    kill -TERM $pid
    wait $pid || return 1
    wait_gone nbd0 || return 1
    ! kill -0 $pid 2>/dev/null
}
check "SIGTERM of a bound qnbd unbinds and exits 0" term_test

# -d on a device that is not bound: a clear error.
notbound_test() {
    ! $QNBD -d /dev/nbd5 >$W/nb 2>&1 && grep -q "not connected" $W/nb
}
check "-d on an unbound device fails clearly" notbound_test

# Race-free in scripts: 4 devices in parallel, cycles of -c, read partition, -d, with openers.
race_one() {
    local dev=$1 img=$2 n=$3 c=0
    while [ $c -lt "$n" ]; do
        $QNBD -f raw -c /dev/$dev $img || { echo "connect $dev $c failed"; return 1; }
        dd if=/dev/${dev}p1 of=/dev/null bs=64k count=16 2>/dev/null || { echo "read ${dev}p1 $c failed"; return 1; }
        $QNBD -d /dev/$dev >/dev/null || { echo "disconnect $dev $c failed"; return 1; }
        [ ! -e /sys/block/$dev/pid ] || { echo "$dev still bound after -d"; return 1; }
        c=$((c + 1))
    done
}
race_test() {
    local i p pids="" poker rc
    for i in 0 1 2 3; do cp $W/gpt.img $W/gpt$i.img; done
    # udev-like openers poking the devices meanwhile.
    ( while :; do for i in 0 1 2 3; do head -c 512 /dev/nbd$i >/dev/null 2>&1; done; done ) &
    poker=$!
    for i in 0 1 2 3; do race_one nbd$i $W/gpt$i.img "$RACE_CYCLES" & pids="$pids $!"; done
    rc=0
    for p in $pids; do wait $p || rc=1; done
    kill $poker
    return $rc
}
RACE_CYCLES=20
[ -f /share/race-cycles ] && RACE_CYCLES=$(cat /share/race-cycles)
if [ -f $W/gpt.img ]; then check "4 devices x $RACE_CYCLES cycles of -c / read / -d, with openers" race_test; fi

echo "$pass passed, $fail failed"
[ $fail -eq 0 ]
