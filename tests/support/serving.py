"""For the tests of ``stream-learner serve``: versions of the tiny model published the real way, a
server in this process, and a small HTTP client.

:class:`VersionSource` trains the tiny model (:mod:`tests.support.tiny_model`) a step at a time and
publishes with the learner's own :class:`~stream_learner.service.publisher.Publisher`, so each version
has real weights, a real manifest (sha256 of every file) and moves LATEST as a learner does.
"""

from __future__ import annotations

import dataclasses
import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from stream_learner.core.config import Settings
from stream_learner.service.app import static_files
from stream_learner.service.metrics import ServingMetrics
from stream_learner.service.publisher import Publisher
from stream_learner.service.serving.server import InferenceServer
from stream_learner.service.storage import ObjectStore
from stream_learner.training.state import Snapshot
from tests.support.factories import batch, make_trainer, small_settings, tiny_rows, tokenized, tokenizer

TEXTS = ["a wonderful, moving film", "dull and far too long", "it was fine", "I would not watch it again"]


class VersionSource:
    """A trainer of the tiny model and a publisher on ``store``: :meth:`publish` trains one more step on
    the bundled tiny stream and publishes a version (weights differ from version to version)."""

    def __init__(self, store: ObjectStore, settings: Settings | None = None) -> None:
        self.settings = settings or small_settings()
        self.trainer = make_trainer(self.settings)
        self.store = store
        self.publisher = Publisher.standalone(
            self.settings, store, static_files(self.trainer.engine.model, tokenizer())
        )
        self._rows = tiny_rows()
        self._offset = 0

    def step(self, produced_ms: int | None = None) -> None:
        """One step on the next 8 events, produced at ``produced_ms`` (default: now)."""
        produced_ms = int(time.time() * 1000) if produced_ms is None else produced_ms
        rows = self._rows[self._offset % len(self._rows) :][:8]
        events = tokenized(rows, self.settings, first_offset=self._offset, timestamp_ms=produced_ms)
        self.trainer.accept(batch(events))
        self.trainer.train_window(self.trainer.take_fresh(8))
        self.trainer.ledger.advance()
        self._offset += len(rows)

    def publish(self, produced_ms: int | None = None) -> int:
        """One more step (on events produced at ``produced_ms``, default now), then a version; returns
        its number."""
        self.step(produced_ms)
        return self.publisher.publish_version(self.snapshot())

    def snapshot(self) -> Snapshot:
        """The trainer's snapshot, handed over as the training loop hands it to its publisher."""
        assert self.trainer.maybe_publish(force=True)
        return self.trainer.publish_queue.get_nowait()

    def publish_rejected(self, produced_ms: int | None = None) -> int:
        """One more step, then a version the poisoning gate rejects (its probe accuracy far below
        LATEST's): published with ``status: rejected``, LATEST stays."""
        self.step(produced_ms)
        snap = self.snapshot()
        self.publisher.latest_probe_accuracy = 0.9
        snap = dataclasses.replace(snap, metrics={**snap.metrics, "probe_accuracy": 0.1})
        return self.publisher.publish_version(snap)


def serving_settings(storage_url: str, publish: dict | None = None, **serving: object) -> Settings:
    """The tiny model's settings reading ``storage_url`` (more ``publish`` settings: S3's), serving on
    127.0.0.1, any free port, polling every 0.2 s."""
    return small_settings(
        publish={"storage_url": storage_url, **(publish or {})},
        serving={"host": "127.0.0.1", "port": 0, "poll_interval_s": 0.2, **serving},
    )


def start_server(settings: Settings) -> InferenceServer:
    return InferenceServer(settings, ServingMetrics()).start()


class Client:
    """Plain HTTP to a server on 127.0.0.1 (urllib): (status, parsed JSON body)."""

    def __init__(self, port: int, model: str = "stream-learner") -> None:
        self.base, self.model = f"http://127.0.0.1:{port}", model

    def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, dict]:
        req = urllib.request.Request(
            self.base + path, data=body, method=method, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return resp.status, json.loads(resp.read() or b"{}")
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read() or b"{}")

    def get(self, path: str) -> tuple[int, dict]:
        return self.request("GET", path)

    def infer(self, texts: list[str], pairs: list[str] | None = None, **extra: object) -> tuple[int, dict]:
        inputs = [{"name": "text", "datatype": "BYTES", "shape": [len(texts)], "data": texts}]
        if pairs is not None:
            inputs.append({"name": "text_pair", "datatype": "BYTES", "shape": [len(pairs)], "data": pairs})
        body = json.dumps({"inputs": inputs, **extra}).encode()
        return self.request("POST", f"/v2/models/{self.model}/infer", body)

    def metrics(self) -> str:
        with urllib.request.urlopen(self.base + "/metrics", timeout=30) as resp:
            return resp.read().decode()


def outputs(response: dict) -> dict[str, dict]:
    return {o["name"]: o for o in response["outputs"]}


def probabilities(response: dict) -> np.ndarray:
    probs = outputs(response)["probabilities"]
    return np.asarray(probs["data"], dtype=np.float32).reshape(probs["shape"])


def plain_transformers(version_dir: Path, texts: list[str], pairs: list[str] | None = None) -> np.ndarray:
    """The probabilities plain transformers gives, loading a version's directory as its README says."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(version_dir)
    model = AutoModelForSequenceClassification.from_pretrained(version_dir).eval()
    enc = tok(texts, pairs, padding=True, truncation=True, max_length=64, return_tensors="pt")
    with torch.no_grad():
        return torch.softmax(model(**enc).logits, dim=-1).numpy()


def wait_for(condition: Callable[[], bool], timeout: float = 30.0, poll_s: float = 0.05) -> float:
    """Seconds until ``condition()`` held; AssertionError after ``timeout``."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"not within {timeout} s")
        time.sleep(poll_s)
    return time.monotonic() - started
