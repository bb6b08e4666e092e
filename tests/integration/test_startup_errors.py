"""Start-up refuses operator mistakes and names outages, in one line and in bounded time (issue 15).

Each case runs the real ``stream-learner run`` in a child process and checks: the exit status (2: a
setting is wrong, fix the configuration; 1: an outage, a restart may help), exactly one line on stderr,
the setting named in it, and the time it took (each bound below is the measured time plus a margin).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from confluent_kafka import Consumer

from stream_learner.core.config import ENV_PREFIX, ConfigError
from stream_learner.service import logs
from stream_learner.service.logs import KAFKA_CLIENT_LOGGERS, RepeatFilter, install
from stream_learner.service.storage import StoreUnreachable, check_reachable, open_store
from stream_learner.service.topics import CONNECT_TIMEOUT_S, BrokerUnreachable, ensure_topics, require_topics
from tests.support import zygote
from tests.support.services import SeaweedS3, free_port
from tests.support.tiny_model import tiny_model_dir

# measured on a 2-core machine: a refused setting ≈ 0.25 s; an unreachable broker ≈ 12.7 s (the
# CONNECT_TIMEOUT_S of 10 s plus the interpreter and its imports); a missing topic ≈ 3 s; an S3
# endpoint refusing connections ≈ 3.3 s
SETTING_BOUND_S = 10
OUTAGE_BOUND_S = CONNECT_TIMEOUT_S + 20


@dataclass
class Run:
    returncode: int
    stderr_lines: list[str]
    seconds: float

    @property
    def line(self) -> str:
        assert len(self.stderr_lines) == 1, "\n".join(self.stderr_lines)
        return self.stderr_lines[0]


@pytest.fixture
def run_cli(tmp_path: Path) -> Callable[..., Run]:
    """``stream-learner run`` with these STREAM_LEARNER_ variables (and none of the caller's)."""

    def run(*, preloaded: bool = False, **env: str) -> Run:
        """``preloaded``: forked from the session's zygote (tests/support/zygote.py), for mistakes found
        after the learner has imported torch; a setting's mistake is found before, and the bound on
        how soon is only measured in a fresh interpreter."""
        clean = {k: v for k, v in os.environ.items() if not k.upper().startswith(ENV_PREFIX)}
        # the test suite's own variables stay: a learner started by a test inherits them, and must not mind
        clean.update({k: v for k, v in os.environ.items() if k.upper().startswith("STREAM_LEARNER_TEST_")})
        clean.update(
            {
                "STREAM_LEARNER_HTTP__ENABLED": "false",
                "STREAM_LEARNER_PUBLISH__STORAGE_URL": (tmp_path / "models").as_uri(),
                "TMPDIR": str(tmp_path),
                "PYTHONUNBUFFERED": "1",
                **env,
            }
        )
        exe = Path(sys.executable).parent / "stream-learner"
        start = time.monotonic()
        timeout = OUTAGE_BOUND_S + 60
        if preloaded:
            proc = zygote.run([str(exe), "run"], env=clean, timeout=timeout)
        else:
            proc = subprocess.run(
                [str(exe), "run"], env=clean, capture_output=True, text=True, timeout=timeout
            )
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        return Run(proc.returncode, lines, time.monotonic() - start)

    return run


# ------------------------------------------------------------------------------- operator mistakes
@pytest.mark.parametrize(
    ("env", "value", "setting"),
    [
        ("STREAM_LEARNER_PUBLISH__STOP_TIMEOUT_S", "inf", "publish.stop_timeout_s"),  # SIGTERM never ended
        ("STREAM_LEARNER_PUBLISH__STOP_TIMEOUT_S", "nan", "publish.stop_timeout_s"),
        ("STREAM_LEARNER_PUBLISH__STOP_TIMEOUT_S", "31536000", "publish.stop_timeout_s"),  # a year
        ("STREAM_LEARNER_KAFKA__POLL_TIMEOUT_S", "inf", "kafka.poll_timeout_s"),
        ("STREAM_LEARNER_TRAINING__MAX_WAIT_S", "1e12", "training.max_wait_s"),
    ],
)
def test_non_finite_or_absurd_duration_is_refused(run_cli, env, value, setting):
    run = run_cli(**{env: value})
    assert run.returncode == 2 and run.seconds < SETTING_BOUND_S
    assert setting in run.line and env in run.line


def test_malformed_json_in_a_list_setting_is_refused(run_cli):
    run = run_cli(STREAM_LEARNER_MODEL__LABELS='["a",')  # was a 74-line traceback and exit 1
    assert run.returncode == 2 and run.seconds < SETTING_BOUND_S
    assert "model.labels" in run.line and "STREAM_LEARNER_MODEL__LABELS" in run.line
    assert "not valid JSON" in run.line


def test_misspelt_section_in_the_environment_is_refused(run_cli):
    run = run_cli(STREAM_LEARNER_TRAINNG__LEARNING_RATE="0.001")  # was silently ignored
    assert run.returncode == 2 and run.seconds < SETTING_BOUND_S
    assert "STREAM_LEARNER_TRAINNG__LEARNING_RATE" in run.line
    assert "did you mean STREAM_LEARNER_TRAINING__LEARNING_RATE?" in run.line


@pytest.mark.parametrize("value", ["", "broker-1:9092,,broker-2:9092", "broker:port", "broker:99999"])
def test_empty_or_malformed_bootstrap_servers_are_refused(run_cli, value):
    run = run_cli(STREAM_LEARNER_KAFKA__BOOTSTRAP_SERVERS=value)
    assert run.returncode == 2 and run.seconds < SETTING_BOUND_S
    assert "kafka.bootstrap_servers" in run.line and "STREAM_LEARNER_KAFKA__BOOTSTRAP_SERVERS" in run.line


@pytest.mark.parametrize("missing", ["dead-letter", "both"])
def test_missing_topics_without_create_topics_are_refused(run_cli, kafka_bootstrap, unique_topic, missing):
    topic = unique_topic("no-dlq")
    if missing == "dead-letter":
        ensure_topics({"bootstrap.servers": kafka_bootstrap}, {topic: 1})
    run = run_cli(
        preloaded=True,
        STREAM_LEARNER_KAFKA__BOOTSTRAP_SERVERS=kafka_bootstrap,
        STREAM_LEARNER_KAFKA__TOPIC=topic,
        STREAM_LEARNER_KAFKA__CREATE_TOPICS="false",
    )
    assert run.returncode == 2 and run.seconds < OUTAGE_BOUND_S  # was: started, and /readyz said ready
    assert f"'{topic}.dlq'" in run.line and "kafka.dlq_topic" in run.line
    assert "kafka.create_topics" in run.line and "STREAM_LEARNER_KAFKA__CREATE_TOPICS" in run.line
    assert ("kafka.topic /" in run.line) == (missing == "both")


def test_existing_topics_pass_the_check(kafka_bootstrap, unique_topic):
    topic = unique_topic("both-there")
    config = {"bootstrap.servers": kafka_bootstrap}
    ensure_topics(config, {topic: 1, f"{topic}.dlq": 1})
    require_topics(config, {topic: "kafka.topic", f"{topic}.dlq": "kafka.dlq_topic"})
    with pytest.raises(ConfigError, match=r"^kafka\.dlq_topic: topic 'x\.dlq' does not exist"):
        require_topics(config, {topic: "kafka.topic", "x.dlq": "kafka.dlq_topic"})


# ----------------------------------------------------------------------------------------- outages
def test_unreachable_broker_is_named_in_plain_words(run_cli):
    bootstrap = f"127.0.0.1:{free_port()}"  # nothing listens there
    run = run_cli(preloaded=True, STREAM_LEARNER_KAFKA__BOOTSTRAP_SERVERS=bootstrap)
    # was: 34 s, then "Failed while waiting for controller: Local: Timed out"
    assert run.returncode == 1 and CONNECT_TIMEOUT_S <= run.seconds < OUTAGE_BOUND_S, run.seconds
    assert f"cannot reach the Kafka broker at {bootstrap} within {CONNECT_TIMEOUT_S:g} s" in run.line
    assert "Connection refused" in run.line
    assert "kafka.bootstrap_servers" in run.line and "STREAM_LEARNER_KAFKA__BOOTSTRAP_SERVERS" in run.line


def test_unreachable_broker_without_create_topics_is_named_too():
    bootstrap = f"127.0.0.1:{free_port()}"
    start = time.monotonic()
    with pytest.raises(BrokerUnreachable, match=rf"cannot reach the Kafka broker at {bootstrap} within 2 s"):
        require_topics({"bootstrap.servers": bootstrap}, {"t": "kafka.topic"}, connect_timeout_s=2)
    assert 2 <= time.monotonic() - start < 5


def test_unreachable_store_is_named_in_plain_words(run_cli):
    endpoint = f"http://127.0.0.1:{free_port()}"
    run = run_cli(
        preloaded=True,
        STREAM_LEARNER_PUBLISH__STORAGE_URL="s3://models/sentiment",
        STREAM_LEARNER_PUBLISH__S3_ENDPOINT_URL=endpoint,
        STREAM_LEARNER_PUBLISH__S3_ACCESS_KEY_ID="key",
        STREAM_LEARNER_PUBLISH__S3_SECRET_ACCESS_KEY="not-a-real-secret",
        STREAM_LEARNER_PUBLISH__S3_REGION="us-east-1",
    )
    assert run.returncode == 1 and run.seconds < OUTAGE_BOUND_S
    assert (
        f"cannot reach the object store s3://models/sentiment/ at {endpoint} (could not connect)" in run.line
    )
    assert "publish.s3_endpoint_url" in run.line and "STREAM_LEARNER_PUBLISH__S3_ENDPOINT_URL" in run.line
    assert "not-a-real-secret" not in run.line


def test_store_that_never_answers_is_named_within_its_bound():
    import socket

    with socket.socket() as silent:  # accepts connections (the backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        endpoint = f"http://127.0.0.1:{silent.getsockname()[1]}"
        store = open_store("s3://b/p", endpoint_url=endpoint, access_key_id="k", secret_access_key="s")
        start = time.monotonic()
        with pytest.raises(StoreUnreachable, match=r"s3://b/p/ at .*: no answer within 1 s; check publish"):
            check_reachable(store, timeout_s=1)
        assert time.monotonic() - start < 2


def test_store_mistakes_name_the_setting(s3_server: SeaweedS3, s3_bucket: str, tmp_path: Path):
    def store(bucket: str, secret: str | None = None):
        return open_store(
            f"s3://{bucket}/prefix",
            endpoint_url=s3_server.endpoint_url,
            access_key_id=s3_server.access_key_id,
            secret_access_key=secret or s3_server.secret_access_key,
            region=s3_server.region,
        )

    check_reachable(store(s3_bucket))
    with pytest.raises(
        ConfigError, match=r"^publish\.storage_url: the bucket 'no-such-bucket' does not exist"
    ):
        check_reachable(store("no-such-bucket"))
    with pytest.raises(
        ConfigError, match=r"^publish\.s3_access_key_id / publish\.s3_secret_access_key: .*refused"
    ):
        check_reachable(store(s3_bucket, secret="wrong-secret"))
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    read_only.chmod(0o500)
    if not os.access(read_only, os.W_OK):  # root may write anyway
        with pytest.raises(ConfigError, match=r"^publish\.storage_url: this process may not write"):
            check_reachable(open_store(read_only.as_uri()))


# ------------------------------------------------------------------------- client log rate-limiting
def test_broker_outage_log_lines_are_rate_limited():
    """A real librdkafka consumer against a closed port: dozens of ERROR lines, or one and a summary."""

    def consume_for(seconds: float, limiter: RepeatFilter | None) -> list[str]:
        logger = logging.getLogger(f"tests.outage.{limiter is not None}")
        logger.propagate = False
        records: list[logging.LogRecord] = []
        handler = logging.Handler()
        handler.emit = records.append  # type: ignore[method-assign]
        logger.addHandler(handler)
        if limiter is not None:
            logger.addFilter(limiter)
        consumer = Consumer(
            {
                "bootstrap.servers": f"127.0.0.1:{free_port()}",
                "group.id": "g",
                "reconnect.backoff.max.ms": 100,
            },
            logger=logger,
        )
        consumer.subscribe(["t"])
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            consumer.poll(0.1)
        consumer.close()
        if limiter is not None:
            limiter.flush()
        return [r.getMessage() for r in records if r.levelno >= logging.WARNING]

    unlimited = consume_for(3, None)
    assert len(unlimited) >= 20, unlimited  # the flood (≈ 10 a second with this backoff)
    limited = consume_for(3, RepeatFilter(window_s=60))
    refused = [line for line in limited if "Connection refused" in line]
    assert len(refused) == 2, limited  # the first, then the summary
    assert "[repeated" in refused[1] and "times in the last" in refused[1]


def test_run_installs_the_limit_on_every_kafka_client_logger(monkeypatch):
    # installed for this test only: left on the loggers, the filters went on rate-limiting the consumer's
    # warnings in later tests of the same worker (a "said once" warning seen as a repeat)
    monkeypatch.setattr(logs, "_installed", {})
    filters = install()
    try:
        assert filters == install()  # once
        for name, limiter in zip(KAFKA_CLIENT_LOGGERS, filters, strict=True):
            assert limiter in logging.getLogger(name).filters
    finally:
        for name, limiter in zip(KAFKA_CLIENT_LOGGERS, filters, strict=True):
            logging.getLogger(name).removeFilter(limiter)
    import stream_learner.service.consumer
    import stream_learner.service.topics

    assert {stream_learner.service.consumer.log.name, stream_learner.service.topics.log.name} <= set(
        KAFKA_CLIENT_LOGGERS
    )


# ----------------------------------------------------------------------- the model against storage
def error_line(run: Run) -> str:
    """The one error line of a learner that got as far as logging (topics created, memory bound)."""
    assert not any("Traceback" in line for line in run.stderr_lines), run.stderr_lines
    errors = [line for line in run.stderr_lines if line.startswith("stream-learner: ")]
    assert len(errors) == 1, run.stderr_lines
    return errors[0]


def test_a_model_architecture_other_than_latests_is_refused(run_cli, kafka_bootstrap, unique_topic, tmp_path):
    """A 1-layer model's version in storage, a learner asked for 2 layers: this died with a raw
    state_dict dump. (The tiny model, tests/support/tiny_model.py: the versions of tiny_publisher are its.)"""
    from stream_learner.service.storage import LocalStore
    from tests.unit.service.test_publisher import tiny_publisher, tiny_snapshot

    tiny_publisher(LocalStore(tmp_path / "models")).publish_version(tiny_snapshot())
    run = run_cli(
        preloaded=True,
        STREAM_LEARNER_KAFKA__BOOTSTRAP_SERVERS=kafka_bootstrap,
        STREAM_LEARNER_KAFKA__TOPIC=unique_topic("arch"),
        STREAM_LEARNER_MODEL__NAME_OR_PATH=tiny_model_dir(),
        STREAM_LEARNER_MODEL__NUM_HIDDEN_LAYERS="2",
    )
    assert run.returncode == 2 and run.seconds < OUTAGE_BOUND_S + SETTING_BOUND_S
    line = error_line(run)
    assert (
        line.startswith("stream-learner: model.num_hidden_layers: ")
        and "set model.num_hidden_layers to 1" in line
    )


def test_a_max_length_over_the_models_positions_is_refused(run_cli, kafka_bootstrap, unique_topic):
    """model.max_length 1024 on a model of 512 positions (MiniLM's and the tiny model's): the first long
    event stopped the trainer, and every restart stopped again."""
    run = run_cli(
        preloaded=True,
        STREAM_LEARNER_KAFKA__BOOTSTRAP_SERVERS=kafka_bootstrap,
        STREAM_LEARNER_KAFKA__TOPIC=unique_topic("positions"),
        STREAM_LEARNER_MODEL__NAME_OR_PATH=tiny_model_dir(),
        STREAM_LEARNER_MODEL__MAX_LENGTH="1024",
    )
    assert run.returncode == 2 and run.seconds < OUTAGE_BOUND_S + SETTING_BOUND_S
    line = error_line(run)
    assert "model.max_length" in line and "at most 512" in line
