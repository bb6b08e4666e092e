"""The zygote (tests/support/zygote.py): a forked child is started as a fresh one would be — its command
line, environment, working directory, temporary directory, thread count and streams — and its exit
code or signal reaches the test as ``Popen`` reports them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import zygote

ROOT = Path(__file__).resolve().parents[2]


def echo(tmp_path: Path, code: int, threads: str, **kwargs) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "SL_TESTS_ECHO": "from the test",
        "TMPDIR": str(tmp_path),
        "OMP_NUM_THREADS": threads,
    }
    return zygote.run([sys.executable, "-m", "tests.support.echo", str(code)], env=env, timeout=60, **kwargs)


@pytest.mark.parametrize(("code", "threads"), [(0, "1"), (3, "2")])
def test_a_forked_child_is_started_as_asked_and_its_exit_code_returns(
    tmp_path: Path, code: int, threads: str
):
    done = echo(tmp_path, code, threads)
    assert done.returncode == code, done.stderr
    seen = json.loads(done.stdout)
    assert seen == {
        "argv": [str(code)],
        "cwd": os.getcwd(),
        "env": "from the test",
        "tmpdir": str(tmp_path),
        "threads": int(threads),
    }
    assert done.stderr == "to stderr\n"


def test_a_signal_that_ends_a_forked_child_is_reported_as_popen_does(tmp_path: Path):
    assert echo(tmp_path, -signal.SIGTERM, "1").returncode == -signal.SIGTERM


def test_wait_times_out_and_kill_ends_the_child(tmp_path: Path):
    with (tmp_path / "out").open("wb") as out:
        proc = zygote.spawn(
            [sys.executable, "-m", "tests.support.echo", str(-signal.SIGSTOP)],
            stdout=out.fileno(),
            stderr=out.fileno(),
            env=dict(os.environ),
            cwd=ROOT,
        )
    with pytest.raises(subprocess.TimeoutExpired):
        proc.wait(timeout=0.5)
    assert proc.poll() is None
    proc.kill()
    assert proc.wait(timeout=30) == -signal.SIGKILL
