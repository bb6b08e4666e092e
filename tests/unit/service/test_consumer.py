"""The consumer loop (``EventConsumer.run``) against a fake of the confluent_kafka clients it uses.

The fake keeps only what the loop relies on: per-partition logs read from a fetch position, pause and
resume (a paused partition delivers nothing; resumed, it continues from its position), seek, commit,
watermarks, and a producer whose deliveries succeed or fail on demand. The "trainer" is the fake's
``consume``: each call first takes batches off the queue (as many as the test says), so the loop runs
in this thread, deterministically, in milliseconds; the tests on the real broker are in
tests/integration/test_intake_kafka.py.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable

import orjson
import pytest
from confluent_kafka import KafkaError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stream_learner.core.config import Settings, load_settings
from stream_learner.core.events import (
    DEAD_LETTER_CUT_VALUE_BYTES,
    DEAD_LETTER_MAX_VALUE_BYTES,
    HEADER_OFFSET,
    HEADER_PARTITION,
    HEADER_REASON,
    HEADER_TOPIC,
    HEADER_TRUNCATED,
    Reason,
    encode_event,
)
from stream_learner.core.intake import ConsumedBatch
from stream_learner.service import consumer as consumer_module
from stream_learner.service.consumer import EventConsumer
from stream_learner.service.metrics import Metrics
from stream_learner.tools.datasets import malformed_events
from tests.support.factories import tiny_rows, tokenizer

TOPIC = "events"
MAX_TEXT = 256
ROWS = tiny_rows(64)
MALFORMED = malformed_events(MAX_TEXT)


class FakeMessage:
    def __init__(self, topic: str, partition: int, offset: int, value: bytes | None, error=None) -> None:
        self._topic, self._partition, self._offset, self._value, self._error = (
            topic,
            partition,
            offset,
            value,
            error,
        )

    def error(self):
        return self._error

    def value(self) -> bytes | None:
        return self._value

    def topic(self) -> str:
        return self._topic

    def partition(self) -> int:
        return self._partition

    def offset(self) -> int:
        return self._offset

    def key(self) -> bytes | None:
        return None

    def headers(self) -> list | None:
        return None

    def timestamp(self) -> tuple[int, int]:
        return (1, 1_700_000_000_000 + self._offset)


class FakeConsumer:
    """The methods of ``confluent_kafka.Consumer`` that ``EventConsumer`` calls, over in-memory logs.

    ``tick`` runs at the start of every ``consume``: the test's trainer and stopping rule.
    """

    def __init__(self, logs: dict[int, list[bytes | None]], tick: Callable[[FakeConsumer], None]) -> None:
        self.logs = logs
        self.tick = tick
        self.fetch: dict[int, int] = {}  # next offset delivered, per assigned partition
        self.paused: set[int] = set()
        self.committed: list[dict[int, int]] = []
        self.pause_calls = self.resume_calls = self.consume_calls = 0
        self.closed = False
        self.errors: list[FakeMessage] = []  # error messages delivered first, once

    # group membership: subscribe assigns every partition at once, as a one-member group would
    def subscribe(self, topics, on_assign=None, on_revoke=None) -> None:
        assert topics == [TOPIC]
        from confluent_kafka import TopicPartition

        on_assign(self, [TopicPartition(TOPIC, p) for p in sorted(self.logs)])

    def assign(self, partitions) -> None:
        for tp in partitions:
            self.fetch[tp.partition] = tp.offset if tp.offset >= 0 else 0  # OFFSET_BEGINNING etc.

    def assignment(self):
        from confluent_kafka import TopicPartition

        return [TopicPartition(TOPIC, p) for p in sorted(self.fetch)]

    def pause(self, partitions) -> None:
        self.pause_calls += 1
        self.paused.update(tp.partition for tp in partitions)

    def resume(self, partitions) -> None:
        self.resume_calls += 1
        self.paused.difference_update(tp.partition for tp in partitions)

    def seek(self, tp) -> None:
        self.fetch[tp.partition] = tp.offset

    def consume(self, num_messages: int, timeout: float) -> list[FakeMessage]:
        self.consume_calls += 1
        self.tick(self)
        out: list[FakeMessage] = self.errors[:num_messages]
        del self.errors[: len(out)]
        # round-robin over the fetchable partitions, one record at a time, as a fetcher interleaves them
        while len(out) < num_messages:
            ready = [
                p for p in sorted(self.fetch) if p not in self.paused and self.fetch[p] < len(self.logs[p])
            ]
            if not ready:
                break
            for p in ready[: num_messages - len(out)]:
                offset = self.fetch[p]
                out.append(FakeMessage(TOPIC, p, offset, self.logs[p][offset]))
                self.fetch[p] = offset + 1
        if not out:
            time.sleep(min(timeout, 0.001))  # nothing to fetch: a real consume waits out its timeout
        return out

    def commit(self, offsets, asynchronous: bool = True) -> None:
        assert asynchronous is False
        self.committed.append({tp.partition: tp.offset for tp in offsets})

    def position(self, partitions):
        from confluent_kafka import TopicPartition

        return [TopicPartition(TOPIC, tp.partition, self.fetch[tp.partition]) for tp in partitions]

    def get_watermark_offsets(self, tp, timeout: float = 1.0) -> tuple[int, int]:
        return 0, len(self.logs[tp.partition])

    def close(self) -> None:
        self.closed = True


class FakeProducer:
    """``produce`` / ``flush`` / ``poll`` / ``len``; the first ``fail`` deliveries fail with ``error``."""

    def __init__(self, fail: int = 0, error: int = KafkaError.UNKNOWN_TOPIC_OR_PART) -> None:
        self.pending: list[tuple[dict, Callable]] = []
        self.delivered: list[dict] = []
        self.fail, self.error = fail, error
        self.failures = 0

    def __len__(self) -> int:
        return len(self.pending)

    def produce(self, topic, value=None, key=None, headers=None, on_delivery=None) -> None:
        record = {"topic": topic, "value": value, "key": key, "headers": dict(headers or [])}
        self.pending.append((record, on_delivery))

    def poll(self, timeout: float = 0) -> int:
        return self.flush(timeout)

    def flush(self, timeout: float = -1) -> int:
        pending, self.pending = self.pending, []
        for record, on_delivery in pending:
            if self.failures < self.fail:
                self.failures += 1
                on_delivery(KafkaError(self.error), None)
            else:
                self.delivered.append(record)
                on_delivery(None, None)
        return 0


def consumer_settings(**kafka) -> Settings:
    return load_settings(
        kafka={"topic": TOPIC, "poll_max_messages": 8, "queue_max_batches": 2, **kafka},
        events={"max_text_bytes": MAX_TEXT},
        model={"max_length": 32},
        http={"enabled": False},
    )


class Run:
    """One ``EventConsumer.run`` in this thread over ``logs``; ``drain(n)`` says how many batches the
    trainer takes off the queue at the n-th consume (all of them when None)."""

    def __init__(
        self,
        logs: dict[int, list[bytes | None]],
        settings: Settings | None = None,
        drain: Callable[[int], int | None] = lambda n: None,
        producer: FakeProducer | None = None,
        start_offsets: dict[int, int] | None = None,
        timeout_s: float = 20.0,
    ) -> None:
        self.settings = settings or consumer_settings()
        self.logs = logs
        self.total = sum(len(v) for v in logs.values())
        self.start_offsets = start_offsets or {}
        self.expected = self.total - sum(self.start_offsets.values())
        self.drain = drain
        self.deadline = time.monotonic() + timeout_s
        self.batches: list[ConsumedBatch] = []
        self.queue: queue.Queue = queue.Queue(maxsize=self.settings.kafka.queue_max_batches)
        self.commits: queue.Queue = queue.Queue()
        self.metrics = Metrics()
        self.stop = threading.Event()
        self.ec = EventConsumer(
            self.settings,
            tokenizer(),
            self.queue,
            self.commits,
            self.metrics,
            self.stop,
            start_offsets=self.start_offsets,
        )
        self.fake = FakeConsumer(logs, self._tick)
        self.producer = producer if producer is not None else FakeProducer()
        self.ec._make_consumer = lambda: self.fake  # type: ignore[method-assign]
        self.ec._make_producer = lambda: self.producer  # type: ignore[method-assign]

    def accounted(self) -> int:
        return sum(len(b.events) + b.dead_lettered for b in self.batches)

    def _tick(self, fake: FakeConsumer) -> None:
        n = fake.consume_calls
        assert time.monotonic() < self.deadline, (
            f"no end after {n} polls: {self.accounted()} of {self.expected}"
        )
        take = self.drain(n)
        while take is None or take > 0:
            try:
                self.batches.append(self.queue.get_nowait())
            except queue.Empty:
                break
            take = None if take is None else take - 1
        if self.accounted() >= self.expected:
            self.stop.set()
            self.ec.close_event.set()

    def run(self) -> Run:
        self.ec.run()
        assert self.fake.closed
        return self

    def events(self) -> list[tuple[int, int]]:
        return [(e.partition, e.offset) for b in self.batches for e in b.events]

    def dead_letters(self) -> dict[tuple[int, int], dict]:
        out = {}
        for record in self.producer.delivered:
            h = record["headers"]
            assert record["topic"] == self.settings.kafka.dead_letter_topic
            assert h[HEADER_TOPIC] == TOPIC.encode()
            key = (int(h[HEADER_PARTITION]), int(h[HEADER_OFFSET]))
            assert key not in out, f"{key} dead-lettered twice"
            out[key] = record
        return out

    def check_every_record_once_in_order(self) -> None:
        """Each record is either an event handed to the trainer or a dead letter with a reason, once;
        per partition, the events come in offset order and the batches' offsets only move forward."""
        events, dead = self.events(), self.dead_letters()
        assert len(events) == len(set(events)), "an event was handed over twice"
        assert not set(events) & set(dead), "a record both trained and dead-lettered"
        expected = {
            (p, o) for p, log in self.logs.items() for o in range(self.start_offsets.get(p, 0), len(log))
        }
        assert set(events) | set(dead) == expected, "records lost (or invented)"
        for record in dead.values():
            assert Reason(record["headers"][HEADER_REASON].decode())
        for p in self.logs:
            mine = [o for q, o in events if q == p]
            assert mine == sorted(mine), f"partition {p}: events out of order"
            ends = [b.next_offsets[p] for b in self.batches if p in b.next_offsets]
            assert ends == sorted(ends), f"partition {p}: next offsets moved back"
            if len(self.logs[p]) > self.start_offsets.get(p, 0):
                assert ends[-1] == len(self.logs[p])
        assert sum(b.dead_lettered for b in self.batches) == len(dead)
        consumed = self.metrics.value("stream_learner_events_consumed_total")
        assert consumed == self.expected


