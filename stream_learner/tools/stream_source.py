"""Where ``stream-learner eval`` gets a labeled stream: the bundled VADER data, the user's JSONL file,
or a range of a Kafka topic — and how its events are grouped into segments.

Every row passes the product's own per-record barrier (:func:`~stream_learner.core.intake.validate_record`,
the function the consumer runs): a row the learner would dead-letter is left out and counted under
the same reason, so the evaluation sees exactly the events production would learn from.

**Segments.** Held-out accuracy, forgetting and backward transfer are measured per segment. A row's
optional ``segment`` field (a source, a month, a customer…; a string or an integer) names its segment;
it must be on every row of a file or on none. Without it, the stream is cut into ``slices`` equal
parts in its order, and so is the held-out set (keep it in time order, as ``--heldout last:P%`` gives
it). Segments are numbered in order of first appearance in the stream.
"""

from __future__ import annotations

import math
import re
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from stream_learner.core.events import InvalidEvent, LabeledEvent, LabelSet, Reason
from stream_learner.core.intake import validate_record

KAFKA_SCHEME = "kafka://"
MAX_SEGMENT_CHARS = 256
_HELDOUT_SPLIT = re.compile(r"^last:(\d+(?:\.\d+)?)%$")


@dataclass
class LabeledRows:
    """The valid rows of one source in order, each with its segment; the invalid ones counted by reason."""

    source: str
    events: list[LabeledEvent]
    segments: list[str | None]  # per event; None when the row has no segment field
    invalid: dict[str, int] = field(default_factory=dict)

    @property
    def rows_read(self) -> int:
        return len(self.events) + sum(self.invalid.values())

    @property
    def has_segments(self) -> bool:
        """Whether the rows name their segments (on every row; :func:`parse_rows` refuses a mix)."""
        return bool(self.segments) and self.segments[0] is not None

    def take(self, index: Sequence[int], source: str) -> LabeledRows:
        return LabeledRows(source, [self.events[i] for i in index], [self.segments[i] for i in index])

    def summary(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "rows": self.rows_read,
            "valid": len(self.events),
            "invalid": self.invalid,
        }


def _segment_of(value: bytes) -> str | None:
    """The row's ``segment`` field as a string; ``None`` when absent; :class:`InvalidEvent` when unusable."""
    try:
        obj = orjson.loads(value)
    except orjson.JSONDecodeError:  # validate_record accepted it: only a parser difference lands here
        raise InvalidEvent(Reason.NOT_JSON, "not JSON") from None
    segment = obj.get("segment") if isinstance(obj, dict) else None
    if segment is None:
        return None
    if isinstance(segment, bool) or not isinstance(segment, str | int):
        raise InvalidEvent(Reason.BAD_FIELD, "'segment' must be a string or an integer")
    segment = str(segment).strip()
    if not segment or len(segment) > MAX_SEGMENT_CHARS:
        raise InvalidEvent(Reason.BAD_FIELD, f"'segment' must have 1 to {MAX_SEGMENT_CHARS} characters")
    return segment


def parse_rows(
    values: Iterable[bytes | None], labels: LabelSet, max_text_bytes: int, source: str
) -> LabeledRows:
    """Validate message values (JSONL lines, Kafka record values) as the consumer does.

    Raises :class:`ValueError` when some valid rows carry a ``segment`` and others do not.

    >>> rows = parse_rows([b'{"text": "ok", "label": "b"}', b'{"text": "x"}', b"{"], LabelSet(["a", "b"]),
    ...                   100, "example")
    >>> [e.label for e in rows.events], rows.invalid
    ([1], {'missing_label': 1, 'not_json': 1})
    """
    out = LabeledRows(source, [], [])
    invalid: Counter[str] = Counter()
    for value in values:
        checked = validate_record(value, labels, max_text_bytes)
        if not isinstance(checked, InvalidEvent):
            try:
                segment = _segment_of(value or b"")
            except InvalidEvent as err:
                checked = err
        if isinstance(checked, InvalidEvent):
            invalid[checked.reason.value] += 1
            continue
        out.events.append(checked)
        out.segments.append(segment)
    out.invalid = dict(sorted(invalid.items()))
    with_segment = sum(s is not None for s in out.segments)
    if 0 < with_segment < len(out.segments):
        raise ValueError(
            f"{source}: {with_segment} of {len(out.segments)} valid rows have a 'segment' field: "
            "give it on every row or on none"
        )
    return out


