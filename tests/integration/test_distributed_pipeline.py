"""Data-parallel learners under torchrun against the real broker (issue 10): two gloo ranks on
127.0.0.1, a 4-partition topic with one partition idle, the lineage exact — also through a SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stream_learner.service.producer import produce_lines
from stream_learner.service.storage import ObjectStore, open_store
from stream_learner.service.topics import ensure_topics
from stream_learner.service.versions import list_versions, read_latest, read_manifest
from tests.integration.test_lineage import events
from tests.support.learner_process import (
    SMALL_TRAINING,
    LearnerProcess,
    assert_exact_lineage,
    small_model,
)

PARTITIONS = 4
BUSY = (0, 1, 2)  # partition 3 gets nothing: rank 1 owns it and partition 1
RANKS = 2


def torchrun(max_restarts: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={RANKS}",
        f"--max-restarts={max_restarts}",
        "--monitor-interval=0.5",
        "--no-python",
    ]


def group_config(bootstrap: str, topic: str, url: str, every_steps: int) -> dict:
    return {
        "kafka": {
            "bootstrap_servers": bootstrap,
            "topic": topic,
            "group_id": f"{topic}-group",
            "topic_partitions": PARTITIONS,
            "poll_max_messages": 50,
        },
        "model": small_model(),
        "training": SMALL_TRAINING,
        "replay": {"capacity": 200},
        "publish": {"keep_versions": 0, "storage_url": url, "every_steps": every_steps, "every_seconds": 5},
        # every step: all ranks hold the same weights, or the trainer fails
        "distributed": {"check_every_steps": 1, "timeout_s": 60},
    }


def produce(
    bootstrap: str, topic: str, batch: list[tuple[bytes, bool]], valid: dict[int, list[bool]]
) -> None:
    for i, p in enumerate(BUSY):
        mine = batch[i :: len(BUSY)]
        produce_lines({"bootstrap.servers": bootstrap}, topic, [v for v, _ in mine], partition=p)
        valid[p].extend(ok for _, ok in mine)


def wait_covered(store: ObjectStore, topic: str, valid: dict[int, list[bool]], group: LearnerProcess) -> dict:
    """Wait until LATEST's offsets reach the end of every partition; its manifest."""
    want = {str(p): len(v) for p, v in valid.items() if v}
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        assert group.proc.poll() is None, f"the group exited ({group.proc.returncode}):\n{group.log[-5000:]}"
        latest, _ = read_latest(store)
        if latest is not None:
            manifest = read_manifest(store, latest)
            if manifest["offsets"][topic] == want:
                return manifest
        time.sleep(0.5)
    raise AssertionError(f"LATEST never covered {want}:\n{group.log[-5000:]}")


def worker_pid(group: LearnerProcess, rank: int) -> int:
    """The pid of rank ``rank``: the torchrun agent's child whose environment says RANK=<rank>."""
    children = subprocess.run(["pgrep", "-P", str(group.proc.pid)], capture_output=True, text=True).stdout
    for pid in map(int, children.split()):
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in environ:
            return pid
    raise AssertionError(f"no rank {rank} among {children.split()}")


def start_group(tmp_path: Path, cfg: dict, max_restarts: int) -> LearnerProcess:
    group = LearnerProcess(cfg, tmp_path, name="group", launcher=torchrun(max_restarts), ranks=RANKS)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    return group.start()


def stop_group(group: LearnerProcess) -> None:
    """SIGTERM to torchrun, which passes it to every rank: a graceful stop and a final version."""
    group.proc.send_signal(signal.SIGTERM)
    group.proc.wait(timeout=180)


def new_topic(bootstrap: str, topic: str, tmp_path: Path) -> tuple[str, dict[int, list[bool]]]:
    """The topic and its dead-letter topic created; the store's URL and an empty validity record."""
    ensure_topics({"bootstrap.servers": bootstrap}, {topic: PARTITIONS, f"{topic}.dlq": PARTITIONS})
    return (tmp_path / "store").as_uri(), {p: [] for p in range(PARTITIONS)}


@pytest.mark.slow(seconds=14)
def test_two_ranks_learn_one_model_from_disjoint_partitions(kafka_bootstrap, unique_topic, tmp_path):
    topic = unique_topic("ddp")
    url, valid = new_topic(kafka_bootstrap, topic, tmp_path)
    produce(kafka_bootstrap, topic, events(90, bad_every=10), valid)
    group = start_group(tmp_path, group_config(kafka_bootstrap, topic, url, every_steps=4), max_restarts=0)
    try:
        store = open_store(url)
        wait_covered(store, topic, valid, group)
        produce(kafka_bootstrap, topic, events(60, bad_every=10, start=90), valid)  # a second version
        wait_covered(store, topic, valid, group)
        rank1 = LearnerProcess.__new__(LearnerProcess)  # rank 1 serves /metrics on the next port
        rank1.http_port = group.http_port + 1
        checks = [lp.metric("stream_learner_weight_checks_total") for lp in (group, rank1)]
        steps = group.metric("stream_learner_steps_total")
        stop_group(group)
    finally:
        group.close()
    log = group.log
    assert "rank 0 of 2 consumes partitions [0, 2]" in log and "rank 1 of 2 consumes partitions [1, 3]" in log
    # the weights were compared after every step, and matched: both ranks took every step
    assert steps > 0 and checks == [steps, steps]
    chain = assert_exact_lineage(store, topic, valid)
    assert len(chain) >= 2 and all(m["world_size"] == RANKS for m in chain)
    # both ranks' replay buffers are in every version
    assert all("trainer_state/replay-rank1.safetensors" in m["files"] for m in chain)


@pytest.mark.slow(seconds=16)
def test_a_rank_killed_mid_run_restarts_the_group_from_latest(kafka_bootstrap, unique_topic, tmp_path):
    topic = unique_topic("ddp-kill")
    url, valid = new_topic(kafka_bootstrap, topic, tmp_path)
    produce(kafka_bootstrap, topic, events(240, bad_every=10), valid)
    group = start_group(tmp_path, group_config(kafka_bootstrap, topic, url, every_steps=2), max_restarts=2)
    try:
        store = open_store(url)
        deadline = time.monotonic() + 240
        while not list_versions(store) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert list_versions(store), f"no version published:\n{group.log[-5000:]}"
        victim = worker_pid(group, rank=1)
        os.kill(victim, signal.SIGKILL)
        # torchrun brings the whole group down and starts it again: both ranks resume from LATEST
        group.wait_for_log(r"resuming from version \d+", timeout=240)
        produce(kafka_bootstrap, topic, events(60, bad_every=10, start=240), valid)
        wait_covered(store, topic, valid, group)
        assert worker_pid(group, rank=1) != victim
        stop_group(group)
    finally:
        group.close()
    chain = assert_exact_lineage(store, topic, valid)
    # the lineage runs through the restart: versions before and after it descend from each other
    assert len(chain) >= 3
