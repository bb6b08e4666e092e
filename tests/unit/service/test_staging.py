"""Staging directories: liveness by a lock held inside each directory, not by the process id in its name.

In Kubernetes the learner is PID 1 of every container: a killed predecessor's directory carries the
sweeper's own pid. Only the lock tells a live directory from a dead one.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from stream_learner.service.staging import LOCK, remove_stale_staging_dirs, staging_dir

HOLD = (
    "import pathlib, sys\n"
    "from stream_learner.service.staging import staging_dir\n"
    "d = staging_dir('publish', pathlib.Path(sys.argv[1]))\n"
    "pathlib.Path(d.name, 'model.safetensors').write_bytes(b'0' * 4096)\n"
    "print(d.name, flush=True)\n"
    "sys.stdin.read()  # hold it until told\n"
)


def _holder(root: Path) -> tuple[subprocess.Popen, Path]:
    """A child process holding a staging directory under ``root``, a file in it, until its stdin closes."""
    child = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(root)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[3],
    )
    return child, Path(child.stdout.readline().strip())


def test_a_sigkilled_processs_directory_is_swept_a_live_ones_is_kept(tmp_path: Path) -> None:
    killed_child, killed = _holder(tmp_path)
    live_child, live = _holder(tmp_path)
    try:
        killed_child.send_signal(signal.SIGKILL)  # no finally, no finalizer: the directory stays behind
        killed_child.wait()
        assert (killed / "model.safetensors").is_file() and (killed / LOCK).is_file()
        other = tmp_path / "stream-learner-scaling-abc"  # not a staging directory's name
        other.mkdir()
        assert remove_stale_staging_dirs(tmp_path) == 1
        assert not killed.exists()
        assert (live / "model.safetensors").is_file()  # another process holds it: kept
        assert other.is_dir()
    finally:
        live_child.stdin.close()  # it exits normally: its directory goes with it
        live_child.wait()
    assert not live.exists()


def test_a_directory_named_with_the_sweepers_own_pid_but_unlocked_is_swept(tmp_path: Path) -> None:
    """The PID-1 case: the predecessor was PID 1 too, so its directory's name carries the sweeper's pid."""
    dead = tmp_path / f"stream-learner-publish-{os.getpid()}-3f9a0c1d2e4b"
    (dead / "trainer_state").mkdir(parents=True)
    (dead / "trainer_state" / "optimizer.safetensors").write_bytes(b"0" * 4096)
    (dead / LOCK).touch()  # its lock file, no longer held by anyone
    legacy = tmp_path / f"stream-learner-work-{os.getpid()}-oldlearner"  # an older learner's: no lock file
    legacy.mkdir()
    with staging_dir("publish", tmp_path) as ours:  # this process's own, held
        assert remove_stale_staging_dirs(tmp_path) == 2
        assert not dead.exists() and not legacy.exists()
        assert Path(ours).is_dir() and (Path(ours) / LOCK).is_file()
    assert not Path(ours).exists()


def test_a_staging_directory_is_locked_from_the_moment_it_has_its_name(tmp_path: Path) -> None:
    """Made under a dot-name the sweep ignores, locked, then renamed: a sweep never sees it unlocked."""
    d = staging_dir("work", tmp_path)
    try:
        assert Path(d.name).name.startswith(f"stream-learner-work-{os.getpid()}-")
        assert [p.name for p in tmp_path.iterdir()] == [Path(d.name).name]  # no dot-named leftover
        # another process cannot take the lock (flock conflicts across open file descriptions)
        probe = subprocess.run(
            [
                sys.executable,
                "-c",
                "import fcntl, os, sys\n"
                "fd = os.open(sys.argv[1], os.O_RDWR)\n"
                "try:\n    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
                "except OSError:\n    print('held')\n",
                str(Path(d.name) / LOCK),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        assert probe.stdout.strip() == "held"
        assert remove_stale_staging_dirs(tmp_path) == 0
    finally:
        d.cleanup()
    assert list(tmp_path.iterdir()) == []
    d.cleanup()  # twice is fine


def test_the_default_root_is_the_system_temporary_directory(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    with staging_dir("publish") as path:
        assert Path(path).parent == tmp_path
        assert remove_stale_staging_dirs() == 0
    assert list(tmp_path.iterdir()) == []


def test_the_sweep_survives_directories_removed_while_it_walks_them(tmp_path: Path, monkeypatch) -> None:
    """Another process removing its own staging directory (its lock file goes first, then the rest) while
    a learner starts and sweeps: the sweep must not fail on what vanishes under it. A test run once
    failed so (FileNotFoundError counting the sizes) when a rollback elsewhere finished meanwhile; here
    a subdirectory vanishes between being listed and being read."""
    stale = tmp_path / f"stream-learner-rollback-{os.getpid()}-0123456789ab"
    for v in ("000001", "000002"):
        (stale / "versions" / v).mkdir(parents=True)
        (stale / "versions" / v / "model.safetensors").write_bytes(b"x" * 100)
    real_scandir = os.scandir

    def vanishing(path=".", *args, **kwargs):
        if str(path).endswith("000001"):
            raise FileNotFoundError(2, "No such file or directory", str(path))
        return real_scandir(path, *args, **kwargs)

    monkeypatch.setattr(os, "scandir", vanishing)
    assert remove_stale_staging_dirs(tmp_path) == 1
    assert not stale.exists()
