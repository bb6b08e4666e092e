"""The trainer thread: windows of fresh + replayed events, one regularized step per micro-batch.

One iteration of :meth:`TrainingLoop.run`, top to bottom:

1. take a *window* of up to ``bucket_window × fresh_per_step`` fresh events from the consumer's
   queue, waiting at most ``max_wait_s`` for a full window (freshness over batch size); a smaller
   window when a version falls due sooner (:class:`~stream_learner.training.cadence.PublishCadence`);
   the window is worth ``ceil(n / fresh_per_step)`` steps;
2. draw ``replay_per_step`` examples from the reservoir for each of those steps (experience replay);
3. sort the fresh and replayed examples of the window together by length and cut them into that many
   micro-batches with the fewest padded tokens (:func:`~stream_learner.core.batching.plan_window`);
4. for each micro-batch, one step (:class:`~stream_learner.training.engine.StepEngine`); the fresh
   events' losses and predictions, made by the weights *before* the step, are their prequential
   score (test-then-train, Gama et al. 2013) and feed the drift watch; the fresh events enter the
   reservoir; the observers hear of the step;
5. after the window, the offsets its events (and any dead-lettered records before them) cover
   advance (:class:`~stream_learner.training.ledger.OffsetLedger`);
6. when a version is due, a :class:`~stream_learner.training.state.Snapshot` goes to the publisher;
   training goes on while it is written.

**Snapshots are taken between windows, never inside one.** Sorting reorders a window's events, so
inside a window an event with a higher offset may be trained while a lower one of the same partition
is not yet; the covered offsets are exact only at a window's end (see ``ledger.py``).
Freshness: an event taken into a window is learned within ``bucket_window`` steps; with
``bucket_window = 1`` the loop is the plain one (one micro-batch in arrival order per step).
"""

from __future__ import annotations

import collections
import logging
import math
import queue
import threading
import time
from collections.abc import Sequence

import torch

from stream_learner.core.batching import Example, plan_window
from stream_learner.core.config import Settings
from stream_learner.core.event_times import EventTimes
from stream_learner.core.events import TokenizedEvent
from stream_learner.core.intake import ConsumedBatch
from stream_learner.core.prequential import PrequentialScores
from stream_learner.core.replay import ReservoirBuffer, StoredExample
from stream_learner.training.cadence import PublishCadence
from stream_learner.training.distributed import Group, merge_counters, merge_offsets
from stream_learner.training.drift_watch import DriftWatch
from stream_learner.training.engine import StepEngine
from stream_learner.training.ledger import OffsetLedger
from stream_learner.training.observers import LoopObserver, StepRecord
from stream_learner.training.state import Counters, Snapshot
from stream_learner.training.threads import take_threads

log = logging.getLogger(__name__)

DISTANCE_EVERY_STEPS = 10  # ‖θ−θ0‖ costs a pass over all weights: measured every few steps


