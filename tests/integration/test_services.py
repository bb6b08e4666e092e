"""The local broker and topic creation against real servers: Tansu (memory and S3 storage), SeaweedFS."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from confluent_kafka import Consumer, Message, Producer
from confluent_kafka.admin import AdminClient

from stream_learner.service.topics import ensure_topics, partition_count
from stream_learner.tools.local_broker import LocalBroker, tansu_binary, tansu_s3_env
from tests.support.services import SeaweedS3, free_port

SESSION_TIMEOUT_MS = "6000"  # Tansu's first group join takes about half of it


def produce(bootstrap: str, topic: str, messages: list[tuple[bytes, bytes, list[tuple[str, bytes]]]]) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
    errors: list[str] = []

    def on_delivery(err, _msg) -> None:
        if err is not None:
            errors.append(str(err))

    for key, value, headers in messages:
        producer.produce(topic, value=value, key=key, headers=headers, on_delivery=on_delivery)
    assert producer.flush(30) == 0, "messages still queued after 30 s"
    assert errors == []


def consume(bootstrap: str, topic: str, n: int, group: str, timeout_s: float = 60) -> list[Message]:
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": group,
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "session.timeout.ms": SESSION_TIMEOUT_MS,
        }
    )
    consumer.subscribe([topic])
    got: list[Message] = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(got) < n and time.monotonic() < deadline:
            for msg in consumer.consume(num_messages=n - len(got), timeout=0.5):
                assert msg.error() is None, msg.error()
                got.append(msg)
        if got:
            consumer.commit(asynchronous=False)
    finally:
        consumer.close()
    return got


def test_tansu_binary_is_found() -> None:
    path = tansu_binary()
    assert path.is_file()
    assert path.name.startswith("tansu")


def test_topics_are_created_once_and_carry_messages_with_headers(
    kafka_bootstrap: str, unique_topic: Callable[[str], str]
) -> None:
    topic = unique_topic("events")
    config = {"bootstrap.servers": kafka_bootstrap}
    ensure_topics(config, {topic: 3})
    ensure_topics(config, {topic: 3})  # exists already: fine
    assert partition_count(config, topic) == 3

    sent = [(f"k{i}".encode(), f"v{i}".encode(), [("event-id", f"id-{i}".encode())]) for i in range(20)]
    produce(kafka_bootstrap, topic, sent)
    got = consume(kafka_bootstrap, topic, 20, group=unique_topic("group"))

    assert sorted((m.key(), m.value(), m.headers()) for m in got) == sorted(
        (k, v, [(h, hv) for h, hv in hs]) for k, v, hs in sent
    )
    assert {m.partition() for m in got} <= {0, 1, 2}
    assert len({m.partition() for m in got}) > 1  # keys spread over the partitions


def test_partition_count_of_a_missing_topic_is_an_error(
    kafka_bootstrap: str, unique_topic: Callable[[str], str]
) -> None:
    with pytest.raises(RuntimeError, match="does not exist"):
        partition_count({"bootstrap.servers": kafka_bootstrap}, unique_topic("missing"))


def test_ensure_topics_names_the_topic_when_the_broker_is_unreachable() -> None:
    config = {"bootstrap.servers": f"127.0.0.1:{free_port()}"}
    with pytest.raises(RuntimeError, match="'orders'"):
        ensure_topics(config, {"orders": 1}, timeout_s=1)


def test_local_broker_lifecycle(tmp_path: Path, unique_topic: Callable[[str], str]) -> None:
    log_path = tmp_path / "tansu.log"
    with LocalBroker(log_path=log_path) as broker:
        assert broker.running
        bootstrap, pid = broker.bootstrap_servers, broker.pid
        assert bootstrap.startswith("127.0.0.1:")
        topic = unique_topic("t")
        ensure_topics({"bootstrap.servers": bootstrap}, {topic: 1})

        broker.restart()
        assert broker.bootstrap_servers == bootstrap  # same port: clients can reconnect
        assert broker.pid != pid
        AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=10)

        broker.kill()
        assert not broker.running
        broker.start()
        assert broker.running
    assert not broker.running
    assert broker.pid is None
    assert "listening on" in log_path.read_text()


def test_local_broker_reports_a_failed_start_with_its_log(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        broker = LocalBroker(port=taken.getsockname()[1], log_path=tmp_path / "tansu.log")
        with pytest.raises(RuntimeError, match=r"(?s)exited with code.*Address in use"):
            broker.start(timeout_s=10)
    assert not broker.running


def test_local_broker_on_s3_storage_keeps_messages_across_a_restart(
    s3_server: SeaweedS3, s3_bucket: str, tmp_path: Path, unique_topic: Callable[[str], str]
) -> None:
    env = tansu_s3_env(
        s3_server.endpoint_url, s3_server.access_key_id, s3_server.secret_access_key, s3_server.region
    )
    broker = LocalBroker(storage_url=f"s3://{s3_bucket}/", env=env, log_path=tmp_path / "tansu.log")
    with broker:
        config = {"bootstrap.servers": broker.bootstrap_servers}
        topic = unique_topic("durable")
        ensure_topics(config, {topic: 1})
        produce(broker.bootstrap_servers, topic, [(b"k", b"kept", [("h", b"v")])])

        broker.restart()

        assert partition_count(config, topic) == 1
        got = consume(broker.bootstrap_servers, topic, 1, group=unique_topic("group"))
        assert [(m.key(), m.value(), m.headers()) for m in got] == [(b"k", b"kept", [("h", b"v")])]
    # the broker really wrote to the bucket
    keys = [o["Key"] for o in s3_server.client().list_objects_v2(Bucket=s3_bucket).get("Contents", [])]
    assert any(f"/topics/{topic}/" in k for k in keys), keys
