"""The publisher on a real local store: claims, the LATEST fence, retries, corruption, retention, rollback."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import queue
import threading
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from stream_learner.app import static_files
from stream_learner.cli import app as cli
from stream_learner.metrics import Metrics
from stream_learner.publisher import (
    CLAIM,
    LATEST,
    MANIFEST,
    WEIGHTS,
    CorruptVersion,
    FencedOut,
    Publisher,
    list_versions,
    load_newest_intact,
    load_version,
    prune_versions,
    read_latest,
    read_manifest,
    rollback,
    version_dir,
)
from stream_learner.storage import LocalStore, ObjectStore
from stream_learner.trainer import Snapshot
from tests.factories import batch, make_trainer, small_settings, tiny_rows, tokenized, tokenizer


@functools.cache
def _trained() -> tuple:
    """A 1-layer trainer after two steps, and the settings it ran with (built once: loading costs)."""
    s = small_settings()
    trainer = make_trainer(s)
    for k in range(2):
        events = tokenized(tiny_rows(16)[8 * k : 8 * k + 8], s, first_offset=8 * k)
        trainer.accept(batch(events))
        trainer.step(trainer._take_fresh())
        trainer._advance_offsets()
    return s, trainer


@pytest.fixture
def snap() -> Snapshot:
    return _trained()[1].snapshot()


def make_publisher(store: ObjectStore, keep: int = 0) -> Publisher:
    s, trainer = _trained()
    s = s.model_copy(update={"publish": s.publish.model_copy(update={"keep_versions": keep})})
    return Publisher(
        s,
        store,
        static_files(trainer.model, tokenizer()),
        publish_queue=queue.Queue(maxsize=1),
        commit_queue=queue.Queue(),
        metrics=Metrics(),
        stop=threading.Event(),
        parent=None,
        latest=read_latest(store),
    )


def test_publish_writes_the_layout_then_latest_then_hands_offsets_to_commit(tmp_path: Path, snap) -> None:
    store = LocalStore(tmp_path)
    pub = make_publisher(store)
    assert pub.publish_version(snap) == 1
    assert read_latest(store)[0] == 1
    manifest = read_manifest(store, 1)
    assert manifest["parent"] is None and manifest["offsets"] == {pub.settings.kafka.topic: {"0": 16}}
    assert manifest["events_ingested"] == 16 and manifest["steps"] == 2
    assert {WEIGHTS, "config.json", "trainer_state/optimizer.safetensors"} <= manifest["files"].keys()
    assert pub.commit_queue.get_nowait() == {0: 16}
    restored, _ = load_version(store, 1, tmp_path / "work")
    assert restored.counters.events_ingested == 16 and restored.offsets == {0: 16}
    # the second version names the first as its parent
    assert pub.publish_version(snap) == 2 and read_manifest(store, 2)["parent"] == 1


def test_two_publishers_on_one_prefix_exactly_one_advances_latest(tmp_path: Path, snap) -> None:
    store = LocalStore(tmp_path)
    a, b = make_publisher(store), make_publisher(store)  # both saw an empty store
    assert a.publish_version(snap) == 1
    with pytest.raises(FencedOut, match="another learner advanced LATEST"):
        b.publish_version(snap)
    assert read_latest(store)[0] == 1
    # b uploaded into a directory of its own (claimed 2), never into a's
    assert store.get(f"{version_dir(1)}/{CLAIM}").decode() == a.writer_id
    assert store.get(f"{version_dir(2)}/{CLAIM}").decode() == b.writer_id
    assert b.commit_queue.empty()  # the loser commits nothing
    # the winner goes on, skipping the loser's directory; the lineage stays a → a
    assert a.publish_version(snap) == 3
    assert read_manifest(store, 3)["parent"] == 1


def test_leftovers_of_a_run_that_died_mid_publish_are_skipped(tmp_path: Path, snap) -> None:
    store = LocalStore(tmp_path)
    make_publisher(store).publish_version(snap)
    # a dead run claimed version 2 and uploaded part of it
    store.put(f"{version_dir(2)}/{CLAIM}", b"dead-writer")
    store.put(f"{version_dir(2)}/{WEIGHTS}", b"half a file")
    pub = make_publisher(store)
    pub.parent = 1
    assert pub.publish_version(snap) == 3
    assert read_latest(store)[0] == 3 and read_manifest(store, 3)["parent"] == 1
    assert store.get(f"{version_dir(2)}/{WEIGHTS}") == b"half a file"  # untouched, not mixed in


class FlakyStore(LocalStore):
    """A real local store whose first ``failures`` writes fail, as a store does during an outage."""

    def __init__(self, root: Path, failures: int) -> None:
        super().__init__(root)
        self.failures = failures

    def _maybe_fail(self) -> None:
        if self.failures > 0:
            self.failures -= 1
            raise ConnectionError("storage unreachable")

    def put(self, key: str, data: bytes, **kwargs) -> str:
        self._maybe_fail()
        return super().put(key, data, **kwargs)

    def put_file(self, key: str, path: Path) -> str:
        self._maybe_fail()
        return super().put_file(key, path)


def test_storage_errors_are_retried_counted_and_flagged(tmp_path: Path, snap) -> None:
    store = FlakyStore(tmp_path, failures=3)
    pub = make_publisher(store)
    pub.retrying = pub.retrying.copy(wait=lambda _: 0.01)
    seen_degraded = []
    original = store.put

    def watching_put(key, data, **kw):
        seen_degraded.append(pub.degraded.is_set())
        return original(key, data, **kw)

    store.put = watching_put
    assert pub.publish_version(snap) == 1
    assert pub.metrics.value("stream_learner_publish_failures_total") == 3
    assert seen_degraded[:5] == [False, True, True, True, False]  # degraded while failing…
    assert not pub.degraded.is_set()  # …and clear once writes succeed
    assert pub.metrics.value("stream_learner_publish_degraded") == 0
    load_version(store, 1, tmp_path / "work")  # complete and intact


def test_abort_ends_retrying_and_latest_is_untouched(tmp_path: Path, snap) -> None:
    store = FlakyStore(tmp_path, failures=10**9)
    pub = make_publisher(store)
    pub.retrying = pub.retrying.copy(wait=lambda _: 0.05)
    threading.Timer(0.5, pub.abort.set).start()
    with pytest.raises(ConnectionError):
        pub.publish_version(snap)
    assert pub.degraded.is_set() and pub.metrics.value("stream_learner_publish_degraded") == 1
    assert read_latest(store) == (None, None) and pub.commit_queue.empty()


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_corrupt_latest_is_refused_and_the_newest_intact_version_loaded(tmp_path: Path, snap, caplog):
    store = LocalStore(tmp_path / "store")
    pub = make_publisher(store)
    pub.publish_version(snap)
    pub.publish_version(snap)
    flip_a_byte(tmp_path / "store" / version_dir(2) / WEIGHTS)
    refused: list[CorruptVersion] = []
    restored, manifest = load_newest_intact(store, tmp_path / "work", refused.append)
    assert restored.version == 1 and manifest["version"] == 1
    assert len(refused) == 1 and f"{WEIGHTS} does not match the sha256" in str(refused[0])
    with pytest.raises(CorruptVersion, match="version 2"):
        load_version(store, 2, tmp_path / "work2")


def test_the_learner_counts_and_logs_a_corrupt_version(tmp_path: Path, snap, caplog) -> None:
    from stream_learner.app import Learner

    store = LocalStore(tmp_path / "store")
    pub = make_publisher(store)
    pub.publish_version(snap)
    pub.publish_version(snap)
    flip_a_byte(tmp_path / "store" / version_dir(2) / WEIGHTS)
    learner = Learner(small_settings(publish={"storage_url": (tmp_path / "store").as_uri()}))
    learner.store = store
    with caplog.at_level(logging.ERROR):
        restored = learner._restore()
    assert restored.version == 1 and learner.restored_version == 1
    assert learner._latest_version == 2  # new versions are numbered after it and fenced on its ETag
    assert learner.metrics.value("stream_learner_corrupt_versions_total") == 1
    [line] = [r.getMessage() for r in caplog.records if "refusing" in r.getMessage()]
    assert "version 2" in line and "sha256" in line and "\n" not in line


def test_retention_keeps_the_newest_and_never_what_latest_names(tmp_path: Path, snap) -> None:
    store = LocalStore(tmp_path)
    pub = make_publisher(store, keep=2)
    for _ in range(4):
        pub.publish_version(snap)
    assert [m["version"] for m in list_versions(store)] == [3, 4]
    rollback(store, 3)
    assert prune_versions(store, keep=1) == []  # 4 is the newest, 3 is LATEST: both stay
    pub2 = make_publisher(store, keep=1)
    pub2.parent = 3
    assert pub2.publish_version(snap) == 5  # after the rollback, numbering skips the existing 4
    assert read_manifest(store, 5)["parent"] == 3
    assert [m["version"] for m in list_versions(store)] == [5]


def test_cli_versions_list_rollback_prune(tmp_path: Path, snap) -> None:
    store = LocalStore(tmp_path / "store")
    pub = make_publisher(store)
    for _ in range(3):
        pub.publish_version(snap)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"publish": {"storage_url": (tmp_path / "store").as_uri()}}))
    runner = CliRunner()

    listed = runner.invoke(cli, ["versions", "list", "--json", "-c", str(config)])
    assert listed.exit_code == 0, listed.output
    assert json.loads(listed.stdout)["latest"] == 3

    rolled = runner.invoke(cli, ["versions", "rollback", "2", "-c", str(config)])
    assert rolled.exit_code == 0, rolled.output
    assert read_latest(store)[0] == 2

    flip_a_byte(tmp_path / "store" / version_dir(1) / WEIGHTS)
    refused = runner.invoke(cli, ["versions", "rollback", "1", "-c", str(config)])
    assert refused.exit_code == 1 and "does not match the sha256" in refused.output
    assert read_latest(store)[0] == 2  # LATEST not moved to a corrupt version

    missing = runner.invoke(cli, ["versions", "rollback", "9", "-c", str(config)])
    assert missing.exit_code == 1 and "version 9" in missing.output

    pruned = runner.invoke(cli, ["versions", "prune", "--keep", "1", "-c", str(config)])
    assert pruned.exit_code == 0, pruned.output
    # 3 is the newest, 2 is LATEST: both stay; 1 goes
    assert [m["version"] for m in list_versions(store)] == [2, 3]
    assert store.exists(LATEST) and store.exists(f"{version_dir(2)}/{MANIFEST}")


def test_the_gate_holds_latest_and_numbers_every_rejected_candidate(tmp_path: Path, snap) -> None:
    store = LocalStore(tmp_path)
    pub = make_publisher(store)
    scored = lambda acc: dataclasses.replace(snap, metrics={**snap.metrics, "probe_accuracy": acc})  # noqa: E731
    assert pub.publish_version(scored(0.80)) == 1
    assert pub.publish_version(scored(0.70)) == 2  # more than 0.05 below LATEST's 0.80
    assert pub.publish_version(scored(0.74)) == 3
    assert read_latest(store)[0] == 1 and pub.commit_queue.qsize() == 1  # no offsets for candidates
    third = read_manifest(store, 3)
    assert third["parent"] == 2 and third["rejected"]["latest_probe_accuracy"] == 0.80
    assert pub.metrics.value("stream_learner_versions_rejected_total") == 2
    assert pub.publish_version(scored(0.76)) == 4  # within the margin again: LATEST moves, lineage intact
    assert read_latest(store)[0] == 4 and read_manifest(store, 4)["parent"] == 3
    assert "rejected" not in read_manifest(store, 4)


def test_a_killed_learners_staging_dir_is_removed_at_the_next_start(tmp_path):
    """SIGKILL mid-publish leaves the staged version behind (no ``finally`` runs); the next learner on
    the machine removes it, and leaves a live learner's alone."""
    import signal
    import subprocess
    import sys

    from stream_learner.staging import remove_stale_staging_dirs, staging_dir

    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import pathlib, sys, time; from stream_learner.staging import staging_dir\n"
            "d = staging_dir('publish'); pathlib.Path(d.name, 'model.safetensors').write_bytes(b'0' * 4096)\n"
            "print(d.name, flush=True); time.sleep(60)",
        ],
        env={**os.environ, "TMPDIR": str(tmp_path)},
        stdout=subprocess.PIPE,
        text=True,
    )
    killed = Path(child.stdout.readline().strip())
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert (killed / "model.safetensors").is_file()  # what SIGKILL leaves
    live = tmp_path / f"stream-learner-publish-{os.getpid()}-live"  # as staging_dir names this process's
    live.mkdir()
    other = tmp_path / "stream-learner-scaling-abc"  # not a staging directory's name
    other.mkdir()
    assert remove_stale_staging_dirs(tmp_path) == 1
    assert not killed.exists() and live.is_dir() and other.is_dir()
    with staging_dir("publish") as path:
        assert Path(path).name.startswith(f"stream-learner-publish-{os.getpid()}-")
