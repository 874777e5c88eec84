#!/bin/sh
# Kernel TLS in the guest (the host kernel has no tls module): an x509 export over TCP
# whose sessions the kernel seals and opens where it can, checked by the bytes qemu-io and
# qemu-img read back and by the kernel's own counters (/proc/net/tls_stat). The share holds
# pki/server and pki/client (tests/ktls_vm.rs makes them).
#   TLS 1.2 (AES-GCM and ChaCha20-Poly1305): the kernel takes the session.
#   TLS 1.3: the kernel takes it only where it can renew keys (6.14); before, our record layer.
#   Only with QNBD_KTLS=on: without it, never.
set -u
pass=0
fail=0
ok() { pass=$((pass + 1)); echo "PASS: $*"; }
bad() { fail=$((fail + 1)); echo "FAIL: $*"; }
check() { # check DESC CMD...
    desc=$1
    shift
    if "$@" >/tmp/out 2>&1; then ok "$desc"; else bad "$desc"; sed 's/^/    /' /tmp/out; fi
}
wait_for() { i=0; while [ ! -e "$1" ] && [ $i -lt 200 ]; do sleep 0.1; i=$((i + 1)); done; [ -e "$1" ]; }

ifconfig lo 127.0.0.1 up
S=$(pwd)/pki/server
C=$(pwd)/pki/client
img=/var/tmp/k.img
kmaj=$(uname -r | cut -d. -f1)
kmin=$(uname -r | cut -d. -f2)
renews=no
if [ "$kmaj" -gt 6 ] || { [ "$kmaj" -eq 6 ] && [ "$kmin" -ge 14 ]; }; then renews=yes; fi

# stat NAME: a counter of /proc/net/tls_stat (0 before the module is loaded).
stat() { awk -v n="$1" '$1 == n { print $2; f = 1 } END { if (!f) print 0 }' /proc/net/tls_stat 2>/dev/null || echo 0; }

serve() { # serve [ENV...]: qnbd on 127.0.0.1:10809 exporting $img over x509 TLS
    rm -f /tmp/q.pid
    env QNBD_LOG=frontends::tls=debug QNBD_KTLS=on "$@" ./qnbd -f raw -b 127.0.0.1 -p 10809 -t --pid-file=/tmp/q.pid \
        --object "tls-creds-x509,id=tls0,endpoint=server,dir=$S" --tls-creds=tls0 "$img" \
        2>/tmp/qnbd.err &
    wait_for /tmp/q.pid
}
stop() { kill "$(cat /tmp/q.pid)" 2>/dev/null; wait 2>/dev/null; }

opts() { # qemu's --image-opts for the export
    echo "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port=10809,tls-creds=tls0"
}
client() { # client PRIORITY qemu-io-commands...
    prio=$1
    shift
    qemu-io --object "tls-creds-x509,id=tls0,endpoint=client,dir=$C,priority=$prio" \
        --image-opts "$@" "$(opts)"
}

# round PRIORITY EXPECT: writes and reads through one session, large and small, then a
# second session reads everything back; EXPECT says whether the kernel's TLS_SW counters
# must grow (kernel) or stay (user).
round() {
    prio=$1 expect=$2
    tx0=$(stat TlsTxSw)
    rx0=$(stat TlsRxSw)
    client "$prio" -c "write -P 0x11 0 4M" -c "write -P 0x22 4M 4k" -c "write -z 8M 1M" \
        -c "aio_write -P 0x33 12M 64k" -c "aio_write -P 0x44 13M 64k" -c "aio_flush" \
        -c "read -P 0x11 0 4M" -c "read -P 0x22 4M 4k" -c "read -P 0 8M 1M" || return 1
    client "$prio" -c "read -P 0x33 12M 64k" -c "read -P 0x44 13M 64k" \
        -c "read -P 0x11 1M 1M" || return 1
    tx1=$(stat TlsTxSw)
    rx1=$(stat TlsRxSw)
    echo "tls_stat: TlsTxSw $tx0 -> $tx1, TlsRxSw $rx0 -> $rx1"
    grep -i 'tls' /tmp/qnbd.err | tail -3
    case $expect in
    kernel) [ "$tx1" -gt "$tx0" ] && [ "$rx1" -gt "$rx0" ] ;;
    user) [ "$tx1" = "$tx0" ] && [ "$rx1" = "$rx0" ] ;;
    esac
}