def valid(i: int) -> bytes:
    r = ROWS[i % len(ROWS)]
    return encode_event(r["text"], r["label"], id=str(i))


@pytest.fixture(autouse=True)
def _no_idle_wait(monkeypatch):
    """A partition that delivered nothing is at once taken to have no backlog (else the others wait
    PARTITION_IDLE_S = 2 s of real time for it)."""
    monkeypatch.setattr(consumer_module, "PARTITION_IDLE_S", 0.0)


# -------------------------------------------------------------------------------------- the property
record = st.one_of(
    st.integers(0, len(ROWS) - 1).map(valid),
    st.sampled_from([v for _, v in MALFORMED]),
    st.binary(max_size=40),  # arbitrary bytes: nearly always not_json
    st.none(),  # a tombstone: no value at all
    st.integers(MAX_TEXT + 1, 4 * MAX_TEXT).map(lambda n: orjson.dumps({"text": "a" * n, "label": "pos"})),
    st.just(b"x" * (DEAD_LETTER_MAX_VALUE_BYTES + 1)),  # too large even for the dead-letter topic
)


@settings(
    max_examples=60,
    deadline=None,
    # the autouse fixture below only sets a constant: the same for every example
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    logs=st.dictionaries(st.integers(0, 3), st.lists(record, max_size=30), min_size=1, max_size=4),
    poll=st.integers(1, 12),
    queue_max=st.integers(1, 3),
    schedule=st.lists(st.one_of(st.none(), st.integers(0, 2)), min_size=1, max_size=12),
)
def test_every_record_is_an_event_or_a_dead_letter_once_in_offset_order(logs, poll, queue_max, schedule):
    """Whatever the records (valid, malformed, arbitrary bytes, none, oversized) over up to 4
    partitions, however fast the trainer drains the queue: nothing lost, nothing twice, offsets in order."""
    s = consumer_settings(poll_max_messages=poll, queue_max_batches=queue_max)
    schedule = [*schedule, None]  # the trainer drains everything at least once a round
    run = Run(logs, s, drain=lambda n: schedule[n % len(schedule)]).run()
    run.check_every_record_once_in_order()
    for (p, o), record in run.dead_letters().items():
        value = logs[p][o]
        if value is not None and len(value) > DEAD_LETTER_MAX_VALUE_BYTES:
            assert record["headers"][HEADER_TRUNCATED] == str(len(value)).encode()
            assert record["value"] == value[:DEAD_LETTER_MAX_VALUE_BYTES]
        else:
            assert record["value"] == value and HEADER_TRUNCATED not in record["headers"]


