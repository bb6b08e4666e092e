"""Servers run as child processes (the local broker, and in the tests SeaweedFS and Prometheus).

A :class:`ServerProcess` is started with its output appended to a log file, in its own session (a
Ctrl-C meant for Python does not reach it), and never outlives this process: it is terminated when
its owner is collected or the interpreter exits (``weakref.finalize``) and, when started from the
main thread on Linux, killed by the kernel if the Python process dies without running its exit
handlers (``PR_SET_PDEATHSIG``). Starting waits until a subclass's readiness probe passes; a child
that exits or does not get ready is reported with the end of its log.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, Self

STOP_GRACE_S = 5.0
_PR_SET_PDEATHSIG = 1


def parent_death_preexec() -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child get SIGKILL when this process dies, or None.

    Linux only, and only from the main thread: the kernel sends the signal when the *thread* that
    forked the child exits, so a child started from a worker thread would die with that thread.
    """
    if not sys.platform.startswith("linux") or threading.current_thread() is not threading.main_thread():
        return None
    parent = os.getpid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None

    def preexec() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


def terminate_process(proc: subprocess.Popen, grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM, then SIGKILL after ``grace_s``; always waits, so no zombie remains."""
    if proc.poll() is None:
        if grace_s > 0:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=grace_s)
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
    proc.wait()


def spawn_server(
    owner: object,
    args: list[str],
    log_path: Path,
    *,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    grace_s: float = 0.0,
) -> tuple[subprocess.Popen, weakref.finalize]:
    """Start a server as a child process: output appended to ``log_path``, its own session (a Ctrl-C
    meant for Python does not reach it), killed when this process dies (:func:`parent_death_preexec`)
    and terminated when ``owner`` is collected or the interpreter exits, whichever comes first."""
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            args,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env if env is not None else os.environ.copy(),
            start_new_session=True,
            preexec_fn=parent_death_preexec(),
        )
    return proc, weakref.finalize(owner, terminate_process, proc, grace_s)


#: What the tools' worker processes import before their work: imported once, in the forkserver.
FORKSERVER_PRELOAD = ("torch", "transformers.modeling_utils", "stream_learner.tools.harness")


def forkserver_context() -> Any:
    """multiprocessing's forkserver context, :data:`FORKSERVER_PRELOAD` imported in it.

    Each worker is forked from the forkserver — a process that imported torch and transformers once
    and never computed — instead of a fresh interpreter spending ≈ 4 s of CPU on those imports. Like
    ``spawn`` (and unlike ``fork``), a worker gets fresh OpenMP and CUDA state: the forkserver never
    started either.
    """
    import multiprocessing

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(list(FORKSERVER_PRELOAD))
    return context


def log_tail(path: Path, lines: int = 30) -> str:
    """The last ``lines`` lines of a log file, for error messages ('' if unreadable)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


class ServerProcess:
    """A server as a child process: :meth:`_spawn` it, :meth:`_wait_ready` on a probe, :meth:`stop`.

    Subclasses define ``start`` (the command line, then ``_spawn`` and ``_wait_ready``), ``describe``
    (what and where, for error messages) and their probe: a callable that returns None once the
    server answers and a short reason while it does not.
    """

    stop_grace_s: float = STOP_GRACE_S  # SIGTERM, then SIGKILL after this long

    def __init__(self, log_path: Path) -> None:
        self.log_path = Path(log_path)
        self._proc: subprocess.Popen | None = None
        self._finalizer: weakref.finalize | None = None

    def describe(self) -> str:
        return type(self).__name__

    @property
    def running(self) -> bool:
        """Whether the child process is alive (not whether it answers)."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        """The child's process id while it runs."""
        return self._proc.pid if self.running else None

    def _spawn(self, args: list[str], *, env: dict[str, str] | None = None, cwd: Path | None = None) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._proc, self._finalizer = spawn_server(
            self, args, self.log_path, env=env, cwd=cwd, grace_s=self.stop_grace_s
        )

    def _wait_ready(self, timeout_s: float, probe: Callable[[], str | None], interval_s: float = 0.1) -> None:
        """Wait until ``probe()`` returns None; on failure stop the child and raise RuntimeError."""
        assert self._proc is not None
        deadline = time.monotonic() + timeout_s
        why: str | None = "no answer"
        try:
            while True:
                if self._proc.poll() is not None:
                    raise RuntimeError(self._failure(f"exited with code {self._proc.returncode}"))
                if time.monotonic() >= deadline:
                    raise RuntimeError(self._failure(f"did not get ready within {timeout_s:g}s ({why})"))
                why = probe()
                if why is None:
                    return
                time.sleep(interval_s)
        except BaseException:
            self._terminate(grace_s=0)  # keeps the log, which the error message points to
            raise

    def _failure(self, what: str) -> str:
        return f"{self.describe()} {what}; log {self.log_path}:\n{log_tail(self.log_path)}"

    def _terminate(self, grace_s: float) -> None:
        if self._proc is not None:
            terminate_process(self._proc, grace_s)
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None

    def stop(self) -> None:
        """Stop the child (SIGTERM, SIGKILL after ``stop_grace_s``) and reap it. Idempotent."""
        self._terminate(self.stop_grace_s)

    def kill(self) -> None:
        """Kill the child at once (SIGKILL), as a crash would."""
        self._terminate(grace_s=0)

    def start(self, timeout_s: float = 30.0) -> Self:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
