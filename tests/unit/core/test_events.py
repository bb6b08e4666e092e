"""Event parsing and validation: every malformed kind is rejected with its reason."""

import json

import orjson
import pytest

from stream_learner.core.events import (
    HEADER_OFFSET,
    HEADER_PARTITION,
    HEADER_REASON,
    HEADER_TOPIC,
    InvalidEvent,
    LabelSet,
    Reason,
    dead_letter_headers,
    encode_event,
    parse_event,
)
from stream_learner.tools.datasets import malformed_events

LABELS = LabelSet(["neg", "pos"])


def test_valid_event_by_name_and_index():
    e = parse_event(encode_event("great film", "pos", id="m:1", ts=1732300000000), LABELS, 1000)
    assert (e.text, e.label, e.id, e.ts) == ("great film", 1, "m:1", 1732300000000)
    e = parse_event(b'{"text": "bad", "label": 0, "text_pair": "context"}', LABELS, 1000)
    assert (e.label, e.text_pair) == (0, "context")


@pytest.mark.parametrize(("reason", "value"), malformed_events(100), ids=lambda x: getattr(x, "value", None))
def test_malformed_kinds(reason, value):
    with pytest.raises(InvalidEvent) as info:
        parse_event(value, LABELS, 100)
    assert info.value.reason is reason


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (None, Reason.NOT_JSON),
        (b"", Reason.NOT_JSON),
        (b'{"text": "x", "label": true}', Reason.UNKNOWN_LABEL),
        (b'{"text": "x", "label": -1}', Reason.UNKNOWN_LABEL),
        (b'{"text": "x", "label": null}', Reason.MISSING_LABEL),
        (b'{"text": "x", "label": "pos", "text_pair": 3}', Reason.BAD_TEXT),
        (b'{"text": "x", "label": "pos", "id": [1]}', Reason.BAD_FIELD),
        (b'{"text": "x", "label": 1.0}', Reason.UNKNOWN_LABEL),
    ],
)
def test_more_malformed(value, reason):
    with pytest.raises(InvalidEvent) as info:
        parse_event(value, LABELS, 100)
    assert info.value.reason is reason


def test_byte_limit_counts_utf8_bytes_of_text_and_pair():
    ok = orjson.dumps({"text": "é" * 5, "text_pair": "ab", "label": "pos"})  # 10 + 2 bytes
    assert parse_event(ok, LABELS, 12).label == 1
    with pytest.raises(InvalidEvent) as info:
        parse_event(ok, LABELS, 11)
    assert info.value.reason is Reason.TEXT_TOO_LONG


def test_dead_letter_headers_keep_originals_and_add_reason():
    err = InvalidEvent(Reason.UNKNOWN_LABEL, "label 'meh' not in ['neg', 'pos']")
    headers = dict(dead_letter_headers([("trace", b"abc"), ("empty", None)], err, "events", 3, 42))
    assert headers["trace"] == b"abc" and headers["empty"] == b""
    assert headers[HEADER_REASON] == b"unknown_label"
    assert (headers[HEADER_TOPIC], headers[HEADER_PARTITION], headers[HEADER_OFFSET]) == (
        b"events",
        b"3",
        b"42",
    )


# ----------------------------------------------------------------------------------- hostile input
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from tests.support.hostile import KINDS, hostile_events  # noqa: E402

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


def parse_or_reason(value: bytes | None) -> str:
    try:
        parse_event(value, LABELS, 16_384)
    except InvalidEvent as err:
        assert err.reason in Reason and err.detail
        return err.reason.value
    return "ok"


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=2_000))
def test_any_bytes_are_valid_or_an_invalid_event_never_a_crash(value):
    parse_or_reason(value)


@settings(max_examples=500, deadline=None)
@given(
    st.fixed_dictionaries(
        {},
        optional={
            "text": json_values | st.text(),
            "label": json_values | st.sampled_from(["neg", "pos", 0, 1, 2, -1]),
            "text_pair": json_values,
            "id": json_values,
            "ts": json_values,
        },
    )
)
def test_any_json_object_is_valid_or_an_invalid_event(obj):
    value = json.dumps(obj).encode()  # the stdlib writes integers of any size, as a producer might
    reason = parse_or_reason(value)
    if reason == "ok":  # what passes is what the schema promises
        e = parse_event(value, LABELS, 16_384)
        assert e.text.strip() and e.label in (0, 1)


def test_every_hostile_kind_is_handled():
    seen = {kind: parse_or_reason(KINDS[kind](__import__("random").Random(0))) for kind in KINDS}
    assert seen["valid"] == "ok" and seen["random_bytes"] != "ok"
    reasons = {parse_or_reason(v) for _, v, _ in hostile_events(3_000, seed=7)}
    # the generator reaches every reason (so the fuzz test through the broker covers them all)
    # (internal_error is the barrier's, for what validation cannot foresee: tests/unit/core/test_intake.py)
    assert {r.value for r in Reason} - reasons == {"internal_error"}, reasons


def test_invisible_characters_are_removed_and_an_invisible_text_is_empty():
    e = parse_event(orjson.dumps({"text": "gr\u200beat\u0007 film\ufeff", "label": "pos"}), LABELS, 100)
    assert e.text == "great film"
    with pytest.raises(InvalidEvent) as info:
        parse_event(orjson.dumps({"text": "\u200b \u202e\u00ad", "label": "pos"}), LABELS, 100)
    assert info.value.reason is Reason.EMPTY_TEXT


def test_a_field_given_twice_is_rejected_but_its_name_inside_a_text_is_not():
    with pytest.raises(InvalidEvent) as info:
        parse_event(b'{"text": "x", "label": "pos", "label": "neg"}', LABELS, 100)
    assert info.value.reason is Reason.DUPLICATE_FIELD
    e = parse_event(b'{"text": "the \\"label\\" and \\"label\\" again", "label": "pos"}', LABELS, 100)
    assert e.label == 1