def jsonl_values(path: str | Path, limit: int | None = None) -> Iterator[bytes]:
    """The non-blank lines of a JSONL file (the first ``limit`` of them), as message values."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{str(path)!r} is not a file: give a JSONL file of events")
    taken = 0
    with path.open("rb") as f:
        for line in f:
            if limit is not None and taken >= limit:
                return
            line = line.strip()
            if line:
                taken += 1
                yield line


# ============================================================================================ splits


def split_heldout(spec: str) -> float | None:
    """The held-out share of ``last:P%`` (a time split of the stream itself), or ``None`` for a path.

    >>> split_heldout("last:10%"), split_heldout("heldout.jsonl")
    (0.1, None)
    """
    m = _HELDOUT_SPLIT.match(spec.strip())
    if not m:
        return None
    share = float(m.group(1)) / 100
    if not 0 < share < 1:
        raise ValueError(f"--heldout {spec!r}: the share must be between 0 and 100 %, exclusive")
    return share


def time_split(rows: LabeledRows, share: float) -> tuple[LabeledRows, LabeledRows]:
    """The stream's first ``1 − share`` as the stream, its last ``share`` as the held-out set."""
    n = len(rows.events)
    if n < 2:
        raise ValueError(f"{rows.source}: {n} valid events are too few to split a held-out set off")
    cut = n - min(n - 1, max(1, round(share * n)))  # at least one event on each side
    stream = rows.take(range(cut), rows.source)
    stream.invalid = rows.invalid
    return stream, rows.take(range(cut, len(rows.events)), f"{rows.source} (last {share:.0%})")


