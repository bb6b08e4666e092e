#!/usr/bin/env bash
# The full throughput bench on this machine (≈ 14 min on 2 cores): the results JSON goes to
# benchmarks/results/, and its tables replace those between the bench markers of docs/performance.md.
# Extra arguments go to `stream-learner bench` (e.g. --threads 1 while another job holds a core).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p benchmarks/results
out="benchmarks/results/bench-$(date -u +%Y%m%dT%H%MZ).json"
.venv/bin/stream-learner bench --out "$out" --markdown docs/performance.md "$@"
echo "now review docs/performance.md: the prose around the tables quotes some of the figures"
