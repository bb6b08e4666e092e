"""``stream-learner serve`` under load while a learner publishes (issue 19, acceptance 1 and 2), all real:
the Tansu broker, the SeaweedFS S3 server, a learner (``stream-learner run``, a child process) learning
from events produced for the whole run and publishing to S3 every 2.5 s, the server (``stream-learner
serve``, a child process) following the same bucket, and wrk — a real HTTP load tool — on 32
connections for ``$SL_TESTS_SERVING_LOAD_SECONDS`` (20 by default; ``benchmarks/serving_load.sh`` runs
60 with the bundled MiniLM, ``$SL_TESTS_SERVING_LOAD_MODEL=bundled``).

Checked: no request fails (no socket error, no non-2xx); at least three swaps under load; every
response names a version LATEST named (one the learner published, status ok); every response's
probabilities and label are those plain transformers gives, loading that version downloaded from S3;
every version LATEST named during the load is served, or was superseded before the server's follower
read it. Printed, not asserted (a shared 2-core machine): wrk's figures, and per version the delay
from LATEST naming it to the server serving it beside the poll interval plus that version's load time.
"""

from __future__ import annotations

import os
import time
from collections import Counter, defaultdict
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest

from stream_learner.service.publisher import download_version
from stream_learner.service.serving.loader import served_file
from stream_learner.service.storage import open_store
from stream_learner.service.topics import ensure_topics
from stream_learner.service.versions import PUBLISHED, read_latest, version_statuses
from tests.support.learner_process import SMALL_TRAINING, LearnerProcess, small_model
from tests.support.services import SeaweedS3
from tests.support.serving import TEXTS, outputs, plain_transformers, probabilities, wait_for
from tests.support.serving_load import ServeProcess, StreamProducer, VersionTimeline, VersionWatcher
from tests.support.wrk import WrkRun, run_infer_load

DURATION_ENV = "SL_TESTS_SERVING_LOAD_SECONDS"
MODEL_ENV = "SL_TESTS_SERVING_LOAD_MODEL"  # "tiny" (the default) or "bundled" (all-MiniLM-L6-v2)
CONNECTIONS = 32
PUBLISH_EVERY_S = 2.5
POLL_INTERVAL_S = 0.25
EVENTS_PER_S = 50
MAX_LENGTH = 64  # the server's, as plain_transformers cuts: the texts are shorter anyway
SWAPS = 3  # at least, under load


def learner_model() -> dict:
    """The learner's model settings: the tiny random one (tests of mechanics), or the bundled MiniLM
    when ``$SL_TESTS_SERVING_LOAD_MODEL`` says ``bundled`` (the benchmark's figures)."""
    which = os.environ.get(MODEL_ENV, "tiny")
    if which not in ("tiny", "bundled"):
        raise ValueError(f"${MODEL_ENV} must be 'tiny' or 'bundled', not {which!r}")
    return small_model() if which == "tiny" else {"name_or_path": "bundled", "max_length": MAX_LENGTH}


