"""The consumer thread: Kafka → parse → validate → tokenize → a bounded queue to the trainer.

Offsets are never auto-committed. The published manifest is the source of truth for where each
partition resumes (:meth:`EventConsumer._on_assign` seeks there); Kafka commits only follow a durable
version (they arrive on ``commit_queue`` from the publisher) so that monitoring sees real progress.

Backpressure: when the queue to the trainer is full the consumer pauses all its partitions and keeps
polling (librdkafka drops what it had prefetched for them), and resumes once the queue is half empty.
Memory is bounded by ``queue_max_batches × poll_max_messages`` events plus one held batch.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field

import numpy as np
from confluent_kafka import (
    OFFSET_BEGINNING,
    OFFSET_END,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
)
from confluent_kafka import TopicPartition as KafkaTopicPartition

from stream_learner.config import Settings
from stream_learner.events import (
    DEAD_LETTER_CUT_VALUE_BYTES,
    DEAD_LETTER_MAX_VALUE_BYTES,
    HEADER_TRUNCATED,
    InvalidEvent,
    LabeledEvent,
    LabelSet,
    TokenizedEvent,
    dead_letter_headers,
    parse_event,
)
from stream_learner.limits import PREFETCH_KBYTES
from stream_learner.metrics import Metrics

log = logging.getLogger(__name__)

LAG_INTERVAL_S = 5.0


@dataclass
class ConsumedBatch:
    """One consume() call's worth of work for the trainer.

    ``next_offsets`` covers every message of the batch, the dead-lettered ones included: once the
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


