"""CBRS's class-balanced draw: balanced before the buffer is full, exact after a snapshot, boundaries."""

from __future__ import annotations

import json
import math
from collections import Counter

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from stream_learner.core.replay import ClassBalancedReservoir, ReservoirBuffer


def _five_sigma(trials: int, p: float) -> float:
    """5 standard deviations of a Binomial(trials, p) count: a two-sided false failure has probability
    5.7e-7 (and the seeds are fixed, so the outcome is reproducible)."""
    return 5 * math.sqrt(trials * p * (1 - p))


def _one_class_then_mixed(*buffers: ReservoirBuffer, first: int, then: int, every: int) -> None:
    """``first`` examples of class 0, then ``then`` more in which every ``every``-th is class 1.
    Example ``i``'s tokens are ``[i]``, so draws can be traced back to the stream."""
    labels = [0] * first + [int(j % every == every - 1) for j in range(then)]
    for i, y in enumerate(labels):
        for buf in buffers:
            buf.add([i], y)


# -- 1. before the buffer is full, the balanced draw is balanced and the plain one follows the mix -----


def test_balanced_draw_before_the_buffer_is_full() -> None:
    # 300 of class 0, then 100 at 1 in 5: 320 of class 0 and 20 of class 1 stored, far from capacity
    plain, cbrs = ReservoirBuffer(1000, seed=7), ClassBalancedReservoir(1000, seed=7)
    _one_class_then_mixed(plain, cbrs, first=300, then=100, every=5)
    assert plain.label_counts() == cbrs.label_counts() == {0: 380, 1: 20}
    assert list(plain) == list(cbrs)  # eviction has not acted: the two store exactly the same

    draws, k = 2000, 16
    trials = draws * k  # 32,000 replayed examples per buffer
    share = {}
    per_example = Counter()
    for buf in (plain, cbrs):
        ones = 0
        for _ in range(draws):
            batch = buf.sample(k)
            # class 1 is drawn ~8 times out of 16 and holds 20: every draw is still distinct
            assert len({int(e.input_ids[0]) for e in batch}) == k
            ones += sum(e.label for e in batch)
            if buf is cbrs:
                per_example.update(int(e.input_ids[0]) for e in batch if e.label == 1)
        share[type(buf)] = ones
    # Tolerance: 5 binomial sigmas on 32,000 draws (±447, i.e. ±1.4 points of share for the balanced
    # draw, ±0.6 points for the plain one). The plain draw is without replacement within a batch, which
    # only narrows its spread, so the binomial bound is conservative. The two targets are 40 points apart.
    p_stored = 20 / 400
    assert abs(share[ReservoirBuffer] - trials * p_stored) <= _five_sigma(trials, p_stored)
    assert abs(share[ClassBalancedReservoir] - trials * 0.5) <= _five_sigma(trials, 0.5)
    # within class 1, each of its 20 examples is equally likely
    n1 = sum(per_example.values())
    assert len(per_example) == 20
    assert max(abs(c - n1 / 20) for c in per_example.values()) <= _five_sigma(n1, 1 / 20)


