"""``replay.class_balanced`` reaches training before the reservoir is full (issue 18): the trainer's
replayed examples are drawn class-balanced, so the model sees different batches and ends with different
weights, although both reservoirs store exactly the same examples."""

from __future__ import annotations

import math

import torch

from stream_learner.core.events import TokenizedEvent
from stream_learner.training.loop import TrainingLoop
from tests.support.factories import make_trainer, small_settings, tiny_rows, tokenized

FRESH, REPLAY, FIRST, MIXED = 8, 16, 5, 12  # windows of one step; 136 events, capacity 200


def _one_class_then_mixed(settings) -> list[TokenizedEvent]:
    """5 windows of "neg" only, then 12 windows in which every 4th event is "pos"."""
    rows = tiny_rows()
    neg = [r for r in rows if r["label"] == "neg"]
    pos = [r for r in rows if r["label"] == "pos"]
    first = neg[: FIRST * FRESH]
    rest = neg[FIRST * FRESH :]
    mixed = [pos.pop(0) if i % 4 == 3 else rest.pop(0) for i in range(MIXED * FRESH)]
    return tokenized(first + mixed, settings)


def _record_replayed(tr: TrainingLoop) -> list[list[int]]:
    """The labels of the replayed examples of each step, as they reach the step engine (the loop hands
    it the fresh events first, then the replayed ones)."""
    replayed: list[list[int]] = []
    engine_step = tr.engine.step

    def step(examples, n_fresh):
        replayed.append([e.label for e in examples[n_fresh:]])
        return engine_step(examples, n_fresh)

    tr.engine.step = step
    return replayed


def _train(class_balanced: bool) -> tuple[TrainingLoop, list[list[int]], list[tuple[float, float]]]:
    s = small_settings(
        training={"fresh_per_step": FRESH, "replay_per_step": REPLAY},
        replay={"capacity": 200, "class_balanced": class_balanced},
    )
    tr = make_trainer(s)
    replayed = _record_replayed(tr)
    events = _one_class_then_mixed(s)
    # the expected number of "pos" among the replayed examples of each step, given what is stored then
    # (the step draws n = min(REPLAY, stored) examples), as (mean, binomial variance) per step
    expected: list[tuple[float, float]] = []
    for i in range(0, len(events), FRESH):
        counts = tr.replay.label_counts()
        stored = sum(counts.values())
        if stored:
            n = min(REPLAY, stored)
            p = 0.5 if len(counts) == 2 and class_balanced else counts.get(1, 0) / stored
            expected.append((n * p, n * p * (1 - p)))
        tr.train_window(events[i : i + FRESH], steps=1)
    assert tr.counters.nonfinite_skipped == 0  # every step stored its fresh events
    return tr, replayed, expected


def test_class_balanced_replay_reaches_training_before_the_reservoir_is_full():
    plain, plain_replayed, plain_expected = _train(class_balanced=False)
    cbrs, cbrs_replayed, cbrs_expected = _train(class_balanced=True)

    # the reservoirs never filled, so CBRS's eviction never acted: both store the same examples
    assert len(cbrs.replay) == len(plain.replay) == (FIRST + MIXED) * FRESH < cbrs.replay.capacity
    assert list(cbrs.replay) == list(plain.replay)
    assert cbrs.replay.label_counts() == {0: 112, 1: 24}
    # the first window had nothing to replay, the second its 8 events, then REPLAY examples per step;
    # only "neg" while only it was stored
    drawn = [0, FRESH] + [REPLAY] * (FIRST + MIXED - 2)
    assert [len(r) for r in plain_replayed] == [len(r) for r in cbrs_replayed] == drawn
    assert all(set(r) == {0} for r in cbrs_replayed[1 : FIRST + 1])

    # What was replayed follows the stored mix (~11 % "pos") with Algorithm R, and is half and half
    # with CBRS. Tolerance: 5 binomial sigmas of the total over the steps (5.7e-7 two-sided; Algorithm
    # R draws without replacement, which only narrows its spread); the intervals, about [0, 44] and
    # [55, 121] of 192 draws once "pos" is stored, do not overlap, and the seed is fixed.
    for replayed, expected in ((plain_replayed, plain_expected), (cbrs_replayed, cbrs_expected)):
        got = sum(map(sum, replayed))
        mean, variance = (sum(x) for x in zip(*expected, strict=True))
        assert abs(got - mean) <= 5 * math.sqrt(variance), (got, mean)
    assert sum(map(sum, cbrs_replayed)) > 2 * sum(map(sum, plain_replayed))

    # so, unlike before issue 18, the two learners end with different weights
    weights = plain.engine.model.state_dict()
    assert any(not torch.equal(v, weights[k]) for k, v in cbrs.engine.model.state_dict().items())
