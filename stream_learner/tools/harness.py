"""The trainer alone: the service's trainer thread fed from memory, measured.

Shared by ``stream-learner bench`` (``bench.py``: the trainer-alone runs and the ablation), the
data-parallel scaling run (``scaling.py``: each rank runs :func:`run_trainer_alone` on its share) and
``benchmarks/compile.py``. Here rather than in ``bench.py`` so that ``scaling.py`` and ``bench.py`` do
not import each other (the tools layer has no import cycles: docs/architecture.md, "Rules").
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Self

import numpy as np
import psutil

from stream_learner.core.config import Settings
from stream_learner.core.events import LabeledEvent, LabelSet, TokenizedEvent, encode_event
from stream_learner.core.intake import ConsumedBatch, Tokenize
from stream_learner.service.limits import MiB
from stream_learner.tools.datasets import STREAM, bundled_path, read_jsonl
from stream_learner.training.distributed import Group
from stream_learner.training.factory import build_trainer
from stream_learner.training.observers import StepLog, StepRecord
from stream_learner.training.threads import hand_over_threads, process_threads

# ============================================================================================ data


@dataclass
class BenchData:
    """The bench's events: an evenly spaced sample of the bundled stream, as rows, values and tokens."""

    rows: list[dict]
    values: list[bytes]  # the Kafka message values
    events: list[TokenizedEvent]  # tokenized as the consumer does; partition 0, offset = index
    all_values: list[bytes]  # the whole stream, in its order (the consumer's rate)
    all_tokens: list[np.ndarray]  # the whole stream's token ids (replay memory)
    all_labels: list[int]


def load_data(settings: Settings, n: int, tokenizer: Any, whole_stream: bool = True) -> BenchData:
    """``n`` events spread evenly over the bundled stream (its four domains in their proportions), in
    stream order; more than the stream holds repeats it. ``whole_stream`` False leaves the whole
    stream's values, tokens and labels empty and tokenizes only the ``n`` (a scaling rank: 1.3 s less)."""
    rows = list(read_jsonl(bundled_path(STREAM)))
    if n <= len(rows):
        pick = np.linspace(0, len(rows) - 1, num=n).round().astype(int).tolist()
    else:
        pick = np.resize(np.arange(len(rows)), n).tolist()
    wanted = range(len(rows)) if whole_stream else sorted(set(pick))
    labels = LabelSet(settings.model.labels)
    parsed = {i: LabeledEvent(text=rows[i]["text"], label=labels.index(rows[i]["label"])) for i in wanted}
    tokenized = Tokenize(tokenizer, settings.model.max_length)(list(parsed.values()))
    tokens = {i: ids for i, (ids, _) in zip(parsed, tokenized, strict=True)}
    values = {i: encode_event(rows[i]["text"], rows[i]["label"], id=str(i)) for i in wanted}
    events = [
        TokenizedEvent(tokens[i], parsed[i].label, 0, partition=0, offset=k, timestamp_ms=0)
        for k, i in enumerate(pick)
    ]
    everything = whole_stream or None
    return BenchData(
        [rows[i] for i in pick],
        [values[i] for i in pick],
        events,
        list(values.values()) if everything else [],
        list(tokens.values()) if everything else [],
        [e.label for e in parsed.values()] if everything else [],
    )


# ===================================================================================== measurements


class Sampler:
    """Calls :meth:`check` on a thread of its own every ``every_s`` seconds while a ``with`` block runs,
    once as it starts and once more as it ends, so that the first and the last state are seen."""

    every_s = 0.02

    def check(self) -> None:
        raise NotImplementedError

    def _run(self, stop: threading.Event) -> None:
        while not stop.wait(self.every_s):
            self.check()

    def __enter__(self) -> Self:
        self._stop = threading.Event()
        self.check()
        self._thread = threading.Thread(
            target=self._run, args=(self._stop,), name=type(self).__name__, daemon=True
        )
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.check()


