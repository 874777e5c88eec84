#!/bin/sh
# The rig works: devices exist, and qemu-nbd -c (the reference) can make and check a filesystem.
set -e
ls -l /dev/nbd0 /dev/ublk-control
qemu-img create -q -f raw /tmp/s.img 64M
qemu-nbd -f raw -c /dev/nbd0 /tmp/s.img
sleep 0.5
mkfs.ext4 -q -F /dev/nbd0
mkdir -p /mnt/s
mount /dev/nbd0 /mnt/s
echo hello >/mnt/s/hello
umount /mnt/s
qemu-nbd -d /dev/nbd0
sleep 0.5
e2fsck -fn /tmp/s.img
echo "1 passed, 0 failed"
