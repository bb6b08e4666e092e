"""The event format, its validation and the dead-letter record.

An input event is a JSON object (the Kafka message value)::

    {"text": "…", "label": "pos", "id": "optional", "text_pair": "optional", "ts": 1732300000000}

``label`` is a name of the configured label set or its integer index; ``ts`` is milliseconds since
the epoch or an RFC 3339 time. Anything else is rejected with
an :class:`InvalidEvent` whose :class:`Reason` travels, with the original bytes and headers, to the
dead-letter topic (see :func:`dead_letter_headers`).
"""

from __future__ import annotations

import enum
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from json.decoder import scanstring

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
    INTERNAL_ERROR = "internal_error"  # anything else that failed on this one record (the exception type)


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
# events are flat objects: nesting deeper than this is not data but an attack on the parser's stack
MAX_JSON_DEPTH = 64
INT64_MAX = 2**63 - 1
# control characters (but tab and newlines), zero-width and bidirectional-override characters: they
# carry no meaning for the model and can hide an empty or misleading text
_INVISIBLE = re.compile(
    "[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u00ad\u200b-\u200f\u202a-\u202e\u2060-\u2064\ufeff]"
)
_STRUCTURE = re.compile(r'["\[\]{}]')


def normalize_text(text: str) -> str:
    """``text`` without control, zero-width and bidi-override characters (see ``_INVISIBLE``)."""
    return _INVISIBLE.sub("", text)


def json_depth(doc: str) -> int:
    """The deepest nesting of arrays and objects in ``doc``, strings skipped.

    Exact for valid JSON and for the valid prefix of invalid JSON (all a parser reads before it stops).
    Linear in the number of brackets and strings.

    >>> json_depth('{"a": [1, {"b": "[[["}]}'), json_depth("[" * 5), json_depth('"x"')
    (3, 5, 0)
    """
    depth = deepest = pos = 0
    while (found := _STRUCTURE.search(doc, pos)) is not None:
        char = found.group()
        if char == '"':
            try:
                _, pos = scanstring(doc, found.end())
            except ValueError:  # an unterminated or invalid string: the parser stops there
                return deepest
            continue
        depth += 1 if char in "[{" else -1
        deepest = max(deepest, depth)
        pos = found.end()
    return deepest


class _Object(dict):
    """A parsed JSON object that remembers which of its keys were given more than once."""

    __slots__ = ("repeated",)

    @classmethod
    def from_pairs(cls, pairs: list[tuple[str, object]]) -> _Object:
        obj = cls(pairs)
        obj.repeated = set()
        if len(obj) < len(pairs):  # keys are compared as decoded: "label" and "\u006cabel" are one
            seen: set[str] = set()
            for key, _ in pairs:
                if key in seen and key in FIELDS:
                    obj.repeated.add(key)
                seen.add(key)
        return obj


def _reject_constant(name: str) -> object:
    raise ValueError(f"{name} is not a JSON number")