class PeakRSS(Sampler):
    """Peak resident memory of this process while the block runs (psutil, sampled every 20 ms)."""

    def __init__(self) -> None:
        self.peak = 0
        self._proc = psutil.Process()

    def check(self) -> None:
        self.peak = max(self.peak, self._proc.memory_info().rss)

    @property
    def mib(self) -> float:
        return self.peak / MiB


def summarize_steps(records: Sequence[StepRecord], warmup_events: int) -> dict[str, Any]:
    """Rates, busy fraction and padding of the steps after the first ``warmup_events`` fresh events.

    The span runs from the first measured step's start to the last one's end, so what happens between
    steps (waiting for events, snapshots) counts against the rates; ``busy`` is the share of the span
    spent inside steps.
    """
    seen, measured = 0, []
    for r in records:
        if seen >= warmup_events:
            measured.append(r)
        seen += len(r.fresh)
    if not measured:
        raise ValueError(f"no step after the {warmup_events} warm-up events: measure more events")
    span = measured[-1].ended - measured[0].started
    fresh = sum(len(r.fresh) for r in measured)
    examples = fresh + sum(r.replayed for r in measured)
    return {
        "steps": len(measured),
        "fresh_events": fresh,
        "examples": examples,
        "seconds": span,
        "events_per_second": fresh / span,
        "examples_per_second": examples / span,
        "busy_fraction": sum(r.ended - r.started for r in measured) / span,
        # with one torch thread, the share of the cores the trainer thread got while in its steps
        "trainer_cpu_share": sum(r.cpu_seconds for r in measured)
        / sum(r.ended - r.started for r in measured),
        "padding_efficiency": sum(r.real_tokens for r in measured) / sum(r.padded_tokens for r in measured),
        "real_tokens_per_second": sum(r.real_tokens for r in measured) / span,
        # the warm-up's steps, first step's start to the first measured one's (compiling, if any)
        "warmup_seconds": measured[0].started - records[0].started,
        "first_measured": measured[0].started,
        "last_measured": measured[-1].ended,
    }


# ========================================================================================== harnesses


def run_trainer_alone(
    settings: Settings,
    tokenizer: Any,
    events: Sequence[TokenizedEvent],
    warmup: int,
    fused: bool = True,
    group: Group | None = None,
    threads: int | None = None,
) -> dict[str, Any]:
    """The trainer thread (``TrainingLoop.run``) on events fed from memory in consumer-sized batches.

    In a data-parallel ``group`` (``scaling.py``) each rank runs this on its share of the events.
    ``fused`` False builds AdamW without the fused kernel (ablation). The trainer thread takes
    ``threads`` (default: the process's, ``training/threads.py``), this one hands its own over, as
    in the service.
    """
    threads = threads or process_threads()
    hand_over_threads()
    s = settings.model_copy(
        update={
            "publish": settings.publish.model_copy(
                update={"every_steps": 10**9, "every_seconds": 1e12, "on_stop": False}
            )
        }
    )
    log = StepLog()
    trainer = build_trainer(s, tokenizer, observers=[log], group=group, fused=fused, threads=threads)
    records = log.records
    size = settings.kafka.poll_max_messages

    def feed() -> None:
        for i in range(0, len(events), size):
            chunk = list(events[i : i + size])
            trainer.fresh_queue.put(ConsumedBatch(chunk, {0: chunk[-1].offset + 1}))

    feeder = threading.Thread(target=feed, daemon=True)
    runner = threading.Thread(target=trainer.run, daemon=True)
    with PeakRSS() as rss:
        feeder.start()
        runner.start()
        while trainer.counters.events_trained < len(events) and runner.is_alive():
            runner.join(0.05)
        trainer.stop_event.set()
        runner.join()
    out = summarize_steps(records, warmup)
    out["total_steps"], out["events_trained"] = trainer.counters.steps, trainer.counters.events_trained
    out["peak_rss_mib"] = rss.mib
    out["optimizer"] = "fused AdamW" if fused else "torch.optim.AdamW()"
    out["bucket_window"] = settings.training.bucket_window
    return out
