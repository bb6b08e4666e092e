"""The suite's order (tests/support/ordering.py): a permutation; long cases at the heads of the shares,
each lane's on its own workers; the waiting short cases on the waiting lane's shares, before the
computing ones."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from tests.support.ordering import TYPICAL_SECONDS, Kind, lane_workers, suite_order, worksteal_shares

LONG = (Kind.LONG_BUSY, Kind.LONG_WAITS)


def _shares(ordered: list, workers: int) -> list[list]:
    out, start = [], 0
    for size in worksteal_shares(len(ordered), workers):
        out.append(ordered[start : start + size])
        start += size
    return out


@given(st.lists(st.sampled_from(list(Kind)), max_size=80), st.integers(1, 6))
def test_the_order_is_a_permutation_with_long_cases_first_then_waiting_then_computing(
    kinds: list[Kind], workers: int
) -> None:
    items = list(enumerate(kinds))  # (position, kind)
    ordered = suite_order(items, lambda item: item[1], workers)
    assert sorted(ordered) == items  # a permutation
    for kind in (Kind.WAITS, Kind.BUSY):  # the short ones of each kind keep their order
        assert [i for i in ordered if i[1] is kind] == [i for i in items if i[1] is kind]
    shares = _shares(ordered, workers)
    rank = {Kind.LONG_BUSY: 0, Kind.LONG_WAITS: 0, Kind.WAITS: 1, Kind.BUSY: 2}
    for share in shares:  # in each share: long, then waiting, then computing
        ranks = [rank[k] for _, k in share]
        assert ranks == sorted(ranks), ranks
    # the waiting short cases on the waiting lane's shares, evening out their loads (each long case
    # TYPICAL_SECONDS, none given here); on the others only what does not fit there
    first = lane_workers(Kind.LONG_WAITS, workers)
    cost = TYPICAL_SECONDS
    loads = [sum(cost[k] for _, k in share if k is not Kind.BUSY) for share in shares]
    waiting = [sum(1 for _, k in share if k is Kind.WAITS) for share in shares]
    full = [all(k is not Kind.BUSY for _, k in share) for share in shares]
    if kinds.count(Kind.WAITS) <= sum(len(shares[w]) - sum(k in LONG for _, k in shares[w]) for w in first):
        assert all(waiting[w] == 0 for w in range(workers) if w not in first), waiting
    for w in first:  # a share took its last waiting case only while no other share of the lane was lighter
        if waiting[w]:
            lighter = [v for v in first if not full[v] and loads[v] < loads[w] - cost[Kind.WAITS] - 1e-9]
            assert not lighter, (loads, waiting)
    for lane in LONG:  # each lane's long cases on its workers, spread evenly
        own = lane_workers(lane, workers)
        count = [sum(1 for _, k in share if k is lane) for share in shares]
        longs = [sum(1 for _, k in share if k in LONG) for share in shares]
        if all(longs[w] < len(shares[w]) for w in own):  # no share of the lane is full: none overflowed
            assert sum(count[w] for w in own) == kinds.count(lane)
            assert max(count[w] for w in own) - min(count[w] for w in own) <= 1, count


def test_busy_and_waiting_long_cases_alternate_over_the_workers() -> None:
    assert lane_workers(Kind.LONG_BUSY, 4) == [0, 2] and lane_workers(Kind.LONG_WAITS, 4) == [1, 3]
    assert lane_workers(Kind.LONG_BUSY, 3) == [0, 2] and lane_workers(Kind.LONG_WAITS, 3) == [1]
    assert lane_workers(Kind.LONG_BUSY, 1) == lane_workers(Kind.LONG_WAITS, 1) == [0]
    # four workers: two busy and two waiting long cases start side by side
    kind = {"b1": Kind.LONG_BUSY, "b2": Kind.LONG_BUSY, "w1": Kind.LONG_WAITS, "w2": Kind.LONG_WAITS}
    items = ["b1", "w1", "b2", "w2", *"abcdefgh"]
    heads = [share[0] for share in _shares(suite_order(items, lambda x: kind.get(x, Kind.BUSY), 4), 4)]
    assert heads == ["b1", "w1", "b2", "w2"]


def test_shares_are_worksteals_even_split() -> None:
    assert worksteal_shares(10, 4) == [2, 2, 3, 3]
    assert worksteal_shares(684, 4) == [171, 171, 171, 171]
    assert sum(worksteal_shares(7, 3)) == 7 and worksteal_shares(0, 2) == [0, 0]
