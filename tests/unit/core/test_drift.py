"""Drift signals on synthetic streams with known change points (seeded; the whole file runs in a few seconds).

Each signal: it fires within a stated delay after the change, its score stays below 1 before and is above 1
on the batch that fires, and it stays silent (or nearly: the bound is stated) on a stationary stream.
Figures on real text are in docs/drift.md.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from stream_learner.core.config import DriftSettings, Settings
from stream_learner.core.drift import (
    DRIFT_SIGNALS,
    DriftMonitor,
    EmbeddingDrift,
    LabelMixDrift,
    LossDrift,
    detection_report,
    mmd_permutation_test,
    static_embeddings,
)

BATCH = 16


def feed(signal, stream, *, reference=None):
    """Feed ``stream`` in micro-batches; return (index of the last event of each firing batch, scores)."""
    fired, scores = [], []
    for start in range(0, len(stream), BATCH):
        batch = stream[start : start + BATCH]
        ref = reference(start) if reference is not None else None
        hit = signal.update(batch) if ref is None else signal.update(batch, ref)
        scores.append((start + len(batch) - 1, signal.score, hit))
        if hit:
            fired.append(start + len(batch) - 1)
    return fired, scores


def assert_scores_cross_one_at_detection(scores, change: int, first: int) -> None:
    # every batch before the first detection scored below 1; the batch that fired scored above it
    before = [s for end, s, hit in scores if end < first]
    assert max(before) < 1.0, max(before)
    assert next(s for end, s, _ in scores if end == first) > 1.0
    assert all(not hit for end, _, hit in scores if end < change)


# ------------------------------------------------------------------------------------------- LossDrift


@pytest.mark.parametrize("seed", range(5))
def test_loss_detects_a_rise_of_the_error_within_300_events(seed):
    rng = np.random.default_rng(seed)
    change = 3_000
    errors = np.r_[rng.random(change) < 0.15, rng.random(1_000) < 0.35].astype(float)
    fired, scores = feed(LossDrift(), errors)
    assert fired and change <= fired[0] < change + 300, fired
    assert_scores_cross_one_at_detection(scores, change, fired[0])


def test_loss_is_silent_on_a_stationary_error_stream():
    # measured at the defaults (docs/drift.md): 0.085 false alarms per 5,000 events at p = 0.3 and 0.2 at
    # p = 0.5; here 100,000 events at p = 0.3, where 1.7 are expected: at most 5 allowed
    rng = np.random.default_rng(0)
    alarms = 0
    for _ in range(5):
        signal = LossDrift()
        fired, _ = feed(signal, (rng.random(20_000) < 0.3).astype(float))
        alarms += len(fired)
        assert signal.detections == len(fired)
    assert alarms <= 5


def test_loss_ignores_the_learning_curve_and_then_sees_a_rise():
    # the error of a new head falls from 0.5 to 0.1, stays there, then rises to 0.3 at event 6,000
    rng = np.random.default_rng(1)
    p = np.r_[np.linspace(0.5, 0.1, 2_000), np.full(4_000, 0.1), np.full(1_000, 0.3)]
    errors = (rng.random(len(p)) < p).astype(float)
    fired, _ = feed(LossDrift(), errors)
    assert len(fired) == 1 and 6_000 <= fired[0] < 6_200, fired


def test_loss_skips_non_finite_values_and_clips_losses():
    signal = LossDrift(clip=2.0)
    assert not signal.update([np.nan, np.inf, 0.5])
    assert signal.seen == 2  # inf is clipped to 2.0, NaN carries no information
    assert signal.score == 0.0  # fewer than min_instances values


def test_loss_state_round_trip_continues_identically():
    rng = np.random.default_rng(2)
    errors = np.r_[rng.random(1_500) < 0.1, rng.random(1_500) < 0.4].astype(float)
    a, b = LossDrift(), LossDrift()
    a.update(errors[:1_000])
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    out_a = [(a.update(errors[i : i + 16]), a.score) for i in range(1_000, 3_000, 16)]
    out_b = [(b.update(errors[i : i + 16]), b.score) for i in range(1_000, 3_000, 16)]
    assert out_a == out_b and a.detections == b.detections == 1


# --------------------------------------------------------------------------------------- LabelMixDrift


class Reservoir:
    """Algorithm R over labels: the counts the trainer passes as the reference."""

    def __init__(self, capacity: int, num_labels: int, seed: int = 0) -> None:
        self.items: list[int] = []
        self.capacity, self.seen = capacity, 0
        self._counts = np.zeros(num_labels, dtype=np.int64)
        self.rng = np.random.default_rng(seed)

    def add(self, labels) -> None:
        for y in labels:
            self.seen += 1
            if len(self.items) < self.capacity:
                self.items.append(int(y))
                self._counts[y] += 1
            elif (j := self.rng.integers(self.seen)) < self.capacity:
                self._counts[self.items[j]] -= 1
                self._counts[y] += 1
                self.items[j] = int(y)

    def counts(self) -> np.ndarray:
        return self._counts.copy()


def feed_labels(signal: LabelMixDrift, labels: np.ndarray, reservoir: Reservoir | None):
    fired, scores = [], []
    for start in range(0, len(labels), BATCH):
        batch = labels[start : start + BATCH]
        hit = signal.update(batch, reservoir.counts() if reservoir else None)
        if reservoir:
            reservoir.add(batch)  # after the step, as the trainer does
        scores.append((start + len(batch) - 1, signal.score, hit))
        if hit:
            fired.append(start + len(batch) - 1)
    return fired, scores


@pytest.mark.parametrize("seed", range(3))
def test_label_mix_detects_a_prior_shift_within_200_events(seed):
    rng = np.random.default_rng(seed)
    change = 2_000
    labels = np.r_[rng.random(change) < 0.5, rng.random(1_000) < 0.85].astype(int)
    fired, scores = feed_labels(LabelMixDrift(2), labels, Reservoir(10_000, 2, seed))
    assert fired and change <= fired[0] < change + 200, fired
    assert_scores_cross_one_at_detection(scores, change, fired[0])


def test_label_mix_fires_once_per_shift_then_on_the_next_one():
    # 50/50, then 85/15 for 3,000 events (the reservoir stays mostly 50/50: without re-referencing every
    # test would fire), then 15/85: two detections, one per shift
    rng = np.random.default_rng(4)
    labels = np.r_[rng.random(3_000) < 0.5, rng.random(3_000) < 0.15, rng.random(1_000) < 0.85].astype(int)
    signal = LabelMixDrift(2)
    fired, _ = feed_labels(signal, labels, Reservoir(10_000, 2))
    assert len(fired) == 2, fired
    assert 3_000 <= fired[0] < 3_200 and 6_000 <= fired[1] < 6_200
    assert signal.rereferenced


def test_label_mix_is_silent_on_a_stationary_stream():
    # measured at the defaults: < 0.1 false alarms per 5,000 events (docs/drift.md); here 30,000 events
    # of 3 classes (60/30/10) with the reservoir as reference, where < 0.6 are expected: at most 1
    rng = np.random.default_rng(5)
    labels = rng.choice(3, size=30_000, p=[0.6, 0.3, 0.1])
    fired, _ = feed_labels(LabelMixDrift(3), labels, Reservoir(10_000, 3))
    assert len(fired) <= 1, fired


def test_label_mix_without_reference_uses_its_own_and_accepts_a_mapping():
    rng = np.random.default_rng(6)
    labels = np.r_[rng.random(1_000) < 0.5, rng.random(600) < 0.9].astype(int)
    fired, _ = feed_labels(LabelMixDrift(2), labels, None)
    assert fired and 1_000 <= fired[0] < 1_200
    signal = LabelMixDrift(2, check_every=1, min_window=10, min_reference=10)
    assert not signal.update([0, 1] * 10, {0: 500, 1: 500})
    with pytest.raises(ValueError, match="outside"):
        signal.update([2])
    with pytest.raises(ValueError, match="entries"):
        signal.update([0], np.array([1, 2, 3]))


def test_label_mix_g_statistic_matches_the_textbook_formula():
    signal = LabelMixDrift(3)
    recent, reference = np.array([30, 60, 10]), np.array([500, 400, 100])
    g, dof = signal.statistic(recent, reference)
    table = np.stack([recent, reference]).astype(float)
    expected = table.sum(1, keepdims=True) * table.sum(0, keepdims=True) / table.sum()
    assert dof == 2 and g == pytest.approx(2 * (table * np.log(table / expected)).sum())
    assert signal.statistic(np.array([5, 0, 0]), np.array([50, 0, 0])) == (0.0, 0)  # one class: no test


# -------------------------------------------------------------------------------------- EmbeddingDrift


def shifted_stream(rng, n_before: int, n_after: int, d: int, shift: float) -> np.ndarray:
    # a shift of the mean along one random direction, as a new topic would move sentence embeddings
    direction = rng.normal(size=d)
    direction /= np.linalg.norm(direction)
    before = rng.normal(size=(n_before, d))
    after = rng.normal(size=(n_after, d)) + shift * direction
    return np.concatenate([before, after]).astype(np.float32)


@pytest.mark.parametrize("seed", range(2))
def test_embedding_detects_a_shift_within_200_events(seed):
    # the default window (200), level (0.001, 999 permutations) and d = 384 as for MiniLM
    rng = np.random.default_rng(seed)
    change = 1_200
    stream = shifted_stream(rng, change, 400, 384, shift=3.0)
    fired, scores = feed(EmbeddingDrift(seed=seed), stream)
    assert fired and change <= fired[0] < change + 200, fired
    assert_scores_cross_one_at_detection(scores, change, fired[0])


def test_embedding_is_silent_on_a_stationary_stream():
    # per test P(fire) <= alpha = 0.001 (exact permutation test); 76 overlapping tests here
    rng = np.random.default_rng(7)
    stream = rng.normal(size=(4_000, 32)).astype(np.float32)
    signal = EmbeddingDrift(window=100)
    fired, scores = feed(signal, stream)
    assert fired == [] and max(s for _, s, _ in scores) < 1.0


def test_embedding_uses_the_replay_reference_until_a_detection_then_its_own():
    # the replayed embeddings stay in the old regime (a reservoir full of it); after the shift is
    # reported once, the signal compares the new regime with itself and stays silent
    rng = np.random.default_rng(8)
    d, change = 16, 800
    stream = shifted_stream(rng, change, 2_000, d, shift=1.5)
    old = rng.normal(size=(3_000, d)).astype(np.float32)
    signal = EmbeddingDrift(window=100, permutations=199, significance=0.005)
    fired, _ = feed(signal, stream, reference=lambda start: old[rng.integers(len(old), size=BATCH)])
    assert len(fired) == 1 and change <= fired[0] < change + 100, fired
    assert signal.rereferenced and signal.detections == 1


def test_embedding_input_checks():
    signal = EmbeddingDrift(window=10, permutations=199, significance=0.005, check_every=1)
    assert not signal.update(None)
    with pytest.raises(ValueError, match=r"\[n, d\]"):
        signal.update(np.zeros(4, dtype=np.float32))
    rows = np.ones((4, 3), dtype=np.float32)
    rows[1, 0] = np.nan
    signal.update(rows)
    assert signal.seen == 3  # the non-finite row is dropped
    with pytest.raises(ValueError, match="cannot resolve"):
        EmbeddingDrift(significance=0.001, permutations=99)


def test_mmd_permutation_test_has_its_level_and_power():
    rng = np.random.default_rng(9)
    rejections = 0
    for _ in range(200):
        x, y = rng.normal(size=(30, 5)), rng.normal(size=(30, 5))
        stat, threshold = mmd_permutation_test(x, y, 99, 0.05, rng)
        rejections += stat > threshold
    assert rejections <= 20  # 10 expected (level 0.05); P(> 20) < 0.002
    x, y = rng.normal(size=(30, 5)), rng.normal(1, size=(30, 5))
    stat, threshold = mmd_permutation_test(x, y, 99, 0.05, rng)
    assert stat > threshold


def test_static_embeddings_average_the_fixed_token_vectors_without_special_tokens():
    rng = np.random.default_rng(11)
    table = rng.normal(size=(50, 8)).astype(np.float32)
    cls, sep = 1, 2
    events = [np.array([cls, 10, 11, 12, sep]), [cls, 7, sep], [cls, sep]]
    out = static_embeddings(events, table, ignore=(cls, sep))
    assert out.shape == (3, 8) and out.dtype == np.float32
    np.testing.assert_allclose(out[0], table[[10, 11, 12]].mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(out[1], table[7])
    assert not out[2].any()  # nothing but special tokens: a zero vector, not NaN


# ---------------------------------------------------------------------------------------- DriftMonitor


def synthetic_stream(seed: int = 0):
    """6,000 events: the label mix shifts at 2,000, the inputs at 3,500, the error rises at 5,000."""
    rng = np.random.default_rng(seed)
    n, d = 6_000, 16
    labels = np.where(np.arange(n) < 2_000, rng.random(n) < 0.5, rng.random(n) < 0.85).astype(int)
    embeddings = rng.normal(size=(n, d)).astype(np.float32)
    embeddings[3_500:, 0] += 1.5
    errors = np.where(np.arange(n) < 5_000, rng.random(n) < 0.15, rng.random(n) < 0.45).astype(float)
    return errors, labels, embeddings


def fast_settings() -> DriftSettings:
    return DriftSettings(embedding_window=100)


def run_monitor(monitor: DriftMonitor, errors, labels, embeddings, start=0, stop=None, reservoir=None):
    reservoir = reservoir or Reservoir(10_000, 2)
    fired = []
    for i in range(start, stop or len(labels), BATCH):
        s = slice(i, i + BATCH)
        names = monitor.update(errors[s], errors[s], labels[s], embeddings[s], reservoir.counts(), None)
        reservoir.add(labels[s])
        fired += [(monitor.events_seen - 1, name) for name in names]
    return fired


def test_monitor_reports_each_signal_at_its_change_point():
    errors, labels, embeddings = synthetic_stream()
    monitor = DriftMonitor(num_labels=2, settings=fast_settings())
    fired = run_monitor(monitor, errors, labels, embeddings)
    positions = monitor.detection_positions()
    assert [name for _, name in fired] == ["label_mix", "embedding", "loss"], fired
    assert 2_000 <= positions["label_mix"][0] < 2_200
    assert 3_500 <= positions["embedding"][0] < 3_700
    assert 5_000 <= positions["loss"][0] < 5_300
    assert monitor.detections() == dict.fromkeys(DRIFT_SIGNALS, 1)
    assert list(monitor.scores()) == list(DRIFT_SIGNALS)
    report = detection_report(positions, [2_000, 3_500, 5_000], n_events=6_000)
    assert report["ok"] and report["false_alarms"]["any"] == 0


def test_monitor_state_round_trip_continues_identically():
    errors, labels, embeddings = synthetic_stream(1)
    a = DriftMonitor(num_labels=2, settings=fast_settings(), seed=3)
    reservoir = Reservoir(10_000, 2)
    # stop mid-way: the label shift reported, the input shift (at 3,500) not yet
    run_monitor(a, errors, labels, embeddings, 0, 3_600, reservoir)
    arrays, meta = a.state_dict()
    meta = json.loads(json.dumps(meta))  # the metadata is JSON
    b = DriftMonitor(num_labels=2, settings=fast_settings(), seed=99)
    b.load_state_dict({k: v.copy() for k, v in arrays.items()}, meta)
    twin = Reservoir(10_000, 2)
    twin.items, twin.seen, twin._counts = list(reservoir.items), reservoir.seen, reservoir.counts()
    twin.rng = np.random.default_rng(0)
    reservoir.rng = np.random.default_rng(0)
    out_a = run_monitor(a, errors, labels, embeddings, 3_600, None, reservoir)
    out_b = run_monitor(b, errors, labels, embeddings, 3_600, None, twin)
    assert out_a == out_b and a.scores() == b.scores()
    assert a.detection_positions() == b.detection_positions()


def test_monitor_uses_the_loss_when_configured_and_works_without_embeddings():
    rng = np.random.default_rng(10)
    monitor = DriftMonitor(num_labels=2, settings=DriftSettings(loss_input="loss"))
    losses = np.r_[rng.exponential(0.2, 2_000), rng.exponential(0.8, 500)]
    zeros, labels = np.zeros_like(losses), rng.integers(0, 2, len(losses))  # the errors say nothing
    for i in range(0, len(losses), BATCH):
        s = slice(i, i + BATCH)
        monitor.update(zeros[s], losses[s], labels[s], None, None, None)
    first = monitor.detection_positions()["loss"][0]
    assert 2_000 <= first < 2_100
    assert monitor.detections()["embedding"] == monitor.detections()["label_mix"] == 0


def test_drift_settings_are_a_section_of_settings():
    assert Settings().drift == DriftSettings()
    with pytest.raises(ValidationError, match="embedding_permutations"):
        DriftSettings(embedding_significance=0.0001, embedding_permutations=999)


def test_drift_module_does_not_import_torch():
    code = "import sys, stream_learner.core.drift; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ------------------------------------------------------------------------------------ detection_report


def test_detection_report_delays_and_false_alarm_rate():
    events = {"loss": [100, 2_300, 9_000], "label_mix": [2_050], "embedding": [2_100, 5_400, 5_450]}
    report = detection_report(events, [2_000, 5_000], n_events=10_000)
    first, second = report["boundaries"]
    assert first == {"at": 2_000, "delay": 50, "delays": {"loss": 300, "label_mix": 50, "embedding": 100}}
    assert second["delay"] == 400 and second["delays"] == {"loss": None, "label_mix": None, "embedding": 400}
    assert report["missed"] == [] and report["max_delay_observed"] == 400
    # 100 and 9,000 are false alarms; 5,450 is a second detection of the same boundary
    assert report["false_alarms"] == {"loss": 2, "label_mix": 0, "embedding": 0, "any": 2}
    assert report["events_inside_segments"] == 9_000
    assert report["false_alarms_per_5000"]["any"] == pytest.approx(2 * 5_000 / 9_000)
    assert not report["ok"]  # 1.1 false alarms per 5,000 events


def test_detection_report_cuts_the_window_at_the_next_boundary_and_flags_misses():
    report = detection_report([350], [100, 300], n_events=1_000)
    assert [b["delay"] for b in report["boundaries"]] == [None, 50]
    assert report["missed"] == [100] and not report["ok"]
    assert report["events_inside_segments"] == 1_000 - 200 - 500
    assert detection_report([], [], n_events=5_000)["ok"]


# ------------------------------------------------------------------------------ across a restart
def _stream(seed: int = 1, n_steps: int = 250, shift_at: int = 125):
    """16 labels a step: 50/50, then 90/10 from step ``shift_at`` on; errors at 20 %."""
    rng = np.random.default_rng(seed)
    for step in range(n_steps):
        labels = (rng.random(16) < (0.5 if step < shift_at else 0.1)).astype(int)
        yield labels, (rng.random(16) < 0.2).astype(float)


def _feed(monitor: DriftMonitor, steps, seen: np.ndarray) -> list[tuple[int, str]]:
    """Feed steps with the reservoir's mix approximated by every label seen so far."""
    fired = []
    for labels, errors in steps:
        for name in monitor.update(errors, errors, labels, reference_label_counts=seen.copy()):
            fired.append((monitor.events_seen - 1, name))
        seen += np.bincount(labels, minlength=2)
    return fired


