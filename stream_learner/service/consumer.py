"""The consumer thread: Kafka → parse → validate → tokenize → per-partition buffers → a bounded queue
to the trainer.

Offsets are never auto-committed. The published manifest is the source of truth for where each
partition resumes (:meth:`EventConsumer._on_assign` seeks there); Kafka commits only follow a durable
version (they arrive on ``commit_queue`` from the publisher) so that monitoring sees real progress.

Every record passes the per-record barrier (``intake.validate_record``, ``intake.tokenize_records``):
one bad record is dead-lettered with its reason, never a crash. A failure that is not about one record
raises :class:`IntakeFailed` naming the topic, partitions and offsets being processed.

Backpressure and fairness (``intake.PartitionBuffers``): records are buffered per partition and handed
to the trainer in turns; a partition whose buffer is full is paused (librdkafka drops what it had
prefetched for it) and resumed once its buffer has drained to half. When the trainer is slow every
buffer fills and every partition pauses; under a backlog the fetcher must serve the partitions that are
not paused, so none is starved. Memory is bounded by ``queue_max_batches + 3`` polls of events
(``stream_learner.service.limits``).
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time

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

from stream_learner.core.config import Settings
from stream_learner.core.events import (
    InvalidEvent,
    LabeledEvent,
    LabelSet,
    TokenizedEvent,
)
from stream_learner.core.intake import (
    DeadLetterWatch,
    PartitionBuffers,
    Tokenize,
    tokenize_records,
    validate_record,
)
from stream_learner.service.dead_letters import FLUSH_SLICE_S, DeadLetters
from stream_learner.service.limits import PREFETCH_KBYTES
from stream_learner.service.metrics import PREFIX, Metrics

log = logging.getLogger(__name__)

LAG_INTERVAL_S = 5.0
# a partition that delivered nothing for this long while it could fetch is taken to have no backlog:
# the others no longer wait for it (intake.PartitionBuffers)
PARTITION_IDLE_S = 2.0


class IntakeFailed(RuntimeError):
    """The consumer loop failed on something that is not one record's fault; the message says where."""


def describe_messages(msgs: list[Message]) -> str:
    """'topic partition 2 offsets 10–265, partition 0 offset 7' for a list of messages."""
    spans: dict[tuple[str, int], list[int]] = {}
    for m in msgs:
        spans.setdefault((m.topic() or "?", m.partition() or 0), []).append(m.offset() or 0)
    parts = []
    for (topic, partition), offsets in sorted(spans.items()):
        lo, hi = min(offsets), max(offsets)
        parts.append(
            f"{topic} partition {partition} offset{'s' if lo != hi else ''} {lo}"
            + (f"–{hi}" if lo != hi else "")
        )
    return ", ".join(parts) or "no messages"


