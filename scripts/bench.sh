#!/usr/bin/env bash
# Kept for old habits: the benchmark suite is scripts/bench/run.py (see scripts/bench/README.md).
#   scripts/bench.sh [RUNTIME_SECONDS]     (same as RUNTIME=N python3 scripts/bench/run.py)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -gt 0 ]; then
    export RUNTIME=$1
fi
exec python3 scripts/bench/run.py
