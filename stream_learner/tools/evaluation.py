"""The quality benchmark: does the learner follow a drifting stream without forgetting, and at what cost?

``stream-learner eval`` replays labeled streams built from the bundled VADER data through the
service's own training loop (``training.factory.build_trainer``) — in process, one
``train_window`` per window of ``bucket_window × fresh_per_step`` events, the calls the trainer thread
makes: the same length-bucketed micro-batches, the same replay draws, nothing patched — under
several strategies, and measures:

* **prequential** accuracy and loss of every event (test-then-train, Gama et al. 2013): each step's
  scores of its fresh events (an observer of the loop), i.e. the prediction of the weights *before*
  they learned it;
* **held-out** accuracy and macro-F1 per domain at checkpoints (every ``eval_every`` events and at
  each domain boundary), from which come the final average accuracy and macro-F1, the average
  forgetting (Chaudhry et al. 2018) and the backward transfer (Lopez-Paz & Ranzato 2017);
* for the ``default`` strategy, the events at which each drift signal of ``drift.py`` fired, scored
  against the domain boundaries (detection delay, false alarms per 5,000 events).

Scenarios (:data:`SCENARIOS`): ``covariate`` — the bundled stream as it is, ``per_domain`` events of
each domain in stream order (movie → amazon → tweets → nyt); ``prior_shift`` — each domain block
resampled to a skewed label mix (85/15 by default), the majority class alternating between blocks;
``imbalanced`` — every block 90/10 with the same majority (for the class-balanced reservoir).

Strategies (:data:`STRATEGIES`), all with the same stream, model and number of gradient steps:
``frozen`` (encoder frozen, head only), ``naive`` (no replay, λ = 0), ``replay`` (λ = 0), ``l2sp``
(no replay), ``default`` (replay + L2-SP: the current ``Settings`` defaults), ``offline`` (the default
settings on the same events shuffled i.i.d.: the upper bound), and named variants such as
``default_cbrs``.

With ``broker`` set (``stream-learner eval --broker local``, or the bootstrap servers of a running
broker) each scenario's stream is produced to a topic and read back by the service's own consumer —
parse, validate, tokenize — before it is trained; otherwise it is tokenized in process, which gives
the same events (tested) without a broker.

Everything is written to ``out``: ``results.json`` (every run, its checkpoints and per-event records,
the summary), ``prequential_<scenario>.png`` and ``heldout_<scenario>.png``. :func:`run_benchmark` is
the entry point; :func:`run_one` is the evaluation loop of one run, top to bottom.
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
import torch

from stream_learner.core.batching import collate
from stream_learner.core.config import Settings, load_settings
from stream_learner.core.events import LabeledEvent, LabelSet, TokenizedEvent
from stream_learner.core.intake import Tokenize
from stream_learner.core.model import load_tokenizer
from stream_learner.core.prequential import accuracy, macro_f1
from stream_learner.service.metrics import Metrics
from stream_learner.tools.datasets import DOMAINS, HELDOUT, STREAM, bundled_path, read_jsonl
from stream_learner.tools.evaluation_report import write_plots
from stream_learner.training.factory import build_trainer
from stream_learner.training.observers import LoopObserver, StepRecord

FORMAT = 1
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


def make_stream(scenario: str, rows: Sequence[Row], cfg: EvalConfig, labels: Sequence[str]) -> list[Row]:
    """The event stream of ``scenario`` (see :data:`SCENARIOS`)."""
    if scenario == "covariate":
        return domain_slice(rows, cfg.per_domain)
    if scenario == "prior_shift":
        return skewed_blocks(rows, cfg.per_domain, labels, cfg.majority_share, seed=cfg.data_seed)
    if scenario == "imbalanced":
        return skewed_blocks(
            rows, cfg.per_domain, labels, cfg.imbalance_share, alternate=False, seed=cfg.data_seed
        )
    raise ValueError(f"unknown scenario {scenario!r}; choose from {sorted(SCENARIOS)}")


SCENARIOS = {
    "covariate": "the bundled stream as it is: per_domain events of each domain, in stream order",
    "prior_shift": "each domain block resampled to an 85/15 label mix, the majority alternating",
    "imbalanced": "each domain block resampled to 90/10, always the same majority (CBRS vs Algorithm R)",
}


def boundaries_of(domains: Sequence[int]) -> list[int]:
    """Indices of the first event of each new domain block."""
    return [i for i in range(1, len(domains)) if domains[i] != domains[i - 1]]


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
    per_domain: int = 500  # stream events per domain
    heldout_per_domain: int | None = 200  # held-out events per domain scored at each checkpoint; None = all
    seeds: int = 3  # seeds of the core strategies (default, naive, offline)
    other_seeds: int = 1  # seeds of the others
    seed_counts: dict[str, int] = field(default_factory=dict)  # per-strategy override
    eval_every: int | None = None  # events between held-out checkpoints; None = twice per domain
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

    @classmethod
    def quick(cls, **changes: Any) -> EvalConfig:
        """A tiny smoke-test configuration (not a measurement): 1 layer, 64 tokens, 32 events per domain.

        One torch thread: on a shared 2-core machine two threads contend with the other processes
        and run several times slower (measured: 2.5 s against 0.5 s per 1-layer step).
        """
        base: dict[str, Any] = {
            "strategies": ("naive", "default", "offline"),
            "per_domain": 32,
            "heldout_per_domain": 16,
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

    def checkpoint_every(self) -> int:
        return self.eval_every or max(1, self.per_domain // 2)

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
    domains: np.ndarray  # domain index per example, in batch order
    sizes: dict[str, int]


@dataclass
class Scenario:
    """One scenario's stream, tokenized, with the domain of every event and the block boundaries."""

    name: str
    events: list[TokenizedEvent]
    domains: np.ndarray  # int, index into DOMAINS
    boundaries: list[int]

    @property
    def labels(self) -> np.ndarray:
        return np.array([e.label for e in self.events], dtype=np.int64)


