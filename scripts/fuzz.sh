#!/usr/bin/env bash
# Long fuzz runs with AFL++ on stable Rust (cargo-afl): build the harnesses in fuzz/afl and
# run each target given (default: all) for SECONDS of fuzzing, one after another, niced.
#
#   scripts/fuzz.sh [-s SECONDS] [-o OUTDIR] [TARGET...]
#
# Targets: handshake transmission parsers qcow2 client formats (fuzz/src/lib.rs). Seeds come from
# fuzz/corpus/TARGET (fuzz/make-seeds.sh records them); results go to OUTDIR/TARGET
# (default fuzz/out). A run resumes from its output directory when one exists.
# QNBD_FUZZ_PAUSE_FILE=PATH: while PATH exists the fuzzer is stopped (SIGSTOP) and the time
# does not count; it goes on (SIGCONT) when PATH is gone. Checked every 10 s.
# QNBD_FUZZ_TIMEOUT=MS: AFL's hang limit (default 1000: an input running over 1 s is a hang;
# raise it only on a machine too loaded to run anything in 1 s, and replay the hangs then).
# Needs: cargo install cargo-afl (it builds AFL++ on first use).
# Every crash and hang found is reported at the end; reproduce one with
#   cargo run -p qnbd-fuzz --example replay -- TARGET FILE
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
secs=1800
out=$root/fuzz/out
while getopts "s:o:" o; do
    case $o in
        s) secs=$OPTARG ;;
        o) out=$OPTARG ;;
        *) exit 2 ;;
    esac
done
shift $((OPTIND - 1))
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(handshake transmission parsers qcow2 client formats)
cargo=${CARGO_LOCK:-}
(cd fuzz/afl && $cargo cargo afl build --release)
export AFL_SKIP_CPUFREQ=1 AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1 AFL_NO_UI=1 \
    AFL_NO_AFFINITY=1 AFL_AUTORESUME=1
mkdir -p "$out"
for t in "${targets[@]}"; do
    bin=$root/fuzz/afl/target/release/$t
    [ -x "$bin" ] || { echo "fuzz: no harness $t" >&2; exit 2; }
    dict=()
    [ -f "$root/fuzz/dict/$t.dict" ] && dict=(-x "$root/fuzz/dict/$t.dict")
    echo "fuzz: $t for ${secs}s -> $out/$t"
    setsid nice -n 19 cargo afl fuzz -i "$root/fuzz/corpus/$t" -o "$out/$t" -t "${QNBD_FUZZ_TIMEOUT:-1000}" \
        "${dict[@]}" -- "$bin" >"$out/$t.log" 2>&1 &
    pid=$!
    active=0
    paused=0
    while kill -0 "$pid" 2>/dev/null && [ "$active" -lt "$secs" ]; do
        if [ -n "${QNBD_FUZZ_PAUSE_FILE:-}" ] && [ -e "$QNBD_FUZZ_PAUSE_FILE" ]; then
            [ $paused = 1 ] || { kill -STOP -- "-$pid" 2>/dev/null || true; paused=1; echo "fuzz: $t paused"; }
        elif [ $paused = 1 ]; then
            kill -CONT -- "-$pid" 2>/dev/null || true
            paused=0
            echo "fuzz: $t resumed"
        fi
        sleep 10
        [ $paused = 1 ] || active=$((active + 10))
    done
    [ $paused = 0 ] || kill -CONT -- "-$pid" 2>/dev/null || true
    kill -INT -- "-$pid" 2>/dev/null || true
    wait "$pid" || true
    stats=$out/$t/default/fuzzer_stats
    if [ -f "$stats" ]; then
        awk -v t="$t" -v s="$active" -F' *: *' '
            { v[$1] = $2 }
            END { printf "fuzz: %s: %ss fuzzed, %s execs (%s/s), corpus %s, edges %s, %s crashes, %s hangs\n",
                  t, s, v["execs_done"], v["execs_per_sec"], v["corpus_count"], v["bitmap_cvg"],
                  v["saved_crashes"], v["saved_hangs"] }' "$stats"
        ls "$out/$t/default/crashes" "$out/$t/default/hangs" 2>/dev/null | grep -v README || true
    else
        echo "fuzz: $t: no stats (see $out/$t.log)" >&2
    fi
done
