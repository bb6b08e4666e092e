"""The pieces of the serving load test (``tests/integration/test_serving_load.py``) beside the learner
(:class:`~tests.support.learner_process.LearnerProcess`) and wrk (:mod:`tests.support.wrk`):
``stream-learner serve`` as a child process, a steady producer of events, and a watcher that records
when LATEST named each version and when the server started serving it.
"""

from __future__ import annotations

import os
import re
import sys
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from confluent_kafka import Producer
from prometheus_client.parser import text_string_to_metric_families

from stream_learner.core.events import encode_event
from stream_learner.service.storage import ObjectStore
from stream_learner.service.versions import read_latest
from stream_learner.tools.child_process import ServerProcess, terminate_process
from tests.support import zygote
from tests.support.factories import tiny_rows
from tests.support.services import free_port
from tests.support.serving import Client

# the loader's INFO line for each version it loads (service/serving/loader.py); its seconds are the
# observation it makes in stream_learner_serving_load_seconds
LOADED = re.compile(r"version (\d+) loaded and warmed up in ([0-9.]+) s")


class ServeProcess(ServerProcess):
    """``stream-learner serve -c <yaml>`` with ``config`` (nested settings; ``serving.host`` and
    ``serving.port`` are set here), logging to ``workdir/serve.log``. Started once it is live (it is
    ready only once a version is loaded)."""

    stop_grace_s = 15.0  # SIGTERM: it answers the requests in flight, then exits

    def __init__(self, config: dict, workdir: Path) -> None:
        super().__init__(workdir / "serve.log")
        self.port = free_port()
        serving = {**config.get("serving", {}), "host": "127.0.0.1", "port": self.port}
        self.config_path = workdir / "serve.yaml"
        self.config_path.write_text(yaml.safe_dump({**config, "serving": serving}))
        self.client = Client(self.port)

    @property
    def infer_url(self) -> str:
        return f"{self.client.base}/v2/models/{self.client.model}/infer"

    def describe(self) -> str:
        return f"stream-learner serve on 127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 120.0) -> ServeProcess:
        exe = Path(sys.executable).parent / "stream-learner"
        self._spawn([str(exe), "serve", "-c", str(self.config_path)])
        self._wait_ready(timeout_s, self._live, interval_s=0.1)
        return self

    def _spawn(self, args: list[str], *, env: dict[str, str] | None = None, cwd: Path | None = None) -> None:
        """Forked from the session's zygote (tests/support/zygote.py), not a fresh interpreter."""
        with self.log_path.open("ab") as log:
            self._proc = zygote.spawn(
                args, stdout=log.fileno(), stderr=log.fileno(), env=env or dict(os.environ)
            )
        self._finalizer = weakref.finalize(self, terminate_process, self._proc, self.stop_grace_s)

    def _live(self) -> str | None:
        try:
            status, _ = self.client.get("/v2/health/live")
        except OSError as err:
            return str(err)
        return None if status == 200 else f"live answered {status}"

    def metrics(self) -> dict[str, float]:
        """Every sample of ``/metrics`` without labels, by name (histograms: ``…_sum``, ``…_count``)."""
        return {
            sample.name: sample.value
            for family in text_string_to_metric_families(self.client.metrics())
            for sample in family.samples
            if not sample.labels
        }

    def load_seconds(self) -> dict[int, float]:
        """Each loaded version's load time (manifest → ready to swap), from the server's log."""
        return {int(v): float(s) for v, s in LOADED.findall(self.log_path.read_text(errors="replace"))}


class StreamProducer(threading.Thread):
    """Produces the bundled tiny stream's rows, in a loop, at ``rate`` events per second to ``topic``
    until :meth:`stop`; ``produced`` counts the events acknowledged."""

    def __init__(self, bootstrap: str, topic: str, rate: float) -> None:
        super().__init__(name="stream-producer", daemon=True)
        self.bootstrap, self.topic, self.rate = bootstrap, topic, rate
        self.values = [encode_event(r["text"], r["label"]) for r in tiny_rows()]
        self.produced = 0
        self.errors: list[str] = []
        self._stopping = threading.Event()

    def _delivered(self, err: object, _msg: object) -> None:
        if err is None:
            self.produced += 1
        else:
            self.errors.append(str(err))

    def run(self) -> None:
        # made and dropped here: a producer left alive complains of the broker when the session ends
        producer = Producer({"bootstrap.servers": self.bootstrap, "acks": "all", "linger.ms": 10})
        started, sent = time.monotonic(), 0
        while not self._stopping.is_set():
            value = self.values[sent % len(self.values)]
            producer.produce(self.topic, value, on_delivery=self._delivered)
            sent += 1
            producer.poll(0)
            self._stopping.wait(max(0.0, started + sent / self.rate - time.monotonic()))
        producer.flush(30)

    def stop(self) -> None:
        self._stopping.set()
        self.join(60)


