"""The publish cadence: when the trainer hands a snapshot to the publisher.

A version is due every ``publish.every_steps`` steps or ``publish.every_seconds`` seconds, whichever
comes first — and only when something changed since the last one (steps taken or offsets covered).
Snapshots wait for a window's end, so the window before a due version is cut short
(:meth:`PublishCadence.window_steps`) and the step cadence holds. Pure: no torch; the clock is a
parameter.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping


class PublishCadence:
    """Decides when a version is due.

    Parameters
    ----------
    every_steps, every_seconds
        ``publish.every_steps`` and ``publish.every_seconds``.
    steps, covered
        The step count and covered offsets of the version a learner resumed from (its last version).
    clock
        Seconds, monotonic.

    >>> now = [0.0]
    >>> cadence = PublishCadence(every_steps=10, every_seconds=60, clock=lambda: now[0])
    >>> cadence.due(steps=4, covered={0: 32}), cadence.window_steps(steps=4, bucket_window=8)
    (False, 6)
    >>> cadence.due(steps=10, covered={0: 80})
    True
    >>> cadence.mark(steps=10, covered={0: 80}); now[0] = 61.0
    >>> cadence.due(steps=10, covered={0: 80}), cadence.due(steps=11, covered={0: 88})  # nothing new
    (False, True)
    """

    def __init__(
        self,
        every_steps: int,
        every_seconds: float,
        steps: int = 0,
        covered: Mapping[int, int] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.every_steps, self.every_seconds, self.clock = every_steps, every_seconds, clock
        self.mark(steps, covered or {})

    def mark(self, steps: int, covered: Mapping[int, int]) -> None:
        """A snapshot of ``steps`` steps covering ``covered`` was handed over now."""
        self.last_steps, self._covered, self._at = steps, dict(covered), self.clock()

    def due(self, steps: int, covered: Mapping[int, int], force: bool = False) -> bool:
        """Whether there is something new since the last snapshot and a version is due (or forced)."""
        dirty = steps != self.last_steps or dict(covered) != self._covered
        elapsed = self.clock() - self._at
        return dirty and (
            force or steps - self.last_steps >= self.every_steps or elapsed >= self.every_seconds
        )

    def window_steps(self, steps: int, bucket_window: int) -> int:
        """Micro-batches in the next window: ``bucket_window``, fewer when a version falls due sooner."""
        left = self.every_steps - (steps - self.last_steps)
        return min(bucket_window, left) if left > 0 else bucket_window  # overdue: the publisher is busy
