"""When the events a version learned were produced: a per-second count, small enough for a manifest.

Freshness — how long from a labeled event to a prediction that has learned from it — needs, at the
moment a server starts answering with a version, the produce times of the events that version learned
and the version served before it did not. A version's manifest records them (``event_times``) as an
:class:`EventTimes`: counts per interval of ``resolution_s`` seconds, with the newest produce time kept
exactly. A server turns them into ages at its swap (:meth:`EventTimes.ages`).

Method: an event produced at ``t`` ms counts in the interval starting at
``floor(t / 1000 / resolution_s) * resolution_s`` seconds. While more than :data:`MAX_INTERVALS`
intervals are in use (a version covering a backlog of days), the resolution doubles and counts merge,
so a manifest holds at most that many pairs whatever it covers; an age read back is then at most half
an interval off (the interval's middle is taken). Events without a produce time (``timestamp_ms`` ≤ 0:
a test's events, a record without one) are not counted.

>>> times = EventTimes()
>>> for ms in (1_000_100, 1_000_900, 1_002_500):
...     times.add(ms)
>>> times.to_manifest()
{'resolution_s': 1, 'counts': [[1000, 2], [1002, 1]]}
>>> [(round(age, 1), n) for age, n in times.ages(now=1010.0)]
[(9.5, 2), (7.5, 1)]
"""

from __future__ import annotations

import math
from collections.abc import Iterable

MAX_INTERVALS = 512  # pairs in a manifest at most: ~10 KB of JSON


class EventTimes:
    """Counts of learned events per interval of their produce time (see the module docstring)."""

    def __init__(self, resolution_s: int = 1) -> None:
        self.resolution_s = resolution_s
        self.counts: dict[int, int] = {}  # interval start (s, a multiple of resolution_s) -> events

    def __len__(self) -> int:
        return sum(self.counts.values())

    def add(self, timestamp_ms: int) -> None:
        """Count one event produced at ``timestamp_ms`` (ignored when ≤ 0: no produce time)."""
        if timestamp_ms <= 0:
            return
        start = timestamp_ms // 1000 // self.resolution_s * self.resolution_s
        self.counts[start] = self.counts.get(start, 0) + 1
        self._fit()

    def add_all(self, timestamps_ms: Iterable[int]) -> None:
        """:meth:`add` each of ``timestamps_ms``."""
        for t in timestamps_ms:
            self.add(t)

    def update(self, other: EventTimes) -> None:
        """Count ``other``'s events here too (at the coarser of the two resolutions)."""
        for start, n in other.counts.items():
            self._put(start, n)
        if other.resolution_s > self.resolution_s:
            self._coarsen(other.resolution_s)
        self._fit()

    def copy(self) -> EventTimes:
        """An independent copy."""
        out = EventTimes(self.resolution_s)
        out.counts = dict(self.counts)
        return out

    def ages(self, now: float) -> list[tuple[float, int]]:
        """``(now − the interval's middle, its count)`` per interval, oldest first: seconds since produce."""
        half = self.resolution_s / 2
        return [(now - (start + half), n) for start, n in sorted(self.counts.items())]

    def to_manifest(self) -> dict:
        """The JSON form a manifest stores: ``{"resolution_s": r, "counts": [[start_s, n], …]}``."""
        return {"resolution_s": self.resolution_s, "counts": [[s, n] for s, n in sorted(self.counts.items())]}

    @classmethod
    def from_manifest(cls, value: object) -> EventTimes:
        """Read :meth:`to_manifest`'s form back; anything else (a manifest from before it was recorded,
        or one written by hand) reads as no events: a server must not stop for a manifest's extras."""
        out = cls()
        if not isinstance(value, dict):
            return out
        resolution, counts = value.get("resolution_s"), value.get("counts")
        if not _positive_int(resolution) or not isinstance(counts, list):
            return out
        out.resolution_s = resolution
        for pair in counts:
            if isinstance(pair, list) and len(pair) == 2 and _int(pair[0]) and _positive_int(pair[1]):
                out._put(pair[0] // resolution * resolution, pair[1])
        out._fit()
        return out

    def _put(self, start: int, n: int) -> None:
        start = start // self.resolution_s * self.resolution_s
        self.counts[start] = self.counts.get(start, 0) + n

    def _fit(self) -> None:
        while len(self.counts) > MAX_INTERVALS:
            span = max(self.counts) - min(self.counts) + 1
            # the smallest doubling under which the span holds MAX_INTERVALS intervals at most
            factor = 2 ** max(1, math.ceil(math.log2(span / MAX_INTERVALS / self.resolution_s)))
            self._coarsen(self.resolution_s * factor)

    def _coarsen(self, resolution_s: int) -> None:
        counts, self.counts, self.resolution_s = self.counts, {}, resolution_s
        for start, n in counts.items():
            self._put(start, n)


def _int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _positive_int(x: object) -> bool:
    return _int(x) and x > 0  # type: ignore[operator]