@dataclass
class VersionTimeline:
    """What :class:`VersionWatcher` saw, in ``time.monotonic()`` seconds: for each version, when LATEST
    came to name it and when the server began to serve it, each as an interval ``(after, by)`` — after
    the start of the last read that did not see it, by the end of the first that did —, and every
    version the server's follower had read from LATEST (its ``stream_learner_serving_latest_version``)."""

    named: dict[int, tuple[float, float]] = field(default_factory=dict)
    served: dict[int, tuple[float, float]] = field(default_factory=dict)
    follower_read: set[int] = field(default_factory=set)
    named_before_watching: int | None = None  # LATEST at the first read: when it was named is not known
    ticks: int = 0
    slowest_tick_s: float = 0.0

    def named_between(self, start: float, end: float) -> list[int]:
        """The versions LATEST was seen naming first between ``start`` and ``end``."""
        return sorted(v for v, (_, by) in self.named.items() if start <= by <= end)

    def delay(self, version: int) -> tuple[float, float]:
        """(midpoint, half-width) of the interval the delay from LATEST naming ``version`` to the server
        serving it lies in (never below 0: a version is served after it is named)."""
        (named_after, named_by), (served_after, served_by) = self.named[version], self.served[version]
        low, high = max(0.0, served_after - named_by), served_by - named_after
        return (low + high) / 2, (high - low) / 2


class VersionWatcher(threading.Thread):
    """Every ``interval_s``: the server's model metadata (the version serving), its metrics (what its
    follower last read from LATEST), then LATEST itself, read from the store; each version's first
    sighting recorded with the interval it happened in (:class:`VersionTimeline`)."""

    def __init__(self, store: ObjectStore, server: ServeProcess, interval_s: float = 0.05) -> None:
        super().__init__(name="version-watcher", daemon=True)
        self.store, self.server, self.interval_s = store, server, interval_s
        self.timeline = VersionTimeline()
        self.error: BaseException | None = None
        self._stopping = threading.Event()
        self._last_read_started: dict[str, float] = {}

    def run(self) -> None:
        try:
            while not self._stopping.is_set():
                started = time.monotonic()
                self._tick()
                spent = time.monotonic() - started
                self.timeline.ticks += 1
                self.timeline.slowest_tick_s = max(self.timeline.slowest_tick_s, spent)
                self._stopping.wait(max(0.0, self.interval_s - spent))
        except BaseException as err:  # surfaced by stop(): a watcher that died would record nothing
            self.error = err

    def _tick(self) -> None:
        t = self.timeline
        started = time.monotonic()
        status, meta = self.server.client.get(f"/v2/models/{self.server.client.model}")
        if status == 200:
            self._sighted(t.served, "served", int(meta["parameters"]["version"]), started)
        else:
            self._last_read_started["served"] = started
        read = int(self.server.metrics().get("stream_learner_serving_latest_version", 0))
        if read:
            t.follower_read.add(read)
        started = time.monotonic()
        latest, _ = read_latest(self.store)
        if latest is not None and t.ticks == 0:
            t.named_before_watching = latest
        if latest is not None:
            self._sighted(t.named, "named", latest, started)
        else:
            self._last_read_started["named"] = started

    def _sighted(self, seen: dict[int, tuple[float, float]], what: str, version: int, started: float) -> None:
        after = self._last_read_started.get(what, started)
        seen.setdefault(version, (after, time.monotonic()))
        self._last_read_started[what] = started

    def stop(self) -> VersionTimeline:
        self._stopping.set()
        self.join(30)
        if self.error is not None:
            raise AssertionError(f"the version watcher failed: {self.error!r}") from self.error
        return self.timeline