def equal_slices(n: int, slices: int) -> np.ndarray:
    """Slice number (0-based) of each of ``n`` positions cut into ``slices`` equal consecutive parts.

    >>> equal_slices(10, 3).tolist()
    [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
    """
    return (np.arange(n) * slices // max(n, 1)).astype(np.int64)


def equal_slice_starts(n: int, slices: int) -> list[int]:
    """The first position of every slice but the first (the boundaries of :func:`equal_slices`).

    >>> equal_slice_starts(10, 3)
    [4, 7]
    """
    ids = equal_slices(n, slices)
    return [i for i in range(1, n) if ids[i] != ids[i - 1]]


@dataclass
class Segmented:
    """A stream and its held-out set with segment ids (into ``names``) for every event."""

    names: tuple[str, ...]
    stream: np.ndarray
    heldout: np.ndarray
    by_field: bool  # True: from the rows' segment field; False: equal slices


def assign_segments(stream: LabeledRows, heldout: LabeledRows, slices: int) -> Segmented:
    """Segment ids of both sets: from the rows' ``segment`` field, or ``slices`` equal slices of each.

    With segment fields, the names are the stream's segments in order of first appearance, then any
    held-out segment the stream never had (scored, but outside the forgetting matrix).
    """
    if stream.has_segments != heldout.has_segments and heldout.events:
        which = "stream" if stream.has_segments else "held-out set"
        raise ValueError(
            f"the {which} has a 'segment' field and the other does not: give it on the rows of both files "
            "(or of neither), or split the stream with --heldout last:P%"
        )
    if not stream.has_segments:
        if slices < 1:
            raise ValueError(f"slices must be at least 1, not {slices}")
        names = tuple(f"part {k + 1}/{slices}" for k in range(slices))
        return Segmented(
            names, equal_slices(len(stream.events), slices), equal_slices(len(heldout.events), slices), False
        )
    names = tuple(dict.fromkeys([*stream.segments, *heldout.segments]))  # type: ignore[list-item]
    index = {name: k for k, name in enumerate(names)}
    return Segmented(
        names,
        np.array([index[s] for s in stream.segments], dtype=np.int64),
        np.array([index[s] for s in heldout.segments], dtype=np.int64),
        True,
    )


def segment_blocks(ids: np.ndarray) -> list[int] | None:
    """The boundaries between the stream's segment blocks, or ``None`` when a segment recurs.

    Forgetting needs each segment learned once, as one block; a segment that comes back later (customers
    interleaved) has no "just after learning it" to compare with.

    >>> segment_blocks(np.array([0, 0, 1, 1, 2])), segment_blocks(np.array([0, 1, 0]))
    ([2, 4], None)
    """
    bounds = [i for i in range(1, len(ids)) if ids[i] != ids[i - 1]]
    runs = [ids[0], *(ids[b] for b in bounds)] if len(ids) else []
    return bounds if len(set(runs)) == len(runs) else None


# ============================================================================================ tokens


def token_lengths(tokenizer: Any, events: Sequence[LabeledEvent]) -> np.ndarray:
    """Tokens per event before truncation (special tokens included), as the model would see them."""
    singles = [e.text for e in events if e.text_pair is None]
    pairs = [(e.text, e.text_pair) for e in events if e.text_pair is not None]
    lengths: list[int] = []
    if singles:
        lengths += [len(ids) for ids in tokenizer(singles, truncation=False, verbose=False)["input_ids"]]
    if pairs:
        a, b = zip(*pairs, strict=True)
        enc = tokenizer(list(a), list(b), truncation=False, verbose=False)
        lengths += [len(ids) for ids in enc["input_ids"]]
    return np.asarray(lengths, dtype=np.int64)


def token_report(lengths: np.ndarray, max_length: int) -> dict[str, Any]:
    """Tokens per event (median, p95, max) and the share cut at ``max_length``."""
    if not len(lengths):
        return {"events": 0, "max_length": max_length, "truncated_share": 0.0}
    return {
        "events": len(lengths),
        "max_length": max_length,
        "median": float(np.median(lengths)),
        "p95": float(np.percentile(lengths, 95)),
        "max": int(lengths.max()),
        "truncated_share": float(np.mean(lengths > max_length)),
    }


# ============================================================================================ Kafka


@dataclass(frozen=True)
class KafkaRange:
    """A range of a topic: ``kafka://TOPIC`` with ``start``/``end`` as offsets or times.

    An offset (an integer) applies to every partition; a time is ISO 8601 (``2026-12-01T00:00Z``) or
    epoch milliseconds written ``ms:1764547200000``. ``start`` defaults to each partition's first
    record, ``end`` (exclusive) to its end when the read begins.
    """

    topic: str
    start: str | None = None
    end: str | None = None

    @classmethod
    def parse(cls, spec: str, start: str | None = None, end: str | None = None) -> KafkaRange:
        topic = spec[len(KAFKA_SCHEME) :] if spec.startswith(KAFKA_SCHEME) else ""
        if not topic or "/" in topic:
            raise ValueError(f"--stream {spec!r}: expected kafka://TOPIC")
        for bound in (start, end):
            if bound is not None:
                _bound(bound)  # fail before connecting
        return cls(topic, start, end)


def _bound(text: str) -> tuple[str, int]:
    """``("offset", n)`` or ``("time", epoch ms)`` of a --from/--to value."""
    text = text.strip()
    if re.fullmatch(r"\d+", text):
        return "offset", int(text)
    if text.startswith("ms:") and text[3:].isdigit():
        return "time", int(text[3:])
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(
            f"{text!r} is neither an offset (123), an ISO time (2026-12-01T00:00Z) nor ms:EPOCH_MS"
        ) from None
    if when.tzinfo is None:
        raise ValueError(f"{text!r}: give the time zone (…Z or …+01:00)")
    return "time", math.floor(when.timestamp() * 1000)


def read_topic_range(
    rng: KafkaRange, client: dict[str, Any], timeout_s: float = 60.0, idle_s: float = 3.0
) -> tuple[list[tuple[int, int, int, bytes | None]], dict[int, tuple[int, int]]]:
    """Every record of ``rng``: (timestamp ms, partition, offset, value), in time order across partitions.

    ``client`` is the librdkafka configuration (``Settings.kafka.librdkafka()``). Reads with a consumer
    of its own that is assigned the range and commits nothing, so a learner's group is left as it was.
    A partition with an ``end`` is read up to it; without one, until no record has come for ``idle_s``
    (the end of the topic as it was: high watermarks are not trusted, some brokers report them wrong
    after multi-record batches). Raises :class:`RuntimeError` when a bounded partition does not reach
    its end within ``timeout_s`` of the last record. Returns the records and the [first, end) offsets
    read per partition.
    """
    from confluent_kafka import Consumer, KafkaException, TopicPartition

    consumer = Consumer(
        {
            **client,
            "group.id": f"stream-learner-eval-{rng.topic}",
            "enable.auto.commit": False,
            "enable.partition.eof": False,
            "auto.offset.reset": "earliest",
        }
    )
    records: list[tuple[int, int, int, bytes | None]] = []
    try:
        meta = consumer.list_topics(rng.topic, timeout=timeout_s)
        topic = meta.topics.get(rng.topic)
        if topic is None or topic.error is not None or not topic.partitions:
            raise ValueError(f"topic {rng.topic!r} not found on the broker")
        first: dict[int, int] = {}
        ends: dict[int, int | None] = {}
        for p in sorted(topic.partitions):
            low, high = consumer.get_watermark_offsets(TopicPartition(rng.topic, p), timeout=timeout_s)
            first[p] = max(_resolve(consumer, rng.topic, p, rng.start, low, high, timeout_s), low)
            ends[p] = _resolve(consumer, rng.topic, p, rng.end, low, high, timeout_s) if rng.end else None
        open_ = {p for p in first if ends[p] is None or first[p] < ends[p]}  # type: ignore[operator]
        consumer.assign([TopicPartition(rng.topic, p, first[p]) for p in sorted(open_)])
        reached = {p: first[p] for p in first}
        last = time.monotonic()
        while open_:
            for msg in consumer.consume(500, timeout=0.5):
                if msg.error() is not None:
                    raise KafkaException(msg.error())
                p, off = msg.partition(), msg.offset()
                end = ends[p]
                if p in open_ and (end is None or off < end):
                    records.append((msg.timestamp()[1], p, off, msg.value()))
                    reached[p] = off + 1
                    last = time.monotonic()
                if end is not None and off + 1 >= end:
                    open_.discard(p)
            quiet = time.monotonic() - last
            if quiet > idle_s:
                open_ -= {p for p in open_ if ends[p] is None}
            if open_ and quiet > timeout_s:
                missing = ", ".join(f"partition {p} from {reached[p]} to {ends[p]}" for p in sorted(open_))
                raise RuntimeError(f"topic {rng.topic!r}: {missing} not read within {timeout_s:.0f} s")
    finally:
        consumer.close()
    records.sort(key=lambda r: (r[0], r[1], r[2]))
    return records, {p: (first[p], reached[p]) for p in sorted(first)}


def _resolve(
    consumer: Any, topic: str, partition: int, bound: str | None, low: int, high: int, timeout_s: float
) -> int:
    """The offset of a --from/--to bound in one partition (``low`` when unset)."""
    from confluent_kafka import TopicPartition

    if bound is None:
        return low
    kind, value = _bound(bound)
    if kind == "offset":
        return value
    found = consumer.offsets_for_times([TopicPartition(topic, partition, value)], timeout=timeout_s)[0]
    return high if found.offset < 0 else found.offset  # no record at or after the time: the end
