"""The quality benchmark: does the learner follow a drifting stream without forgetting, and at what cost?

``stream-learner eval`` replays a labeled stream — the bundled VADER scenarios, or the user's own
(a JSONL file or a range of a Kafka topic: :mod:`stream_learner.tools.stream_source`) — through the
service's own training loop (``training.factory.build_trainer``) — in process, one
``train_window`` per window of ``bucket_window × fresh_per_step`` events, the calls the trainer thread
makes: the same length-bucketed micro-batches, the same replay draws, nothing patched — under
several strategies, and measures:

* **prequential** accuracy and loss of every event (test-then-train, Gama et al. 2013): each step's
  scores of its fresh events (an observer of the loop), i.e. the prediction of the weights *before*
  they learned it;
* **held-out** accuracy and macro-F1 per segment at checkpoints (every ``eval_every`` events and at
  each segment boundary), from which come the final average accuracy and macro-F1, the average
  forgetting (Chaudhry et al. 2018) and the backward transfer (Lopez-Paz & Ranzato 2017). Segments
  are the bundled data's four domains, a user's ``segment`` field, or equal slices of the stream;
* for the ``default`` strategy, the events at which each drift signal of ``drift.py`` fired, scored
  against the segment boundaries when these are real shifts (detection delay, false alarms per 5,000
  events).

Bundled scenarios (:data:`SCENARIOS`): ``covariate`` — the bundled stream as it is, ``per_domain``
events of each domain in stream order (movie → amazon → tweets → nyt); ``prior_shift`` — each domain
block resampled to a skewed label mix (85/15 by default), the majority class alternating between
blocks; ``imbalanced`` — every block 90/10 with the same majority (for the class-balanced reservoir);
``one_class_start`` — the covariate stream whose first block has one label only. A user's stream is
one scenario, in its own order, named after its file or topic.

Strategies (:data:`STRATEGIES`), all with the same stream, model and number of gradient steps:
``frozen`` (encoder frozen, head only), ``naive`` (no replay, λ = 0), ``replay`` (λ = 0), ``l2sp``
(no replay), ``default`` (replay + L2-SP: the current ``Settings`` defaults), ``offline`` (the default
settings on the same events shuffled i.i.d.: the upper bound), named variants such as
``default_cbrs``, and the points of a ``--sweep`` grid (:mod:`stream_learner.tools.sweep`), run within
a time budget (:class:`Budget`).

With ``broker`` set (``stream-learner eval --broker local``, or the bootstrap servers of a running
broker) each bundled scenario's stream is produced to a topic and read back by the service's own
consumer — parse, validate, tokenize — before it is trained; otherwise it is tokenized in process,
which gives the same events (tested) without a broker.

Everything is written to ``out``: ``results.json`` (every run, its checkpoints and per-event records,
the summary), the plots, ``report.md``, ``report.html`` and ``recommended.yaml``
(:mod:`stream_learner.tools.evaluation_report`). :func:`run_benchmark` is the entry point;
:func:`run_one` is the evaluation loop of one run, top to bottom.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import platform
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import torch

from stream_learner.core.batching import collate
from stream_learner.core.config import Settings, load_settings
from stream_learner.core.events import LabeledEvent, LabelSet, TokenizedEvent, encode_event
from stream_learner.core.intake import Tokenize
from stream_learner.core.model import load_tokenizer
from stream_learner.core.prequential import accuracy, macro_f1
from stream_learner.service.metrics import Metrics
from stream_learner.tools import stream_source as source
from stream_learner.tools.child_process import forkserver_context
from stream_learner.tools.datasets import DOMAINS, HELDOUT, STREAM, bundled_path, read_jsonl
from stream_learner.tools.evaluation_report import write_plots, write_reports
from stream_learner.training.factory import build_trainer
from stream_learner.training.observers import LoopObserver, StepRecord

FORMAT = 2  # 2: segments (the bundled domains or the user's) instead of the fixed four domains
CORE_STRATEGIES = ("default", "naive", "offline")  # the ones the issue wants with ≥ 3 seeds
MAX_DEFAULT_JOBS = 4  # each job holds a model, its optimizer state and the streams (≈ 1 GB)

# ============================================================================================ metrics


def backward_transfer(acc: np.ndarray) -> float:
    """Backward transfer: how learning later domains changed the accuracy on earlier ones.

    ``acc[i, j]`` is the held-out accuracy on domain ``j`` after training through domain ``i``
    (T × T). ``BWT = 1/(T−1) · Σ_{j<T−1} (acc[T−1, j] − acc[j, j])``; negative means forgetting.
    Lopez-Paz & Ranzato, "Gradient Episodic Memory for Continual Learning", NeurIPS 2017, eq. 3.

    >>> round(backward_transfer(np.array([[0.9, 0.5, 0.5], [0.8, 0.9, 0.5], [0.7, 0.6, 0.9]])), 6)
    -0.25
    """
    acc = np.asarray(acc, dtype=np.float64)
    t = acc.shape[0]
    if t < 2:
        return math.nan
    return float(np.mean([acc[t - 1, j] - acc[j, j] for j in range(t - 1)]))


def average_forgetting(acc: np.ndarray) -> float:
    """Average forgetting: for each domain but the last, the best accuracy it had once learned − final.

    ``f_j = max_{j ≤ i < T−1} acc[i, j] − acc[T−1, j]``, averaged over ``j < T−1``; ``acc`` as in
    :func:`backward_transfer`. Chaudhry, Dokania, Ajanthan & Torr, "Riemannian Walk for Incremental
    Learning", ECCV 2018, eq. 2 (the best *earlier* accuracy, not only the one right after learning).

    >>> round(average_forgetting(np.array([[0.9, 0.5, 0.5], [0.95, 0.9, 0.5], [0.7, 0.6, 0.9]])), 6)
    0.275
    """
    acc = np.asarray(acc, dtype=np.float64)
    t = acc.shape[0]
    if t < 2:
        return math.nan
    return float(np.mean([acc[j : t - 1, j].max() - acc[t - 1, j] for j in range(t - 1)]))


def mean_std(values: Iterable[float]) -> dict[str, float | int | None]:
    """Mean and sample standard deviation (``None`` with fewer than two values) of the finite values."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)
    return {
        "mean": float(v.mean()) if len(v) else None,
        "std": float(v.std(ddof=1)) if len(v) > 1 else None,
        "n": len(v),
    }


