#!/usr/bin/env bash
# Draws bench-results/throughput_vs_inflight.png with matplotlib from a virtualenv
# under .stack/ (created on first use from PyPI).
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
venv=${ENRICH_STACK_DIR:-$root/.stack}/venv-bench
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import matplotlib' 2>/dev/null; then
  echo "[bench] installing matplotlib into $venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q matplotlib
fi
"$venv/bin/python" "$root/deploy/bench/plot.py" "${1:-bench-results}"
