"""The suite's order (tests/support/ordering.py): a permutation, long cases at the heads of the shares."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from tests.support.ordering import long_first, worksteal_shares


@given(st.lists(st.booleans(), max_size=60), st.integers(1, 6))
def test_long_first_only_reorders_and_puts_long_cases_at_the_heads(longs: list[bool], workers: int) -> None:
    items = list(enumerate(longs))  # (position, long?)
    ordered = long_first(items, lambda item: item[1], workers)
    assert sorted(ordered) == items  # a permutation
    # the others keep their order
    assert [i for i in ordered if not i[1]] == [i for i in items if not i[1]]
    # in each share, its long cases come first; they are spread evenly unless a share is all long
    start, counts = 0, []
    for size in worksteal_shares(len(items), workers):
        flags = [long for _, long in ordered[start : start + size]]
        assert flags == sorted(flags, reverse=True), flags
        counts.append((sum(flags), size))
        start += size
    unfilled = [n for n, size in counts if n < size]
    assert not unfilled or max(unfilled) - min(unfilled) <= 1, counts


def test_shares_are_worksteals_even_split() -> None:
    assert worksteal_shares(10, 4) == [2, 2, 3, 3]
    assert worksteal_shares(684, 4) == [171, 171, 171, 171]
    assert sum(worksteal_shares(7, 3)) == 7 and worksteal_shares(0, 2) == [0, 0]
