#!/usr/bin/env bash
# CLI-level tests (bad inputs, exit codes, end-to-end runs). Filled in as commands land.
set -euo pipefail
echo "cli tests: none yet"