# ----------------------------------------------------------------------------------- regular tests
def test_malformed_records_are_dead_lettered_with_their_reason():
    logs = {0: [valid(0), *(v for _, v in MALFORMED), valid(1)]}
    run = Run(logs).run()
    run.check_every_record_once_in_order()
    dead = run.dead_letters()
    for offset, (reason, _) in enumerate(MALFORMED, start=1):
        assert dead[(0, offset)]["headers"][HEADER_REASON] == reason.value.encode()
    assert run.events() == [(0, 0), (0, len(MALFORMED) + 1)]
    by_reason = {
        s.labels["reason"]: s.value
        for metric in run.metrics.events_dead_lettered.collect()
        for s in metric.samples
        if s.name.endswith("_total")
    }
    assert sum(by_reason.values()) == len(MALFORMED)


def test_a_slow_trainer_pauses_full_partitions_and_resumes_them_drained():
    """The trainer takes a batch every fourth poll: buffers fill, partitions pause, then resume."""
    logs = {p: [valid(i) for i in range(40)] for p in range(2)}
    run = Run(logs, drain=lambda n: 1 if n % 4 == 0 else 0).run()
    run.check_every_record_once_in_order()
    m = run.metrics
    assert m.value("stream_learner_consumer_pauses_total") > 0
    assert m.value("stream_learner_consumer_resumes_total") > 0
    assert run.fake.pause_calls > 0 and run.fake.resume_calls > 0
    # bounded: the buffers never held more than a share of a poll each, plus one poll
    assert len(run.ec.buffers) == 0 and run.ec._pending is None


