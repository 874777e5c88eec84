#!/usr/bin/env bash
# Load soak: qnbd with -e CLIENTS serving CLIENTS connections of mixed, verified I/O
# (tests/nbdsh/verify.py, PROCS processes on disjoint regions) for DURATION seconds, with
# the server's RSS, descriptors and threads reported every SAMPLE seconds; then the same
# figures once the clients are gone (they must be back at the idle ones); then SIGTERM under
# load (tests/nbdsh/acklog.py writers): the server must exit 0 promptly, every write it
# acknowledged must read back, and a qcow2 image must pass qemu-img check.
#
#   scripts/load.sh        env: DURATION (600) CLIENTS (64) PROCS (8) FORMAT (qcow2)
#                               SIZE (512M) SAMPLE (60) QNBD (default: a release build)
# tests/load.rs runs it for 30 s in `cargo test`. Needs scripts/install-deps.sh's packages.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
DURATION=${DURATION:-600}
CLIENTS=${CLIENTS:-64}
PROCS=${PROCS:-8}
FORMAT=${FORMAT:-qcow2}
SIZE=${SIZE:-512M}
SAMPLE=${SAMPLE:-60}
PY=/usr/bin/python3
if [ -z "${QNBD:-}" ]; then
    ${CARGO_LOCK:-} cargo build --release -q --bin qnbd
    QNBD=$root/target/release/qnbd
fi
tmp=$(mktemp -d /var/tmp/qnbd-load.XXXXXX)
pids=()
server=
cleanup() {
    for p in "${pids[@]}" $server; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$tmp"
}
trap cleanup EXIT
fail() { echo "load: FAIL: $*" >&2; exit 1; }

rss() { awk '/^VmRSS/ {print int($2 / 1024)}' "/proc/$1/status"; }
fds() { ls "/proc/$1/fd" | wc -l; }
threads() { ls "/proc/$1/task" | wc -l; }
sockets() { find "/proc/$1/fd" -lname 'socket:*' 2>/dev/null | wc -l; }
figures() { echo "rss $(rss "$1") MiB, fds $(fds "$1"), threads $(threads "$1"), sockets $(sockets "$1")"; }

start_server() { # extra args...
    rm -f "$tmp/pid" "$tmp/nbd.sock"
    "$QNBD" -k "$tmp/nbd.sock" --pid-file="$tmp/pid" -t -f "$FORMAT" "$@" "$tmp/img" \
        2>>"$tmp/server.log" &
    server=$!
    for _ in $(seq 200); do [ -s "$tmp/pid" ] && return; sleep 0.1; done
    fail "the server did not start: $(cat "$tmp/server.log")"
}

qemu-img create -q -f "$FORMAT" "$tmp/img" "$SIZE"
uri="nbd+unix:///?socket=$tmp/nbd.sock"
start_server -e "$CLIENTS"
qemu-img info "$uri" >/dev/null
sleep 1
idle_fds=$(fds $server)
idle_threads=$(threads $server)
echo "load: $QNBD -e $CLIENTS, $FORMAT $SIZE, $CLIENTS clients in $PROCS verifiers for ${DURATION}s"
echo "load: idle: $(figures $server)"

# The soak: PROCS verifiers, CLIENTS/PROCS connections each, each on its own region.
bytes=$(qemu-img info --output=json "$tmp/img" -U | $PY -c 'import json,sys; print(json.load(sys.stdin)["virtual-size"])')
per=$(( bytes / PROCS / 512 * 512 ))
for i in $(seq 0 $((PROCS - 1))); do
    $PY tests/nbdsh/verify.py "$uri" --conns $((CLIENTS / PROCS)) --depth 4 --seed $((i + 1)) \
        --writes 1000000000 --seconds "$DURATION" --region $((i * per)):$(((i + 1) * per)) \
        >"$tmp/verify.$i" 2>&1 &
    pids+=($!)
done
t0=$(date +%s)
rss_list=()
while :; do
    running=0
    for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && running=$((running + 1)); done
    [ $running -gt 0 ] || break
    kill -0 $server 2>/dev/null || fail "the server died under load: $(tail -5 "$tmp/server.log")"
    sleep "$SAMPLE" &
    wait $! || true
    kill -0 $server 2>/dev/null || fail "the server died under load"
    rss_list+=("$(rss $server)")
    echo "load: t=$(( $(date +%s) - t0 ))s: $(figures $server), verifiers running $running"
done
status=0
for i in $(seq 0 $((PROCS - 1))); do
    wait "${pids[$i]}" || status=1
done
pids=()
writes=0
for i in $(seq 0 $((PROCS - 1))); do
    line=$(grep '^verify:' "$tmp/verify.$i" || true)
    echo "load: verifier $i: ${line:-no summary}"
    w=$(echo "$line" | awk '{print $2}')
    writes=$(( writes + ${w:-0} ))
done
[ $status = 0 ] || { cat "$tmp"/verify.* >&2; fail "a verifier found an error"; }
echo "load: $writes writes verified, none lost; RSS over time (MiB): ${rss_list[*]}"
# Back to idle: every connection's descriptors and threads gone.
for _ in $(seq 100); do
    [ "$(fds $server)" -le "$idle_fds" ] && [ "$(threads $server)" -le "$idle_threads" ] && break
    sleep 0.1
done
echo "load: after the clients left: $(figures $server) (idle: fds $idle_fds, threads $idle_threads)"
[ "$(fds $server)" -le "$idle_fds" ] || fail "descriptors not back to idle"
[ "$(threads $server)" -le "$idle_threads" ] || fail "threads not back to idle"

# SIGTERM under load: acknowledged writes must survive a clean exit.
for i in $(seq 0 $((PROCS - 1))); do
    $PY tests/nbdsh/acklog.py write "$uri" "$tmp/ack.$i" --conns $((CLIENTS / PROCS)) \
        --block 1K --index "$i" --stride "$PROCS" --seconds 120 >"$tmp/acklog.$i" 2>&1 &
    pids+=($!)
done
# SIGTERM once every writer is connected and writing.
for _ in $(seq 100); do
    [ "$(sockets $server)" -ge $((CLIENTS + 3)) ] && break
    sleep 0.1
done
sleep 0.5
echo "load: SIGTERM under load: $(figures $server)"
t1=$(date +%s%N)
kill -TERM $server
code=0
wait $server || code=$?
server=
ms=$(( ($(date +%s%N) - t1) / 1000000 ))
for p in "${pids[@]}"; do wait "$p" || true; done
pids=()
[ $code = 0 ] || fail "exit status $code after SIGTERM: $(tail -5 "$tmp/server.log")"
grep -q panicked "$tmp/server.log" && fail "the server panicked: $(grep -m1 panicked "$tmp/server.log")"
acked=$(cat "$tmp"/ack.* | wc -l)
echo "load: exited 0 in ${ms} ms with $((acked - PROCS)) writes acknowledged"
start_server -r -e 0
for i in $(seq 0 $((PROCS - 1))); do
    $PY tests/nbdsh/acklog.py check "$uri" "$tmp/ack.$i" | sed "s/^/load: writer $i: /" ||
        fail "acknowledged writes lost"
done
kill $server
wait $server 2>/dev/null || true
server=
if [ "$FORMAT" = qcow2 ]; then
    qemu-img check "$tmp/img" >"$tmp/check" 2>&1 || { cat "$tmp/check" >&2; fail "qemu-img check"; }
    echo "load: qemu-img check: $(grep -m1 -E 'No errors|leaked|ERROR' "$tmp/check")"
fi
echo "load: PASS"
