#!/usr/bin/env bash
# The GPU check: for the day a CUDA machine is at hand (none of the project's machines has one). Run
# from a clone with the project set up (`make setup`, with the CUDA build of torch: README "GPU"):
#
#   ./benchmarks/gpu_check.sh                      # JSON in benchmarks/results/gpu-check-<UTC>.json
#   ./benchmarks/gpu_check.sh --out /tmp/gpu.json
#   ./benchmarks/gpu_check.sh --dry-run            # part 1 only, every CUDA part recorded as skipped
#   PYTHON=/opt/venv/bin/python ./benchmarks/gpu_check.sh   # another interpreter (default .venv/bin/python)
#
# Everything goes into ONE JSON file (--out); progress goes to stderr. Each part runs under `timeout`
# (T_* below; with the kill grace they add up to under 10 minutes), records its status, exit code,
# time and the tail of its output, and a failed part does not stop the next one. Exit status: 0 when
# no part failed or timed out, 1 otherwise, 2 for a bad argument. Without CUDA
# (torch.cuda.is_available() false) the script is a dry run by itself: part 1 runs, every other part
# is recorded as {"skipped": "<why>"}, the JSON is written and it exits 0.
#
# The parts, what each checks on a GPU, and what a pass looks like:
#
# 1. environment — `nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap`, torch's
#    version and CUDA version, whether CUDA is available, each device's name, capability and memory,
#    torch.cuda.is_bf16_supported(including_emulation=False) (native bf16, which training.precision
#    auto relies on), the TF32 settings, NCCL, the C/C++ compiler and Python.h (training.compile), the
#    CPU model and flags (lscpu). Pass: it ran; the figures are for reading (bf16 true on Ampere and
#    newer, capability >= 8.0).
# 2. compile — torch.compile of a small matmul + GELU on cuda:0 with TORCHINDUCTOR_CACHE_DIR and
#    TRITON_CACHE_DIR in fresh directories, as the image sets them (Dockerfile: gcc, g++, python3-dev
#    for training.compile). Pass: exit 0, the compiled result equals eager (fp32, rtol 1e-4), and both
#    cache directories received files (inductor and Triton really compiled, and where they were told).
# 3. cuda_tests — `python -m pytest -q -m cuda -p no:xdist`: every test marked `cuda` (pyproject.toml;
#    skipped without a GPU, so this is where they run). Pass: exit 0; exit 5 (no test carries the
#    marker yet) is recorded as "none collected", not as a failure.
# 4. profile — `python -m stream_learner.tools.gpu_profile --steps 200 --json` if that module exists
#    (one JSON object on stdout: a 200-step profile of the trainer on the GPU), embedded as "output";
#    otherwise {"skipped": "stream_learner.tools.gpu_profile not present"}. Pass: exit 0 and JSON.
# 5. bench — `stream-learner bench --quick --no-ablation --scaling-ranks 0` on one GPU (the first of
#    CUDA_VISIBLE_DEVICES): roofline, trainer alone, pipeline from the local broker, on CUDA. Its
#    results JSON is kept next to --out (<out>-bench.json); the path and a summary (device,
#    precision, events/s, examples/s, ratios) are embedded. Pass: exit 0, device "cuda".
# 6. distributed — with >= 2 GPUs: two ranks under torchrun (`torch.distributed.run --standalone
#    --nproc-per-node=2 --no-python stream-learner run`, the command docs/distributed.md documents)
#    against the project's local Kafka-protocol broker. Rather than re-create that set-up here, this
#    runs the project's own test that does exactly it and checks the result,
#    tests/integration/test_distributed_pipeline.py::test_two_ranks_learn_one_model_from_disjoint_partitions
#    (its events are few; on a GPU machine `training.device: auto` puts rank r on cuda:r and
#    `distributed.backend: auto` picks NCCL), with training.precision=auto (bf16 autocast on CUDA)
#    instead of the suite's pinned fp32. Pass: exit 0 — both ranks trained one model from disjoint
#    partitions, the weights stayed identical on both ranks, and the published lineage is exact.
#    With fewer than 2 GPUs: skipped, saying how many there are.
set -euo pipefail

usage() {
    sed -n '2,8p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
}

dry_run=0
out=""
while (($#)); do
    case "$1" in
        --dry-run) dry_run=1 ;;
        --out)
            [[ $# -ge 2 ]] || { echo "--out needs a path" >&2; exit 2; }
            out="$2"
            shift
            ;;
        --out=*) out="${1#--out=}" ;;
        -h | --help) usage; exit 0 ;;
        *) echo "unknown argument: $1" >&2; usage; exit 2 ;;
    esac
    shift
done

