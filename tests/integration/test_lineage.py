"""Crash-safe lineage, the learner a real child process: SIGTERM, the fence, SIGKILL chaos (issue 5)."""

from __future__ import annotations

import ctypes
import os
import random
import signal
import threading
import time

import pytest

from stream_learner.core.events import encode_event
from stream_learner.service.producer import produce_lines
from stream_learner.service.storage import open_store
from stream_learner.service.topics import ensure_topics
from stream_learner.service.versions import (
    INCOMPLETE,
    MANIFEST,
    list_versions,
    read_latest,
    read_manifest,
    version_dir,
    version_statuses,
)
from stream_learner.tools.datasets import malformed_events
from tests.support.factories import tiny_rows
from tests.support.learner_process import (
    SMALL_TRAINING,
    LearnerProcess,
    assert_exact_lineage,
    committed_offsets,
    lineage,
    small_model,
)

PARTITIONS = 2
NO_OFFSET = -1001  # librdkafka's OFFSET_INVALID: nothing committed
SYS_TGKILL = {"x86_64": 234, "aarch64": 131}.get(os.uname().machine, 234)


def config(bootstrap: str, topic: str, storage: dict, **publish) -> dict:
    return {
        "kafka": {
            "bootstrap_servers": bootstrap,
            "topic": topic,
            "group_id": f"{topic}-group",
            "session_timeout_ms": 6000,
            "topic_partitions": PARTITIONS,
            "poll_max_messages": 50,
        },
        "model": small_model(),
        "training": SMALL_TRAINING,
        "replay": {"capacity": 200},
        # keep every version: the tests walk the whole lineage
        "publish": {"keep_versions": 0, **storage, **publish},
    }


def events(n: int, bad_every: int = 0, start: int = 0) -> list[tuple[bytes, bool]]:
    """``n`` (value, valid) pairs from the tiny VADER file; every ``bad_every``-th one malformed."""
    rows = tiny_rows()
    bad = [v for _, v in malformed_events(16384)]
    out = []
    for i in range(start, start + n):
        if bad_every and i % bad_every == bad_every - 1:
            out.append((bad[i % len(bad)], False))
        else:
            r = rows[i % len(rows)]
            out.append((encode_event(r["text"], r["label"], id=str(i)), True))
    return out


def produce(bootstrap: str, topic: str, batch: list[tuple[bytes, bool]], valid: dict[int, list[bool]]):
    """Produce round-robin over the partitions, recording each event's validity at its offset."""
    for p in range(PARTITIONS):
        mine = batch[p::PARTITIONS]
        produce_lines({"bootstrap.servers": bootstrap}, topic, [v for v, _ in mine], partition=p)
        valid.setdefault(p, []).extend(ok for _, ok in mine)


@pytest.mark.slow(waits=True, seconds=8)
def test_sigterm_publishes_a_final_version_and_commits_before_exit(kafka_bootstrap, unique_topic, tmp_path):
    topic = unique_topic("sigterm")
    url = (tmp_path / "store").as_uri()
    # only the final version is ever published: every_* are out of reach
    cfg = config(kafka_bootstrap, topic, {"storage_url": url}, every_steps=10**6, every_seconds=604800)
    valid: dict[int, list[bool]] = {}
    ensure_topics({"bootstrap.servers": kafka_bootstrap}, {topic: PARTITIONS, f"{topic}.dlq": PARTITIONS})
    produce(kafka_bootstrap, topic, events(120, bad_every=10), valid)
    learner = LearnerProcess(cfg, tmp_path).start()
    try:
        learner.wait_ready()
        deadline = time.monotonic() + 120
        while learner.metric("stream_learner_events_trained_total") < 40 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert read_latest(open_store(url)) == (None, None)
        assert learner.terminate(timeout=120) == 0, learner.log
    finally:
        learner.close()
    assert "SIGTERM: stopping gracefully" in learner.log
    store = open_store(url)
    [final] = list_versions(store)
    assert read_latest(store)[0] == final["version"] and final["events_trained"] >= 40
    # every event the final version covers was trained once, and Kafka has exactly its offsets
    covered = {p: v[: final["offsets"][topic].get(str(p), 0)] for p, v in valid.items()}
    assert_exact_lineage(store, topic, covered)
    committed = committed_offsets(kafka_bootstrap, cfg["kafka"]["group_id"], topic, PARTITIONS)
    # a partition none of whose events was trained yet has no offset in the manifest, and none committed
    assert committed == {p: final["offsets"][topic].get(str(p), NO_OFFSET) for p in range(PARTITIONS)}


