"""The intake on the real broker: records that once stopped the learner, fairness under a backlog, and a
stop during a dead-letter outage (issue 15, acceptance 2 and 3)."""

from __future__ import annotations

import queue
import threading
import time

import orjson
import pytest
from confluent_kafka import Producer

from stream_learner.core.events import HEADER_DETAIL, HEADER_REASON, Reason, encode_event
from stream_learner.service.app import Learner
from stream_learner.service.consumer import EventConsumer
from stream_learner.service.metrics import Metrics
from stream_learner.service.topics import ensure_topics
from stream_learner.service.versions import list_versions
from tests.integration.test_hostile import dead_lettered, produce_hostile, start_in_dead_letter_outage
from tests.integration.test_pipeline import PARTITIONS, handled, learner_settings, read_topic
from tests.support.factories import tiny_rows, tokenizer

# the record that stopped the learner on every restart: ≈ 2 KB, 1,000 levels, a field name as a string
POISON_NESTED = (
    '{"text": "label", "label": "pos", "x": ' + '{"label": ' * 1_000 + '"x"' + "}" * 1_001
).encode()
ESCAPED_DUPLICATE = b'{"label":"neg","text":"x","\\u006cabel":"pos"}'
# a lone surrogate: valid JSON grammar that makes the fast tokenizer raise (validation catches it first)
TOKENIZER_RAISES = b'{"text": "fine until \\ud800 here", "label": "pos"}'


def valid_values(n: int, start: int = 0) -> list[bytes]:
    rows = tiny_rows()
    return [
        encode_event(rows[i % len(rows)]["text"], rows[i % len(rows)]["label"])
        for i in range(start, start + n)
    ]


@pytest.mark.slow(waits=True, seconds=14)
def test_poison_records_are_dead_lettered_the_learner_stays_up_and_restarts_clean(
    kafka_bootstrap, unique_topic, tmp_path
):
    topic = unique_topic("poison")
    s = learner_settings(kafka_bootstrap, topic, tmp_path.as_uri(), every_steps=2)
    ensure_topics(s.kafka.librdkafka(), {topic: PARTITIONS, s.kafka.dead_letter_topic: PARTITIONS})
    poison = [POISON_NESTED, ESCAPED_DUPLICATE, TOKENIZER_RAISES]
    items = [("", v, None) for v in [*poison, *valid_values(100)]]
    produce_hostile(kafka_bootstrap, topic, items)  # round-robin over the partitions

    learner = Learner(s).start()
    try:
        assert learner.wait_until(lambda: handled(learner) >= len(items), timeout=180), handled(learner)
    finally:
        assert learner.stop()
    assert learner.error is None
    assert dead_lettered(learner) == 3
    assert dead_lettered(learner, Reason.NOT_JSON) == 1
    assert dead_lettered(learner, Reason.DUPLICATE_FIELD) == 1
    assert dead_lettered(learner, Reason.BAD_TEXT) == 1
    assert learner.metrics.value("stream_learner_events_trained_total") == 100
    dlq = read_topic(kafka_bootstrap, s.kafka.dead_letter_topic, expect=3)
    assert sorted(m.value() for m in dlq) == sorted(poison)
    assert all(dict(m.headers())[HEADER_DETAIL] for m in dlq)
    assert {dict(m.headers())[HEADER_REASON] for m in dlq} == {b"not_json", b"duplicate_field", b"bad_text"}
    last = list_versions(learner.store)[-1]
    assert last["events_trained"] == 100

    # the restart resumes after them: nothing to read again, nothing dead-lettered twice, no crash
    produce_hostile(kafka_bootstrap, topic, [("", v, None) for v in [POISON_NESTED, *valid_values(10, 100)]])
    again = Learner(s).start()
    try:
        assert again.wait_until(lambda: handled(again) >= 11, timeout=120), handled(again)
        time.sleep(1)
    finally:
        assert again.stop()
    assert again.error is None
    assert (dead_lettered(again), again.metrics.value("stream_learner_events_trained_total")) == (1, 10)
    assert list_versions(again.store)[-1]["events_trained"] == 110


