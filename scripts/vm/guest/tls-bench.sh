#!/bin/sh
# Guest-side TLS benchmark (not a test): fio's nbd engine (libnbd, GnuTLS) over x509 TLS on
# TCP loopback against qnbd with kernel TLS (QNBD_KTLS=on), qnbd on its own record layer and
# nbdkit's file plugin (GnuTLS in userspace), rounds interleaved. The server's CPU time per
# MiB or per request counts the kernel's sealing and opening too: it runs in the server's
# system calls. The share holds pki/server, pki/client and bench-runtime, bench-rounds.
# Prints "RESULT SERVER JOB VALUE CPU" per run: VALUE in MiB/s (1 MiB jobs) or IOPS (4 KiB),
# CPU in server µs per MiB or per request.
QNBD=${QNBD:-./qnbd}
RT=$(cat /share/bench-runtime 2>/dev/null || echo 5)
ROUNDS=$(cat /share/bench-rounds 2>/dev/null || echo 3)
S=$(pwd)/pki/server
C=$(pwd)/pki/client
img=/var/tmp/tls-bench.img
ifconfig lo 127.0.0.1 up
# libnbd refuses certificate paths in URIs; it looks here by default.
mkdir -p /etc/pki/libnbd && cp "$C"/*.pem /etc/pki/libnbd/
dd if=/dev/urandom of=$img bs=1M count=256 2>/dev/null
echo "tls-bench: kernel $(uname -r), $(grep -c ^processor /proc/cpuinfo) CPUs, aes: $(grep -qw aes /proc/cpuinfo && echo yes || echo no)"

wait_for() { i=0; while [ ! -e "$1" ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i + 1)); done; [ -e "$1" ]; }
serve() { # serve NAME: start the server NAME on 127.0.0.1:10809; its pid in /tmp/srv.pid
    rm -f /tmp/srv.pid
    case $1 in
    qnbd-ktls | qnbd-user)
        k=on
        [ "$1" = qnbd-user ] && k=off
        QNBD_KTLS=$k $QNBD -f raw -b 127.0.0.1 -p 10809 -t -e 8 --pid-file=/tmp/srv.pid \
            --object "tls-creds-x509,id=tls0,endpoint=server,dir=$S" --tls-creds=tls0 $img &
        ;;
    nbdkit)
        nbdkit -f -P /tmp/srv.pid -i 127.0.0.1 -p 10809 --tls=require --tls-certificates="$S" \
            file $img &
        ;;
    esac
    wait_for /tmp/srv.pid && sleep 0.3
}
stop() { kill "$(cat /tmp/srv.pid)" 2>/dev/null; wait 2>/dev/null; }
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }

job() { # job NAME RW BS QD: prints "VALUE CPU"
    pid=$(cat /tmp/srv.pid)
    t0=$(cpu_ticks "$pid")
    out=$(fio --name=b --ioengine=nbd --uri="nbds://127.0.0.1:10809/" \
        --rw="$2" --bs="$3" --iodepth="$4" --time_based --runtime="$RT" --size=256M \
        --output-format=terse 2>/tmp/fio.err)
    [ -n "$out" ] || sed 's/^/tls-bench: fio: /' /tmp/fio.err | head -5 >&2
    t1=$(cpu_ticks "$pid")
    tck=$(getconf CLK_TCK 2>/dev/null || echo 100)
    echo "$out" | grep '^3;' | awk -F';' -v rw="$2" -v bs="$3" -v ticks=$((t1 - t0)) -v hz="$tck" -v rt="$RT" '{
        if (rw ~ /write/) { kib = $47; ios = $49 } else { kib = $6; ios = $8 }
        cpu_us = ticks * 1e6 / hz
        if (bs == "1M") { mib = kib / 1024; printf "%.1f %.0f\n", mib / rt, (mib > 0 ? cpu_us / mib : 0) }
        else { n = ios * rt; printf "%.0f %.1f\n", ios, (n > 0 ? cpu_us / n : 0) } }'
}

r=0
while [ $r -lt "$ROUNDS" ]; do
    for s in qnbd-ktls qnbd-user nbdkit; do
        serve $s || { echo "tls-bench: $s did not start"; continue; }
        for j in "seqread read 1M 8" "seqwrite write 1M 8" "randread randread 4k 32" "randwrite randwrite 4k 32" "randread-qd1 randread 4k 1"; do
            # shellcheck disable=SC2086
            set -- $j
            v=$(job "$@")
            echo "RESULT $s $1 $v"
        done
        stop
    done
    r=$((r + 1))
done
echo "0 passed, 0 failed"
