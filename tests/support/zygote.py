"""Learner and server processes for the tests, forked from an interpreter that has imported torch already.

A ``stream-learner run`` spends ≈ 3.5 s of CPU importing torch and transformers before it reads its
settings, and the suite starts dozens of them (the chaos test alone six): ≈ a third of the suite's
CPU went on those imports. The zygote is a process started once per test session that imports them
(:data:`PRELOAD`) and then forks a child per request — the technique of ``multiprocessing``'s
forkserver and of torch's own ``DataLoader`` workers. The child is a real process with its own pid,
its argv, environment, working directory and standard streams as asked; it runs the CLI's
entry point (``stream_learner.cli:app``) and exits through the interpreter's normal shutdown. SIGKILL
and SIGTERM reach it as they reach any process.

Protocol, on a Unix socket (``$SL_TESTS_ZYGOTE``), one connection per child:

1. the client sends one JSON line ``{"argv", "env", "cwd"}`` (and ``"watch_pid"``, below) with its
   stdin, stdout and stderr as ``SCM_RIGHTS`` file descriptors;
2. the zygote forks; the child sets those up and runs the CLI; the zygote answers ``{"pid"}``;
3. when the child exits, the zygote (which reaps it) sends ``{"returncode"}`` — Popen's convention,
   −N for a signal — and closes the connection.

:class:`ForkedProcess` is the client's end: the part of ``subprocess.Popen`` the tests use (``pid``,
``poll``, ``wait``, ``send_signal``, ``terminate``, ``kill``, ``returncode``).

A launcher that starts its workers itself — torchrun's ranks — starts :mod:`tests.support.zygote_exec`
as each one instead: a small interpreter without torch that has the zygote fork the real command,
passes it the signals it gets, and exits as the child does. Its request carries ``watch_pid``, its
own pid: the child SIGKILLs itself when that process dies, so a rank the test SIGKILLs (the small
process, torchrun's child) dies at once, as a fresh one would.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ENV = "SL_TESTS_ZYGOTE"
OFF = "off"  # $SL_TESTS_ZYGOTE=off: every child a fresh interpreter (plain Popen), as before the zygote
#: What a learner and a server import before they read their settings: imported once, in the zygote.
PRELOAD = (
    "torch",
    "transformers.modeling_utils",
    "transformers.models.bert.modeling_bert",
    "confluent_kafka",
    "stream_learner.cli",
    "stream_learner.service.app",
    "stream_learner.service.logs",
    "stream_learner.service.serving.server",
)
_PR_SET_PDEATHSIG = 1


# ------------------------------------------------------------------------------------------ client
class ForkedProcess:
    """A child of the zygote, used like the ``subprocess.Popen`` of the same command."""

    def __init__(
        self,
        args: list[str],
        *,
        stdout: int,
        stderr: int,
        env: dict[str, str],
        cwd: str | None = None,
        watch_pid: int | None = None,
    ):
        self.args = args
        self.returncode: int | None = None
        self._conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._conn.connect(os.environ[ENV])
        request = {"argv": args, "env": env, "cwd": str(cwd or os.getcwd()), "watch_pid": watch_pid}
        request = json.dumps(request).encode() + b"\n"
        with open(os.devnull, "rb") as stdin:
            socket.send_fds(self._conn, [request], [stdin.fileno(), stdout, stderr])
        self._reader = self._conn.makefile("rb")
        self.pid = int(json.loads(self._reader.readline())["pid"])

    def poll(self) -> int | None:
        if self.returncode is None and select.select([self._conn], [], [], 0)[0]:
            self._read_returncode()
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            if not select.select([self._conn], [], [], timeout)[0]:
                raise subprocess.TimeoutExpired(self.args, timeout or 0)
            self._read_returncode()
        assert self.returncode is not None
        return self.returncode

    def _read_returncode(self) -> None:
        line = self._reader.readline()
        if not line:
            raise RuntimeError(f"the zygote went away before child {self.pid} ({self.args}) ended")
        self.returncode = int(json.loads(line)["returncode"])
        self._reader.close()
        self._conn.close()

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def choose_path() -> str:
    """The session's socket (no zygote yet), exported to the xdist workers in ``$SL_TESTS_ZYGOTE``."""
    path = str(Path(tempfile.mkdtemp(prefix="sl-zygote-")) / "zygote.sock")
    os.environ[ENV] = path
    return path


def spawn(
    args: list[str], *, stdout: int, stderr: int, env: dict[str, str], cwd: Path | None = None
) -> ForkedProcess | subprocess.Popen:
    """``args`` — ``[…/stream-learner, …]`` or ``[python, "-m", module, …]`` — as a child of the
    session's zygote, started on first use (once per session, by whichever process comes first); a
    plain ``Popen`` outside a test session or with ``$SL_TESTS_ZYGOTE=off``."""
    if not enabled():
        from stream_learner.tools.child_process import parent_death_preexec

        return subprocess.Popen(
            args, stdout=stdout, stderr=stderr, env=env, cwd=cwd, preexec_fn=parent_death_preexec()
        )
    ensure_started()
    return ForkedProcess(args, stdout=stdout, stderr=stderr, env=env, cwd=cwd)


def enabled() -> bool:
    """Whether this test session forks its children from a zygote (not ``$SL_TESTS_ZYGOTE=off``)."""
    return os.environ.get(ENV, OFF) != OFF


