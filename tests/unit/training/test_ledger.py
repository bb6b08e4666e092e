"""The offset ledger and the publish cadence: pure bookkeeping, tested without torch or a model."""

import sys
from dataclasses import dataclass

from hypothesis import given
from hypothesis import strategies as st

from stream_learner.training.cadence import PublishCadence
from stream_learner.training.ledger import OffsetLedger


@dataclass(frozen=True)
class Event:
    partition: int
    offset: int


def test_the_ledger_and_the_cadence_import_no_torch():
    import subprocess

    code = (
        "import sys; import stream_learner.training.ledger, stream_learner.training.cadence; "
        "sys.exit('torch' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_dead_letters_after_a_batch_are_covered_only_once_its_events_are_trained():
    ledger = OffsetLedger({0: 10})
    ledger.receive(3, {0: 20})  # events at 10, 11, 12; 13..19 dead-lettered
    ledger.trained([Event(0, 10), Event(0, 11)])
    ledger.advance()
    assert ledger.covered == {0: 12}
    ledger.trained([Event(0, 12)])
    ledger.advance()
    assert ledger.covered == {0: 20}


def test_an_all_dead_letter_batch_is_covered_at_the_next_advance():
    ledger = OffsetLedger()
    ledger.receive(0, {1: 7})
    ledger.advance()
    assert ledger.covered == {1: 7}


@given(
    st.lists(
        st.lists(
            st.tuples(st.integers(0, 2), st.integers(0, 3)), max_size=6
        ),  # (partition, dead letters after)
        max_size=8,
    ),
    st.data(),
)
def test_covered_offsets_never_pass_an_untrained_event_and_reach_the_end(batches, data):
    """For any consumed batches (events and dead letters on up to 3 partitions, each partition in
    offset order) trained in any order within windows that are prefixes of what was received: after
    each window, ``covered`` never passes an event not yet trained, never moves back, and covers every
    offset consumed once all is trained."""
    ledger = OffsetLedger()
    next_offset = {0: 0, 1: 0, 2: 0}
    received: list[Event] = []
    for batch in batches:
        events = []
        for partition, dead in batch:
            events.append(Event(partition, next_offset[partition]))
            next_offset[partition] += 1 + dead
        ledger.receive(len(events), {p: o for p, o in next_offset.items() if o})
        received.extend(events)
    trained_upto, before = 0, {}
    while trained_upto < len(received):
        upto = data.draw(st.integers(trained_upto + 1, len(received)))
        window = received[trained_upto:upto]
        ledger.trained(data.draw(st.permutations(window)))  # a window is reordered by length
        ledger.advance()
        trained_upto = upto
        for e in received[trained_upto:]:
            assert ledger.covered.get(e.partition, 0) <= e.offset
        assert all(ledger.covered.get(p, 0) >= o for p, o in before.items())
        before = dict(ledger.covered)
    ledger.advance()
    assert ledger.covered == {p: o for p, o in next_offset.items() if o}


def test_cadence_is_due_by_steps_or_by_time_and_only_when_something_changed():
    now = [100.0]
    cadence = PublishCadence(every_steps=10, every_seconds=30.0, clock=lambda: now[0])
    assert not cadence.due(9, {0: 72})
    assert cadence.due(10, {0: 80})
    now[0] += 30
    assert cadence.due(1, {0: 8})  # by time
    assert not cadence.due(0, {})  # nothing new since the start
    assert cadence.due(0, {0: 3}, force=False) and cadence.due(0, {0: 3}, force=True)
    cadence.mark(12, {0: 96})
    assert not cadence.due(12, {0: 96}, force=True)  # forced, but nothing new
    assert cadence.due(12, {0: 99}, force=True)  # dead letters covered since: new


def test_windows_shrink_so_the_step_cadence_holds():
    cadence = PublishCadence(every_steps=5, every_seconds=3600, steps=40)
    assert [cadence.window_steps(s, bucket_window=8) for s in (40, 43, 44)] == [5, 2, 1]
    assert cadence.window_steps(45, bucket_window=8) == 8  # overdue: the publisher is busy, no hurry
    assert PublishCadence(every_steps=100, every_seconds=1).window_steps(0, bucket_window=8) == 8
