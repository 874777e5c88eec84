#!/usr/bin/env bash
# Long data-safety runs (not part of the test suite): the concurrent verifier, the kill -9
# crash loop and the power-cut states of tests/data_safety.rs and backends/tests/crash_states.rs,
# scaled up. The defaults are the issue's soak targets: >= 10 million verified writes,
# >= 500 crash rounds, >= 10,000 power-cut states; each must end with nothing lost.
#
#   scripts/soak.sh                   (env: WRITES per verifier variant, default 1000000;
#                                      ROUNDS per crash variant, default 100;
#                                      STATES per power-cut variant, default 2500;
#                                      PARTS="verify crash states" to pick)
set -euo pipefail
cd "$(dirname "$0")/.."
WRITES=${WRITES:-1000000}
ROUNDS=${ROUNDS:-100}
STATES=${STATES:-2500}
PARTS=${PARTS:-"verify crash states"}
export QNBD_REQUIRE_TOOLS=1
cargo build --release -q
log=$(mktemp /var/tmp/qnbd-soak.XXXXXX.log)
echo "soak: log in $log" >&2
for part in $PARTS; do
    case $part in
    verify)
        # 10 variants x WRITES
        QNBD_VERIFY_WRITES=$WRITES cargo test --release -q --test data_safety verifier_ \
            -- --test-threads=1 --nocapture 2>&1 | tee -a "$log" | grep -E "verify:|FAILED|panicked" ;;
    crash)
        # 5 variants x ROUNDS
        QNBD_CRASH_ROUNDS=$ROUNDS cargo test --release -q --test data_safety crash_loop_ \
            -- --test-threads=1 --nocapture 2>&1 | tee -a "$log" | grep -E "crash:|FAILED|panicked" ;;
    states)
        # 4 variants x STATES, each from a fresh workload seed
        QNBD_CRASH_STATES=$STATES cargo test --release -q -p backends --test crash_states \
            -- --test-threads=1 --nocapture 2>&1 | tee -a "$log" | grep -E "crash states:|FAILED|panicked" ;;
    *) echo "soak: unknown part $part" >&2; exit 2 ;;
    esac
done
if grep -qE "FAILED|panicked" "$log"; then
    echo "soak: FAILED (see $log)" >&2
    exit 1
fi
echo "soak: all passed (log $log)"
