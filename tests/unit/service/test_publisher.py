"""The publisher on a real local store: claims, the LATEST fence, retries, corruption, retention, rollback."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from stream_learner.cli import app as cli
from stream_learner.service.app import static_files
from stream_learner.service.publisher import Publisher, load_newest_intact, load_version, rollback
from stream_learner.service.storage import LocalStore, ObjectStore
from stream_learner.service.versions import (
    ABANDONED,
    CLAIM,
    FENCED,
    INCOMPLETE,
    LATEST,
    MANIFEST,
    PUBLISHED,
    REJECTED,
    WEIGHTS,
    CorruptVersion,
    FencedOut,
    RollbackRefused,
    chain_of,
    claim_writer,
    list_versions,
    prune_versions,
    read_latest,
    read_manifest,
    version_dir,
    version_statuses,
)
from stream_learner.training.state import Counters, Snapshot
from tests.support.factories import batch, make_trainer, small_settings, tiny_rows, tokenized, tokenizer


@functools.cache
def _trained() -> tuple:
    """A trainer (the tiny model) after two steps, and the settings it ran with (built once)."""
    s = small_settings()
    trainer = make_trainer(s)
    for k in range(2):
        events = tokenized(tiny_rows(16)[8 * k : 8 * k + 8], s, first_offset=8 * k)
        trainer.accept(batch(events))
        trainer.train_window(trainer.take_fresh(8))
        trainer.ledger.advance()
    return s, trainer


@pytest.fixture
def snap() -> Snapshot:
    return _trained()[1].snapshot()


def make_publisher(store: ObjectStore, keep: int = 0) -> Publisher:
    s, trainer = _trained()
    s = s.model_copy(update={"publish": s.publish.model_copy(update={"keep_versions": keep})})
    return Publisher.standalone(s, store, static_files(trainer.engine.model, tokenizer()))


def test_publish_writes_the_layout_then_latest_then_hands_offsets_to_commit(tmp_path: Path, snap) -> None:
    store = LocalStore(tmp_path)
    pub = make_publisher(store)
    assert pub.publish_version(snap) == 1
    assert read_latest(store)[0] == 1
    manifest = read_manifest(store, 1)
    assert manifest["parent"] is None and manifest["offsets"] == {pub.settings.kafka.topic: {"0": 16}}
    assert manifest["events_trained"] == 16 and manifest["steps"] == 2
    assert {WEIGHTS, "config.json", "trainer_state/optimizer.safetensors"} <= manifest["files"].keys()
    assert pub.commit_queue.get_nowait() == {0: 16}
    restored, _ = load_version(store, 1, tmp_path / "work")
    assert restored.counters.events_trained == 16 and restored.offsets == {0: 16}
    # the second version names the first as its parent
    assert pub.publish_version(snap) == 2 and read_manifest(store, 2)["parent"] == 1


@pytest.mark.skipif(sys.platform != "linux", reason="nice is per thread on Linux only")
def test_the_publisher_thread_publishes_at_publish_nice_and_leaves_the_others_as_they_were(
    tmp_path: Path, snap
) -> None:
    class Watched(Publisher):
        def publish_version(self, snap: Snapshot) -> int:
            self.nice_seen = os.getpriority(os.PRIO_PROCESS, 0)  # 0: the calling thread, on Linux
            return super().publish_version(snap)

    s, trainer = _trained()
    nice = os.getpriority(os.PRIO_PROCESS, 0) + 3  # above this thread's, whatever the test runs at
    s = s.model_copy(update={"publish": s.publish.model_copy(update={"nice": min(nice, 19)})})
    pub = Watched.standalone(s, LocalStore(tmp_path), static_files(trainer.engine.model, tokenizer()))
    before = os.getpriority(os.PRIO_PROCESS, 0)
    thread = threading.Thread(target=pub.run)
    thread.start()
    pub.publish_queue.put(snap)
    assert pub.commit_queue.get(timeout=60) == {0: 16}
    pub.stop_event.set()
    thread.join(10)
    assert pub.nice_seen == min(nice, 19)
    assert os.getpriority(os.PRIO_PROCESS, 0) == before  # the trainer's threads keep theirs


def test_the_drift_state_survives_a_restart_through_a_version(tmp_path: Path, snap) -> None:
    """A learner resumed from a version carries on the drift signals where they were (their windows,
    sums and detections), not warmed up from nothing: see test_drift's restart test for why."""
    store = LocalStore(tmp_path)
    make_publisher(store).publish_version(snap)
    restored, _ = load_version(store, 1, tmp_path / "work")
    s, trainer = _trained()
    resumed = make_trainer(s, restored=restored)
    assert trainer.drift is not None and resumed.drift is not None
    assert resumed.drift.monitor.events_seen == trainer.drift.monitor.events_seen == 16
    (arrays, meta), (arrays0, meta0) = resumed.drift.state_dict(), trainer.drift.state_dict()
    assert meta == json.loads(json.dumps(meta0)) and arrays.keys() == arrays0.keys()
    for k, v in arrays0.items():
        np.testing.assert_array_equal(arrays[k], v)
    # a version written before the drift state was kept (format 1) resumes with fresh signals
    old = dataclasses.replace(restored, drift=None)
    assert make_trainer(s, restored=old).drift.monitor.events_seen == 0