def test_a_restored_monitor_does_not_report_a_shift_again_and_a_fresh_one_does():
    """Why the drift state is part of every version: after a restart, a monitor restored from the
    version carries on exactly as if nothing happened (no second report of the shift it reported
    before the restart); a monitor that warms up again reports the same shift a second time."""
    steps = list(_stream())
    restart = 160  # steps: after the shift (step 125) was reported (event ≈ 2063)
    through, seen = DriftMonitor(num_labels=2), np.zeros(2, dtype=np.int64)
    before = _feed(through, steps[:restart], seen)
    assert [name for _, name in before] == ["label_mix"], before
    arrays, meta = through.state_dict()
    meta = json.loads(json.dumps(meta))  # as a version stores it

    restored = DriftMonitor(num_labels=2)
    restored.load_state_dict({k: v.copy() for k, v in arrays.items()}, meta)
    warmed_up_again = DriftMonitor(num_labels=2)
    after_restored = _feed(restored, steps[restart:], seen.copy())
    after_fresh = _feed(warmed_up_again, steps[restart:], seen.copy())
    after_through = _feed(through, steps[restart:], seen.copy())

    assert after_restored == after_through == []
    assert [name for _, name in after_fresh] == ["label_mix"]


def test_page_hinkley_detects_as_rivers_does():
    """Our Page-Hinkley fires on exactly the values River's ``drift.PageHinkley`` (alpha 1) fires on,
    both directions, on random streams whose mean jumps (River only as a reference, in the tests)."""
    river_drift = pytest.importorskip("river.drift")
    from stream_learner.core.drift import PageHinkley

    rng = np.random.default_rng(0)
    for trial in range(60):
        mode = "up" if trial % 2 else "down"
        x = np.r_[rng.random(300) * rng.random() * 4, rng.random(300) * rng.random() * 4]
        ours = PageHinkley(mode, delta=0.05, threshold=3.0, min_instances=30)
        theirs = river_drift.PageHinkley(min_instances=30, delta=0.05, threshold=3.0, alpha=1.0, mode=mode)
        for v in x:
            theirs.update(v)
            assert ours.update(v) == theirs.drift_detected


