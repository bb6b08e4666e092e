"""The order the suite runs in (tests/conftest.py): long cases at the heads of the xdist workers'
shares, each kind of long case on its own workers, and the cases that wait before those that compute
in every share, so that the run's last minute is made of short computing cases any worker can steal.

Measured on the 2-core Xeon, four workers (2026-12-07, docs/testing.md): dealt without regard to
kind, four waiting cases once ran together for half a minute with the cores half idle, and the run
ended on a minute of waiting end-to-end cases with the cores 40–60 % busy.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from enum import Enum
from typing import TypeVar

T = TypeVar("T")


class Kind(Enum):
    """What a test spends its time on, as far as the order goes."""

    LONG_BUSY = "long, keeps a core busy (training, compiling, a learner's whole run)"
    LONG_WAITS = "long, mostly waits (on a broker, a timer, a learner process paced by its events)"
    WAITS = "short, mostly waits (an end-to-end case: a broker, a server, a child process)"
    BUSY = "short, computes in the test process"


def worksteal_shares(n: int, workers: int) -> list[int]:
    """How many of ``n`` tests each worker gets first from ``--dist worksteal``: worker i takes
    ``len(remaining) // (workers - i)`` of what is left (xdist's ``WorkStealingScheduling``)."""
    shares, left = [], n
    for i in range(workers):
        shares.append(left // (workers - i))
        left -= shares[-1]
    return shares


def lane_workers(kind: Kind, workers: int) -> list[int]:
    """The shares a long case of ``kind`` heads: busy ones the even shares, waiting ones the odd (all
    share 0 when there is one). So at any moment about half of the workers run busy long cases and the
    cores stay busy while the others wait.

    >>> lane_workers(Kind.LONG_BUSY, 4), lane_workers(Kind.LONG_WAITS, 4), lane_workers(Kind.LONG_WAITS, 1)
    ([0, 2], [1, 3], [0])
    """
    if workers == 1:
        return [0]
    parity = 0 if kind is Kind.LONG_BUSY else 1
    return [w for w in range(workers) if w % 2 == parity]


def suite_order(items: Sequence[T], kind: Callable[[T], Kind], workers: int) -> list[T]:
    """``items`` reordered for ``workers`` xdist workers; a permutation: only the order changes.

    1. Each share (:func:`worksteal_shares`) starts with its long cases: those of each kind dealt
       round-robin to the shares of :func:`lane_workers`, to any share with room once those are full.
    2. Then the short cases, each kind keeping its order (a module's tests stay together, so its
       module-scoped fixtures are built once per share they span): every share takes its part of the
       waiting ones first and its part of the computing ones last, in proportion to its room.

    >>> k = {"C": Kind.LONG_BUSY, "W": Kind.LONG_WAITS, "i": Kind.WAITS, "j": Kind.WAITS}
    >>> "".join(suite_order(list("abCiWjcd"), lambda x: k.get(x, Kind.BUSY), workers=2))
    'CiabWjcd'
    """
    sizes = worksteal_shares(len(items), workers)
    heads: list[list[T]] = [[] for _ in sizes]
    for lane in (Kind.LONG_BUSY, Kind.LONG_WAITS):
        preferred = lane_workers(lane, workers)
        dealt, turn = [0] * workers, 0
        for item in (item for item in items if kind(item) is lane):
            room = [w for w in preferred if len(heads[w]) < sizes[w]] or [
                w for w in range(workers) if len(heads[w]) < sizes[w]
            ]  # there is room somewhere: no more long items than items
            w = min(room, key=lambda w: (dealt[w], (w - turn) % workers))
            heads[w].append(item)
            dealt[w] += 1
            turn = w + 1
    waiting = [item for item in items if kind(item) is Kind.WAITS]
    computing = iter([item for item in items if kind(item) is Kind.BUSY])
    rooms = [size - len(head) for head, size in zip(heads, sizes, strict=True)]
    # cumulative rounding: share i's waiting cases end at round(len(waiting) · its rooms so far / all)
    ends = [round(len(waiting) * sum(rooms[: i + 1]) / max(1, sum(rooms))) for i in range(workers)]
    order: list[T] = []
    for i, (head, room) in enumerate(zip(heads, rooms, strict=True)):
        mine = waiting[(ends[i - 1] if i else 0) : ends[i]]
        order += head + mine + [next(computing) for _ in range(room - len(mine))]
    return order
