"""The inference server's parts on a real local store and real versions of the tiny model: which versions
may be served (``versions.servable_manifest``), the loader's checks, and the batcher's guarantee that
a batch runs on the version it held when it opened, swaps falling between batches."""

from __future__ import annotations

import json
import queue
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from stream_learner.service.metrics import ServingMetrics
from stream_learner.service.serving.batcher import Answer, Infer, MicroBatcher, Stop, Swap
from stream_learner.service.serving.follower import VersionFollower
from stream_learner.service.serving.loader import VersionLoader, served_file
from stream_learner.service.serving.server import bind
from stream_learner.service.storage import LocalStore
from stream_learner.service.versions import (
    CORRUPT,
    FENCED,
    INCOMPLETE,
    MANIFEST,
    REJECTED,
    WEIGHTS,
    NotServable,
    servable_manifest,
    version_dir,
)
from tests.support.serving import TEXTS, VersionSource, plain_transformers


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A local store with versions 1 and 2 of the tiny model."""
    root = tmp_path_factory.mktemp("versions")
    source = VersionSource(LocalStore(root))
    source.publish()
    source.publish()
    return root


def loader(root: Path, metrics: ServingMetrics | None = None, max_batch: int = 32) -> VersionLoader:
    return VersionLoader(
        LocalStore(root, create=False), torch.device("cpu"), 64, max_batch, metrics or ServingMetrics()
    )


def edit_manifest(root: Path, version: int, change) -> None:
    path = root / version_dir(version) / MANIFEST
    path.write_text(json.dumps(change(json.loads(path.read_text()))))


def test_only_complete_readable_versions_neither_rejected_nor_fenced_may_be_served(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    VersionSource(store).publish()
    assert servable_manifest(store, 1)["version"] == 1
    cases = {
        REJECTED: lambda m: {**m, "status": "rejected"},
        FENCED: lambda m: {**m, "status": "fenced"},
        CORRUPT: lambda m: [m],
    }
    for status, change in cases.items():
        manifest = (tmp_path / version_dir(1) / MANIFEST).read_text()
        edit_manifest(tmp_path, 1, change)
        with pytest.raises(NotServable) as err:
            servable_manifest(store, 1)
        assert err.value.status == status
        (tmp_path / version_dir(1) / MANIFEST).write_text(manifest)
    with pytest.raises(NotServable) as err:
        servable_manifest(store, 2)
    assert err.value.status == INCOMPLETE


def test_the_loader_fetches_only_what_serves_and_checks_its_sha256(published: Path, tmp_path: Path) -> None:
    assert served_file(WEIGHTS) and served_file("tokenizer.json")
    assert not served_file("trainer_state/optimizer.safetensors")
    metrics = ServingMetrics()
    classifier = loader(published, metrics).load(2)
    assert classifier.version == 2 and classifier.labels == ("neg", "pos")
    assert not classifier.model.training and not any(p.requires_grad for p in classifier.model.parameters())
    np.testing.assert_allclose(
        classifier.predict(TEXTS), plain_transformers(published / version_dir(2), TEXTS), atol=1e-5
    )
    assert metrics.value("stream_learner_serving_load_seconds_count") == 1
    # one byte of a tokenizer file changed: corrupt, whichever file it is
    store = tmp_path / "store"
    VersionSource(LocalStore(store)).publish()
    vocab = store / version_dir(1) / "tokenizer.json"
    vocab.write_bytes(vocab.read_bytes().replace(b"the", b"thE", 1))
    with pytest.raises(NotServable) as err:
        loader(store).load(1)
    assert err.value.status == CORRUPT and "tokenizer.json does not match the sha256" in err.value.detail
    # a manifest that lists no weights
    edit_manifest(store, 1, lambda m: {**m, "files": {k: v for k, v in m["files"].items() if k != WEIGHTS}})
    with pytest.raises(NotServable, match=r"lists no model\.safetensors"):
        loader(store).load(1)


def test_a_batch_runs_on_the_version_it_opened_with_and_swaps_fall_between_batches(published: Path) -> None:
    one, two = loader(published, max_batch=4).load(1), loader(published, max_batch=4).load(2)
    inbox: queue.Queue = queue.Queue()
    answers: dict[str, Answer] = {}

    def request(name: str, texts: list[str]) -> Infer:
        return Infer(tuple(texts), None, lambda answer: answers.__setitem__(name, answer))

    # queued before the batcher runs, so the order it sees is exactly this one
    for message in (
        Swap(one),
        request("a", TEXTS[:1]),
        Swap(two),  # arrives while a's batch gathers: applied once that batch is done
        request("b", TEXTS[1:3]),
        request("c", TEXTS[:3]),  # would overflow max_batch 4: opens the next batch, on version 2
        Stop(),
    ):
        inbox.put(message)
    metrics = ServingMetrics()
    batcher = MicroBatcher(inbox, max_batch=4, max_wait_s=0.5, metrics=metrics)
    thread = threading.Thread(target=batcher.run)
    thread.start()
    thread.join(30)
    assert not thread.is_alive()
    assert [answers[n].version for n in "abc"] == [1, 1, 2]
    np.testing.assert_allclose(answers["a"].probabilities, one.predict(TEXTS[:1]), atol=1e-6)
    np.testing.assert_allclose(answers["b"].probabilities, one.predict(TEXTS[1:3]), atol=1e-6)
    np.testing.assert_allclose(answers["c"].probabilities, two.predict(TEXTS[:3]), atol=1e-6)
    assert metrics.value("stream_learner_serving_batch_size_count") == 2
    assert metrics.value("stream_learner_serving_batch_size_sum") == 6
    assert metrics.value("stream_learner_serving_swaps_total") == 2 and batcher.served.version == 2


def test_before_a_version_the_batcher_answers_503() -> None:
    inbox: queue.Queue = queue.Queue()
    answers: list[Answer] = []
    inbox.put(Infer(("x",), None, answers.append))
    inbox.put(Stop())
    MicroBatcher(inbox, max_batch=4, max_wait_s=0, metrics=ServingMetrics()).run()
    assert answers[0].code == 503 and "no version loaded" in (answers[0].error or "")


def test_the_listening_socket_says_tcp_so_that_responses_go_out_without_nagles_wait() -> None:
    """asyncio sets TCP_NODELAY on accepted connections only when the socket's proto is IPPROTO_TCP; a
    socket made with proto 0 made every response wait 40 ms for the client's delayed ACK (measured:
    p50 60 ms against 10 ms for MiniLM on one text)."""
    sock = bind("127.0.0.1", 0)
    try:
        assert sock.proto == socket.IPPROTO_TCP
    finally:
        sock.close()


def test_each_swap_observes_the_events_learned_since_the_served_version_once(tmp_path: Path) -> None:
    """Freshness: at the swap to version 3 the follower hands over the produce times of the events of
    versions 2 (rejected by the gate: its weights are trained on) and 3, and the batcher observes them
    once, as their ages at the swap; the first version of a process observes none."""
    store = LocalStore(tmp_path)
    source = VersionSource(store)
    # ages away from the histogram's bucket bounds (30, 60, 120 s) at the test's start
    now_ms = int(time.time() * 1000)
    source.publish(produced_ms=now_ms - 200_000)
    inbox: queue.Queue = queue.Queue()
    metrics = ServingMetrics()
    follower = VersionFollower(store, loader(tmp_path, metrics), inbox, metrics, threading.Event(), 3600)
    follower.poll()
    first = inbox.get_nowait()
    assert first.classifier.version == 1 and first.learned is None
    source.publish_rejected(produced_ms=now_ms - 65_000)
    source.publish(produced_ms=now_ms - 32_000)
    follower.poll()
    swap = inbox.get_nowait()
    assert swap.classifier.version == 3
    assert swap.learned.to_manifest()["counts"] == [
        [(now_ms - 65_000) // 1000, 8],
        [(now_ms - 32_000) // 1000, 8],
    ]
    assert swap.classifier.manifest["newest_event_ms"] == now_ms - 32_000

    for message in (first, swap, Stop()):
        inbox.put(message)
    batcher = MicroBatcher(inbox, max_batch=4, max_wait_s=0.0, metrics=metrics)
    before = time.time()
    batcher.run()  # the swap happens in here: between `before` and `after`
    after = time.time()
    # an age counts from the middle of its produce second: 8 events at each of these two moments
    middles = [(now_ms - 65_000) // 1000 + 0.5, (now_ms - 32_000) // 1000 + 0.5]
    name = "stream_learner_serving_freshness_seconds"
    assert metrics.value(f"{name}_count") == 16  # versions 2 and 3's events; version 1's none
    for le in (30.0, 60.0, 120.0):  # ≈ 32 and ≈ 65 s old, plus the test's time: each in its bucket
        possible = {sum(8 for m in middles if swap - m <= le) for swap in (before, after)}
        assert metrics.value(f"{name}_bucket", {"le": str(le)}) in possible, le
    low, high = (sum(8 * (swap - m) for m in middles) for swap in (before, after))
    assert low <= metrics.value(f"{name}_sum") <= high
    assert metrics.value("stream_learner_serving_newest_event_timestamp_seconds") == (now_ms - 32_000) / 1000
