#!/bin/sh
# Guest-side tests of the ublk frontend (`-c ublk`, `-c /dev/ublkbN`, `--recover`, `-d`), run
# inside the VM by scripts/vm/run.sh (cwd = the share holding the qnbd binary). One line per
# check and "N passed, N failed" at the end; exits non-zero if anything failed. A guest that
# cannot run ublk at all fails here too (the caller turns a missing guest into a skip).
set -u
QNBD=${QNBD:-./qnbd}
W=/tmp/ut
mkdir -p $W /mnt/u
pass=0
fail=0
ok() { pass=$((pass + 1)); echo "PASS: $*"; }
bad() { fail=$((fail + 1)); echo "FAIL: $*"; }
ONLY=$(cat /share/only 2>/dev/null) # while developing: run only the checks matching this
check() { # check DESC CMD...
    desc=$1
    shift
    case $desc in *"$ONLY"*) ;; *) return 0 ;; esac
    t0=$(date +%s)
    if "$@" >$W/out 2>&1; then ok "$desc ($(($(date +%s) - t0)) s)"; else bad "$desc"; sed 's/^/    /' $W/out; fi
}
note() { echo "  $*"; }

gone() { # gone N: /dev/ublkbN and its character device are gone (waits up to 10 s)
    i=0
    while { [ -e /sys/class/ublk-char/ublkc$1 ] || [ -e /dev/ublkb$1 ]; } && [ $i -lt 100 ]; do
        sleep 0.1
        i=$((i + 1))
    done
    [ ! -e /sys/class/ublk-char/ublkc$1 ] && [ ! -e /dev/ublkb$1 ]
}
dead() { # dead PID: the process is gone (waits up to 10 s)
    i=0
    while kill -0 "$1" 2>/dev/null && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
    ! kill -0 "$1" 2>/dev/null
}
nodevs() { [ -z "$(ls /sys/class/ublk-char 2>/dev/null)" ]; }

if [ ! -e /dev/ublk-control ]; then
    echo "FAIL: no /dev/ublk-control in the guest (ublk_drv not loaded)"
    echo "0 passed, 1 failed"
    exit 1
fi

# -c ublk prints the device; mkfs, mount, write, umount, -d; image checked; remount, verify.
fs_cycle() { # fs_cycle IMG FORMAT
    img=$1; fmt=$2
    dev=$($QNBD -f "$fmt" --pid-file $W/pid -c ublk "$img") || return 1
    note "device $dev"
    case $dev in /dev/ublkb*) ;; *) echo "no device printed: '$dev'"; return 1 ;; esac
    n=${dev#/dev/ublkb}
    [ -b "$dev" ] || return 1
    mkfs.ext4 -q -F "$dev" || return 1
    mount "$dev" /mnt/u || return 1
    dd if=/dev/urandom of=/mnt/u/data bs=1M count=8 2>/dev/null || return 1
    sha1=$(sha256sum </mnt/u/data)
    echo hello >/mnt/u/hello
    umount /mnt/u || return 1
    pid=$(cat $W/pid)
    $QNBD -d "$dev" >/dev/null || return 1
    gone "$n" || { echo "device left after -d"; return 1; }
    dead "$pid" || { echo "server $pid left after -d"; return 1; }
    # qemu-nbd leaves its pid file behind; so does qnbd.
    [ -e $W/pid ] || { echo "pid file removed (qemu-nbd leaves it)"; return 1; }
    rm -f $W/pid
    if [ "$fmt" = qcow2 ]; then qemu-img check -q "$img" || return 1; else e2fsck -fn "$img" >/dev/null || return 1; fi
    $QNBD -f "$fmt" -c "$dev" "$img" || return 1
    mount "$dev" /mnt/u || return 1
    sha2=$(sha256sum </mnt/u/data)
    grep -q hello /mnt/u/hello || return 1
    umount /mnt/u
    $QNBD -d "$dev" >/dev/null || return 1
    gone "$n" || return 1
    [ "$sha1" = "$sha2" ]
}
qemu-img create -q -f raw $W/raw.img 128M
check "raw: -c ublk, mkfs.ext4, mount, write, -d (no device, no process), e2fsck, remount" fs_cycle $W/raw.img raw
qemu-img create -q -f qcow2 $W/q.qcow2 128M
check "qcow2: -c ublk, mkfs.ext4, mount, write, -d, qemu-img check, remount" fs_cycle $W/q.qcow2 qcow2

