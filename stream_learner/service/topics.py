"""The learner's topics: created explicitly with a known partition count, or required to exist.

Relying on broker-side auto-creation gives whatever the broker's default is (Tansu: 4 partitions,
Kafka: ``num.partitions``), and the partition count fixes how offsets are recorded in every published
version, so the learner creates its topics itself (:func:`ensure_topics`), or, with
``kafka.create_topics=false``, checks at start that they exist (:func:`require_topics`).

Every function here first waits, at most :data:`CONNECT_TIMEOUT_S`, for a broker to answer, and
raises :class:`BrokerUnreachable` in plain words otherwise (what was tried, the client's last error and
which setting to check), not librdkafka's "Failed while waiting for controller" half a minute later.
"""

from __future__ import annotations

import logging
import re
import time
from concurrent.futures import TimeoutError as FutureTimeout

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, ClusterMetadata, NewTopic

from stream_learner.core.config import ENV_PREFIX, ConfigError

log = logging.getLogger(__name__)

#: Longest start-up waits for a broker to answer before it says it cannot reach one. librdkafka retries
#: a refused connection with a backoff growing to ``reconnect.backoff.max.ms`` (10 s): in 10 s it has
#: tried several times, and a broker that is merely restarting is back.
CONNECT_TIMEOUT_S = 10.0

_SERVERS_SETTING = f"kafka.bootstrap_servers ({ENV_PREFIX}KAFKA__BOOTSTRAP_SERVERS)"


class BrokerUnreachable(RuntimeError):
    """No broker of ``bootstrap.servers`` answered in time; the message says what to check."""


class _ClientLog:
    """The ``logger`` of an admin client: librdkafka's lines go to this module's logger.

    While ``quiet`` (the reachability probe) they go at DEBUG: a broker that is down gives a line per
    connection attempt, and the probe reports the last error itself, once. ``error_cb`` keeps that error.
    """

    def __init__(self) -> None:
        self.quiet = True
        self.last_error: KafkaError | None = None

    def log(self, level: int, msg: str, *args: object) -> None:
        log.log(logging.DEBUG if self.quiet else level, msg, *args)

    def error_cb(self, err: KafkaError) -> None:
        # "1/1 brokers are down" says less than the connection error before it
        if err.code() != KafkaError._ALL_BROKERS_DOWN or self.last_error is None:
            self.last_error = err


def _admin(client_config: dict[str, str]) -> tuple[AdminClient, _ClientLog]:
    conf: dict = dict(client_config)
    client_log = _ClientLog()
    # librdkafka's own log lines (e.g. connection refused) go to Python logging, not raw to stderr
    conf.setdefault("logger", client_log)
    conf.setdefault("error_cb", client_log.error_cb)
    return AdminClient(conf), client_log


def _plain(err: KafkaError) -> str:
    """librdkafka's error without the broker-name prefix and the state suffix.

    >>> _plain(KafkaError(KafkaError._TRANSPORT, "127.0.0.1:1/bootstrap: Connect to ipv4#127.0.0.1:1 "
    ...     "failed: Connection refused (after 0ms in state CONNECT, 3 identical error(s) suppressed)"))
    'Connect to ipv4#127.0.0.1:1 failed: Connection refused'
    """
    text = re.sub(r"^\S+/(?:bootstrap|\d+): ", "", err.str())
    return re.sub(r" \(after \d+ms in state .*\)$", "", text)


