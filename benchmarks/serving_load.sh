#!/usr/bin/env bash
# The serving load test of docs/serving.md, long: tests/integration/test_serving_load.py — the same
# scenario, run here for DUR seconds (default 60) with MODEL: `tiny` (the default: the suite's tiny
# random model) or `bundled` (all-MiniLM-L6-v2). On 2 cores the bundled model makes the test's three
# swaps in 60 s only just, or not: wrk's 32 connections take both cores and the learner gets through a
# publish (261 MB to S3) every ≈ 20 s — one run made 3, one 2 —, so tiny is the default (results/ has a
# run of each model). All real, on this machine: the Tansu broker and the SeaweedFS
# S3 server (started by the tests' fixtures), a learner (`stream-learner run`) learning from events
# produced throughout and publishing to S3 every 2.5 s, `stream-learner serve` polling LATEST every
# 0.25 s, and wrk (Debian's; scripts/setup.sh installs it) with 32 connections. The test's checks all
# apply (no failed request, >= 3 swaps, every answer's version named by LATEST and equal to plain
# transformers loading it); its report — requests, req/s, latency percentiles, swaps, each version's
# delay from LATEST to served beside poll interval + load time — and wrk's own are kept in
# results/serving-load-<UTC>.txt (OUT to put it elsewhere). Exit status: the test's.
set -euo pipefail
cd "$(dirname "$0")/.."
DUR=${DUR:-60}
MODEL=${MODEL:-tiny}
stamp=$(date -u +%Y%m%dT%H%MZ)
out=${OUT:-benchmarks/results/serving-load-$stamp.txt}
mkdir -p "$(dirname "$out")"
{
  echo "# benchmarks/serving_load.sh, $(date -u +%Y-%m-%dT%H:%MZ): DUR=$DUR MODEL=$MODEL"
  echo "# machine: $(nproc) CPUs, $(grep -m 1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(free -g | awk '/^Mem:/ {print $2}') GiB;" \
    "$(.venv/bin/python -c 'import platform, torch, transformers; print("Python", platform.python_version(), "· torch", torch.__version__, "· transformers", transformers.__version__)');" \
    "$(wrk --version 2>&1 | head -n 1 | cut -d' ' -f1-2)"
  echo "# load average at the start: $(cut -d' ' -f1-3 /proc/loadavg) (client, server, learner, broker and S3 server share the machine)"
} | tee "$out"
set +e
SL_TESTS_SERVING_LOAD_SECONDS=$DUR SL_TESTS_SERVING_LOAD_MODEL=$MODEL \
  .venv/bin/python -m pytest -q -n 0 -s -p no:cacheprovider --durations=1 \
  tests/integration/test_serving_load.py 2>&1 |
  grep -vE '^%[0-9]+\|[0-9.]+\|FAIL\|rdkafka|Loading weights|Writing model shards' | tee -a "$out"
status=${PIPESTATUS[0]}
set -e
echo "serving_load: output in $out (exit $status)"
exit "$status"
