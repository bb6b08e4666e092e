"""One place that builds a learner's trainer: the service, the tools and the tests all call
:func:`build_trainer`, so what they run is what production runs."""

from __future__ import annotations

import queue
import threading
from collections.abc import Sequence
from typing import Any

import torch

from stream_learner.core.config import Settings
from stream_learner.core.events import TokenizedEvent
from stream_learner.core.intake import ConsumedBatch
from stream_learner.core.model import LoadedModel, load_model
from stream_learner.core.replay import ClassBalancedReservoir, ReservoirBuffer
from stream_learner.training.distributed import Group
from stream_learner.training.drift_watch import DriftWatch
from stream_learner.training.engine import StepEngine
from stream_learner.training.loop import TrainingLoop
from stream_learner.training.observers import LoopObserver
from stream_learner.training.state import Snapshot


def make_replay_buffer(settings: Settings, vocab_size: int, rank: int = 0) -> ReservoirBuffer:
    """The reservoir ``replay.*`` asks for; each rank of a group draws from its own seed."""
    cls = ClassBalancedReservoir if settings.replay.class_balanced else ReservoirBuffer
    return cls(settings.replay.capacity, seed=settings.training.seed + rank, vocab_size=vocab_size)


def build_trainer(
    settings: Settings,
    tokenizer: Any,
    *,
    loaded: LoadedModel | None = None,
    fresh_queue: queue.Queue[ConsumedBatch] | None = None,
    publish_queue: queue.Queue[Snapshot] | None = None,
    stop: threading.Event | None = None,
    observers: Sequence[LoopObserver] = (),
    restored: Snapshot | None = None,
    probe: Sequence[TokenizedEvent] = (),
    publish_failed: threading.Event | None = None,
    group: Group | None = None,
    drift: bool = True,
    fused: bool = True,
    threads: int | None = None,
) -> TrainingLoop:
    """The trainer of a learner with ``settings`` and ``tokenizer``, wired as the service wires it.

    Parameters
    ----------
    loaded
        The model as loaded (default: :func:`~stream_learner.core.model.load_model` of the settings);
        its weights at this point are θ0, the L2-SP anchor.
    fresh_queue, publish_queue, stop
        The queues and stop event the trainer thread talks through (default: new ones; the fresh queue
        bounded by ``kafka.queue_max_batches``, the publish queue by 1).
    observers
        Who hears of every step (metrics, the bench's step log, the evaluation's record).
    restored
        A published version to resume from.
    drift
        Whether to run the drift watch (when ``drift.enabled``); the evaluation runs it on one strategy.
    fused
        The fused AdamW kernel (the bench's ablation turns it off).
    threads
        torch's intra-op threads the trainer thread takes (``threads.py``): given by a caller that
        handed its own over (:func:`~stream_learner.training.threads.hand_over_threads`); None keeps
        the trainer thread's as they are (the evaluation trains in its own thread, no hand-over).
    """
    torch.manual_seed(settings.training.seed)  # torch's global generator: whatever is left random
    loaded = loaded or load_model(settings.model, settings.training.seed)
    pad_id = tokenizer.pad_token_id or 0
    engine = StepEngine(
        loaded,
        settings.training,
        pad_id=pad_id,
        with_token_types="token_type_ids" in tokenizer.model_input_names,
        group=group,
        fused=fused,
    )
    watch = None
    if drift and settings.drift.enabled:
        # θ0's token embeddings, a fixed feature map (no copy on CPU: θ0 is kept anyway)
        table = engine.model.get_input_embeddings().weight
        at = next((i for i, p in enumerate(engine.pretrained) if p is table), None)
        theta0 = engine.l2sp.theta0[at] if at is not None else table.detach().clone()
        watch = DriftWatch(settings, theta0.float().cpu().numpy(), tokenizer.all_special_ids)
    return TrainingLoop(
        settings,
        engine,
        make_replay_buffer(settings, len(tokenizer), group.rank if group else 0),
        fresh_queue=fresh_queue or queue.Queue(maxsize=settings.kafka.queue_max_batches),
        publish_queue=publish_queue or queue.Queue(maxsize=1),
        stop=stop or threading.Event(),
        drift=watch,
        observers=observers,
        probe=probe,
        publish_failed=publish_failed,
        group=group,
        restored=restored,
        threads=threads,
    )
