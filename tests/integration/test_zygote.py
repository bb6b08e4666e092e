"""The zygote (tests/support/zygote.py): a forked child is started as a fresh one would be — its command
line, environment, working directory, temporary directory, thread count and streams — and its exit
code or signal reaches the test as ``Popen`` reports them; through ``zygote_exec.py`` (what torchrun
starts as each rank), it reaches the launcher the same way, and the child dies with that process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support import zygote
from tests.support.learner_process import ZYGOTE_EXEC

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
    assert isinstance(seen.pop("pid"), int)
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


def exec_echo(*args: str, **kwargs) -> subprocess.Popen:
    """``zygote_exec.py python -m tests.support.echo ARGS``, as a launcher starts a worker."""
    if not zygote.enabled():
        pytest.skip("$SL_TESTS_ZYGOTE=off: the launcher's workers are fresh interpreters, not zygote_exec")
    zygote.ensure_started()
    command = [sys.executable, str(ZYGOTE_EXEC), sys.executable, "-m", "tests.support.echo", *args]
    return subprocess.Popen(command, cwd=ROOT, text=True, **kwargs)


@pytest.mark.parametrize("code", [0, 3, -signal.SIGTERM])
def test_through_zygote_exec_the_launcher_sees_the_childs_streams_and_end(code: int):
    proc = exec_echo(str(code), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    seen = json.loads(out)
    assert seen["argv"] == [str(code)] and seen["pid"] != proc.pid  # forked by the zygote, not exec'd here
    assert err == "to stderr\n"


def test_zygote_exec_passes_sigterm_on_and_the_child_dies_with_it_on_sigkill():
    for sig in (signal.SIGTERM, signal.SIGKILL):
        proc = exec_echo("pause", stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        child = json.loads(proc.stdout.readline())["pid"]
        os.kill(child, 0)  # running
        proc.send_signal(sig)
        assert proc.wait(timeout=30) == -sig  # SIGTERM: passed on, the child died of it, and so did this
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # SIGKILL: the child notices and kills itself
            try:
                os.kill(child, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        else:
            pytest.fail(f"the child {child} outlived zygote_exec's {sig!r}")
        proc.stdout.close()