def test_a_backlog_on_every_partition_is_handed_over_in_turns():
    """Fairness: under a backlog, no partition runs ahead of another by more than a poll."""
    logs = {p: [valid(i) for i in range(48)] for p in range(3)}
    run = Run(logs, drain=lambda n: 1 if n % 2 == 0 else 0).run()
    run.check_every_record_once_in_order()
    handed = {p: 0 for p in logs}
    lead = 0
    for b in run.batches:
        for e in b.events:
            handed[e.partition] += 1
        lead = max(lead, max(handed.values()) - min(handed.values()))
    assert lead <= 2 * run.settings.kafka.poll_max_messages, lead


def test_it_starts_at_the_restored_offsets():
    logs = {0: [valid(i) for i in range(10)], 1: [valid(i) for i in range(6)]}
    run = Run(logs, start_offsets={0: 7, 1: 6}).run()
    run.check_every_record_once_in_order()
    assert run.events() == [(0, 7), (0, 8), (0, 9)]


def test_only_published_offsets_are_committed_the_newest_once():
    logs = {0: [valid(i) for i in range(4)]}
    run = Run(logs)
    run.commits.put({0: 1})
    run.commits.put({0: 3})  # a newer durable version queued behind: only it is committed
    run.run()
    assert run.fake.committed == [{0: 3}]
    assert run.metrics.value("stream_learner_offset_commits_total") == 1


