"""Every Prometheus metric of a learner, defined once.

Each :class:`Learner` owns a :class:`Metrics` on its own registry, so several learners can live in
one process (tests) without colliding. Metric names are the dashboard's and the alerts' contract:
change one here and there together.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterable, Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.registry import Collector

from stream_learner.core.drift import DRIFT_SIGNALS
from stream_learner.core.event_times import EventTimes
from stream_learner.core.events import Reason
from stream_learner.service.versions import CORRUPT, FENCED, INCOMPLETE, REJECTED
from stream_learner.training.observers import LoopObserver, StepRecord

PREFIX = "stream_learner"

# Weight of the newest step in the instantaneous per-second gauges (an exponential moving average over
# the last ~1/EWMA_WEIGHT steps). Averages over a window come from the counters, with rate().
EWMA_WEIGHT = 0.1


def _per_second_help(what: str, counter: str) -> str:
    """Help of an instantaneous per-second gauge, naming the counter whose rate() gives averages."""
    return (
        f"{what} per second of step time, instantaneous: an exponential moving average of the last "
        f"steps' rates (weight {EWMA_WEIGHT:g} for the newest), unchanged while no step runs. Averages "
        f"over a window: rate({counter}) / rate({PREFIX}_step_seconds_sum) per second of step time, "
        f"rate({counter}) per second of wall time (throughput)"
    )


class Metrics:
    """The learner's metrics on ``registry`` (a fresh one when not given)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        if registry is None:
            # resource use (RSS, CPU seconds, open fds) of this process, for the dashboard
            ProcessCollector(registry=r)

        # consumer
        self.events_consumed = Counter(
            f"{PREFIX}_events_consumed", "Messages read from the input topic", registry=r
        )
        self.events_at_max_length = Counter(
            f"{PREFIX}_events_at_max_length",
            "Valid events whose tokens reached model.max_length: cut there (or exactly that long). A large "
            "share of events means the model sees only their beginning: raise model.max_length, or measure "
            "it with `stream-learner eval --sweep model.max_length=…`",
            registry=r,
        )
        self.events_dead_lettered = Counter(
            f"{PREFIX}_events_dead_lettered", "Events sent to the dead-letter topic", ["reason"], registry=r
        )
        self.dead_letter_failures = Counter(
            f"{PREFIX}_dead_letter_failures",
            "Failed deliveries to the dead-letter topic (the consumer waits and retries)",
            registry=r,
        )
        for reason in Reason:
            self.events_dead_lettered.labels(reason=reason.value)
        self.queue_depth = Gauge(
            f"{PREFIX}_queue_depth", "Consumed batches waiting for the trainer", registry=r
        )
        self.dead_letter_recent_share = Gauge(
            f"{PREFIX}_dead_letter_recent_share",
            "Share of the last events.dead_letter_alert_window consumed records that were dead-lettered",
            registry=r,
        )
        self.consumer_paused = Gauge(
            f"{PREFIX}_consumer_paused",
            "Partitions paused because their buffer is full (backpressure, or fairness under a backlog)",
            registry=r,
        )
        self.consumer_pauses = Counter(
            f"{PREFIX}_consumer_pauses", "Times the consumer paused for backpressure", registry=r
        )
        self.consumer_resumes = Counter(
            f"{PREFIX}_consumer_resumes", "Times the consumer resumed after the queue drained", registry=r
        )
        self.consumer_lag = Gauge(
            f"{PREFIX}_consumer_lag", "Messages behind the high watermark", ["partition"], registry=r
        )
        self.offsets_committed = Counter(
            f"{PREFIX}_offset_commits", "Offset commits after a durable version", registry=r
        )

        # trainer. Every step that ran counts in the counters below, a step skipped as non-finite
        # included: what went through the trainer, and (step_seconds) for how long.
        self.events_trained = Counter(
            f"{PREFIX}_events_trained",
            "Fresh events that went through a training step (those of a step skipped as non-finite included)",
            registry=r,
        )
        self.examples_replayed = Counter(
            f"{PREFIX}_examples_replayed",
            "Replayed examples that went through a training step (skipped steps included)",
            registry=r,
        )
        self.examples_trained = Counter(
            f"{PREFIX}_examples_trained",
            "Examples, fresh + replayed, that went through a training step (skipped steps included), "
            "i.e. events_trained + examples_replayed. The trainer's speed while busy: "
            f"rate({PREFIX}_examples_trained_total) / rate({PREFIX}_step_seconds_sum)",
            registry=r,
        )
        self.steps = Counter(f"{PREFIX}_steps", "Optimizer steps taken", registry=r)
        self.nonfinite_skipped = Counter(
            f"{PREFIX}_nonfinite_steps_skipped", "Steps skipped because the loss was not finite", registry=r
        )
        self.weight_checks = Counter(
            f"{PREFIX}_weight_checks",
            "Checks that every rank of a data-parallel group holds the same weights, passed",
            registry=r,
        )
        self.step_seconds = Histogram(
            f"{PREFIX}_step_seconds",
            "Duration of one training step (skipped ones included); its _sum counts the seconds spent in "
            "steps: rate() of it is the share of time the trainer is busy",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )
        self.training_loss = Gauge(f"{PREFIX}_training_loss", "Regularized loss of the last step", registry=r)
        self.l2sp_penalty = Gauge(f"{PREFIX}_l2sp_penalty", "λ‖θ_S − θ0_S‖² at the last step", registry=r)
        self.param_distance = Gauge(f"{PREFIX}_param_distance", "‖θ_S − θ0_S‖ at the last step", registry=r)
        self.prequential_loss = Gauge(
            f"{PREFIX}_prequential_loss",
            "Mean loss of fresh events before learning them (window)",
            registry=r,
        )
        self.prequential_accuracy = Gauge(
            f"{PREFIX}_prequential_accuracy",
            "Accuracy on fresh events before learning them (window)",
            registry=r,
        )
        self.prequential_f1 = Gauge(
            f"{PREFIX}_prequential_f1", "Macro-F1 on fresh events before learning them (window)", registry=r
        )
        self.examples_per_second = Gauge(
            f"{PREFIX}_examples_per_second",
            _per_second_help("Examples (fresh + replay) trained", f"{PREFIX}_examples_trained_total"),
            registry=r,
        )
        self.events_per_second = Gauge(
            f"{PREFIX}_events_per_second",
            _per_second_help("Fresh events trained", f"{PREFIX}_events_trained_total"),
            registry=r,
        )
        self.training_precision = Gauge(
            f"{PREFIX}_training_precision",
            "1 for the precision the trainer runs in (training.precision resolved: fp32 or bf16)",
            ["precision"],
            registry=r,
        )
        self.replay_size = Gauge(f"{PREFIX}_replay_size", "Examples held in the replay buffer", registry=r)
        self.replay_bytes = Gauge(f"{PREFIX}_replay_bytes", "Bytes held by the replay buffer", registry=r)

        # publisher
        self.latest_version = Gauge(f"{PREFIX}_latest_version", "Newest published version number", registry=r)
        self.latest_version_timestamp = Gauge(
            f"{PREFIX}_latest_version_timestamp_seconds", "When the newest version was published", registry=r
        )
        self.publish_seconds = Histogram(
            f"{PREFIX}_publish_seconds",
            "Duration of publishing one version",
            buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
            registry=r,
        )
        self.publish_failures = Counter(f"{PREFIX}_publish_failures", "Failed publish attempts", registry=r)
        self.publish_degraded = Gauge(
            f"{PREFIX}_publish_degraded", "1 while storage writes are failing and being retried", registry=r
        )
        self.corrupt_versions = Counter(
            f"{PREFIX}_corrupt_versions", "Published versions refused on load (sha256 mismatch)", registry=r
        )

        self.versions_rejected = Counter(
            f"{PREFIX}_versions_rejected",
            "Candidate versions the poisoning gate kept from LATEST (probe accuracy fell too far)",
            registry=r,
        )
        self.probe_accuracy = Gauge(
            f"{PREFIX}_probe_accuracy", "Probe-set accuracy of the newest candidate version", registry=r
        )

        # drift: one series per signal, present from the start so dashboards and alerts see them
        self.drift_score = Gauge(
            f"{PREFIX}_drift_score",
            "Drift statistic per signal, scaled so that 1.0 is its detection threshold",
            ["signal"],
            registry=r,
        )
        self.drift_detections = Counter(
            f"{PREFIX}_drift_detections", "Drift detections per signal", ["signal"], registry=r
        )
        for signal in DRIFT_SIGNALS:
            self.drift_score.labels(signal)
            self.drift_detections.labels(signal)

    def value(self, name: str, labels: dict[str, str] | None = None) -> float:
        """Current value of a sample, named as exposed (``stream_learner_steps_total``); 0 if absent."""
        v = self.registry.get_sample_value(name, labels or {})
        return 0.0 if v is None else v


