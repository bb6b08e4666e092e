"""The intake between Kafka and the trainer, without Kafka: the per-record barrier, tokenization, the
fair hand-over of partitions, and the watch that makes dead-lettering visible.

The consumer (``consumer.py``) does the I/O; everything here is pure and unit-tested on its own.

**The per-record barrier.** Whatever goes wrong with one record — it is not JSON, fails validation,
or makes the parser or the tokenizer raise anything at all — becomes an :class:`InvalidEvent` for that
record alone (:func:`validate_record`, :func:`tokenize_records`): it is dead-lettered with its reason
and the consumer goes on. Only failures that are not about one record (the broker, storage, a bug in
the loop) may stop the learner.

**Fair hand-over** (:class:`PartitionBuffers`). A broker may serve one partition's backlog for minutes
while the others wait (Tansu does, measured in docs/operations.md). Records are therefore buffered per
partition, a partition whose buffer is full is paused — so the fetcher must serve the others — and the
trainer's batches take from every partition in turn.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from stream_learner.core.events import (
    InvalidEvent,
    LabeledEvent,
    LabelSet,
    Reason,
    TokenizedEvent,
    parse_event,
)

log = logging.getLogger(__name__)


@dataclass
class ConsumedBatch:
    """One hand-over's worth of work for the trainer.

    ``next_offsets`` covers every record of the batch, the dead-lettered ones included: once the
    trainer has stepped over ``events``, these offsets are done.
    """

    events: list[TokenizedEvent]
    next_offsets: dict[int, int]
    dead_lettered: int = 0
    consumed_at: float = field(default_factory=time.time)


def token_dtype(vocab_size: int) -> type[np.integer]:
    """uint16 holds every id of a vocabulary up to 65,536 entries: half the memory of int32."""
    return np.uint16 if vocab_size <= 65_536 else np.int32


class Tokenize:
    """Batched fast-tokenizer tokenization of valid events into compact token-id arrays."""

    def __init__(self, tokenizer, max_length: int) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.dtype = token_dtype(len(tokenizer))

    def __call__(self, events: list[LabeledEvent]) -> list[tuple[np.ndarray, int]]:
        """(input ids, pair start) for each event, in order."""
        out: list[tuple[np.ndarray, int]] = [(np.empty(0, self.dtype), 0)] * len(events)
        singles = [i for i, e in enumerate(events) if e.text_pair is None]
        pairs = [i for i, e in enumerate(events) if e.text_pair is not None]
        common = {"truncation": True, "max_length": self.max_length, "return_attention_mask": False}
        if singles:
            enc = self.tokenizer([events[i].text for i in singles], return_token_type_ids=False, **common)
            for i, ids in zip(singles, enc["input_ids"], strict=True):
                out[i] = (np.asarray(ids, dtype=self.dtype), 0)
        if pairs:
            enc = self.tokenizer(
                [events[i].text for i in pairs], [events[i].text_pair for i in pairs], **common
            )
            for j, i in enumerate(pairs):
                seq = enc.sequence_ids(j)
                start = seq.index(1) if 1 in seq else 0
                out[i] = (np.asarray(enc["input_ids"][j], dtype=self.dtype), start)
        return out


# ------------------------------------------------------------------------------ the record barrier
def internal_error(err: BaseException, stage: str) -> InvalidEvent:
    """The dead-letter reason of an unexpected exception raised by one record at ``stage``."""
    return InvalidEvent(Reason.INTERNAL_ERROR, f"{stage}: {type(err).__name__}: {err}"[:500])


def validate_record(
    value: bytes | None, labels: LabelSet, max_text_bytes: int
) -> LabeledEvent | InvalidEvent:
    """Parse and validate one message value; never raises (but for KeyboardInterrupt and SystemExit).

    >>> labels = LabelSet(["neg", "pos"])
    >>> validate_record(b'{"text": "fine", "label": "pos"}', labels, 100).label
    1
    >>> validate_record(b'{"text": "x", "label": "pos", "\\\\u006cabel": "neg"}', labels, 100).reason.value
    'duplicate_field'
    """
    try:
        return parse_event(value, labels, max_text_bytes)
    except InvalidEvent as err:
        return err
    except Exception as err:  # the barrier: one record never stops the learner
        return internal_error(err, "parsing")


def tokenize_records(
    tokenize: Callable[[list[LabeledEvent]], list[tuple[np.ndarray, int]]], events: list[LabeledEvent]
) -> list[tuple[np.ndarray, int] | InvalidEvent]:
    """Tokenize ``events`` in one batch; if the batch raises, one by one, so that only the records
    that raise become :class:`InvalidEvent` (``internal_error``) and the others are kept."""
    if not events:
        return []
    try:
        return list(tokenize(events))
    except Exception:
        pass
    out: list[tuple[np.ndarray, int] | InvalidEvent] = []
    for event in events:
        try:
            out.append(tokenize([event])[0])
        except Exception as err:
            out.append(internal_error(err, "tokenizing"))
    return out


# ------------------------------------------------------------------------------ fair hand-over
# a record read from Kafka: its offset, and the tokenized event, or None when it was dead-lettered
Record = tuple[int, TokenizedEvent | None]


class PartitionBuffers:
    """Records read from Kafka, buffered per partition and handed to the trainer in turns.

    Two bounds keep every partition advancing under a backlog:

    * A partition holding ``capacity`` records or more is *full*: the consumer pauses it, so the
      fetcher serves the other partitions, and resumes it once it has drained to half.
    * A partition is not handed over while it is ``lead_limit`` records or more ahead of the least
      advanced of the partitions ``waiting`` for their turn (those that may still have records; the
      consumer leaves out a partition that stayed empty for a while). A partition that joins the
      waiting ones again counts from where the least advanced of them stands, so an hour of silence
      is not an hour of priority.

    Each batch (:meth:`take`) takes an equal share from each eligible partition, starting where the
    previous batch stopped. Records read but not handed over number at most ``partitions ×
    capacity`` plus one poll.

    >>> buffers = PartitionBuffers(capacity=4, lead_limit=3)
    >>> for offset in range(6):
    ...     buffers.add(0, offset, None)
    >>> buffers.full()
    [0]
    >>> batch = buffers.take(4, waiting={0, 1})  # partition 1 may still have records: 3 at most
    >>> batch.next_offsets, batch.dead_lettered
    ({0: 3}, 3)
    >>> buffers.take(4, waiting={0, 1}) is None  # partition 0 is 3 ahead: it waits for partition 1
    True
    >>> buffers.take(4, waiting={0}).next_offsets  # partition 1 stayed empty: left out
    {0: 6}
    """

    def __init__(self, capacity: int, lead_limit: int | None = None) -> None:
        self.capacity = max(1, capacity)
        self.lead_limit = lead_limit
        self._records: dict[int, deque[Record]] = {}
        self._handed: dict[int, int] = {}  # records handed over per partition (lifted on rejoining)
        self._waiting: set[int] = set()
        self._turn = 0  # rotates the partition a batch starts with

    def __len__(self) -> int:
        return sum(len(q) for q in self._records.values())

    def add(self, partition: int, offset: int, event: TokenizedEvent | None) -> None:
        self._records.setdefault(partition, deque()).append((offset, event))

    def buffered(self, partition: int) -> int:
        return len(self._records.get(partition, ()))

    def full(self) -> list[int]:
        """Partitions holding ``capacity`` records or more (to pause)."""
        return [p for p, q in self._records.items() if len(q) >= self.capacity]

    def drained(self) -> list[int]:
        """Partitions holding at most half of ``capacity`` (a paused one may resume)."""
        return [p for p, q in self._records.items() if len(q) <= self.capacity // 2]

    def _floor(self, waiting: set[int]) -> int | None:
        """Records handed over by the least advanced waiting partition; rejoiners are lifted to it."""
        if not waiting:
            self._waiting = set()
            return None
        stayed = waiting & self._waiting
        base = min((self._handed.get(p, 0) for p in stayed), default=0)
        for p in waiting - self._waiting:
            self._handed[p] = max(self._handed.get(p, 0), base)
        self._waiting = set(waiting)
        return min(self._handed[p] for p in waiting)

    def take(self, max_records: int, waiting: set[int] | None = None) -> ConsumedBatch | None:
        """A batch of at most ``max_records`` records, an equal share from each eligible partition.

        ``waiting``: the partitions that may still have records (default: those with records now)."""
        nonempty = {p for p, q in self._records.items() if q}
        floor = self._floor(nonempty if waiting is None else set(waiting) | nonempty)
        eligible = sorted(
            p
            for p in nonempty
            if self.lead_limit is None or floor is None or self._handed.get(p, 0) - floor < self.lead_limit
        )
        if not eligible:
            return None
        start = self._turn % len(eligible)
        self._turn += 1
        order = eligible[start:] + eligible[:start]
        share = max(1, math.ceil(max_records / len(order)))
        events: list[TokenizedEvent] = []
        next_offsets: dict[int, int] = {}
        dead, left = 0, max_records
        for partition in order:
            q = self._records[partition]
            room = share
            if self.lead_limit is not None and floor is not None:
                room = min(share, floor + self.lead_limit - self._handed.get(partition, 0))
            n = min(room, left, len(q))
            for _ in range(n):
                offset, event = q.popleft()
                next_offsets[partition] = offset + 1
                if event is None:
                    dead += 1
                else:
                    events.append(event)
            self._handed[partition] = self._handed.get(partition, 0) + n
            left -= n
            if left == 0:
                break
        return ConsumedBatch(events=events, next_offsets=next_offsets, dead_lettered=dead)


# ------------------------------------------------------------------------ dead-letter visibility
@dataclass
class _ReasonLog:
    count: int = 0  # dead-lettered since the last line
    example: str = ""
    last_line: float = -math.inf


class DeadLetterWatch:
    """Makes dead-lettering visible: a WARNING per reason at most every ``log_every_s`` seconds with
    an example record, and an ERROR when more than ``alert_share`` of the last ``window`` consumed
    records were dead-lettered (a producer that changed its format dead-letters everything).

    ``share`` is that share (the ``dead_letter_recent_share`` gauge); it is judged once ``window``
    records have been seen, and the ERROR repeats at most every ``log_every_s`` while it stays high.

    >>> watch = DeadLetterWatch(alert_share=0.5, window=10, clock=lambda: 0.0)
    >>> bad = InvalidEvent(Reason.BAD_FIELD, "'ts' must be ms since the epoch")
    >>> watch.observe(consumed=10, dead=[(bad, "events[0]@7")] * 6)
    >>> watch.share, watch.high
    (0.6, True)
    """

    def __init__(
        self,
        alert_share: float,
        window: int,
        log_every_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        logger: logging.Logger = log,
    ) -> None:
        self.alert_share, self.window, self.log_every_s = alert_share, window, log_every_s
        self.clock, self.log = clock, logger
        self._recent: deque[bool] = deque(maxlen=window)
        self._dead_in_window = 0
        self._reasons: dict[Reason, _ReasonLog] = {}
        self._last_alert = -math.inf
        self.high = False

    @property
    def share(self) -> float:
        return self._dead_in_window / len(self._recent) if self._recent else 0.0

    def observe(self, consumed: int, dead: Sequence[tuple[InvalidEvent, str]]) -> None:
        """``consumed`` records were read, ``dead`` of them dead-lettered (error, where: topic[p]@offset)."""
        flags: Iterable[bool] = [True] * len(dead) + [False] * max(consumed - len(dead), 0)
        for flag in flags:
            if len(self._recent) == self.window:
                self._dead_in_window -= self._recent[0]
            self._recent.append(flag)
            self._dead_in_window += flag
        now = self.clock()
        for err, where in dead:
            entry = self._reasons.setdefault(err.reason, _ReasonLog())
            entry.count += 1
            entry.example = entry.example or f"{where}: {err.detail}"
        for reason, entry in self._reasons.items():
            if entry.count and now - entry.last_line >= self.log_every_s:
                first = entry.last_line == -math.inf
                self.log.warning(
                    "dead-lettered %d %s as %s%s (e.g. %s)",
                    entry.count,
                    "event" if entry.count == 1 else "events",
                    reason.value,
                    "" if first else f" in the last {self.log_every_s:.0f}s",
                    entry.example[:300],
                )
                entry.count, entry.example, entry.last_line = 0, "", now
        full = len(self._recent) == self.window
        self.high = full and self.share > self.alert_share
        if self.high and now - self._last_alert >= self.log_every_s:
            self._last_alert = now
            self.log.error(
                "%.0f%% of the last %d records were dead-lettered (events.dead_letter_alert_share is "
                "%.0f%%): check the producers' event format against the README's and the dead-letter "
                "topic's x-dead-letter-reason headers",
                100 * self.share,
                self.window,
                100 * self.alert_share,
            )
