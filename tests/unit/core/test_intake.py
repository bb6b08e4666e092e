"""The intake without Kafka: the per-record barrier over any input, fair hand-over, visible dead letters.

Properties (hypothesis) state what holds for every input; the regular tests below them are the
counterexamples found on the way, and the records that once stopped the learner.
"""

from __future__ import annotations

import json
import logging

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stream_learner.core.events import (
    FIELDS,
    MAX_JSON_DEPTH,
    InvalidEvent,
    LabeledEvent,
    LabelSet,
    Reason,
    TokenizedEvent,
    parse_event,
)
from stream_learner.core.intake import (
    DeadLetterWatch,
    PartitionBuffers,
    Tokenize,
    tokenize_records,
    validate_record,
)

LABELS = LabelSet(["neg", "pos"])
LIMIT = 16_384


def verdict(value: bytes | None) -> LabeledEvent | InvalidEvent:
    out = validate_record(value, LABELS, LIMIT)
    assert isinstance(out, LabeledEvent | InvalidEvent)
    if isinstance(out, InvalidEvent):
        assert out.reason in Reason and out.detail
    else:
        assert out.text.strip() and out.label in (0, 1)
    return out


# ----------------------------------------------------------------------------- JSON text strategies
def spelt(name: str, escapes: list[bool]) -> str:
    """``name`` as a JSON string, each character written plainly or as a \\uXXXX escape."""
    out = []
    for char, escape in zip(name, escapes + [False] * len(name), strict=False):
        if escape and ord(char) < 0x10000:
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(json.dumps(char, ensure_ascii=False)[1:-1])
    return '"' + "".join(out) + '"'


keys = st.one_of(st.sampled_from(FIELDS), st.text(max_size=6)).flatmap(
    lambda k: st.lists(st.booleans(), min_size=len(k), max_size=len(k)).map(lambda e: spelt(k, e))
)
scalars = st.one_of(
    st.sampled_from(["null", "true", "false", '"pos"', '"neg"', "0", "1", "-1", "1e999", "-0.0"]),
    st.integers().map(str),
    st.integers(4_000, 6_000).map(lambda n: "9" * n),  # past Python's int digits limit
    st.floats(allow_nan=False, allow_infinity=False).map(json.dumps),
    st.text().map(json.dumps),
    st.sampled_from(['"\\ud800"', '"a\\udfffb"', '"\\ud83d\\ude00"', '"\\u0000"', '"\\u200b"']),
)
json_texts = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4).map(lambda xs: "[" + ",".join(xs) + "]")
        | st.lists(st.tuples(keys, inner), max_size=5).map(
            lambda kv: "{" + ",".join(f"{k}:{v}" for k, v in kv) + "}"
        )
    ),
    max_leaves=25,
)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=3_000))
def test_any_bytes_give_an_event_or_a_reason(value):
    verdict(value)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(json_texts)
def test_any_json_tree_gives_an_event_or_a_reason(text):
    verdict(text.encode("utf-8", "surrogatepass"))


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 3_000), st.sampled_from(["[", '{"text": ', '{"x": ']), json_texts)
def test_nesting_of_any_depth_gives_a_reason_never_a_crash(depth, opener, leaf):
    closer = "]" if opener == "[" else "}"
    doc = f'{{"text": "text", "label": "pos", "x": {opener * depth}{leaf}{closer * depth}}}'
    out = verdict(doc.encode("utf-8", "surrogatepass"))
    if depth + 1 > MAX_JSON_DEPTH:
        assert isinstance(out, InvalidEvent) and out.reason is Reason.NOT_JSON


members = st.lists(
    st.tuples(
        st.sampled_from([*FIELDS, "segment", "extra"]),
        st.lists(st.booleans(), max_size=9),
        st.sampled_from(['"pos"', '"neg"', '"some text"', "1", "1732300000000", "null"]),
    ),
    min_size=1,
    max_size=8,
)


@settings(max_examples=500, deadline=None)
@given(members)
def test_a_field_given_twice_is_caught_however_it_is_spelt(items):
    doc = "{" + ",".join(f"{spelt(k, e)}:{v}" for k, e, v in items) + "}"
    names = [k for k, _, _ in items]
    repeated = {k for k in names if names.count(k) > 1 and k in FIELDS}
    out = verdict(doc.encode())
    assert (isinstance(out, InvalidEvent) and out.reason is Reason.DUPLICATE_FIELD) == bool(repeated)


