"""The dead-letter topic: every record that is not a valid event goes there with its reason, and none
is passed over unacknowledged.

For each poll the consumer thread calls, in this order:

1. :meth:`DeadLetters.send` for each invalid record: the original value (cut to
   ``DEAD_LETTER_MAX_VALUE_BYTES``), key and headers, plus headers naming the reason, the source
   topic, partition and offset (``events.dead_letter_headers``);
2. :meth:`DeadLetters.acknowledge`: wait until the broker has acknowledged every one of them;
3. only then may the poll's records be buffered for the trainer — their offsets are eventually
   claimed by a version, and an offset may be claimed only once its record was trained or
   dead-lettered.

While the dead-letter topic is unavailable (deleted, no permission, broker trouble) step 2 retries
with backoff (0.5 s doubling to 10 s), counting failures (``dead_letter_failures``): the consumer
pauses every partition for the outage and keeps polling, so it keeps its group membership
(``on_outage_start``, ``keep_alive``, ``on_outage_end``: the consumer's side). A record the broker
refuses as too large is sent again cut to ``DEAD_LETTER_CUT_VALUE_BYTES``. A stop ends the wait:
:meth:`acknowledge` returns False and the poll is left unread (read again after a restart).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from confluent_kafka import KafkaError, Message, Producer

from stream_learner.core.events import (
    DEAD_LETTER_CUT_VALUE_BYTES,
    DEAD_LETTER_MAX_VALUE_BYTES,
    HEADER_TRUNCATED,
    InvalidEvent,
    dead_letter_headers,
)
from stream_learner.service.metrics import Metrics

log = logging.getLogger(__name__)

FLUSH_SLICE_S = 0.5  # the wait checks for a stop this often
MAX_RETRY_DELAY_S = 10.0


class DeadLetters:
    """Sends invalid records to ``topic`` through ``producer`` and waits for their acknowledgement.

    Parameters
    ----------
    producer
        The consumer thread's producer (``acks=all``; used from that thread only).
    topic
        ``kafka.dlq_topic``.
    closing
        True once the learner is stopping: every wait ends.
    on_outage_start, on_outage_end
        Called when the topic becomes unavailable and available again (the consumer pauses and
        resumes its partitions).
    keep_alive
        ``keep_alive(seconds)`` polls the paused consumer for that long; False on a stop.
    """

    def __init__(
        self,
        producer: Producer,
        topic: str,
        metrics: Metrics,
        closing: Callable[[], bool],
        on_outage_start: Callable[[], None],
        on_outage_end: Callable[[], None],
        keep_alive: Callable[[float], bool],
    ) -> None:
        self.producer, self.topic, self.metrics, self.closing = producer, topic, metrics, closing
        self.on_outage_start, self.on_outage_end, self.keep_alive = on_outage_start, on_outage_end, keep_alive
        self.outage = False  # the topic is unavailable: every partition is paused
        self._failures: list[tuple[Message, InvalidEvent, KafkaError]] = []

    def send(self, m: Message, err: InvalidEvent, cut: bool = False) -> None:
        """Step 1: queue one dead-letter record; ``cut``: the value is cut to fit (it was too large)."""
        headers = dead_letter_headers(m.headers(), err, m.topic(), m.partition(), m.offset())
        value = m.value()
        limit = DEAD_LETTER_CUT_VALUE_BYTES if cut else DEAD_LETTER_MAX_VALUE_BYTES
        if value is not None and len(value) > limit:
            headers.append((HEADER_TRUNCATED, str(len(value)).encode()))
            value = value[:limit]

        def on_delivery(error: KafkaError | None, _msg: Message) -> None:
            if error is not None:
                self._failures.append((m, err, error))

        while True:
            try:
                self.producer.produce(
                    self.topic, value=value, key=m.key(), headers=headers, on_delivery=on_delivery
                )
                return
            except BufferError:  # the producer's local queue is full: let it deliver some first
                self.producer.poll(0.1)

    def acknowledge(self) -> bool:
        """Step 2: wait until every queued dead letter is acknowledged; False if the learner stops first."""
        delay = 0.5
        while True:
            while len(self.producer) and not self.closing():
                self.producer.flush(FLUSH_SLICE_S)
                if self.outage:
                    self.keep_alive(0)
            if self.closing():
                return False
            failed, self._failures = self._failures, []
            if not failed:
                if self.outage:
                    self.outage = False
                    log.info("dead-letter topic %s available again", self.topic)
                    self.on_outage_end()
                return True
            self.metrics.dead_letter_failures.inc(len(failed))
            log.warning(
                "dead-letter topic %s unavailable (%s): %d records to retry in %.1fs",
                self.topic,
                failed[0][2],
                len(failed),
                delay,
            )
            if not self.outage:
                self.outage = True
                self.on_outage_start()
            if not self.keep_alive(delay):
                return False
            delay = min(delay * 2, MAX_RETRY_DELAY_S)
            for m, err, error in failed:
                self.send(m, err, cut=error.code() == KafkaError.MSG_SIZE_TOO_LARGE)
