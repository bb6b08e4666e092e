"""Event parsing and validation: every malformed kind is rejected with its reason."""

import orjson
import pytest

from stream_learner.datasets import malformed_events
from stream_learner.events import (
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
