"""The pipeline end to end on the real broker (Tansu or Kafka): acceptance 3 and 5 of issue 4."""

from __future__ import annotations

import json
import time

import pytest
import torch
from confluent_kafka import Consumer

from stream_learner.core.events import (
    HEADER_OFFSET,
    HEADER_PARTITION,
    HEADER_REASON,
    HEADER_TOPIC,
    encode_event,
)
from stream_learner.service.app import Learner
from stream_learner.service.producer import produce_lines
from stream_learner.service.topics import ensure_topics
from stream_learner.service.versions import list_versions, read_latest
from stream_learner.tools.datasets import malformed_events
from tests.support.factories import small_settings, tiny_rows

PARTITIONS = 2


def learner_settings(bootstrap: str, topic: str, storage_url: str, make=small_settings, **publish):
    """An in-process learner's settings on ``topic``: the tiny model (``make=pretrained_settings`` for the
    1-layer MiniLM, where a test asserts learning)."""
    return make(
        kafka={
            "bootstrap_servers": bootstrap,
            "topic": topic,
            "group_id": f"{topic}-group",
            "session_timeout_ms": 6000,
            "topic_partitions": PARTITIONS,
            "poll_max_messages": 50,
        },
        publish={"storage_url": storage_url, "every_steps": 3, "every_seconds": 3600, **publish},
    )


def produce_events(settings, values_by_partition: dict[int, list[bytes]]) -> None:
    for partition, values in values_by_partition.items():
        produce_lines(settings.kafka.librdkafka(), settings.kafka.topic, values, partition=partition)


def handled(learner: Learner) -> float:
    m = learner.metrics
    dead = sum(
        s.value
        for metric in m.events_dead_lettered.collect()
        for s in metric.samples
        if s.name.endswith("_total")
    )
    return m.value("stream_learner_events_trained_total") + dead


def read_topic(bootstrap: str, topic: str, expect: int, timeout: float = 60) -> list:
    c = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"reader-{topic}-{time.time()}",
            "auto.offset.reset": "earliest",
            "session.timeout.ms": 6000,
            "enable.auto.commit": False,
        }
    )
    c.subscribe([topic])
    got, deadline = [], time.monotonic() + timeout
    while len(got) < expect and time.monotonic() < deadline:
        got += [m for m in c.consume(100, 1.0) if m.error() is None]
    # read a little longer: more records than expected would be a failure too
    got += [m for m in c.consume(100, 2.0) if m.error() is None]
    c.close()
    return got


def test_valid_events_trained_malformed_dead_lettered_offsets_at_end(kafka_bootstrap, unique_topic, tmp_path):
    topic = unique_topic()
    s = learner_settings(kafka_bootstrap, topic, tmp_path.as_uri())
    ensure_topics(s.kafka.librdkafka(), {topic: PARTITIONS, s.kafka.dead_letter_topic: PARTITIONS})
    rows = tiny_rows(48)
    bad = malformed_events(s.events.max_text_bytes)
    by_partition: dict[int, list[bytes]] = {0: [], 1: []}
    for i, r in enumerate(rows):
        by_partition[i % 2].append(encode_event(r["text"], r["label"], id=r["id"]))
        if i % 4 == 3 and bad:  # malformed events interleaved with the valid ones, on both partitions
            by_partition[i % 2].append(bad.pop()[1])
    for _, value in bad:
        by_partition[1].append(value)
    expected_bad = {v: reason for reason, v in malformed_events(s.events.max_text_bytes)}
    produce_events(s, by_partition)
    total = sum(len(v) for v in by_partition.values())

    learner = Learner(s).start()
    try:
        assert learner.wait_until(lambda: handled(learner) >= total, timeout=180)
    finally:
        learner.stop()
    assert learner.error is None

    # exactly M dead-letter records, each with its reason and source
    dlq = read_topic(kafka_bootstrap, s.kafka.dead_letter_topic, expect=len(expected_bad))
    assert len(dlq) == len(expected_bad)
    for m in dlq:
        h = dict(m.headers())
        assert h[HEADER_REASON].decode() == expected_bad[m.value()].value
        assert h[HEADER_TOPIC].decode() == topic
        assert int(h[HEADER_PARTITION]) in (0, 1) and int(h[HEADER_OFFSET]) >= 0
    # N events trained, and the last manifest covers every partition to its end
    assert learner.metrics.value("stream_learner_events_trained_total") == len(rows)
    # the suite runs fp32 (tests/conftest.py): exported as the one precision in use
    assert learner.metrics.value("stream_learner_training_precision", {"precision": "fp32"}) == 1
    assert learner.metrics.value("stream_learner_training_precision", {"precision": "bf16"}) == 0
    manifests = list_versions(learner.store)
    assert len(manifests) >= 2
    last = manifests[-1]
    assert read_latest(learner.store)[0] == last["version"]
    assert last["events_trained"] == len(rows)
    assert last["offsets"] == {topic: {str(p): len(v) for p, v in by_partition.items()}}
    # the chain of versions is a lineage: each names its parent
    assert [m["parent"] for m in manifests] == [None, *[m["version"] for m in manifests[:-1]]]

    # the newest version loads with plain transformers and predicts
    from transformers import pipeline

    classify = pipeline("text-classification", model=str(tmp_path / f"versions/{last['version']:06d}"))
    assert classify("What a wonderful, moving film.")[0]["label"] in ("neg", "pos")