def _ewma(average: float, value: float) -> float:
    """``average`` moved towards ``value`` by :data:`EWMA_WEIGHT` (``value`` itself while it is 0)."""
    return value if average == 0 else (1 - EWMA_WEIGHT) * average + EWMA_WEIGHT * value


class MetricsObserver(LoopObserver):
    """The training loop's events as Prometheus metrics (a :class:`LoopObserver` of ``training``).

    Counters sum what every step did (rate() of them gives averages); the per-second gauges are
    exponentially weighted over steps (:data:`EWMA_WEIGHT` for the newest step).
    """

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self._rate = self._fresh_rate = 0.0

    def on_step(self, r: StepRecord) -> None:
        m, n = self.metrics, len(r.fresh)
        seconds = max(r.ended - r.started, 1e-9)
        # every step that ran, a skipped one included: its examples, its time, its speed
        m.events_trained.inc(n)
        m.examples_replayed.inc(r.replayed)
        m.examples_trained.inc(n + r.replayed)
        m.step_seconds.observe(seconds)
        self._rate = _ewma(self._rate, (n + r.replayed) / seconds)
        self._fresh_rate = _ewma(self._fresh_rate, n / seconds)
        m.examples_per_second.set(self._rate)
        m.events_per_second.set(self._fresh_rate)
        for name in r.drift_fired:
            m.drift_detections.labels(name).inc()
        for name, score in r.drift_scores.items():
            m.drift_score.labels(name).set(score)
        if r.skipped:
            m.nonfinite_skipped.inc()
            return
        if r.param_distance is not None:
            m.l2sp_penalty.set(r.penalty)
            m.param_distance.set(r.param_distance)
        m.steps.inc()
        m.training_loss.set(r.loss + r.penalty)
        m.replay_size.set(r.replay_size)
        m.replay_bytes.set(r.replay_bytes)
        for key in ("prequential_loss", "prequential_accuracy", "prequential_f1"):
            if key in r.prequential:
                getattr(m, key).set(r.prequential[key])

    def on_take(self, queue_depth: int) -> None:
        self.metrics.queue_depth.set(queue_depth)

    def on_probe(self, accuracy: float) -> None:
        self.metrics.probe_accuracy.set(accuracy)

    def on_weight_check(self) -> None:
        self.metrics.weight_checks.inc()


