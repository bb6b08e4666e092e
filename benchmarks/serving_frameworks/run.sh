#!/usr/bin/env bash
# The serving-framework comparison of docs/serving.md ("Why Starlette"): each candidate in a scratch
# venv (installed size, packages), then wrk against servers.py's trivial V2 endpoint, 1 and 16
# connections, DUR seconds each (default 15), on this machine (client and server share its cores).
# Needs wrk (Debian: apt-get install wrk) and network access to PyPI. Takes ≈ 5 min.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
uv=${UV:-"$here/../../.venv/bin/uv"}
python=${PYTHON:-"$here/../../.venv/bin/python"}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
declare -A PACKAGES=(
  [stdlib]=""
  [starlette]="starlette uvicorn"
  [fastapi]="fastapi uvicorn"
  [fastapi-std]="fastapi uvicorn[standard]"
  [litserve]="litserve"
  [kserve]="kserve"
)
port=18400
for mode in stdlib starlette fastapi fastapi-std litserve kserve; do
  venv="$work/$mode"
  "$uv" venv -q -p "$python" "$venv"
  # shellcheck disable=SC2086
  [ -n "${PACKAGES[$mode]}" ] && "$uv" pip install -q --python "$venv/bin/python" ${PACKAGES[$mode]}
  size=$(du -sm "$venv/lib/"python3*/site-packages | cut -f1)
  count=$("$uv" pip list --python "$venv/bin/python" --format freeze 2>/dev/null | wc -l)
  echo "== $mode: $count packages, $size MB installed ($(
    "$uv" pip list --python "$venv/bin/python" --format freeze 2>/dev/null | grep -iE "^(fastapi|starlette|uvicorn|litserve|kserve)==" | paste -sd' ' -))"
  port=$((port + 10))
  setsid "$venv/bin/python" "$here/servers.py" "$mode" "$port" >"$work/$mode.log" 2>&1 &
  pid=$!
  body='{"inputs":[{"name":"text","datatype":"BYTES","shape":[1],"data":["x"]}]}'
  for _ in $(seq 1 120); do
    curl -s -o /dev/null -H "Content-Type: application/json" -d "$body" "http://127.0.0.1:$port/v2/models/m/infer" && break
    sleep 0.5
  done
  for c in 1 16; do
    echo "-- $c connection(s)"
    wrk -t1 -c"$c" -d"${DUR:-15}"s --latency -s "$here/post.lua" "http://127.0.0.1:$port/v2/models/m/infer" |
      grep -E " 50%| 99%|Requests/sec|Non-2xx|Socket errors"
  done
  echo "-- RSS: server $(ps -o rss= -p "$pid") KB, its workers $(ps -o rss= --ppid "$pid" | awk '{s += $1} END {print s + 0}') KB"
  kill -- -"$pid" 2>/dev/null || true
  sleep 1
  kill -9 -- -"$pid" 2>/dev/null || true
done
