"""The serving part of ``stream-learner bench`` (issue 19): how fast the inference server answers, what a
version swap costs the requests in flight, and how long an event takes from its producer to a served
prediction.

1. **Requests/s and latency.** An :class:`~stream_learner.service.serving.server.InferenceServer` in
   this process serves a version of the bench's model, published by the learner's own
   :class:`~stream_learner.service.publisher.Publisher` to a temporary local store. Closed-loop HTTP
   clients (``bench_clients.py``, in a process of their own) send one text of the bench's data per
   request, at 1 and at N concurrent clients. Side by side, alternating with it, **the hand-written
   loop**, the anchor a good engineer writes: the same version's directory loaded with plain
   ``AutoTokenizer`` and ``AutoModelForSequenceClassification``, one forward pass per request, no
   batching, the requests taken one at a time in their order of arrival (a FIFO queue to one thread
   that has the cores), its clients threads calling it directly: no HTTP, no JSON. The loop and its
   clients run in a process of their own: torch's threads are an OpenMP team per computing thread,
   and a second team in the server's process (the loop's, idle or not) makes libgomp throttle both
   (``training/threads.py``) — measured here, the server fell from 139 to 79 requests/s at 1 client
   once the loop had computed beside it.
   Both are timed the same way: a request's latency runs from the client's call to its answer,
   requests/s counts the answers over the measured span, which starts after a warm-up. Each is run
   ``repeats`` times, alternately; the fastest run (requests/s) counts, every run is kept.
2. **Latency across swaps.** N clients while LATEST moves to a newer version, ``swaps`` times, each
   after the previous version was swapped in and a pause. The versions were published beforehand by
   the same publisher, and LATEST is written as the publisher's last step writes it. So what is
   measured is the server's own work (a poll, the download with every file's sha256 checked, the
   load and warm-up on the follower thread, the swap between two batches), not the publisher's,
   which runs in the learner's process. A request is *across a swap* when it was in flight at some
   moment between LATEST's move and the swap; their p99 and max are reported beside the other
   requests' of the same run.
3. **The freshness chain** (event → learned → published → served), for each cadence of ``cadences``:
   the demo's (a version every 20 steps or 300 s, the server polling LATEST every 5 s) and a fast
   one. A local broker, a :class:`~stream_learner.service.app.Learner` and an InferenceServer that
   follows its store, both in this process, on the same cores. A backlog first (the trainer warms
   up), then events produced at a steady pace, without end; the ``chain_events`` after the backlog
   are measured, until a served version holds them all. Per event: its produce time (its Kafka
   timestamp) → the end of the step that learned it → the moment the first version holding it was
   published (LATEST moved) → the moment the first version holding it began to answer (swapped in by
   the server's batcher). One watcher polls the publisher and the server every 20 ms, so both moments
   are seen on the same clock, at most 20 ms late.

Every part prints what it is doing; ``ServingBenchConfig.quick`` is the smoke run's size.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import queue
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console

from stream_learner.core.config import Settings
from stream_learner.core.model import load_tokenizer
from stream_learner.service.metrics import ServingMetrics
from stream_learner.service.serving.server import InferenceServer
from stream_learner.service.storage import ObjectStore, open_settings_store
from stream_learner.service.versions import LATEST, read_manifest, version_dir
from stream_learner.tools.bench_clients import infer_body, run_clients
from stream_learner.tools.bench_report import percentiles
from stream_learner.tools.harness import Sampler, summarize_steps
from stream_learner.training.factory import build_trainer
from stream_learner.training.observers import StepLog
from stream_learner.training.threads import hand_over_threads, process_threads, take_threads

# the demo's cadence: `stream-learner demo` publishes every 20 steps (its --every-steps), else after
# publish.every_seconds' default; a server polls LATEST at serving.poll_interval_s' default
DEMO_CADENCE = {"every_steps": 20, "every_seconds": 300.0, "poll_interval_s": 5.0}
# as fresh as these 2 cores sustain: a version every 8 steps or 2 s (a publish takes about 1 s here), a
# poll every 0.2 s (one small read of LATEST)
FAST_CADENCE = {"every_steps": 8, "every_seconds": 2.0, "poll_interval_s": 0.2}


@dataclass
class ServingBenchConfig:
    """What the serving part measures, and how much of it (recorded in the bench's JSON)."""

    clients: tuple[int, ...] = (1, 16)  # concurrent clients of each requests/s and latency measurement
    seconds: float = 8.0  # measured span of each, after the warm-up
    warmup_seconds: float = 1.0
    repeats: int = 2  # server and hand-written loop alternate so many times; the fastest run counts
    swaps: int = 4  # versions swapped in under load
    swap_clients: int = 16
    swap_pause_seconds: float = 2.0  # between two swaps, and before the first
    swap_poll_interval_s: float = 0.2  # the server's poll of LATEST in the swap run
    cadences: dict[str, dict[str, float]] = field(
        default_factory=lambda: {"demo": dict(DEMO_CADENCE), "fast": dict(FAST_CADENCE)}
    )
    chain_backlog_events: int = 128  # produced before the learner starts: its warm-up
    chain_events: int = 900  # paced events measured after the backlog: ≈ 30 s, a few of the demo's versions
    chain_timeout_s: float = 900.0

    @classmethod
    def quick(cls, **changes: Any) -> ServingBenchConfig:
        """The smoke run's size: sane numbers, not figures; the freshness chain at the fast cadence only."""
        base: dict[str, Any] = {
            "clients": (1, 4),
            "seconds": 1.0,
            "warmup_seconds": 0.3,
            "repeats": 1,
            "swaps": 2,
            "swap_clients": 4,
            "swap_pause_seconds": 0.3,
            # one chain: a second one would run the same code with other numbers, for ≈ 17 s more
            "cadences": {"fast": dict(FAST_CADENCE)},
            "chain_backlog_events": 24,
            "chain_events": 24,
            "chain_timeout_s": 300.0,
        }
        return cls(**{**base, **changes})


# ====================================================================================== arithmetic


def summarize_requests(
    started: Sequence[float], ended: Sequence[float], window: tuple[float, float]
) -> dict[str, Any]:
    """Requests/s and latency (ms) over ``window``: requests/s counts the answers that came inside it,
    the latency is that of the requests sent and answered inside it (a request cut by either end is
    only counted in the rate: the span of a closed loop is full of requests, none of them whole)."""
    lo, hi = window
    latencies = [(e - s) * 1000 for s, e in zip(started, ended, strict=True) if s >= lo and e <= hi]
    answered = sum(lo <= e <= hi for e in ended)
    return {
        "seconds": hi - lo,
        "requests": answered,
        "requests_per_second": answered / (hi - lo),
        "latency_ms": percentiles(latencies),
    }


def across_swaps(
    started: Sequence[float],
    ended: Sequence[float],
    swaps: Sequence[tuple[float, float]],
    window: tuple[float, float],
) -> dict[str, Any]:
    """Latency (ms) of the requests in flight at some moment of a swap (between LATEST's move and the
    version's first batch: ``swaps``' intervals), against the others answered in ``window``."""
    lo, hi = window
    across, others = [], []
    for s, e in zip(started, ended, strict=True):
        if any(s < b and e > a for a, b in swaps):
            across.append((e - s) * 1000)
        elif s >= lo and e <= hi:
            others.append((e - s) * 1000)
    return {"across_ms": percentiles(across), "others_ms": percentiles(others)}


def freshness_chain(
    events: Sequence[tuple[int, float, float]],
    published: Sequence[tuple[float, int]],
    served: Sequence[tuple[float, int]],
) -> dict[str, Any]:
    """Per event, the links of the chain, and their p50 / p99 / max in seconds.

    ``events`` are (offset, produced, learned): its Kafka timestamp and the end of the step that
    learned it. ``published`` and ``served`` are (moment first seen, covered offset) of each version
    in the order seen: a version holds every event below its covered offset (the Kafka offset to
    resume from). An event is published at the first published version that holds it, and served at
    the first served one; an event that no version holds yet has neither and counts in ``missing``.
    """
    links: dict[str, list[float]] = {
        "to_learned_s": [],
        "to_published_s": [],
        "to_served_s": [],
        "learned_to_published_s": [],
        "published_to_served_s": [],
    }
    missing = 0
    for offset, produced, learned in events:
        at_published = next((at for at, covered in published if covered > offset), None)
        at_served = next((at for at, covered in served if covered > offset), None)
        if at_published is None or at_served is None:
            missing += 1
            continue
        links["to_learned_s"].append(learned - produced)
        links["to_published_s"].append(at_published - produced)
        links["to_served_s"].append(at_served - produced)
        links["learned_to_published_s"].append(at_published - learned)
        links["published_to_served_s"].append(at_served - at_published)
    return {"events": len(events), "missing": missing, **{k: percentiles(v) for k, v in links.items()}}


# ======================================================================================== harnesses


def publish_versions(settings: Settings, count: int) -> ObjectStore:
    """``count`` versions of the model (as loaded, untrained) published by the learner's publisher to
    ``publish.storage_url``: a real manifest and a checked sha256 for every file, LATEST moved."""
    from stream_learner.service.app import static_files
    from stream_learner.service.publisher import Publisher

    store = open_settings_store(settings)
    tokenizer = load_tokenizer(settings.model)
    trainer = build_trainer(settings, tokenizer)
    snapshot = trainer.snapshot()
    publisher = Publisher.standalone(settings, store, static_files(trainer.engine.model, tokenizer))
    for _ in range(count):
        publisher.publish_version(snapshot)
    return store


def point_latest(store: ObjectStore, version: int) -> None:
    """LATEST names ``version``, written as the publisher's last step writes it."""
    store.put(LATEST, f"{version_dir(version)}\n".encode())


def histogram_mean(histogram: Any) -> float | None:
    """The mean of a Prometheus histogram's observations (None before any)."""
    samples = {s.name.rsplit("_", 1)[-1]: s.value for s in histogram.collect()[0].samples}
    return samples["sum"] / samples["count"] if samples.get("count") else None


def wait_for(condition: Callable[[], bool], timeout: float, what: str, poll_s: float = 0.005) -> None:
    """Return once ``condition()`` holds; TimeoutError naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout:.0f} s")
        time.sleep(poll_s)


Rows = dict[str, list[Any]]


class HandWrittenLoop:
    """The anchor: plain transformers loaded from a version's directory, one forward pass per request,
    requests taken one at a time in their order of arrival by a thread that has the cores. Call it
    from any thread: it returns the text's probabilities once computed."""

    def __init__(self, directory: Path, max_length: int, threads: int) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(directory)
        self.model = AutoModelForSequenceClassification.from_pretrained(directory).eval()
        self.max_length, self.threads = max_length, threads
        self.inbox: queue.Queue[tuple[str, Callable[[np.ndarray], None]] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="hand-written-loop", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        take_threads(self.threads)
        while (item := self.inbox.get()) is not None:
            text, reply = item
            encoded = self.tokenizer(text, truncation=True, max_length=self.max_length, return_tensors="pt")
            with torch.inference_mode():
                reply(torch.softmax(self.model(**encoded).logits, dim=-1).numpy())

    def __call__(self, text: str) -> np.ndarray:
        answer: list[np.ndarray] = []
        done = threading.Event()
        self.inbox.put((text, lambda probabilities: (answer.append(probabilities), done.set())))
        done.wait()
        return answer[0]

    def close(self) -> None:
        self.inbox.put(None)
        self._thread.join()


# the hand-written loop of this process, when it is the loop's process (start_loop_process)
_loop: HandWrittenLoop | None = None


def start_loop_process(directory: Path, max_length: int, threads: int) -> None:
    """Initializer of the loop's process: this thread computes nothing, the loop's takes the cores."""
    global _loop
    hand_over_threads()
    _loop = HandWrittenLoop(directory, max_length, threads)


def drive_loop_process(
    texts: Sequence[str], clients: int, seconds: float
) -> tuple[Rows, tuple[float, float]]:
    """In the loop's process: :func:`drive_loop` on its loop for ``seconds``."""
    assert _loop is not None, "start_loop_process first"
    return drive_loop(_loop, texts, clients, lambda: time.sleep(seconds))


@contextlib.contextmanager
def loop_process(directory: Path, max_length: int, threads: int) -> Iterator[ProcessPoolExecutor]:
    """A spawned process holding the hand-written loop of ``directory`` (:func:`start_loop_process`)."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(
        1, mp_context=context, initializer=start_loop_process, initargs=(directory, max_length, threads)
    ) as pool:
        yield pool


def drive_server(
    port: int, path: str, bodies: Sequence[bytes], clients: int, during: Callable[[], None]
) -> tuple[Rows, tuple[float, float]]:
    """``clients`` HTTP clients (``bench_clients.run_clients``, a spawned process) sending ``bodies``
    while ``during()`` runs; their requests, and the span from every client connected to the stop."""
    ctx = multiprocessing.get_context("spawn")
    ready, stop = ctx.Event(), ctx.Event()
    receive, send = ctx.Pipe(duplex=False)
    process = ctx.Process(
        target=run_clients, args=(port, path, list(bodies), clients, ready, stop, send), daemon=True
    )
    process.start()
    send.close()  # the child's end: recv() sees the end if the child dies without sending
    rows = None
    try:
        deadline = time.monotonic() + 120
        while not ready.wait(0.1):
            if not process.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(
                    f"the {clients} HTTP clients did not connect (exit code {process.exitcode})"
                )
        began = time.monotonic()
        during()
        stopped = time.monotonic()
    finally:
        stop.set()
        with contextlib.suppress(EOFError):  # the process died: no results, said below
            rows = receive.recv() if receive.poll(300) else None
        process.join(30)
    if rows is None:
        raise RuntimeError("the HTTP clients' process ended without their results")
    if rows["errors"]:
        raise RuntimeError(f"HTTP clients failed: {'; '.join(rows['errors'][:3])}")
    return rows, (began, stopped)


def drive_loop(
    call: Callable[[str], Any], texts: Sequence[str], clients: int, during: Callable[[], None]
) -> tuple[Rows, tuple[float, float]]:
    """:func:`drive_server` for a function called directly: ``clients`` threads of this process, each
    calling ``call`` on ``texts`` (client k from text ``k × len(texts) // clients`` on) in a closed loop."""
    stop = threading.Event()
    rows: list[tuple[float, float]] = []
    lock = threading.Lock()

    def client(k: int) -> None:
        mine, i = [], k * len(texts) // clients
        while not stop.is_set():
            started = time.monotonic()
            call(texts[i % len(texts)])
            mine.append((started, time.monotonic()))
            i += 1
        with lock:
            rows.extend(mine)

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(clients)]
    began = time.monotonic()
    for thread in threads:
        thread.start()
    during()
    stopped = time.monotonic()
    stop.set()
    for thread in threads:
        thread.join()
    rows.sort()
    return {"started": [r[0] for r in rows], "ended": [r[1] for r in rows]}, (began, stopped)


# ==================================================================================== measurements


def measure_requests(
    cfg: ServingBenchConfig,
    server: InferenceServer,
    loop: ProcessPoolExecutor,
    texts: Sequence[str],
    console: Console,
) -> dict[str, Any]:
    """Part 1 of the module docstring: the server and the hand-written loop at each client count."""
    path = f"/v2/models/{server.settings.serving.model_name}/infer"
    bodies = [infer_body(t) for t in texts]
    span = cfg.warmup_seconds + cfg.seconds
    runs: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for repeat in range(cfg.repeats):
        for clients in cfg.clients:
            # alternate who goes first: a shared machine's speed drifts over minutes
            for side in ("server", "hand_written") if repeat % 2 == 0 else ("hand_written", "server"):
                console.print(f"  {side.replace('_', '-')}: {clients} client(s), {span:.0f} s")
                if side == "server":
                    rows, (began, stopped) = drive_server(
                        server.port, path, bodies, clients, lambda: time.sleep(span)
                    )
                    run = summarize_requests(
                        rows["started"], rows["ended"], (began + cfg.warmup_seconds, stopped)
                    )
                    run["errors"] = sum(status != 200 for status in rows["status"])
                else:
                    rows, (began, stopped) = loop.submit(drive_loop_process, texts, clients, span).result()
                    run = summarize_requests(
                        rows["started"], rows["ended"], (began + cfg.warmup_seconds, stopped)
                    )
                runs.setdefault((side, clients), []).append(run)
    out: dict[str, Any] = {}
    for clients in cfg.clients:
        by_side = {}
        for side in ("server", "hand_written"):
            best = dict(max(runs[side, clients], key=lambda r: r["requests_per_second"]))
            best["runs"] = [r["requests_per_second"] for r in runs[side, clients]]
            by_side[side] = best
        server_run, loop_run = by_side["server"], by_side["hand_written"]
        out[str(clients)] = {
            **by_side,
            "server_over_hand_written": {
                "requests_per_second": server_run["requests_per_second"] / loop_run["requests_per_second"],
                **{
                    f"{q}_latency": server_run["latency_ms"][q] / loop_run["latency_ms"][q]
                    for q in ("p50", "p99")
                },
            },
        }
    return out


def measure_swaps(
    cfg: ServingBenchConfig,
    server: InferenceServer,
    store: ObjectStore,
    texts: Sequence[str],
    console: Console,
) -> dict[str, Any]:
    """Part 2 of the module docstring: ``swaps`` versions swapped in under ``swap_clients`` clients."""
    path = f"/v2/models/{server.settings.serving.model_name}/infer"
    first = server.batcher.served.version if server.batcher.served else 1
    swaps: list[tuple[float, float]] = []

    def swapping() -> None:
        time.sleep(cfg.warmup_seconds + cfg.swap_pause_seconds)
        for version in range(first + 1, first + 1 + cfg.swaps):
            moved = time.monotonic()
            point_latest(store, version)
            wait_for(
                lambda v=version: server.batcher.served is not None and server.batcher.served.version == v,
                timeout=300,
                what=f"version {version} swapped in",
            )
            swaps.append((moved, time.monotonic()))
            console.print(f"  version {version} swapped in {swaps[-1][1] - moved:.2f} s after LATEST moved")
            time.sleep(cfg.swap_pause_seconds)

    console.print(f"  {cfg.swap_clients} clients, {cfg.swaps} swaps, {cfg.swap_pause_seconds:g} s apart")
    rows, (began, stopped) = drive_server(
        server.port, path, [infer_body(t) for t in texts], cfg.swap_clients, swapping
    )
    window = (began + cfg.warmup_seconds, stopped)
    versions = [int(v) for v in rows["version"] if v is not None]
    return {
        "clients": cfg.swap_clients,
        "swaps": len(swaps),
        "poll_interval_s": server.settings.serving.poll_interval_s,
        # LATEST moved → the version's first batch: the poll's wait, download, sha256, load, warm-up
        "swap_seconds": percentiles([b - a for a, b in swaps]),
        **across_swaps(rows["started"], rows["ended"], swaps, window),
        **summarize_requests(rows["started"], rows["ended"], window),
        "errors": sum(status != 200 for status in rows["status"]),
        "versions_answered": sorted(set(versions)),
    }


class ChainWatch(Sampler):
    """Every 20 ms, on one thread: the versions the publisher has published and the version the server
    answers with, each with the moment it was first seen and the offset of partition 0 it covers."""

    def __init__(
        self,
        published: Callable[[], list[int]],
        manifest: Callable[[int], dict],
        served: Callable[[], Any],
        topic: str,
    ) -> None:
        self._published, self._manifest, self._served, self.topic = published, manifest, served, topic
        self.published: list[tuple[float, int]] = []  # (seen at, covered offset)
        self.served: list[tuple[float, int]] = []
        self._seen: set[int] = set()
        self._serving: int | None = None

    def _covered(self, manifest: dict) -> int:
        return int(manifest["offsets"][self.topic].get("0", 0))

    def check(self) -> None:
        now = time.time()  # the clock of Kafka's timestamps and of the step records
        for version in list(self._published()):  # published first: a version serves only once published
            if version not in self._seen:
                self._seen.add(version)
                self.published.append((now, self._covered(self._manifest(version))))
        served = self._served()
        if served is not None and served.version != self._serving:
            self._serving = served.version
            self.served.append((now, self._covered(served.manifest)))

    def served_covers(self, offset: int) -> bool:
        """Whether a version seen serving holds every event below ``offset``."""
        return any(covered >= offset for _, covered in list(self.served))


class PacedProducer:
    """Produces ``values`` round after round to partition 0, ``rate`` per second, until :meth:`stop`."""

    def __init__(
        self, client_config: dict[str, str], topic: str, values: Sequence[bytes], rate: float
    ) -> None:
        self.client_config, self.topic, self.values, self.rate = client_config, topic, values, rate
        self.produced, self.failed = 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="paced-producer", daemon=True)

    def _delivered(self, err: Any, _msg: Any) -> None:
        if err is not None:
            self.failed += 1

    def _run(self) -> None:
        from confluent_kafka import Producer

        # as service.producer.produce_lines: every ack awaited, 10 ms of batching
        producer = Producer({**self.client_config, "acks": "all", "linger.ms": 10})
        start = time.monotonic()
        while not self._stop.is_set():
            if self._stop.wait(max(start + self.produced / self.rate - time.monotonic(), 0)):
                break
            value = self.values[self.produced % len(self.values)]
            try:
                producer.produce(self.topic, value=value, partition=0, on_delivery=self._delivered)
            except BufferError:  # librdkafka's queue is full: let it send, then try again
                producer.poll(0.1)
                continue
            producer.poll(0)
            self.produced += 1
        producer.flush(30)

    def start(self) -> PacedProducer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def run_chain(
    cadence: dict[str, float],
    settings_for: Callable[..., Settings],
    values: Sequence[bytes],
    cfg: ServingBenchConfig,
    paced_share: float,
    rate: float | None,
) -> dict[str, Any]:
    """Part 3 of the module docstring for one cadence; ``rate`` None: ``paced_share`` × the rate at
    which the learner went through the backlog."""
    from stream_learner.service.app import Learner
    from stream_learner.service.producer import produce_lines
    from stream_learner.service.topics import ensure_topics
    from stream_learner.tools.local_broker import LocalBroker

    backlog, measured = cfg.chain_backlog_events, cfg.chain_events
    with tempfile.TemporaryDirectory(prefix="stream-learner-bench-chain-") as tmp, LocalBroker() as broker:
        topic = f"bench-chain-{uuid.uuid4().hex[:8]}"
        store_dir = Path(tmp, "versions")
        store_dir.mkdir()
        settings = settings_for(
            kafka=broker.kafka_settings(topic),
            publish={
                "storage_url": store_dir.as_uri(),
                "every_steps": int(cadence["every_steps"]),
                "every_seconds": cadence["every_seconds"],
            },
            serving={"host": "127.0.0.1", "port": 0, "poll_interval_s": cadence["poll_interval_s"]},
        )
        k = settings.kafka
        client = k.librdkafka()
        ensure_topics(client, {k.topic: 1, k.dead_letter_topic: 1})
        produce_lines(client, k.topic, [values[i % len(values)] for i in range(backlog)], partition=0)
        log = StepLog()
        learner = Learner(settings, observers=[log]).start()
        server: InferenceServer | None = None
        producer: PacedProducer | None = None
        try:
            server = InferenceServer(settings, ServingMetrics()).start()
            trainer = learner.trainer
            watch = ChainWatch(
                lambda: learner.publisher.published,
                lambda v: read_manifest(learner.store, v),
                lambda: server.batcher.served if server is not None else None,
                topic,
            )
            with watch:
                learner.wait_until(lambda: trainer.counters.events_trained >= backlog, cfg.chain_timeout_s)
                backlog_rate = summarize_steps(log.records, backlog // 4)["events_per_second"]
                rate = rate or paced_share * backlog_rate
                tail = [values[(backlog + i) % len(values)] for i in range(len(values))]
                producer = PacedProducer(client, k.topic, tail, rate).start()
                # the measured events are offsets backlog … backlog + measured - 1
                learner.wait_until(lambda: watch.served_covers(backlog + measured), cfg.chain_timeout_s)
                watch.check()
        finally:
            if producer is not None:
                producer.stop()
            if server is not None:
                server.stop()
            learner.stop()
        for part, error in (("learner", learner.error), ("server", server.error if server else None)):
            if error is not None:
                raise RuntimeError(f"the {part} failed: {error}") from error
        if not watch.served_covers(backlog + measured):
            raise TimeoutError(
                f"no served version held the {measured} paced events within {cfg.chain_timeout_s:.0f} s"
            )

    events = [
        (e.offset, e.timestamp_ms / 1000, r.ended)
        for r in log.records
        for e in r.fresh
        if backlog <= e.offset < backlog + measured and e.timestamp_ms > 0
    ]
    return {
        **cadence,
        # what a version costs on each side: the learner's publish, the server's load (download and
        # sha256 of each file, load, warm-up)
        "publish_seconds_mean": histogram_mean(learner.metrics.publish_seconds),
        "load_seconds_mean": histogram_mean(server.metrics.load_seconds),
        "paced_events_per_second": rate,
        "backlog_events_per_second": backlog_rate,
        "produced": producer.produced,
        "produce_failures": producer.failed,
        "versions_published": len(watch.published),
        "versions_served": len(watch.served),
        **freshness_chain(events, watch.published, watch.served),
    }


# ============================================================================================= run


@contextlib.contextmanager
def serving_store(
    settings_for: Callable[..., Settings], cfg: ServingBenchConfig
) -> Iterator[tuple[Settings, ObjectStore, Path]]:
    """A temporary local store holding ``swaps + 1`` published versions: the settings that read it,
    the store, and its directory."""
    with tempfile.TemporaryDirectory(prefix="stream-learner-bench-serving-") as tmp:
        root = Path(tmp, "versions")
        root.mkdir()
        settings = settings_for(
            publish={"storage_url": root.as_uri(), "keep_versions": 0},
            serving={"host": "127.0.0.1", "port": 0, "poll_interval_s": cfg.swap_poll_interval_s},
        )
        yield settings, publish_versions(settings, cfg.swaps + 1), root


def run_serving(
    cfg: ServingBenchConfig,
    settings_for: Callable[..., Settings],
    texts: Sequence[str],
    values: Sequence[bytes],
    paced_share: float,
    rate: float | None,
    console: Console,
) -> dict[str, Any]:
    """The three parts of the module docstring; ``settings_for`` is the bench's ``run_settings`` (its
    model and training settings, overridden per section), ``texts`` the requests' texts, ``values``
    the chain's Kafka messages, ``rate`` the chain's pace (None: measured in its first backlog)."""
    results: dict[str, Any] = {}
    console.print(
        f"[bold]serving[/]: {cfg.swaps + 1} versions published to a local store, the server started…"
    )
    with serving_store(settings_for, cfg) as (settings, store, root):
        point_latest(store, 1)
        server = InferenceServer(settings, ServingMetrics()).start()
        try:
            wait_for(lambda: server.ready, timeout=300, what="the server ready")
            console.print(
                "[bold]serving: requests/s and latency[/], the server against the hand-written loop"
            )
            with loop_process(root / version_dir(1), settings.model.max_length, process_threads()) as loop:
                results["requests"] = measure_requests(cfg, server, loop, texts, console)
            console.print("[bold]serving: latency across swaps[/]")
            results["swaps"] = measure_swaps(cfg, server, store, texts, console)
        finally:
            server.stop()
        if server.error is not None:
            raise RuntimeError(f"the server failed: {server.error}") from server.error
    results["freshness_chain"] = {}
    for name, cadence in cfg.cadences.items():
        what = ", ".join(f"{k} {v:g}" for k, v in cadence.items())
        console.print(f"[bold]freshness chain, {name} cadence[/] ({what}): {cfg.chain_events} paced events…")
        t0 = time.perf_counter()
        chain = run_chain(cadence, settings_for, values, cfg, paced_share, rate)
        rate = chain["paced_events_per_second"]  # the same pace for every cadence
        served = chain["to_served_s"]
        console.print(
            f"  event → served p50 {served['p50'] or 0:.2f} s, p99 {served['p99'] or 0:.2f} s at "
            f"{rate:.1f} events/s; done in {time.perf_counter() - t0:.0f} s"
        )
        results["freshness_chain"][name] = chain
    return results
