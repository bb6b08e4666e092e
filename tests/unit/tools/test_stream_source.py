"""The user's stream for `eval`: every row validated as the consumer does, segments, splits, Kafka bounds."""

from __future__ import annotations

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stream_learner.core.events import LabelSet
from stream_learner.core.intake import validate_record
from stream_learner.tools import stream_source as source

LABELS = LabelSet(["spam", "ham", "other"])

texts = st.text(min_size=0, max_size=40)
json_rows = st.fixed_dictionaries(
    {"text": texts, "label": st.sampled_from(["spam", "ham", "other", "nope", 1, 7, None])},
    optional={"segment": st.one_of(st.text(max_size=5), st.integers(-3, 3), st.booleans(), st.none())},
).map(orjson.dumps)
values = st.lists(st.one_of(json_rows, st.binary(max_size=30)), max_size=30)


@settings(max_examples=200, deadline=None)
@given(values)
def test_every_row_is_kept_or_counted_under_the_consumers_reason(rows):
    """For any bytes: a row is valid here exactly when the consumer's barrier accepts it (and its segment
    is usable); the valid and the counted add up to the rows read; only a segment on some rows and not on
    others stops the read, with a message that says what to do."""
    try:
        parsed = source.parse_rows(rows, LABELS, 1000, "rows")
    except ValueError as err:
        assert "give it on every row or on none" in str(err)
        return
    assert parsed.rows_read == len(rows)
    accepted = [r for r in rows if not isinstance(validate_record(r, LABELS, 1000), Exception)]
    assert len(parsed.events) <= len(accepted)
    assert all(0 <= e.label < len(LABELS) for e in parsed.events)
    assert len(parsed.segments) == len(parsed.events)
    assert all(s is None or (isinstance(s, str) and s.strip() == s and s) for s in parsed.segments)


def test_invalid_rows_are_counted_by_reason_and_segments_read():
    rows = [
        b'{"text": "win money", "label": "spam", "segment": "march"}',
        b'{"text": "lunch?", "label": "ham", "segment": 4}',
        b'{"text": "x", "label": "maybe", "segment": "march"}',
        b'{"text": "y", "label": "ham", "segment": true}',
        b"not json",
    ]
    parsed = source.parse_rows(rows, LABELS, 1000, "rows")
    assert [e.label for e in parsed.events] == [0, 1]
    assert parsed.segments == ["march", "4"]
    assert parsed.invalid == {"bad_field": 1, "not_json": 1, "unknown_label": 1}
    assert parsed.summary() == {"source": "rows", "rows": 5, "valid": 2, "invalid": parsed.invalid}


def test_a_segment_on_some_rows_only_is_refused():
    rows = [b'{"text": "a", "label": "ham", "segment": "x"}', b'{"text": "b", "label": "ham"}']
    with pytest.raises(ValueError, match="1 of 2 valid rows have a 'segment' field"):
        source.parse_rows(rows, LABELS, 1000, "rows")


@given(st.integers(0, 500), st.integers(1, 12))
def test_equal_slices_are_consecutive_and_balanced(n, k):
    ids = source.equal_slices(n, k)
    assert len(ids) == n and np.all(np.diff(ids) >= 0)
    if n >= k:
        counts = np.bincount(ids, minlength=k)
        assert counts.max() - counts.min() <= 1
    assert source.equal_slice_starts(n, k) == [i for i in range(1, n) if ids[i] != ids[i - 1]]


@given(st.lists(st.integers(0, 4), max_size=40))
def test_segment_blocks_exist_exactly_when_no_segment_recurs(ids):
    ids = np.array(ids, dtype=np.int64)
    blocks = source.segment_blocks(ids)
    runs = [ids[i] for i in range(len(ids)) if i == 0 or ids[i] != ids[i - 1]]
    if len(set(runs)) == len(runs):
        assert blocks == [i for i in range(1, len(ids)) if ids[i] != ids[i - 1]]
    else:
        assert blocks is None


def _rows(segments: list[str | None]) -> source.LabeledRows:
    lines = [
        orjson.dumps({"text": f"t{i}", "label": "ham", **({"segment": s} if s else {})})
        for i, s in enumerate(segments)
    ]
    return source.parse_rows(lines, LABELS, 1000, "rows")


def test_segments_come_from_the_field_in_stream_order_then_heldout_only_ones():
    seg = source.assign_segments(_rows(["b", "b", "a"]), _rows(["a", "c", "b"]), slices=4)
    assert seg.names == ("b", "a", "c") and seg.by_field
    assert seg.stream.tolist() == [0, 0, 1] and seg.heldout.tolist() == [1, 2, 0]


def test_without_a_segment_field_both_sets_are_cut_into_equal_slices():
    seg = source.assign_segments(_rows([None] * 8), _rows([None] * 4), slices=2)
    assert seg.names == ("part 1/2", "part 2/2") and not seg.by_field
    assert seg.stream.tolist() == [0, 0, 0, 0, 1, 1, 1, 1] and seg.heldout.tolist() == [0, 0, 1, 1]


def test_a_segment_field_in_one_file_only_is_refused_with_the_fix():
    with pytest.raises(ValueError, match="give it on the rows of both files"):
        source.assign_segments(_rows(["a"]), _rows([None]), slices=2)


@given(st.integers(2, 300), st.floats(0.01, 0.99))
def test_a_time_split_keeps_every_event_once_in_order(n, share):
    rows = _rows([None] * n)
    stream, heldout = source.time_split(rows, share)
    assert [e.text for e in stream.events + heldout.events] == [e.text for e in rows.events]
    assert len(heldout.events) >= 1 and len(stream.events) >= 1


def test_heldout_specs():
    assert source.split_heldout("last:12.5%") == 0.125
    assert source.split_heldout("data/last.jsonl") is None
    with pytest.raises(ValueError, match="between 0 and 100"):
        source.split_heldout("last:100%")


def test_kafka_ranges_parse_offsets_and_times_and_refuse_the_rest():
    rng = source.KafkaRange.parse("kafka://tickets", "100", "2026-12-01T00:00Z")
    assert rng.topic == "tickets"
    assert source._bound("ms:1796083200000") == ("time", 1796083200000)
    assert source._bound("2026-12-01T00:00Z") == ("time", 1796083200000)
    for bad in ("yesterday", "2026-12-01T00:00", "-5"):
        with pytest.raises(ValueError):
            source.KafkaRange.parse("kafka://tickets", bad)
    with pytest.raises(ValueError, match="expected kafka://TOPIC"):
        source.KafkaRange.parse("kafka://")


def test_token_report_counts_the_truncated_share():
    from tests.support.factories import tokenizer

    tok = tokenizer()
    rows = source.parse_rows(
        [orjson.dumps({"text": "word " * n, "label": "ham"}) for n in (3, 10, 200)], LABELS, 10_000, "r"
    )
    lengths = source.token_lengths(tok, rows.events)
    assert lengths.tolist()[0] < lengths.tolist()[1] < lengths.tolist()[2] and lengths[2] > 128
    report = source.token_report(lengths, max_length=128)
    assert report["truncated_share"] == pytest.approx(1 / 3) and report["max"] == lengths[2]