# -------------------------------------------------------------- records that once stopped the learner
def test_deep_nesting_with_a_field_name_as_a_string_is_dead_lettered():
    """≈ 2 KB, 1,000 levels, ``text`` recurring as a string: a RecursionError in the old duplicate-field
    check stopped the consumer thread, and every restart stopped again at the same offset."""
    doc = '{"text": "text", "label": "pos", "x": ' + '{"text": ' * 1_000 + '"x"' + "}" * 1_001
    out = verdict(doc.encode())
    assert isinstance(out, InvalidEvent) and out.reason is Reason.NOT_JSON
    assert str(MAX_JSON_DEPTH) in out.detail


def test_an_escaped_second_label_is_a_duplicate_not_a_label():
    out = verdict(b'{"label":"neg","text":"x","\\u006cabel":"pos"}')
    assert isinstance(out, InvalidEvent) and out.reason is Reason.DUPLICATE_FIELD


def test_a_repeated_key_that_is_not_a_field_does_not_make_the_fields_duplicates():
    """Shrunk by hypothesis: any repeated key made every field count as repeated."""
    out = verdict(b'{"text": "pos", "label": "pos", "segment": "a", "segment": "b"}')
    assert isinstance(out, LabeledEvent) and out.label == 1


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (b'{"text": "x", "label": "pos", "id": ' + b"9" * 5_000 + b"}", Reason.NOT_JSON),
        (b'{"text": "x", "label": "pos", "id": 99999999999999999999}', Reason.BAD_FIELD),
        (b'{"text": "\\ud800", "label": "pos"}', Reason.BAD_TEXT),
        (b'{"text": "ok", "text_pair": "a\\udfffb", "label": "pos"}', Reason.BAD_TEXT),
        (b'{"text": "ok", "label": "pos", "ts": 1e999}', Reason.BAD_FIELD),
        (b'{"text": "ok", "label": "pos", "ts": -1}', Reason.BAD_FIELD),
        (b'{"text": "ok", "label": "pos", "ts": "2024-11-22T18:26:40"}', Reason.BAD_FIELD),  # no zone
        (b'{"text": "ok", "label": "pos", "id": true}', Reason.BAD_FIELD),
        (b'\xef\xbb\xbf{"text": "ok", "label": "pos"}', Reason.NOT_JSON),  # a byte-order mark
    ],
)
def test_edge_values(value, reason):
    out = verdict(value)
    assert isinstance(out, InvalidEvent) and out.reason is reason, out


def test_ts_as_rfc3339_or_epoch_milliseconds():
    """A stream whose ``ts`` is an RFC 3339 string (a common export format) was dead-lettered whole."""
    for ts in ('"2024-11-22T18:26:40Z"', '"2024-11-22T19:26:40+01:00"', '"2024-11-22 18:26:40.000Z"'):
        e = parse_event(f'{{"text": "ok", "label": "pos", "ts": {ts}}}'.encode(), LABELS, LIMIT)
        assert e.ts == 1_732_300_000_000
    assert (
        parse_event(b'{"text": "ok", "label": 1, "ts": 1732300000000}', LABELS, LIMIT).ts == 1_732_300_000_000
    )


# --------------------------------------------------------------------------------- the tokenizer
def test_a_record_that_makes_the_real_tokenizer_raise_is_singled_out(tokenizer_fixture):
    """A lone surrogate makes the fast tokenizer raise (validation stops it before; this is the barrier
    behind validation): the batch is retried one by one and only that record fails."""
    tokenize = Tokenize(tokenizer_fixture, 32)
    events = [LabeledEvent("fine", 1), LabeledEvent("bad \ud800", 0), LabeledEvent("also fine", 0)]
    with pytest.raises(TypeError):
        tokenize(events)
    out = tokenize_records(tokenize, events)
    assert [type(x).__name__ for x in out] == ["tuple", "InvalidEvent", "tuple"]
    assert out[1].reason is Reason.INTERNAL_ERROR and "TypeError" in out[1].detail
    assert out[0][0].tolist() == tokenize([events[0]])[0][0].tolist()


@pytest.fixture(scope="module")
def tokenizer_fixture():
    from tests.support.factories import tokenizer

    return tokenizer()


def test_the_parse_barrier_turns_any_exception_into_a_dead_letter(monkeypatch):
    import stream_learner.core.intake as intake

    def broken(*_args):
        raise MemoryError("out of memory on this one record")

    monkeypatch.setattr(intake, "parse_event", broken)
    out = validate_record(b"{}", LABELS, LIMIT)
    assert isinstance(out, InvalidEvent) and out.reason is Reason.INTERNAL_ERROR
    assert "MemoryError" in out.detail


