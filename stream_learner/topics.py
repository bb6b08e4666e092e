"""Creating the learner's topics explicitly, with a known partition count.

Relying on broker-side auto-creation gives whatever the broker's default is (Tansu: 4 partitions,
Kafka: ``num.partitions``), and the partition count fixes how offsets are recorded in every published
version, so the learner creates its topics itself.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import TimeoutError as FutureTimeout

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, ClusterMetadata, NewTopic

log = logging.getLogger(__name__)


def _admin(client_config: dict[str, str]) -> AdminClient:
    conf: dict = dict(client_config)
    # librdkafka's own log lines (e.g. connection refused) go to Python logging, not raw to stderr
    conf.setdefault("logger", log)
    return AdminClient(conf)


def _metadata(admin: AdminClient, timeout_s: float) -> ClusterMetadata:
    # all topics, never list_topics(topic=...): naming a topic in a metadata request can auto-create it
    return admin.list_topics(timeout=timeout_s)


def ensure_topics(
    client_config: dict[str, str],
    topics: dict[str, int],
    timeout_s: float = 30,
    replication_factor: int = 1,
) -> None:
    """Create each topic in ``topics`` (name → partition count) unless it exists.

    ``client_config`` is a librdkafka configuration (``bootstrap.servers`` plus any security settings).
    An existing topic is left as it is, whatever its partition count (a warning is logged when it
    differs). Returns once every topic is visible in the cluster metadata. Any other failure raises
    :class:`RuntimeError` naming the topic and the broker's error. ``replication_factor=-1`` takes the
    broker's default.
    """
    if not topics:
        return
    servers = client_config.get("bootstrap.servers", "?")
    admin = _admin(client_config)
    new = [
        NewTopic(name, num_partitions=n, replication_factor=replication_factor) for name, n in topics.items()
    ]
    try:
        futures = admin.create_topics(new, operation_timeout=timeout_s, request_timeout=timeout_s)
    except KafkaException as err:
        raise RuntimeError(f"creating topics {sorted(topics)} on {servers}: {err}") from err
    for name, future in futures.items():
        try:
            future.result(timeout=timeout_s + 5)
            log.info("created topic %s (%d partitions)", name, topics[name])
        except KafkaException as err:
            kerr = err.args[0] if err.args and isinstance(err.args[0], KafkaError) else None
            if kerr is not None and kerr.code() == KafkaError.TOPIC_ALREADY_EXISTS:
                continue
            reason = kerr.str() if kerr is not None else str(err)
            raise RuntimeError(
                f"creating topic {name!r} ({topics[name]} partitions) on {servers}: {reason}"
            ) from err
        except FutureTimeout as err:
            raise RuntimeError(
                f"creating topic {name!r} on {servers}: no answer within {timeout_s:g}s"
            ) from err
    _wait_visible(admin, topics, servers, timeout_s)


def _wait_visible(admin: AdminClient, topics: dict[str, int], servers: str, timeout_s: float) -> None:
    """Wait until every topic shows in the metadata: creation propagates asynchronously in Kafka."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            md = _metadata(admin, max(min(5.0, deadline - time.monotonic()), 0.1))
        except KafkaException as err:
            if time.monotonic() >= deadline:
                raise RuntimeError(f"listing topics on {servers}: {err}") from err
            time.sleep(0.1)
            continue
        missing = [t for t in topics if t not in md.topics or md.topics[t].error is not None]
        if not missing:
            break
        if time.monotonic() >= deadline:
            raise RuntimeError(f"topics {missing} not visible on {servers} within {timeout_s:g}s of creation")
        time.sleep(0.1)
    for name, wanted in topics.items():
        have = len(md.topics[name].partitions)
        if have != wanted:
            log.warning("topic %s exists with %d partitions (%d requested); keeping it", name, have, wanted)


def partition_count(client_config: dict[str, str], topic: str, timeout_s: float = 10) -> int:
    """Number of partitions of ``topic``; :class:`RuntimeError` if it does not exist or on failure."""
    servers = client_config.get("bootstrap.servers", "?")
    try:
        md = _metadata(_admin(client_config), timeout_s)
    except KafkaException as err:
        raise RuntimeError(f"listing topics on {servers}: {err}") from err
    t = md.topics.get(topic)
    if t is None:
        raise RuntimeError(f"topic {topic!r} does not exist on {servers}")
    if t.error is not None:
        raise RuntimeError(f"topic {topic!r} on {servers}: {t.error.str()}")
    return len(t.partitions)