# --out is relative to where the script was called from; everything else to the repository's root
[[ -n "$out" ]] && out="$(realpath -m -- "$out")"
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
[[ -n "$out" ]] || out="$PWD/benchmarks/results/gpu-check-$(date -u +%Y%m%dT%H%M%SZ).json"
mkdir -p "$(dirname "$out")"

# Time limits in seconds. Their sum plus one KILL_AFTER per part stays under 600 (10 minutes):
# tests/project/test_gpu_check.py checks it.
T_ENV=40
T_COMPILE=70
T_TESTS=100
T_PROFILE=80
T_BENCH=120
T_DIST=150
KILL_AFTER=5

work="$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")"
trap 'rm -rf "$work"' EXIT
started="$(date -u +%s)"

log() { echo "gpu_check: $*" >&2; }

# ------------------------------------------------------------------------------------ JSON helper
# Each part writes one fragment, $work/<part>.json; `merge` joins them into --out. The JSON is made
# by Python only.
cat >"$work/parts.py" <<'PY'
"""Fragments of the GPU check's JSON: one per part, merged at the end."""

import json
import re
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

WORK = Path(__file__).parent
ORDER = ["environment", "compile", "cuda_tests", "profile", "bench", "distributed"]


def tail(path: Path, lines: int = 40) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    return "\n".join(text.splitlines()[-lines:])


def parse_json(text: str):
    """The whole text as JSON, or else its last line that parses (tools may log before it)."""
    try:
        return json.loads(text)
    except ValueError:
        for line in reversed(text.strip().splitlines()):
            try:
                return json.loads(line)
            except ValueError:
                continue
    return None


def write(name: str, fragment: dict) -> None:
    (WORK / f"{name}.json").write_text(json.dumps(fragment))


def skip(name: str, reason: str) -> None:
    write(name, {"skipped": reason})


def result(name: str, rc: str, start: str, limit: str, *flags: str) -> None:
    code = int(rc)
    out_file, err_file = WORK / f"{name}.out", WORK / f"{name}.err"
    status = "passed" if code == 0 else "failed"
    if code in (124, 137):  # timeout's exit code, or SIGKILL after the grace
        status = "timed out"
    fragment = {
        "status": status,
        "exit_code": code,
        "seconds": round(time.time() - float(start), 1),
        "time_limit_s": int(limit),
    }
    stdout = out_file.read_text(errors="replace") if out_file.exists() else ""
    if "--pytest" in flags:
        if code == 5:
            fragment["status"] = "none collected"
        summary = re.findall(r"^=*\s*(\d+ (?:passed|failed|skipped|deselected|error).*?)\s*=*$", stdout, re.M)
        fragment["summary"] = summary[-1] if summary else None
    if "--json-stdout" in flags:
        fragment["output"] = parse_json(stdout)
        if fragment["output"] is None and status == "passed":
            fragment["status"] = "failed"
            fragment["why"] = "no JSON on stdout"
    if "--bench" in flags:
        bench_file = Path(flags[flags.index("--bench") + 1])
        fragment["results_file"] = str(bench_file)
        if bench_file.exists():
            bench = json.loads(bench_file.read_text())
            fragment["summary"] = {
                key: bench.get(key)
                for key in ("device", "precision", "events_per_second", "examples_per_second", "ratios")
            } | {"cuda": bench.get("machine", {}).get("cuda")}
        elif status == "passed":
            fragment["status"] = "failed"
            fragment["why"] = "the bench wrote no results file"
        device = fragment.get("summary", {}).get("device")
        if fragment["status"] == "passed" and device != "cuda":
            fragment["status"] = "failed"
            fragment["why"] = f"the bench trained on {device}, not cuda"
    if fragment.get("output") is None:  # parsed output is enough; else the end of what it printed
        fragment["stdout_tail"] = tail(out_file)
    fragment["stderr_tail"] = tail(err_file)
    write(name, fragment)
    print(fragment["status"])


def get(name: str, dotted: str) -> None:
    """Print one value of a fragment ('' when absent): for the shell's decisions."""
    value = json.loads((WORK / f"{name}.json").read_text())
    for key in dotted.split("."):
        value = value.get(key) if isinstance(value, dict) else None
    print("" if value is None else json.dumps(value))