def tokenize_rows(rows: Sequence[Row], tokenize: Tokenize, labels: LabelSet) -> list[TokenizedEvent]:
    """Rows → :class:`TokenizedEvent` as the consumer makes them (offsets = positions in the stream)."""
    events = [LabeledEvent(text=r["text"], label=labels.index(r["label"])) for r in rows]
    return [
        TokenizedEvent(input_ids=ids, label=e.label, pair_start=start, partition=0, offset=i, timestamp_ms=0)
        for i, (e, (ids, start)) in enumerate(zip(events, tokenize(events), strict=True))
    ]


def events_through_broker(
    rows: Sequence[Row], settings: Settings, tokenizer: Any, bootstrap: str, timeout_s: float = 300.0
) -> list[TokenizedEvent]:
    """The stream as the learner receives it: produced to Kafka, read back by the service's consumer.

    The rows are produced (as the events users send, :func:`~stream_learner.core.events.encode_event`) to a
    fresh one-partition topic — one partition keeps the stream's order — and consumed by an
    :class:`~stream_learner.service.consumer.EventConsumer` thread, which parses, validates and tokenizes them
    exactly as in the service. Every row is valid, so every one must come back, in order; raises
    :class:`RuntimeError` otherwise.
    """
    from stream_learner.core.events import encode_event
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
    ensure_topics(s.kafka.librdkafka(), {topic: 1, s.kafka.dead_letter_topic: 1})
    produce_lines(
        s.kafka.librdkafka(), topic, [encode_event(r["text"], r["label"]) for r in rows], partition=0
    )

    fresh: queue.Queue = queue.Queue(maxsize=s.kafka.queue_max_batches)
    stop = threading.Event()
    consumer = EventConsumer(s, tokenizer, fresh, queue.Queue(), Metrics(), stop)
    thread = threading.Thread(target=consumer.run, name="eval-consumer", daemon=True)
    thread.start()
    events: list[TokenizedEvent] = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(events) < len(rows) and time.monotonic() < deadline and thread.is_alive():
            try:
                events.extend(fresh.get(timeout=0.5).events)
            except queue.Empty:
                continue
    finally:
        stop.set()
        consumer.close_event.set()
        thread.join(timeout=30)
    if [e.offset for e in events] != list(range(len(rows))):
        raise RuntimeError(
            f"{len(events)} of {len(rows)} events came back from topic {topic!r} within {timeout_s:.0f} s "
            f"(or out of order): is the broker at {bootstrap} up?"
        )
    return events