def test_a_format_1_version_still_reads(tmp_path: Path, snap) -> None:
    """Format 1 called the events a version learned ``events_ingested``: manifests, the state's
    counters and ``versions list`` read it as ``events_trained``."""
    store = LocalStore(tmp_path)
    make_publisher(store).publish_version(snap)
    root = tmp_path / "versions" / "000001"
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["format"] = 1
    manifest["events_ingested"] = manifest.pop("events_trained")
    (root / "manifest.json").write_text(json.dumps(manifest))
    assert read_manifest(store, 1)["events_trained"] == 16
    assert Counters.from_dict({"steps": 2, "events_ingested": 16}) == Counters(steps=2, events_trained=16)


def test_two_publishers_on_one_prefix_exactly_one_advances_latest(tmp_path: Path, snap) -> None:
    store = LocalStore(tmp_path)
    a, b = make_publisher(store), make_publisher(store)  # both saw an empty store
    assert a.publish_version(snap) == 1
    with pytest.raises(FencedOut, match="another learner advanced LATEST"):
        b.publish_version(snap)
    assert read_latest(store)[0] == 1
    # b uploaded into a directory of its own (claimed 2), never into a's
    assert claim_writer(store.get(f"{version_dir(1)}/{CLAIM}")) == a.writer_id
    assert claim_writer(store.get(f"{version_dir(2)}/{CLAIM}")) == b.writer_id
    assert json.loads(store.get(f"{version_dir(2)}/{CLAIM}"))["parent"] is None  # the claim names the parent
    assert version_statuses(store) == {1: PUBLISHED, 2: FENCED}  # the loser marked its version fenced
    assert read_manifest(store, 2)["status"] == FENCED
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
    load_version(store, 3, tmp_path / "work")  # its own directory: nothing of the leftover mixed in
    # and retention, after the publish, removed the leftover (keep_versions 0 too)
    assert store.list(version_dir(2) + "/") == []


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

    def put_file(self, key: str, path: Path, **kwargs) -> str:
        self._maybe_fail()
        return super().put_file(key, path, **kwargs)


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


def test_a_corrupt_latest_is_refused_and_its_parent_loaded(tmp_path: Path, snap, caplog):
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
    from stream_learner.service.app import Learner

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


# ------------------------------------------------------- lineage-true recovery, statuses, retention
# Versions of a 4-weight stand-in model: a few KB each, published in milliseconds. Recovery, statuses,
# rollback and retention read manifests, claims and sha256s; they never look inside the weights.
@functools.cache
def model_config_json(layers: int) -> bytes:
    from transformers import AutoConfig

    from stream_learner.core.model import resolve_model_path

    path = resolve_model_path(small_settings().model.name_or_path)
    return AutoConfig.from_pretrained(path, num_hidden_layers=layers).to_json_string().encode()