# ----------------------------------------------------------------------------------- fair hand-over
def event(partition: int, offset: int) -> TokenizedEvent:
    import numpy as np

    return TokenizedEvent(np.array([1, 2], np.uint16), 0, 0, partition, offset, 0)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.tuples(st.just("add"), st.integers(0, 3), st.integers(1, 300), st.booleans()),
            st.tuples(st.just("take"), st.integers(1, 300), st.just(0), st.just(False)),
        ),
        max_size=60,
    ),
    st.integers(1, 200),
)
def test_every_record_is_handed_over_once_in_order_and_no_partition_runs_ahead(ops, lead):
    buffers = PartitionBuffers(capacity=50, lead_limit=lead)
    partitions = {0, 1, 2, 3}
    read = dict.fromkeys(partitions, 0)
    handed: dict[int, list[int]] = {p: [] for p in partitions}
    for op, a, b, dead in ops:
        if op == "add":
            for _ in range(b):
                buffers.add(a, read[a], None if dead else event(a, read[a]))
                read[a] += 1
        else:
            batch = buffers.take(a, waiting=partitions)
            if batch is None:
                continue
            assert len(batch.events) + batch.dead_lettered <= a
            for e in batch.events:
                handed[e.partition].append(e.offset)
            for p, nxt in batch.next_offsets.items():
                assert nxt <= read[p]
            counts = [buffers._handed.get(p, 0) for p in partitions]
            assert max(counts) - min(counts) <= lead  # all four wait for their turn: none runs ahead
    while (batch := buffers.take(1_000)) is not None:  # nobody waits any more: the rest drains
        for e in batch.events:
            handed[e.partition].append(e.offset)
    assert len(buffers) == 0
    for p in partitions:
        assert handed[p] == sorted(handed[p]) and len(set(handed[p])) == len(handed[p])


def test_a_partition_that_rejoins_counts_from_the_least_advanced():
    buffers = PartitionBuffers(capacity=10, lead_limit=5)
    for offset in range(100):
        buffers.add(0, offset, event(0, offset))
    while buffers.take(10, waiting={0}) is not None:  # partition 1 was silent all along
        pass
    buffers.add(1, 0, event(1, 0))
    for offset in range(100, 110):
        buffers.add(0, offset, event(0, offset))
    batch = buffers.take(20, waiting={0, 1})  # 1 rejoins level with 0: 0 is not held back 100 records
    assert batch is not None and {e.partition for e in batch.events} == {0, 1}


# ---------------------------------------------------------------------------- visible dead letters
def test_dead_letters_are_logged_per_reason_at_most_once_a_minute_with_an_example(caplog):
    now = [0.0]
    watch = DeadLetterWatch(alert_share=0.5, window=100, clock=lambda: now[0])
    bad = InvalidEvent(Reason.BAD_FIELD, "'ts' must be ms since the epoch")
    with caplog.at_level(logging.WARNING, logger="stream_learner.core.intake"):
        watch.observe(10, [(bad, "events[0]@1")])
        for second in range(1, 60):
            now[0] = float(second)
            watch.observe(10, [(bad, f"events[0]@{second + 1}")])
        now[0] = 60.0
        watch.observe(10, [(bad, "events[1]@99")])
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines
    assert "dead-lettered 1 event as bad_field (e.g. events[0]@1: 'ts' must be" in lines[0]
    assert "dead-lettered 60 events as bad_field in the last 60s (e.g. events[0]@2" in lines[1]


def test_a_high_dead_letter_share_is_an_error_once_the_window_is_full(caplog):
    watch = DeadLetterWatch(alert_share=0.5, window=100, clock=lambda: 0.0)
    bad = InvalidEvent(Reason.BAD_FIELD, "x")
    with caplog.at_level(logging.ERROR, logger="stream_learner.core.intake"):
        watch.observe(60, [(bad, "t[0]@0")] * 60)
        assert not watch.high  # 60 records seen: not judged yet
        watch.observe(40, [(bad, "t[0]@0")] * 20)
        assert watch.share == pytest.approx(0.8) and watch.high
        watch.observe(100, [])
        assert watch.share == 0 and not watch.high
    assert len([r for r in caplog.records if r.levelno == logging.ERROR]) == 1
    assert "events.dead_letter_alert_share" in caplog.records[-1].getMessage()
