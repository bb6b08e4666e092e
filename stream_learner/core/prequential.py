"""Prequential scores: each fresh event is predicted by the weights *before* they learn it.

Test-then-train evaluation (Gama, Sebastião & Rodrigues, "On evaluating stream learning algorithms",
Machine Learning 90, 2013): the score of a stream learner on an event is that of the model which has
not yet seen it, so no held-out set is needed and the score follows the stream as it drifts.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Sequence

import numpy as np


def accuracy(predictions: Sequence[int] | np.ndarray, labels: Sequence[int] | np.ndarray) -> float:
    """Fraction of correct predictions (NaN for no examples).

    >>> accuracy([1, 0, 1], [1, 1, 1])
    0.6666666666666666
    """
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    return float(np.mean(predictions == labels)) if len(labels) else math.nan


def macro_f1(predictions: Sequence[int] | np.ndarray, labels: Sequence[int] | np.ndarray) -> float:
    """Unweighted mean of the per-class F1 over the classes present in ``labels`` or ``predictions``.

    A model that predicts one class only scores 0 on the other: on a balanced set that is ≈ 0.33,
    where its accuracy still reads 0.5.

    >>> round(macro_f1(np.array([1, 1, 1, 1]), np.array([1, 1, 0, 0])), 6)  # F1(1) = 2/3, F1(0) = 0
    0.333333
    >>> macro_f1(np.array([0, 1]), np.array([0, 1]))
    1.0
    """
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    f1s = []
    for c in np.union1d(predictions, labels):
        tp = np.sum((predictions == c) & (labels == c))
        f1s.append(2 * tp / (np.sum(predictions == c) + np.sum(labels == c)))
    return float(np.mean(f1s)) if f1s else math.nan


class PrequentialScores:
    """Loss, accuracy and macro-F1 of the last ``size`` fresh events, and accuracy over the whole run.

    Parameters
    ----------
    size
        How many of the most recent events are scored (``training.metrics_window``).

    >>> w = PrequentialScores(size=3)
    >>> w.add([1, 1, 0, 1], [0, 1, 0, 1], [0.9, 0.1, 0.2, 0.1])
    >>> w.summary()["prequential_accuracy"], w.run_accuracy
    (1.0, 0.75)
    """

    def __init__(self, size: int) -> None:
        self.items: collections.deque[tuple[int, int, float]] = collections.deque(maxlen=size)
        self.seen = 0  # over the whole run, not only the window
        self.correct = 0

    def add(self, preds: Sequence[int], labels: Sequence[int], losses: Sequence[float]) -> None:
        self.items.extend(zip(preds, labels, losses, strict=True))
        self.seen += len(preds)
        self.correct += sum(p == y for p, y in zip(preds, labels, strict=True))

    @property
    def run_accuracy(self) -> float:
        """Prequential accuracy over every fresh event of this run."""
        return self.correct / self.seen if self.seen else float("nan")

    def summary(self) -> dict[str, float]:
        """``prequential_loss``, ``prequential_accuracy``, ``prequential_f1`` and ``window`` (events)."""
        if not self.items:
            return {}
        arr = np.asarray(self.items, dtype=np.float64)
        pred, label, loss = arr[:, 0].astype(int), arr[:, 1].astype(int), arr[:, 2]
        return {
            "prequential_loss": float(loss.mean()),
            "prequential_accuracy": accuracy(pred, label),
            "prequential_f1": macro_f1(pred, label),
            "window": float(len(arr)),
        }
