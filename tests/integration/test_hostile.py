"""Hostile input through the real broker: fuzzing, and a dead-letter topic that is unavailable (issue 8)."""

from __future__ import annotations

import time

import pytest
from confluent_kafka import Producer

from stream_learner.core.events import (
    HEADER_REASON,
    HEADER_TRUNCATED,
    InvalidEvent,
    LabelSet,
    Reason,
    parse_event,
)
from stream_learner.service.app import Learner
from stream_learner.service.topics import ensure_topics
from stream_learner.service.versions import list_versions
from tests.integration.test_lineage import PARTITIONS, events
from tests.integration.test_pipeline import handled, learner_settings, read_topic
from tests.support.hostile import hostile_events


def produce_hostile(bootstrap: str, topic: str, items) -> None:
    p = Producer({"bootstrap.servers": bootstrap, "acks": "all", "linger.ms": 20})
    errors: list[str] = []
    for i, (_, value, headers) in enumerate(items):
        while True:
            try:
                p.produce(
                    topic,
                    value=value,
                    headers=headers,
                    partition=i % PARTITIONS,
                    on_delivery=lambda e, _m: e and errors.append(str(e)),
                )
                break
            except BufferError:
                p.poll(0.1)
        p.poll(0)
    assert p.flush(120) == 0 and not errors, errors[:3]


def start_in_dead_letter_outage(settings, monkeypatch) -> Learner:
    """A learner whose dead-letter topic is missing, once it has failed to deliver a dead letter.

    The start-up check refuses a missing topic, and deleting one does not make an outage on Tansu (it
    keeps taking writes to a deleted topic from a client that knew it): the check is skipped, as if
    the topic had gone right after it."""
    monkeypatch.setattr("stream_learner.service.app.require_topics", lambda *args, **kwargs: None)
    learner = Learner(settings).start()
    failures = "stream_learner_dead_letter_failures_total"
    try:
        assert learner.wait_until(lambda: learner.metrics.value(failures) > 0, timeout=90)
    except BaseException:
        learner.stop()
        raise
    return learner


def dead_lettered(learner: Learner, reason: Reason | None = None) -> float:
    reasons = list(Reason) if reason is None else [reason]
    name = "stream_learner_events_dead_lettered_total"
    return sum(learner.metrics.value(name, {"reason": r.value}) for r in reasons)


@pytest.mark.slow(seconds=29)
def test_ten_thousand_hostile_events_no_crash_every_one_accounted_for(
    kafka_bootstrap, unique_topic, tmp_path
):
    topic = unique_topic("fuzz")
    s = learner_settings(kafka_bootstrap, topic, tmp_path.as_uri(), every_steps=20)
    s = s.model_copy(update={"kafka": s.kafka.model_copy(update={"poll_max_messages": 500})})
    ensure_topics(s.kafka.librdkafka(), {topic: PARTITIONS, s.kafka.dead_letter_topic: PARTITIONS})
    items = hostile_events(10_000, seed=8)
    labels = LabelSet(s.model.labels)
    verdicts = []
    for _, value, _ in items:
        try:
            parse_event(value, labels, s.events.max_text_bytes)
            verdicts.append("ok")
        except InvalidEvent as err:
            verdicts.append(err.reason.value)
    n_valid, n_bad = verdicts.count("ok"), len(verdicts) - verdicts.count("ok")
    produce_hostile(kafka_bootstrap, topic, items)

    learner = Learner(s).start()
    try:
        assert learner.wait_until(lambda: handled(learner) >= len(items), timeout=300), handled(learner)
        time.sleep(1)
    finally:
        learner.stop()
    assert learner.error is None
    m = learner.metrics
    consumed = m.value("stream_learner_events_consumed_total")
    trained = m.value("stream_learner_events_trained_total")
    assert consumed == len(items) == trained + dead_lettered(learner)
    assert (trained, dead_lettered(learner)) == (n_valid, n_bad)
    for reason in Reason:
        assert dead_lettered(learner, reason) == verdicts.count(reason.value), reason

    dlq = read_topic(kafka_bootstrap, s.kafka.dead_letter_topic, expect=n_bad, timeout=120)
    assert len(dlq) == n_bad
    assert all(dict(d.headers())[HEADER_REASON].decode() in {r.value for r in Reason} for d in dlq)
    cut = [d for d in dlq if HEADER_TRUNCATED in dict(d.headers())]
    assert all(len(d.value()) < int(dict(d.headers())[HEADER_TRUNCATED]) for d in cut)
    # the published lineage has exactly the valid events
    last = list_versions(learner.store)[-1]
    assert last["events_trained"] == n_valid
    assert last["offsets"][topic] == {str(p): len(items[p::PARTITIONS]) for p in range(PARTITIONS)}


@pytest.mark.slow(waits=True, seconds=24)
def test_dead_letter_topic_unavailable_nothing_is_skipped(
    kafka_bootstrap, unique_topic, tmp_path, monkeypatch
):
    topic = unique_topic("dlq-outage")
    s = learner_settings(kafka_bootstrap, topic, tmp_path.as_uri(), every_steps=2)
    s = s.model_copy(update={"kafka": s.kafka.model_copy(update={"create_topics": False})})
    ensure_topics(s.kafka.librdkafka(), {topic: PARTITIONS})  # no dead-letter topic yet: it is "down"
    batch = events(60, bad_every=6)
    produce_hostile(kafka_bootstrap, topic, [("", v, None) for v, _ in batch])
    first_bad = {}
    for i, (_, ok) in enumerate(batch):
        if not ok:
            first_bad.setdefault(i % PARTITIONS, i // PARTITIONS)

    learner = start_in_dead_letter_outage(s, monkeypatch)
    try:
        time.sleep(2)
        # stuck on the batch with the undeliverable dead letters: nothing past them is covered
        assert all(learner.trainer.ledger.covered.get(p, 0) <= first_bad[p] for p in first_bad), (
            learner.trainer.ledger.covered
        )
        assert learner.healthy
        ensure_topics(s.kafka.librdkafka(), {s.kafka.dead_letter_topic: PARTITIONS})  # it comes back
        assert learner.wait_until(lambda: handled(learner) >= len(batch), timeout=120), handled(learner)
    finally:
        learner.stop()
    assert learner.error is None
    n_bad = sum(1 for _, ok in batch if not ok)
    assert len(read_topic(kafka_bootstrap, s.kafka.dead_letter_topic, expect=n_bad)) == n_bad
    last = list_versions(learner.store)[-1]
    assert last["events_trained"] == len(batch) - n_bad
    assert last["offsets"][topic] == {str(p): len(batch[p::PARTITIONS]) for p in range(PARTITIONS)}