class EventConsumer:
    """The consumer loop; run :meth:`run` in its own thread.

    Parameters
    ----------
    start_offsets
        partition → next offset, from the restored version; partitions not listed start at the
        configured ``auto_offset_reset``.
    partitions
        Consume exactly these partitions of the topic, assigned explicitly (a rank's share in a
        data-parallel group, see ``distributed.py``); None subscribes with the consumer group.
    """

    def __init__(
        self,
        settings: Settings,
        tokenizer,
        fresh_queue: queue.Queue,
        commit_queue: queue.Queue[dict[int, int]],
        metrics: Metrics,
        stop: threading.Event,
        start_offsets: dict[int, int] | None = None,
        partitions: list[int] | None = None,
    ) -> None:
        self.settings = settings
        self.partitions = partitions
        self.kafka = settings.kafka
        self.labels = LabelSet(settings.model.labels)
        self.tokenize = Tokenize(tokenizer, settings.model.max_length)
        self.fresh_queue, self.commit_queue, self.metrics, self.stop_event = (
            fresh_queue,
            commit_queue,
            metrics,
            stop,
        )
        self.start_offsets = dict(start_offsets or {})
        self.position: dict[int, int] = {}  # next offset after the last message processed, per partition
        # ``stop`` closes the intake (no more fetching); ``close_event`` ends the thread after the last
        # commit — two phases, so the final version's offsets are still committed (see app.Learner.stop)
        self.close_event = threading.Event()
        self.assigned = threading.Event()  # set once partitions are assigned (readiness)
        self.paused = False
        self._held: list[ConsumedBatch] = []
        self._delivery_failures: list[tuple[Message, KafkaError]] = []
        self._last_lag = 0.0

    # --------------------------------------------------------------------------------------- clients
    def _make_consumer(self) -> Consumer:
        conf = {
            **self.kafka.librdkafka(),
            "group.id": self.kafka.group_id,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": self.kafka.auto_offset_reset,
            "session.timeout.ms": self.kafka.session_timeout_ms,
            "enable.partition.eof": False,
            # librdkafka's prefetch buffer is part of the memory budget (stream_learner.limits): the
            # trainer is far slower than a fetch, so a small one costs no throughput
            "queued.max.messages.kbytes": PREFETCH_KBYTES,
        }
        return Consumer({**conf, **self.kafka.client_config}, logger=log)

    def _make_producer(self) -> Producer:
        return Producer(
            {
                **self.kafka.librdkafka(),
                "acks": "all",
                "linger.ms": 5,
                # a missing dead-letter topic is an outage to report and ride out, not one to create
                # with the broker's defaults; and a failure should surface in seconds, not minutes
                "allow.auto.create.topics": False,
                "message.timeout.ms": 10_000,
            },
            logger=log,
        )

    # -------------------------------------------------------------------------------------- the loop
    def run(self) -> None:
        """Thread target: consume until ``stop`` is set, commit until ``close_event`` is set."""
        consumer, producer = self._make_consumer(), self._make_producer()
        if self.partitions is None:
            consumer.subscribe([self.kafka.topic], on_assign=self._on_assign, on_revoke=self._on_revoke)
        else:  # no group membership, no rebalancing: this rank's static share
            self._on_assign(consumer, [KafkaTopicPartition(self.kafka.topic, p) for p in self.partitions])
        try:
            while not self.close_event.is_set():
                self._commit_published(consumer)
                if self.stop_event.is_set():
                    self.close_event.wait(0.05)
                    continue
                if (
                    self.paused
                    and not self._held
                    and self.fresh_queue.qsize() <= self.kafka.queue_max_batches // 2
                ):
                    consumer.resume(consumer.assignment())
                    self.paused = False
                    self.metrics.consumer_paused.set(0)
                    self.metrics.consumer_resumes.inc()
                msgs = consumer.consume(self.kafka.poll_max_messages, self.kafka.poll_timeout_s)
                if msgs:
                    batch = self._process(msgs, producer)
                    if batch is not None:
                        self._held.append(batch)
                self._hand_over(consumer)
                self._export_lag(consumer)
        finally:
            self._commit_published(consumer)
            producer.flush(10)
            consumer.close()

    def _hand_over(self, consumer: Consumer) -> None:
        """Queue held batches; when the queue is full, pause the partitions (backpressure)."""
        while self._held:
            try:
                self.fresh_queue.put_nowait(self._held[0])
            except queue.Full:
                if not self.paused:
                    consumer.pause(consumer.assignment())
                    self.paused = True
                    self.metrics.consumer_paused.set(1)
                    self.metrics.consumer_pauses.inc()
                return
            self._held.pop(0)
        self.metrics.queue_depth.set(self.fresh_queue.qsize())

    def _process(self, msgs: list[Message], producer: Producer) -> ConsumedBatch | None:
        """Validate, dead-letter the bad, tokenize the good; the DLQ is flushed before returning."""
        valid: list[tuple[LabeledEvent, Message]] = []
        next_offsets: dict[int, int] = {}
        dead = 0
        for m in msgs:
            if m.error() is not None:
                self._on_error(m.error())
                continue
            self.metrics.events_consumed.inc()
            next_offsets[m.partition()] = m.offset() + 1
            try:
                valid.append((parse_event(m.value(), self.labels, self.settings.events.max_text_bytes), m))
            except InvalidEvent as err:
                self._dead_letter(producer, m, err)
                dead += 1
        if dead:
            self._flush_dead_letters(producer)
        if not next_offsets:
            return None
        self.position.update(next_offsets)
        tokens = self.tokenize([e for e, _ in valid]) if valid else []
        events = [
            TokenizedEvent(
                input_ids=ids,
                label=e.label,
                pair_start=start,
                partition=m.partition(),
                offset=m.offset(),
                timestamp_ms=m.timestamp()[1],
            )
            for (e, m), (ids, start) in zip(valid, tokens, strict=True)
        ]
        return ConsumedBatch(events=events, next_offsets=next_offsets, dead_lettered=dead)

    # ----------------------------------------------------------------------------------- dead letters
    def _dead_letter(self, producer: Producer, m: Message, err: InvalidEvent) -> None:
        self._produce_dead_letter(producer, m, err)
        self.metrics.events_dead_lettered.labels(reason=err.reason.value).inc()

    def _produce_dead_letter(
        self, producer: Producer, m: Message, err: InvalidEvent, cut: bool = False
    ) -> None:
        """Queue one dead-letter record; ``cut``: the value is cut to fit (it was too large to deliver)."""
        headers = dead_letter_headers(m.headers(), err, m.topic(), m.partition(), m.offset())
        value = m.value()
        limit = DEAD_LETTER_CUT_VALUE_BYTES if cut else DEAD_LETTER_MAX_VALUE_BYTES
        if value is not None and len(value) > limit:
            headers.append((HEADER_TRUNCATED, str(len(value)).encode()))
            value = value[:limit]

        def on_delivery(error: KafkaError | None, _msg: Message) -> None:
            if error is not None:
                self._delivery_failures.append((m, err, error))

        producer.produce(
            self.kafka.dead_letter_topic, value=value, key=m.key(), headers=headers, on_delivery=on_delivery
        )

    def _flush_dead_letters(self, producer: Producer) -> None:
        """Block until every dead letter of the batch is acknowledged: none may be skipped.

        While the dead-letter topic is unavailable (deleted, no permission, broker trouble) the
        consumer stays on this batch, retrying with backoff and counting failures: an event that could
        be neither trained nor dead-lettered is never passed over.
        """
        delay = 0.5
        while True:
            producer.flush(30)
            failed, self._delivery_failures = self._delivery_failures, []
            if not failed and len(producer) == 0:
                return
            self.metrics.dead_letter_failures.inc(len(failed))
            log.warning(
                "dead-letter topic %s unavailable (%s): %d records to retry in %.1fs",
                self.kafka.dead_letter_topic,
                failed[0][2] if failed else "not flushed",
                len(failed),
                delay,
            )
            time.sleep(delay)
            delay = min(delay * 2, 10.0)
            for m, err, error in failed:
                too_large = error.code() == KafkaError.MSG_SIZE_TOO_LARGE
                self._produce_dead_letter(producer, m, err, cut=too_large)

    # ------------------------------------------------------------------------------ offsets and lag
    def _on_assign(self, consumer: Consumer, partitions: list[KafkaTopicPartition]) -> None:
        reset = OFFSET_BEGINNING if self.kafka.auto_offset_reset == "earliest" else OFFSET_END
        for tp in partitions:
            # a partition handed back after a rebalance continues where this consumer left it: its
            # events up to there are with the trainer already. Otherwise: the restored version's
            # offsets, else the reset policy.
            tp.offset = self.position.get(tp.partition, self.start_offsets.get(tp.partition, reset))
        consumer.assign(partitions)
        if self.paused:
            consumer.pause(partitions)
        log.info("assigned %s", {tp.partition: tp.offset for tp in partitions})
        self.assigned.set()

    def _on_revoke(self, consumer: Consumer, partitions: list[KafkaTopicPartition]) -> None:
        log.info("revoked %s", [tp.partition for tp in partitions])

    def _commit_published(self, consumer: Consumer) -> None:
        """Commit the offsets of versions the publisher has made durable (and nothing further)."""
        latest: dict[int, int] | None = None
        while True:
            try:
                latest = self.commit_queue.get_nowait()
            except queue.Empty:
                break
        if latest is None:
            return
        # only the newest durable version's offsets matter; older ones queued behind it are stale
        tps = [KafkaTopicPartition(self.kafka.topic, p, o) for p, o in sorted(latest.items())]
        try:
            consumer.commit(offsets=tps, asynchronous=False)
            self.metrics.offsets_committed.inc()
        except KafkaException as err:
            # harmless for correctness: restart seeks to the manifest's offsets, not to the commit
            log.warning("offset commit failed (%s); the manifest keeps the true position", err)

    def _export_lag(self, consumer: Consumer) -> None:
        now = time.monotonic()
        if now - self._last_lag < LAG_INTERVAL_S:
            return
        self._last_lag = now
        try:
            for tp in consumer.position(consumer.assignment()):
                _low, high = consumer.get_watermark_offsets(tp, timeout=1.0)
                if tp.offset >= 0 and high >= 0:
                    self.metrics.consumer_lag.labels(partition=str(tp.partition)).set(
                        max(high - tp.offset, 0)
                    )
        except KafkaException as err:
            log.debug("lag not available: %s", err)

    def _on_error(self, err: KafkaError) -> None:
        if err.fatal():
            raise KafkaException(err)
        log.warning("kafka: %s", err)
