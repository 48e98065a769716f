#!/usr/bin/env bash
# BENCH.md W1 (kept for the commands recorded in docs/performance.md): see bench/run_bench.sh.
exec bash "$(dirname "$0")/run_bench.sh" w1 "$@"
