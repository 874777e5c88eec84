#!/bin/sh
# The static binary (scripts/build-static.sh) in the guest, alone: it runs in a chroot that
# holds nothing but itself (no libc, no loader, no OpenSSL), serves a qcow2 image to qemu-io
# outside over a Unix socket, does PSK TLS, and binds /dev/nbd0 for a filesystem.
set -u
W=/tmp/static-root
pass=0
fail=0
ok() { pass=$((pass + 1)); echo "PASS: $*"; }
bad() { fail=$((fail + 1)); echo "FAIL: $*"; }
check() { # check DESC CMD...
    desc=$1
    shift
    if "$@" >/tmp/out 2>&1; then ok "$desc"; else bad "$desc"; sed 's/^/    /' /tmp/out; fi
}
wait_for() { i=0; while [ ! -e "$1" ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done; [ -e "$1" ]; }

mkdir -p $W
cp ./qnbd $W/qnbd
check "the chroot holds the binary and nothing else" test "$(ls -A $W)" = qnbd
check "-V runs with no library beside it" chroot $W /qnbd -V

serve_qcow2() {
    qemu-img create -q -f qcow2 $W/d.qcow2 64M || return 1
    chroot $W /qnbd -f qcow2 -k /s.sock --pid-file=/pid /d.qcow2 &
    wait_for $W/pid || return 1
    qemu-io -f raw -c "write -P 0x5a 1M 3M" -c "read -P 0x5a 1M 3M" -c "read -P 0 0 1M" \
        "nbd+unix:///?socket=$W/s.sock" || return 1
    wait
    qemu-img check -q $W/d.qcow2 || return 1
    qemu-io -f qcow2 -c "read -P 0x5a 1M 3M" $W/d.qcow2
}
check "serves a qcow2 image from the chroot" serve_qcow2

tls_psk() {
    printf 'alice:%s\n' 0123456789abcdef0123456789abcdef >$W/keys.psk
    mkdir -p /tmp/psk && cp $W/keys.psk /tmp/psk/keys.psk
    chroot $W /qnbd -f qcow2 -k /t.sock --pid-file=/tpid \
        --object tls-creds-psk,id=tls0,endpoint=server,dir=/ --tls-creds=tls0 /d.qcow2 &
    wait_for $W/tpid || return 1
    qemu-io --image-opts \
        --object tls-creds-psk,id=tls0,endpoint=client,dir=/tmp/psk,username=alice \
        -c "read -P 0x5a 1M 3M" \
        "driver=nbd,path=$W/t.sock,tls-creds=tls0" || return 1
    wait
}
check "PSK TLS with the OpenSSL built in" tls_psk

bind_kernel() {
    # A rescue system has its kernel filesystems: the binder watches /sys for the device.
    mkdir -p $W/dev $W/sys $W/proc
    mount --bind /dev $W/dev || return 1
    mount -t sysfs sys $W/sys || return 1
    mount -t proc proc $W/proc || return 1
    qemu-img create -q -f raw $W/k.raw 64M || return 1
    chroot $W /qnbd -f raw -c /dev/nbd0 /k.raw || return 1
    sleep 0.5
    mkfs.ext4 -q -F /dev/nbd0 || return 1
    mkdir -p /mnt/st && mount /dev/nbd0 /mnt/st || return 1
    echo static >/mnt/st/hello
    umount /mnt/st
    chroot $W /qnbd -d /dev/nbd0 || return 1
    i=0; while [ -e /sys/block/nbd0/pid ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
    umount $W/dev $W/sys $W/proc
    e2fsck -fn $W/k.raw
}
check "binds /dev/nbd0 from the chroot (mkfs, mount, e2fsck)" bind_kernel

echo "$pass passed, $fail failed"
[ "$fail" = 0 ]