def ensure_started() -> None:
    """Start the session's zygote unless it serves already (once per session, whichever process comes
    first). Before a launcher's :mod:`tests.support.zygote_exec` workers: a zygote they started would
    die with the first of them."""
    path = Path(os.environ[ENV])
    if not path.exists():
        from filelock import FileLock

        with FileLock(str(path) + ".lock"):
            if not path.exists():
                _start(path)


def run(
    args: list[str], *, env: dict[str, str], timeout: float, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """``subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout)``, the child
    forked from the zygote (:func:`spawn`)."""
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    try:
        proc = spawn(args, stdout=out_w, stderr=err_w, env=env, cwd=cwd)
    finally:
        os.close(out_w)
        os.close(err_w)
    captured: dict[int, bytearray] = {out_r: bytearray(), err_r: bytearray()}
    deadline = time.monotonic() + timeout
    try:
        open_fds = [out_r, err_r]
        while open_fds:
            left = deadline - time.monotonic()
            if left <= 0:
                proc.kill()
                raise subprocess.TimeoutExpired(args, timeout)
            for fd in select.select(open_fds, [], [], left)[0]:
                chunk = os.read(fd, 1 << 16)
                if chunk:
                    captured[fd] += chunk
                else:
                    open_fds.remove(fd)
        code = proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
    finally:
        os.close(out_r)
        os.close(err_r)
    return subprocess.CompletedProcess(args, code, captured[out_r].decode(), captured[err_r].decode())


# ------------------------------------------------------------------------------------------ server
def _returncode(status: int) -> int:
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def _become_child(listener: socket.socket, conns: dict, request: dict, fds: list[int]) -> None:
    """In the forked child: the streams, environment and directory asked for; the zygote's sockets gone."""
    listener.close()
    for conn in conns.values():
        conn.close()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)  # never outlive the zygote (as Popen's children do not)
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    os.environ.clear()
    os.environ.update(request["env"])
    os.chdir(request["cwd"])
    if request.get("watch_pid"):
        threading.Thread(target=_die_with, args=(request["watch_pid"],), daemon=True).start()
    tempfile.tempdir = None  # TMPDIR as the child's environment says, not as the zygote found it
    sys.argv = list(request["argv"])
    import torch

    # the thread count a fresh interpreter would take from this environment (OpenMP read the zygote's
    # when torch was imported); nothing has computed yet, so it still takes effect
    threads = os.environ.get("OMP_NUM_THREADS", "")
    torch.set_num_threads(int(threads) if threads.isdigit() and int(threads) > 0 else _default_threads)


def _die_with(pid: int) -> None:
    """SIGKILL this process when process ``pid`` has ended (at once if it has already)."""
    with contextlib.suppress(ProcessLookupError):
        select.select([os.pidfd_open(pid)], [], [])
    os.kill(os.getpid(), signal.SIGKILL)


_default_threads = 1


def serve(path: str) -> list[str]:
    """The zygote's loop; returns only in a forked child, with the command line it is to run."""
    global _default_threads
    for name in PRELOAD:
        __import__(name)
    import torch

    _default_threads = torch.get_num_threads()  # torch's default here: one per core
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path + ".tmp")
    listener.listen(64)
    os.rename(path + ".tmp", path)  # clients see the socket only once it accepts
    conns: dict[int, socket.socket] = {}  # child pid → its client's connection
    while True:
        ready, _, _ = select.select([listener], [], [], 0.05)
        if ready:
            conn, _ = listener.accept()
            data, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
            request = json.loads(data)
            pid = os.fork()
            if pid == 0:
                conn.close()
                _become_child(listener, conns, request, fds)
                return request["argv"]
            for fd in fds:
                os.close(fd)
            conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")
            conns[pid] = conn
        while conns:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            conn = conns.pop(pid, None)
            if conn is not None:
                with contextlib.suppress(OSError):
                    conn.sendall(json.dumps({"returncode": _returncode(status)}).encode() + b"\n")
                conn.close()


_zygotes: list[subprocess.Popen] = []  # the one this process started, kept from collection


def _start(path: Path) -> None:
    """Start the zygote at ``path``; returns once it accepts. It dies with this process (PDEATHSIG)."""
    from stream_learner.tools.child_process import parent_death_preexec

    # its children's standard streams unbuffered: output reaches a learner's log file at once, as the
    # tests' learners (PYTHONUNBUFFERED=1) always had
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("OMP_NUM_THREADS", None)  # torch's own default seen in the zygote; each child sets its own
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.support.zygote", str(path)],
        env=env,
        cwd=Path(__file__).resolve().parents[2],
        stdin=subprocess.DEVNULL,
        preexec_fn=parent_death_preexec(),
    )
    _zygotes.append(proc)
    deadline = time.monotonic() + 120
    while not path.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"the zygote exited ({proc.returncode}) before it served")
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("the zygote did not serve within 120 s")
        time.sleep(0.05)


if __name__ == "__main__":
    argv = serve(sys.argv[1])
    if argv[1:2] == ["-m"]:  # python -m MODULE ARGS…
        import runpy

        sys.argv = [argv[2], *argv[3:]]
        runpy.run_module(argv[2], run_name="__main__", alter_sys=True)
        sys.exit(0)
    from stream_learner.cli import app

    app(args=argv[1:], prog_name="stream-learner")