dd if=/dev/zero of=$img bs=1M count=16 2>/dev/null
modprobe tls 2>/dev/null
if [ ! -e /proc/net/tls_stat ]; then
    # Loading happens on the first TCP_ULP; make it happen.
    serve && client "NORMAL:-VERS-TLS1.3" -c "read 0 4k" >/dev/null 2>&1
    stop
fi
check "the kernel has TLS (/proc/net/tls_stat)" test -e /proc/net/tls_stat

serve
check "TLS 1.2 AES-GCM: the kernel seals and opens the records" \
    round "NORMAL:-VERS-TLS1.3:-CIPHER-ALL:+AES-128-GCM" kernel
check "TLS 1.2 AES-256-GCM: the kernel's" round "NORMAL:-VERS-TLS1.3:-CIPHER-ALL:+AES-256-GCM" kernel
check "TLS 1.2 ChaCha20-Poly1305: the kernel's" \
    round "NORMAL:-VERS-TLS1.3:-CIPHER-ALL:+CHACHA20-POLY1305" kernel
if [ $renews = yes ]; then
    check "TLS 1.3 on $(uname -r): the kernel's" round "NORMAL" kernel
else
    check "TLS 1.3 on $(uname -r), which cannot renew keys: our record layer" round "NORMAL" user
fi
copy_and_compare() { # copy_and_compare PRIORITY: a whole image in and out
    dd if=/dev/urandom of=/tmp/src.raw bs=1M count=6 2>/dev/null || return 1
    obj="tls-creds-x509,id=tls0,endpoint=client,dir=$C,priority=$1"
    qemu-img convert -n -f raw --object "$obj" --target-image-opts /tmp/src.raw \
        "driver=raw,file.driver=nbd,file.server.type=inet,file.server.host=127.0.0.1,file.server.port=10809,file.tls-creds=tls0" || return 1
    qemu-img convert -O raw --object "$obj" --image-opts \
        "driver=raw,file.driver=nbd,file.server.type=inet,file.server.host=127.0.0.1,file.server.port=10809,file.tls-creds=tls0" \
        /tmp/back.raw || return 1
    cmp -n 6291456 /tmp/src.raw /tmp/back.raw && cmp -n 6291456 /tmp/src.raw $img
}
check "a whole image copied in and out over TLS 1.2 is the same" copy_and_compare "NORMAL:-VERS-TLS1.3"
stop
check "the server said nothing alarming" sh -c '! grep -iE "panic|ERROR|WARN" /tmp/qnbd.err'

serve QNBD_KTLS=
check "without QNBD_KTLS=on: our record layer, TLS 1.2" round "NORMAL:-VERS-TLS1.3" user
stop

if [ $renews = yes ]; then
    # Our send key renewed every 8 records, the client's many times over a long session.
    serve QNBD_TEST_TLS_KEY_RECORDS=8
    r0=$(stat TlsTxRekeyOk)
    x0=$(stat TlsRxRekeyOk)
    check "TLS 1.3 with our send key renewed every few records" round "NORMAL" kernel
    r1=$(stat TlsTxRekeyOk)
    x1=$(stat TlsRxRekeyOk)
    check "the kernel renewed send keys ($r0 -> $r1)" test "$r1" -gt "$r0"
    # We ask the client to renew its key with ours, so receive keys were renewed too.
    check "the kernel renewed receive keys ($x0 -> $x1)" test "$x1" -gt "$x0"
    stop
fi

echo "$pass passed, $fail failed"
[ "$fail" = 0 ]
