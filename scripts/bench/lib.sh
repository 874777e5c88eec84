# Helpers the side-by-side benchmark scripts share (formats.sh, reexport.sh, web.sh): start
# and stop a server on a Unix socket, measure with fio's nbd engine and nbdcopy, take
# medians and ratios. Source it; it uses $W (the work directory) and $SECS (seconds a fio job
# runs).

serve_on() { # serve_on SOCKET COMMAND... -> starts the server in the background, sets $PID
    local sock=$1
    shift
    rm -f "$sock"
    "$@" 2>/dev/null &
    PID=$!
    for _ in $(seq 200); do [ -S "$sock" ] && return 0; sleep 0.05; done
    echo "$1 did not start" >&2
    exit 1
}
stop() { kill -9 "$PID" && wait "$PID" 2>/dev/null || true; }

fio_iops() { # fio_iops SOCKET RW [QD] -> IOPS of 4 KiB requests
    timeout $((SECS + 60)) fio --name=b --ioengine=nbd --uri="nbd+unix:///?socket=$1" --rw="$2" --bs=4k \
        --iodepth="${3:-32}" --time_based --runtime="$SECS" --ramp_time=1 --output-format=json |
        python3 -c 'import json,sys; t=sys.stdin.read(); j=json.loads(t[t.index("{"):])["jobs"][0]; print(round(j["read"]["iops"]+j["write"]["iops"]))'
}

copy_mibs() { # copy_mibs SOCKET MIB [NBDCOPY OPTIONS] -> MiB/s of a sequential copy of the export to nowhere
    # (0 when it fails or takes more than $COPY_LIMIT seconds, 120 by default: a hung server)
    local t0 t1
    t0=$(date +%s.%N)
    local sock=$1 mib=$2
    shift 2
    if ! timeout "${COPY_LIMIT:-120}" nbdcopy "$@" "nbd+unix:///?socket=$sock" null: >/dev/null; then
        echo 0
        return
    fi
    t1=$(date +%s.%N)
    python3 -c "print(round($mib / ($t1 - $t0)))"
}

median() { tr ' ' '\n' | grep . | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

ratio() { python3 -c "print(f'{$1 / max($2, 1):.2f}')"; }
