"""The freshness record of a version (``core/event_times.py``): counts of produce times per interval,
bounded in size, read back from any manifest without failing."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from stream_learner.core.event_times import MAX_INTERVALS, EventTimes

# produce times from 2001 to 2100, in ms; a few without one (≤ 0)
TIMES = st.lists(st.integers(min_value=-5, max_value=4_102_444_800_000), max_size=300)
SPREAD = st.lists(st.integers(min_value=1_000_000_000_000, max_value=1_000_000_000_000 + 86_400_000 * 30))


def interval_of(times: EventTimes, t_ms: int) -> int | None:
    """The start of the interval counting an event produced at ``t_ms``, if one does."""
    starts = [s for s in times.counts if s <= t_ms / 1000 < s + times.resolution_s]
    return starts[0] if starts else None


@given(TIMES)
def test_every_event_with_a_produce_time_is_counted_once_in_the_interval_holding_it(
    times_ms: list[int],
) -> None:
    times = EventTimes()
    times.add_all(times_ms)
    assert len(times) == sum(1 for t in times_ms if t > 0)
    assert len(times.counts) <= MAX_INTERVALS
    for t in times_ms:
        if t > 0:
            assert interval_of(times, t) is not None
    assert all(s % times.resolution_s == 0 for s in times.counts)


@given(SPREAD)
def test_a_wide_span_coarsens_to_at_most_max_intervals(times_ms: list[int]) -> None:
    times = EventTimes()
    times.add_all(times_ms)
    assert len(times.counts) <= MAX_INTERVALS and len(times) == len(times_ms)
    now = 1_000_000_000 + 86_400 * 31
    for age, _ in times.ages(now):  # an age is at most half an interval off the event's own
        assert age > 0


@given(TIMES, TIMES)
def test_merging_two_records_counts_both(a_ms: list[int], b_ms: list[int]) -> None:
    a, b, both = EventTimes(), EventTimes(), EventTimes()
    a.add_all(a_ms)
    b.add_all(b_ms)
    both.add_all(a_ms + b_ms)
    merged = a.copy()
    merged.update(b)
    assert len(merged) == len(both) and len(a) == sum(1 for t in a_ms if t > 0)  # the copy is apart
    for t in a_ms + b_ms:
        if t > 0:
            assert interval_of(merged, t) is not None


@given(TIMES)
def test_the_manifest_form_reads_back_the_same_through_json(times_ms: list[int]) -> None:
    times = EventTimes()
    times.add_all(times_ms)
    back = EventTimes.from_manifest(json.loads(json.dumps(times.to_manifest())))
    assert back.counts == times.counts and back.resolution_s == times.resolution_s


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=20,
)


@given(
    JSON
    | st.fixed_dictionaries(
        {"resolution_s": JSON | st.integers(), "counts": st.lists(st.lists(JSON | st.integers(), max_size=3))}
    )
)
def test_any_manifest_value_reads_as_a_record_never_an_error(value: object) -> None:
    """A server reads manifests it did not write: whatever ``event_times`` holds, it gets a record of
    positive counts at a positive resolution (nothing, when the value is not the form)."""
    times = EventTimes.from_manifest(value)
    assert times.resolution_s > 0 and all(n > 0 for n in times.counts.values())
    assert len(times.counts) <= MAX_INTERVALS
    times.ages(0.0)
