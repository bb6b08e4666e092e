"""The offset ledger: which offsets of each partition a snapshot may claim as learned.

A version records, per partition, the next offset it covers; a learner that resumes from it starts
reading there, so an offset may be claimed only once every event before it has gone through a step
(or was dead-lettered). Two sources of coverage:

1. **trained events** — each event that went through a step covers up to itself:
   ``covered[p] = max(covered[p], offset + 1)`` (:meth:`OffsetLedger.trained`);
2. **consumed batches** — a batch the consumer handed over also covers the records it dead-lettered
   or skipped, up to its ``next_offsets``; those are claimed only once *all* of the batch's events
   have been trained (:meth:`OffsetLedger.receive`, then :meth:`OffsetLedger.advance`).

Windows reorder events (length buckets), so ``covered`` is a prefix of what was received only at a
window's end: the trainer calls :meth:`advance` and takes snapshots there, never inside a window.
Pure bookkeeping: no torch, no Kafka.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Mapping
from typing import Protocol


class Positioned(Protocol):
    partition: int
    offset: int


class OffsetLedger:
    """Covered offsets per partition, from trained events and fully trained consumed batches.

    Parameters
    ----------
    covered
        The offsets a resumed version covers (partition → next offset); empty for a new lineage.

    >>> ledger = OffsetLedger()
    >>> ledger.receive(2, {0: 5})  # two events, offsets 3 and 4 were dead-lettered after them
    >>> from types import SimpleNamespace as E
    >>> ledger.trained([E(partition=0, offset=1)])
    >>> ledger.advance(); ledger.covered
    {0: 2}
    >>> ledger.trained([E(partition=0, offset=2)]); ledger.advance(); ledger.covered
    {0: 5}
    """

    def __init__(self, covered: Mapping[int, int] | None = None) -> None:
        self.covered: dict[int, int] = dict(covered or {})
        self._received = 0  # events received since start
        self._trained = 0  # events trained since start
        # (events received up to the end of a consumed batch, the offsets that batch covers)
        self._watermarks: collections.deque[tuple[int, dict[int, int]]] = collections.deque()

    def receive(self, n_events: int, next_offsets: Mapping[int, int]) -> None:
        """A consumed batch of ``n_events`` events arrived; it covers ``next_offsets`` once trained."""
        self._received += n_events
        self._watermarks.append((self._received, dict(next_offsets)))

    def trained(self, events: Iterable[Positioned]) -> None:
        """These events went through a step: each covers its partition up to itself."""
        n = 0
        for e in events:
            self.covered[e.partition] = max(self.covered.get(e.partition, 0), e.offset + 1)
            n += 1
        self._trained += n

    def advance(self) -> None:
        """Claim the offsets of every consumed batch whose events have all been trained."""
        while self._watermarks and self._watermarks[0][0] <= self._trained:
            for partition, offset in self._watermarks.popleft()[1].items():
                # max: the events of a later batch may be trained (and covered) already
                self.covered[partition] = max(self.covered.get(partition, 0), offset)