class ServingMetrics:
    """The inference server's metrics (``stream-learner serve``) on ``registry`` (a fresh one when not
    given): a server is its own process, and exports none of the learner's series.

    The served version's age is computed at each scrape from the ``created_at`` of its manifest, which
    the batcher hands over at the swap (:meth:`now_serving`).
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        if registry is None:
            ProcessCollector(registry=r)
        self._created_at: float | None = None  # written by the batcher thread only, read at scrapes

        self.version = Gauge(
            f"{PREFIX}_serving_version",
            "Version the server answers with (0 before one is loaded)",
            registry=r,
        )
        self.version_age = Gauge(
            f"{PREFIX}_serving_version_age_seconds",
            "Seconds since the served version was created (its manifest's created_at); 0 before one is "
            "loaded",
            registry=r,
        )
        self.version_age.set_function(
            lambda: 0.0 if self._created_at is None else max(time.time() - self._created_at, 0.0)
        )
        self.latest_version = Gauge(
            f"{PREFIX}_serving_latest_version",
            "Version LATEST named at the last poll that read it: the served version lags behind it while a "
            "new one loads, or stays behind it when that one is refused",
            registry=r,
        )
        self.swaps = Counter(
            f"{PREFIX}_serving_swaps",
            "Versions the server started answering with (the first one included)",
            registry=r,
        )
        self.versions_refused = Counter(
            f"{PREFIX}_serving_versions_refused",
            "Versions the server refused to serve, by status (rejected, fenced, incomplete, corrupt: a file "
            "whose sha256 differs from its manifest's, or that does not load)",
            ["status"],
            registry=r,
        )
        self.load_seconds = Histogram(
            f"{PREFIX}_serving_load_seconds",
            "Time from reading a new version's manifest to being ready to swap it in: download, sha256 "
            "checks, loading, warm-up",
            buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
            registry=r,
        )
        self.failed_polls = Counter(
            f"{PREFIX}_serving_failed_polls",
            "Polls of the object store that failed (an outage: the served version stays)",
            registry=r,
        )
        self.storage_degraded = Gauge(
            f"{PREFIX}_serving_storage_degraded",
            "1 while polls of the object store fail (the served version stays, readiness unchanged)",
            registry=r,
        )
        self.requests = Counter(
            f"{PREFIX}_serving_requests",
            "HTTP requests answered, by endpoint (infer, metadata, ready, live, metrics, other) and status "
            "code",
            ["endpoint", "code"],
            registry=r,
        )
        self.request_seconds = Histogram(
            f"{PREFIX}_serving_request_seconds",
            "Time to answer an inference request, from its body read to its response built (queueing, "
            "batching and the forward pass included)",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
        self.batch_size = Histogram(
            f"{PREFIX}_serving_batch_size",
            "Texts in one batch of the micro-batcher (serving.max_batch bounds it, but for a single larger "
            "request)",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
            registry=r,
        )
        self.newest_event_timestamp = Gauge(
            f"{PREFIX}_serving_newest_event_timestamp_seconds",
            "Produce time of the newest event the served version learned (its manifest's "
            "newest_event_ms); 0 before one is loaded, or for a version from before manifests recorded it",
            registry=r,
        )
        self.freshness = CountedHistogram(
            f"{PREFIX}_serving_freshness_seconds",
            "Event to served prediction: from a learned event's produce time to the moment the first "
            "version that learned it started answering here (observed at each swap, for the events learned "
            "since the version served before; none at the first swap of a process)",
            buckets=(0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600),
            registry=r,
        )
        for status in (REJECTED, FENCED, INCOMPLETE, CORRUPT):
            self.versions_refused.labels(status)
        # an inference's answers exist at 0 from the start, so that rate() sees the first error of a code
        for code in ("200", "400", "413", "500", "503"):
            self.requests.labels("infer", code)

    def now_serving(
        self,
        version: int,
        created_at: float | None,
        newest_event_ms: int | None = None,
        learned: EventTimes | None = None,
    ) -> None:
        """The batcher swapped ``version`` in: ``created_at`` and ``newest_event_ms`` are its manifest's
        (a Unix time; ms since the epoch), ``learned`` the produce times of the events it learned that
        the version served before had not (observed as freshness, their ages now)."""
        self.version.set(version)
        self._created_at = created_at
        self.newest_event_timestamp.set((newest_event_ms or 0) / 1000)
        if learned is not None:
            for age, n in learned.ages(time.time()):
                self.freshness.observe(max(age, 0.0), n)
        self.swaps.inc()

    def value(self, name: str, labels: dict[str, str] | None = None) -> float:
        """Current value of a sample, named as exposed; 0 if absent."""
        v = self.registry.get_sample_value(name, labels or {})
        return 0.0 if v is None else v


class CountedHistogram(Collector):
    """A Prometheus histogram whose observations carry a count: ``observe(v, n)`` is ``n``
    observations of ``v`` at once, as a version's thousands of events with one age each are.

    ``prometheus_client.Histogram`` observes one value per call; this exposes the same series
    (``_bucket{le}``, ``_count``, ``_sum``) from counts kept here, so a swap costs a few additions,
    not one call per event.

    >>> from prometheus_client import CollectorRegistry
    >>> h = CountedHistogram("age_seconds", "Ages", buckets=(1, 10), registry=CollectorRegistry())
    >>> h.observe(5.0, 3)
    >>> [(s.labels.get("le"), s.value) for s in next(iter(h.collect())).samples][:3]
    [('1.0', 0.0), ('10.0', 3.0), ('+Inf', 3.0)]
    """

    def __init__(
        self, name: str, documentation: str, buckets: Sequence[float], registry: CollectorRegistry
    ) -> None:
        self.name, self.documentation = name, documentation
        self.bounds = [*sorted(float(b) for b in buckets), math.inf]
        self._counts = [0] * len(self.bounds)
        self._sum = 0.0
        self._lock = threading.Lock()  # observed by the batcher thread, collected by a scrape's
        registry.register(self)

    def observe(self, value: float, count: int = 1) -> None:
        """Count ``count`` observations of ``value``."""
        if count <= 0:
            return
        i = next(i for i, bound in enumerate(self.bounds) if value <= bound)
        with self._lock:
            self._counts[i] += count
            self._sum += value * count

    def describe(self) -> Iterable[HistogramMetricFamily]:
        return [HistogramMetricFamily(self.name, self.documentation)]

    def collect(self) -> Iterator[HistogramMetricFamily]:
        with self._lock:
            counts, total = list(self._counts), self._sum
        cumulative = [sum(counts[: i + 1]) for i in range(len(counts))]
        buckets = [(_le(b), float(c)) for b, c in zip(self.bounds, cumulative, strict=True)]
        yield HistogramMetricFamily(self.name, self.documentation, buckets=buckets, sum_value=total)


def _le(bound: float) -> str:
    return "+Inf" if math.isinf(bound) else repr(float(bound))