def merge(out: str, started: str, dry_run: str, reason: str, python: str) -> None:
    def git(*args: str) -> str | None:
        done = subprocess.run(["git", *args], capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else None

    parts = {name: json.loads((WORK / f"{name}.json").read_text()) for name in ORDER}
    bad = [name for name, part in parts.items() if part.get("status") in ("failed", "timed out")]
    report = {
        "gpu_check": 1,
        "started_utc": datetime.fromtimestamp(int(started), timezone.utc).isoformat(),
        "finished_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(time.time() - int(started), 1),
        "mode": "dry-run" if dry_run == "1" else "gpu",
        "dry_run_reason": reason or None,
        "python": python,
        "repository": {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain"))},
        "parts": parts,
        "failed_parts": bad,
        "passed": not bad,
    }
    Path(out).write_text(json.dumps(report, indent=2) + "\n")
    print("passed" if not bad else "failed: " + ", ".join(bad))


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    {"skip": skip, "result": result, "get": get, "merge": merge}[command](*args)
PY

# run_part NAME LIMIT [FLAGS for parts.py --] COMMAND…: COMMAND under timeout, stdout and stderr
# to $work/NAME.out / .err, then its fragment.
run_part() {
    local name="$1" limit="$2" rc=0 start status
    shift 2
    local flags=()
    while [[ "$1" != "--" ]]; do flags+=("$1"); shift; done
    shift
    log "$name: $* (at most ${limit}s)"
    start="$(date +%s.%N)"
    timeout -k "$KILL_AFTER" "$limit" "$@" >"$work/$name.out" 2>"$work/$name.err" || rc=$?
    status="$("$PYTHON" "$work/parts.py" result "$name" "$rc" "$start" "$limit" "${flags[@]}")"
    log "$name: $status (exit $rc)"
    if [[ "$status" == failed || "$status" == "timed out" ]]; then
        tail -n 15 "$work/$name.err" | sed 's/^/    /' >&2
    fi
}

skip_part() {
    log "$1: skipped ($2)"
    "$PYTHON" "$work/parts.py" skip "$1" "$2"
}

# ------------------------------------------------------------------------- part 1: the environment
cat >"$work/environment.py" <<'PY'
"""The machine, as the GPU parts will find it: one JSON object on stdout."""

import json
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import warnings
from pathlib import Path


def run(*command: str) -> str | None:
    if shutil.which(command[0]) is None:
        return None
    done = subprocess.run(command, capture_output=True, text=True, timeout=20)
    return done.stdout if done.returncode == 0 else None


def cpu() -> dict:
    fields = {}
    text = run("lscpu") or ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    model, flags = fields.get("Model name"), fields.get("Flags", "").split()
    if not model or not flags:  # no lscpu: the kernel's own list
        cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
        for line in cpuinfo.splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and not model:
                model = value.strip()
            if key.strip() == "flags" and not flags:
                flags = value.split()
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")
    return {
        "model": model or platform.processor() or platform.machine(),
        "source": "lscpu" if text else "/proc/cpuinfo",
        "cores": os.cpu_count(),
        "bf16_relevant_flags": {flag: flag in flags for flag in wanted},
        "flags": flags,
    }


def nvidia_smi() -> dict:
    csv = run("nvidia-smi", "--query-gpu=name,memory.total,driver_version,compute_cap", "--format=csv")
    if csv is None:
        return {"present": shutil.which("nvidia-smi") is not None, "csv": None, "gpus": []}
    header, *rows = [line.split(", ") for line in csv.strip().splitlines()]
    return {"present": True, "csv": csv, "gpus": [dict(zip(header, row)) for row in rows]}


def torch_report() -> dict:
    import torch

    report = {
        "version": torch.__version__,
        "cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "device_count": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "devices": [],
        "bf16_supported_natively": None,
    }
    if report["cuda_available"]:
        for index in range(report["device_count"]):
            props = torch.cuda.get_device_properties(index)
            report["devices"].append(
                {
                    "index": index,
                    "name": props.name,
                    "capability": f"{props.major}.{props.minor}",
                    "memory_gib": round(props.total_memory / (1 << 30), 1),
                    "multiprocessors": props.multi_processor_count,
                }
            )
        try:  # native bf16 only: emulated bf16 on an older GPU is slower than fp32
            report["bf16_supported_natively"] = torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:  # a torch without the argument
            report["bf16_supported_natively"] = torch.cuda.is_bf16_supported()
    with warnings.catch_warnings():  # allow_tf32 is deprecated in favour of fp32_precision
        warnings.simplefilter("ignore")
        tf32 = {
            "float32_matmul_precision": torch.get_float32_matmul_precision(),
            "cuda_matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        }
        for name, backend in (("cuda_matmul", torch.backends.cuda.matmul), ("cudnn", torch.backends.cudnn)):
            if hasattr(backend, "fp32_precision"):
                tf32[f"{name}_fp32_precision"] = backend.fp32_precision
    report["tf32"] = tf32
    import torch.distributed as dist

    report["nccl_available"] = dist.is_available() and dist.is_nccl_available()
    if report["nccl_available"] and report["cuda_available"]:
        report["nccl_version"] = ".".join(map(str, torch.cuda.nccl.version()))
    return report


def compile_toolchain() -> dict:
    include = sysconfig.get_paths()["include"]
    return {
        "cc": shutil.which("gcc") or shutil.which("cc") or shutil.which("clang"),
        "cxx": shutil.which("g++") or shutil.which("c++") or shutil.which("clang++"),
        "python_h": str(Path(include) / "Python.h") if (Path(include) / "Python.h").exists() else None,
    }


print(
    json.dumps(
        {
            "python": {"version": platform.python_version(), "executable": sys.executable},
            "torch": torch_report(),
            "nvidia_smi": nvidia_smi(),
            "cpu": cpu(),
            "compile_toolchain": compile_toolchain(),
            "env": {k: os.environ.get(k) for k in ("CUDA_VISIBLE_DEVICES", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")},
        }
    )
)
PY
run_part environment "$T_ENV" --json-stdout -- "$PYTHON" "$work/environment.py"

cuda_available="$("$PYTHON" "$work/parts.py" get environment output.torch.cuda_available)"
gpus="$("$PYTHON" "$work/parts.py" get environment output.torch.device_count)"
reason=""
if [[ "$cuda_available" != true ]]; then
    dry_run=1
    reason="no CUDA device: torch.cuda.is_available() is false (or the environment part failed)"
elif ((dry_run)); then
    reason="--dry-run (CUDA is available, ${gpus} device(s)): no CUDA part was run"
fi
if ((dry_run)); then
    log "dry run: $reason"
    for part in compile cuda_tests profile bench distributed; do
        skip_part "$part" "$reason"
    done
else
    # -------------------------------------------------------------------- part 2: training.compile
    mkdir -p "$work/cache/inductor" "$work/cache/triton"
    cat >"$work/compile_check.py" <<'PY'
"""torch.compile on cuda:0, as training.compile runs it: the result, and what landed in the caches."""

import json
import os
import time

import torch


def f(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.gelu(x @ x) + 1.0


x = torch.randn(256, 256, device="cuda")
t0 = time.perf_counter()
compiled = torch.compile(f)(x)
torch.cuda.synchronize()
seconds = time.perf_counter() - t0
eager = f(x)
diff = (compiled - eager).abs().max().item()
caches = ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")
files = {var: sum(len(names) for _, _, names in os.walk(os.environ[var])) for var in caches}
print(json.dumps({"first_call_seconds": round(seconds, 1), "max_abs_diff": diff, "cache_files": files}))
assert torch.allclose(compiled, eager, rtol=1e-4, atol=1e-3), f"compiled differs from eager by {diff}"
assert all(files.values()), f"a compile cache stayed empty: {files}"
PY
    run_part compile "$T_COMPILE" --json-stdout -- \
        env TORCHINDUCTOR_CACHE_DIR="$work/cache/inductor" TRITON_CACHE_DIR="$work/cache/triton" \
        "$PYTHON" "$work/compile_check.py"

    # --------------------------------------------------------------------- part 3: the cuda tests
    run_part cuda_tests "$T_TESTS" --pytest -- "$PYTHON" -m pytest -q -m cuda -p no:xdist

    # ------------------------------------------------------------------- part 4: the trainer profile
    if "$PYTHON" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("stream_learner.tools.gpu_profile") is None)'; then
        run_part profile "$T_PROFILE" --json-stdout -- \
            "$PYTHON" -m stream_learner.tools.gpu_profile --steps 200 --json
    else
        skip_part profile "stream_learner.tools.gpu_profile not present"
    fi

    # ------------------------------------------------------------------ part 5: a one-GPU bench
    bench_json="${out%.json}-bench.json"
    first_gpu="${CUDA_VISIBLE_DEVICES:-0}"
    first_gpu="${first_gpu%%,*}"
    run_part bench "$T_BENCH" --bench "$bench_json" -- \
        env CUDA_VISIBLE_DEVICES="$first_gpu" "$PYTHON" -m stream_learner.cli bench \
        --quick --no-ablation --scaling-ranks 0 --out "$bench_json"

    # --------------------------------------------------------------- part 6: two ranks, two GPUs
    if [[ "${gpus:-0}" -ge 2 ]]; then
        run_part distributed "$T_DIST" --pytest -- \
            env STREAM_LEARNER_TRAINING__PRECISION=auto "$PYTHON" -m pytest -q -p no:xdist \
            "tests/integration/test_distributed_pipeline.py::test_two_ranks_learn_one_model_from_disjoint_partitions"
    else
        skip_part distributed "needs 2 CUDA devices, this machine has ${gpus:-0}"
    fi
fi

verdict="$("$PYTHON" "$work/parts.py" merge "$out" "$started" "$dry_run" "$reason" "$PYTHON")"
log "$verdict; the results: $out"
[[ "$verdict" == passed ]]