class TrainingLoop:
    """The learner's training thread: takes windows from ``fresh_queue``, hands snapshots to
    ``publish_queue`` (size 1: when the publisher is still busy, the loop tries again after the next
    window instead of waiting). Built by :func:`~stream_learner.training.factory.build_trainer`.

    Why this class is ≈ 300 lines: the loop is kept readable top to bottom in one place (intake,
    window, step, observers, publish cadence, snapshot), as torchtune's recipes keep theirs; the
    arithmetic (``engine.py``), the offset ledger (``ledger.py``) and the cadence (``cadence.py``)
    live in their own parts, with their own unit tests.
    """

    def __init__(
        self,
        settings: Settings,
        engine: StepEngine,
        replay: ReservoirBuffer,
        fresh_queue: queue.Queue[ConsumedBatch],
        publish_queue: queue.Queue[Snapshot],
        stop: threading.Event,
        drift: DriftWatch | None = None,
        observers: Sequence[LoopObserver] = (),
        probe: Sequence[TokenizedEvent] = (),
        publish_failed: threading.Event | None = None,
        group: Group | None = None,
        restored: Snapshot | None = None,
        threads: int | None = None,
    ) -> None:
        self.settings, self.engine, self.replay, self.drift, self.group = (
            settings,
            engine,
            replay,
            drift,
            group,
        )
        self.fresh_queue, self.publish_queue, self.stop_event = fresh_queue, publish_queue, stop
        self.threads = threads  # torch's intra-op threads this thread takes (threads.py)
        self.publish_failed = publish_failed or threading.Event()
        self.observers = list(observers)
        self.probe = sorted(probe, key=lambda e: len(e.input_ids))  # scored with little padding
        self.prequential = PrequentialScores(settings.training.metrics_window)
        self.counters = Counters()
        self.ledger = OffsetLedger()
        self.version = 0
        if restored is not None:
            self.restore(restored)
        p = settings.publish
        self.cadence = PublishCadence(
            p.every_steps, p.every_seconds, self.counters.steps, self.ledger.covered
        )
        self._pending: collections.deque[TokenizedEvent] = collections.deque()
        self.learned_times = EventTimes()  # of the events learned since the last snapshot handed over
        self._in_window = False  # inside a window: covered offsets are not a prefix yet
        self.penalty = engine.l2sp.penalty().item()
        self.last_loss = float("nan")  # the last step's objective: data loss + penalty

    def restore(self, r: Snapshot) -> None:
        """Resume from a published version: weights, optimizer, replay, RNG, counters, offsets, drift."""
        self.engine.load_state(r.model_state, r.optimizer_state)
        if r.replay_arrays:  # a rank new to the group has none
            self.replay = ReservoirBuffer.from_state_dict(r.replay_arrays, r.replay_meta)
        if self.drift is not None and r.drift is not None:
            self.drift.load_state_dict(*r.drift)
        torch.set_rng_state(r.torch_rng)
        self.counters = Counters(**vars(r.counters))
        self.ledger = OffsetLedger(r.offsets)
        self.version = r.version

    # -------------------------------------------------------------------------------------- the loop
    def run(self) -> None:
        """Thread target: train until ``stop`` is set, then hand over a final snapshot."""
        self.engine.bind_thread()  # this thread's CUDA device: not the main thread's
        if self.threads is not None:  # the cores the builder's thread handed over (threads.py)
            take_threads(self.threads)
        log.info("trainer on %s, %s", self.engine.device, self.engine.precision.describe())
        if self.group is not None:
            return self._run_in_group()
        while not self.stop_event.is_set():
            fresh = self.take_fresh(self._window_size())
            if fresh:
                self.train_window(fresh)
            self.ledger.advance()  # only here, between windows, are the covered offsets exact
            self.maybe_publish()
        if self.settings.publish.on_stop:
            self.maybe_publish(force=True)

    def _run_in_group(self) -> None:
        """:meth:`run` in a data-parallel group: the lockstep of ``distributed.py``, steps 1 and 3."""
        group = self.group
        assert group is not None
        while True:
            fresh = self.take_fresh(self._window_size())
            # 1. agree: the most steps any rank wants, stop if any rank stops, publish if rank 0 says so
            steps, stop, publish = group.agree(
                math.ceil(len(fresh) / self.settings.training.fresh_per_step),
                self.stop_event.is_set(),
                group.is_root and self._publish_due() and not self.publish_queue.full(),
            )
            if steps:
                self.train_window(fresh, steps)
            self.ledger.advance()
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

    def _window_size(self) -> int:
        t = self.settings.training
        return t.fresh_per_step * self.cadence.window_steps(self.counters.steps, t.bucket_window)

    def take_fresh(self, want: int) -> list[TokenizedEvent]:
        """Up to ``want`` events; wait at most ``max_wait_s`` for them all."""
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
        for o in self.observers:
            o.on_take(self.fresh_queue.qsize())
        return [self._pending.popleft() for _ in range(min(want, len(self._pending)))]

    def accept(self, batch: ConsumedBatch) -> None:
        """Queue a consumed batch's events; the ledger covers its offsets once they are trained."""
        self._pending.extend(batch.events)
        self.ledger.receive(len(batch.events), batch.next_offsets)

    def train_window(self, fresh: list[TokenizedEvent], steps: int | None = None) -> list[float]:
        """Train ``fresh`` (a prefix of what was received, in order) as length-bucketed micro-batches.

        ``steps`` defaults to ``ceil(len(fresh) / fresh_per_step)``; in a data-parallel group it is the
        number the ranks agreed on (a rank with no example for a step trains one of weight 0). Each step
        gets ``replay_per_step`` replayed examples, drawn up front. Returns each step's loss (NaN for a
        skipped one). Snapshots are refused until the window is done (see the module docstring).
        """
        t = self.settings.training
        steps = steps or math.ceil(len(fresh) / t.fresh_per_step)
        replayed: list[StoredExample] = []
        if len(self.replay) and t.replay_per_step:
            for _ in range(steps):
                replayed.extend(self.replay.sample(t.replay_per_step))
        if steps <= 1:
            batches: list[list[Example]] = [[*fresh, *replayed]]
        else:
            batches = plan_window([*fresh, *replayed], steps)
        self._in_window = True
        losses = [self._step(batch) for batch in batches]
        # not in a finally: a window cut short by an error never becomes snapshot-able
        self._in_window = False
        return losses

    def _step(self, batch: list[Example]) -> float:
        """One step on a micro-batch, and its bookkeeping: scores, drift, counters, ledger, replay."""
        started, cpu0 = time.time(), time.thread_time()
        fresh = [e for e in batch if isinstance(e, TokenizedEvent)]
        replayed = [e for e in batch if isinstance(e, StoredExample)]
        out = self.engine.step([*fresh, *replayed], len(fresh))
        fired: list[str] = []
        if fresh:  # a bucketed micro-batch may hold replayed examples only
            self.prequential.add(out.predictions.tolist(), out.labels.tolist(), out.losses.tolist())
            if self.drift is not None:
                fired = self.drift.observe(
                    fresh, out.predictions, out.labels, out.losses, replayed, self.replay
                )
        self.counters.events_trained += len(fresh)
        if fresh:
            self.learned_times.add_all(e.timestamp_ms for e in fresh)
            newest = max(e.timestamp_ms for e in fresh)
            self.counters.newest_event_ms = max(self.counters.newest_event_ms, newest)
        self.counters.examples_replayed += len(replayed)
        self.ledger.trained(fresh)
        distance = None
        if out.skipped:
            self.counters.nonfinite_skipped += 1
            log.warning("non-finite loss: step skipped (%d so far)", self.counters.nonfinite_skipped)
        else:
            self.counters.steps += 1
            self._check_same_weights()
            for e in fresh:
                self.replay.add(e.input_ids, e.label, e.pair_start)
            if self.counters.steps % DISTANCE_EVERY_STEPS == 1 or DISTANCE_EVERY_STEPS == 1:
                sq = float(self.engine.l2sp.squared_distance())
                self.penalty, distance = self.engine.l2sp.lam * sq, sq**0.5
            self.last_loss = out.loss + self.penalty
        record = StepRecord(
            started=started,
            ended=time.time(),
            fresh=fresh,
            replayed=len(replayed),
            real_tokens=out.real_tokens,
            padded_tokens=out.padded_tokens,
            loss=out.loss,
            skipped=out.skipped,
            cpu_seconds=time.thread_time() - cpu0,
            predictions=out.predictions,
            labels=out.labels,
            losses=out.losses,
            steps=self.counters.steps,
            penalty=self.penalty,
            param_distance=distance,
            replay_size=len(self.replay),
            replay_bytes=self.replay.nbytes(),
            prequential=self.prequential.summary(),
            drift_fired=fired,
            drift_scores=self.drift.scores() if self.drift is not None else {},
        )
        for o in self.observers:
            o.on_step(record)
        return out.loss

    def _check_same_weights(self) -> None:
        """In a group, every ``distributed.check_every_steps`` steps: all ranks hold the same weights."""
        every = self.settings.distributed.check_every_steps
        if self.group is None or not every or self.counters.steps % every:
            return
        if not self.group.same_weights(list(self.engine.model.parameters())):
            raise RuntimeError(
                f"the ranks' weights differ after step {self.counters.steps}: the group has diverged "
                "(a non-deterministic kernel or a bug); it restarts from LATEST"
            )
        for o in self.observers:
            o.on_weight_check()

    # ----------------------------------------------------------------------------------- publishing
    def _publish_due(self, force: bool = False) -> bool:
        return self.cadence.due(self.counters.steps, self.ledger.covered, force)

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
                return False  # the publisher is busy with the previous one: try after the next window
        self.cadence.mark(self.counters.steps, self.ledger.covered)
        self.learned_times = EventTimes()  # they are in the snapshot handed over
        return True

    def _hand_over_final(self, snap: Snapshot) -> None:
        """Wait for the publisher to take the final snapshot, unless it has given up (fenced out)."""
        while not self.publish_failed.is_set():
            try:
                self.publish_queue.put(snap, timeout=0.2)
                return
            except queue.Full:
                continue
        raise queue.Full

    def probe_accuracy(self) -> float:
        """Accuracy of the current weights on the probe set (the poisoning gate's measure)."""
        return self.engine.accuracy(list(self.probe))

    def snapshot(self) -> Snapshot | None:
        """A consistent copy (CPU tensors) of model, optimizer, replay, drift, RNG, counters, offsets.

        Refused inside a window, where the covered offsets may run ahead of an untrained event (see
        the module docstring). In a data-parallel group every rank must call it (a collective):
        rank 0 gets the group's snapshot, the others None (step 3 of the lockstep in
        ``distributed.py``: offsets, counters and replay buffers merged on rank 0).
        """
        if self._in_window:
            raise RuntimeError("no snapshot inside a bucketed window: its covered offsets are not exact")
        if self.group is not None and not self.group.is_root:
            arrays, meta = self.replay.state_dict()
            self.group.gather(
                (dict(self.ledger.covered), Counters(**vars(self.counters)), arrays, meta, self.learned_times)
            )
            return None
        snap = self._local_snapshot()
        if self.group is not None:
            parts = self.group.gather(None)
            assert parts is not None
            snap.offsets = merge_offsets([snap.offsets, *(p[0] for p in parts[1:])])
            snap.counters = merge_counters([snap.counters, *(p[1] for p in parts[1:])])
            snap.replay_shards = [(p[2], p[3]) for p in parts[1:]]
            for p in parts[1:]:
                snap.event_times.update(p[4])
        return snap

    def _local_snapshot(self) -> Snapshot:
        model_state, opt_state = self.engine.state()
        arrays, meta = self.replay.state_dict()
        metrics = {"training_loss": self.last_loss, **self.prequential.summary()}
        metrics["param_distance"] = float(self.engine.l2sp.squared_distance()) ** 0.5
        if self.probe:
            metrics["probe_accuracy"] = self.probe_accuracy()
            for o in self.observers:
                o.on_probe(metrics["probe_accuracy"])
        return Snapshot(
            model_state=model_state,
            optimizer_state=opt_state,
            replay_arrays={k: v.copy() for k, v in arrays.items()},
            replay_meta=meta,
            torch_rng=torch.get_rng_state(),
            counters=Counters(**vars(self.counters)),
            offsets=dict(self.ledger.covered),
            metrics={k: v for k, v in metrics.items() if v == v},  # drop NaN
            drift=self.drift.state_dict() if self.drift is not None else None,
            event_times=self.learned_times.copy(),
        )
