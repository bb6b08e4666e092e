"""No secret ever appears in logs, /metrics, manifests or any file written to storage (issue 8)."""

from __future__ import annotations

import time

from stream_learner.core.config import ConfigError, load_settings
from stream_learner.service.storage import open_store
from stream_learner.service.topics import ensure_topics
from tests.integration.test_lineage import PARTITIONS, config, events, produce
from tests.support.learner_process import LearnerProcess

SASL_PASSWORD = "sasl-SECRET-7f3a9c1e-do-not-leak"


def test_secrets_stay_out_of_logs_metrics_manifests_and_storage(
    kafka_bootstrap, unique_topic, s3_server, s3_bucket, tmp_path, monkeypatch
):
    topic = unique_topic("secrets")
    secrets = [s3_server.secret_access_key, SASL_PASSWORD]
    storage = {
        "storage_url": f"s3://{s3_bucket}/secrets",
        "s3_endpoint_url": s3_server.endpoint_url,
        "s3_region": s3_server.region,
    }
    cfg = config(kafka_bootstrap, topic, storage, every_steps=3)
    # credentials the way the Helm chart passes them: env from a Secret, never in the config file
    monkeypatch.setenv("STREAM_LEARNER_PUBLISH__S3_ACCESS_KEY_ID", s3_server.access_key_id)
    monkeypatch.setenv("STREAM_LEARNER_PUBLISH__S3_SECRET_ACCESS_KEY", s3_server.secret_access_key)
    monkeypatch.setenv("STREAM_LEARNER_KAFKA__CLIENT_CONFIG__sasl.password", SASL_PASSWORD)
    monkeypatch.setenv("STREAM_LEARNER_KAFKA__CLIENT_CONFIG__sasl.username", "learner")
    assert load_settings().kafka.client_config["sasl.password"] == SASL_PASSWORD  # it does reach librdkafka

    ensure_topics({"bootstrap.servers": kafka_bootstrap}, {topic: PARTITIONS, f"{topic}.dlq": PARTITIONS})
    produce(kafka_bootstrap, topic, events(80, bad_every=8), {})
    learner = LearnerProcess(cfg, tmp_path)
    assert not any(s in learner.config_path.read_text() for s in secrets)
    learner.start()
    try:
        learner.wait_ready()
        deadline = time.monotonic() + 120
        while learner.metric("stream_learner_events_trained_total") < 70 and time.monotonic() < deadline:
            time.sleep(0.3)
        metrics = learner.get("/metrics")[1]
        health = learner.get("/healthz")[1] + learner.get("/readyz")[1]
        for path in ("/", "/config", "/debug", "/metrics/../config"):
            assert learner.get(path)[0] == 404  # nothing but health and metrics is served
        assert learner.terminate(timeout=120) == 0, learner.log
    finally:
        learner.close()

    store = open_store(storage["storage_url"], **s3_server.store_options())
    keys = store.list("")
    assert any(k.endswith("manifest.json") for k in keys)
    stored = b"".join(store.get(k) for k in keys)
    for secret in secrets:
        assert secret not in learner.log, "secret in the logs"
        assert secret not in metrics and secret not in health, "secret served over HTTP"
        assert secret.encode() not in stored, "secret in storage"
    assert "trained" in metrics and "version" in learner.log  # (the things searched are not empty)


def test_a_bad_setting_next_to_a_secret_does_not_print_the_secret(monkeypatch):
    monkeypatch.setenv("STREAM_LEARNER_PUBLISH__S3_SECRET_ACCESS_KEY", "s3-SECRET-value-1234")
    monkeypatch.setenv("STREAM_LEARNER_KAFKA__CLIENT_CONFIG__sasl.password", SASL_PASSWORD)
    for bad in ({"publish": {"every_steps": -1}}, {"kafka": {"client_config": "not a mapping"}}):
        try:
            load_settings(**bad)
        except ConfigError as err:
            assert "s3-SECRET" not in str(err) and SASL_PASSWORD not in str(err), str(err)
        else:
            raise AssertionError(f"{bad} accepted")