@pytest.mark.slow(seconds=35)
def test_under_wrk_load_each_new_version_is_served_and_every_answer_is_that_versions(
    kafka_bootstrap: str, unique_topic, s3_server: SeaweedS3, s3_bucket: str, tmp_path: Path
) -> None:
    duration_s = float(os.environ.get(DURATION_ENV, "20"))
    topic = unique_topic("serving-load")
    url = f"s3://{s3_bucket}/sentiment"
    s3 = {
        "s3_endpoint_url": s3_server.endpoint_url,
        "s3_region": s3_server.region,
        "s3_access_key_id": s3_server.access_key_id,
        "s3_secret_access_key": s3_server.secret_access_key,
    }
    store = open_store(url, **s3_server.store_options())
    ensure_topics({"bootstrap.servers": kafka_bootstrap}, {topic: 1, f"{topic}.dlq": 1})
    learner = LearnerProcess(
        {
            "kafka": {
                "bootstrap_servers": kafka_bootstrap,
                "topic": topic,
                "group_id": f"{topic}-group",
                "session_timeout_ms": 6000,
            },
            "model": learner_model(),
            "training": SMALL_TRAINING,
            "replay": {"capacity": 200},
            # every version kept: each one answered is downloaded again at the end
            "publish": {
                "storage_url": url,
                "every_seconds": PUBLISH_EVERY_S,
                "every_steps": 10**6,
                "keep_versions": 0,
                **s3,
            },
        },
        tmp_path,
    )
    server = ServeProcess(
        {
            "model": {"max_length": MAX_LENGTH},
            "publish": {"storage_url": url, **s3},
            "serving": {"poll_interval_s": POLL_INTERVAL_S},
        },
        tmp_path,
    )
    producer = StreamProducer(kafka_bootstrap, topic, EVENTS_PER_S)
    watcher = VersionWatcher(store, server)
    producer.start()
    learner.start()
    try:
        server.start()
        watcher.start()  # before the first version: its delay, the process's first load, is measured too

        def first_version_served() -> bool:
            assert learner.proc.poll() is None, f"the learner exited:\n{learner.log}"
            return server.client.get("/v2/health/ready")[0] == 200

        wait_for(first_version_served, timeout=300, poll_s=0.2)
        load_started = time.monotonic()
        run = run_infer_load(
            server.infer_url, TEXTS, tmp_path / "wrk", connections=CONNECTIONS, duration_s=duration_s
        )
        load_ended = time.monotonic()
        named = watcher.timeline.named_between(load_started, load_ended)
        assert named, "LATEST named no version during the load: the learner published none"
        # the last version named during the load gets served too (or a newer one: the learner goes on)
        wait_for(lambda: max(watcher.timeline.served) >= named[-1], timeout=120)
        timeline = watcher.stop()
        producer.stop()
        learner.close()  # no more versions: the server's log and metrics come to rest
        wait_for(
            lambda: server.metrics()["stream_learner_serving_version"] == read_latest(store)[0], timeout=120
        )
        load_seconds = server.load_seconds()
        server_metrics = server.metrics()
    finally:
        if watcher.is_alive():
            watcher.stop()
        producer.stop()
        learner.close()
        server.stop()
    assert not producer.errors, producer.errors[:3]
    published = {v for v, status in version_statuses(store).items() if status == PUBLISHED}

    print(report(run, timeline, load_seconds, load_started, load_ended, duration_s))

    # no request failed
    assert run.socket_errors == 0 and run.non_2xx == 0, run.stdout
    assert len(run.responses) == run.summary["requests"] > 0, "a response wrk counted was not recorded"
    # every response names a version LATEST named: the learner's published (ok) versions, each of which
    # moved LATEST, and those the watcher saw LATEST name (which are among them)
    assert set(timeline.named) <= published, (timeline.named, published)
    answered = Counter(int(r.body["model_version"]) for r in run.responses)
    assert set(answered) <= published | set(timeline.named), (answered, published)
    # swaps under load: the version before the first swap and one more per swap
    assert len(answered) >= SWAPS + 1, f"{len(answered) - 1} swaps under load: {sorted(answered)}"
    # each version LATEST named during the load was served, or superseded before the server read it
    served = set(timeline.served) | set(answered)
    for version in named:
        if version not in served:
            assert version not in timeline.follower_read, (
                f"the server read LATEST = {version}, never served it"
            )
            assert any(v > version for v in timeline.named), f"version {version}: not served, not superseded"
    read_and_due = {v for v in timeline.follower_read if v <= max(served)}
    assert read_and_due <= served, f"read from LATEST but never served: {sorted(read_and_due - served)}"
    # a load time for each version served, and they are what the server's metric observed
    assert served <= set(load_seconds), (served, load_seconds)
    assert server_metrics["stream_learner_serving_load_seconds_count"] == len(load_seconds)
    assert abs(server_metrics["stream_learner_serving_load_seconds_sum"] - sum(load_seconds.values())) <= (
        0.005 * len(load_seconds) + 1e-6
    )  # the log rounds each to 0.01 s

    # every answer is what plain transformers gives with that version, downloaded from S3
    expected: dict[int, np.ndarray] = {}
    labels: dict[int, list[str]] = {}
    for version in sorted(answered):
        directory, manifest = download_version(store, version, tmp_path / "plain", wanted=served_file)
        expected[version] = plain_transformers(directory, TEXTS)
        labels[version] = manifest["labels"]
    assert any(not np.allclose(expected[a], expected[b], atol=1e-6) for a, b in pairwise(sorted(expected))), (
        "every version predicts alike: the comparison below would not tell them apart"
    )
    # grouped by (version, text) and compared a group at a time: tens of thousands of responses
    answers: dict[tuple[int, int], list[dict]] = defaultdict(list)
    for response in run.responses:
        assert response.text_index is not None, response
        answers[int(response.body["model_version"]), response.text_index].append(response.body)
    for (version, index), bodies in answers.items():
        want = expected[version][index]
        got = {tuple(outputs(body)["label"]["data"]) for body in bodies}
        assert got == {(labels[version][int(want.argmax())],)}, (
            f"version {version}, text {index}: {got}, {want}"
        )
        np.testing.assert_allclose(
            np.concatenate([probabilities(body) for body in bodies]),
            np.broadcast_to(want, (len(bodies), len(want))),
            rtol=0,
            atol=1e-5,
            err_msg=f"version {version}, text {index}",
        )