# ========================================================================================== scenarios

Row = dict[str, Any]  # one JSONL row: id, text, label, domain, score


def domain_slice(rows: Sequence[Row], per_domain: int) -> list[Row]:
    """The first ``per_domain`` rows of each domain, domains in :data:`DOMAINS` order (covariate shift)."""
    out = []
    for domain in DOMAINS:
        block = [r for r in rows if r["domain"] == domain][:per_domain]
        if len(block) < per_domain:
            raise ValueError(f"domain {domain!r} has {len(block)} rows, fewer than per_domain={per_domain}")
        out.extend(block)
    return out


def skewed_blocks(
    rows: Sequence[Row],
    per_domain: int,
    labels: Sequence[str],
    majority_share: float = 0.85,
    first_majority: int = 1,
    alternate: bool = True,
    seed: int = 0,
) -> list[Row]:
    """Each domain block resampled to ``majority_share`` of one label, the rest of the other.

    The majority label of block ``k`` is ``labels[first_majority]`` and, with ``alternate``, flips at
    every block (prior shift: spam waves, seasonal topics); without it every block has the same
    majority (a stream imbalanced throughout). Rows are drawn without replacement when the domain has
    enough of them (with replacement otherwise), and each block is shuffled. Two labels only.
    """
    if len(labels) != 2:
        raise ValueError("the skewed scenarios need exactly two labels")
    rng = np.random.default_rng(seed)
    n_major = round(majority_share * per_domain)
    out: list[Row] = []
    for k, domain in enumerate(DOMAINS):
        major = (first_majority + k) % 2 if alternate else first_majority
        block: list[Row] = []
        for label, n in ((labels[major], n_major), (labels[1 - major], per_domain - n_major)):
            pool = [r for r in rows if r["domain"] == domain and r["label"] == label]
            if not pool and n:
                raise ValueError(f"domain {domain!r} has no {label!r} rows")
            picks = rng.choice(len(pool), size=n, replace=n > len(pool)) if n else []
            block.extend(pool[i] for i in picks)
        out.extend(block[i] for i in rng.permutation(len(block)))
    return out


def one_class_start(rows: Sequence[Row], per_domain: int, label: str) -> list[Row]:
    """The covariate stream whose first domain block holds ``label`` events only (a one-class start).

    What a new deployment often sees first: one kind of ticket, one sentiment, before the mix arrives.
    The replay memory is then full of that class when the others come — unless replay balances it.
    """
    first = [r for r in rows if r["domain"] == DOMAINS[0] and r["label"] == label][:per_domain]
    if len(first) < per_domain:
        raise ValueError(f"domain {DOMAINS[0]!r} has {len(first)} {label!r} rows, fewer than {per_domain}")
    return first + domain_slice(rows, per_domain)[per_domain:]


def make_stream(scenario: str, rows: Sequence[Row], cfg: EvalConfig, labels: Sequence[str]) -> list[Row]:
    """The event stream of ``scenario`` (see :data:`SCENARIOS`)."""
    if scenario == "covariate":
        return domain_slice(rows, cfg.per_domain)
    if scenario == "prior_shift":
        return skewed_blocks(rows, cfg.per_domain, labels, cfg.majority_share, seed=cfg.data_seed)
    if scenario == "one_class_start":
        return one_class_start(rows, cfg.per_domain, labels[0])
    if scenario == "imbalanced":
        return skewed_blocks(
            rows, cfg.per_domain, labels, cfg.imbalance_share, alternate=False, seed=cfg.data_seed
        )
    raise ValueError(f"unknown scenario {scenario!r}; choose from {sorted(SCENARIOS)}")


SCENARIOS = {
    "covariate": "the bundled stream as it is: per_domain events of each domain, in stream order",
    "prior_shift": "each domain block resampled to an 85/15 label mix, the majority alternating",
    "imbalanced": "each domain block resampled to 90/10, always the same majority (CBRS vs Algorithm R)",
    "one_class_start": "the covariate stream whose first domain block has one label only (replay balance)",
}


# ========================================================================================= strategies


@dataclass(frozen=True)
class Strategy:
    """How one run trains: settings overrides on top of the defaults, and two harness-level switches.

    ``freeze_encoder``: the pretrained weights get learning rate 0 (and no gradient), only the new head
    learns. ``shuffle``: the events of the stream are shuffled i.i.d. (per seed) before training.
    """

    name: str
    overrides: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    freeze_encoder: bool = False
    shuffle: bool = False
    about: str = ""


STRATEGIES: dict[str, Strategy] = {
    s.name: s
    for s in (
        Strategy("frozen", freeze_encoder=True, about="encoder frozen (lr 0), head only; replay on"),
        Strategy(
            "naive",
            {"training": {"replay_per_step": 0, "l2sp_lambda": 0.0}},
            about="plain fine-tuning: no replay, λ = 0",
        ),
        Strategy("replay", {"training": {"l2sp_lambda": 0.0}}, about="replay only, λ = 0"),
        Strategy("l2sp", {"training": {"replay_per_step": 0}}, about="L2-SP only, no replay"),
        Strategy("default", about="replay + L2-SP: the Settings defaults"),
        Strategy("offline", shuffle=True, about="the default settings on the same events shuffled i.i.d."),
        Strategy(
            "default_cbrs",
            {"replay": {"class_balanced": True}},
            about="the default with the class-balanced reservoir (CBRS)",
        ),
    )
}
SIX = ("frozen", "naive", "replay", "l2sp", "default", "offline")


