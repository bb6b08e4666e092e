"""The trainer thread: micro-batches of fresh + replayed events, one regularized step each.

One iteration of :meth:`Trainer.run`, top to bottom:

1. take a *window* of up to ``bucket_window × fresh_per_step`` fresh events from the consumer's
   queue (waiting at most ``max_wait_s`` for a full window: freshness over batch size; a smaller
   window when a publish is due in fewer steps); the window is worth ``ceil(n / fresh_per_step)``
   steps;
2. draw ``replay_per_step`` examples from the reservoir for each of those steps (experience replay);
3. sort the fresh and replayed examples of the window together by length and cut the sorted list
   into that many micro-batches so that the padded tokens are fewest (:func:`bucket_bounds`):
   length-bucketed micro-batches, little padding;
4. for each micro-batch (:meth:`Trainer.step`): forward it once; the fresh events' losses and
   predictions, made by the weights *before* this step, are their prequential score (test-then-train,
   Gama et al. 2013); loss = mean cross-entropy over the micro-batch, a non-finite loss skips the
   step (counted); backward, add the L2-SP gradient ``2λ(θ_S − θ0_S)``, clip, AdamW step; the fresh
   events enter the reservoir;
5. after the window: the offsets its events (and any dead-lettered events before them) cover advance;
6. every ``every_steps`` steps or ``every_seconds`` seconds, a :class:`Snapshot` is handed to the
   publisher; training goes on while it is written.

**Snapshots are taken between windows, never inside one.** Sorting reorders a window's events, so
in the middle of a window an event with a higher offset may be trained while a lower one of the
same partition is not yet: the covered offsets (``covered[p] = max(covered[p], offset + 1)`` per
trained event) are exact only at window boundaries, where every event of the window — a prefix of
what was received — has been trained. :meth:`Trainer.snapshot` refuses to run inside a window.
Freshness: a fresh event taken into a window is learned within ``bucket_window`` steps; with
``bucket_window = 1`` the loop is the plain one (one micro-batch in arrival order per step).

Dropout is off (the model stays in ``eval()`` mode) so that the prequential score is exactly the
prediction of the weights that are published.
"""

from __future__ import annotations

import collections
import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from stream_learner.core.config import Settings
from stream_learner.core.drift import DriftMonitor, static_embeddings
from stream_learner.core.events import TokenizedEvent
from stream_learner.core.intake import ConsumedBatch
from stream_learner.core.model import L2SP, LoadedModel
from stream_learner.core.replay import ClassBalancedReservoir, ReservoirBuffer, StoredExample
from stream_learner.service.metrics import Metrics
from stream_learner.training.distributed import Group, merge_counters, merge_offsets

log = logging.getLogger(__name__)

DISTANCE_EVERY_STEPS = 10
FUSED_ADAMW_DEVICES = ("cpu", "cuda")  # where torch has the fused AdamW kernel (CPU since 2.4)


@dataclass
class Counters:
    """The lineage counters carried from version to version."""

    steps: int = 0
    events_ingested: int = 0  # fresh events that went through a step (taken or skipped)
    examples_replayed: int = 0
    nonfinite_skipped: int = 0


@dataclass
class Snapshot:
    """A consistent copy of everything a version holds, taken between two steps."""

    model_state: dict[str, torch.Tensor]
    optimizer_state: dict
    replay_arrays: dict[str, np.ndarray]
    replay_meta: dict
    torch_rng: torch.Tensor
    counters: Counters
    offsets: dict[int, int]  # partition -> next offset covered by this snapshot
    metrics: dict[str, float]
    created_at: float = field(default_factory=time.time)
    # the replay buffers of ranks 1… of a data-parallel group, as (arrays, meta): see distributed.py
    replay_shards: list[tuple[dict[str, np.ndarray], dict]] = field(default_factory=list)


