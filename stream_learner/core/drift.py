"""Drift signals: on the prequential error, on the label mix and on the input embeddings.

Three detectors watch different things, because a stream can drift in ways that only one of them sees:

* :class:`LossDrift` — the model got worse (concept drift, or a covariate shift it handles badly):
  Page-Hinkley tests (River's) on the prequential 0/1 error of the fresh events;
* :class:`LabelMixDrift` — the classes arrive in different proportions (prior shift): a G-test of the
  last ``window`` fresh labels against a reference mix;
* :class:`EmbeddingDrift` — the inputs look different (covariate shift, even when the model copes):
  a kernel two-sample test (MMD, permutation threshold) between a recent window of input embeddings
  and a reference window. The embeddings must come from a fixed feature map — :func:`static_embeddings`,
  the mean pretrained word-piece vector of each event, costs one lookup per token — not from the model
  being trained, whose vectors move as it learns (measured in ``docs/drift.md``).

Each signal has a ``score`` scaled so that 1.0 is its detection threshold (the Prometheus gauge
``stream_learner_drift_score{signal}``) and a count of ``detections``. :class:`DriftMonitor` holds the
three behind one call per micro-batch; it is numpy-only (no torch) and cheap per call: the windowed
tests run every ``check_every`` fresh events, the Page-Hinkley update is a few microseconds per event.
:func:`detection_report` scores a run against known change points (delays, false alarms).

**Reference after a detection.** The windowed tests start against the replay buffer's reference (its
label counts, the embeddings of the replayed part of the micro-batch). Once a signal fires that
reference mixes the old regime with the new one and would keep firing on the shift already reported,
so the signal re-references: from then on it compares with the fresh events seen since the detection.
Thresholds, their calibration and the figures measured on the bundled stream are in ``docs/drift.md``.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from scipy import special  # not scipy.stats: 0.6 s of import at every start, for two formulas

from stream_learner.core.config import DriftSettings

__all__ = [
    "DriftMonitor",
    "EmbeddingDrift",
    "LabelMixDrift",
    "LossDrift",
    "detection_report",
    "mmd_permutation_test",
    "static_embeddings",
]

DRIFT_SIGNALS = ("loss", "label_mix", "embedding")  # the signals, as named in metrics and reports
LOSS, LABEL_MIX, EMBEDDING = DRIFT_SIGNALS
# Losses are clipped here (the true class got < 1 % probability): the Page-Hinkley sums are not robust
# to heavy tails, and one absurdly confident mistake must not count as a shift of the mean.
LOSS_CLIP = math.log(100.0)
_FORMAT = 1


class PageHinkley:
    """Page-Hinkley test for a change of the mean of a stream, in one direction.

    After values ``x_1..x_t`` with running means ``x̄_i``, the cumulative sums are
    ``m_t = Σ_{i≤t} (x_i − x̄_i − δ)`` (for an increase) and ``M_t = Σ_{i≤t} (x_i − x̄_i + δ)`` (for a
    decrease). The test statistic is ``m_t − min_{k≤t} m_k`` for an increase, ``max_{k≤t} M_k − M_t``
    for a decrease; the detector fires when it exceeds ``threshold`` after at least ``min_instances``
    values, and starts afresh with the next value. With ``alpha < 1`` the sums fade by ``alpha`` per
    value. The same test as River's ``drift.PageHinkley`` (written here so that its statistic and state
    are public: the drift score and the snapshot need them).

    Parameters
    ----------
    mode
        ``"up"`` detects an increase of the mean, ``"down"`` a decrease.
    delta
        Tolerated change of the mean per value.
    threshold
        λ: the detection threshold of the cumulative statistic.
    min_instances
        Values seen since the last start before any detection.
    alpha
        Fading factor of the sums (1: none).

    Examples
    --------
    >>> ph = PageHinkley("up", delta=0.01, threshold=5.0, min_instances=10)
    >>> for t, x in enumerate([0.0] * 50 + [1.0] * 20):  # the mean rises at value 50
    ...     if ph.update(x):
    ...         print(f"fired at value {t}, statistic {ph.statistic:.2f}")
    fired at value 55, statistic 5.55

    References
    ----------
    [^1]: E. S. Page. Continuous Inspection Schemes. Biometrika 41 (1/2), 100-115, 1954.
    [^2]: D. V. Hinkley. Inference about the change-point from cumulative sum tests. Biometrika 58 (3),
    509-523, 1971.

    """

    def __init__(
        self,
        mode: str,
        delta: float = 0.005,
        threshold: float = 50.0,
        min_instances: int = 30,
        alpha: float = 1.0,
    ) -> None:
        if mode not in ("up", "down"):
            raise ValueError(f"mode must be 'up' or 'down', got {mode!r}")
        self.mode, self.delta, self.threshold = mode, delta, threshold
        self.min_instances, self.alpha = min_instances, alpha
        self.reset()

    def reset(self) -> None:
        """Start afresh: no values seen."""
        self.n = 0
        self.mean = 0.0
        self.sum_increase = 0.0
        self.min_increase = math.inf
        self.sum_decrease = 0.0
        self.max_decrease = -math.inf
        self.drift_detected = False

    @property
    def statistic(self) -> float:
        """The statistic compared with ``threshold`` (0 while fewer than ``min_instances`` values)."""
        if self.n < self.min_instances:
            return 0.0
        if self.mode == "up":
            return max(0.0, self.sum_increase - self.min_increase)
        return max(0.0, self.max_decrease - self.sum_decrease)

    def update(self, x: float) -> bool:
        """Feed one value; ``True`` if the mean changed in this detector's direction."""
        if self.drift_detected:
            self.reset()
        self.n += 1
        self.mean += (x - self.mean) / self.n
        dev = x - self.mean
        self.sum_increase = self.alpha * self.sum_increase + dev - self.delta
        self.sum_decrease = self.alpha * self.sum_decrease + dev + self.delta
        self.min_increase = min(self.min_increase, self.sum_increase)
        self.max_decrease = max(self.max_decrease, self.sum_decrease)
        self.drift_detected = bool(self.n >= self.min_instances and self.statistic > self.threshold)
        return self.drift_detected

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state (infinities as None)."""

        def finite(x: float) -> float | None:
            return float(x) if math.isfinite(x) else None

        return {
            "n": float(self.n),
            "mean": self.mean,
            "sum_increase": self.sum_increase,
            "min_increase": finite(self.min_increase),
            "sum_decrease": self.sum_decrease,
            "max_decrease": finite(self.max_decrease),
            "drift_detected": self.drift_detected,
        }

    def load_state_dict(self, s: Mapping[str, Any]) -> None:
        self.n, self.mean = int(s["n"]), float(s["mean"])
        self.sum_increase, self.sum_decrease = float(s["sum_increase"]), float(s["sum_decrease"])
        self.min_increase = math.inf if s["min_increase"] is None else float(s["min_increase"])
        self.max_decrease = -math.inf if s["max_decrease"] is None else float(s["max_decrease"])
        self.drift_detected = bool(s["drift_detected"])


class LossDrift:
    """Page-Hinkley test for an increase of the prequential error (or loss) of the fresh events.

    Two :class:`PageHinkley` detectors read the same stream: one for increases of its mean, one for
    decreases, both without the fading factor (``alpha=1``). An increase
    is drift: :meth:`update` returns ``True`` and ``detections`` counts it. A decrease is the model
    learning — the error of a new head falls from ~0.5 to ~0.15 over the first few hundred events, and
    again after it adapted to a new domain — so it is not reported; it restarts the increase detector,
    whose reference mean (the mean since its last restart) would otherwise keep the high early errors and
    hide a later rise. Why not River's defaults or ADWIN: see ``docs/drift.md`` (on the bundled stream
    both fire on that learning curve; ADWIN's statistic is not exposed for a score either).

    The Page-Hinkley statistic for an increase after t values x_1..x_t with running mean x̄_t is
    ``m_t − min_{k≤t} m_k`` where ``m_t = Σ_{i≤t} (x_i − x̄_i − delta)``; it fires above ``threshold``.
    ``score`` is the largest value of that statistic over the last batch divided by ``threshold``, so
    it is ≥ 1 exactly when the detector fired.

    Parameters
    ----------
    delta
        Tolerated increase of the mean per event (the error rate must rise by more than this to drift).
    threshold
        Detection threshold λ of the cumulative statistic (in units of the input: errors).
    min_instances
        Values seen (since the last restart) before any detection.
    clip
        Inputs are clipped to ``[0, clip]`` (1 for 0/1 errors, ``LOSS_CLIP`` for losses).

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(7)
    >>> errors = np.r_[rng.random(2000) < 0.15, rng.random(1000) < 0.40].astype(float)
    >>> signal = LossDrift()
    >>> for start in range(0, len(errors), 16):
    ...     if signal.update(errors[start : start + 16]):
    ...         print(f"drift in the batch starting at event {start}, score {signal.score:.2f}")
    drift in the batch starting at event 2048, score 1.01
    >>> signal.detections
    1

    References
    ----------
    [^1]: E. S. Page. Continuous Inspection Schemes. Biometrika 41 (1/2), 100-115, 1954.
    [^2]: D. V. Hinkley. Inference about the change-point from cumulative sum tests. Biometrika 58 (3),
    509-523, 1971.
    [^3]: J. Gama, R. Sebastião, P. P. Rodrigues. On evaluating stream learning algorithms. Machine
    Learning 90, 317-346, 2013 (Page-Hinkley on the prequential error).

    """

    name = LOSS

    def __init__(
        self, delta: float = 0.05, threshold: float = 15.0, min_instances: int = 100, clip: float = 1.0
    ) -> None:
        self.delta, self.threshold, self.min_instances, self.clip = delta, threshold, min_instances, clip
        self._up = PageHinkley("up", delta, threshold, min_instances)
        self._down = PageHinkley("down", delta, threshold, min_instances)
        self.score = 0.0
        self.detections = 0
        self.last_detection: int | None = None  # index (in values seen) of the value that fired
        self.seen = 0

    def update(self, values: Iterable[float] | np.ndarray) -> bool:
        """Feed one batch of per-event errors (0/1) or losses; ``True`` if an increase was detected."""
        fired = False
        peak = 0.0
        for v in np.clip(np.asarray(values, dtype=np.float64).ravel(), 0.0, self.clip):
            if not math.isfinite(v):  # a skipped non-finite step: no information about the error
                continue
            self._up.update(v)
            self._down.update(v)
            peak = max(peak, self._up.statistic / self.threshold)
            if self._up.drift_detected:
                fired = True
                self.detections += 1
                self.last_detection = self.seen
                self._down.reset()  # both restart on the new level
            elif self._down.drift_detected:
                self._up.reset()  # silent re-anchoring after an improvement
            self.seen += 1
        self.score = peak
        return fired

    def state_dict(self) -> dict[str, Any]:
        return {
            "up": self._up.state_dict(),
            "down": self._down.state_dict(),
            "detections": self.detections,
            "seen": self.seen,
            "last_detection": self.last_detection,
            "score": self.score,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._up.load_state_dict(state["up"])
        self._down.load_state_dict(state["down"])
        self.detections, self.seen = state["detections"], state["seen"]
        self.last_detection, self.score = state["last_detection"], state["score"]


def _as_counts(counts: np.ndarray | Mapping[int, int] | None, num_labels: int) -> np.ndarray | None:
    if counts is None:
        return None
    if isinstance(counts, Mapping):  # ReservoirBuffer.label_counts() gives {label: count}
        out = np.zeros(num_labels, dtype=np.int64)
        for label, c in counts.items():
            out[int(label)] = c
        return out
    out = np.asarray(counts, dtype=np.int64).ravel()
    if out.shape != (num_labels,):
        raise ValueError(f"reference label counts must have {num_labels} entries, got {out.shape}")
    return out


class LabelMixDrift:
    """G-test of the recent label mix against a reference mix (prior shift).

    Every ``check_every`` labels, the counts of the last ``window`` fresh labels and the reference counts
    form a 2×K contingency table, tested for homogeneity with the log-likelihood ratio (G) statistic
    (what :func:`scipy.stats.chi2_contingency` gives with ``lambda_="log-likelihood"`` and no continuity
    correction; computed here from its formula, a test checks they agree)
    against the χ² critical value at ``significance`` with K'−1 degrees of freedom (K' = classes seen in
    either row). ``score`` = G / critical value of the last test, so it is > 1 exactly when it fired.

    The reference is the counts passed to :meth:`update` (the replay reservoir's) until the first
    detection; from then on it is the labels seen since the last detection that have left the recent
    window (the new regime), since the reservoir keeps mixing the old regime in and would fire again and
    again on the same shift. After a detection the window restarts, so the next test comes after
    ``min_window`` new labels with ``min_reference`` of them already moved to the reference. Without
    reference counts (``None``), the signal uses its own from the start.

    ``significance`` is per test; tests every ``check_every`` labels over overlapping windows are
    correlated, so the false-alarm rate per event is far below ``significance / check_every``
    (measured in ``docs/drift.md``).

    Parameters
    ----------
    num_labels
        Number of classes K.
    window
        Fresh labels in the recent window.
    min_window
        Labels needed in the recent window before testing.
    min_reference
        Reference labels needed before testing.
    significance
        Level α of each test.
    check_every
        Labels between two tests.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(3)
    >>> labels = np.r_[rng.random(1500) < 0.5, rng.random(1500) < 0.85].astype(int)
    >>> signal = LabelMixDrift(num_labels=2)
    >>> reservoir = np.zeros(2, dtype=int)
    >>> for start in range(0, len(labels), 16):
    ...     batch = labels[start : start + 16]
    ...     if signal.update(batch, reference_counts=reservoir):
    ...         print(f"drift in the batch starting at event {start}, score {signal.score:.1f}")
    ...     reservoir += np.bincount(batch, minlength=2)  # a reservoir that keeps everything
    drift in the batch starting at event 1584, score 1.7
    >>> signal.detections
    1

    References
    ----------
    [^1]: R. R. Sokal, F. J. Rohlf. Biometry, 3rd ed., ch. 17 (the G-test of independence), 1995.
    [^2]: A. Agresti. Categorical Data Analysis, 3rd ed., §3.2 (likelihood-ratio tests), 2013.

    """

    name = LABEL_MIX

    def __init__(
        self,
        num_labels: int,
        window: int = 300,
        min_window: int = 100,
        min_reference: int = 100,
        significance: float = 1e-3,
        check_every: int = 50,
    ) -> None:
        if num_labels < 2:
            raise ValueError("a label mix needs at least two classes")
        self.num_labels, self.window, self.min_window = num_labels, window, min(min_window, window)
        self.min_reference, self.significance, self.check_every = min_reference, significance, check_every
        self._recent: deque[int] = deque()
        self._recent_counts = np.zeros(num_labels, dtype=np.int64)
        self._own = np.zeros(num_labels, dtype=np.int64)  # labels that left the window since the reset
        self.rereferenced = False
        self._since_check = 0
        self.score = 0.0
        self.detections = 0
        self.seen = 0
        self.last_detection: int | None = None
        self._critical: dict[int, float] = {}

    def critical_value(self, dof: int) -> float:
        if dof not in self._critical:
            self._critical[dof] = float(special.chdtri(dof, self.significance))  # χ²'s inverse survival
        return self._critical[dof]

    def _reference(self, given: np.ndarray | None) -> np.ndarray | None:
        ref = self._own if (self.rereferenced or given is None) else given
        return ref if ref.sum() >= self.min_reference else None

    def statistic(self, recent: np.ndarray, reference: np.ndarray) -> tuple[float, int]:
        """G statistic and degrees of freedom of the 2×K homogeneity test (classes absent from both rows
        are dropped: they carry no information and would make an expected count zero)."""
        table = np.stack([recent, reference]).astype(np.float64)
        table = table[:, table.sum(axis=0) > 0]
        if table.shape[1] < 2 or not table.sum(axis=1).all():  # one class, or an empty row: no test
            return 0.0, 0
        expected = np.outer(table.sum(axis=1), table.sum(axis=0)) / table.sum()
        g = 2.0 * special.xlogy(table, table / expected).sum()  # G = 2 Σ O ln(O/E), 0 ln 0 = 0
        return float(g), table.shape[1] - 1  # (2 − 1) × (K' − 1)

    def update(
        self,
        labels: Iterable[int] | np.ndarray,
        reference_counts: np.ndarray | Mapping[int, int] | None = None,
    ) -> bool:
        """Feed a batch of fresh labels (class indices); ``True`` if the mix shifted."""
        given = _as_counts(reference_counts, self.num_labels)
        for y in np.asarray(labels, dtype=np.int64).ravel():
            if not 0 <= y < self.num_labels:
                raise ValueError(f"label {y} outside 0..{self.num_labels - 1}")
            self._recent.append(int(y))
            self._recent_counts[y] += 1
            if len(self._recent) > self.window:
                old = self._recent.popleft()
                self._recent_counts[old] -= 1
                self._own[old] += 1
            self.seen += 1
            self._since_check += 1
        if self._since_check < self.check_every or len(self._recent) < self.min_window:
            return False
        reference = self._reference(given)
        if reference is None:
            return False
        self._since_check = 0
        g, dof = self.statistic(self._recent_counts, reference)
        self.score = g / self.critical_value(dof) if dof else 0.0
        if self.score <= 1.0:
            return False
        self.detections += 1
        self.last_detection = self.seen - 1
        self.rereferenced = True
        self._recent.clear()
        self._recent_counts[:] = 0
        self._own[:] = 0
        return True

    def state_dict(self) -> dict[str, Any]:
        return {
            "recent": list(self._recent),
            "own": self._own.tolist(),
            "rereferenced": self.rereferenced,
            "since_check": self._since_check,
            "score": self.score,
            "detections": self.detections,
            "seen": self.seen,
            "last_detection": self.last_detection,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._recent = deque(int(y) for y in state["recent"])
        self._recent_counts = np.bincount(
            np.asarray(list(self._recent), dtype=np.int64), minlength=self.num_labels
        ).astype(np.int64)
        self._own = np.asarray(state["own"], dtype=np.int64)
        self.rereferenced, self._since_check = state["rereferenced"], state["since_check"]
        self.score, self.detections = state["score"], state["detections"]
        self.seen, self.last_detection = state["seen"], state["last_detection"]


def mmd_permutation_test(
    x: np.ndarray, y: np.ndarray, permutations: int, significance: float, rng: np.random.Generator
) -> tuple[float, float]:
    """Unbiased MMD² between samples ``x`` [n, d] and ``y`` [m, d] with a Gaussian kernel, and its
    permutation threshold: ``(statistic, threshold)``, drift when ``statistic > threshold``.

    The kernel is k(a, b) = exp(−‖a−b‖² / (2σ²)) with σ the median pairwise distance of the pooled
    sample (median heuristic; invariant to permutations, so the test stays exact). The threshold is the
    ⌊α(B+1)⌋-th largest of B permuted statistics, so under H0 (exchangeable samples) P(fire) ≤ α.
    One kernel matrix and one (B × N) @ (N × N) product: ~12 ms for n = m = 200, d = 384, B = 999
    on one core.
    """
    z = np.concatenate([x, y]).astype(np.float64)
    n, big_n = len(x), len(x) + len(y)
    m = big_n - n
    sq = np.einsum("ij,ij->i", z, z)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * (z @ z.T), 0.0)
    med = float(np.median(d2[np.triu_indices(big_n, 1)]))
    kern = np.exp(-d2 / max(med, 1e-12))  # 2σ² = median of squared distances
    np.fill_diagonal(kern, 0.0)  # the unbiased estimate leaves out i == j
    row = kern.sum(axis=1)
    total = row.sum()
    # the (B × N) @ (N × N) product is the whole cost: float32 halves it, and its rounding (~1e-7
    # relative on sums of N² kernel values) is far below the spread of the permuted statistics
    kern32 = kern.astype(np.float32)

    def mmd2(member: np.ndarray) -> np.ndarray:
        # member: (b, N) 0/1 rows marking the first sample; within-x, within-y and cross sums from one product
        sxx = np.einsum("ij,ij->i", (member.astype(np.float32) @ kern32).astype(np.float64), member)
        ar = member @ row
        syy = total - 2.0 * ar + sxx
        sxy = ar - sxx
        return sxx / (n * (n - 1)) + syy / (m * (m - 1)) - 2.0 * sxy / (n * m)

    observed = np.zeros((1, big_n))
    observed[0, :n] = 1.0
    stat = float(mmd2(observed)[0])
    null = mmd2(rng.permuted(np.repeat(observed, permutations, axis=0), axis=1))
    k = max(1, int(significance * (permutations + 1)))
    threshold = float(np.partition(null, permutations - k)[permutations - k])
    return stat, threshold


def static_embeddings(
    token_ids: Sequence[Sequence[int] | np.ndarray], table: np.ndarray, ignore: Iterable[int] = ()
) -> np.ndarray:
    """Mean of the rows of ``table`` (a fixed token-embedding matrix, e.g. the pretrained word-piece
    embeddings θ0) over each event's tokens, leaving out ``ignore`` (special tokens): float32 [n, d].

    This is the input :class:`EmbeddingDrift` is calibrated for: it costs one lookup per token, and unlike
    the pooled vectors of the model being trained it does not move when the encoder learns (see
    ``docs/drift.md``: adjacent windows of those fire on the encoder's own change).

    >>> table = np.arange(12, dtype=np.float32).reshape(4, 3)
    >>> static_embeddings([[0, 2, 3], [3]], table, ignore=[3])
    array([[3., 4., 5.],
           [0., 0., 0.]], dtype=float32)
    """
    skip = np.asarray(sorted(set(ignore)), dtype=np.int64)
    out = np.zeros((len(token_ids), table.shape[1]), dtype=np.float32)
    for i, ids in enumerate(token_ids):
        ids = np.asarray(ids, dtype=np.int64)
        ids = ids[~np.isin(ids, skip)]
        if len(ids):
            out[i] = table[ids].mean(axis=0)
    return out


class _Ring:
    """The last ``size`` rows of a stream of [*, d] arrays, oldest first on read."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.buf: np.ndarray | None = None
        self.count = 0  # rows ever written since clear()

    def clear(self) -> None:
        self.count = 0

    def __len__(self) -> int:
        return min(self.count, self.size)

    def extend(self, rows: np.ndarray) -> None:
        if self.buf is None or self.buf.shape[1] != rows.shape[1]:
            self.buf, self.count = np.zeros((self.size, rows.shape[1]), dtype=np.float32), 0
        rows = rows[-self.size :]
        idx = (self.count + np.arange(len(rows))) % self.size
        self.buf[idx] = rows
        self.count += len(rows)

    def last(self, k: int, skip: int = 0) -> np.ndarray:
        """``k`` rows ending ``skip`` rows before the newest, oldest first."""
        assert self.buf is not None and k + skip <= len(self)
        idx = (self.count - skip - k + np.arange(k)) % self.size
        return self.buf[idx]


class EmbeddingDrift:
    """Kernel two-sample test (MMD) between recent input embeddings and a reference window.

    Every ``check_every`` events, the last ``window`` fresh embeddings (float32 [n, d] from a fixed
    feature map, e.g. :func:`static_embeddings`) are compared with a reference window of the same size by the
    unbiased MMD² with a Gaussian kernel (median-heuristic bandwidth); the threshold is the (1−α)
    quantile of ``permutations`` random re-splittings of the pooled sample (an exact level-α test when
    the two windows are exchangeable). ``score`` = MMD² / threshold of the last test (≥ 0; > 1 fires).

    Reference: until the first detection, the last ``window`` embeddings passed as ``reference`` (those
    of the replayed examples, drawn from the replay buffer); after a detection, and whenever no
    reference is passed, the ``window`` fresh embeddings that came just before the recent window (the
    new regime; two windows close in time, so slow changes inside a regime do not add up to a
    detection). After a detection both windows restart: the next test needs ``2 × window`` new events.

    The vectors must not depend on the weights being trained: windows of the live model's pooled
    vectors differ because the encoder learned in between (and replayed examples, already learnt, map
    differently from fresh ones), which fired 7-8 times inside domains on the bundled stream.

    Parameters
    ----------
    window
        Embeddings in the recent and in the reference window.
    significance
        Level α of each test; ``permutations + 1`` must be ≥ 1/α.
    permutations
        Random splittings B for the threshold.
    check_every
        Events between two tests.
    seed
        Seed of the permutations.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> before = rng.normal(size=(600, 16)).astype(np.float32)
    >>> after = rng.normal(loc=0.4, size=(600, 16)).astype(np.float32)
    >>> stream = np.concatenate([before, after])
    >>> signal = EmbeddingDrift(window=100, permutations=199, significance=0.005)
    >>> for start in range(0, len(stream), 16):
    ...     if signal.update(stream[start : start + 16]):
    ...         print(f"drift in the batch starting at event {start}, score {signal.score:.1f}")
    drift in the batch starting at event 640, score 1.7
    >>> signal.detections
    1

    References
    ----------
    [^1]: A. Gretton, K. M. Borgwardt, M. J. Rasch, B. Schölkopf, A. Smola. A Kernel Two-Sample Test.
    JMLR 13, 723-773, 2012 (MMD, its unbiased estimate, the median heuristic, permutation thresholds).
    [^2]: S. Rabanser, S. Günnemann, Z. C. Lipton. Failing Loudly: An Empirical Study of Methods for
    Detecting Dataset Shift. NeurIPS 2019 (two-sample tests on learned representations).

    """

    name = EMBEDDING

    def __init__(
        self,
        window: int = 200,
        significance: float = 0.001,
        permutations: int = 999,
        check_every: int = 50,
        seed: int = 0,
    ) -> None:
        if significance * (permutations + 1) < 1:
            raise ValueError(f"{permutations} permutations cannot resolve significance {significance}")
        self.window, self.significance, self.permutations = window, significance, permutations
        self.check_every = check_every
        self._rng = np.random.default_rng(seed)
        self._fresh = _Ring(2 * window)
        self._replay = _Ring(window)
        self.rereferenced = False
        self._since_check = 0
        self.score = 0.0
        self.detections = 0
        self.seen = 0
        self.last_detection: int | None = None

    @staticmethod
    def _rows(a: np.ndarray | None) -> np.ndarray | None:
        if a is None:
            return None
        a = np.asarray(a, dtype=np.float32)
        if a.ndim != 2:
            raise ValueError(f"embeddings must be [n, d], got shape {a.shape}")
        return a[np.isfinite(a).all(axis=1)]  # a non-finite forward pass says nothing about the inputs

    def update(self, embeddings: np.ndarray | None, reference: np.ndarray | None = None) -> bool:
        """Feed the fresh embeddings of a batch (and the replayed ones); ``True`` if the inputs shifted."""
        fresh, replayed = self._rows(embeddings), self._rows(reference)
        if fresh is None or not len(fresh):
            return False
        self._fresh.extend(fresh)
        if replayed is not None and len(replayed):
            self._replay.extend(replayed)
        self.seen += len(fresh)
        self._since_check += len(fresh)
        if self._since_check < self.check_every or len(self._fresh) < self.window:
            return False
        if not self.rereferenced and len(self._replay) >= self.window:
            ref = self._replay.last(self.window)
        elif len(self._fresh) >= 2 * self.window:
            ref = self._fresh.last(self.window, skip=self.window)
        else:
            return False
        self._since_check = 0
        stat, threshold = mmd_permutation_test(
            self._fresh.last(self.window), ref, self.permutations, self.significance, self._rng
        )
        self.score = max(stat, 0.0) / max(threshold, 1e-12)
        if stat <= threshold:
            return False
        self.detections += 1
        self.last_detection = self.seen - 1
        self.rereferenced = True
        self._fresh.clear()
        return True

    def state_dict(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        arrays = {}
        if len(self._fresh):
            arrays["fresh"] = self._fresh.last(len(self._fresh)).copy()
        if len(self._replay):
            arrays["replay"] = self._replay.last(len(self._replay)).copy()
        meta = {
            "rng": self._rng.bit_generator.state,
            "rereferenced": self.rereferenced,
            "since_check": self._since_check,
            "score": self.score,
            "detections": self.detections,
            "seen": self.seen,
            "last_detection": self.last_detection,
        }
        return arrays, meta

    def load_state_dict(self, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> None:
        self._fresh, self._replay = _Ring(2 * self.window), _Ring(self.window)
        if "fresh" in arrays:
            self._fresh.extend(np.asarray(arrays["fresh"], dtype=np.float32))
        if "replay" in arrays:
            self._replay.extend(np.asarray(arrays["replay"], dtype=np.float32))
        self._rng.bit_generator.state = meta["rng"]
        self.rereferenced, self._since_check = meta["rereferenced"], meta["since_check"]
        self.score, self.detections = meta["score"], meta["detections"]
        self.seen, self.last_detection = meta["seen"], meta["last_detection"]


class DriftMonitor:
    """The three drift signals behind one call per micro-batch (numpy only; the trainer thread calls it).

    Parameters
    ----------
    num_labels
        Number of classes.
    settings
        Thresholds and windows (:class:`~stream_learner.core.config.DriftSettings`; defaults when omitted).
    seed
        Seed of the embedding test's permutations.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(1)
    >>> monitor = DriftMonitor(num_labels=2)
    >>> fired = []
    >>> for step in range(250):  # 4,000 events: the label mix flips from 50/50 to 90/10 at event 2,000
    ...     labels = (rng.random(16) < (0.5 if step < 125 else 0.1)).astype(int)
    ...     errors = (rng.random(16) < 0.2).astype(float)
    ...     fired += [(monitor.events_seen - 1, name) for name in monitor.update(errors, errors, labels)]
    >>> fired
    [(2063, 'label_mix')]
    >>> monitor.detections()
    {'loss': 0, 'label_mix': 1, 'embedding': 0}

    """

    def __init__(self, num_labels: int, settings: DriftSettings | None = None, seed: int = 0) -> None:
        s = settings or DriftSettings()
        self.settings = s
        self.loss = LossDrift(
            s.loss_delta,
            s.loss_threshold,
            s.loss_min_instances,
            1.0 if s.loss_input == "error" else LOSS_CLIP,
        )
        self.label_mix = LabelMixDrift(
            num_labels,
            s.label_window,
            s.label_min_window,
            s.label_min_reference,
            s.label_significance,
            s.check_every,
        )
        self.embedding = EmbeddingDrift(
            s.embedding_window, s.embedding_significance, s.embedding_permutations, s.check_every, seed
        )
        self.events_seen = 0
        self._positions: dict[str, list[int]] = {name: [] for name in DRIFT_SIGNALS}

    def _signals(self) -> tuple[LossDrift, LabelMixDrift, EmbeddingDrift]:
        return self.loss, self.label_mix, self.embedding

    def update(
        self,
        errors: np.ndarray,
        losses: np.ndarray,
        labels: np.ndarray,
        embeddings: np.ndarray | None = None,
        reference_label_counts: np.ndarray | Mapping[int, int] | None = None,
        reference_embeddings: np.ndarray | None = None,
    ) -> list[str]:
        """Feed one micro-batch's fresh events; the names of the signals that fired on it.

        ``errors`` are 0/1 per fresh event (prediction ≠ label, before the step), ``losses`` their
        cross-entropy; ``labels`` the class indices; ``embeddings`` fixed-feature vectors [n, d] of the
        fresh events (:func:`static_embeddings`) and ``reference_embeddings`` those of the replayed ones;
        ``reference_label_counts`` the replay buffer's examples per class (``None`` with a class-balanced
        reservoir, whose mix is not the stream's by design).
        """
        n = len(labels)
        fired = []
        if self.loss.update(errors if self.settings.loss_input == "error" else losses):
            fired.append(LOSS)
        if self.label_mix.update(labels, reference_label_counts):
            fired.append(LABEL_MIX)
        if self.embedding.update(embeddings, reference_embeddings):
            fired.append(EMBEDDING)
        self.events_seen += n
        for name in fired:
            self._positions[name].append(self.events_seen - 1)
        return fired

    def scores(self) -> dict[str, float]:
        """Each signal's score (1.0 = its detection threshold), keyed by the Prometheus label value."""
        return {s.name: float(s.score) for s in self._signals()}

    def detections(self) -> dict[str, int]:
        """Detections per signal since the start (or the restored state)."""
        return {s.name: s.detections for s in self._signals()}

    def detection_positions(self) -> dict[str, list[int]]:
        """Per signal, the last event index of each batch it fired on (input of :func:`detection_report`)."""
        return {name: list(p) for name, p in self._positions.items()}

    def state_dict(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Numeric arrays (the embedding windows; safetensors-ready) and JSON-serialisable metadata."""
        emb_arrays, emb_meta = self.embedding.state_dict()
        meta = {
            "format": _FORMAT,
            "events_seen": self.events_seen,
            "positions": self._positions,
            LOSS: self.loss.state_dict(),
            LABEL_MIX: self.label_mix.state_dict(),
            EMBEDDING: emb_meta,
        }
        return {f"{EMBEDDING}.{k}": v for k, v in emb_arrays.items()}, meta

    def load_state_dict(self, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> None:
        if meta.get("format") != _FORMAT:
            raise ValueError(f"unsupported drift state format {meta.get('format')!r}")
        self.events_seen = meta["events_seen"]
        self._positions = {name: list(meta["positions"].get(name, [])) for name in DRIFT_SIGNALS}
        self.loss.load_state_dict(meta[LOSS])
        self.label_mix.load_state_dict(meta[LABEL_MIX])
        prefix = f"{EMBEDDING}."
        self.embedding.load_state_dict(
            {k.removeprefix(prefix): v for k, v in arrays.items() if k.startswith(prefix)}, meta[EMBEDDING]
        )


def detection_report(
    signal_events: Mapping[str, Sequence[int]] | Sequence[int],
    boundaries: Sequence[int],
    n_events: int | None = None,
    max_delay: int = 500,
    per_events: int = 5_000,
) -> dict[str, Any]:
    """Score detections against known change points.

    ``signal_events`` maps a signal name to the event indices (0-based positions in the stream) where it
    fired — :meth:`DriftMonitor.detection_positions` — or is one sequence for a single signal.
    ``boundaries`` are the indices of the first event of each new segment (domain). A detection in
    ``[b, b + max_delay)`` (cut at the next boundary) belongs to boundary ``b``; every other detection is
    a false alarm inside a segment. Rates are per ``per_events`` events inside segments, i.e. outside
    those attribution windows; ``n_events`` is the stream length (default: the last detection or boundary
    + 1 — pass it, or the rate is overstated).

    Returns ``boundaries`` (per boundary: ``at``, ``delay`` of the first detection of any signal or
    ``None``, and ``delays`` per signal), ``missed`` (boundaries no signal caught in time),
    ``max_delay_observed``, ``false_alarms`` and ``false_alarms_per_{per_events}`` per signal and for
    ``"any"`` (all signals together), ``events_inside_segments``, and ``ok``: every boundary caught and at
    most one false alarm per ``per_events`` events, all signals together.

    Examples
    --------
    >>> r = detection_report({"loss": [120, 2300], "embedding": [1040, 2100]}, [1000, 2000], n_events=3000)
    >>> [b["delay"] for b in r["boundaries"]], r["false_alarms"]["any"], r["ok"]
    ([40, 100], 1, False)
    >>> r["boundaries"][1]["delays"]
    {'loss': 300, 'embedding': 100}
    """
    events = {"signal": list(signal_events)} if not isinstance(signal_events, Mapping) else signal_events
    events = {name: sorted(int(t) for t in ts) for name, ts in events.items()}
    bounds = sorted(int(b) for b in boundaries)
    last = max([b for b in bounds] + [t for ts in events.values() for t in ts] + [-1]) + 1
    n = last if n_events is None else int(n_events)
    windows = []
    for i, b in enumerate(bounds):
        end = min(b + max_delay, bounds[i + 1] if i + 1 < len(bounds) else n, n)
        windows.append((b, end))

    def window_of(t: int) -> int | None:
        for i, (b, end) in enumerate(windows):
            if b <= t < end:
                return i
        return None

    per_boundary: list[dict[str, Any]] = [{"at": b, "delay": None, "delays": {}} for b in bounds]
    false_alarms = {name: 0 for name in events}
    for name, ts in events.items():
        for t in ts:
            i = window_of(t)
            if i is None:
                false_alarms[name] += 1
            elif name not in per_boundary[i]["delays"]:
                per_boundary[i]["delays"][name] = t - bounds[i]
    for entry in per_boundary:
        entry["delays"] = {name: entry["delays"].get(name) for name in events}
        found = [d for d in entry["delays"].values() if d is not None]
        entry["delay"] = min(found) if found else None
    inside = n - sum(end - b for b, end in windows)
    false_alarms["any"] = sum(false_alarms.values())
    rate = {k: (v * per_events / inside if inside > 0 else math.nan) for k, v in false_alarms.items()}
    missed = [e["at"] for e in per_boundary if e["delay"] is None]
    delays = [e["delay"] for e in per_boundary if e["delay"] is not None]
    return {
        "boundaries": per_boundary,
        "missed": missed,
        "max_delay_observed": max(delays) if delays else None,
        "false_alarms": false_alarms,
        f"false_alarms_per_{per_events}": rate,
        "events_inside_segments": inside,
        "max_delay": max_delay,
        "ok": not missed and (inside <= 0 or rate["any"] <= 1.0),
    }