def parse_variant(spec: str) -> Strategy:
    """A named variant of ``default`` from ``name:section.key=value[,section.key=value…]``.

    Values are JSON when they parse as JSON, strings otherwise.

    >>> parse_variant("lam_0.1:training.l2sp_lambda=0.1,replay.capacity=2000").overrides
    {'training': {'l2sp_lambda': 0.1}, 'replay': {'capacity': 2000}}
    """
    name, sep, body = spec.partition(":")
    if not sep or not name or not body:
        raise ValueError(f"variant {spec!r}: expected name:section.key=value[,section.key=value…]")
    overrides: dict[str, dict[str, Any]] = {}
    for item in body.split(","):
        key, eq, raw = item.partition("=")
        section, dot, setting = key.strip().partition(".")
        if not eq or not dot:
            raise ValueError(f"variant {spec!r}: {item!r} is not section.key=value")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        overrides.setdefault(section, {})[setting] = value
    return Strategy(name, overrides, about=f"default with {body}")


# ============================================================================================= config


@dataclass
class EvalConfig:
    """Everything a benchmark run depends on (recorded in the results JSON)."""

    scenarios: tuple[str, ...] = ("covariate", "prior_shift")
    strategies: tuple[str, ...] = SIX
    # the defaults are the full comparison's slice, sized for < 2 h on a 2-core CPU (docs/quality.md)
    per_domain: int = 500  # stream events per domain (of the bundled scenarios)
    heldout_per_segment: int | None = 200  # held-out events per segment scored at each checkpoint; None = all
    seeds: int = 3  # seeds of the core strategies (default, naive, offline)
    other_seeds: int = 1  # seeds of the others
    seed_counts: dict[str, int] = field(default_factory=dict)  # per-strategy override
    eval_every: int | None = None  # events between held-out checkpoints; None = twice per segment
    majority_share: float = 0.85  # prior_shift
    imbalance_share: float = 0.9  # imbalanced
    data_seed: int = 0  # resampling of the skewed scenarios and of the held-out subset
    layers: int | None = None  # model.num_hidden_layers; None = all 6
    max_length: int = 128
    settings: dict[str, dict[str, Any]] = field(default_factory=dict)  # overrides applied to every run
    variants: dict[str, Strategy] = field(default_factory=dict)
    drift: bool = True  # run the drift monitor on the default strategy's runs
    rolling_window: int = 200  # of the prequential accuracy plot
    eval_batch_size: int = 128
    threads: int | None = None  # torch intra-op threads; None = torch's default (one per core)
    # runs in parallel, each in its own process (torch threads: cores // jobs); default: one per core,
    # which on a small model uses the cores better than torch's threads (docs/quality.md)
    jobs: int = field(default_factory=lambda: max(1, min(os.cpu_count() or 1, MAX_DEFAULT_JOBS)))
    # the stream through Kafka and the service's consumer: None = tokenized in process; "local" = a
    # local broker started for the run; otherwise the bootstrap servers of a running one
    broker: str | None = None
    # the user's own stream instead of the bundled scenarios (stream_source): a JSONL path or
    # kafka://TOPIC (with start/end: offsets or times), its held-out set (a path or last:P%), its labels
    stream: str | None = None
    heldout: str | None = None
    labels: tuple[str, ...] | None = None
    limit: int | None = None  # the first N events of the stream file
    start: str | None = None
    end: str | None = None
    slices: int = 4  # segments of a stream whose rows have no segment field
    budget_minutes: float | None = None  # start no run that would end after it (cheapest runs first)

    @classmethod
    def quick(cls, **changes: Any) -> EvalConfig:
        """A tiny smoke-test configuration (not a measurement): 1 layer, 64 tokens, 32 events per domain.

        One torch thread: on a shared 2-core machine two threads contend with the other processes
        and run several times slower (measured: 2.5 s against 0.5 s per 1-layer step).
        """
        base: dict[str, Any] = {
            "strategies": ("naive", "default", "offline"),
            "per_domain": 32,
            "heldout_per_segment": 16,
            "seeds": 1,
            "other_seeds": 1,
            "eval_every": 16,
            "layers": 1,
            "max_length": 64,
            "rolling_window": 16,
            "threads": 1,
            "jobs": 1,
        }
        return cls(**{**base, **changes})

    def strategy(self, name: str) -> Strategy:
        if name in self.variants:
            return self.variants[name]
        if name in STRATEGIES:
            return STRATEGIES[name]
        raise ValueError(f"unknown strategy {name!r}; choose from {sorted({*STRATEGIES, *self.variants})}")

    def n_seeds(self, strategy: str) -> int:
        if strategy in self.seed_counts:
            return self.seed_counts[strategy]
        return self.seeds if strategy in CORE_STRATEGIES else self.other_seeds

    def checkpoint_every(self, n_events: int, n_segments: int) -> int:
        return self.eval_every or max(1, n_events // (2 * max(1, n_segments)))

    def scenario_names(self) -> tuple[str, ...]:
        """The bundled scenarios, or the one scenario of the user's stream (named after its file or topic)."""
        if self.stream is None:
            return self.scenarios
        if self.stream.startswith(source.KAFKA_SCHEME):
            return (self.stream[len(source.KAFKA_SCHEME) :],)
        return (Path(self.stream).stem,)

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["variants"] = {k: dataclasses.asdict(v) for k, v in self.variants.items()}
        return d


def _merge(*layers: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for layer in layers:
        for section, values in layer.items():
            out.setdefault(section, {}).update(values)
    return out


def run_settings(cfg: EvalConfig, strategy: Strategy, seed: int) -> Settings:
    """The settings of one run: defaults ← ``cfg.settings`` ← the model size ← the strategy ← the seed."""
    model: dict[str, Any] = {"max_length": cfg.max_length}
    if cfg.labels is not None:
        model["labels"] = list(cfg.labels)
    if cfg.layers is not None:
        model["num_hidden_layers"] = cfg.layers
    return load_settings(
        **_merge(
            cfg.settings,
            {"model": model, "http": {"enabled": False}},
            strategy.overrides,
            {"training": {"seed": seed}},
        )
    )


# =============================================================================================== data


@dataclass
class HeldOut:
    """The held-out set, tokenized once, sorted by length and collated into batches (little padding)."""

    batches: list[dict[str, torch.Tensor]]
    labels: np.ndarray  # in batch order
    segments: np.ndarray  # segment index per example, in batch order
    names: tuple[str, ...]  # the segments' names
    sizes: dict[str, int]


@dataclass
class Scenario:
    """One scenario's stream, tokenized, with the segment of every event and the segment blocks.

    ``boundaries`` are the first events of each new segment block, or ``None`` when a segment recurs
    (then forgetting and backward transfer are not defined: :func:`stream_source.segment_blocks`).
    """

    name: str
    events: list[TokenizedEvent]
    segments: np.ndarray  # int, index into the held-out set's names
    boundaries: list[int] | None
    about: str = ""
    shifts_known: bool = True  # the boundaries are real shifts (segments), not equal slices: score drift

    @property
    def labels(self) -> np.ndarray:
        return np.array([e.label for e in self.events], dtype=np.int64)


@dataclass
class TokenizedInput:
    """The scenarios and the held-out set tokenized at every ``model.max_length`` the runs ask for.

    A sweep of ``model.max_length`` trains and scores each point on events cut at its own length (as
    the consumer would cut them), so each length gets its own tokenization.
    """

    scenarios: dict[tuple[str, int], Scenario]
    heldouts: dict[int, HeldOut]

    def for_run(self, scenario: str, strategy: Strategy, cfg: EvalConfig) -> tuple[Scenario, HeldOut]:
        length = run_settings(cfg, strategy, 0).model.max_length
        return self.scenarios[scenario, length], self.heldouts[length]

    def tokens(self, scenario: str, strategy: Strategy, cfg: EvalConfig) -> int:
        """Tokens the run's stream holds (its share of a run's cost)."""
        return sum(len(e.input_ids) for e in self.for_run(scenario, strategy, cfg)[0].events)


@dataclass
class StreamInput:
    """The validated events of every scenario and of the held-out set, with their segments."""

    scenarios: dict[str, tuple[list[LabeledEvent], np.ndarray, str]]  # name → events, segment ids, about
    heldout: list[LabeledEvent]
    heldout_segments: np.ndarray
    names: tuple[str, ...]
    by_field: bool
    report: dict[str, Any]  # what was read: rows, valid, invalid by reason, per source


def bundled_input(cfg: EvalConfig, settings: Settings) -> StreamInput:
    """The bundled VADER scenarios (:data:`SCENARIOS`): segments are its four domains."""
    for name in cfg.scenarios:
        if name not in SCENARIOS:
            raise ValueError(f"unknown scenario {name!r}; choose from {sorted(SCENARIOS)}")
    labels, limit = LabelSet(settings.model.labels), settings.events.max_text_bytes

    def parse(rows: Sequence[Row], name: str) -> source.LabeledRows:
        return source.parse_rows(
            (orjson.dumps({**r, "segment": r["domain"]}) for r in rows), labels, limit, name
        )

    stream_rows = list(read_jsonl(bundled_path(STREAM)))
    scenarios = {}
    for name in cfg.scenarios:
        rows = parse(make_stream(name, stream_rows, cfg, settings.model.labels), name)
        scenarios[name] = (rows.events, np.array([DOMAINS.index(s) for s in rows.segments]), SCENARIOS[name])
    heldout = parse(_per_segment_subset(list(read_jsonl(bundled_path(HELDOUT))), cfg), HELDOUT)
    return StreamInput(
        scenarios,
        heldout.events,
        np.array([DOMAINS.index(s) for s in heldout.segments], dtype=np.int64),
        DOMAINS,
        True,
        {"heldout": heldout.summary()},
    )


def _per_segment_subset(rows: Sequence[Row], cfg: EvalConfig) -> list[Row]:
    rng = np.random.default_rng(cfg.data_seed)
    chosen: list[Row] = []
    for domain in DOMAINS:
        block = [r for r in rows if r["domain"] == domain]
        if cfg.heldout_per_segment is not None and len(block) > cfg.heldout_per_segment:
            block = [block[i] for i in sorted(rng.choice(len(block), cfg.heldout_per_segment, replace=False))]
        chosen.extend(block)
    return chosen


def user_input(cfg: EvalConfig, settings: Settings) -> StreamInput:
    """The user's stream (a JSONL file or a Kafka topic range) and held-out set (a file or ``last:P%``)."""
    assert cfg.stream is not None
    if cfg.heldout is None:
        raise ValueError(
            "--stream needs --heldout: a JSONL file of held-out events, or last:P% of the stream"
        )
    labels, limit = LabelSet(settings.model.labels), settings.events.max_text_bytes
    (name,) = cfg.scenario_names()
    report: dict[str, Any] = {}
    if cfg.stream.startswith(source.KAFKA_SCHEME):
        rng = source.KafkaRange.parse(cfg.stream, cfg.start, cfg.end)
        client = settings.kafka.librdkafka()
        if cfg.broker not in (None, "local"):
            client["bootstrap.servers"] = cfg.broker
        records, spans = source.read_topic_range(rng, client)
        values = [value for *_, value in records][: cfg.limit]
        stream = source.parse_rows(values, labels, limit, cfg.stream)
        report["kafka"] = {"topic": rng.topic, "start": cfg.start, "end": cfg.end, "partitions": spans}
    else:
        stream = source.parse_rows(source.jsonl_values(cfg.stream, cfg.limit), labels, limit, cfg.stream)
    share = source.split_heldout(cfg.heldout)
    if share is not None:
        stream, heldout = source.time_split(stream, share)
    else:
        heldout = source.parse_rows(source.jsonl_values(cfg.heldout), labels, limit, cfg.heldout)
    if len(stream.events) < 2 or not heldout.events:
        raise ValueError(
            f"{cfg.stream}: {len(stream.events)} valid stream events and {len(heldout.events)} held-out "
            f"ones (invalid: {stream.invalid or 'none'}): check the labels ({', '.join(labels.names)}) "
            "and the event format (README, 'Events')"
        )
    seg = source.assign_segments(stream, heldout, cfg.slices)
    keep = _subset_per_segment(seg.heldout, len(seg.names), cfg)
    report.update(stream=stream.summary(), heldout=heldout.summary())
    return StreamInput(
        {name: (stream.events, seg.stream, f"{cfg.stream}, in its own order")},
        [heldout.events[i] for i in keep],
        seg.heldout[keep],
        seg.names,
        seg.by_field,
        report,
    )


def _subset_per_segment(ids: np.ndarray, n_segments: int, cfg: EvalConfig) -> np.ndarray:
    """Indices of at most ``cfg.heldout_per_segment`` held-out events per segment (seeded), in order."""
    rng = np.random.default_rng(cfg.data_seed)
    keep: list[int] = []
    for k in range(n_segments):
        members = np.flatnonzero(ids == k)
        if cfg.heldout_per_segment is not None and len(members) > cfg.heldout_per_segment:
            members = np.sort(rng.choice(members, cfg.heldout_per_segment, replace=False))
        keep.extend(members.tolist())
    return np.array(sorted(keep), dtype=np.int64)


def tokenize_events(events: Sequence[LabeledEvent], tokenize: Tokenize) -> list[TokenizedEvent]:
    """Events → :class:`TokenizedEvent` as the consumer makes them (offsets = positions in the stream)."""
    return [
        TokenizedEvent(input_ids=ids, label=e.label, pair_start=start, partition=0, offset=i, timestamp_ms=0)
        for i, (e, (ids, start)) in enumerate(zip(events, tokenize(list(events)), strict=True))
    ]


def events_through_broker(
    events: Sequence[LabeledEvent],
    settings: Settings,
    tokenizer: Any,
    bootstrap: str,
    timeout_s: float = 300.0,
) -> list[TokenizedEvent]:
    """The stream as the learner receives it: produced to Kafka, read back by the service's consumer.

    The events are produced (as the events users send, :func:`~stream_learner.core.events.encode_event`)
    to a fresh one-partition topic — one partition keeps the stream's order — and consumed by an
    :class:`~stream_learner.service.consumer.EventConsumer` thread, which parses, validates and tokenizes
    them exactly as in the service. Every event is valid, so every one must come back, in order; raises
    :class:`RuntimeError` otherwise.
    """
    from stream_learner.service.consumer import EventConsumer
    from stream_learner.service.producer import produce_lines
    from stream_learner.service.topics import ensure_topics

    topic = f"stream-learner-eval-{uuid.uuid4().hex[:12]}"
    s = load_settings(
        **_merge(
            settings.model_dump(mode="json", include={"model", "events"}),
            {
                "kafka": {
                    "bootstrap_servers": bootstrap,
                    "topic": topic,
                    "group_id": topic,
                    "session_timeout_ms": 6000,
                    "auto_offset_reset": "earliest",
                },
                "http": {"enabled": False},
            },
        )
    )
    names = s.model.labels
    ensure_topics(s.kafka.librdkafka(), {topic: 1, s.kafka.dead_letter_topic: 1})
    produce_lines(
        s.kafka.librdkafka(),
        topic,
        [encode_event(e.text, names[e.label], text_pair=e.text_pair) for e in events],
        partition=0,
    )

    fresh: queue.Queue = queue.Queue(maxsize=s.kafka.queue_max_batches)
    stop = threading.Event()
    consumer = EventConsumer(s, tokenizer, fresh, queue.Queue(), Metrics(), stop)
    thread = threading.Thread(target=consumer.run, name="eval-consumer", daemon=True)
    thread.start()
    out: list[TokenizedEvent] = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(out) < len(events) and time.monotonic() < deadline and thread.is_alive():
            try:
                out.extend(fresh.get(timeout=0.5).events)
            except queue.Empty:
                continue
    finally:
        stop.set()
        consumer.close_event.set()
        thread.join(timeout=30)
    if [e.offset for e in out] != list(range(len(events))):
        raise RuntimeError(
            f"{len(out)} of {len(events)} events came back from topic {topic!r} within {timeout_s:.0f} s "
            f"(or out of order): is the broker at {bootstrap} up?"
        )
    return out


def build_heldout(
    events: Sequence[LabeledEvent],
    segments: np.ndarray,
    names: Sequence[str],
    cfg: EvalConfig,
    tokenize: Tokenize,
    pad_id: int,
    with_types: bool,
) -> HeldOut:
    tokenized = tokenize_events(events, tokenize)
    order = sorted(range(len(tokenized)), key=lambda i: len(tokenized[i].input_ids))
    batches = [
        collate([tokenized[i] for i in order[k : k + cfg.eval_batch_size]], pad_id, with_types)
        for k in range(0, len(order), cfg.eval_batch_size)
    ]
    for b in batches:
        b.pop("labels")
    return HeldOut(
        batches=batches,
        labels=np.array([tokenized[i].label for i in order], dtype=np.int64),
        segments=np.asarray(segments, dtype=np.int64)[order],
        names=tuple(names),
        sizes={name: int(np.sum(segments == k)) for k, name in enumerate(names)},
    )


@torch.no_grad()
def evaluate_heldout(model: torch.nn.Module, heldout: HeldOut) -> tuple[list[float], list[float]]:
    """Accuracy and macro-F1 per segment of the model as it is now (eval mode, no gradient).

    A segment without held-out events scores NaN.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    preds = np.concatenate(
        [
            model(**{k: v.to(device) for k, v in b.items()}).logits.argmax(-1).cpu().numpy()
            for b in heldout.batches
        ]
    )
    model.train(was_training)
    accs, f1s = [], []
    for k in range(len(heldout.names)):
        m = heldout.segments == k
        accs.append(accuracy(preds[m], heldout.labels[m]))
        f1s.append(macro_f1(preds[m], heldout.labels[m]) if m.any() else math.nan)
    return accs, f1s


def checkpoint_positions(n_events: int, boundaries: Sequence[int], every: int) -> list[int]:
    """Event counts at which the held-out set is scored: 0, every ``every`` events, each boundary, the end."""
    return sorted({0, n_events, *boundaries, *range(every, n_events, every)})


# ============================================================================================== drift


def drift_report(positions: Mapping[str, Sequence[int]], boundaries: Sequence[int], n_events: int) -> dict:
    """Detection delays at the domain boundaries (window 500 events) and false alarms per 5,000 events."""
    from stream_learner.core.drift import detection_report

    return detection_report(positions, boundaries, n_events=n_events, max_delay=500, per_events=5_000)


# ========================================================================================== one run


class PrequentialRecord(LoopObserver):
    """Each event's prequential score (correct?, loss), kept at its stream position (its offset)."""

    def __init__(self, n: int) -> None:
        self.correct = np.zeros(n, dtype=bool)
        self.losses = np.zeros(n, dtype=np.float32)

    def on_step(self, record: StepRecord) -> None:
        at = np.array([e.offset for e in record.fresh], dtype=np.int64)
        self.correct[at] = record.predictions == record.labels
        self.losses[at] = record.losses


def run_one(
    scenario: Scenario,
    heldout: HeldOut,
    strategy: Strategy,
    seed: int,
    cfg: EvalConfig,
    tokenizer: Any,
    on_step: Callable[[int], None] = lambda n: None,
) -> dict[str, Any]:
    """Train one strategy on one scenario's stream with one seed; score prequentially and on held-out."""
    settings = run_settings(cfg, strategy, seed)
    # the stream: as it is, or shuffled i.i.d. (offline); checkpoints at the same event counts either way
    order = np.random.default_rng(seed).permutation(len(scenario.events)) if strategy.shuffle else None
    events = scenario.events if order is None else [scenario.events[i] for i in order]
    events = [
        dataclasses.replace(e, partition=0, offset=i) for i, e in enumerate(events)
    ]  # i: stream position
    segments = scenario.segments if order is None else scenario.segments[order]
    n = len(events)
    # checkpoints at the end of every segment block (or equal slice), and in between
    n_blocks = len(set(scenario.segments.tolist()))
    ends = [*(scenario.boundaries or source.equal_slice_starts(n, n_blocks)), n]
    checkpoints = checkpoint_positions(n, ends[:-1], cfg.checkpoint_every(n, n_blocks))

    scores = PrequentialRecord(n)
    trainer = build_trainer(
        settings, tokenizer, observers=[scores], drift=cfg.drift and strategy.name == "default"
    )
    if strategy.freeze_encoder:
        trainer.engine.freeze_pretrained()
    curve: list[dict[str, Any]] = []
    t_train = t_eval = 0.0

    def checkpoint(at: int) -> None:
        nonlocal t_eval
        t0 = time.perf_counter()
        acc, f1 = evaluate_heldout(trainer.engine.model, heldout)
        t_eval += time.perf_counter() - t0
        curve.append({"events": at, "accuracy": acc, "f1": f1})

    checkpoint(0)
    # the production loop's windows: bucket_window steps' worth of events, sorted by length with their
    # replayed examples and cut into micro-batches (plan_window); a window never straddles a checkpoint
    window = settings.training.fresh_per_step * settings.training.bucket_window
    pos, steps = 0, 0
    for stop in checkpoints[1:]:
        while pos < stop:
            fresh = events[pos : min(pos + window, stop)]
            t0 = time.perf_counter()
            steps += len(trainer.train_window(fresh))  # each event scored before its step learns it
            t_train += time.perf_counter() - t0
            pos += len(fresh)
            on_step(len(fresh))
        checkpoint(stop)
    correct, losses = scores.correct, scores.losses

    # the accuracy matrix at the segment boundaries: row i = after the events of block i, column j =
    # the stream's j-th segment (segments only in the held-out set are scored, but not in it)
    at = {c["events"]: c for c in curve}
    if scenario.boundaries is not None:
        matrix = np.array([at[e]["accuracy"][: len(ends)] for e in ends], dtype=np.float64)
    else:
        matrix = np.full((1, 1), math.nan)  # a segment recurs: no "just after learning it" (forgetting)
    final = curve[-1]
    result: dict[str, Any] = {
        "scenario": scenario.name,
        "strategy": strategy.name,
        "seed": seed,
        "steps": steps,
        "events": n,
        "examples_replayed": trainer.counters.examples_replayed,
        "settings": settings.model_dump(mode="json", include={"model", "training", "replay"}),
        "seconds": {"train": t_train, "eval": t_eval, "total": t_train + t_eval},  # train includes drift
        "param_distance": float(trainer.engine.l2sp.squared_distance()) ** 0.5,
        "checkpoints": curve,
        "boundary_events": ends,
        "accuracy_matrix": matrix.tolist() if scenario.boundaries is not None else None,
        "metrics": {
            "final_accuracy": _nanmean(final["accuracy"]),
            "final_f1": _nanmean(final["f1"]),
            "forgetting": average_forgetting(matrix),
            "bwt": backward_transfer(matrix),
            "prequential_accuracy": float(correct.mean()),
            "prequential_loss": float(losses.mean()),
        },
        "prequential": {
            "correct": correct.astype(np.int8).tolist(),
            "loss": np.round(losses, 4).tolist(),
            "label": [e.label for e in events],
            "segment": segments.tolist(),
        },
    }
    if trainer.drift is not None:
        positions = trainer.drift.monitor.detection_positions()
        result["drift"] = {"positions": positions}
        if scenario.shifts_known:
            result["drift"]["report"] = drift_report(positions, ends[:-1], n)
    return result


def _nanmean(values: Sequence[float]) -> float:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(finite)) if finite else math.nan


# ========================================================================================== the bench

METRICS = ("final_accuracy", "final_f1", "forgetting", "bwt", "prequential_accuracy")


def summarize(runs: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """Per scenario and strategy, mean ± std over seeds of each metric (and of the seconds per run)."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for r in runs:
        out.setdefault(r["scenario"], {}).setdefault(r["strategy"], {"runs": []})["runs"].append(r)
    for strategies in out.values():
        for name, entry in strategies.items():
            rs = entry.pop("runs")
            strategies[name] = {m: mean_std(r["metrics"][m] for r in rs) for m in METRICS}
            strategies[name]["seconds"] = mean_std(r["seconds"]["total"] for r in rs)
            strategies[name]["steps"] = rs[0]["steps"]
    return out


def summarize_drift(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Per scenario, the default runs' detection reports and their aggregate (delays, false alarms)."""
    out: dict[str, Any] = {}
    for r in runs:
        if "report" not in r.get("drift", {}):
            continue
        rep = r["drift"]["report"]
        entry = out.setdefault(r["scenario"], {"per_seed": [], "all_ok": True})
        entry["per_seed"].append(
            {
                "seed": r["seed"],
                "delays": [b["delay"] for b in rep["boundaries"]],
                "delays_per_signal": [b["delays"] for b in rep["boundaries"]],
                "missed": rep["missed"],
                "false_alarms": rep["false_alarms"],
                "false_alarms_per_5000": rep["false_alarms_per_5000"],
                "events_inside_segments": rep["events_inside_segments"],
                "ok": rep["ok"],
            }
        )
        entry["all_ok"] = entry["all_ok"] and rep["ok"]
    return out


def plan_runs(cfg: EvalConfig) -> list[tuple[str, Strategy, int]]:
    """Every (scenario, strategy, seed) run of ``cfg``, in order; a bad name or count raises ValueError."""
    if cfg.jobs < 1:
        raise ValueError(f"jobs must be at least 1, not {cfg.jobs}")
    return [
        (scenario, cfg.strategy(name), seed)
        for scenario in cfg.scenario_names()
        for name in cfg.strategies
        for seed in range(cfg.n_seeds(name))
    ]


def run_cost(strategy: Strategy, cfg: EvalConfig) -> float:
    """A run's relative cost, for scheduling: examples per step, a frozen encoder's at about 0.4."""
    training = run_settings(cfg, strategy, 0).training
    examples = training.fresh_per_step + training.replay_per_step
    return examples * (0.4 if strategy.freeze_encoder else 1.0)


# the state of one worker process of run_in_processes, set once by its initializer
_worker: dict[str, Any] = {}


def _start_worker(inputs: TokenizedInput, cfg: EvalConfig, threads: int, steps: Any) -> None:
    torch.set_num_threads(threads)
    base = run_settings(cfg, STRATEGIES["default"], 0)
    _worker.update(inputs=inputs, cfg=cfg, steps=steps, tokenizer=load_tokenizer(base.model))


def _run_in_worker(scenario: str, strategy: Strategy, seed: int) -> dict[str, Any]:
    w = _worker
    stream, heldout = w["inputs"].for_run(scenario, strategy, w["cfg"])
    return run_one(stream, heldout, strategy, seed, w["cfg"], w["tokenizer"], w["steps"].put)


class Budget:
    """Which runs to start, and in which order, so that everything started ends within ``minutes``.

    Without a budget the costliest runs go first (the last to finish are short: the cores stay busy).
    With one the cheapest go first — as many settings as the budget allows — and a run starts only if
    the time it is expected to take fits in what is left: its cost (:func:`run_cost` × tokens) times the
    seconds per unit of cost measured on the runs done so far (the first run always starts).
    """

    def __init__(
        self, plan: Sequence[tuple[str, Strategy, int]], inputs: TokenizedInput, cfg: EvalConfig
    ) -> None:
        self.costs = [run_cost(st, cfg) * inputs.tokens(sc, st, cfg) for sc, st, _ in plan]
        self.limit = None if cfg.budget_minutes is None else 60.0 * cfg.budget_minutes
        cheapest_first = self.limit is not None
        self.order = sorted(range(len(plan)), key=lambda i: self.costs[i] * (1 if cheapest_first else -1))
        self.started = time.perf_counter()
        self._spent: list[tuple[float, float]] = []  # (cost, seconds) of the runs done

    def done(self, i: int, seconds: float) -> None:
        self._spent.append((self.costs[i], seconds))

    def fits(self, i: int, running: int = 0) -> bool:
        """Whether run ``i`` may start now (``running``: runs started and not done)."""
        if self.limit is None or (not self._spent and running == 0):
            return True
        if not self._spent:
            return False  # within a budget, a second run waits for the first one's measurement
        rate = sum(s for _, s in self._spent) / sum(c for c, _ in self._spent)
        left = self.limit - (time.perf_counter() - self.started)
        return self.costs[i] * rate <= left


def run_in_processes(
    plan: Sequence[tuple[str, Strategy, int]],
    inputs: TokenizedInput,
    cfg: EvalConfig,
    budget: Budget,
    bar: Any,
    task: Any,
) -> list[dict[str, Any] | None]:
    """The runs of ``plan`` on ``cfg.jobs`` worker processes; the results in ``plan``'s order.

    Runs are independent, so on a machine with several cores whole runs in parallel use them better
    than torch's intra-op threads do on a small model. Workers are forked from multiprocessing's
    forkserver (``child_process.forkserver_context``), not from this process, which holds torch's
    thread pools, and each gets the tokenized streams once; runs are handed out one per
    free worker in the :class:`Budget`'s order, and a run the budget has no time for is not started
    (its result is ``None``). Each worker reports its steps through a queue, which feeds the progress
    bar. A run's result does not depend on the process it ran in.
    """
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    threads = cfg.threads or max(1, (torch.get_num_threads() or 1) // cfg.jobs)
    context = forkserver_context()
    results: list[dict[str, Any] | None] = [None] * len(plan)
    with context.Manager() as manager:
        steps = manager.Queue()
        with ProcessPoolExecutor(
            cfg.jobs,
            mp_context=context,
            initializer=_start_worker,
            initargs=(inputs, cfg, threads, steps),
        ) as pool:
            todo, running, done = list(budget.order), {}, 0
            while todo or running:
                while todo and len(running) < cfg.jobs and budget.fits(todo[0], len(running)):
                    i = todo.pop(0)
                    running[pool.submit(_run_in_worker, *plan[i])] = (i, time.perf_counter())
                if todo and not running:  # the budget has no time left for the rest
                    break
                finished, _ = wait(set(running), timeout=0.5, return_when=FIRST_COMPLETED)
                for future in finished:
                    i, t0 = running.pop(future)
                    if future.exception() is not None:  # fail fast: the queued runs are not started
                        raise future.exception()  # type: ignore[misc]
                    results[i] = future.result()
                    budget.done(i, time.perf_counter() - t0)
                    done += 1
                bar.update(task, description=f"{done}/{len(plan)} runs done, {cfg.jobs} at a time")
                while True:
                    try:
                        bar.advance(task, steps.get_nowait())
                    except queue.Empty:
                        break
    return results


def run_benchmark(cfg: EvalConfig, out: Path, console: Any = None, progress: bool = True) -> dict[str, Any]:
    """Every (scenario, strategy, seed) run of ``cfg``; writes ``results.json`` and the plots to ``out``."""
    from rich.console import Console

    console = console or Console(stderr=True)
    out.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _run_benchmark(cfg, out, console, progress)
    finally:
        torch.set_num_threads(threads)


def _run_benchmark(cfg: EvalConfig, out: Path, console: Any, progress: bool) -> dict[str, Any]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    plan = plan_runs(cfg)  # validates the strategy names before anything heavy
    base = run_settings(cfg, STRATEGIES["default"], 0)
    data = user_input(cfg, base) if cfg.stream is not None else bundled_input(cfg, base)
    tokenizer = load_tokenizer(base.model)
    with_types = "token_type_ids" in tokenizer.model_input_names
    max_lengths = sorted({run_settings(cfg, st, 0).model.max_length for _, st, _ in plan})
    inputs = TokenizedInput({}, {})
    with contextlib.ExitStack() as stack:
        bootstrap = cfg.broker
        if bootstrap == "local" and cfg.stream is None:
            from stream_learner.tools.local_broker import LocalBroker

            bootstrap = stack.enter_context(LocalBroker()).bootstrap_servers
        for length in max_lengths:
            tokenize = Tokenize(tokenizer, length)
            inputs.heldouts[length] = build_heldout(
                data.heldout,
                data.heldout_segments,
                data.names,
                cfg,
                tokenize,
                tokenizer.pad_token_id or 0,
                with_types,
            )
            for name, (events, segments, about) in data.scenarios.items():
                through_broker = (
                    bootstrap is not None and cfg.stream is None and length == base.model.max_length
                )
                tokenized = (  # a user's stream was read from Kafka once already; other lengths in process
                    events_through_broker(events, base, tokenizer, bootstrap)  # type: ignore[arg-type]
                    if through_broker
                    else tokenize_events(events, tokenize)
                )
                blocks = source.segment_blocks(segments)
                inputs.scenarios[name, length] = Scenario(
                    name, tokenized, segments, blocks, about, shifts_known=data.by_field
                )
    scenarios = {name: inputs.scenarios[name, max_lengths[0]] for name in data.scenarios}
    lengths = np.concatenate(
        [source.token_lengths(tokenizer, events) for events, _, _ in data.scenarios.values()]
    )

    started = time.perf_counter()
    total = sum(len(scenarios[s].events) for s, _, _ in plan)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, disable=not progress) as bar:
        task = bar.add_task("eval", total=total)
        budget = Budget(plan, inputs, cfg)
        if cfg.jobs > 1:
            results_in_plan = run_in_processes(plan, inputs, cfg, budget, bar, task)
        else:
            results_in_plan = [None] * len(plan)
            for k, i in enumerate(budget.order, 1):
                if not budget.fits(i):
                    continue
                name, strategy, seed = plan[i]
                bar.update(task, description=f"run {k}/{len(plan)} {name} · {strategy.name} · seed {seed}")
                t0 = time.perf_counter()
                stream, heldout = inputs.for_run(name, strategy, cfg)
                results_in_plan[i] = run_one(
                    stream, heldout, strategy, seed, cfg, tokenizer, lambda n: bar.advance(task, n)
                )
                budget.done(i, time.perf_counter() - t0)
    runs = [r for r in results_in_plan if r is not None]
    not_run = [
        {
            "scenario": sc,
            "strategy": st.name,
            "seed": seed,
            "reason": f"{cfg.budget_minutes} min budget spent",
        }
        for (sc, st, seed), r in zip(plan, results_in_plan, strict=True)
        if r is None
    ]
    if not runs:
        raise RuntimeError("no run fitted in the budget")

    labels = list(base.model.labels)
    results: dict[str, Any] = {
        "format": FORMAT,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": cfg.to_json(),
        "environment": environment(),
        "segments": list(data.names),
        "segments_from": "segment field" if data.by_field else f"{cfg.slices} equal slices",
        "labels": labels,
        "input": data.report,
        "tokens": source.token_report(lengths, base.model.max_length),
        "strategies": {s.name: dataclasses.asdict(s) for s in {st.name: st for _, st, _ in plan}.values()},
        "scenarios": {
            name: {
                "about": s.about,
                "events": len(s.events),
                "boundaries": s.boundaries,
                "label_counts": label_counts(s, data.names, len(labels)),
            }
            for name, s in scenarios.items()
        },
        "heldout": {"per_segment": inputs.heldouts[max_lengths[0]].sizes},
        "runs": runs,
        "not_run": not_run,
        "summary": summarize(runs),
        "drift": summarize_drift(runs),
        "wall_seconds": time.perf_counter() - started,
    }
    results["plots"] = write_plots(results, out)
    results["reports"] = write_reports(results, out)
    (out / "results.json").write_text(json.dumps(results, allow_nan=True, separators=(",", ":")))
    return results


def label_counts(scenario: Scenario, names: Sequence[str], num_labels: int) -> dict[str, list[int]]:
    """Events per label in each segment of the stream."""
    y = scenario.labels
    return {
        name: np.bincount(y[scenario.segments == k], minlength=num_labels).tolist()
        for k, name in enumerate(names)
        if (scenario.segments == k).any()
    }


def environment() -> dict[str, Any]:
    import os

    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "processor": platform.processor(),
    }