def report(
    run: WrkRun,
    timeline: VersionTimeline,
    load_seconds: dict[int, float],
    started: float,
    ended: float,
    duration_s: float,
) -> str:
    """What the run measured, as the benchmark's output keeps it."""
    answered = Counter(int(r.body["model_version"]) for r in run.responses if r.body)
    s = run.summary
    lines = [
        f"serving load: model {os.environ.get(MODEL_ENV, 'tiny')}; wrk 2 threads, {CONNECTIONS} connections, "
        f"{duration_s:g} s; learner publishing every {PUBLISH_EVERY_S} s from {EVENTS_PER_S} events/s; "
        f"server polling LATEST every {POLL_INTERVAL_S} s",
        f"requests {int(s['requests'])} ({run.requests_per_s:.1f}/s); socket errors {run.socket_errors}; "
        f"non-2xx {run.non_2xx}; latency "
        + ", ".join(f"{p} {run.latency_ms(p):.1f} ms" for p in ("p50", "p90", "p99", "p99.9"))
        + f", max {s['latency_max_us'] / 1000:.1f} ms",
        f"versions answering during the load: {len(answered)} ({len(answered) - 1} swaps): "
        + ", ".join(f"{v}×{n}" for v, n in sorted(answered.items())),
        f"LATEST → served, per version (watcher every 50 ms, {timeline.ticks} ticks, slowest "
        f"{timeline.slowest_tick_s * 1000:.0f} ms; times from the start of the load, each by when the "
        "watcher saw it; the delay within ± what the watcher's reads leave open; a process's first load "
        "also imports the model's code):",
        "  version  LATEST named  served     delay            poll + load",
    ]
    within, within_error, delays = 0, 0, []
    for version in sorted(timeline.named):
        # the follower loads one version at a time: one named before an older one is served waits for it
        busy = [
            v for v in timeline.served if v < version and timeline.served[v][0] > timeline.named[version][1]
        ]
        named_by = timeline.named[version][1] - started
        if version == timeline.named_before_watching:
            lines.append(f"  {version:7d}  already named when the watcher started")
        elif version in timeline.served:
            delay, error = timeline.delay(version)
            load = load_seconds.get(version, float("nan"))
            within += delay <= POLL_INTERVAL_S + load
            within_error += delay - error <= POLL_INTERVAL_S + load
            delays.append(delay)
            lines.append(
                f"  {version:7d}  {named_by:10.2f} s  {timeline.served[version][1] - started:7.2f} s  "
                f"{delay:5.2f} ± {error:4.2f} s   {POLL_INTERVAL_S + load:5.2f} s (load {load:.2f} s)"
                + (f"; named before version {busy[-1]} served" if busy else "")
            )
        else:
            lines.append(f"  {version:7d}  {named_by:10.2f} s  superseded before the server read LATEST")
    if delays:
        lines.append(
            f"served within poll + load: {within} of {len(delays)} ({within_error} within the ±); "
            f"delay median {np.median(delays):.2f} s, max {max(delays):.2f} s"
        )
    lines += ["wrk's own report:", run.stdout.rstrip()]
    return "\n".join(lines)
