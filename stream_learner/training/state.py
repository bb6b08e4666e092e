"""What a published version holds of a learner: the :class:`Snapshot` and its :class:`Counters`.

A snapshot is taken by the trainer between two windows (``loop.py``), handed to the publisher, which
writes it as a version, and read back from a version when a learner resumes
(``service/publisher.py``, ``load_version``) — one type both ways.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from stream_learner.core.event_times import EventTimes

ArraysAndMeta = tuple[dict[str, np.ndarray], dict]


@dataclass
class Counters:
    """The lineage counters carried from version to version."""

    steps: int = 0
    events_trained: int = 0  # fresh events that went through a step (learned, or skipped as non-finite)
    examples_replayed: int = 0
    nonfinite_skipped: int = 0
    newest_event_ms: int = 0  # produce time of the newest event learned in the lineage (0: none known)

    @classmethod
    def from_dict(cls, d: dict) -> Counters:
        """Read counters as a version stores them; ``events_ingested`` is their old name (format 1)."""
        d = dict(d)
        if "events_ingested" in d:
            d.setdefault("events_trained", d.pop("events_ingested"))
        return cls(**{k: int(d[k]) for k in cls.__dataclass_fields__ if k in d})


@dataclass
class Snapshot:
    """A consistent copy of everything a version holds, taken between two windows.

    ``event_times`` counts the produce times of the events learned since the previous snapshot handed
    to the publisher (the freshness record, ``core/event_times.py``; empty in a snapshot read back).
    ``version`` is 0 for a snapshot not yet published, and the version number for one read back.
    ``replay_shards`` are the replay buffers of ranks 1… of a data-parallel group, as (arrays, meta)
    (see ``distributed.py``); ``drift`` the drift signals' state (None: a version from before they were
    kept, or drift off).
    """

    model_state: dict[str, torch.Tensor]
    optimizer_state: dict
    replay_arrays: dict[str, np.ndarray]
    replay_meta: dict
    torch_rng: torch.Tensor
    counters: Counters
    offsets: dict[int, int]  # partition -> next offset covered by this snapshot
    metrics: dict[str, float] = field(default_factory=dict)
    created_at: float = field(default_factory=time.time)
    replay_shards: list[ArraysAndMeta] = field(default_factory=list)
    drift: ArraysAndMeta | None = None
    event_times: EventTimes = field(default_factory=EventTimes)  # of the events new since the last one
    version: int = 0