def build_heldout(
    rows: Sequence[Row], cfg: EvalConfig, tokenize: Tokenize, labels: LabelSet, pad_id: int, with_types: bool
) -> HeldOut:
    rng = np.random.default_rng(cfg.data_seed)
    chosen: list[Row] = []
    for domain in DOMAINS:
        block = [r for r in rows if r["domain"] == domain]
        if cfg.heldout_per_domain is not None and len(block) > cfg.heldout_per_domain:
            block = [block[i] for i in sorted(rng.choice(len(block), cfg.heldout_per_domain, replace=False))]
        chosen.extend(block)
    events = tokenize_rows(chosen, tokenize, labels)
    order = sorted(range(len(events)), key=lambda i: len(events[i].input_ids))
    batches = [
        collate([events[i] for i in order[k : k + cfg.eval_batch_size]], pad_id, with_types)
        for k in range(0, len(order), cfg.eval_batch_size)
    ]
    for b in batches:
        b.pop("labels")
    return HeldOut(
        batches=batches,
        labels=np.array([events[i].label for i in order], dtype=np.int64),
        domains=np.array([DOMAINS.index(chosen[i]["domain"]) for i in order], dtype=np.int64),
        sizes={d: sum(r["domain"] == d for r in chosen) for d in DOMAINS},
    )


@torch.no_grad()
def evaluate_heldout(model: torch.nn.Module, heldout: HeldOut) -> tuple[list[float], list[float]]:
    """Accuracy and macro-F1 per domain of the model as it is now (eval mode, no gradient)."""
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
    for d in range(len(DOMAINS)):
        m = heldout.domains == d
        accs.append(accuracy(preds[m], heldout.labels[m]))
        f1s.append(macro_f1(preds[m], heldout.labels[m]))
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
    domains = scenario.domains if order is None else scenario.domains[order]
    n = len(events)
    checkpoints = checkpoint_positions(n, scenario.boundaries, cfg.checkpoint_every())

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

    # the accuracy matrix at the domain boundaries: row i = after the events of block i
    ends = [*scenario.boundaries, n]
    at = {c["events"]: c for c in curve}
    matrix = np.array([at[e]["accuracy"] for e in ends])
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
        "accuracy_matrix": matrix.tolist(),
        "metrics": {
            "final_accuracy": float(np.mean(final["accuracy"])),
            "final_f1": float(np.mean(final["f1"])),
            "forgetting": average_forgetting(matrix),
            "bwt": backward_transfer(matrix),
            "prequential_accuracy": float(correct.mean()),
            "prequential_loss": float(losses.mean()),
        },
        "prequential": {
            "correct": correct.astype(np.int8).tolist(),
            "loss": np.round(losses, 4).tolist(),
            "label": [e.label for e in events],
            "domain": domains.tolist(),
        },
    }
    if trainer.drift is not None:
        positions = trainer.drift.monitor.detection_positions()
        result["drift"] = {"positions": positions, "report": drift_report(positions, scenario.boundaries, n)}
    return result


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
        if "drift" not in r:
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
        for scenario in cfg.scenarios
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


def _start_worker(
    scenarios: dict[str, Scenario], heldout: HeldOut, cfg: EvalConfig, threads: int, steps: Any
) -> None:
    torch.set_num_threads(threads)
    base = run_settings(cfg, STRATEGIES["default"], 0)
    _worker.update(
        scenarios=scenarios, heldout=heldout, cfg=cfg, steps=steps, tokenizer=load_tokenizer(base.model)
    )


def _run_in_worker(scenario: str, strategy: Strategy, seed: int) -> dict[str, Any]:
    w = _worker
    return run_one(
        w["scenarios"][scenario], w["heldout"], strategy, seed, w["cfg"], w["tokenizer"], w["steps"].put
    )