def decode_json(value: bytes) -> object:
    """Parse one message value: strict UTF-8, RFC 8259 JSON (no NaN/Infinity), at most
    :data:`MAX_JSON_DEPTH` levels deep; raise :class:`InvalidEvent` (``not_json``) otherwise.

    One parser (the standard library's, for its ``object_pairs_hook``: duplicate keys are seen after
    escapes are decoded, which orjson and msgspec cannot report). Objects come back as dicts whose
    ``repeated`` attribute names the :data:`FIELDS` given more than once.
    """
    try:
        doc = value.decode("utf-8")
    except UnicodeDecodeError as err:
        raise InvalidEvent(Reason.NOT_JSON, f"not UTF-8: {err}") from None
    # the exact depth scan runs only when the brackets could nest that deep at all
    if doc.count("[") + doc.count("{") > MAX_JSON_DEPTH and json_depth(doc) > MAX_JSON_DEPTH:
        raise InvalidEvent(Reason.NOT_JSON, f"nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        return json.loads(doc, object_pairs_hook=_Object.from_pairs, parse_constant=_reject_constant)
    except RecursionError:  # not reachable within MAX_JSON_DEPTH; kept so that no input can crash
        raise InvalidEvent(Reason.NOT_JSON, "nested too deeply") from None
    except ValueError as err:  # JSONDecodeError, NaN/Infinity, integers of over 4,300 digits
        raise InvalidEvent(Reason.NOT_JSON, str(err)[:200]) from None


def _utf8_text(value: str, field: str) -> str:
    """``value`` if it can be written as UTF-8 (a JSON escape can spell a lone surrogate, which cannot)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise InvalidEvent(Reason.BAD_TEXT, f"{field!r} holds a lone surrogate ({err.reason})") from None
    return value


def parse_timestamp(ts: object) -> int | None:
    """``ts`` as milliseconds since the epoch: an integer as given, or an RFC 3339 string with a zone.

    >>> parse_timestamp(1732300000000), parse_timestamp("2024-11-22T18:26:40Z")
    (1732300000000, 1732300000000)
    >>> parse_timestamp("2024-11-22T19:26:40.5+01:00")
    1732300000500
    """
    if ts is None:
        return None
    if isinstance(ts, str):
        try:
            when = datetime.fromisoformat(ts) if len(ts) <= 64 else None
        except ValueError:
            when = None
        if when is None or when.tzinfo is None or not 0 <= when.timestamp() * 1000 <= INT64_MAX:
            raise InvalidEvent(
                Reason.BAD_FIELD,
                "'ts' must be ms since the epoch or an RFC 3339 time with a zone (2024-11-22T18:26:40Z)",
            )
        return round(when.timestamp() * 1000)
    if isinstance(ts, bool) or not isinstance(ts, int) or not 0 <= ts <= INT64_MAX:
        raise InvalidEvent(
            Reason.BAD_FIELD,
            "'ts' must be ms since the epoch (a non-negative integer) or an RFC 3339 time",
        )
    return ts


def parse_event(value: bytes | None, labels: LabelSet, max_text_bytes: int) -> LabeledEvent:
    """Parse and validate one message value; raise :class:`InvalidEvent` with the reason."""
    if not value:
        raise InvalidEvent(Reason.NOT_JSON, "empty message value")
    obj = decode_json(value)
    if not isinstance(obj, dict):
        raise InvalidEvent(Reason.NOT_OBJECT, f"JSON {type(obj).__name__}, expected an object")
    if obj.repeated:
        raise InvalidEvent(Reason.DUPLICATE_FIELD, f"field {min(obj.repeated)!r} given more than once")

    if "text" not in obj:
        raise InvalidEvent(Reason.MISSING_TEXT, "no 'text' field")
    text, pair = obj["text"], obj.get("text_pair")
    if not isinstance(text, str) or (pair is not None and not isinstance(pair, str)):
        raise InvalidEvent(Reason.BAD_TEXT, "'text' and 'text_pair' must be strings")
    text = normalize_text(_utf8_text(text, "text"))
    pair = normalize_text(_utf8_text(pair, "text_pair")) if pair else pair
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

    event_id = obj.get("id")
    if isinstance(event_id, str):
        event_id = _utf8_text(event_id, "id") if len(event_id) <= 256 else None
        if event_id is None:
            raise InvalidEvent(Reason.BAD_FIELD, "'id' is longer than 256 characters")
    elif event_id is not None and (isinstance(event_id, bool) or not isinstance(event_id, int)):
        raise InvalidEvent(Reason.BAD_FIELD, "'id' must be a string or an integer")
    elif event_id is not None and abs(event_id) > INT64_MAX:
        raise InvalidEvent(Reason.BAD_FIELD, "'id' is an integer outside 64 bits")
    return LabeledEvent(
        text=text,
        label=label,
        text_pair=pair if pair and pair.strip() else None,
        id=None if event_id is None else str(event_id),
        ts=parse_timestamp(obj.get("ts")),
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
