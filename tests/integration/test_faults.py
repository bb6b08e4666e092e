"""The learner rides out a broker restart and an object-store outage without losing an event (issue 5)."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest

from stream_learner.service.app import Learner
from stream_learner.service.publisher import load_version
from stream_learner.service.topics import ensure_topics
from stream_learner.service.versions import read_latest, read_manifest
from stream_learner.tools.local_broker import LocalBroker, tansu_s3_env
from tests.integration.test_lineage import NO_OFFSET, PARTITIONS, events, produce
from tests.integration.test_pipeline import handled, learner_settings
from tests.support.learner_process import assert_exact_lineage, committed_offsets


def s3_publish(s3_server, bucket: str, prefix: str) -> dict:
    return {
        "storage_url": f"s3://{bucket}/{prefix}",
        "s3_endpoint_url": s3_server.endpoint_url,
        "s3_access_key_id": s3_server.access_key_id,
        "s3_secret_access_key": s3_server.secret_access_key,
        "s3_region": s3_server.region,
        "keep_versions": 0,
    }


@pytest.mark.slow(waits=True, seconds=19)
def test_broker_killed_and_restarted_mid_run(s3_server, s3_bucket, unique_topic, tmp_path):
    """Tansu on s3:// storage (its data survives) is SIGKILLed and restarted while the learner runs."""
    broker_bucket = s3_server.make_bucket(f"tansu-{uuid.uuid4().hex[:12]}")
    env = tansu_s3_env(s3_server.endpoint_url, s3_server.access_key_id, s3_server.secret_access_key)
    broker = LocalBroker(storage_url=f"s3://{broker_bucket}/", env=env, log_path=tmp_path / "tansu.log")
    topic = unique_topic("broker-restart")
    valid: dict[int, list[bool]] = {}
    with broker.start():
        s = learner_settings(broker.bootstrap_servers, topic, (tmp_path / "store").as_uri(), every_steps=4)
        ensure_topics(s.kafka.librdkafka(), {topic: PARTITIONS, s.kafka.dead_letter_topic: PARTITIONS})
        produce(broker.bootstrap_servers, topic, events(80, bad_every=10), valid)
        learner = Learner(s).start()
        try:
            assert learner.wait_until(lambda: handled(learner) >= 80, timeout=120)
            broker.kill()
            time.sleep(3)  # the learner keeps running with no broker: reconnect attempts, no crash
            assert learner.healthy
            broker.start()
            produce(broker.bootstrap_servers, topic, events(80, bad_every=10, start=80), valid)
            assert learner.wait_until(lambda: handled(learner) >= 160, timeout=180), handled(learner)
        finally:
            learner.stop()
        assert learner.error is None
        assert_exact_lineage(learner.store, topic, valid)
        committed = committed_offsets(broker.bootstrap_servers, s.kafka.group_id, topic, PARTITIONS)
    latest = read_manifest(learner.store, read_latest(learner.store)[0])
    assert committed == {int(p): o for p, o in latest["offsets"][topic].items()}


@pytest.mark.slow(waits=True, seconds=14)
def test_object_store_outage_degrades_then_recovers(kafka_bootstrap, s3_server, s3_bucket, unique_topic):
    """S3 stops mid-run: training goes on, /readyz degraded, commits never pass the last durable version."""
    topic = unique_topic("s3-outage")
    publish = s3_publish(s3_server, s3_bucket, "outage")
    url = publish.pop("storage_url")
    s = learner_settings(kafka_bootstrap, topic, url, **publish, every_steps=3)
    ensure_topics(s.kafka.librdkafka(), {topic: PARTITIONS, s.kafka.dead_letter_topic: PARTITIONS})
    valid: dict[int, list[bool]] = {}
    produce(kafka_bootstrap, topic, events(60, bad_every=10), valid)
    learner = Learner(s).start()
    m = learner.metrics
    try:
        published = lambda: read_latest(learner.store)[0] is not None  # noqa: E731
        assert learner.wait_until(lambda: handled(learner) >= 60 and published(), timeout=120)
        assert learner.wait_until(lambda: learner.ready, timeout=30)

        s3_server.stop()
        outage_at = time.monotonic()
        produce(kafka_bootstrap, topic, events(60, bad_every=10, start=60), valid)
        assert learner.wait_until(lambda: m.value("stream_learner_publish_failures_total") > 0, timeout=60)
        assert learner.wait_until(lambda: not learner.ready, timeout=10)
        assert learner.readiness()[1].startswith("degraded")
        assert m.value("stream_learner_publish_degraded") == 1
        # training goes on: the 60 new events are learned while storage is down
        assert learner.wait_until(lambda: handled(learner) >= 120, timeout=120)
        # nothing can become durable now: Kafka must not hear of anything past the last durable version
        durable_version = learner.publisher.latest
        committed_in_outage = committed_offsets(kafka_bootstrap, s.kafka.group_id, topic, PARTITIONS)
        assert time.monotonic() - outage_at < 200

        s3_server.start()
        recovered = lambda: m.value("stream_learner_publish_degraded") == 0  # noqa: E731
        newer = lambda: learner.publisher.latest > durable_version  # noqa: E731
        assert learner.wait_until(lambda: recovered() and newer(), timeout=90)
        assert learner.wait_until(lambda: learner.ready, timeout=30)
    finally:
        if not s3_server.running:
            s3_server.start()
        learner.stop()
    assert learner.error is None
    store = learner.store
    durable = read_manifest(store, durable_version)["offsets"][topic]
    assert committed_in_outage == {p: durable.get(str(p), NO_OFFSET) for p in range(PARTITIONS)}
    latest, _ = read_latest(store)
    # LATEST names a complete, intact version
    load_version(store, latest, Path(learner._workdir.name) / "check")
    assert_exact_lineage(store, topic, valid)
