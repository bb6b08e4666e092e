"""Shared fixtures: a Kafka-protocol broker and an S3 server, each started at most once per session.

Both are lazy: a test that asks for neither starts neither.

* ``kafka_bootstrap``: ``$STREAM_LEARNER_TEST_BOOTSTRAP`` if set; else a Kafka container when a Docker
  engine answers; else a local Tansu broker (:class:`stream_learner.tools.local_broker.LocalBroker`).
* ``s3_server``: a SeaweedFS server (:class:`tests.support.services.SeaweedS3`); ``s3_bucket``: a fresh bucket
  on it for one test.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from stream_learner.tools.local_broker import LocalBroker
from tests.support import tiny_model, zygote
from tests.support.ordering import Kind, suite_order
from tests.support.services import SeaweedS3

BOOTSTRAP_ENV = "STREAM_LEARNER_TEST_BOOTSTRAP"

# The suite's numerics do not depend on the CPU it runs on: fp32 unless a test asks for bf16 (with
# precision=auto a CPU with AMX would train in bf16, one without in fp32). Learners the tests start
# as child processes inherit it. tests/unit/training/test_precision.py tests auto itself.
os.environ.setdefault("STREAM_LEARNER_TRAINING__PRECISION", "fp32")
# A learner's publisher yields the CPU to its trainer (publish.nice 19). In the suite the other
# workers' tests keep both cores busy, and would starve every publish the tests wait for: publishers
# compete as equals here. test_publisher.py checks the setting itself.
os.environ.setdefault("STREAM_LEARNER_PUBLISH__NICE", "0")

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs four workers on a 2-core machine: one torch thread each (and in the learner
    # processes they start), or eight threads would spin against each other for two cores
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)


_tiny_model_owned: list[Path] = []


def pytest_configure(config: pytest.Config) -> None:
    """Where the session's tiny model (:mod:`tests.support.tiny_model`) goes: chosen once, by the controller,
    before xdist starts its workers (they inherit ``$SL_TESTS_TINY_MODEL``); built on first use."""
    if not os.environ.get(tiny_model.ENV):
        _tiny_model_owned.append(tiny_model.choose_dir().parent)
    if zygote.ENV not in os.environ:
        _tiny_model_owned.append(Path(zygote.choose_path()).parent)


def pytest_unconfigure(config: pytest.Config) -> None:
    for path in _tiny_model_owned:
        shutil.rmtree(path, ignore_errors=True)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The long end-to-end cases (marked ``slow``) first, at the heads of the xdist workers' shares;
    the cases that wait before those that compute (``tests/support/ordering.py``).

    ``--dist worksteal`` hands each worker a contiguous share of the collection and lets idle workers
    steal from the *end* of the others' shares. Collected in file order, a 60–90 s case could start
    in the last minute and end the run alone; put at the heads of the shares, the long cases start at
    once, side by side, and the short ones fill in around them (longest first: the usual heuristic
    for scheduling jobs on parallel machines). Only the order changes, never what runs.
    """
    workers = int(getattr(config, "workerinput", {}).get("workercount", 1))
    items[:] = suite_order(items, _kind, workers, _seconds)


def _seconds(item: pytest.Item) -> float | None:
    """What a long case takes, as its ``slow(seconds=…)`` says: measured in a run of the whole suite
    (2-core Xeon, four workers, 2026-12-07), so with the others beside it; None if it does not say."""
    marker = item.get_closest_marker("slow")
    return None if marker is None else marker.kwargs.get("seconds")


def _kind(item: pytest.Item) -> Kind:
    """Long: marked ``slow`` (``slow(waits=True)``: mostly waits on a broker, a timer or a paced
    learner process). Short and waiting: the end-to-end cases of ``tests/integration/``."""
    marker = item.get_closest_marker("slow")
    if marker is not None:
        return Kind.LONG_WAITS if marker.kwargs.get("waits") else Kind.LONG_BUSY
    return Kind.WAITS if "integration" in item.path.parts else Kind.BUSY


def pytest_runtest_setup(item: pytest.Item) -> None:
    """``@pytest.mark.cuda(gpus=N)``: skipped, saying why, on a machine with fewer than N CUDA GPUs
    (N = 1 by default); ``benchmarks/gpu_check.sh`` runs them (``-m cuda``) where the GPUs are."""
    marker = item.get_closest_marker("cuda")
    if marker is None:
        return
    import torch

    need, have = int(marker.kwargs.get("gpus", 1)), torch.cuda.device_count()
    if have < need:
        pytest.skip(f"needs {need} CUDA GPU(s), this machine has {have}: benchmarks/gpu_check.sh runs it")


def _docker_available() -> bool:
    """Whether a Docker engine answers, checked cheaply (no engine → no socket, no DOCKER_HOST)."""
    if not os.environ.get("DOCKER_HOST") and not Path("/var/run/docker.sock").exists():
        return False
    try:
        import docker

        docker.from_env(timeout=3).ping()
    except Exception:
        return False
    return True


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``bootstrap.servers`` of a Kafka-protocol broker for the whole session."""
    external = os.environ.get(BOOTSTRAP_ENV)
    if external:
        yield external
        return
    if _docker_available():
        from testcontainers.kafka import KafkaContainer

        with KafkaContainer() as kafka:
            yield kafka.get_bootstrap_server()
        return
    log_path = tmp_path_factory.mktemp("tansu") / "tansu.log"
    with LocalBroker(log_path=log_path) as broker:
        yield broker.bootstrap_servers


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    """A SeaweedFS S3 server for the whole session (a test may stop it; :func:`s3_bucket` revives it)."""
    server = SeaweedS3(tmp_path_factory.mktemp("seaweedfs")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(s3_server: SeaweedS3) -> str:
    """A new, empty bucket on :func:`s3_server`."""
    s3_server.start()  # no-op when running; revives it if an earlier test left it stopped
    return s3_server.make_bucket(f"test-{uuid.uuid4().hex[:16]}")


@pytest.fixture
def unique_topic() -> Callable[[str], str]:
    """Factory of topic names no other test uses: ``unique_topic("events")`` → ``events-1a2b3c4d…``."""

    def make(prefix: str = "test") -> str:
        return f"{prefix}-{uuid.uuid4().hex[:12]}"

    return make


@pytest.fixture
def prometheus_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., object]]:
    """Factory of real Prometheus servers (:class:`tests.support.prometheus.PrometheusServer`), stopped at
    the end.

    ``prometheus_server(["127.0.0.1:9108"], rule_files=[...])`` starts one scraping those targets every
    second as job ``stream-learner`` and returns it once ready.
    """
    # imported here: this fixture was appended, the module's imports stay as they were
    from tests.support.prometheus import PrometheusServer

    servers: list[PrometheusServer] = []

    def start(targets: list[str], **options: object) -> PrometheusServer:
        server = PrometheusServer(tmp_path_factory.mktemp("prometheus"), targets, **options)  # type: ignore[arg-type]
        servers.append(server)
        return server.start()

    try:
        yield start
    finally:
        for server in servers:
            server.stop()