def test_restart_resumes_from_latest_without_retraining(kafka_bootstrap, unique_topic, tmp_path):
    topic = unique_topic()
    s = learner_settings(kafka_bootstrap, topic, tmp_path.as_uri())
    ensure_topics(s.kafka.librdkafka(), {topic: PARTITIONS, s.kafka.dead_letter_topic: PARTITIONS})
    rows = tiny_rows(80)
    first = {
        0: [encode_event(r["text"], r["label"]) for r in rows[0:40:2]],
        1: [encode_event(r["text"], r["label"]) for r in rows[1:40:2]],
    }
    produce_events(s, first)

    a = Learner(s).start()
    try:
        assert a.wait_until(lambda: handled(a) >= 40, timeout=180)
    finally:
        a.stop()
    assert a.error is None
    version_a = read_latest(a.store)[0]

    b = Learner(s).start()
    try:
        # resumed from LATEST: same weights, optimizer state, replay contents, counters and offsets
        assert b.restored_version == version_a
        tb, ta = b.trainer, a.trainer
        for k, v in ta.engine.model.state_dict().items():
            assert torch.equal(tb.engine.model.state_dict()[k], v), k
        sa, sb = ta.engine.optimizer.state_dict()["state"], tb.engine.optimizer.state_dict()["state"]
        assert sa.keys() == sb.keys()
        for i in sa:
            assert torch.equal(sa[i]["exp_avg"], sb[i]["exp_avg"]) and torch.equal(
                sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"]
            )
        arrays_a, meta_a = ta.replay.state_dict()
        arrays_b, meta_b = tb.replay.state_dict()
        assert meta_a == meta_b and arrays_a.keys() == arrays_b.keys()
        assert all((arrays_a[k] == arrays_b[k]).all() for k in arrays_a)
        assert tb.counters == ta.counters and tb.ledger.covered == {0: 20, 1: 20}
        # and the drift signals carry on where they were, not warmed up again
        assert ta.drift is not None and tb.drift is not None
        assert tb.drift.monitor.events_seen == ta.drift.monitor.events_seen == 40
        assert tb.drift.state_dict()[1] == json.loads(json.dumps(ta.drift.state_dict()[1]))

        second = {
            0: [encode_event(r["text"], r["label"]) for r in rows[40::2]],
            1: [encode_event(r["text"], r["label"]) for r in rows[41::2]],
        }
        produce_events(s, second)
        assert b.wait_until(lambda: handled(b) >= 40, timeout=180)
        time.sleep(1.0)  # had it re-read covered events, it would train more than 40
    finally:
        b.stop()
    assert b.error is None
    assert b.metrics.value("stream_learner_events_trained_total") == 40
    last = list_versions(b.store)[-1]
    assert last["events_trained"] == 80
    assert last["offsets"][topic] == {"0": 40, "1": 40}
    assert last["parent"] is not None and last["version"] > version_a


def test_readyz_and_metrics_endpoint(kafka_bootstrap, unique_topic, tmp_path):
    import urllib.request

    topic = unique_topic()
    s = learner_settings(kafka_bootstrap, topic, tmp_path.as_uri())
    s = s.model_copy(
        update={"http": s.http.model_copy(update={"enabled": True, "host": "127.0.0.1", "port": 0})}
    )
    learner = Learner(s).start()
    try:
        url = f"http://127.0.0.1:{learner.http_port}"
        assert learner.wait_until(lambda: learner.ready, timeout=60)
        assert urllib.request.urlopen(url + "/readyz").status == 200
        assert urllib.request.urlopen(url + "/healthz").status == 200
        body = urllib.request.urlopen(url + "/metrics").read().decode()
        for name in (
            "stream_learner_events_consumed_total",
            "stream_learner_steps_total",
            "stream_learner_prequential_accuracy",
            "stream_learner_publish_seconds_bucket",
        ):
            assert name in body
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(url + "/anything-else")
    finally:
        learner.stop()


def test_backpressure_pauses_and_resumes_without_losing_events(kafka_bootstrap, unique_topic, tmp_path):
    """A queue of one small batch: the consumer must pause, resume, and still deliver every event once."""
    topic = unique_topic()
    s = learner_settings(kafka_bootstrap, topic, tmp_path.as_uri())
    s = s.model_copy(
        update={
            "kafka": s.kafka.model_copy(update={"queue_max_batches": 1, "poll_max_messages": 5}),
            "training": s.training.model_copy(update={"fresh_per_step": 2, "replay_per_step": 2}),
        }
    )
    ensure_topics(s.kafka.librdkafka(), {topic: PARTITIONS, s.kafka.dead_letter_topic: PARTITIONS})
    rows = tiny_rows(120)
    produce_events(s, {0: [encode_event(r["text"], r["label"]) for r in rows]})
    learner = Learner(s).start()
    try:
        assert learner.wait_until(lambda: handled(learner) >= len(rows), timeout=180)
    finally:
        learner.stop()
    assert learner.error is None
    m = learner.metrics
    assert m.value("stream_learner_consumer_pauses_total") > 0
    assert m.value("stream_learner_events_trained_total") == len(rows)
    assert list_versions(learner.store)[-1]["offsets"][topic] == {"0": len(rows)}