@dataclass
class FreshScores:
    """The prequential outputs of one step's fresh events (before the step learned them).

    ``embeddings`` are the means of the pretrained token embeddings over each event's tokens: a fixed
    feature map, what the drift signal on inputs compares
    (:func:`stream_learner.core.drift.static_embeddings`).
    """

    predictions: np.ndarray  # int64 [n]
    labels: np.ndarray  # int64 [n]
    losses: np.ndarray  # float32 [n]
    embeddings: np.ndarray  # float32 [n, hidden]: means of θ0's token embeddings


@dataclass
class StepRecord:
    """What one step did, handed to ``Trainer.on_step`` (the bench's measurements come from these)."""

    started: float  # time.time() at the start of the step
    ended: float  # time.time() at its end
    fresh: Sequence[TokenizedEvent]  # the fresh events it learned (partition, offset, produce time)
    replayed: int
    real_tokens: int  # tokens of the examples
    padded_tokens: int  # examples × the longest of them: what the model computed on
    loss: float  # mean cross-entropy (NaN if the step was skipped)
    cpu_seconds: float  # CPU time of the trainer thread in the step (its own share of the cores)


@dataclass
class Restored:
    """What a published version hands back to a new trainer (see ``publisher.load_version``)."""

    model_state: dict[str, torch.Tensor]
    optimizer_state: dict
    replay_arrays: dict[str, np.ndarray]
    replay_meta: dict
    torch_rng: torch.Tensor
    counters: Counters
    offsets: dict[int, int]
    version: int
    replay_shards: list[tuple[dict[str, np.ndarray], dict]] = field(default_factory=list)


class PrequentialWindow:
    """Loss, accuracy and macro-F1 of the last ``size`` fresh events, scored before learning them."""

    def __init__(self, size: int, num_labels: int) -> None:
        self.num_labels = num_labels
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
        if not self.items:
            return {}
        arr = np.asarray(self.items, dtype=np.float64)
        pred, label, loss = arr[:, 0].astype(int), arr[:, 1].astype(int), arr[:, 2]
        f1s = []
        for c in range(self.num_labels):
            tp = np.sum((pred == c) & (label == c))
            denom = np.sum(pred == c) + np.sum(label == c)
            if np.any(label == c) or np.any(pred == c):
                f1s.append(2 * tp / denom)
        return {
            "prequential_loss": float(loss.mean()),
            "prequential_accuracy": float(np.mean(pred == label)),
            "prequential_f1": float(np.mean(f1s)),
            "window": float(len(arr)),
        }


