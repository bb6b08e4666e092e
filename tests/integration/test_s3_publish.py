"""Publishing to a real S3 API server (SeaweedFS): acceptance 4 of issue 4."""

from __future__ import annotations

import hashlib
import json

import boto3

from stream_learner.core.events import encode_event
from stream_learner.service.app import Learner
from stream_learner.service.producer import produce_lines
from stream_learner.service.topics import ensure_topics
from tests.support.factories import small_settings, tiny_rows


def test_versions_and_latest_in_s3_with_matching_sha256(kafka_bootstrap, unique_topic, s3_server, s3_bucket):
    topic = unique_topic()
    s = small_settings(
        kafka={
            "bootstrap_servers": kafka_bootstrap,
            "topic": topic,
            "group_id": f"{topic}-g",
            "session_timeout_ms": 6000,
        },
        publish={
            "storage_url": f"s3://{s3_bucket}/models/sentiment",
            "every_steps": 2,
            "s3_endpoint_url": s3_server.endpoint_url,
            "s3_region": s3_server.region,
            "s3_access_key_id": s3_server.access_key_id,
            "s3_secret_access_key": s3_server.secret_access_key,
        },
    )
    ensure_topics(s.kafka.librdkafka(), {topic: 1, s.kafka.dead_letter_topic: 1})
    rows = tiny_rows(32)
    produce_lines(s.kafka.librdkafka(), topic, [encode_event(r["text"], r["label"]) for r in rows])
    learner = Learner(s).start()
    try:
        assert learner.wait_until(
            lambda: learner.metrics.value("stream_learner_events_trained_total") >= len(rows), timeout=180
        )
    finally:
        learner.stop()
    assert learner.error is None

    s3 = boto3.client(
        "s3",
        endpoint_url=s3_server.endpoint_url,
        region_name=s3_server.region,
        aws_access_key_id=s3_server.access_key_id,
        aws_secret_access_key=s3_server.secret_access_key,
    )
    get = lambda key: s3.get_object(Bucket=s3_bucket, Key=f"models/sentiment/{key}")["Body"].read()  # noqa: E731
    latest = get("LATEST").decode().strip()
    keys = {
        o["Key"]
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=s3_bucket)
        for o in page.get("Contents", [])
    }
    manifests = sorted(k for k in keys if k.endswith("/manifest.json"))
    assert len(manifests) >= 2
    assert f"models/sentiment/{latest}/manifest.json" == manifests[-1]
    for key in manifests:
        manifest = json.loads(get(key.removeprefix("models/sentiment/")))
        vdir = f"versions/{manifest['version']:06d}"
        assert {"model.safetensors", "config.json", "trainer_state/optimizer.safetensors"} <= manifest[
            "files"
        ].keys()
        for name, info in manifest["files"].items():
            data = get(f"{vdir}/{name}")
            assert hashlib.sha256(data).hexdigest() == info["sha256"], name
            assert len(data) == info["bytes"]
    assert json.loads(get(f"{latest}/manifest.json"))["events_trained"] == len(rows)