def signal_thread(pid: int, tid: int, sig: int) -> None:
    """``tgkill``: a signal to one thread of a process (the kernel picks the thread for ``kill``)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(SYS_TGKILL, pid, tid, sig) != 0:
        raise OSError(ctypes.get_errno(), f"tgkill({pid}, {tid}, {sig})")


def test_sigterm_taken_by_another_thread_still_stops_the_learner(kafka_bootstrap, unique_topic, tmp_path):
    """A SIGTERM the kernel hands to a thread other than the main one: Python's handler runs on the
    main thread only, so a main thread blocked in one long wait never saw it (a test run: ignored for
    120 s, then SIGKILLed). The ``run`` command waits in slices and takes it within one."""
    topic = unique_topic("sigterm-thread")
    cfg = config(kafka_bootstrap, topic, {"storage_url": (tmp_path / "store").as_uri()})
    ensure_topics({"bootstrap.servers": kafka_bootstrap}, {topic: PARTITIONS, f"{topic}.dlq": PARTITIONS})
    learner = LearnerProcess(cfg, tmp_path).start()
    try:
        learner.wait_ready()
        pid = learner.proc.pid
        others = sorted(int(t) for t in os.listdir(f"/proc/{pid}/task") if int(t) != pid)
        assert others, "the learner runs threads beside its main one"
        signal_thread(pid, others[0], signal.SIGTERM)
        assert learner.proc.wait(timeout=60) == 0, learner.log
    finally:
        learner.close()
    assert "SIGTERM: stopping gracefully" in learner.log


@pytest.mark.slow(waits=True, seconds=13)
def test_a_second_learner_on_the_same_prefix_is_fenced_out(kafka_bootstrap, unique_topic, tmp_path):
    url = (tmp_path / "store").as_uri()
    topics = [unique_topic("fence-a"), unique_topic("fence-b")]
    learners = []
    try:
        for t in topics:
            ensure_topics({"bootstrap.servers": kafka_bootstrap}, {t: PARTITIONS, f"{t}.dlq": PARTITIONS})
            cfg = config(kafka_bootstrap, t, {"storage_url": url}, every_steps=2)
            learners.append(LearnerProcess(cfg, tmp_path, name=t).start())
        for learner in learners:
            learner.wait_ready()  # both have read the (empty) LATEST before either publishes
        for t in topics:
            produce(kafka_bootstrap, t, events(64), {})
        deadline = time.monotonic() + 120
        while all(lp.proc.poll() is None for lp in learners) and time.monotonic() < deadline:
            time.sleep(0.2)
        [loser] = [lp for lp in learners if lp.proc.poll() is not None]
        [winner] = [lp for lp in learners if lp is not loser]
        assert loser.proc.returncode == 1
        assert "another learner advanced LATEST" in loser.log
        assert "run one learner per storage prefix" in loser.log
        # the winner goes on publishing; LATEST and its whole lineage are the winner's
        time.sleep(2)
        assert winner.proc.poll() is None
        assert winner.terminate(timeout=120) == 0, winner.log
    finally:
        for lp in learners:
            lp.close()
    winner_topic = topics[learners.index(winner)]
    chain = lineage(open_store(url))
    assert len(chain) >= 2 and {t for m in chain for t in m["offsets"]} == {winner_topic}


@pytest.mark.slow(waits=True, seconds=78)
def test_chaos_sigkill_at_random_moments_keeps_the_lineage_exact(
    kafka_bootstrap, unique_topic, s3_server, s3_bucket, tmp_path
):
    """≥ 5 SIGKILLs at seeded random moments, some during publishing, while events flow (acceptance 1)."""
    rng = random.Random(20261125)
    topic = unique_topic("chaos")
    storage = {
        "storage_url": f"s3://{s3_bucket}/chaos",
        "s3_endpoint_url": s3_server.endpoint_url,
        "s3_access_key_id": s3_server.access_key_id,
        "s3_secret_access_key": s3_server.secret_access_key,
        "s3_region": s3_server.region,
    }
    # a version every 4 steps, or 5 s after the last one if steps were taken since: once the stream
    # ends, the last few steps are published without waiting for the default 300 s
    cfg = config(kafka_bootstrap, topic, storage, every_steps=4, every_seconds=5)
    ensure_topics({"bootstrap.servers": kafka_bootstrap}, {topic: PARTITIONS, f"{topic}.dlq": PARTITIONS})
    store = open_store(storage["storage_url"], **s3_server.store_options())

    valid: dict[int, list[bool]] = {}
    chunks = [events(60, bad_every=15, start=60 * i) for i in range(12)]
    stop_producing = threading.Event()
    # events keep flowing through the kills: two chunks produced from each start of the learner on
    # (6 starts), while it starts, trains, publishes and is killed
    may_produce = threading.Semaphore(0)

    def producer() -> None:
        for chunk in chunks:
            while not may_produce.acquire(timeout=0.2):
                if stop_producing.is_set():
                    return
            produce(kafka_bootstrap, topic, chunk, valid)

    feeder = threading.Thread(target=producer, daemon=True)
    feeder.start()
    learner = LearnerProcess(cfg, tmp_path)
    kills, during_publish = 0, 0
    try:
        while kills < 5:  # the acceptance's 5: each start costs ≈ 7 s of CPU in the suite
            learner.start()
            may_produce.release(2)
            if kills % 2 == 0:  # kill while uploading a version: after it starts, before LATEST moves
                found = learner.wait_for_log(r"publishing version (\d+)", timeout=180)
                time.sleep(rng.uniform(0.0, 0.4))
                publishing = int(found.group(1))
            else:
                learner.wait_ready()
                time.sleep(rng.uniform(0.5, 8.0))
                publishing = None
            learner.kill()
            kills += 1
            if publishing is not None and f"published version {publishing} " not in learner.log:
                during_publish += 1
                # LATEST never names the version whose upload was cut short
                assert read_latest(store)[0] != publishing
        # a final clean run catches up with every event, then stops on SIGTERM
        learner.start()
        may_produce.release(2)
        feeder.join(timeout=120)
        assert not feeder.is_alive(), "the last chunks were not produced within 120 s"
        ends = {p: len(v) for p, v in valid.items()}
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            latest, _ = read_latest(store)
            if latest is not None:
                offsets = {int(p): o for p, o in read_manifest(store, latest)["offsets"][topic].items()}
                if offsets == ends:
                    break
            time.sleep(0.2)
        else:
            raise AssertionError(f"LATEST never covered the whole stream {ends} in the final run")
        assert learner.terminate(timeout=120) == 0, learner.log
    finally:
        stop_producing.set()
        learner.close()

    assert kills == 5 and during_publish >= 2, (kills, during_publish)
    chain = assert_exact_lineage(store, topic, valid)
    assert chain[-1]["events_trained"] == sum(sum(v) for v in valid.values())
    # the cut-short uploads skipped version numbers, and retention removed their leftovers
    # (keep_versions = 0 too): no incomplete version is left below the newest complete one
    statuses = version_statuses(store)
    newest = max(n for n, s in statuses.items() if s != INCOMPLETE)
    assert not [n for n, s in statuses.items() if s == INCOMPLETE and n < newest]
    assert set(range(1, chain[-1]["version"] + 1)) - {m["version"] for m in chain}
    assert all(store.exists(f"{version_dir(m['version'])}/{MANIFEST}") for m in chain)
    committed = committed_offsets(kafka_bootstrap, cfg["kafka"]["group_id"], topic, PARTITIONS)
    assert committed == {int(p): o for p, o in chain[-1]["offsets"][topic].items()}
