"""The training loop's step records as Prometheus metrics (``MetricsObserver``), issue 18.

Throughput and speed are counters, so that ``rate()`` in Prometheus gives averages over any window;
the per-second gauges are instantaneous (a moving average over the last steps) and say so.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Histogram

from stream_learner.core.events import TokenizedEvent
from stream_learner.service.metrics import EWMA_WEIGHT, PREFIX, CountedHistogram, Metrics, MetricsObserver
from stream_learner.training.observers import StepRecord
from tests.support.factories import step_record

NONE = np.zeros(0)


def record(
    seconds: float, fresh: int, replayed: int, skipped: bool = False, started: float = 1000.0
) -> StepRecord:
    events = [
        TokenizedEvent(
            input_ids=np.array([1, 2, 3]), label=0, pair_start=0, partition=0, offset=i, timestamp_ms=0
        )
        for i in range(fresh)
    ]
    record = step_record(
        started,
        started + seconds,
        events,
        replayed,
        skipped=skipped,
        real_tokens=3 * (fresh + replayed),
        padded_tokens=3 * (fresh + replayed),
    )
    return dataclasses.replace(record, replay_size=replayed)


def counts(m: Metrics) -> dict[str, float]:
    names = (
        "events_trained_total",
        "examples_replayed_total",
        "examples_trained_total",
        "step_seconds_sum",
        "step_seconds_count",
        "steps_total",
        "nonfinite_steps_skipped_total",
    )
    return {name: m.value(f"{PREFIX}_{name}") for name in names}


def test_a_step_record_increments_the_counters_by_its_examples_and_duration() -> None:
    m = Metrics()
    observer = MetricsObserver(m)
    observer.on_step(record(seconds=2.0, fresh=4, replayed=6))
    assert counts(m) == {
        "events_trained_total": 4,
        "examples_replayed_total": 6,
        "examples_trained_total": 10,
        "step_seconds_sum": 2.0,
        "step_seconds_count": 1,
        "steps_total": 1,
        "nonfinite_steps_skipped_total": 0,
    }
    observer.on_step(record(seconds=0.5, fresh=8, replayed=2))
    assert counts(m) == {
        "events_trained_total": 12,
        "examples_replayed_total": 8,
        "examples_trained_total": 20,
        "step_seconds_sum": 2.5,
        "step_seconds_count": 2,
        "steps_total": 2,
        "nonfinite_steps_skipped_total": 0,
    }
    # what rate(examples_trained_total) / rate(step_seconds_sum) computes: 20 examples in 2.5 s of steps
    assert m.value(f"{PREFIX}_examples_trained_total") / m.value(f"{PREFIX}_step_seconds_sum") == 8.0


def test_a_skipped_step_counts_its_examples_and_time_but_no_optimizer_step() -> None:
    """Every step that ran is in the counters (events_trained always was): a non-finite step took time."""
    m = Metrics()
    observer = MetricsObserver(m)
    observer.on_step(record(seconds=1.0, fresh=3, replayed=5, skipped=True))
    assert counts(m) == {
        "events_trained_total": 3,
        "examples_replayed_total": 5,
        "examples_trained_total": 8,
        "step_seconds_sum": 1.0,
        "step_seconds_count": 1,
        "steps_total": 0,
        "nonfinite_steps_skipped_total": 1,
    }


def test_the_per_second_gauges_are_a_moving_average_of_the_last_steps() -> None:
    m = Metrics()
    observer = MetricsObserver(m)
    observer.on_step(record(seconds=2.0, fresh=4, replayed=6))  # 5 examples/s, 2 events/s: the start
    assert m.value(f"{PREFIX}_examples_per_second") == pytest.approx(5.0)
    assert m.value(f"{PREFIX}_events_per_second") == pytest.approx(2.0)
    observer.on_step(record(seconds=0.5, fresh=8, replayed=2))  # 20 examples/s, 16 events/s
    assert m.value(f"{PREFIX}_examples_per_second") == pytest.approx((1 - EWMA_WEIGHT) * 5 + EWMA_WEIGHT * 20)
    assert m.value(f"{PREFIX}_events_per_second") == pytest.approx((1 - EWMA_WEIGHT) * 2 + EWMA_WEIGHT * 16)


def test_the_gauges_help_says_instantaneous_and_names_the_counters_to_rate() -> None:
    docs = {f.name: f.documentation for f in Metrics().registry.collect()}
    exposed = {s.name for f in Metrics().registry.collect() for s in f.samples}
    for gauge, counter in (
        (f"{PREFIX}_examples_per_second", f"{PREFIX}_examples_trained_total"),
        (f"{PREFIX}_events_per_second", f"{PREFIX}_events_trained_total"),
    ):
        help_ = docs[gauge]
        assert "instantaneous" in help_ and "moving average" in help_ and f"weight {EWMA_WEIGHT:g}" in help_
        assert f"rate({counter})" in help_ and f"rate({PREFIX}_step_seconds_sum)" in help_
    # every metric a help string names is one the learner exposes, as spelled there
    for name, help_ in docs.items():
        for named in re.findall(rf"\b{PREFIX}_\w+", help_):
            assert named in exposed, f"the help of {name} names {named}, which is not exposed"


@given(st.lists(st.tuples(st.floats(0, 1e5, allow_nan=False), st.integers(0, 50)), max_size=40))
def test_a_counted_histogram_exposes_what_as_many_single_observations_would(observed) -> None:
    """``CountedHistogram.observe(v, n)`` against prometheus_client's own Histogram observing v n times:
    the same buckets, count and sum (the series the freshness panel's quantiles are computed from)."""
    buckets = (0.5, 1, 10, 60, 3600)
    ours = CountedHistogram("age_seconds", "Ages", buckets, CollectorRegistry())
    theirs_registry = CollectorRegistry()
    theirs = Histogram("age_seconds", "Ages", buckets=buckets, registry=theirs_registry)
    for value, n in observed:
        ours.observe(value, n)
        for _ in range(n):
            theirs.observe(value)

    def samples(families) -> dict:
        return {
            (s.name, s.labels.get("le")): s.value
            for f in families
            for s in f.samples
            if not s.name.endswith("_created")
        }

    mine, reference = samples(ours.collect()), samples(theirs_registry.collect())
    assert mine.keys() == reference.keys()
    for key, value in reference.items():
        assert mine[key] == pytest.approx(value, rel=1e-9, abs=1e-6), key
