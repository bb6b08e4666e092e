"""The order the suite runs in (tests/conftest.py): long cases at the heads of the xdist workers'
shares, each kind of long case on its own workers, the short cases that wait on the workers of the
long ones that wait, and short computing cases at every share's end — so that at any moment about
half of the workers compute while the others wait, and the run's last minute is made of short
computing cases that any worker can steal.

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


#: What a case takes when nothing says (``@pytest.mark.slow(seconds=…)`` does for the long ones): the
#: mean of the short end-to-end cases, and of the rest, in a run of the suite (2-core Xeon, 2026-12-07).
TYPICAL_SECONDS = {Kind.LONG_BUSY: 30.0, Kind.LONG_WAITS: 30.0, Kind.WAITS: 2.5, Kind.BUSY: 0.2}


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
    share 0 when there is one).

    >>> lane_workers(Kind.LONG_BUSY, 4), lane_workers(Kind.LONG_WAITS, 4), lane_workers(Kind.LONG_WAITS, 1)
    ([0, 2], [1, 3], [0])
    """
    if workers == 1:
        return [0]
    parity = 0 if kind is Kind.LONG_BUSY else 1
    return [w for w in range(workers) if w % 2 == parity]


def fill(loads: list[float], rooms: list[int], n: int, seconds: float, order: Sequence[int]) -> list[int]:
    """How many of ``n`` cases of ``seconds`` each share takes, one at a time to the least loaded of
    the shares in ``order`` with room left (the first of them on a tie): ``loads`` grow as they take.

    >>> loads = [10.0, 0.0, 40.0]
    >>> fill(loads, [9, 9, 9], 5, 10.0, [0, 1, 2]), loads
    ([2, 3, 0], [30.0, 30.0, 40.0])
    """
    counts = [0] * len(loads)
    for _ in range(n):
        room = [w for w in order if counts[w] < rooms[w]]
        if not room:
            break
        w = min(room, key=lambda w: (loads[w], order.index(w)))
        counts[w] += 1
        loads[w] += seconds
    return counts


def suite_order(
    items: Sequence[T],
    kind: Callable[[T], Kind],
    workers: int,
    seconds: Callable[[T], float | None] = lambda item: None,
) -> list[T]:
    """``items`` reordered for ``workers`` xdist workers; a permutation: only the order changes.

    ``seconds``: what a case takes, if known (else :data:`TYPICAL_SECONDS` of its kind).

    1. The long cases head the shares: those of each kind, longest first, each to the least loaded
       share of its lane (:func:`lane_workers`) with room left, to any share once those are full.
    2. The waiting short cases follow, in their order, on the waiting lane's shares: each share takes
       enough to even the loads out (:func:`fill`); what does not fit goes to the other shares.
    3. The computing short cases fill every share's end, in their order.

    The short cases keep their order, so a module's tests stay together and its module-scoped fixtures
    are built once per share they span.

    >>> k = {"C": Kind.LONG_BUSY, "W": Kind.LONG_WAITS, "i": Kind.WAITS, "j": Kind.WAITS}
    >>> "".join(suite_order(list("abCiWjcd"), lambda x: k.get(x, Kind.BUSY), workers=2))
    'CabcWijd'
    """

    def cost(item: T) -> float:
        known = seconds(item)
        return TYPICAL_SECONDS[kind(item)] if known is None else known

    sizes = worksteal_shares(len(items), workers)
    heads: list[list[T]] = [[] for _ in sizes]
    loads = [0.0] * workers
    for lane in (Kind.LONG_BUSY, Kind.LONG_WAITS):
        preferred = lane_workers(lane, workers)
        for item in sorted((item for item in items if kind(item) is lane), key=cost, reverse=True):
            room = [w for w in preferred if len(heads[w]) < sizes[w]] or [
                w for w in range(workers) if len(heads[w]) < sizes[w]
            ]  # there is room somewhere: no more long items than items
            w = min(room, key=lambda w: (loads[w], w))
            heads[w].append(item)
            loads[w] += cost(item)
    rooms = [size - len(head) for head, size in zip(heads, sizes, strict=True)]
    waiting = [item for item in items if kind(item) is Kind.WAITS]
    mean = sum(map(cost, waiting)) / max(1, len(waiting))
    first = lane_workers(Kind.LONG_WAITS, workers)
    counts = fill(loads, rooms, len(waiting), mean, first)
    rest = [w for w in range(workers) if w not in first]
    more = fill(
        loads, [r - c for r, c in zip(rooms, counts, strict=True)], len(waiting) - sum(counts), mean, rest
    )
    counts = [a + b for a, b in zip(counts, more, strict=True)]
    queue, computing = iter(waiting), iter([item for item in items if kind(item) is Kind.BUSY])
    order: list[T] = []
    for head, room, count in zip(heads, rooms, counts, strict=True):
        order += head + [next(queue) for _ in range(count)] + [next(computing) for _ in range(room - count)]
    return order