def test_a_class_with_fewer_examples_than_draws_repeats_them_evenly() -> None:
    # 50 of class 0, then 2 of class 1: half of each draw of 40 goes to 2 examples
    cbrs = ClassBalancedReservoir(100, seed=3)
    _one_class_then_mixed(cbrs, first=50, then=2, every=1)
    assert cbrs.label_counts() == {0: 50, 1: 2}
    ones = 0
    for _ in range(500):
        batch = cbrs.sample(40)
        assert len(batch) == 40
        n1 = sum(e.label for e in batch)
        ones += n1
        counts = Counter(int(e.input_ids[0]) for e in batch if e.label == 1)
        # each of the two is repeated n1 // 2 or n1 // 2 + 1 times, never more
        assert all(n1 // 2 <= c <= n1 // 2 + 1 for c in counts.values()), counts
        # class 0 holds 50 > 40: its examples are distinct
        assert len({int(e.input_ids[0]) for e in batch if e.label == 0}) == 40 - n1
    assert abs(ones - 20_000 * 0.5) <= _five_sigma(20_000, 0.5)


def test_balanced_draw_over_three_classes_is_uniform_over_classes() -> None:
    cbrs = ClassBalancedReservoir(500, seed=11)
    for i, y in enumerate([0] * 200 + [1] * 30 + [2] * 5):
        cbrs.add([i], y)
    counts = Counter(e.label for _ in range(3000) for e in cbrs.sample(4))
    assert set(counts) == {0, 1, 2}
    assert all(abs(c - 12_000 / 3) <= _five_sigma(12_000, 1 / 3) for c in counts.values()), counts


# -- 2. boundaries: one class, tiny buffers, k at and beyond the size ----------------------------------


def test_balanced_draw_with_a_single_class_is_the_uniform_draw() -> None:
    cbrs = ClassBalancedReservoir(50, seed=5)
    assert cbrs.sample(4) == []
    for i in range(30):
        cbrs.add([i], label=1)
    assert sorted(int(e.input_ids[0]) for e in cbrs.sample(100)) == list(range(30))
    assert cbrs.sample(0) == []
    with pytest.raises(ValueError, match="k must be >= 0"):
        cbrs.sample(-1)
    counts = np.zeros(30, dtype=np.int64)
    for _ in range(4000):
        drawn = [int(e.input_ids[0]) for e in cbrs.sample(6)]
        assert len(set(drawn)) == 6
        counts[drawn] += 1
    p = 6 / 30
    assert np.abs(counts - 4000 * p).max() <= _five_sigma(4000, p)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    capacity=st.integers(1, 40),
    seed=st.integers(0, 2**32 - 1),
    labels=st.lists(st.integers(0, 3), min_size=1, max_size=120),
    k=st.integers(0, 50),
    rejection=st.booleans(),
)
@example(capacity=1, seed=0, labels=[2], k=1, rejection=False)  # one slot, one class
@example(capacity=5, seed=0, labels=[0, 0, 0, 0, 1], k=5, rejection=True)  # k == size, m_1 = 1
def test_balanced_draw_is_valid_for_any_content(
    capacity: int, seed: int, labels: list[int], k: int, rejection: bool
) -> None:
    """``min(k, len)`` faithful copies of stored examples; a class drawn ``n`` times with ``m`` stored
    shows ``min(n, m)`` distinct examples, none more than ``ceil(n / m)`` times. ``rejection`` forces
    the rejection draw (used for common classes of large buffers) wherever it applies."""
    with pytest.MonkeyPatch.context() as mp:
        if rejection:
            mp.setattr(ClassBalancedReservoir, "_TRIES_PER_SCAN", 0)
        cbrs = ClassBalancedReservoir(capacity, seed=seed)
        for i, y in enumerate(labels):
            cbrs.add([i, y], y, pair_start=i % 3)
        stored = {int(e.input_ids[0]): e for e in cbrs}
        stored_counts = cbrs.label_counts()
        for _ in range(3):
            batch = cbrs.sample(k)
            assert len(batch) == min(k, len(cbrs))
            for e in batch:
                assert stored[int(e.input_ids[0])] == e
            for c, n in Counter(e.label for e in batch).items():
                m = stored_counts[c]
                repeats = Counter(int(e.input_ids[0]) for e in batch if e.label == c)
                assert len(repeats) == min(n, m)
                assert max(repeats.values()) <= math.ceil(n / m)
        assert cbrs.label_counts() == stored_counts  # drawing changes nothing stored


def test_rejection_draw_of_a_common_class_in_a_large_buffer() -> None:
    # 20,000 stored, half per class: a draw of 8 of a class needs ~32 tries instead of a scan
    cbrs = ClassBalancedReservoir(20_000, seed=2)
    for i in range(20_000):
        cbrs.add([i], i % 2)
    counts = np.zeros(20_000, dtype=np.int64)
    for _ in range(4000):
        batch = cbrs.sample(16)
        drawn = [int(e.input_ids[0]) for e in batch]
        assert len(set(drawn)) == 16
        assert all(e.label == i % 2 for e, i in zip(batch, drawn, strict=True))
        counts[drawn] += 1
    per_class = counts.reshape(-1, 2).sum(axis=0)
    assert np.abs(per_class - 32_000).max() <= _five_sigma(64_000, 0.5)
    # uniform within a class: the two halves of the stream are drawn alike
    halves = counts[:10_000].sum(), counts[10_000:].sum()
    assert abs(halves[0] - halves[1]) <= 2 * _five_sigma(64_000, 0.5)


# -- 3. snapshots: a restored buffer goes on drawing exactly as the original ---------------------------


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    capacity=st.integers(1, 30),
    seed=st.integers(0, 2**32 - 1),
    before=st.lists(st.integers(0, 4), max_size=80),
    after=st.lists(st.integers(0, 4), max_size=40),
    k=st.integers(0, 20),
)
@example(capacity=20, seed=1, before=[0] * 15, after=[0, 1, 0, 0, 2] * 8, k=8)  # one class, then more
def test_snapshot_continues_the_balanced_draw_identically(
    capacity: int, seed: int, before: list[int], after: list[int], k: int
) -> None:
    buf = ClassBalancedReservoir(capacity, seed=seed)
    for i, y in enumerate(before):
        buf.add([i], y)
    arrays, meta = buf.state_dict()
    twin = ReservoirBuffer.from_state_dict(arrays, json.loads(json.dumps(meta)))
    assert isinstance(twin, ClassBalancedReservoir)
    assert twin.sample(k) == buf.sample(k)
    for i, y in enumerate(after, start=len(before)):
        assert twin.add([i], y) == buf.add([i], y)
        assert twin.sample(k) == buf.sample(k)
    assert list(twin) == list(buf)
