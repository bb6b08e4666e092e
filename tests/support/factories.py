"""Building real pieces for tests: settings (the tiny model, or the 1-layer MiniLM where a test asserts
learning), tokenized events, a trainer."""

from __future__ import annotations

import functools
import queue

import numpy as np

from stream_learner.core.config import Settings, load_settings
from stream_learner.core.events import LabeledEvent, LabelSet, TokenizedEvent
from stream_learner.core.intake import ConsumedBatch, Tokenize
from stream_learner.core.model import load_tokenizer
from stream_learner.service.metrics import Metrics, MetricsObserver
from stream_learner.tools.datasets import TINY, bundled_path, read_jsonl
from stream_learner.training.distributed import Group
from stream_learner.training.factory import build_trainer
from stream_learner.training.loop import TrainingLoop
from stream_learner.training.observers import StepRecord
from stream_learner.training.state import Snapshot
from tests.support.tiny_model import tiny_model_dir


def _settings(model: dict, sections: dict[str, dict]) -> Settings:
    base: dict[str, dict] = {
        "model": {**model, "max_length": 64},
        "training": {"fresh_per_step": 8, "replay_per_step": 8, "max_wait_s": 0.2, "learning_rate": 1e-4},
        "replay": {"capacity": 200},
        "http": {"enabled": False},
    }
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values}
    return load_settings(**base)


def small_settings(**sections: dict) -> Settings:
    """Settings for tests of mechanics: the tiny random model (:mod:`tests.support.tiny_model`, 1 M
    parameters, the real tokenizer), short sequences, no HTTP."""
    return _settings({"name_or_path": tiny_model_dir()}, sections)


def pretrained_settings(**sections: dict) -> Settings:
    """Settings for tests that assert learning: the bundled MiniLM cut to 1 layer (14 M parameters),
    otherwise as :func:`small_settings`."""
    return _settings({"num_hidden_layers": 1}, sections)


@functools.cache
def tokenizer():
    """The bundled tokenizer: the tiny model's is a copy of it."""
    return load_tokenizer(pretrained_settings().model)


def tiny_rows(n: int | None = None) -> list[dict]:
    rows = list(read_jsonl(bundled_path(TINY)))
    return rows[:n] if n else rows


def tokenized(
    rows: list[dict], settings: Settings, partition: int = 0, first_offset: int = 0, timestamp_ms: int = 0
) -> list[TokenizedEvent]:
    labels = LabelSet(settings.model.labels)
    events = [LabeledEvent(text=r["text"], label=labels.index(r["label"])) for r in rows]
    toks = Tokenize(tokenizer(), settings.model.max_length)(events)
    return [
        TokenizedEvent(
            input_ids=ids,
            label=e.label,
            pair_start=start,
            partition=partition,
            offset=first_offset + i,
            timestamp_ms=timestamp_ms,
        )
        for i, (e, (ids, start)) in enumerate(zip(events, toks, strict=True))
    ]


def batch(events: list[TokenizedEvent], next_offsets: dict[int, int] | None = None) -> ConsumedBatch:
    if next_offsets is None:
        next_offsets = {events[-1].partition: events[-1].offset + 1}
    return ConsumedBatch(events=events, next_offsets=next_offsets)


def make_trainer(
    settings: Settings, restored: Snapshot | None = None, group: Group | None = None
) -> TrainingLoop:
    """The service's trainer (the one factory), with its metrics, fed from memory."""
    return build_trainer(
        settings,
        tokenizer(),
        fresh_queue=queue.Queue(maxsize=8),
        observers=[MetricsObserver(Metrics())],
        restored=restored,
        group=group,
    )


def step_record(
    started: float,
    ended: float,
    events: list[TokenizedEvent],
    replayed: int,
    *,
    skipped: bool = False,
    real_tokens: int = 10,
    padded_tokens: int = 10,
    cpu_seconds: float | None = None,
) -> StepRecord:
    """A training step's record, as the loop hands it to its observers (no predictions kept)."""
    none = np.zeros(0)
    return StepRecord(
        started=started,
        ended=ended,
        fresh=events,
        replayed=replayed,
        real_tokens=real_tokens,
        padded_tokens=padded_tokens,
        loss=float("nan") if skipped else 0.5,
        skipped=skipped,
        cpu_seconds=ended - started if cpu_seconds is None else cpu_seconds,
        predictions=none,
        labels=none,
        losses=none,
        steps=1,
        penalty=0.0,
        param_distance=None,
        replay_size=0,
        replay_bytes=0,
    )
