"""`eval` on the user's own stream, end to end: a range of a real topic, and the recommended settings
starting a real learner (issue 18). The second dataset is tests/data's (not VADER: other labels, long
texts, segments); the model is the session's tiny one — these tests check the tool, not the learning."""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import yaml
from typer.testing import CliRunner

from stream_learner.cli import app
from stream_learner.core.config import load_settings
from stream_learner.core.events import LabelSet
from stream_learner.core.intake import validate_record
from stream_learner.service.producer import produce_lines
from stream_learner.service.storage import open_store
from stream_learner.service.topics import ensure_topics
from stream_learner.service.versions import list_versions
from stream_learner.tools import evaluation as ev
from stream_learner.tools import evaluation_report as report
from stream_learner.tools.datasets import malformed_events
from tests.support.learner_process import LearnerProcess
from tests.support.own_stream import HELDOUT_FILE, LABELS, STREAM_FILE, stream_lines
from tests.support.tiny_model import tiny_model_dir


def test_eval_reads_a_range_of_a_real_topic_through_the_consumers_barrier(
    kafka_bootstrap, unique_topic, tmp_path
):
    topic = unique_topic("own-stream")
    bad = [v for _, v in malformed_events(16384)]
    lines = stream_lines(120)
    values = [
        v for i, line in enumerate(lines) for v in ([line, bad[i % len(bad)]] if i % 20 == 7 else [line])
    ]
    ensure_topics({"bootstrap.servers": kafka_bootstrap}, {topic: 2})
    for p in range(2):
        produce_lines({"bootstrap.servers": kafka_bootstrap}, topic, values[p::2], partition=p)

    cfg = ev.EvalConfig.quick(
        stream=f"kafka://{topic}",
        start="3",  # every partition from its offset 3 on
        heldout="last:20%",
        labels=LABELS,
        broker=kafka_bootstrap,
        strategies=ev.CORE_STRATEGIES,
        layers=None,
        settings={"model": {"name_or_path": tiny_model_dir()}},
    )
    results = ev.run_benchmark(cfg, tmp_path, progress=False)

    read = [v for p in range(2) for v in values[p::2][3:]]
    labels = LabelSet(LABELS)
    expected_invalid = Counter(
        r.reason.value for r in (validate_record(v, labels, 16384) for v in read) if isinstance(r, Exception)
    )
    assert expected_invalid  # the range holds malformed records, and they are counted, not trained
    info = results["input"]
    assert info["kafka"]["partitions"] == {p: (3, len(values[p::2])) for p in range(2)}
    assert info["stream"]["invalid"] == dict(expected_invalid)
    valid = len(read) - sum(expected_invalid.values())
    assert info["stream"]["valid"] + info["heldout"]["valid"] == valid
    assert info["heldout"]["valid"] == round(0.2 * valid)
    assert results["scenarios"][topic]["events"] == info["stream"]["valid"]
    assert {r["strategy"] for r in results["runs"]} == set(ev.CORE_STRATEGIES)
    for name in ("results.json", "report.md", "report.html", "recommended.yaml"):
        assert (tmp_path / name).is_file(), name


def test_a_sweep_recommends_settings_that_start_a_learner(kafka_bootstrap, unique_topic, tmp_path):
    out = tmp_path / "eval"
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump({"model": {"name_or_path": tiny_model_dir()}}))
    args = ["eval", "--quick", "--stream", str(STREAM_FILE), "--heldout", str(HELDOUT_FILE)]
    args += [
        "--labels",
        ",".join(LABELS),
        "--limit",
        "96",
        "--out",
        str(out),
        "-c",
        str(tmp_path / "tiny.yaml"),
    ]
    args += ["--sweep", "training.learning_rate=0.0001,0.001", "--sweep", "replay.capacity=64,500"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert f"ranking on {STREAM_FILE.stem}" in result.output  # the ranked table, in the terminal
    results = json.loads((out / "results.json").read_text())
    assert (out / "report.html").stat().st_size > 10_000  # opened in a real browser: test_report_html.py
    ranked = [r["strategy"] for r in report.ranking(results, STREAM_FILE.stem)]
    assert len(ranked) == 3 + 4 and "offline" in ranked  # default, naive, offline and the 2 × 2 grid

    recommended = yaml.safe_load((out / "recommended.yaml").read_text())
    best = next(r for r in report.ranking(results, STREAM_FILE.stem) if r["deployable"])
    assert f"strategy {best['strategy']!r}" in (out / "recommended.yaml").read_text()
    assert recommended["model"]["labels"] == list(LABELS)
    settings = load_settings(out / "recommended.yaml")
    run = next(r for r in results["runs"] if r["strategy"] == best["strategy"])
    assert settings.training.learning_rate == run["settings"]["training"]["learning_rate"]
    assert settings.replay.capacity == run["settings"]["replay"]["capacity"]

    # `stream-learner run -c recommended.yaml`, with the deployment's kafka.* and publish.* added
    topic = unique_topic("recommended")
    url = (tmp_path / "store").as_uri()
    config = {
        **recommended,
        "kafka": {
            "bootstrap_servers": kafka_bootstrap,
            "topic": topic,
            "group_id": topic,
            "session_timeout_ms": 6000,
        },
        "training": {**recommended.get("training", {}), "fresh_per_step": 8, "max_wait_s": 0.2},
        "publish": {"storage_url": url, "every_steps": 2},
    }
    ensure_topics({"bootstrap.servers": kafka_bootstrap}, {topic: 1, f"{topic}.dlq": 1})
    produce_lines({"bootstrap.servers": kafka_bootstrap}, topic, stream_lines(48), partition=0)
    learner = LearnerProcess(config, tmp_path).start()
    try:
        learner.wait_ready()
        deadline = time.monotonic() + 120
        while not list_versions(open_store(url)) and time.monotonic() < deadline:
            time.sleep(0.5)
    finally:
        learner.close()
    [first, *_] = list_versions(open_store(url))
    assert first["labels"] == list(LABELS)
    assert first["training"]["learning_rate"] == settings.training.learning_rate
    assert first["replay"]["capacity"] == settings.replay.capacity


def test_a_stream_file_with_a_segment_on_some_rows_only_says_what_to_fix(tmp_path):
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_bytes(
        b'{"text": "a", "label": "%s", "segment": "x"}\n{"text": "b", "label": "%s"}\n'
        % (LABELS[0].encode(), LABELS[0].encode())
    )
    result = CliRunner().invoke(
        app,
        [
            "eval",
            "--stream",
            str(mixed),
            "--heldout",
            "last:50%",
            "--labels",
            ",".join(LABELS),
            "--out",
            str(tmp_path),
        ],
    )
    assert result.exit_code == 1
    assert "give it on every row or on none" in result.output


def test_stream_options_without_a_stream_are_refused(tmp_path):
    result = CliRunner().invoke(app, ["eval", "--heldout", "x.jsonl", "--out", str(tmp_path)])
    assert result.exit_code == 1 and "go with --stream" in result.output
    assert not Path(tmp_path / "results.json").exists()
