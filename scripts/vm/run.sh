#!/usr/bin/env bash
# Boot the test guest and run GUEST_SCRIPT in it, with the project's qnbd binary and the
# script on a 9p share (cwd of the script). Exits with the script's status; 77 when the guest
# cannot run on this machine; 124 on timeout (QNBD_VM_TIMEOUT, default 300 s). QNBD_VM_SMP sets
# the guest's CPUs (default 2; ublk gives a device at most one queue per CPU), QNBD_VM_MEM its
# memory in MiB (default 1024), QNBD_VM_CPU its CPU model (qemu's default; "max" emulates
# AES-NI, for benchmarks where the ciphers' speed matters).
#   scripts/vm/run.sh GUEST_SCRIPT [SHARE_DIR]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
top=$(cd "$here/../.." && pwd)
script=${1:?usage: run.sh GUEST_SCRIPT [SHARE_DIR]}
share=${2:-}
timeout_s=${QNBD_VM_TIMEOUT:-300}
smp=${QNBD_VM_SMP:-2}
mem=${QNBD_VM_MEM:-1024}

cache=$(bash "$here/build.sh") || {
    rc=$?
    echo "vm/run: SKIP: the test guest cannot be built here (build.sh exit $rc)" >&2
    exit "$rc"
}
kver=$(cat "$cache/kernel.ok")
qemu=$cache/root/usr/bin/qemu-system-x86_64
if [ -z "$share" ]; then
    share=$(mktemp -d /var/tmp/qnbd-vm-share.XXXXXX)
    trap 'rm -rf "$share"' EXIT
fi
bin=${QNBD_BIN:-}
if [ -z "$bin" ]; then
    for b in "$top/target/release/qnbd" "$top/target/debug/qnbd"; do
        [ -x "$b" ] && { bin=$b; break; }
    done
fi
[ -n "$bin" ] && cp "$bin" "$share/qnbd"
cp "$script" "$share/guest-test.sh"
rm -f "$share/guest-rc"
log=$share/console.log
echo "vm/run: booting $kver with $(basename "$script") (share $share)" >&2
# TCG's emulator has been seen to crash while booting (a segfault before the kernel ran
# anything of ours), and the guest kernel to panic while booting (an int3 Oops in
# sched_clock_cpu in the idle task, 6 s in: TCG and the kernel patching its own text); a boot
# that failed before the guest script started is tried again, once.
for attempt in 1 2; do
    set +e
    timeout "$timeout_s" "$qemu" -L "$cache/root/usr/share/seabios" -L "$cache/root/usr/share/qemu" \
        -accel tcg ${QNBD_VM_CPU:+-cpu "$QNBD_VM_CPU"} -smp "$smp" -m "$mem" -nographic -no-reboot -nic none \
        -kernel "$cache/root/boot/vmlinuz-$kver" -initrd "$cache/initrd.cpio.gz" \
        -append 'console=ttyS0 quiet panic=-1' \
        -virtfs "local,path=$share,mount_tag=share,security_model=none" </dev/null 2>&1 | tee "$log"
    qrc=${PIPESTATUS[0]}
    set -e
    if [ "$qrc" -gt 128 ] && [ "$qrc" != 124 ] && [ "$attempt" = 1 ] && ! grep -q '=== guest:' "$log"; then
        echo "vm/run: qemu died at boot (exit $qrc); booting again" >&2
        continue
    fi
    if [ "$attempt" = 1 ] && [ ! -f "$share/guest-rc" ] && ! grep -q '=== guest:' "$log" &&
        grep -q 'Kernel panic' "$log"; then
        echo "vm/run: the guest kernel panicked while booting; booting again" >&2
        continue
    fi
    break
done
if [ "$qrc" = 124 ]; then
    echo "vm/run: the guest did not finish within ${timeout_s}s" >&2
    exit 124
fi
if [ ! -f "$share/guest-rc" ]; then
    echo "vm/run: the guest wrote no exit status (qemu exit $qrc); see the console above" >&2
    exit 1
fi
exit "$(cat "$share/guest-rc")"
