"""The order the suite runs in: long cases at the heads of the xdist workers' shares (tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

T = TypeVar("T")


def worksteal_shares(n: int, workers: int) -> list[int]:
    """How many of ``n`` tests each worker gets first from ``--dist worksteal``: worker i takes
    ``len(remaining) // (workers - i)`` of what is left (xdist's ``WorkStealingScheduling``)."""
    shares, left = [], n
    for i in range(workers):
        shares.append(left // (workers - i))
        left -= shares[-1]
    return shares


def long_first(items: Sequence[T], is_long: Callable[[T], bool], workers: int) -> list[T]:
    """``items`` reordered so that the long ones head the workers' shares, dealt round-robin (skipping a
    share they already fill), and the others fill the shares in their own order. A permutation: only
    the order changes.

    >>> long_first(list("abCdeFgh"), str.isupper, workers=2)
    ['C', 'a', 'b', 'd', 'F', 'e', 'g', 'h']
    """
    sizes = worksteal_shares(len(items), workers)
    heads: list[list[T]] = [[] for _ in sizes]
    w = 0
    for item in (item for item in items if is_long(item)):
        while len(heads[w]) >= sizes[w]:  # there is room somewhere: no more long items than items
            w = (w + 1) % workers
        heads[w].append(item)
        w = (w + 1) % workers
    rest = iter([item for item in items if not is_long(item)])
    return [
        x
        for head, size in zip(heads, sizes, strict=True)
        for x in head + [next(rest) for _ in range(size - len(head))]
    ]
