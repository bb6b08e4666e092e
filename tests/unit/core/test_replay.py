"""Replay buffers: Algorithm R's sampling law, CBRS's class balance, exact snapshots, compact storage."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from safetensors.numpy import load_file, save_file

from stream_learner.core import replay
from stream_learner.core.replay import ClassBalancedReservoir, ReservoirBuffer, StoredExample

EMPTY = np.zeros(0, dtype=np.uint16)
BUFFERS = [ReservoirBuffer, ClassBalancedReservoir]


def _five_sigma(trials: int, p: float) -> float:
    """5 standard deviations of a Binomial(trials, p) count: 5 * sqrt(trials * p * (1 - p)).

    Two-sided, a 5-sigma normal deviation has probability 5.7e-7, so even with hundreds of items the
    chance of a false failure is ~1e-4 (and the seeds are fixed, so the outcome is reproducible).
    """
    return 5 * math.sqrt(trials * p * (1 - p))


def _chi2_bounds(df: int, z: float = 4.75) -> tuple[float, float]:
    """Central interval of a chi-square(df) at +-z normal sigmas (Wilson-Hilferty approximation:
    (X / df) ** (1/3) is approximately normal with mean 1 - 2/(9 df) and variance 2/(9 df)).
    z = 4.75 is a one-sided tail of 1e-6."""
    c = 2 / (9 * df)
    return df * (1 - c - z * math.sqrt(c)) ** 3, df * (1 - c + z * math.sqrt(c)) ** 3


def _inclusion_chi2(counts: np.ndarray, trials: int, p: float) -> float:
    """Pearson statistic for per-item inclusion counts, scaled to be ~ chi-square(n - 1).

    In one trial the inclusion indicators of the n items are a uniform k-subset: each has variance
    p(1-p) and any two have covariance -p(1-p)/(n-1), i.e. the covariance is p(1-p) n/(n-1) times a
    projection of rank n-1. Hence sum (c_i - T p)^2 / (T p (1-p)) * (n-1)/n ~ chi-square(n-1).
    """
    n = counts.shape[0]
    return float(((counts - trials * p) ** 2).sum() / (trials * p * (1 - p)) * (n - 1) / n)


def _encoded(i: int, length: int) -> np.ndarray:
    """Tokens that identify example ``i``: its index in the first two tokens, then a filler from it."""
    filler = (np.arange(2, length, dtype=np.int64) * 31 + i * 7) % 65536
    return np.concatenate([[i & 0xFFFF, i >> 16], filler]).astype(np.uint16)


def _decoded(tokens: np.ndarray) -> int:
    return int(tokens[0]) | (int(tokens[1]) << 16)


# -- 1. Algorithm R: every item of the stream is kept with probability k/n ------------------------------


def test_algorithm_r_inclusion_probability_is_k_over_n() -> None:
    n, k, trials = 200, 20, 4000
    p = k / n
    counts = np.zeros(n, dtype=np.int64)
    for trial in range(trials):
        buf = ReservoirBuffer(k, seed=trial)
        # the label is the item's position in the stream; the tokens do not matter here
        for i in range(n):
            buf.add(EMPTY, label=i)
        kept = buf.label_counts()
        assert len(kept) == k and set(kept.values()) == {1}
        counts[list(kept)] += 1

    assert counts.sum() == trials * k
    deviation = np.abs(counts - trials * p)
    assert deviation.max() <= _five_sigma(trials, p), (int(deviation.argmax()), counts[deviation.argmax()])
    # aggregate: too large means some items are favoured; too small means "too regular" to be random
    low, high = _chi2_bounds(n - 1)
    assert low <= _inclusion_chi2(counts, trials, p) <= high
    # the classic bugs favour the start or the end of the stream: compare the two halves directly
    halves = counts[: n // 2].sum(), counts[n // 2 :].sum()
    assert abs(halves[0] - halves[1]) <= 2 * _five_sigma(trials * n // 2, p)


def test_algorithm_r_stores_everything_until_full() -> None:
    buf = ReservoirBuffer(5, seed=0)
    assert len(buf) == 0 and buf.seen == 0
    assert all(buf.add([i], label=i) for i in range(5))
    assert len(buf) == 5 and buf.seen == 5
    assert [e.label for e in buf] == [0, 1, 2, 3, 4]
    stored = [buf.add([i], label=i) for i in range(5, 1000)]
    assert len(buf) == 5 and buf.seen == 1000
    # P(stored) = 5/i for the i-th item: expected sum_{i=6}^{1000} 5/i ~ 5 ln(1000/5.5) ~ 26
    assert 8 <= sum(stored) <= 50


# -- 2. sample: distinct stored examples, uniformly ----------------------------------------------------


def test_sample_is_distinct_and_uniform_over_slots() -> None:
    size, k, draws = 50, 10, 20000
    buf = ReservoirBuffer(size, seed=3)
    for i in range(size):
        buf.add([i, i + 1, i + 2], label=i, pair_start=i % 3)
    counts = np.zeros(size, dtype=np.int64)
    for _ in range(draws):
        batch = buf.sample(k)
        labels = [e.label for e in batch]
        assert len(set(labels)) == k
        for e in batch:  # each is a faithful copy of a stored example
            assert e.input_ids.tolist() == [e.label, e.label + 1, e.label + 2]
            assert e.pair_start == e.label % 3
        counts[labels] += 1
    p = k / size
    assert np.abs(counts - draws * p).max() <= _five_sigma(draws, p)
    low, high = _chi2_bounds(size - 1)
    assert low <= _inclusion_chi2(counts, draws, p) <= high


def test_sample_edge_cases() -> None:
    buf = ReservoirBuffer(8, seed=1)
    assert buf.sample(4) == []
    for i in range(5):
        buf.add([i], label=i)
    assert sorted(e.label for e in buf.sample(100)) == [0, 1, 2, 3, 4]
    assert buf.sample(0) == []
    with pytest.raises(ValueError, match="k must be >= 0"):
        buf.sample(-1)


def test_sample_from_a_large_buffer_is_distinct() -> None:
    # a buffer larger than any other in these tests, sampled at the trainer's batch size
    buf = ReservoirBuffer(20000, seed=5)
    for i in range(20000):
        buf.add(EMPTY, label=i)
    for _ in range(200):
        labels = [e.label for e in buf.sample(64)]
        assert len(set(labels)) == 64 and all(0 <= y < 20000 for y in labels)


def test_sampled_examples_are_copies() -> None:
    buf = ReservoirBuffer(1, seed=0)
    buf.add([1, 2, 3], label=0)
    (e,) = buf.sample(1)
    buf.add([7, 8, 9], label=1)  # the only slot is overwritten with probability 1/2 ...
    buf.add([4, 5, 6], label=2)  # ... and again with 1/3; either way e must not change
    assert e == StoredExample(np.array([1, 2, 3], dtype=np.uint16), 0, 0)


# -- 3. CBRS keeps the minority classes; a plain reservoir does not -------------------------------------


def test_class_balanced_keeps_the_minority_class() -> None:
    capacity, n = 100, 4000
    labels = (np.random.default_rng(11).random(n) < 0.05).astype(int)
    cbrs, plain = ClassBalancedReservoir(capacity, seed=2), ReservoirBuffer(capacity, seed=2)
    seen_minority = 0
    for i, y in enumerate(labels.tolist()):
        cbrs.add(_encoded(i, 4), y)
        plain.add(_encoded(i, 4), y)
        seen_minority += y
        # a class that was never one of the largest is never evicted, and once the minority ties the
        # majority at capacity/2 both are "full" and only replace within themselves
        assert cbrs.label_counts().get(1, 0) == min(seen_minority, capacity // 2)
    assert seen_minority > capacity  # the stream is long enough for the cap to matter
    assert cbrs.label_counts() == {0: capacity // 2, 1: capacity // 2}
    # the plain reservoir is a uniform sample: ~5 of 100 (hypergeometric, sd ~2.2)
    assert plain.label_counts().get(1, 0) <= 15
    assert cbrs.label_counts()[1] >= 3 * plain.label_counts().get(1, 0)
    for buf in (cbrs, plain):  # stored examples are still the ones that were added
        for e in buf:
            assert e.label == labels[_decoded(e.input_ids)]


def test_class_balanced_three_classes() -> None:
    capacity, n = 90, 6000
    labels = np.random.default_rng(4).choice(3, size=n, p=[0.90, 0.08, 0.02])
    cbrs, plain = ClassBalancedReservoir(capacity, seed=4), ReservoirBuffer(capacity, seed=4)
    seen = np.zeros(3, dtype=np.int64)
    share = capacity // 3
    for i, y in enumerate(labels.tolist()):
        cbrs.add(_encoded(i, 3), y)
        plain.add(_encoded(i, 3), y)
        seen[y] += 1
        counts = cbrs.label_counts()
        assert sum(counts.values()) == min(i + 1, capacity)
        # a class only loses examples to others while it is one of the largest, i.e. holds >= 1/3
        for c in (1, 2):
            assert counts.get(c, 0) >= min(seen[c], share)
    assert seen[2] > share
    assert cbrs.label_counts() == {0: share, 1: share, 2: share}
    # plain: ~7 of class 1 and ~2 of class 2 (5-sigma upper bounds)
    assert plain.label_counts().get(1, 0) <= 20
    assert plain.label_counts().get(2, 0) <= 9


def test_class_balanced_is_a_reservoir_within_a_full_class() -> None:
    # one class only: it is the largest, hence full, and CBRS reduces to Algorithm R (m/n acceptance)
    capacity, n, trials = 10, 100, 2000
    counts = np.zeros(n, dtype=np.int64)
    stream = [_encoded(i, 2) for i in range(n)]
    for trial in range(trials):
        buf = ClassBalancedReservoir(capacity, seed=trial)
        for tokens in stream:
            buf.add(tokens, label=0)
        counts[[_decoded(e.input_ids) for e in buf]] += 1
    p = capacity / n
    assert np.abs(counts - trials * p).max() <= _five_sigma(trials, p)


# -- 4. snapshots restore contents and the random generator --------------------------------------------


def _fill(buf: ReservoirBuffer, start: int, stop: int, seed: int) -> list[bool]:
    """Add examples start..stop-1: imbalanced labels, lengths 0..60 (so replacements leave garbage)."""
    rng = np.random.default_rng(seed)
    added = []
    for i in range(start, stop):
        length = int(rng.integers(2, 61))
        label = int(rng.choice(4, p=[0.7, 0.2, 0.07, 0.03]))
        added.append(buf.add(_encoded(i, length), label, pair_start=int(rng.integers(0, length + 1))))
    return added


def _assert_same(a: ReservoirBuffer, b: ReservoirBuffer) -> None:
    assert type(a) is type(b)
    assert (a.capacity, a.seen, len(a), a.token_dtype) == (b.capacity, b.seen, len(b), b.token_dtype)
    assert a.label_counts() == b.label_counts()
    assert list(a) == list(b)


@pytest.mark.parametrize("cls", BUFFERS)
def test_snapshot_round_trip_continues_identically(cls: type[ReservoirBuffer]) -> None:
    buf = cls(300, seed=9)
    _fill(buf, 0, 3000, seed=1)
    arrays, meta = buf.state_dict()

    # compact, plain numeric arrays and JSON metadata
    assert set(arrays) == {"tokens", "lengths", "labels", "pair_starts"}
    assert all(a.dtype.kind in "iu" and a.ndim == 1 for a in arrays.values())
    assert arrays["tokens"].shape[0] == sum(len(e.input_ids) for e in buf) == int(arrays["lengths"].sum())
    assert meta["class"] == cls.__name__ and meta["capacity"] == 300 and meta["seen"] == 3000
    json.dumps(meta)

    twin = ReservoirBuffer.from_state_dict(arrays, meta)
    _assert_same(buf, twin)
    # the generator was restored: the same future adds and samples give the same results
    for step in range(10):
        assert _fill(buf, 3000 + 100 * step, 3100 + 100 * step, seed=step) == _fill(
            twin, 3000 + 100 * step, 3100 + 100 * step, seed=step
        )
        assert buf.sample(7) == twin.sample(7)
    _assert_same(buf, twin)


@pytest.mark.parametrize("cls", BUFFERS)
def test_snapshot_through_safetensors_and_json(cls: type[ReservoirBuffer], tmp_path: Path) -> None:
    buf = cls(200, seed=21, vocab_size=30522)
    _fill(buf, 0, 1500, seed=2)
    arrays, meta = buf.state_dict()
    save_file(arrays, tmp_path / "replay.safetensors")
    (tmp_path / "replay.json").write_text(json.dumps(meta))

    twin = ReservoirBuffer.from_state_dict(
        load_file(tmp_path / "replay.safetensors"), json.loads((tmp_path / "replay.json").read_text())
    )
    assert isinstance(twin, cls)
    _assert_same(buf, twin)
    assert _fill(buf, 1500, 2500, seed=3) == _fill(twin, 1500, 2500, seed=3)
    assert [buf.sample(16) for _ in range(5)] == [twin.sample(16) for _ in range(5)]
    _assert_same(buf, twin)


@pytest.mark.parametrize("cls", BUFFERS)
def test_snapshot_of_an_empty_and_a_partial_buffer(cls: type[ReservoirBuffer], tmp_path: Path) -> None:
    for n in (0, 7):
        buf = cls(10, seed=1)
        _fill(buf, 0, n, seed=0)
        arrays, meta = buf.state_dict()
        save_file(arrays, tmp_path / "r.safetensors")
        twin = cls.from_state_dict(load_file(tmp_path / "r.safetensors"), json.loads(json.dumps(meta)))
        _assert_same(buf, twin)
        assert _fill(buf, n, 50, seed=5) == _fill(twin, n, 50, seed=5)
        _assert_same(buf, twin)


def test_snapshot_rejects_wrong_class_and_corruption() -> None:
    buf = ReservoirBuffer(20, seed=0)
    _fill(buf, 0, 30, seed=0)
    arrays, meta = buf.state_dict()
    with pytest.raises(ValueError, match="cannot be restored as ClassBalancedReservoir"):
        ClassBalancedReservoir.from_state_dict(arrays, meta)
    with pytest.raises(ValueError, match="lengths"):
        ReservoirBuffer.from_state_dict({**arrays, "tokens": arrays["tokens"][:-1]}, meta)
    with pytest.raises(ValueError, match="slots"):
        ReservoirBuffer.from_state_dict(arrays, {**meta, "seen": 5})
    with pytest.raises(ValueError, match="expected uint16"):
        ReservoirBuffer.from_state_dict({**arrays, "tokens": arrays["tokens"].astype(np.int32)}, meta)


# -- 5. compact storage --------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", BUFFERS)
def test_storage_is_compact_and_correct_after_many_replacements(cls: type[ReservoirBuffer]) -> None:
    n, capacity = 200_000, 50_000
    rng = np.random.default_rng(0)
    lengths = rng.integers(20, 41, size=n)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    # all streams' tokens at once (building 200k arrays in Python would dominate the test's runtime):
    # example i is tokens[offsets[i]:offsets[i+1]] = _encoded(i, lengths[i])
    owner = np.repeat(np.arange(n), lengths)
    position = np.arange(offsets[-1]) - offsets[owner]
    tokens = ((position * 31 + owner * 7) % 65536).astype(np.uint16)
    tokens[position == 0] = owner[position == 0] & 0xFFFF
    tokens[position == 1] = owner[position == 1] >> 16
    assert np.array_equal(tokens[offsets[70000] : offsets[70001]], _encoded(70000, int(lengths[70000])))

    buf = cls(capacity, seed=7)
    for i in range(n):
        buf.add(tokens[offsets[i] : offsets[i + 1]], i % 5, pair_start=int(lengths[i]) // 2 if i % 2 else 0)

    assert len(buf) == capacity and buf.seen == n
    stored_tokens = 0
    ids = set()
    for e in buf:
        i = _decoded(e.input_ids)
        ids.add(i)
        assert np.array_equal(e.input_ids, tokens[offsets[i] : offsets[i + 1]])
        assert (e.label, e.pair_start) == (i % 5, int(lengths[i]) // 2 if i % 2 else 0)
        stored_tokens += len(e.input_ids)
    assert len(ids) == capacity  # no example stored twice
    # 2 bytes per uint16 token + 25 % slack, 16 bytes per slot, small fixed minimum sizes
    assert buf.nbytes() <= 2.5 * stored_tokens + 16 * capacity + 32 * 1024, buf.nbytes()
    assert buf.nbytes() >= 2 * stored_tokens + 16 * capacity  # and nbytes() does count everything


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    capacity=st.integers(1, 12),
    seed=st.integers(0, 2**32 - 1),
    lengths=st.lists(st.integers(0, 120), min_size=1, max_size=300),
)
@example(capacity=6, seed=1, lengths=[120] * 40 + [2] * 300)  # long then short: the pool must shrink
@example(capacity=6, seed=2, lengths=[i % 121 for i in range(400)])  # growing: appends and compactions
def test_storage_matches_a_list_reference(capacity: int, seed: int, lengths: list[int]) -> None:
    """Against a plain-list Algorithm R driven by the same generator, with tiny minimum sizes so that
    in-place reuse, compaction, growth and shrinking all happen constantly."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(replay, "_MIN_POOL", 8)
        mp.setattr(replay, "_MIN_SLOTS", 2)
        mp.setattr(replay, "_REPACK_CHUNK", 3)
        buf = ReservoirBuffer(capacity, seed=seed)
        rng = np.random.Generator(np.random.PCG64(seed))
        reference: list[StoredExample] = []
        for i, length in enumerate(lengths):
            example = StoredExample(_encoded(i, length)[:length], i % 3, length // 3)
            if len(reference) < capacity:
                reference.append(example)
                expected = True
            else:
                j = int(rng.integers(i + 1))
                expected = j < capacity
                if expected:
                    reference[j] = example
            assert buf.add(example.input_ids, example.label, example.pair_start) is expected
            assert list(buf) == reference
            live = sum(len(e.input_ids) for e in reference)
            assert buf.nbytes() <= 2.5 * live + 16 * max(capacity, 2) + 2 * 8
        twin = ReservoirBuffer.from_state_dict(*buf.state_dict())
        assert list(twin) == reference


# -- 6. token dtype, pair_start, validation ------------------------------------------------------------


@pytest.mark.parametrize(
    ("vocab_size", "dtype", "top_id"),
    [
        (30522, np.uint16, 30521),
        (65536, np.uint16, 65535),
        (65537, np.int32, 65536),
        (250002, np.int32, 250001),
    ],
)
@pytest.mark.parametrize("cls", BUFFERS)
def test_token_dtype_follows_vocab_size(
    cls: type[ReservoirBuffer], vocab_size: int, dtype: type, top_id: int, tmp_path: Path
) -> None:
    buf = cls(4, seed=0, vocab_size=vocab_size)
    assert buf.token_dtype == dtype
    buf.add([0, 5, top_id], label=1, pair_start=2)
    buf.add(np.array([top_id, 3], dtype=np.int64), label=0)
    (first, second) = list(buf)
    assert first.input_ids.dtype == dtype and first.input_ids.tolist() == [0, 5, top_id]
    assert (first.label, first.pair_start) == (1, 2)
    assert second.input_ids.tolist() == [top_id, 3] and second.pair_start == 0
    with pytest.raises(ValueError, match="token ids must be in"):
        buf.add([top_id + 1], label=0)
    with pytest.raises(ValueError, match="token ids must be in"):
        buf.add([-1], label=0)

    arrays, meta = buf.state_dict()
    assert arrays["tokens"].dtype == dtype
    save_file(arrays, tmp_path / "r.safetensors")
    twin = ReservoirBuffer.from_state_dict(
        load_file(tmp_path / "r.safetensors"), json.loads(json.dumps(meta))
    )
    assert list(twin) == [first, second] and twin.token_dtype == dtype


def test_validation() -> None:
    for bad in (0, -3):
        with pytest.raises(ValueError, match="capacity must be >= 1"):
            ReservoirBuffer(bad)
        with pytest.raises(ValueError, match="capacity must be >= 1"):
            ClassBalancedReservoir(bad)
    with pytest.raises(ValueError, match="vocab_size"):
        ReservoirBuffer(3, vocab_size=0)
    buf = ReservoirBuffer(3)
    with pytest.raises(ValueError, match="1-D"):
        buf.add([[1, 2]], label=0)
    with pytest.raises(TypeError, match="integers"):
        buf.add([1.5, 2.0], label=0)
    with pytest.raises(ValueError, match="pair_start"):
        buf.add([1, 2], label=0, pair_start=3)
    with pytest.raises(ValueError, match="label"):
        buf.add([1, 2], label=2**40)
    # rejected adds change nothing, not even the generator
    assert buf.seen == 0 and len(buf) == 0
    assert buf.state_dict()[1]["rng_state"] == ReservoirBuffer(3).state_dict()[1]["rng_state"]
    assert buf.add([], label=0)  # an empty example is allowed
    assert list(buf) == [StoredExample(EMPTY, 0, 0)]
