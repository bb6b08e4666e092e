"""Wiring and lifecycle: three threads joined by explicit queues, plus the HTTP endpoint.

::

    consumer thread ──fresh_queue (bounded)──▶ trainer thread ──publish_queue (1)──▶ publisher thread
          ▲                                                                              │
          └──────────────────────────── commit_queue (offsets of durable versions) ◀─────┘

In a data-parallel group (started by ``torchrun``, see ``distributed.py``) every rank runs these
threads on its share of the partitions, except the publisher: rank 0 alone publishes the group's
snapshots and commits their offsets.

Stopping (:meth:`Learner.stop`) runs in this order so that no event is lost or counted twice:
close the intake (the consumer stops fetching) → the trainer finishes its step and hands over a final
snapshot → the publisher publishes it and queues its offsets → the consumer commits them and closes.
"""

from __future__ import annotations

import logging
import queue
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from stream_learner.core.config import ConfigError, Settings
from stream_learner.core.events import InvalidEvent, LabelSet, TokenizedEvent, parse_event
from stream_learner.core.intake import Tokenize
from stream_learner.core.model import check_max_length, load_model, load_tokenizer
from stream_learner.service.consumer import EventConsumer
from stream_learner.service.limits import MiB, memory_budget
from stream_learner.service.metrics import Metrics, MetricsObserver
from stream_learner.service.publisher import Publisher, load_newest_intact
from stream_learner.service.staging import remove_stale_staging_dirs, staging_dir
from stream_learner.service.storage import check_reachable, open_settings_store
from stream_learner.service.topics import ensure_topics, partition_count, require_topics
from stream_learner.service.versions import CorruptVersion, read_latest, version_dir
from stream_learner.training.distributed import Group, restored_for_rank
from stream_learner.training.engine import pick_device
from stream_learner.training.factory import build_trainer
from stream_learner.training.observers import LoopObserver
from stream_learner.training.state import Snapshot
from stream_learner.training.threads import hand_over_threads

log = logging.getLogger(__name__)


def static_files(model, tokenizer) -> dict[str, bytes]:
    """config.json and the tokenizer files, which every version carries unchanged."""
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        files = {p.name: p.read_bytes() for p in Path(tmp).iterdir() if p.is_file()}
    files["config.json"] = model.config.to_json_string().encode()
    return files


def check_memory(settings: Settings, model: torch.nn.Module) -> None:
    """Fail at start, with the numbers, when the memory bound exceeds ``limits.memory_mib``."""
    budget = memory_budget(settings, model)
    limit = settings.limits.memory_mib * MiB
    if limit and budget.total > limit:
        raise ConfigError(
            f"limits.memory_mib: these settings need up to {budget.describe()}, over the limit of "
            f"{settings.limits.memory_mib:,} MiB; raise limits.memory_mib (and the container's memory) or "
            "lower replay.capacity, kafka.queue_max_batches, kafka.poll_max_messages or model.max_length"
        )
    log.info("memory bound %s", budget.describe())


def load_probe(settings: Settings, tokenizer) -> list[TokenizedEvent]:
    """The probe set (``probe.file``), validated like events and tokenized; [] when none is configured."""
    p = settings.probe
    if not p.file:
        return []
    labels = LabelSet(settings.model.labels)
    events = []
    for n, line in enumerate(Path(p.file).read_bytes().splitlines()[: p.max_events], start=1):
        try:
            events.append(parse_event(line, labels, settings.events.max_text_bytes))
        except InvalidEvent as err:
            raise ConfigError(f"probe.file: line {n} of {p.file} is not a valid event ({err})") from None
    tokens = Tokenize(tokenizer, settings.model.max_length)(events)
    return [
        TokenizedEvent(input_ids=ids, label=e.label, pair_start=start, partition=-1, offset=i, timestamp_ms=0)
        for i, (e, (ids, start)) in enumerate(zip(events, tokens, strict=True))
    ]


# the config.json keys that fix a model's weight shapes (BERT-like names first, then other families')
ARCHITECTURE_KEYS = (
    "model_type",
    "num_hidden_layers",
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "embedding_size",
    "vocab_size",
    "max_position_embeddings",
    "type_vocab_size",
    "n_layer",
    "n_layers",
    "num_layers",
    "n_embd",
    "n_head",
    "n_heads",
    "dim",
    "hidden_dim",
    "d_model",
    "d_ff",
)
LAYER_KEYS = ("num_hidden_layers", "n_layer", "n_layers", "num_layers")  # what model.num_hidden_layers sets