def test_a_dead_letter_outage_pauses_everything_and_skips_nothing():
    """The first deliveries fail: the poll is retried (after one 0.5 s backoff), every partition is
    paused meanwhile, and nothing of it reaches the trainer before its dead letters are acknowledged."""
    logs = {0: [valid(0), MALFORMED[0][1], valid(1)], 1: [MALFORMED[4][1], valid(2)]}
    producer = FakeProducer(fail=2)
    run = Run(logs, settings=consumer_settings(poll_max_messages=16), producer=producer).run()
    run.check_every_record_once_in_order()
    assert producer.failures == 2 and len(run.dead_letters()) == 2
    assert run.metrics.value("stream_learner_dead_letter_failures_total") == 2
    assert run.fake.pause_calls >= 1 and run.fake.resume_calls >= 1 and not run.fake.paused
    assert not run.ec._outage


def test_a_record_too_large_for_the_dead_letter_topic_is_cut_and_sent_again():
    big = b"{" + b"x" * (DEAD_LETTER_MAX_VALUE_BYTES + 10)
    producer = FakeProducer(fail=1, error=KafkaError.MSG_SIZE_TOO_LARGE)
    run = Run({0: [big, valid(0)]}, producer=producer).run()
    run.check_every_record_once_in_order()
    [record] = run.dead_letters().values()
    assert record["headers"][HEADER_TRUNCATED] == str(len(big)).encode()
    assert len(record["value"]) == DEAD_LETTER_CUT_VALUE_BYTES


def test_a_record_level_kafka_error_is_logged_not_fatal(caplog):
    logs = {0: [valid(0), valid(1)]}
    run = Run(logs)
    run.fake.errors.append(FakeMessage(TOPIC, 0, -1, None, error=KafkaError(KafkaError._TRANSPORT)))
    run.run()
    run.check_every_record_once_in_order()
    assert "kafka: " in caplog.text


def test_a_fatal_kafka_error_stops_the_loop_naming_it():
    from stream_learner.service.consumer import IntakeFailed

    run = Run({0: [valid(0)]})
    run.fake.errors.append(FakeMessage(TOPIC, 0, 5, None, error=KafkaError(KafkaError._FATAL, fatal=True)))
    with pytest.raises(IntakeFailed, match=r"processing events partition 0 offsets 0–5: KafkaException"):
        run.run()
    assert run.fake.closed


def test_events_cut_at_max_length_are_counted_and_said_once(caplog):
    long = encode_event("word " * 50, "pos")  # 250 bytes (the limit: 256), over max_length = 32 tokens
    logs = {0: [valid(0), long, valid(1), long, long]}
    with caplog.at_level(logging.WARNING, logger="stream_learner.service.consumer"):
        run = Run(logs).run()
    run.check_every_record_once_in_order()
    assert run.metrics.value("stream_learner_events_at_max_length_total") == 3
    said = [r for r in caplog.records if "model.max_length = 32" in r.getMessage()]
    assert len(said) == 1 and "--sweep model.max_length" in said[0].getMessage()
