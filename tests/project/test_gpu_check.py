"""benchmarks/gpu_check.sh, the check for the day a GPU is at hand, kept working on machines without one.

Its GPU parts cannot run here; what can be checked is everything around them: it parses and passes
shellcheck, its dry run (and the automatic one, without CUDA) writes the JSON with the environment
part filled in from this venv and every CUDA part skipped with a reason, its time limits add up to
under 10 minutes, and the Python programs it writes for the GPU parts at least compile.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
CUDA_PARTS = ("compile", "cuda_tests", "profile", "bench", "distributed")


def run_check(tmp_path: Path, *args: str) -> tuple[dict[str, Any], str]:
    """The script with these arguments, with this interpreter: its JSON and its stderr."""
    out = tmp_path / "x.json"
    done = subprocess.run(
        ["bash", str(SCRIPT), *args, "--out", str(out)],
        env={**os.environ, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(out.read_text()), done.stderr


def cpu_model() -> str:
    """As lscpu names it (on ARM it has a name /proc/cpuinfo lacks), else as the kernel does."""
    if shutil.which("lscpu"):
        text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=30).stdout
        found = re.search(r"^Model name:\s*(.+)$", text, re.M)
        if found:
            return found[1].strip()
    found = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
    return found[1].strip() if found else platform.processor() or platform.machine()


def test_script_parses() -> None:
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0


@pytest.mark.skipif(
    shutil.which("shellcheck") is None, reason="shellcheck (Debian package shellcheck) not installed"
)
def test_script_is_shellcheck_clean() -> None:
    done = subprocess.run(["shellcheck", str(SCRIPT)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout


@pytest.mark.parametrize(
    "args",
    [
        ("--dry-run",),
        pytest.param(
            (),
            marks=pytest.mark.skipif(
                torch.cuda.is_available(), reason="with CUDA and no --dry-run the check runs for real"
            ),
        ),
    ],
    ids=["dry-run", "no-cuda-means-dry-run"],
)
def test_dry_run_reports_the_environment_and_skips_every_cuda_part(
    tmp_path: Path, args: tuple[str, ...]
) -> None:
    """Asked for a dry run, or without CUDA: part 1 measured here, the rest skipped with the reason, one
    JSON file, exit 0, in seconds (the test suite runs it)."""
    report, stderr = run_check(tmp_path, *args)
    assert report["mode"] == "dry-run" and report["passed"] is True
    cuda = torch.cuda.is_available()
    assert ("--dry-run" if cuda else "no CUDA device") in report["dry_run_reason"]
    environment = report["parts"]["environment"]
    assert environment["status"] == "passed", environment
    found = environment["output"]
    assert found["torch"]["version"] == torch.__version__
    assert found["torch"]["cuda_available"] is cuda
    assert found["torch"]["device_count"] == (torch.cuda.device_count() if cuda else 0)
    assert found["cpu"]["model"] == cpu_model()
    assert found["cpu"]["flags"] and set(found["cpu"]["bf16_relevant_flags"]) >= {"avx512_bf16", "amx_bf16"}
    assert set(found["torch"]["tf32"]) >= {"float32_matmul_precision", "cuda_matmul_allow_tf32"}
    assert found["python"]["executable"] == sys.executable
    assert list(report["parts"]) == ["environment", *CUDA_PARTS]
    for part in CUDA_PARTS:
        assert report["parts"][part] == {"skipped": report["dry_run_reason"]}, part
    # progress on stderr, part by part
    assert all(f"gpu_check: {part}: skipped" in stderr for part in CUDA_PARTS)


def test_bad_argument_exits_2_with_the_usage(tmp_path: Path) -> None:
    done = subprocess.run(["bash", str(SCRIPT), "--bogus"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "unknown argument: --bogus" in done.stderr
    assert "--dry-run" in done.stderr  # the usage follows


def test_time_limits_add_up_to_under_ten_minutes() -> None:
    """Each part is bounded by `timeout LIMIT` plus KILL_AFTER seconds of grace: the whole stays under
    10 minutes even if every part hangs."""
    text = SCRIPT.read_text()
    limits = {name: int(value) for name, value in re.findall(r"^(T_\w+|KILL_AFTER)=(\d+)$", text, re.M)}
    kill_after = limits.pop("KILL_AFTER")
    used = set(re.findall(r'run_part \w+ "\$(T_\w+)"', text))
    assert used == set(limits), "every limit is used by a part, every part has one"
    parts = len(re.findall(r"^\s*run_part \w+ ", text, re.M))
    assert sum(limits.values()) + parts * kill_after < 600


def test_the_python_programs_it_writes_compile() -> None:
    """The GPU parts' programs never run here: a syntax error in one would surface only on the GPU day."""
    programs = re.findall(r"<<'PY'\n(.*?)^PY$", SCRIPT.read_text(), re.M | re.S)
    assert len(programs) >= 3  # the JSON helper, the environment report, the compile check
    for source in programs:
        compile(source, "gpu_check.sh heredoc", "exec")