def check_lineage_matches(
    settings: Settings,
    manifest: dict,
    where: str,
    stored_config: dict | None = None,
    model_config: object | None = None,
) -> None:
    """A version trained from another base model, label set or architecture cannot be resumed with
    these settings: one line naming the setting, not a state_dict mismatch at load.

    ``stored_config`` is the version's ``config.json``, ``model_config`` the config of the model these
    settings loaded (a ``PretrainedConfig`` or a dict); their :data:`ARCHITECTURE_KEYS` must agree.
    """
    m = settings.model
    if manifest["base_model"] != m.name_or_path or manifest["labels"] != m.labels:
        raise ConfigError(
            f"model.name_or_path / model.labels: {where} holds versions of {manifest['base_model']!r} with "
            f"labels {manifest['labels']}, these settings say {m.name_or_path!r} with {m.labels}; use the "
            "same, or a new publish.storage_url for a new model"
        )
    if stored_config is None or model_config is None:
        return
    loaded = model_config if isinstance(model_config, dict) else model_config.to_dict()
    differ = [
        k for k in ARCHITECTURE_KEYS if k in stored_config and k in loaded and stored_config[k] != loaded[k]
    ]
    if not differ:
        return
    shown = ", ".join(f"{k} {stored_config[k]!r} there, {loaded[k]!r} here" for k in differ)
    if all(k in LAYER_KEYS for k in differ):
        raise ConfigError(
            f"model.num_hidden_layers: {where} holds versions of a model with {shown}; set "
            f"model.num_hidden_layers to {stored_config[differ[0]]}, or use a new publish.storage_url for a "
            "new architecture"
        )
    named = "model.name_or_path"
    if set(differ) & set(LAYER_KEYS):
        named += " / model.num_hidden_layers"
    raise ConfigError(
        f"{named}: {where} holds versions of another architecture than the model these settings "
        f"load ({shown}); use the same model, or a new publish.storage_url for a new one"
    )