def pick_device(setting: str) -> torch.device:
    if setting == "cuda" or (setting == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def collate(
    examples: Sequence[StoredExample | TokenizedEvent], pad_id: int, with_token_types: bool
) -> dict[str, torch.Tensor]:
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


def make_replay_buffer(settings: Settings, vocab_size: int, rank: int = 0) -> ReservoirBuffer:
    cls = ClassBalancedReservoir if settings.replay.class_balanced else ReservoirBuffer
    return cls(settings.replay.capacity, seed=settings.training.seed + rank, vocab_size=vocab_size)


class Trainer:
    """Owns the model, optimizer, L2-SP term and replay buffer; runs in its own thread.

    Inputs arrive on ``fresh_queue`` (:class:`ConsumedBatch` from the consumer); snapshots leave on
    ``publish_queue`` (size 1: when the publisher is still busy, the trainer tries again after the
    next step instead of waiting).
    """

    def __init__(
        self,
        settings: Settings,
        loaded: LoadedModel,
        pad_id: int,
        with_token_types: bool,
        vocab_size: int,
        fresh_queue: queue.Queue[ConsumedBatch],
        publish_queue: queue.Queue[Snapshot],
        metrics: Metrics,
        stop: threading.Event,
        restored: Restored | None = None,
        publish_failed: threading.Event | None = None,
        probe: Sequence[TokenizedEvent] = (),
        special_token_ids: Sequence[int] = (),
        group: Group | None = None,
    ) -> None:
        t = settings.training
        self.group = group
        self.settings = settings
        self.fresh_queue, self.publish_queue, self.metrics, self.stop_event = (
            fresh_queue,
            publish_queue,
            metrics,
            stop,
        )
        self.pad_id, self.with_token_types = pad_id, with_token_types
        self.publish_failed = publish_failed or threading.Event()
        # sorted by length: the probe is scored in batches with little padding
        self.probe = sorted(probe, key=lambda e: len(e.input_ids))
        self.device = pick_device(t.device)
        if group is not None:
            self.device = group.device(self.device)
        self.bf16 = t.precision == "bf16" or (t.precision == "auto" and self.device.type == "cuda")
        torch.manual_seed(t.seed)

        self.model = loaded.model.to(self.device)
        self.model.eval()  # no dropout: prequential scores are those of the published weights
        params = dict(self.model.named_parameters())
        pretrained = [params[n] for n in loaded.pretrained]
        head = [params[n] for n in loaded.head]
        self.l2sp = L2SP(pretrained, t.l2sp_lambda)  # θ0 = the weights as loaded, before any restore
        for p in params.values():
            # grads stay allocated (zero_grad(set_to_none=False)) so the L2-SP gradient always has a target
            p.grad = torch.zeros_like(p)
        self.optimizer = torch.optim.AdamW(
            [
                {"params": pretrained, "weight_decay": 0.0},  # L2-SP, not decay towards 0
                # a random head needs a larger step than weights that are already good
                {
                    "params": head,
                    "weight_decay": t.head_weight_decay,
                    "lr": t.head_learning_rate or t.learning_rate,
                },
            ],
            lr=t.learning_rate,
            # the fused kernel: one pass over the 22.7M parameters instead of a Python loop over 100
            # tensors (CPU: 0.026 s against 0.22 s per step on one core, docs/performance.md)
            fused=self.device.type in FUSED_ADAMW_DEVICES,
        )
        self.replay = make_replay_buffer(settings, vocab_size, group.rank if group else 0)
        # drift on inputs is measured in a fixed feature space: the pretrained token embeddings (θ0)
        table = self.model.get_input_embeddings().weight
        at = next((i for i, p in enumerate(pretrained) if p is table), None)
        theta0_table = self.l2sp.theta0[at] if at is not None else table.detach().clone()
        self._token_table = theta0_table.float().cpu().numpy()  # no copy on CPU: θ0 is kept anyway
        self._special_ids = list(special_token_ids)
        self.drift = (
            DriftMonitor(len(settings.model.labels), settings.drift, t.seed)
            if settings.drift.enabled
            else None
        )
        self.window = PrequentialWindow(t.metrics_window, len(settings.model.labels))
        self.counters = Counters()
        self.covered: dict[int, int] = {}
        self.version = 0
        if restored is not None:
            self._restore(restored)
        # what the forward pass goes through: the model, or DDP around it (gradients all-reduced in
        # backward); state_dict, snapshots and the probe use the model itself
        self.forward_model: torch.nn.Module = self.model
        if group is not None:
            self.forward_model = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device] if self.device.type == "cuda" else None
            )
        if t.compile:  # sequence lengths and micro-batch sizes vary from step to step: dynamic shapes
            self.forward_model = torch.compile(self.forward_model, dynamic=True)
        # a rank with nothing to train in a step still takes part in it with this, at weight 0
        self._idle_example = StoredExample(
            input_ids=np.array([pad_id], dtype=np.int64), label=0, pair_start=0
        )

        self._pending: collections.deque[TokenizedEvent] = collections.deque()
        # (cumulative fresh-event count at the end of a consumed batch, the offsets it covers)
        self._watermarks: collections.deque[tuple[int, dict[int, int]]] = collections.deque()
        self._received = self.counters.events_ingested
        self._published_at = (self.counters.steps, dict(self.covered), time.monotonic())
        self._rate_ewma = 0.0
        self._fresh_rate_ewma = 0.0
        self._in_window = False  # inside a bucketed window: covered offsets are not a prefix yet
        self.on_step: Callable[[StepRecord], None] | None = None  # called after every step
        self.last_loss = float("nan")
        self.last_scores: FreshScores | None = None
        self._penalty = self.l2sp.penalty().item()

    # ----------------------------------------------------------------------------------------- restore
    def _restore(self, r: Restored) -> None:
        self.model.load_state_dict(r.model_state)
        self.optimizer.load_state_dict(r.optimizer_state)
        if r.replay_arrays:  # a rank new to the group has none
            self.replay = ReservoirBuffer.from_state_dict(r.replay_arrays, r.replay_meta)
        torch.set_rng_state(r.torch_rng)
        self.counters = Counters(**vars(r.counters))
        self.covered = dict(r.offsets)
        self.version = r.version

    # -------------------------------------------------------------------------------------- the loop
    def run(self) -> None:
        """Thread target: train until ``stop`` is set, then hand over a final snapshot."""
        log.info("trainer on %s (%s)", self.device, "bf16 autocast" if self.bf16 else "fp32")
        if self.group is not None:
            return self._run_in_group()
        t = self.settings.training
        while not self.stop_event.is_set():
            fresh = self._take_fresh(t.fresh_per_step * self._window_steps())
            if fresh:
                self.train_window(fresh)
            # only here, between windows, are the covered offsets exact (see the module docstring)
            self._advance_offsets()
            self.maybe_publish()
        if self.settings.publish.on_stop:
            self.maybe_publish(force=True)

    def _run_in_group(self) -> None:
        """:meth:`run` in a data-parallel group: the lockstep of ``distributed.py``, steps 1 and 3."""
        t, group = self.settings.training, self.group
        assert group is not None
        while True:
            fresh = self._take_fresh(t.fresh_per_step * self._window_steps())
            # 1. agree: the most steps any rank wants, stop if any rank stops, publish if rank 0 says so
            steps, stop, publish = group.agree(
                math.ceil(len(fresh) / t.fresh_per_step),
                self.stop_event.is_set(),
                group.is_root and self._publish_due() and not self.publish_queue.full(),
            )
            if steps:
                self.train_window(fresh, steps)
            self._advance_offsets()
            if stop:
                break
            if publish:  # 3. every rank takes part in the snapshot; rank 0 hands it to its publisher
                self._publish(self.snapshot(), final=False)
        if not self.stop_event.is_set():
            log.info("another rank stopped the group: stopping")
            self.stop_event.set()
        # the final version, if any rank has something new since the last one
        _, _, dirty = group.agree(0, True, self._publish_due(force=True))
        if self.settings.publish.on_stop and dirty:
            self._publish(self.snapshot(), final=True)

    def _window_steps(self) -> int:
        """Micro-batches in the next window: ``bucket_window``, fewer when a publish falls due sooner
        (so that ``publish.every_steps`` keeps its cadence although snapshots wait for a window's end)."""
        window = self.settings.training.bucket_window
        left = self.settings.publish.every_steps - (self.counters.steps - self._published_at[0])
        return min(window, left) if left > 0 else window  # overdue: the publisher is busy, no hurry

    def _take_fresh(self, want: int | None = None) -> list[TokenizedEvent]:
        """Up to ``want`` events (default ``fresh_per_step``); wait at most ``max_wait_s`` for them all."""
        want = want or self.settings.training.fresh_per_step
        deadline = time.monotonic() + self.settings.training.max_wait_s
        while len(self._pending) < want and not self.stop_event.is_set():
            timeout = deadline - time.monotonic()
            if timeout <= 0 and self._pending:
                break
            try:
                batch = self.fresh_queue.get(timeout=max(timeout, 0.05) if self._pending else 0.1)
            except queue.Empty:
                if self._pending or time.monotonic() >= deadline:
                    break
                continue
            self.accept(batch)
        self.metrics.queue_depth.set(self.fresh_queue.qsize())
        return [self._pending.popleft() for _ in range(min(want, len(self._pending)))]

    def accept(self, batch: ConsumedBatch) -> None:
        """Queue a consumed batch's events and remember which offsets it covers once they are trained."""
        self._pending.extend(batch.events)
        self._received += len(batch.events)
        self._watermarks.append((self._received, batch.next_offsets))

    def train_window(self, fresh: list[TokenizedEvent], steps: int | None = None) -> list[float]:
        """Train ``fresh`` (a prefix of what was received) as length-bucketed micro-batches.

        ``ceil(len(fresh) / fresh_per_step)`` steps, each with its ``replay_per_step`` replayed
        examples drawn up front; the fresh and replayed examples are sorted by length together and cut
        by :func:`bucket_bounds` (each micro-batch at least a quarter of the average size, and at most
        the padded tokens of a plain micro-batch of the window's longest example). Returns each step's
        loss. Snapshots are refused until the window is done (see the module docstring).

        Parameters
        ----------
        fresh
            The window's fresh events, in the order received (each partition's in offset order).
        steps
            How many steps (default: as many as ``fresh`` fills). In a data-parallel group, the number
            the ranks agreed on: steps with no example of this rank train one of weight 0.

        """
        t = self.settings.training
        steps = steps or math.ceil(len(fresh) / t.fresh_per_step)
        if steps <= 1:
            return [self.step(fresh)]
        replayed: list[StoredExample] = []
        if len(self.replay) and t.replay_per_step:
            for _ in range(steps):
                replayed.extend(self.replay.sample(t.replay_per_step))
        examples: list[TokenizedEvent | StoredExample] = [*fresh, *replayed]
        lengths = np.fromiter((len(e.input_ids) for e in examples), dtype=np.int64, count=len(examples))
        order = np.argsort(lengths, kind="stable")
        filled = min(steps, len(examples))  # fewer examples than steps: the rest are idle steps
        bounds = []
        if filled:
            per_step = math.ceil(len(examples) / filled)
            bounds = bucket_bounds(
                lengths[order],
                filled,
                min_size=max(1, len(examples) // (4 * filled)),
                max_tokens=per_step * int(lengths.max()),
            )
        bounds += [(len(examples), len(examples))] * (steps - filled)
        losses = []
        self._in_window = True
        for a, b in bounds:
            batch = [examples[i] for i in order[a:b]]
            losses.append(
                self.step(
                    [e for e in batch if isinstance(e, TokenizedEvent)],
                    replayed=[e for e in batch if isinstance(e, StoredExample)],
                )
            )
        # not in a finally: a window cut short by an error never becomes snapshot-able
        self._in_window = False
        return losses

    def step(self, fresh: list[TokenizedEvent], replayed: list[StoredExample] | None = None) -> float:
        """One step on ``fresh`` + ``replayed``; returns the mean cross-entropy (NaN if skipped).

        Parameters
        ----------
        fresh
            Fresh events: scored (prequentially) by the weights before this step, then learned.
        replayed
            The replayed examples of the micro-batch; None draws ``replay_per_step`` from the reservoir
            (the plain micro-batch, as ``stream-learner eval`` steps).

        """
        t0 = time.perf_counter()
        started, cpu0 = time.time(), time.thread_time()
        if replayed is None:
            replayed = self.replay.sample(self.settings.training.replay_per_step) if len(self.replay) else []
        examples: list[TokenizedEvent | StoredExample] = [*fresh, *replayed]
        weight = 1.0
        if not examples:  # only in a group: this rank has nothing, yet takes part in the step
            examples, weight = [self._idle_example], 0.0
        host = collate(examples, self.pad_id, self.with_token_types)
        padded_tokens = int(host["attention_mask"].numel()) if weight else 0
        real_tokens = int(host["attention_mask"].sum()) if weight else 0
        if self.device.type == "cuda":  # page-locked memory: the copies below do not block the host
            host = {k: v.pin_memory() for k, v in host.items()}
        batch = {k: v.to(self.device, non_blocking=True) for k, v in host.items()}
        labels = batch.pop("labels")
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else nullcontext()
        with autocast:
            logits = self.forward_model(**batch).logits
        per_example = F.cross_entropy(logits.float(), labels, reduction="none")
        loss = per_example.mean()
        objective = loss  # what backward differentiates
        nonfinite = not torch.isfinite(loss)
        if self.group is not None:
            # 2. of the lockstep: the loss scaled so that DDP's average over ranks is the group's mean
            total, nonfinite = self.group.step_totals(len(examples) if weight else 0, nonfinite)
            objective = per_example.sum() * (weight * self.group.world_size / max(total, 1))

        # prequential score of the fresh events: the weights before this step predicted them
        n = len(fresh)
        if n:  # a bucketed micro-batch may hold replayed examples only
            scores = self.last_scores = FreshScores(
                predictions=logits[:n].argmax(-1).cpu().numpy(),
                labels=labels[:n].cpu().numpy(),
                losses=per_example[:n].detach().float().cpu().numpy(),
                embeddings=static_embeddings(
                    [e.input_ids for e in fresh], self._token_table, self._special_ids
                ),
            )
            self.window.add(scores.predictions.tolist(), scores.labels.tolist(), scores.losses.tolist())
            self._watch_drift(scores, replayed)

        self.counters.events_ingested += n
        self.counters.examples_replayed += len(replayed)
        # a snapshot may fall in the middle of a consumed batch: the offsets it covers must then be
        # exactly those of the events counted so far (each partition's events arrive in offset order)
        for e in fresh:
            self.covered[e.partition] = max(self.covered.get(e.partition, 0), e.offset + 1)
        if nonfinite:
            self.counters.nonfinite_skipped += 1
            self.metrics.nonfinite_skipped.inc()
            if self.group is not None:  # DDP's reducer expects a backward on every rank: a zero one
                sum(p.sum() for p in self.model.parameters() if p.requires_grad).mul(0).backward()
            self.optimizer.zero_grad(set_to_none=False)
            log.warning("non-finite loss: step skipped (%d so far)", self.counters.nonfinite_skipped)
            self.metrics.events_trained.inc(n)
            self._notify(started, cpu0, fresh, len(replayed), real_tokens, padded_tokens, float("nan"))
            return float("nan")

        objective.backward()
        self.l2sp.add_gradient_()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.settings.training.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=False)
        self.counters.steps += 1
        self._check_same_weights()

        for e in fresh:
            self.replay.add(e.input_ids, e.label, e.pair_start)
        data_loss = loss.item()
        self._record(data_loss, n, len(replayed), time.perf_counter() - t0)
        self._notify(started, cpu0, fresh, len(replayed), real_tokens, padded_tokens, data_loss)
        return data_loss

    def _check_same_weights(self) -> None:
        """In a group, every ``distributed.check_every_steps`` steps: all ranks hold the same weights."""
        every = self.settings.distributed.check_every_steps
        if self.group is None or not every or self.counters.steps % every:
            return
        if not self.group.same_weights(list(self.model.parameters())):
            raise RuntimeError(
                f"the ranks' weights differ after step {self.counters.steps}: the group has diverged "
                "(a non-deterministic kernel or a bug); it restarts from LATEST"
            )
        self.metrics.weight_checks.inc()

    def _notify(
        self,
        started: float,
        cpu0: float,
        fresh: Sequence[TokenizedEvent],
        replayed: int,
        real_tokens: int,
        padded_tokens: int,
        loss: float,
    ) -> None:
        if self.on_step is not None:
            cpu = time.thread_time() - cpu0
            self.on_step(
                StepRecord(started, time.time(), fresh, replayed, real_tokens, padded_tokens, loss, cpu)
            )

    def _watch_drift(self, scores: FreshScores, replayed: list[StoredExample]) -> None:
        """Feed the drift signals: errors and losses, labels against the reservoir's mix, and input
        embeddings against those of the replayed examples (see ``drift.py``)."""
        if self.drift is None:
            return
        reference = static_embeddings([r.input_ids for r in replayed], self._token_table, self._special_ids)
        counts = None if self.settings.replay.class_balanced else self.replay.label_counts()
        errors = (scores.predictions != scores.labels).astype(np.float32)
        for name in self.drift.update(
            errors, scores.losses, scores.labels, scores.embeddings, counts, reference
        ):
            self.metrics.drift_detections.labels(name).inc()
            log.warning("drift detected by the %s signal after %d events", name, self.drift.events_seen)
        for name, score in self.drift.scores().items():
            self.metrics.drift_score.labels(name).set(score)

    def _record(self, loss: float, n_fresh: int, n_replayed: int, seconds: float) -> None:
        m = self.metrics
        self.last_loss = loss
        if self.counters.steps % DISTANCE_EVERY_STEPS == 1 or DISTANCE_EVERY_STEPS == 1:
            # ‖θ−θ0‖ costs a pass over all weights: measured every few steps, not on every one
            sq = float(self.l2sp.squared_distance())
            self._penalty = self.l2sp.lam * sq
            m.l2sp_penalty.set(self._penalty)
            m.param_distance.set(sq**0.5)
        self.last_loss = loss + self._penalty
        m.steps.inc()
        m.events_trained.inc(n_fresh)
        m.examples_replayed.inc(n_replayed)
        m.step_seconds.observe(seconds)
        m.training_loss.set(self.last_loss)
        rate = (n_fresh + n_replayed) / max(seconds, 1e-9)
        fresh_rate = n_fresh / max(seconds, 1e-9)
        self._rate_ewma = rate if self._rate_ewma == 0 else 0.9 * self._rate_ewma + 0.1 * rate
        self._fresh_rate_ewma = (
            fresh_rate if self._fresh_rate_ewma == 0 else 0.9 * self._fresh_rate_ewma + 0.1 * fresh_rate
        )
        m.examples_per_second.set(self._rate_ewma)
        m.events_per_second.set(self._fresh_rate_ewma)
        m.replay_size.set(len(self.replay))
        m.replay_bytes.set(self.replay.nbytes())
        summary = self.window.summary()
        if summary:
            m.prequential_loss.set(summary["prequential_loss"])
            m.prequential_accuracy.set(summary["prequential_accuracy"])
            m.prequential_f1.set(summary["prequential_f1"])

    def _advance_offsets(self) -> None:
        """A consumed batch's offsets (dead-lettered events included) are covered once all its fresh
        events went through a step; :meth:`step` covers each trained event as it goes."""
        trained = self.counters.events_ingested
        while self._watermarks and self._watermarks[0][0] <= trained:
            for partition, offset in self._watermarks.popleft()[1].items():
                # max: the events of a later batch may be trained (and covered) already
                self.covered[partition] = max(self.covered.get(partition, 0), offset)

    # ----------------------------------------------------------------------------------- publishing
    def _publish_due(self, force: bool = False) -> bool:
        """Whether there is something new since the last snapshot and a version is due (or forced)."""
        steps, covered, at = self._published_at
        dirty = self.counters.steps != steps or self.covered != covered
        p = self.settings.publish
        due = (
            force or self.counters.steps - steps >= p.every_steps or time.monotonic() - at >= p.every_seconds
        )
        return dirty and due

    def maybe_publish(self, force: bool = False) -> bool:
        """Hand a snapshot to the publisher when one is due and there is something new in it."""
        if not self._publish_due(force):
            return False
        return self._publish(self.snapshot(), final=force)

    def _publish(self, snap: Snapshot | None, final: bool) -> bool:
        """Queue ``snap`` for the publisher (None: a rank other than 0 of a group, which has none)."""
        if snap is not None:
            try:
                if final:
                    self._hand_over_final(snap)
                else:
                    self.publish_queue.put_nowait(snap)
            except queue.Full:
                return False  # the publisher is busy with the previous one: try after the next step
        self._published_at = (self.counters.steps, dict(self.covered), time.monotonic())
        return True

    @torch.no_grad()
    def probe_accuracy(self, batch_size: int = 64) -> float:
        """Accuracy of the current weights on the probe set (the poisoning gate's measure)."""
        correct = 0
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else nullcontext()
        for i in range(0, len(self.probe), batch_size):
            batch = collate(self.probe[i : i + batch_size], self.pad_id, self.with_token_types)
            labels = batch.pop("labels")
            with autocast:
                logits = self.model(**{k: v.to(self.device) for k, v in batch.items()}).logits
            correct += int((logits.argmax(-1).cpu() == labels).sum())
        return correct / max(len(self.probe), 1)

    def _hand_over_final(self, snap: Snapshot) -> None:
        """Wait for the publisher to take the final snapshot, unless it has given up (fenced out)."""
        while not self.publish_failed.is_set():
            try:
                self.publish_queue.put(snap, timeout=0.2)
                return
            except queue.Full:
                continue
        raise queue.Full

    def snapshot(self) -> Snapshot | None:
        """A consistent copy (CPU tensors) of model, optimizer, replay, RNG, counters and offsets.

        Refused inside a bucketed window, where the covered offsets may run ahead of an untrained
        event (see the module docstring). In a data-parallel group every rank must call it (a
        collective): rank 0 gets the group's snapshot, the others None.
        """
        if self._in_window:
            raise RuntimeError("no snapshot inside a bucketed window: its covered offsets are not exact")
        if self.group is not None:
            return self._group_snapshot()
        return self._local_snapshot()

    def _group_snapshot(self) -> Snapshot | None:
        """Step 3 of the lockstep: every rank's offsets, counters and replay buffer, merged on rank 0."""
        assert self.group is not None
        if self.group.is_root:
            parts = self.group.gather(None)
            assert parts is not None
            snap = self._local_snapshot()
            snap.offsets = merge_offsets([snap.offsets, *(p[0] for p in parts[1:])])
            snap.counters = merge_counters([snap.counters, *(p[1] for p in parts[1:])])
            snap.replay_shards = [(p[2], p[3]) for p in parts[1:]]
            return snap
        arrays, meta = self.replay.state_dict()
        self.group.gather((dict(self.covered), Counters(**vars(self.counters)), arrays, meta))
        return None

    def _local_snapshot(self) -> Snapshot:
        model_state = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
        opt = self.optimizer.state_dict()
        opt_state = {
            "state": {
                i: {k: (v.detach().to("cpu", copy=True) if torch.is_tensor(v) else v) for k, v in s.items()}
                for i, s in opt["state"].items()
            },
            "param_groups": [dict(g) for g in opt["param_groups"]],
        }
        arrays, meta = self.replay.state_dict()
        metrics = {"training_loss": self.last_loss, **self.window.summary()}
        metrics["param_distance"] = float(self.l2sp.squared_distance()) ** 0.5
        if self.probe:
            metrics["probe_accuracy"] = self.probe_accuracy()
            self.metrics.probe_accuracy.set(metrics["probe_accuracy"])
        return Snapshot(
            model_state=model_state,
            optimizer_state=opt_state,
            replay_arrays={k: v.copy() for k, v in arrays.items()},
            replay_meta=meta,
            torch_rng=torch.get_rng_state(),
            counters=Counters(**vars(self.counters)),
            offsets=dict(self.covered),
            metrics={k: v for k, v in metrics.items() if v == v},  # drop NaN
        )