@given(
    st.lists(st.integers(0, 400), min_size=2, max_size=6).flatmap(
        lambda recent: st.tuples(
            st.just(recent), st.lists(st.integers(0, 400), min_size=len(recent), max_size=len(recent))
        )
    ),
    st.sampled_from([1e-2, 1e-3, 1e-5]),
)
def test_label_mix_g_test_is_scipys(rows: tuple[list[int], list[int]], significance: float) -> None:
    """The G statistic, its degrees of freedom and the critical value are scipy.stats' own."""
    from scipy import stats

    recent, reference = (np.array(r) for r in rows)
    signal = LabelMixDrift(num_labels=len(recent), significance=significance)
    g, dof = signal.statistic(recent, reference)
    table = np.stack([recent, reference])[:, (recent + reference) > 0]
    if table.shape[1] < 2 or not table.sum(axis=1).all():  # one class seen, or a row empty: no test
        assert (g, dof) == (0.0, 0)
        return
    want, _, want_dof, _ = stats.chi2_contingency(table, correction=False, lambda_="log-likelihood")
    assert dof == want_dof and g == pytest.approx(want, rel=1e-9, abs=1e-9)
    assert signal.critical_value(dof) == pytest.approx(stats.chi2.isf(significance, dof), rel=1e-9)