class Learner:
    """One online learner: construct, :meth:`start`, then :meth:`stop` (or :meth:`wait`).

    ``observers`` hear of every training step beside the metrics (the bench's step log).
    """

    def __init__(
        self, settings: Settings, metrics: Metrics | None = None, observers: Sequence[LoopObserver] = ()
    ) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.observers = list(observers)
        self.error: BaseException | None = None
        self.restored_version: int | None = None
        self._threads: dict[str, threading.Thread] = {}
        self._stopped = threading.Event()
        self._stop_lock = threading.Lock()
        self.stopped_cleanly = False  # the final stop finished within its grace period
        self._http: ThreadingHTTPServer | None = None
        self._workdir = staging_dir("work")  # a version downloaded to resume from
        self.group = Group.from_env()  # a rank of a torchrun group, or None

    # ------------------------------------------------------------------------------------ start
    def start(self) -> Learner:
        s = self.settings
        # torch's threads go to the trainer thread: this one builds, the trainer computes (threads.py)
        threads = hand_over_threads()
        if s.http.enabled:
            self._start_http()
        remove_stale_staging_dirs()  # a killed learner's staged version: ≈ 3 × the model each
        self.store = open_settings_store(s)
        check_reachable(self.store)  # a missing bucket or a refused endpoint in plain words, before the model
        if s.kafka.create_topics:
            ensure_topics(
                s.kafka.librdkafka(),
                {
                    s.kafka.topic: s.kafka.topic_partitions,
                    s.kafka.dead_letter_topic: s.kafka.topic_partitions,
                },
            )
        else:  # they must exist: a missing dead-letter topic would show only at the first bad event
            require_topics(
                s.kafka.librdkafka(),
                {s.kafka.topic: "kafka.topic", s.kafka.dead_letter_topic: "kafka.dlq_topic"},
            )
        partitions = None
        if self.group is not None:
            self.group.start(s.distributed, self.group.device(pick_device(s.training.device)))
            partitions = self.group.partitions(partition_count(s.kafka.librdkafka(), s.kafka.topic))
            log.info(
                "rank %d of %d consumes partitions %s", self.group.rank, self.group.world_size, partitions
            )
        tokenizer = load_tokenizer(s.model)
        loaded = load_model(s.model, s.training.seed)
        check_max_length(s.model, loaded.model)
        check_memory(s, loaded.model)
        probe = load_probe(s, tokenizer)
        restored = self._restore(loaded.model.config)
        if restored is not None and self.group is not None:
            restored = restored_for_rank(restored, self.group)

        self.fresh_queue: queue.Queue = queue.Queue(maxsize=s.kafka.queue_max_batches)
        self.publish_queue: queue.Queue = queue.Queue(maxsize=1)
        self.commit_queue: queue.Queue = queue.Queue()
        self.intake_closed = threading.Event()
        self.trainer_stop = threading.Event()
        self.publisher_stop = threading.Event()
        self.publish_failed = threading.Event()  # the publisher gave up (fenced out): no final handoff

        self.trainer = build_trainer(
            s,
            tokenizer,
            loaded=loaded,
            fresh_queue=self.fresh_queue,
            publish_queue=self.publish_queue,
            stop=self.trainer_stop,
            observers=[MetricsObserver(self.metrics), *self.observers],
            restored=restored,
            probe=probe,
            publish_failed=self.publish_failed,
            group=self.group,
            threads=threads,
        )
        precision = self.trainer.engine.precision
        for name in ("fp32", "bf16"):
            self.metrics.training_precision.labels(name).set(float(name == precision.name))
        publishes = self.group is None or self.group.is_root
        self.publisher = Publisher(
            s,
            self.store,
            static_files(loaded.model, tokenizer),
            self.publish_queue,
            self.commit_queue,
            self.metrics,
            self.publisher_stop,
            parent=self.restored_version,
            latest=(self._latest_version, self._latest_etag),
            on_fatal=self._publisher_failed,
            latest_probe_accuracy=self._latest_probe_accuracy,
        )
        self.consumer = EventConsumer(
            s,
            tokenizer,
            self.fresh_queue,
            self.commit_queue,
            self.metrics,
            self.intake_closed,
            start_offsets=restored.offsets if restored else None,
            partitions=partitions,
        )
        if restored is not None:
            self.metrics.latest_version.set(restored.version)
        self._spawn("consumer", self.consumer.run)
        self._spawn("trainer", self.trainer.run)
        if publishes:
            self._spawn("publisher", self.publisher.run)
        return self

    def _restore(self, model_config: object | None = None) -> Snapshot | None:
        """Load LATEST or, if it is corrupt, the nearest intact version on its parent chain (never another
        branch: ``publisher.load_newest_intact``), verifying every file's sha256. ``model_config``, the
        loaded model's config, is checked against the version's ``config.json`` (same architecture)."""
        self._latest_version, self._latest_etag = read_latest(self.store)
        self._latest_probe_accuracy: float | None = None
        found = load_newest_intact(self.store, Path(self._workdir.name), on_corrupt=self._refuse_corrupt)
        if found is None:
            log.info("no published version in %s: starting from the pretrained model", self.store.describe())
            return None
        restored, manifest = found
        import json

        stored = Path(self._workdir.name) / version_dir(restored.version) / "config.json"  # sha256-verified
        try:
            stored_config = json.loads(stored.read_text()) if "config.json" in manifest["files"] else None
        except (OSError, ValueError):
            stored_config = None
        where = self.store.describe()
        check_lineage_matches(
            self.settings, manifest, where, stored_config=stored_config, model_config=model_config
        )
        version = restored.version
        self.restored_version = version
        self._latest_probe_accuracy = manifest.get("metrics", {}).get("probe_accuracy")
        log.info(
            "resuming from version %d (%d events, offsets %s)",
            version,
            manifest["events_trained"],
            manifest["offsets"],
        )
        return restored

    def _refuse_corrupt(self, err: CorruptVersion) -> None:
        self.metrics.corrupt_versions.inc()
        log.error("refusing %s; falling back along LATEST's parent chain", err)

    def _spawn(self, name: str, target: Callable[[], None]) -> None:
        def guarded() -> None:
            try:
                target()
            except BaseException as err:
                log.exception("%s thread failed", name)
                self._fail(err)
                return
            if not self.intake_closed.is_set():  # the trainer left on its own: another rank stopped
                threading.Thread(target=self.stop, name="stream-learner-stop", daemon=True).start()

        t = threading.Thread(target=guarded, name=f"stream-learner-{name}", daemon=True)
        self._threads[name] = t
        t.start()

    def _publisher_failed(self, err: BaseException) -> None:
        self.publish_failed.set()
        self._fail(err)

    def _fail(self, err: BaseException) -> None:
        if self.error is None:
            self.error = err
        # stop from another thread: the failing thread may be one that stop() joins
        threading.Thread(target=self.stop, name="stream-learner-stop", daemon=True).start()

    # ------------------------------------------------------------------------------------- stop
    def stop(self, timeout: float | None = None) -> bool:
        """Close the intake, let the trainer hand over a final snapshot, publish it, commit, close.

        Takes at most ``timeout`` seconds (default ``publish.stop_timeout_s``, the grace period the
        Helm chart gives the pod). Past it, storage retries are abandoned and the threads are left
        behind: nothing is lost, the next start resumes from the last durable version. Returns True
        when everything finished in time. Safe to call from any thread, more than once.
        """
        with self._stop_lock:
            if self._stopped.is_set() or not self._threads:
                self._stopped.set()
                return self.stopped_cleanly
            timeout = self.settings.publish.stop_timeout_s if timeout is None else timeout
            deadline = time.monotonic() + timeout
            left = lambda: max(deadline - time.monotonic(), 0.1)  # noqa: E731
            self.intake_closed.set()  # the consumer stops fetching but keeps committing
            self.trainer_stop.set()
            self._threads["trainer"].join(left())
            self.publisher_stop.set()
            publisher = self._threads.get("publisher")  # none on ranks other than 0 of a group
            if publisher is not None:
                publisher.join(left())
            if publisher is not None and publisher.is_alive():
                self.publisher.abort.set()  # stop retrying storage writes: the grace period is over
                log.error(
                    "graceful stop took over %.0fs: the final version was not published; the next start "
                    "resumes from version %s (raise publish.stop_timeout_s if storage is slow)",
                    timeout,
                    self.publisher.latest,
                )
            self.consumer.close_event.set()
            self._threads["consumer"].join(left())
            if self._http is not None:
                self._http.shutdown()
                self._http.server_close()
            self.stopped_cleanly = not any(t.is_alive() for t in self._threads.values())
            self._stopped.set()
            log.info("stopped%s", "" if self.stopped_cleanly else " (grace period exceeded)")
            return self.stopped_cleanly

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the learner has stopped; True if it did within ``timeout``."""
        return self._stopped.wait(timeout)

    def wait_until(self, condition: Callable[[], bool], timeout: float, poll_s: float = 0.2) -> bool:
        """Poll ``condition`` until true, the learner fails, or ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.error is not None:
                raise RuntimeError(f"learner failed: {self.error}") from self.error
            if condition():
                return True
            time.sleep(poll_s)
        return False

    # ----------------------------------------------------------------------------------- health
    @property
    def healthy(self) -> bool:
        return self.error is None and all(t.is_alive() for t in self._threads.values())

    def readiness(self) -> tuple[bool, str]:
        """(ready, why): healthy, partitions assigned, and storage writes succeeding (not degraded)."""
        if not self._threads:
            return False, "starting"
        if not self.healthy:
            return False, "unhealthy"
        if self.publisher.degraded.is_set():
            return False, "degraded: storage writes failing, retrying"
        if not self.consumer.assigned.is_set():
            return False, "waiting for partitions"
        return True, "ready"

    @property
    def ready(self) -> bool:
        return self.readiness()[0]

    def _start_http(self) -> None:
        learner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._send(200, generate_latest(learner.metrics.registry), CONTENT_TYPE_LATEST)
                elif path == "/healthz":
                    ok = learner.healthy or not learner._threads  # healthy while starting up
                    self._send(200 if ok else 503, b"ok\n" if ok else b"unhealthy\n")
                elif path == "/readyz":
                    ready, why = learner.readiness()
                    self._send(200 if ready else 503, f"{why}\n".encode())
                else:
                    self._send(404, b"not found\n")

            def _send(self, code: int, body: bytes, ctype: str = "text/plain; charset=utf-8") -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:  # scrapes are not news
                pass

        h = self.settings.http
        # the ranks of one node side by side: each on the port after the previous one's
        port = h.port + (self.group.local_rank if self.group is not None and h.port else 0)
        try:
            self._http = ThreadingHTTPServer((h.host, port), Handler)
        except OSError as err:
            rank = f" (http.port + local rank {self.group.local_rank})" if port != h.port else ""
            raise ConfigError(
                f"http: cannot listen on {h.host}:{port}{rank}: {err.strerror}; set http.port to a free "
                "port (0: any), or stop what listens there"
            ) from None
        self.http_port = self._http.server_address[1]
        threading.Thread(target=self._http.serve_forever, name="stream-learner-http", daemon=True).start()
