"""Fetching one version for serving: checked, downloaded, verified, loaded, warmed up.

:meth:`VersionLoader.load` refuses, with :class:`~stream_learner.service.versions.NotServable`, a
version that is incomplete, corrupt, rejected or fenced (``versions.servable_manifest``), one whose
files do not match the sha256 its manifest records (``publisher.download_version``: corrupt), and one
that plain transformers cannot load as a classifier of its labels (corrupt too). Storage errors
propagate: they are an outage, not a verdict on the version, and the caller tries again later.

Only the files a server uses are downloaded: weights, ``config.json`` and the tokenizer's; the
trainer's state (optimizer moments, replay buffer: about three times the weights) is left in storage.
They are staged in a locked staging directory (``staging.py``) removed as soon as the model is in
memory, so a server's disk holds at most the version it is loading.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from stream_learner.service.metrics import ServingMetrics
from stream_learner.service.publisher import download_version
from stream_learner.service.serving.classifier import Classifier, UnloadableVersion, load_classifier
from stream_learner.service.staging import staging_dir
from stream_learner.service.storage import ObjectStore
from stream_learner.service.versions import CORRUPT, WEIGHTS, CorruptVersion, NotServable, servable_manifest

log = logging.getLogger(__name__)

TRAINER_STATE = "trainer_state/"  # what a version holds for resuming training, never for serving
NEEDED = (WEIGHTS, "config.json")


def served_file(name: str) -> bool:
    """Whether a server needs a version's file: everything but the trainer's state."""
    return not name.startswith(TRAINER_STATE)


class VersionLoader:
    """Turns a version number into a warmed-up :class:`Classifier`, or refuses it (see the module)."""

    def __init__(
        self,
        store: ObjectStore,
        device: torch.device,
        max_length: int,
        max_batch: int,
        metrics: ServingMetrics,
    ) -> None:
        self.store, self.device, self.max_length, self.max_batch = store, device, max_length, max_batch
        self.metrics = metrics

    def load(self, version: int) -> Classifier:
        """Method: read and check the manifest; download the served files, checking each one's sha256;
        load them with plain transformers; warm up with one batch. Its duration goes into
        ``serving_load_seconds``."""
        started = time.perf_counter()
        manifest = servable_manifest(self.store, version)
        missing = [name for name in NEEDED if name not in manifest["files"]]
        if missing:
            raise NotServable(version, CORRUPT, f"its manifest lists no {', '.join(missing)}")
        with staging_dir("serve") as tmp:
            try:
                directory, _ = download_version(self.store, version, Path(tmp), manifest, wanted=served_file)
            except CorruptVersion as err:
                raise NotServable(version, CORRUPT, err.reason) from None
            try:
                classifier = load_classifier(
                    directory, version, manifest, self.device, self.max_length, self.max_batch
                )
            except UnloadableVersion as err:
                raise NotServable(version, CORRUPT, str(err)) from None
        classifier.warm_up()
        seconds = time.perf_counter() - started
        self.metrics.load_seconds.observe(seconds)
        log.info("version %d loaded and warmed up in %.2f s on %s", version, seconds, self.device)
        return classifier