class EventConsumer:
    """The consumer loop; run :meth:`run` in its own thread.

    Why this class is ≈ 300 lines: it is the only owner of the Kafka client, so everything that
    touches the client lives here — polling, backpressure (pause/resume), routing dead letters
    (``dead_letters.py`` writes them), the commits the publisher hands over, and the rebalance
    callbacks; parsing and tokenizing are in ``core/intake.py``.

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
        self._cut_reported = False  # the first event cut at max_length is logged, the rest counted
        self.fresh_queue, self.commit_queue, self.metrics, self.stop_event = (
            fresh_queue,
            commit_queue,
            metrics,
            stop,
        )
        self.start_offsets = dict(start_offsets or {})
        self.position: dict[int, int] = {}  # next offset after the last message read, per partition
        # ``stop`` closes the intake (no more fetching); ``close_event`` ends the thread after the last
        # commit — two phases, so the final version's offsets are still committed (see app.Learner.stop)
        self.close_event = threading.Event()
        self.assigned = threading.Event()  # set once partitions are assigned (readiness)
        self.buffers = PartitionBuffers(self.kafka.poll_max_messages, lead_limit=self.kafka.poll_max_messages)
        self._fetching_since: dict[int, float] = {}  # last record, assignment or resume, per partition
        self.watch = DeadLetterWatch(
            settings.events.dead_letter_alert_share, settings.events.dead_letter_alert_window
        )
        self.paused: set[int] = set()  # partitions paused because their buffer is full
        self._pending = None  # a batch taken from the buffers that the full queue did not accept
        self.dead_letters: DeadLetters | None = None  # made with the clients, in the thread (run)
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
            # librdkafka's prefetch buffer is part of the memory budget (stream_learner.service.limits): the
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
        self.dead_letters = DeadLetters(
            producer,
            self.kafka.dead_letter_topic,
            self.metrics,
            closing=self._closing,
            on_outage_start=lambda: consumer.pause(consumer.assignment()),
            on_outage_end=lambda: self._end_outage(consumer),
            keep_alive=lambda seconds: self._keep_alive(consumer, seconds),
        )
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
                msgs = consumer.consume(self.kafka.poll_max_messages, self.kafka.poll_timeout_s)
                if msgs:
                    try:
                        self._process(msgs)
                    except Exception as err:
                        raise IntakeFailed(
                            f"the consumer failed while processing {describe_messages(msgs)}: "
                            f"{type(err).__name__}: {err}"
                        ) from err
                self._hand_over(consumer)
                self._balance(consumer)
                self._export_lag(consumer)
        finally:
            self._commit_published(consumer)
            producer.flush(10)
            consumer.close()

    def _count_cut(self, events: list[TokenizedEvent]) -> None:
        """Count the events cut at ``model.max_length``; say it once in the log, with the fix."""
        cut = sum(len(e.input_ids) >= self.tokenize.max_length for e in events)
        if not cut:
            return
        self.metrics.events_at_max_length.inc(cut)
        if not self._cut_reported:
            self._cut_reported = True
            log.warning(
                "events reach model.max_length = %d tokens and are cut there (%d of %d in this poll); "
                "%s_events_at_max_length_total counts them: raise model.max_length, or measure it with "
                "`stream-learner eval --sweep model.max_length=…`",
                self.tokenize.max_length,
                cut,
                len(events),
                PREFIX,
            )

    def _process(self, msgs: list[Message]) -> None:
        """Validate, dead-letter the bad, tokenize the good, buffer them all by partition.

        The dead letters are acknowledged before anything of the poll is buffered; if the intake closes
        first, the whole poll is left unread (its offsets were not passed on: it is read again)."""
        records = []
        for m in msgs:
            if m.error() is not None:
                self._on_error(m.error())
            else:
                records.append(m)
        verdicts: list[LabeledEvent | InvalidEvent | TokenizedEvent] = [
            validate_record(m.value(), self.labels, self.settings.events.max_text_bytes) for m in records
        ]
        valid = [i for i, v in enumerate(verdicts) if isinstance(v, LabeledEvent)]
        tokens = tokenize_records(self.tokenize, [verdicts[i] for i in valid])  # type: ignore[misc]
        for i, token in zip(valid, tokens, strict=True):
            m = records[i]
            verdicts[i] = (
                token
                if isinstance(token, InvalidEvent)
                else TokenizedEvent(
                    input_ids=token[0],
                    label=verdicts[i].label,  # type: ignore[union-attr]
                    pair_start=token[1],
                    partition=m.partition(),
                    offset=m.offset(),
                    timestamp_ms=m.timestamp()[1],
                )
            )
        dead = [(v, m) for v, m in zip(verdicts, records, strict=True) if isinstance(v, InvalidEvent)]
        for err, m in dead:
            self.dead_letters.send(m, err)  # type: ignore[union-attr]
        if dead and not self.dead_letters.acknowledge():  # type: ignore[union-attr]
            return
        for err, _ in dead:
            self.metrics.events_dead_lettered.labels(reason=err.reason.value).inc()
        self.metrics.events_consumed.inc(len(records))
        self._count_cut([v for v in verdicts if isinstance(v, TokenizedEvent)])
        self.watch.observe(
            len(records), [(err, f"{m.topic()}[{m.partition()}]@{m.offset()}") for err, m in dead]
        )
        self.metrics.dead_letter_recent_share.set(self.watch.share)
        now = time.monotonic()
        for v, m in zip(verdicts, records, strict=True):
            self.buffers.add(m.partition(), m.offset(), v if isinstance(v, TokenizedEvent) else None)
            self.position[m.partition()] = m.offset() + 1
            self._fetching_since[m.partition()] = now

    def _hand_over(self, consumer: Consumer) -> None:
        """Queue batches taken in turns from the partitions' buffers until the queue is full."""
        now = time.monotonic()
        waiting = {
            tp.partition
            for tp in consumer.assignment()
            if tp.partition in self.paused
            or self.buffers.buffered(tp.partition)
            or now - self._fetching_since.get(tp.partition, now) < PARTITION_IDLE_S
        }
        while True:
            if self._pending is None:
                self._pending = self.buffers.take(self.kafka.poll_max_messages, waiting)
                if self._pending is None:
                    break
            try:
                self.fresh_queue.put_nowait(self._pending)
            except queue.Full:
                break
            self._pending = None
        self.metrics.queue_depth.set(self.fresh_queue.qsize())

    def _balance(self, consumer: Consumer) -> None:
        """Pause the partitions whose buffer is full, resume those drained to half (see module doc)."""
        assigned = {tp.partition for tp in consumer.assignment()}
        # the buffers together hold about one poll: a share of it each
        self.buffers.capacity = max(1, math.ceil(self.kafka.poll_max_messages / max(len(assigned), 1)))
        full = [p for p in self.buffers.full() if p in assigned and p not in self.paused]
        drained = [p for p in self.buffers.drained() if p in self.paused]
        if full:
            consumer.pause([KafkaTopicPartition(self.kafka.topic, p) for p in full])
            self.paused.update(full)
            self.metrics.consumer_pauses.inc(len(full))
        if drained:
            self.paused.difference_update(drained)
            now = time.monotonic()
            self._fetching_since.update(dict.fromkeys(drained, now))
            if not self._outage:
                consumer.resume([KafkaTopicPartition(self.kafka.topic, p) for p in drained if p in assigned])
            self.metrics.consumer_resumes.inc(len(drained))
        self.metrics.consumer_paused.set(len(self.paused & assigned))

    # ----------------------------------------------------------------------- the dead-letter outage
    def _closing(self) -> bool:
        return self.stop_event.is_set() or self.close_event.is_set()

    @property
    def _outage(self) -> bool:
        """The dead-letter topic is unavailable: every partition stays paused (``dead_letters.py``)."""
        return self.dead_letters is not None and self.dead_letters.outage

    def _keep_alive(self, consumer: Consumer, seconds: float) -> bool:
        """Poll the paused consumer for ``seconds`` (group membership, rebalances); False on a stop.

        A message can still arrive from a partition assigned meanwhile: it is sought back, to be read
        again after the outage."""
        deadline = time.monotonic() + seconds
        while True:
            left = deadline - time.monotonic()
            for m in consumer.consume(self.kafka.poll_max_messages, max(min(left, FLUSH_SLICE_S), 0)):
                if m.error() is None:
                    try:
                        consumer.seek(KafkaTopicPartition(m.topic(), m.partition(), m.offset()))
                    except KafkaException as err:
                        log.debug("seek back of partition %d: %s", m.partition(), err)
            if self._closing():
                return False
            if left <= 0:
                return True

    def _end_outage(self, consumer: Consumer) -> None:
        consumer.resume([tp for tp in consumer.assignment() if tp.partition not in self.paused])

    # ------------------------------------------------------------------------------ offsets and lag
    def _on_assign(self, consumer: Consumer, partitions: list[KafkaTopicPartition]) -> None:
        reset = OFFSET_BEGINNING if self.kafka.auto_offset_reset == "earliest" else OFFSET_END
        for tp in partitions:
            # a partition handed back after a rebalance continues where this consumer left it: its
            # events up to there are with the trainer already. Otherwise: the restored version's
            # offsets, else the reset policy.
            tp.offset = self.position.get(tp.partition, self.start_offsets.get(tp.partition, reset))
        consumer.assign(partitions)
        paused = [tp for tp in partitions if self._outage or tp.partition in self.paused]
        if paused:
            consumer.pause(paused)
        self._fetching_since.update(dict.fromkeys((tp.partition for tp in partitions), time.monotonic()))
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