# fio --verify through 4 queues at QD32, raw and qcow2.
fio_verify() { # fio_verify IMG FORMAT DEV
    $QNBD -f "$2" --ublk-queues 4 --pid-file $W/fpid -c "$3" "$1" || return 1
    # 4 queue threads (the driver allows one queue per CPU: the guest has 4).
    q=$(cat /proc/"$(cat $W/fpid)"/task/*/comm | grep -c ublk-q)
    [ "$q" = 4 ] || { echo "$q queue threads, not 4"; $QNBD -d "$3"; return 1; }
    fio --name=verify --filename="$3" --rw=randwrite --bs=4k --iodepth=32 --ioengine=libaio \
        --direct=1 --size=24M --verify=crc32c --verify_fatal=1 --do_verify=1 \
        --output=$W/fio.txt || { cat $W/fio.txt; $QNBD -d "$3"; return 1; }
    grep -q "err= 0" $W/fio.txt || { cat $W/fio.txt; $QNBD -d "$3"; return 1; }
    $QNBD -d "$3" >/dev/null || return 1
    if [ "$2" = qcow2 ]; then qemu-img check -q "$1"; fi
}
qemu-img create -q -f raw $W/v.img 64M
check "raw: fio --verify=crc32c 4k random writes, QD32, 4 queues" fio_verify $W/v.img raw /dev/ublkb1
qemu-img create -q -f qcow2 $W/v.qcow2 64M
check "qcow2: fio --verify=crc32c 4k random writes, QD32, 4 queues" fio_verify $W/v.qcow2 qcow2 /dev/ublkb1

# The data-safety verifier, block-device form: 4 writers of mixed sizes (512 B - 256 KiB,
# unaligned to clusters) on disjoint regions, each verifying as it goes, on qcow2 (cluster
# allocation and read-modify-write races) with 2 queues.
mixed_verify() {
    qemu-img create -q -f qcow2 -o cluster_size=65536 $W/m.qcow2 64M
    $QNBD -f qcow2 --ublk-queues 2 -c /dev/ublkb2 $W/m.qcow2 || return 1
    fio --name=mixed --filename=/dev/ublkb2 --rw=randwrite --bsrange=512-256k --iodepth=16 \
        --ioengine=libaio --direct=1 --numjobs=4 --size=12M --offset_increment=16M \
        --verify=crc32c --verify_backlog=32 --verify_fatal=1 --group_reporting \
        --output=$W/mixed.txt || { cat $W/mixed.txt; $QNBD -d /dev/ublkb2; return 1; }
    grep -q "err= 0" $W/mixed.txt || { cat $W/mixed.txt; $QNBD -d /dev/ublkb2; return 1; }
    $QNBD -d /dev/ublkb2 >/dev/null || return 1
    qemu-img check -q $W/m.qcow2
}
check "qcow2: mixed-size verifying writers (fio verify_backlog, 4 jobs, 2 queues)" mixed_verify

# -r: a read-only device.
ro_test() {
    $QNBD -f raw -r -c /dev/ublkb0 $W/raw.img || return 1
    [ "$(blockdev --getro /dev/ublkb0)" = 1 ] || { echo "not read-only"; $QNBD -d /dev/ublkb0; return 1; }
    if dd if=/dev/zero of=/dev/ublkb0 bs=4096 count=1 oflag=direct 2>/dev/null; then
        echo "a write succeeded"; $QNBD -d /dev/ublkb0; return 1
    fi
    dd if=/dev/ublkb0 of=/dev/null bs=64k count=16 iflag=direct 2>/dev/null || return 1
    $QNBD -d /dev/ublkb0 >/dev/null && gone 0
}
check "-r gives a read-only device that refuses writes" ro_test

# -s: the image is unchanged.
snap_test() {
    before=$(sha256sum <$W/raw.img)
    $QNBD -f raw -s -c /dev/ublkb0 $W/raw.img || return 1
    dd if=/dev/urandom of=/dev/ublkb0 bs=1M count=4 oflag=direct 2>/dev/null || return 1
    $QNBD -d /dev/ublkb0 >/dev/null && gone 0 || return 1
    [ "$before" = "$(sha256sum <$W/raw.img)" ]
}
check "-s leaves the image unchanged" snap_test

# SIGTERM (and SIGINT) of a serving qnbd: device deleted, process gone with status 0.
term_test() { # term_test SIGNAL
    $QNBD -f raw -v -c /dev/ublkb3 $W/raw.img >/dev/null 2>&1 &
    pid=$!
    i=0
    while [ ! -b /dev/ublkb3 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
    [ -b /dev/ublkb3 ] || return 1
    dd if=/dev/urandom of=/dev/ublkb3 bs=64k count=16 2>/dev/null || return 1
    kill -"$1" $pid
    wait $pid || { echo "exit status $?"; return 1; }
    gone 3 && dead $pid
}
check "SIGTERM deletes the device and exits 0" term_test TERM
check "SIGINT deletes the device and exits 0" term_test INT

# --stats on a ublk device: SIGUSR1 reports and the device goes on; the exit report counts
# every byte written (the kernel may split or merge requests, so bytes, not requests).
stats_test() {
    rm -f $W/stats.json
    $QNBD -f raw --stats=json --stats-file=$W/stats.json -c /dev/ublkb4 $W/raw.img >/dev/null || return 1
    dd if=/dev/zero of=/dev/ublkb4 bs=1M count=8 oflag=direct 2>/dev/null || return 1
    dd if=/dev/ublkb4 of=/dev/null bs=1M count=4 iflag=direct 2>/dev/null || return 1
    pid=$(pidof qnbd)
    kill -USR1 $pid
    i=0; while [ ! -s $W/stats.json ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
    grep -q '"when":"SIGUSR1"' $W/stats.json || return 1
    [ -b /dev/ublkb4 ] || { echo "SIGUSR1 ended the device"; return 1; }
    $QNBD -d /dev/ublkb4 >/dev/null && gone 4 || return 1
    last=$(tail -n 1 $W/stats.json)
    echo "$last"
    echo "$last" | grep -q '"when":"exit"' || return 1
    echo "$last" | grep -q '"write":{"bytes":8388608,' || return 1
    # The kernel and udev read the partition table too: at least what dd read.
    read_bytes=$(echo "$last" | sed -n 's/.*"read":{"bytes":\([0-9]*\),.*/\1/p')
    [ "${read_bytes:-0}" -ge 4194304 ] || return 1
}
check "--stats=json: SIGUSR1 and exit reports count the bytes written and read" stats_test

# LUKS (driver=luks, key from --object secret) as a ublk device: the host made luks.img with
# qemu-img and pattern.bin; the guest writes the pattern through the device, reads it back
# from a fresh device, and leaves the image as luks-out.img for the host to compare.
luks_test() {
    [ -f luks.img ] && [ -f pattern.bin ] || { echo "the host gave no luks.img/pattern.bin"; return 1; }
    cp luks.img $W/luks.img || return 1
    opts="driver=luks,key-secret=sec0,file.filename=$W/luks.img"
    $QNBD --object secret,id=sec0,data=hunter2 --image-opts "$opts" -c /dev/ublkb6 >/dev/null || return 1
    dd if=pattern.bin of=/dev/ublkb6 bs=1M oflag=direct conv=fsync 2>/dev/null || return 1
    $QNBD -d /dev/ublkb6 >/dev/null && gone 6 || return 1
    $QNBD --object secret,id=sec0,data=hunter2 -r --image-opts "$opts" -c /dev/ublkb6 >/dev/null || return 1
    mb=$(($(wc -c <pattern.bin) / 1048576))
    dd if=/dev/ublkb6 of=$W/back.bin bs=1M count=$mb iflag=direct 2>/dev/null || return 1
    cmp pattern.bin $W/back.bin || return 1
    $QNBD -d /dev/ublkb6 >/dev/null && gone 6 || return 1
    ! $QNBD --object secret,id=sec0,data=wrong --image-opts "$opts" -c /dev/ublkb6 2>$W/err || return 1
    grep -q "Invalid password, cannot unlock any keyslot" $W/err || { cat $W/err; return 1; }
    nodevs || { echo "a device was left after a wrong passphrase"; return 1; }
    cp $W/luks.img luks-out.img
}
check "luks: --object secret + --image-opts driver=luks as a ublk device, written, read back; wrong passphrase refused" luks_test

# Failed starts leave no device.
failed_start() {
    ! $QNBD -f raw -c ublk $W/missing.img 2>$W/err || return 1
    nodevs || { echo "device left after a missing image"; return 1; }
    : >$W/empty.img
    ! $QNBD -f raw -c ublk $W/empty.img 2>$W/err || return 1
    nodevs || { echo "device left after an empty image"; return 1; }
    ! $QNBD -f qcow2 -c /dev/ublkb4 $W/raw.img 2>$W/err || return 1
    nodevs || { echo "device left after a wrong format"; return 1; }
    ! $QNBD -f raw --recover -c /dev/ublkb4 $W/raw.img 2>$W/err || return 1
    grep -q "does not exist" $W/err || { cat $W/err; return 1; }
    # A busy id: refused, and the device that has it is untouched.
    $QNBD -f raw -c /dev/ublkb4 $W/raw.img || return 1
    ! $QNBD -f raw -c /dev/ublkb4 $W/v.img 2>$W/err || return 1
    grep -q "already exists" $W/err || { cat $W/err; return 1; }
    dd if=/dev/ublkb4 of=/dev/null bs=64k count=4 iflag=direct 2>/dev/null || return 1
    $QNBD -d /dev/ublkb4 >/dev/null && gone 4 && nodevs
}
check "failed starts leave no device; a busy id is refused" failed_start

notexist_test() {
    ! $QNBD -d /dev/ublkb7 >$W/nb 2>&1 && grep -q "does not exist" $W/nb
}
check "-d on a missing device fails clearly" notexist_test

# Recovery: kill -9 with the filesystem mounted and fsync'ed writes in flight, --recover,
# the writer finishes without an error, umount, -d, fsck clean, every fsync'ed file intact.
recover_test() { # recover_test FORMAT IMG
    fmt=$1; img=$2
    $QNBD -f "$fmt" --pid-file $W/rpid -c /dev/ublkb5 "$img" || return 1
    mkfs.ext4 -q -F /dev/ublkb5 || return 1
    mount /dev/ublkb5 /mnt/u || return 1
    : >$W/synced
    (
        i=0
        while [ $i -lt 30 ]; do
            dd if=/dev/urandom of=/mnt/u/f$i bs=64k count=8 conv=fsync 2>/dev/null || exit 1
            sha256sum /mnt/u/f$i >>$W/synced
            i=$((i + 1))
        done
    ) &
    writer=$!
    while [ "$(wc -l <$W/synced)" -lt 3 ]; do sleep 0.1; done
    kill -9 "$(cat $W/rpid)"
    note "killed the server after $(wc -l <$W/synced) files"
    sleep 0.5
    if ! $QNBD -f "$fmt" --pid-file $W/rpid --recover -c /dev/ublkb5 "$img"; then
        $QNBD -d /dev/ublkb5
        wait $writer
        umount -l /mnt/u
        return 1
    fi
    wait $writer || { echo "the writer failed"; return 1; }
    note "$(wc -l <$W/synced) files fsync'ed in all"
    umount /mnt/u || return 1
    $QNBD -d /dev/ublkb5 >/dev/null && gone 5 || return 1
    if [ "$fmt" = qcow2 ]; then qemu-img check -q "$img" || return 1; fi
    $QNBD -f "$fmt" -c /dev/ublkb5 "$img" || return 1
    e2fsck -fn /dev/ublkb5 >$W/fsck 2>&1 || { cat $W/fsck; $QNBD -d /dev/ublkb5; return 1; }
    mount -o ro /dev/ublkb5 /mnt/u || return 1
    sha256sum -c $W/synced >$W/sums 2>&1 || { cat $W/sums; umount /mnt/u; $QNBD -d /dev/ublkb5; return 1; }
    umount /mnt/u
    $QNBD -d /dev/ublkb5 >/dev/null && gone 5
}
qemu-img create -q -f raw $W/r.img 128M
check "raw: kill -9 with writes in flight, --recover, fsck clean, fsync'ed files intact" recover_test raw $W/r.img
# qcow2 three times: a completed write whose metadata only the killed server's cache held
# was lost once in a while before writes were settled (request::settle).
recover_qcow2_rounds() {
    for round in 1 2 3; do
        rm -f $W/r.qcow2
        qemu-img create -q -f qcow2 $W/r.qcow2 128M
        recover_test qcow2 $W/r.qcow2 || { echo "round $round"; return 1; }
    done
}
check "qcow2: kill -9 with writes in flight, --recover, check clean, fsync'ed files intact (3 rounds)" recover_qcow2_rounds

# -d on a device whose server died (no recovery wanted) deletes it.
dead_server_test() {
    $QNBD -f raw --pid-file $W/dpid -c /dev/ublkb6 $W/raw.img || return 1
    kill -9 "$(cat $W/dpid)"
    sleep 0.5
    $QNBD -d /dev/ublkb6 >/dev/null && gone 6
}
check "-d deletes a device whose server was killed" dead_server_test

nodevs || { bad "devices left at the end: $(ls /sys/class/ublk-char)"; }
[ -z "$(pidof qnbd)" ] || bad "qnbd processes left at the end: $(pidof qnbd)"
echo "$pass passed, $fail failed"
[ $fail -eq 0 ]