def tiny_snapshot(events: int = 8, probe: float | None = None) -> Snapshot:
    return Snapshot(
        model_state={"w": torch.full((4,), float(events))},
        optimizer_state={
            "state": {0: {"step": torch.tensor(float(events)), "exp_avg": torch.zeros(4)}},
            "param_groups": [{"lr": 1e-4, "params": [0]}],
        },
        replay_arrays={"ids": np.zeros(3, dtype=np.int64)},
        replay_meta={"seen": events},
        torch_rng=torch.get_rng_state(),
        counters=Counters(steps=events // 8, events_trained=events),
        offsets={0: events},
        metrics={} if probe is None else {"probe_accuracy": probe},
    )


def tiny_publisher(
    store: ObjectStore, keep: int = 0, parent: int | None = None, latest: tuple | None = None
) -> Publisher:
    s = small_settings(publish={"keep_versions": keep})
    return Publisher.standalone(s, store, {"config.json": model_config_json(1)}, parent, latest)


def resumed_publisher(store: ObjectStore, keep: int = 0, workdir: Path | None = None) -> Publisher:
    """A learner's publisher after a restart: resumed from what recovery loads, numbered after LATEST."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        found = load_newest_intact(store, workdir or Path(tmp), lambda err: None)
    return tiny_publisher(store, keep, parent=found[0].version if found else None)


def rejected(pub: Publisher, events: int = 8) -> int:
    """Publish a candidate the poisoning gate holds back."""
    pub.latest_probe_accuracy = 0.9
    pub.settings = pub.settings.model_copy(
        update={"probe": pub.settings.probe.model_copy(update={"max_accuracy_drop": 0.05})}
    )
    version = pub.publish_version(tiny_snapshot(events, probe=0.5))
    pub.latest_probe_accuracy = None
    return version


def fenced(store: ObjectStore) -> int:
    """A second learner with a stale view of LATEST publishes: it loses the fence. Returns its version."""
    latest, _ = read_latest(store)
    rogue = tiny_publisher(store, parent=latest, latest=(latest, "an-etag-long-gone"))
    with pytest.raises(FencedOut):
        rogue.publish_version(tiny_snapshot())
    return rogue._last_claimed


def damage(store: LocalStore, version: int, name: str = WEIGHTS) -> None:
    flip_a_byte(store.root / version_dir(version) / name)


def resume(store: ObjectStore, tmp_path: Path) -> tuple[int, list[CorruptVersion]]:
    refused: list[CorruptVersion] = []
    found = load_newest_intact(store, tmp_path / f"work-{len(list(tmp_path.iterdir()))}", refused.append)
    assert found is not None
    return found[0].version, refused


def test_recovery_walks_latests_chain_and_never_the_branch_a_rollback_abandoned(tmp_path, caplog):
    store = LocalStore(tmp_path / "store")
    pub = tiny_publisher(store)
    for _ in range(3):
        pub.publish_version(tiny_snapshot())
    rollback(store, 2)  # 3 is abandoned: the highest-numbered intact version, and the wrong one
    pub = resumed_publisher(store)
    assert pub.publish_version(tiny_snapshot()) == 4 and pub.publish_version(tiny_snapshot()) == 5
    assert chain_of(store, 5) == [5, 4, 2, 1]

    damage(store, 5)
    with caplog.at_level(logging.WARNING, logger="stream_learner.service.publisher"):
        version, refused = resume(store, tmp_path)
    assert version == 4 and [e.version for e in refused] == [5]
    [line] = [r for r in caplog.records if "LATEST names" in r.getMessage()]
    assert line.levelno == logging.WARNING and line.getMessage() == (
        f"LATEST names 5, corrupt ({WEIGHTS} does not match the sha256 in its manifest); "
        "resuming from its parent 4"
    )

    damage(store, 4)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="stream_learner.service.publisher"):
        version, refused = resume(store, tmp_path)
    assert version == 2 and [e.version for e in refused] == [5, 4]  # not 3, the newest intact one
    assert "its parent 4 corrupt too" in caplog.text and "resuming from its parent 2" in caplog.text

    damage(store, 2)
    damage(store, 1)
    with pytest.raises(CorruptVersion, match="no intact version on LATEST's chain") as raised:
        resume(store, tmp_path)
    assert "version 1 has no parent" in str(raised.value) and "\n" not in str(raised.value)


def test_recovery_skips_rejected_and_fenced_ancestors(tmp_path, caplog):
    store = LocalStore(tmp_path / "store")
    pub = tiny_publisher(store)
    pub.publish_version(tiny_snapshot())  # 1
    assert rejected(pub) == 2
    assert (
        pub.publish_version(tiny_snapshot()) == 3
    )  # its parent is the rejected 2: the weights descend from it
    assert fenced(store) == 4
    rollback(store, 4, force=True)  # an operator insisted on the fenced one
    pub = resumed_publisher(store)
    assert pub.publish_version(tiny_snapshot()) == 5
    assert chain_of(store, 5) == [5, 4, 3, 2, 1]

    damage(store, 5)
    damage(store, 3)
    with caplog.at_level(logging.WARNING, logger="stream_learner.service.publisher"):
        version, refused = resume(store, tmp_path)
    assert version == 1 and [e.version for e in refused] == [5, 3]
    assert "its parent 4 is fenced: skipped" in caplog.text
    assert "its parent 2 is rejected: skipped; resuming from its parent 1" in caplog.text

    # LATEST itself is loaded whatever its status: a forced rollback chose it
    rollback(store, 2, force=True)
    assert resume(store, tmp_path) == (2, [])


def test_an_unreadable_manifest_names_its_parent_through_the_claim(tmp_path, caplog):
    store = LocalStore(tmp_path / "store")
    pub = tiny_publisher(store)
    for _ in range(3):
        pub.publish_version(tiny_snapshot())
    rollback(store, 1)
    pub = resumed_publisher(store)
    assert pub.publish_version(tiny_snapshot()) == 4  # parent 1; 2 and 3 abandoned
    store.put(f"{version_dir(4)}/{MANIFEST}", b"{ truncated")
    assert version_statuses(store) == {1: PUBLISHED, 2: ABANDONED, 3: ABANDONED, 4: "corrupt"}
    with caplog.at_level(logging.WARNING, logger="stream_learner.service.publisher"):
        assert resume(store, tmp_path)[0] == 1
    assert "LATEST names 4, corrupt (manifest missing or unreadable" in caplog.text
    assert "resuming from its parent 1" in caplog.text


def test_when_no_parent_can_be_known_the_last_resort_avoids_abandoned_rejected_and_fenced(tmp_path, caplog):
    store = LocalStore(tmp_path / "store")
    pub = tiny_publisher(store)
    for _ in range(2):
        pub.publish_version(tiny_snapshot())  # 1, 2
    pub.publish_version(tiny_snapshot())  # 3: rolled back below, below
    rollback(store, 2)
    pub = resumed_publisher(store)
    assert rejected(pub) == 4
    assert fenced(store) == 5
    assert pub.publish_version(tiny_snapshot()) == 6  # parent 4 (rejected); chain 6 4 2 1
    assert read_manifest(store, 3)["abandoned"]["rollback_to"] == 2  # the rollback's mark
    # version 6's manifest and claim are both gone: its parent cannot be known
    store.delete(f"{version_dir(6)}/{MANIFEST}")
    store.delete(f"{version_dir(6)}/{CLAIM}")
    with caplog.at_level(logging.WARNING, logger="stream_learner.service.publisher"):
        assert resume(store, tmp_path)[0] == 2  # not 5 (fenced), 4 (rejected) nor 3 (abandoned)
    [line] = [r for r in caplog.records if "LATEST names 6" in r.getMessage()]
    assert line.levelno == logging.ERROR and "the parent of 6 cannot be known" in line.getMessage()
    assert "a guess" in line.getMessage() and "\n" not in line.getMessage()


def test_statuses_of_every_kind_and_old_manifests_without_one(tmp_path):
    store = LocalStore(tmp_path / "store")
    pub = tiny_publisher(store)
    pub.publish_version(tiny_snapshot())  # 1
    pub.publish_version(tiny_snapshot())  # 2
    assert rejected(pub) == 3
    assert read_manifest(store, 3)["status"] == REJECTED
    assert fenced(store) == 4
    pub.publish_version(tiny_snapshot())  # 5, parent 3
    store.put(f"{version_dir(6)}/{CLAIM}", b"dead-writer")  # a publish cut short
    store.put(f"{version_dir(6)}/{WEIGHTS}", b"half")
    assert version_statuses(store) == {
        1: PUBLISHED,
        2: PUBLISHED,
        3: REJECTED,  # on the chain, still rejected
        4: FENCED,
        5: PUBLISHED,
        6: INCOMPLETE,
    }
    rollback(store, 2)
    statuses = version_statuses(store)
    assert statuses[5] == ABANDONED and statuses[2] == PUBLISHED and statuses[1] == PUBLISHED
    assert statuses[3] == REJECTED and statuses[4] == FENCED
    # a manifest of an older learner (no status, a plain-text claim) is read by inference
    old = read_manifest(store, 5)
    for key in ("status", "abandoned"):
        old.pop(key, None)
    store.put(f"{version_dir(5)}/{MANIFEST}", json.dumps(old).encode())
    store.put(f"{version_dir(5)}/{CLAIM}", b"host/1/abc")
    assert version_statuses(store)[5] == ABANDONED
    rollback(store, 5)  # rolled forward again: its chain is published again, and 2's mark… there is none
    assert version_statuses(store)[5] == PUBLISHED and "abandoned" not in read_manifest(store, 5)


def test_rollback_refuses_rejected_fenced_and_incomplete_versions(tmp_path):
    store = LocalStore(tmp_path / "store")
    pub = tiny_publisher(store)
    pub.publish_version(tiny_snapshot())
    assert rejected(pub) == 2
    assert fenced(store) == 3
    store.put(f"{version_dir(4)}/{CLAIM}", b"dead-writer")
    for version, status in ((2, REJECTED), (3, FENCED)):
        with pytest.raises(RollbackRefused) as refused:
            rollback(store, version)
        assert refused.value.status == status and refused.value.forceable
    with pytest.raises(RollbackRefused) as refused:
        rollback(store, 4, force=True)
    assert refused.value.status == INCOMPLETE and not refused.value.forceable
    assert read_latest(store)[0] == 1
    assert rollback(store, 2, force=True) == 1 and read_latest(store)[0] == 2


def test_retention_removes_leftovers_even_with_keep_0_and_keeps_latests_chain_first(tmp_path):
    store = LocalStore(tmp_path / "store")
    pub = tiny_publisher(store, keep=0)
    pub.publish_version(tiny_snapshot())  # 1
    store.put(f"{version_dir(2)}/{CLAIM}", b"dead-writer")  # a claim without files
    store.put(f"{version_dir(3)}/{CLAIM}", b"dead-writer")  # and one with part of its files
    store.put(f"{version_dir(3)}/{WEIGHTS}", b"half")
    pub.latest = 3  # numbered after the leftovers, as a learner started after them is
    assert pub.publish_version(tiny_snapshot()) == 4  # keep_versions 0: the leftovers go all the same
    assert sorted(version_statuses(store)) == [1, 4]
    store.put(f"{version_dir(5)}/{CLAIM}", b"a-publish-running-now")  # newer than the newest complete: stays
    assert prune_versions(store, 0) == [] and version_statuses(store)[5] == INCOMPLETE

    # keep 2: LATEST's chain first, then abandoned versions; rejected and fenced go first
    pub = tiny_publisher(store, parent=4)
    pub.latest = 5
    assert pub.publish_version(tiny_snapshot()) == 6  # chain 6 4 1
    assert 5 not in version_statuses(store)  # older than the newest complete one now: a leftover, gone
    assert rejected(pub) == 7
    assert fenced(store) == 8
    rollback(store, 4)  # 6 abandoned; chain 4 1
    assert version_statuses(store) == {1: PUBLISHED, 4: PUBLISHED, 6: ABANDONED, 7: REJECTED, 8: FENCED}
    assert prune_versions(store, 3) == [7]  # kept: 4 1 (chain), 6 (abandoned); 8 is the newest: stays
    assert prune_versions(store, 1) == [1, 6]  # kept: 4; and 8, the newest number (never reused)
    assert sorted(version_statuses(store)) == [4, 8]


def test_cli_list_shows_statuses_and_rollback_refuses_unless_forced(tmp_path):
    store = LocalStore(tmp_path / "store")
    pub = tiny_publisher(store)
    pub.publish_version(tiny_snapshot())  # 1
    pub.publish_version(tiny_snapshot())  # 2
    assert rejected(pub) == 3
    assert fenced(store) == 4
    rollback(store, 1)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"publish": {"storage_url": (tmp_path / "store").as_uri()}}))
    runner = CliRunner()
    listed = runner.invoke(cli, ["versions", "list", "--json", "-c", str(config)])
    assert listed.exit_code == 0, listed.output
    listing = json.loads(listed.stdout)
    assert listing["latest"] == 1
    assert listing["statuses"] == {"1": PUBLISHED, "2": ABANDONED, "3": REJECTED, "4": FENCED}
    assert [(m["version"], m["status"]) for m in listing["versions"]] == [
        (1, PUBLISHED),
        (2, ABANDONED),
        (3, REJECTED),
        (4, FENCED),
    ]
    table = runner.invoke(cli, ["versions", "list", "-c", str(config)], env={"COLUMNS": "200"})
    assert table.exit_code == 0, table.output
    cells = [line.split("│") for line in table.stdout.splitlines() if line.startswith("│")]
    rows = {row[1].strip(): row[-2].strip() for row in cells}
    assert rows == {
        "1": "published ◀ LATEST",
        "2": "abandoned (rollback to 1)",
        "3": "rejected (gate)",
        "4": "fenced",
    }
    for version, why in (("3", "poisoning gate: probe accuracy 0.500"), ("4", "lost LATEST to another")):
        refused = runner.invoke(cli, ["versions", "rollback", version, "-c", str(config)])
        assert refused.exit_code == 1
        [line] = refused.output.strip().splitlines()
        assert line.startswith(f"stream-learner: cannot roll back: version {version} is ") and why in line
        assert line.endswith("pass --force to roll back to it anyway")
    assert read_latest(store)[0] == 1
    forced = runner.invoke(cli, ["versions", "rollback", "3", "--force", "-c", str(config)])
    assert forced.exit_code == 0, forced.output
    assert read_latest(store)[0] == 3


def test_an_architecture_other_than_latests_fails_at_start_naming_the_setting(tmp_path):
    from transformers import AutoConfig

    from stream_learner.core.config import ConfigError
    from stream_learner.core.model import resolve_model_path
    from stream_learner.service.app import Learner

    store = LocalStore(tmp_path / "store")
    tiny_publisher(store).publish_version(tiny_snapshot())  # a 1-layer model's version
    settings = small_settings(
        model={"num_hidden_layers": 2}, publish={"storage_url": (tmp_path / "store").as_uri()}
    )
    two_layers = AutoConfig.from_pretrained(
        resolve_model_path(settings.model.name_or_path), num_hidden_layers=2
    )
    learner = Learner(settings)
    learner.store = store
    with pytest.raises(ConfigError) as raised:
        learner._restore(two_layers)
    message = str(raised.value)
    assert message.startswith("model.num_hidden_layers: ") and "\n" not in message
    assert "num_hidden_layers 1 there, 2 here" in message and "set model.num_hidden_layers to 1" in message
    # the same architecture resumes
    one_layer = AutoConfig.from_pretrained(
        resolve_model_path(settings.model.name_or_path), num_hidden_layers=1
    )
    assert learner._restore(one_layer).version == 1
    # another width is another model: named as such
    wide = one_layer.to_dict() | {"hidden_size": 768}
    with pytest.raises(ConfigError, match=r"^model\.name_or_path: .*hidden_size 32 there, 768 here"):
        learner._restore(wide)
