"""What the training loop tells its observers: a :class:`StepRecord` per step, and a few loop events.

The loop does not know who listens: the service's Prometheus metrics
(``service/metrics.py``, ``MetricsObserver``), the bench's step log, the evaluation's prequential
record. An observer subclasses :class:`LoopObserver` and overrides what it needs; every method is
called on the trainer thread, between steps, and must be quick.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from stream_learner.core.events import TokenizedEvent


@dataclass
class StepRecord:
    """What one step did, and the learner's state right after it."""

    started: float  # time.time() at the start of the step
    ended: float  # time.time() at its end
    fresh: Sequence[TokenizedEvent]  # the fresh events it learned (partition, offset, produce time)
    replayed: int
    real_tokens: int  # tokens of the examples
    padded_tokens: int  # examples × the longest of them: what the model computed on
    loss: float  # mean cross-entropy (NaN if the step was skipped)
    skipped: bool  # a non-finite loss: no update
    cpu_seconds: float  # CPU time of the trainer thread in the step (its own share of the cores)
    predictions: np.ndarray  # the fresh events' predictions by the weights before the step
    labels: np.ndarray
    losses: np.ndarray  # the fresh events' cross-entropy before the step
    steps: int  # steps taken so far (the lineage's count)
    penalty: float  # λ‖θ_S − θ0_S‖², as last measured
    param_distance: float | None  # ‖θ_S − θ0_S‖ when measured at this step (every few steps), else None
    replay_size: int
    replay_bytes: int
    prequential: dict[str, float] = field(default_factory=dict)  # PrequentialScores.summary()
    drift_fired: list[str] = field(default_factory=list)  # signals that detected a shift at this step
    drift_scores: dict[str, float] = field(default_factory=dict)


class LoopObserver:
    """Receives the training loop's events; every method does nothing unless overridden."""

    def on_step(self, record: StepRecord) -> None:
        """After every step (skipped ones too)."""

    def on_take(self, queue_depth: int) -> None:
        """After the loop took a window's events from the queue: the batches still waiting."""

    def on_probe(self, accuracy: float) -> None:
        """A snapshot measured the probe set's accuracy (the poisoning gate's measure)."""

    def on_weight_check(self) -> None:
        """A data-parallel group checked that every rank holds the same weights."""


class StepLog(LoopObserver):
    """Keeps every :class:`StepRecord` (the bench's measurements come from these)."""

    def __init__(self) -> None:
        self.records: list[StepRecord] = []

    def on_step(self, record: StepRecord) -> None:
        self.records.append(record)
