"""The event format, its validation and the dead-letter record.

An input event is a JSON object (the Kafka message value)::

    {"text": "…", "label": "pos", "id": "optional", "text_pair": "optional", "ts": 1732300000000}

``label`` is a name of the configured label set or its integer index. Anything else is rejected with
an :class:`InvalidEvent` whose :class:`Reason` travels, with the original bytes and headers, to the
dead-letter topic (see :func:`dead_letter_headers`).
"""

from __future__ import annotations

import enum
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import orjson

# Dead-letter headers: one name each, shared by the consumer, the CLI and the tests.
HEADER_REASON = "x-dead-letter-reason"
HEADER_DETAIL = "x-dead-letter-detail"
HEADER_TOPIC = "x-dead-letter-source-topic"
HEADER_PARTITION = "x-dead-letter-source-partition"
HEADER_OFFSET = "x-dead-letter-source-offset"
HEADER_TRUNCATED = "x-dead-letter-truncated-from"  # original size, when the value had to be cut
DEAD_LETTER_HEADERS = (
    HEADER_REASON,
    HEADER_DETAIL,
    HEADER_TOPIC,
    HEADER_PARTITION,
    HEADER_OFFSET,
    HEADER_TRUNCATED,
)
# a dead-letter value over the producer's own limit (message.max.bytes, 1 MB by default) is cut to
# this; one the broker refuses as too large is cut to the smaller size and sent again
DEAD_LETTER_MAX_VALUE_BYTES = 900_000
DEAD_LETTER_CUT_VALUE_BYTES = 65_536


class Reason(str, enum.Enum):
    """Why an event was dead-lettered (the ``x-dead-letter-reason`` header and a metric label)."""

    NOT_JSON = "not_json"  # not UTF-8 JSON, or no value at all
    NOT_OBJECT = "not_object"  # JSON, but not an object
    MISSING_TEXT = "missing_text"
    BAD_TEXT = "bad_text"  # text (or text_pair) not a string
    EMPTY_TEXT = "empty_text"  # empty or only white space
    TEXT_TOO_LONG = "text_too_long"  # over events.max_text_bytes
    MISSING_LABEL = "missing_label"
    UNKNOWN_LABEL = "unknown_label"  # not a configured name, nor an index in range
    BAD_FIELD = "bad_field"  # id / ts of the wrong type
    DUPLICATE_FIELD = "duplicate_field"  # a field given twice: which one the producer meant is unknown


class InvalidEvent(ValueError):
    """An event that cannot be trained on; ``reason`` says why, ``detail`` says it for a human."""

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class LabeledEvent:
    """A valid event, its label mapped to an index."""

    text: str
    label: int
    text_pair: str | None = None
    id: str | None = None
    ts: int | None = None


@dataclass(frozen=True, slots=True)
class TokenizedEvent:
    """A valid event after tokenization, with where it came from (for offsets and freshness)."""

    input_ids: np.ndarray
    label: int
    pair_start: int  # first token of text_pair; 0 when there is none
    partition: int
    offset: int
    timestamp_ms: int  # Kafka message timestamp (produce time)