def _reachable_metadata(
    admin: AdminClient, client_log: _ClientLog, servers: str, timeout_s: float, purpose: str
) -> ClusterMetadata:
    """The cluster's metadata (all topics) once a broker answers; else :class:`BrokerUnreachable`."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            # all topics, never list_topics(topic=...): naming a topic in a metadata request can create it
            md = admin.list_topics(timeout=max(min(1.0, deadline - time.monotonic()), 0.05))
        except KafkaException:
            admin.poll(0)  # serves error_cb and the log lines
            if time.monotonic() < deadline:
                continue
            why = f" ({_plain(client_log.last_error)})" if client_log.last_error is not None else ""
            raise BrokerUnreachable(
                f"cannot reach the Kafka broker at {servers} within {timeout_s:g} s {purpose}{why}: check "
                f"{_SERVERS_SETTING}, that the broker is up and reachable from here, and kafka.client_config "
                "for TLS/SASL"
            ) from None
        client_log.quiet = False
        return md


def ensure_topics(
    client_config: dict[str, str],
    topics: dict[str, int],
    timeout_s: float = 30,
    replication_factor: int = 1,
    connect_timeout_s: float = CONNECT_TIMEOUT_S,
) -> None:
    """Create each topic in ``topics`` (name → partition count) unless it exists.

    ``client_config`` is a librdkafka configuration (``bootstrap.servers`` plus any security settings).
    An existing topic is left as it is, whatever its partition count (a warning is logged when it
    differs). Returns once every topic is visible in the cluster metadata. No broker answering within
    ``min(timeout_s, connect_timeout_s)`` raises :class:`BrokerUnreachable`; any other failure raises
    :class:`RuntimeError` naming the topic and the broker's error. ``replication_factor=-1`` takes the
    broker's default.
    """
    if not topics:
        return
    servers = client_config.get("bootstrap.servers", "?")
    admin, client_log = _admin(client_config)
    md = _reachable_metadata(
        admin, client_log, servers, min(timeout_s, connect_timeout_s), f"to create topics {sorted(topics)}"
    )
    # creating only what is missing: a principal allowed to use its topics need not be allowed to create
    missing = {name: n for name, n in topics.items() if name not in md.topics}
    new = [
        NewTopic(name, num_partitions=n, replication_factor=replication_factor) for name, n in missing.items()
    ]
    try:
        futures = (
            admin.create_topics(new, operation_timeout=timeout_s, request_timeout=timeout_s) if new else {}
        )
    except KafkaException as err:
        raise RuntimeError(f"creating topics {sorted(missing)} on {servers}: {err}") from err
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


def require_topics(
    client_config: dict[str, str], topics: dict[str, str], connect_timeout_s: float = CONNECT_TIMEOUT_S
) -> None:
    """Check that each topic in ``topics`` (name → the setting that names it) exists.

    For ``kafka.create_topics=false``: a missing input topic would leave the learner waiting for ever,
    and a missing dead-letter topic would only show at the first bad event, while /readyz said ready.
    A missing topic raises :class:`~stream_learner.core.config.ConfigError` naming its setting;
    no broker answering raises :class:`BrokerUnreachable`.
    """
    if not topics:
        return
    servers = client_config.get("bootstrap.servers", "?")
    admin, client_log = _admin(client_config)
    md = _reachable_metadata(
        admin, client_log, servers, connect_timeout_s, f"to look up topics {sorted(topics)}"
    )
    missing = {name: setting for name, setting in topics.items() if name not in md.topics}
    if missing:
        names = ", ".join(repr(n) for n in missing)
        settings = " / ".join(dict.fromkeys(missing.values()))
        verb = "does" if len(missing) == 1 else "do"
        raise ConfigError(
            f"{settings}: topic {names} {verb} not exist on {servers} (or this client may not describe it), "
            "and kafka.create_topics is false: create it with the partitions of kafka.topic, or set "
            f"kafka.create_topics=true ({ENV_PREFIX}KAFKA__CREATE_TOPICS)"
        )


def _wait_visible(admin: AdminClient, topics: dict[str, int], servers: str, timeout_s: float) -> None:
    """Wait until every topic shows in the metadata: creation propagates asynchronously in Kafka."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            md = admin.list_topics(timeout=max(min(5.0, deadline - time.monotonic()), 0.1))
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
    admin, client_log = _admin(client_config)
    md = _reachable_metadata(admin, client_log, servers, timeout_s, f"to count the partitions of {topic!r}")
    t = md.topics.get(topic)
    if t is None:
        raise RuntimeError(f"topic {topic!r} does not exist on {servers}")
    if t.error is not None:
        raise RuntimeError(f"topic {topic!r} on {servers}: {t.error.str()}")
    return len(t.partitions)