# the bound stated in docs/operations.md: one poll (poll_max_messages) of lead, measured 256 at 256
FAIRNESS_BOUND_POLLS = 2


@pytest.mark.slow(waits=True, seconds=18)
def test_a_backlog_on_three_partitions_advances_every_partition(kafka_bootstrap, unique_topic, tmp_path):
    """20,400 events waiting on 3 partitions, a trainer slower than the fetch: the consumer's positions
    never spread further apart than FAIRNESS_BOUND_POLLS polls (before: one partition ran the whole
    backlog while the others sat still, a spread of 7,552 in the same setting)."""
    topic, partitions, per_partition = unique_topic("fair"), 3, 6_800
    s = learner_settings(kafka_bootstrap, topic, tmp_path.as_uri())
    s = s.model_copy(update={"kafka": s.kafka.model_copy(update={"poll_max_messages": 256})})
    ensure_topics(s.kafka.librdkafka(), {topic: partitions, s.kafka.dead_letter_topic: partitions})
    p = Producer({"bootstrap.servers": kafka_bootstrap, "linger.ms": 20, "batch.num.messages": 2_000})
    value = orjson.dumps({"text": "an event of a backlog", "label": "pos"})
    for i in range(per_partition * partitions):
        while True:
            try:
                p.produce(topic, value, partition=i % partitions)
                break
            except BufferError:
                p.poll(0.1)
    assert p.flush(60) == 0

    fresh, stop = queue.Queue(maxsize=s.kafka.queue_max_batches), threading.Event()
    consumer = EventConsumer(s, tokenizer(), fresh, queue.Queue(), Metrics(), stop)
    thread = threading.Thread(target=consumer.run, daemon=True)
    thread.start()
    spreads, taken = [], 0
    deadline = time.monotonic() + 240
    try:
        while taken < per_partition * partitions and time.monotonic() < deadline:
            try:
                batch = fresh.get(timeout=1)
            except queue.Empty:
                continue
            taken += len(batch.events)
            time.sleep(len(batch.events) / 1_500)  # a trainer slower than the fetch: the backlog stays
            positions = [consumer.position.get(q, 0) for q in range(partitions)]
            if min(positions) < per_partition:  # while every partition still has a backlog
                spreads.append(max(positions) - min(positions))
    finally:
        stop.set()
        consumer.close_event.set()
        thread.join(15)
    assert taken == per_partition * partitions
    assert len(spreads) > 20
    print(f"worst spread {max(spreads)} over {len(spreads)} hand-overs")
    assert max(spreads) <= FAIRNESS_BOUND_POLLS * s.kafka.poll_max_messages, max(spreads)


@pytest.mark.slow(waits=True, seconds=15)
def test_a_stop_during_a_dead_letter_outage_is_prompt_and_loses_nothing(
    kafka_bootstrap, unique_topic, tmp_path, monkeypatch
):
    topic = unique_topic("dlq-stop")
    s = learner_settings(kafka_bootstrap, topic, tmp_path.as_uri(), every_steps=1)
    s = s.model_copy(update={"kafka": s.kafka.model_copy(update={"create_topics": False})})
    ensure_topics(s.kafka.librdkafka(), {topic: PARTITIONS})  # no dead-letter topic: it is "down"
    values = [*valid_values(10), b"not json", *valid_values(10, 10)]
    produce_hostile(kafka_bootstrap, topic, [("", v, None) for v in values])
    learner = start_in_dead_letter_outage(s, monkeypatch)
    try:
        assert learner.healthy
    finally:
        started = time.monotonic()
        stopped = learner.stop(timeout=60)
        took = time.monotonic() - started
    assert stopped and learner.error is None
    assert took < 15, took  # the retry loop honours the stop (it slept on, up to 30 s a flush, before)
    versions = list_versions(learner.store)
    covered = versions[-1]["offsets"][topic] if versions else {}
    bad_at = values.index(b"not json")
    bad_partition, bad_offset = bad_at % PARTITIONS, bad_at // PARTITIONS
    assert covered.get(str(bad_partition), 0) <= bad_offset, covered  # read again after a restart
