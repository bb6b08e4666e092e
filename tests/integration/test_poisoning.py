"""The poisoning gate: a burst of label-flipped events cannot move LATEST to a damaged model (issue 8)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from stream_learner.cli import app as cli
from stream_learner.core.events import encode_event
from stream_learner.service.app import Learner
from stream_learner.service.topics import ensure_topics
from stream_learner.service.versions import list_versions, read_latest, read_manifest
from stream_learner.tools.datasets import HELDOUT, bundled_path, read_jsonl
from tests.integration.test_pipeline import PARTITIONS, handled, learner_settings, produce_events
from tests.support.factories import pretrained_settings, tiny_rows

MAX_DROP = 0.05


@pytest.mark.slow(seconds=57)
def test_label_flipped_burst_is_held_back_by_the_gate(kafka_bootstrap, unique_topic, tmp_path):
    probe = tmp_path / "probe.jsonl"
    rows = list(read_jsonl(bundled_path(HELDOUT)))[::20][:200]  # all four domains
    probe.write_bytes(b"\n".join(encode_event(r["text"], r["label"]) for r in rows))
    topic = unique_topic("poison")
    # every_seconds: when the clean burst ends between two multiples of every_steps (a window cut short
    # by a slow poll), the last steps are still published once the stream goes quiet
    # the pretrained model: the gate judges what the model learned (a random tiny one learns too little)
    url = tmp_path.joinpath("store").as_uri()
    s = learner_settings(
        kafka_bootstrap, topic, url, make=pretrained_settings, every_steps=10, every_seconds=3
    )
    s = s.model_copy(
        update={
            "probe": s.probe.model_copy(update={"file": str(probe), "max_accuracy_drop": MAX_DROP}),
            # a 1-layer model learns the task in a few hundred events only with bold steps and no
            # pull towards θ0: what it learns, the poison can undo
            "training": s.training.model_copy(
                update={"learning_rate": 2e-4, "head_learning_rate": 5e-3, "l2sp_lambda": 0.0}
            ),
        }
    )
    ensure_topics(s.kafka.librdkafka(), {topic: PARTITIONS, s.kafka.dead_letter_topic: PARTITIONS})
    # three passes: the 1-layer model predicts one class for its first 300–600 events, then learns; by 800
    # it sits at 0.63–0.78 on the probe (over seeds and window cuts), by 1200 at 0.66–0.71 (the margin)
    clean = tiny_rows() * 3
    flip = {"pos": "neg", "neg": "pos"}

    learner = Learner(s).start()
    try:
        produce_events(s, {p: [encode_event(r["text"], r["label"]) for r in clean[p::2]] for p in (0, 1)})
        assert learner.wait_until(lambda: handled(learner) >= len(clean), timeout=300)
        # the last clean version is out: the newest snapshot covers every step and has been through the
        # gate (the publisher's parent; LATEST too, unless the gate held back a clean version)
        settled = lambda: (  # noqa: E731
            learner.publisher.commit_queue.empty()
            and learner.publisher.parent is not None
            and learner.trainer.counters.steps
            == read_manifest(learner.store, learner.publisher.parent)["steps"]
        )
        assert learner.wait_until(settled, timeout=60)
        good = read_latest(learner.store)[0]
        good_probe = learner.publisher.latest_probe_accuracy
        assert good_probe is not None and good_probe > 0.6, good_probe  # it learned something to lose

        # one pass flipped (400 events, 25 steps, 2 versions and more): the first damaged version is
        # rejected within 10 steps of the burst; two passes only repeated that
        poison = [encode_event(r["text"], flip[r["label"]]) for r in tiny_rows()]
        produce_events(s, {p: poison[p::2] for p in (0, 1)})
        assert learner.wait_until(lambda: handled(learner) >= len(clean) + len(poison), timeout=300)
        assert learner.wait_until(
            lambda: learner.metrics.value("stream_learner_versions_rejected_total") > 0, 60
        )
    finally:
        learner.stop()
    assert learner.error is None

    manifests = {m["version"]: m for m in list_versions(learner.store)}
    rejected = [m for m in manifests.values() if m.get("rejected")]
    assert rejected and learner.metrics.value("stream_learner_versions_rejected_total") == len(rejected)
    latest = read_latest(learner.store)[0]
    assert not manifests[latest].get("rejected")
    # every version that advanced LATEST passed the gate against the LATEST before it
    reference = None
    for v in sorted(manifests):
        m = manifests[v]
        acc = m["metrics"]["probe_accuracy"]
        if m.get("rejected"):
            assert acc < m["rejected"]["latest_probe_accuracy"] - MAX_DROP
            assert m["rejected"]["latest_probe_accuracy"] == reference
        else:
            assert reference is None or acc >= reference - MAX_DROP
            reference = acc
    assert manifests[latest]["metrics"]["probe_accuracy"] >= good_probe - 2 * MAX_DROP
    # the poison was held back: versions after the good one were rejected, down to damaged ones (a clean
    # version may be rejected too, against a better LATEST: checked in the loop, not here)
    held_back = [m for m in rejected if m["version"] > good]
    assert held_back and min(m["metrics"]["probe_accuracy"] for m in held_back) < good_probe - MAX_DROP
    assert latest >= good

    # the rejection is visible in the versions list
    config = tmp_path / "config.yaml"
    config.write_text(json.dumps({"publish": {"storage_url": s.publish.storage_url}}))
    table = CliRunner().invoke(cli, ["versions", "list", "-c", str(config)], env={"COLUMNS": "200"})
    assert table.exit_code == 0 and "rejected (gate)" in table.output, table.output