class LabelSet:
    """Maps label names and indices to indices."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = list(names)
        self._index = {name: i for i, name in enumerate(self.names)}

    def __len__(self) -> int:
        return len(self.names)

    def index(self, label: object) -> int:
        # bool is an int in Python; a true/false label is a mistake, not index 0/1
        if isinstance(label, bool):
            raise InvalidEvent(Reason.UNKNOWN_LABEL, f"label {label!r} is a boolean")
        if isinstance(label, int):
            if 0 <= label < len(self.names):
                return label
            raise InvalidEvent(Reason.UNKNOWN_LABEL, f"label index {label} outside 0..{len(self.names) - 1}")
        if isinstance(label, str) and label in self._index:
            return self._index[label]
        shown = label if isinstance(label, str) and len(label) <= 64 else type(label).__name__
        raise InvalidEvent(Reason.UNKNOWN_LABEL, f"label {shown!r} not in {self.names}")


FIELDS = ("text", "label", "text_pair", "id", "ts")
# control characters (but tab and newlines), zero-width and bidirectional-override characters: they
# carry no meaning for the model and can hide an empty or misleading text
_INVISIBLE = re.compile(
    "[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u00ad\u200b-\u200f\u202a-\u202e\u2060-\u2064\ufeff]"
)


def normalize_text(text: str) -> str:
    """``text`` without control, zero-width and bidi-override characters (see ``_INVISIBLE``)."""
    return _INVISIBLE.sub("", text)


def _check_duplicate_fields(value: bytes) -> None:
    """Reject a known field given twice (orjson, like most parsers, silently keeps the last one)."""
    # the exact check re-parses, so it runs only when a field name occurs more than once at all
    if not any(value.count(b'"%s"' % f.encode()) > 1 for f in FIELDS):
        return

    def pairs(items: list[tuple[str, object]]) -> dict:
        seen: set[str] = set()
        for key, _ in items:
            if key in seen and key in FIELDS:
                raise InvalidEvent(Reason.DUPLICATE_FIELD, f"field {key!r} given more than once")
            seen.add(key)
        return dict(items)

    json.loads(value, object_pairs_hook=pairs)


def parse_event(value: bytes | None, labels: LabelSet, max_text_bytes: int) -> LabeledEvent:
    """Parse and validate one message value; raise :class:`InvalidEvent` with the reason."""
    if not value:
        raise InvalidEvent(Reason.NOT_JSON, "empty message value")
    try:
        obj = orjson.loads(value)  # rejects invalid UTF-8, lone surrogates, NaN, Infinity, deep nesting
    except orjson.JSONDecodeError as err:
        raise InvalidEvent(Reason.NOT_JSON, str(err)[:200]) from None
    if not isinstance(obj, dict):
        raise InvalidEvent(Reason.NOT_OBJECT, f"JSON {type(obj).__name__}, expected an object")
    _check_duplicate_fields(value)

    if "text" not in obj:
        raise InvalidEvent(Reason.MISSING_TEXT, "no 'text' field")
    text, pair = obj["text"], obj.get("text_pair")
    if not isinstance(text, str) or (pair is not None and not isinstance(pair, str)):
        raise InvalidEvent(Reason.BAD_TEXT, "'text' and 'text_pair' must be strings")
    text, pair = normalize_text(text), (normalize_text(pair) if pair else pair)
    if not text.strip():
        raise InvalidEvent(
            Reason.EMPTY_TEXT, "'text' is empty (after removing control and zero-width characters)"
        )
    size = len(text.encode()) + (len(pair.encode()) if pair else 0)
    if size > max_text_bytes:
        raise InvalidEvent(Reason.TEXT_TOO_LONG, f"{size} bytes of text, limit {max_text_bytes}")

    if "label" not in obj or obj["label"] is None:
        raise InvalidEvent(Reason.MISSING_LABEL, "no 'label' field")
    label = labels.index(obj["label"])

    event_id, ts = obj.get("id"), obj.get("ts")
    if event_id is not None and not isinstance(event_id, str | int):
        raise InvalidEvent(Reason.BAD_FIELD, "'id' must be a string or an integer")
    if ts is not None and (isinstance(ts, bool) or not isinstance(ts, int)):
        raise InvalidEvent(Reason.BAD_FIELD, "'ts' must be an integer (ms since the epoch)")
    return LabeledEvent(
        text=text,
        label=label,
        text_pair=pair if pair and pair.strip() else None,
        id=None if event_id is None else str(event_id),
        ts=ts,
    )


def dead_letter_headers(
    original: Sequence[tuple[str, bytes | None]] | None,
    error: InvalidEvent,
    topic: str,
    partition: int,
    offset: int,
) -> list[tuple[str, bytes]]:
    """The original headers, then the dead-letter ones: reason, detail, source topic, partition, offset."""
    kept = [(k, v if v is not None else b"") for k, v in (original or []) if k not in DEAD_LETTER_HEADERS]
    return [
        *kept,
        (HEADER_REASON, error.reason.value.encode()),
        (HEADER_DETAIL, error.detail.encode("utf-8", "replace")[:1024]),
        (HEADER_TOPIC, topic.encode()),
        (HEADER_PARTITION, str(partition).encode()),
        (HEADER_OFFSET, str(offset).encode()),
    ]


def encode_event(text: str, label: str | int, **fields: object) -> bytes:
    """Serialize an event for the input topic (used by ``produce`` and the demo)."""
    return orjson.dumps({"text": text, "label": label, **{k: v for k, v in fields.items() if v is not None}})
