"""Micro-batches: padding a batch (:func:`collate`) and cutting a window into length buckets.

A *window* is what the trainer takes from the queue at once: up to ``bucket_window × fresh_per_step``
fresh events, worth ``ceil(n / fresh_per_step)`` steps, plus ``replay_per_step`` replayed examples per
step. :func:`plan_window` sorts the window's fresh and replayed examples together by length and cuts
the sorted list with :func:`bucket_bounds` into micro-batches with the fewest padded tokens.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from stream_learner.core.events import TokenizedEvent
from stream_learner.core.replay import StoredExample

Example = TokenizedEvent | StoredExample


def collate(examples: Sequence[Example], pad_id: int, with_token_types: bool) -> dict[str, torch.Tensor]:
    """Pad a micro-batch to its longest member; token types from each example's ``pair_start``."""
    lengths = np.fromiter((len(e.input_ids) for e in examples), dtype=np.int64, count=len(examples))
    width = int(lengths.max())
    ids = np.full((len(examples), width), pad_id, dtype=np.int64)
    types = np.zeros((len(examples), width), dtype=np.int64)
    for i, e in enumerate(examples):
        ids[i, : lengths[i]] = e.input_ids
        if e.pair_start:
            types[i, e.pair_start : lengths[i]] = 1
    mask = (np.arange(width)[None, :] < lengths[:, None]).astype(np.int64)
    batch = {
        "input_ids": torch.from_numpy(ids),
        "attention_mask": torch.from_numpy(mask),
        "labels": torch.tensor([e.label for e in examples], dtype=torch.long),
    }
    if with_token_types:
        batch["token_type_ids"] = torch.from_numpy(types)
    return batch


def bucket_bounds(
    lengths: Sequence[int] | np.ndarray, steps: int, min_size: int = 1, max_tokens: int | None = None
) -> list[tuple[int, int]]:
    """Cut examples sorted by length into ``steps`` micro-batches with the fewest padded tokens.

    A micro-batch ``[a, b)`` of the sorted list costs ``(b − a) × lengths[b − 1]`` tokens (each example
    padded to the longest). Dynamic programming over the cut points (``steps × n²`` numpy work) finds
    the cuts of least total cost among those where every micro-batch has at least ``min_size``
    examples and costs at most ``max_tokens`` (a bound on a step's activations; the equal split always
    satisfies it when ``max_tokens ≥ ceil(n / steps) × max(lengths)``).

    Parameters
    ----------
    lengths
        Lengths of the examples, sorted ascending.
    steps
        How many micro-batches (1 ≤ steps ≤ n).
    min_size
        Fewest examples in a micro-batch.
    max_tokens
        Most padded tokens in a micro-batch; None = no bound.

    Returns ``steps`` half-open ranges ``(a, b)`` that cover ``range(n)`` in order.

    >>> bucket_bounds([3, 3, 4, 10, 11, 50], steps=3)
    [(0, 3), (3, 5), (5, 6)]
    >>> bucket_bounds([5] * 6, steps=2, max_tokens=15)  # ties: the bound keeps steps even
    [(0, 3), (3, 6)]

    References
    ----------
    [^1]: Ott, M. et al. (2019). fairseq: A Fast, Extensible Toolkit for Sequence Modeling (batching
          by length). NAACL-HLT 2019 Demonstrations.

    """
    x = np.asarray(lengths, dtype=np.float64)
    n = len(x)
    if not 1 <= steps <= n:
        raise ValueError(f"steps must be in [1, {n}], got {steps}")
    if np.any(np.diff(x) < 0):
        raise ValueError("lengths must be sorted ascending")
    start = np.arange(n + 1)[:, None]
    stop = np.arange(n + 1)[None, :]
    size = stop - start
    cost = np.where(size > 0, x[np.maximum(stop - 1, 0)] * size, np.inf)  # cost[a, b] of batch [a, b)
    allowed = size >= max(min_size, 1)
    if max_tokens is not None:
        allowed &= cost <= max_tokens
    cost = np.where(allowed, cost, np.inf)
    best = np.full(n + 1, np.inf)
    best[0] = 0.0
    choices = []
    for _ in range(steps):
        total = best[:, None] + cost  # total[a, b]: best cut of [0, a), then the batch [a, b)
        arg = total.argmin(axis=0)
        best = total[arg, np.arange(n + 1)]
        choices.append(arg)
    if not np.isfinite(best[n]):
        raise ValueError(f"no cut of {n} examples into {steps} batches meets min_size and max_tokens")
    bounds, b = [], n
    for arg in reversed(choices):
        a = int(arg[b])
        bounds.append((a, b))
        b = a
    return bounds[::-1]


def plan_window(examples: Sequence[Example], steps: int) -> list[list[Example]]:
    """Cut a window's examples (fresh and replayed) into ``steps`` length-bucketed micro-batches.

    The examples are sorted by length (stable: equal lengths keep their order) and cut by
    :func:`bucket_bounds`, each micro-batch at least a quarter of the average size and at most the
    padded tokens of a plain micro-batch of the window's longest example. With fewer examples than
    steps the last micro-batches are empty (a data-parallel rank with nothing to train still takes
    part in the step).

    >>> from stream_learner.core.replay import StoredExample
    >>> ex = [StoredExample(np.arange(n), label=0, pair_start=0) for n in (9, 2, 8, 3)]
    >>> [[len(e.input_ids) for e in b] for b in plan_window(ex, 2)]
    [[2, 3], [8, 9]]
    >>> [len(b) for b in plan_window(ex[:1], 3)]
    [1, 0, 0]
    """
    lengths = np.fromiter((len(e.input_ids) for e in examples), dtype=np.int64, count=len(examples))
    order = np.argsort(lengths, kind="stable")
    filled = min(steps, len(examples))
    bounds: list[tuple[int, int]] = []
    if filled:
        per_step = math.ceil(len(examples) / filled)
        bounds = bucket_bounds(
            lengths[order],
            filled,
            min_size=max(1, len(examples) // (4 * filled)),
            max_tokens=per_step * int(lengths.max()),
        )
    bounds += [(len(examples), len(examples))] * (steps - filled)
    return [[examples[i] for i in order[a:b]] for a, b in bounds]