def run_in_processes(
    plan: Sequence[tuple[str, Strategy, int]],
    scenarios: dict[str, Scenario],
    heldout: HeldOut,
    cfg: EvalConfig,
    bar: Any,
    task: Any,
) -> list[dict[str, Any]]:
    """The runs of ``plan`` on ``cfg.jobs`` worker processes; the results in ``plan``'s order.

    Runs are independent, so on a machine with several cores whole runs in parallel use them better
    than torch's intra-op threads do on a small model. Workers are spawned (not forked: the parent
    holds torch's thread pools) and each gets the tokenized streams once; the costliest runs go first
    so the last ones to finish are short. Each worker reports its steps through a queue, which feeds
    the progress bar. A run's result does not depend on the process it ran in.
    """
    import multiprocessing as mp
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    threads = cfg.threads or max(1, (torch.get_num_threads() or 1) // cfg.jobs)
    order = sorted(range(len(plan)), key=lambda i: -run_cost(plan[i][1], cfg))
    context = mp.get_context("spawn")
    with context.Manager() as manager:
        steps = manager.Queue()
        with ProcessPoolExecutor(
            cfg.jobs,
            mp_context=context,
            initializer=_start_worker,
            initargs=(scenarios, heldout, cfg, threads, steps),
        ) as pool:
            futures = {pool.submit(_run_in_worker, *plan[i]): i for i in order}
            pending, done = set(futures), 0
            while pending:
                finished, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
                done += len(finished)
                for future in finished:
                    if future.exception() is not None:  # fail fast: the queued runs are not started
                        pool.shutdown(wait=True, cancel_futures=True)
                        raise future.exception()  # type: ignore[misc]
                bar.update(task, description=f"{done}/{len(plan)} runs done, {cfg.jobs} at a time")
                while True:
                    try:
                        bar.advance(task, steps.get_nowait())
                    except queue.Empty:
                        break
            results: list[dict[str, Any]] = [{}] * len(plan)
            for future, i in futures.items():
                results[i] = future.result()
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

    for name in cfg.scenarios:
        if name not in SCENARIOS:
            raise ValueError(f"unknown scenario {name!r}; choose from {sorted(SCENARIOS)}")
    plan = plan_runs(cfg)  # validates the strategy names before anything heavy

    base = run_settings(cfg, STRATEGIES["default"], 0)
    tokenizer = load_tokenizer(base.model)
    tokenize, labels = Tokenize(tokenizer, base.model.max_length), LabelSet(base.model.labels)
    with_types = "token_type_ids" in tokenizer.model_input_names
    stream_rows = list(read_jsonl(bundled_path(STREAM)))
    heldout = build_heldout(
        list(read_jsonl(bundled_path(HELDOUT))),
        cfg,
        tokenize,
        labels,
        tokenizer.pad_token_id or 0,
        with_types,
    )
    scenarios: dict[str, Scenario] = {}
    with contextlib.ExitStack() as stack:
        bootstrap = cfg.broker
        if bootstrap == "local":
            from stream_learner.tools.local_broker import LocalBroker

            bootstrap = stack.enter_context(LocalBroker()).bootstrap_servers
        for name in cfg.scenarios:
            rows = make_stream(name, stream_rows, cfg, base.model.labels)
            domains = np.array([DOMAINS.index(r["domain"]) for r in rows], dtype=np.int64)
            events = (
                tokenize_rows(rows, tokenize, labels)
                if bootstrap is None
                else events_through_broker(rows, base, tokenizer, bootstrap)
            )
            scenarios[name] = Scenario(name, events, domains, boundaries_of(domains))

    started = time.perf_counter()
    total = sum(len(scenarios[s].events) for s, _, _ in plan)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, disable=not progress) as bar:
        task = bar.add_task("eval", total=total)
        if cfg.jobs > 1:
            runs = run_in_processes(plan, scenarios, heldout, cfg, bar, task)
        else:
            runs = []
            for i, (name, strategy, seed) in enumerate(plan, 1):
                bar.update(task, description=f"run {i}/{len(plan)} {name} · {strategy.name} · seed {seed}")
                runs.append(
                    run_one(
                        scenarios[name],
                        heldout,
                        strategy,
                        seed,
                        cfg,
                        tokenizer,
                        lambda k: bar.advance(task, k),
                    )
                )

    results: dict[str, Any] = {
        "format": FORMAT,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": cfg.to_json(),
        "environment": environment(),
        "domains": list(DOMAINS),
        "labels": list(base.model.labels),
        "strategies": {s.name: dataclasses.asdict(s) for s in {st.name: st for _, st, _ in plan}.values()},
        "scenarios": {
            name: {
                "about": SCENARIOS[name],
                "events": len(s.events),
                "boundaries": s.boundaries,
                "label_counts": label_counts(s, len(labels)),
            }
            for name, s in scenarios.items()
        },
        "heldout": {"per_domain": heldout.sizes},
        "runs": runs,
        "summary": summarize(runs),
        "drift": summarize_drift(runs),
        "wall_seconds": time.perf_counter() - started,
    }
    results["plots"] = write_plots(results, out)
    (out / "results.json").write_text(json.dumps(results, allow_nan=True, separators=(",", ":")))
    return results


def label_counts(scenario: Scenario, num_labels: int) -> dict[str, list[int]]:
    """Events per label in each domain block of the stream."""
    y = scenario.labels
    return {
        d: np.bincount(y[scenario.domains == k], minlength=num_labels).tolist() for k, d in enumerate(DOMAINS)
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
