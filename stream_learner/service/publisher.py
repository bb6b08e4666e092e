"""Versioned, atomic publication of the model to object storage, and restore from it.

The layout under the storage URL, the versions' statuses and retention are in ``versions.py``.

The checkpoint sequence, followed exactly and in this order by :meth:`Publisher.publish_version`:

1. **snapshot** — the trainer copies model, optimizer, replay, RNG, counters and covered offsets
   between two steps (:meth:`Trainer.snapshot`); training goes on while the rest happens;
2. **upload files** — claim ``versions/N/`` (a conditional create of ``versions/N/claim``, N the
   lowest free number after LATEST and after every number in storage: never reused), then every
   file of it except the manifest;
3. **manifest** — ``versions/N/manifest.json`` with the offsets and the sha256 of each file. With a
   probe set, the poisoning gate checks the candidate here: if its probe accuracy fell more than
   ``probe.max_accuracy_drop`` below LATEST's, the manifest says ``rejected`` and the sequence ends
   (LATEST and Kafka offsets stay; training goes on, and later candidates are checked again);
4. **LATEST** — a conditional write (If-Match the ETag this learner last saw, or If-None-Match when
   there was none): a reader following LATEST never sees a partial version, and a second learner on
   the same prefix cannot advance it (:class:`FencedOut`);
5. **commit offsets** — handed to the consumer, which commits them to Kafka. Offsets never move past
   a durable version.

A crash between any two steps leaves LATEST on the previous complete version; the events after its
offsets are consumed again on restart, so each event is counted exactly once in the lineage.
Failures: a storage error in steps 2–4 is retried with backoff (``Publisher._storage``); losing the
conditional write raises :class:`FencedOut`, after marking the version ``fenced`` in its manifest; a
file whose sha256 does not match its manifest on load raises :class:`CorruptVersion`.

**Recovery** (:func:`load_newest_intact`) follows LATEST's chain only: LATEST's version if intact,
else its parent, else the parent's parent…, skipping ``rejected`` and ``fenced`` ancestors (never a
version to resume from), never stepping to another branch. Only when a version's parent cannot be
known (manifest and claim both unreadable) does it take the newest version below it that is complete,
neither rejected, fenced nor marked abandoned by a rollback, and whose own chain is intact — a guess,
logged as an ERROR.

"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import socket
import threading
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import safetensors.numpy
import safetensors.torch
import torch
from tenacity import Retrying, retry_if_not_exception_type, stop_when_event_set, wait_exponential

from stream_learner.core.config import Settings
from stream_learner.service.metrics import Metrics
from stream_learner.service.staging import LOCK, staging_dir
from stream_learner.service.storage import ObjectStore, PreconditionFailed
from stream_learner.service.versions import (
    CLAIM,
    CORRUPT,
    DRIFT,
    FENCED,
    INCOMPLETE,
    LATEST,
    MANIFEST,
    MANIFEST_FORMAT,
    OPTIMIZER,
    REJECTED,
    REPLAY,
    REPLAY_OF_RANK,
    RNG,
    STATE,
    WEIGHTS,
    CorruptVersion,
    FencedOut,
    RollbackRefused,
    VersionEntry,
    chain_of,
    claim_writer,
    newest_sound_below,
    parent_of,
    prune_versions,
    read_latest,
    read_manifest,
    status_detail,
    survey_versions,
    version_dir,
    version_statuses,
    written_status,
)
from stream_learner.training.state import Counters, Snapshot
from stream_learner.training.threads import lower_thread_priority

log = logging.getLogger(__name__)

RETRY_MAX_WAIT_S = 10.0  # backoff cap while storage is down: a recovered store is used within ~10 s


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------- trainer state files
def _write_trainer_state(snap: Snapshot, root: Path) -> None:
    (root / "trainer_state").mkdir(parents=True, exist_ok=True)
    tensors, scalars = {}, {}
    for idx, state in snap.optimizer_state["state"].items():
        for k, v in state.items():
            if torch.is_tensor(v):
                tensors[f"{idx}.{k}"] = v.contiguous()
            else:
                scalars[f"{idx}.{k}"] = v
    safetensors.torch.save_file(tensors, root / OPTIMIZER)
    safetensors.numpy.save_file(
        {k: np.ascontiguousarray(v) for k, v in snap.replay_arrays.items()}, root / REPLAY
    )
    for rank, (arrays, _) in enumerate(snap.replay_shards, start=1):
        safetensors.numpy.save_file(
            {k: np.ascontiguousarray(v) for k, v in arrays.items()}, root / REPLAY_OF_RANK.format(rank=rank)
        )
    safetensors.torch.save_file({"torch": snap.torch_rng}, root / RNG)
    if snap.drift is not None:
        safetensors.numpy.save_file(
            {k: np.ascontiguousarray(v) for k, v in snap.drift[0].items()}, root / DRIFT
        )
    state = {
        "counters": vars(snap.counters),
        "offsets": {str(p): o for p, o in snap.offsets.items()},
        "optimizer_param_groups": snap.optimizer_state["param_groups"],
        "optimizer_scalars": scalars,
        "replay_meta": snap.replay_meta,
        "replay_meta_of_ranks": [meta for _, meta in snap.replay_shards],
        "drift_meta": snap.drift[1] if snap.drift is not None else None,
    }
    (root / STATE).write_text(json.dumps(state, indent=1))


def _read_trainer_state(root: Path, model_state: dict[str, torch.Tensor], version: int) -> Snapshot:
    state = json.loads((root / STATE).read_text())
    tensors = safetensors.torch.load_file(root / OPTIMIZER)
    opt_state: dict[int, dict] = {}
    for key, v in [*tensors.items(), *state["optimizer_scalars"].items()]:
        idx, name = key.split(".", 1)
        opt_state.setdefault(int(idx), {})[name] = v
    return Snapshot(
        model_state=model_state,
        optimizer_state={"state": opt_state, "param_groups": state["optimizer_param_groups"]},
        replay_arrays=safetensors.numpy.load_file(root / REPLAY),
        replay_meta=state["replay_meta"],
        replay_shards=[
            (safetensors.numpy.load_file(root / REPLAY_OF_RANK.format(rank=rank)), meta)
            for rank, meta in enumerate(state.get("replay_meta_of_ranks", []), start=1)
        ],
        torch_rng=safetensors.torch.load_file(root / RNG)["torch"],
        counters=Counters.from_dict(state["counters"]),
        offsets={int(p): int(o) for p, o in state["offsets"].items()},
        drift=(safetensors.numpy.load_file(root / DRIFT), state["drift_meta"])
        if state.get("drift_meta")
        else None,
        version=version,
    )


def download_version(
    store: ObjectStore,
    version: int,
    workdir: Path,
    manifest: dict | None = None,
    wanted: Callable[[str], bool] = lambda name: True,
) -> tuple[Path, dict]:
    """Download the files of version ``version`` its manifest lists (those ``wanted`` keeps) into
    ``workdir/versions/NNNNNN/`` and verify each one's sha256 against the manifest; returns that
    directory and the manifest (read here unless given).

    Raises :class:`CorruptVersion` when the manifest is unreadable, a file is missing, or a file's
    sha256 differs from the manifest's. Storage errors propagate.
    """

    def corrupt(reason: str) -> CorruptVersion:
        return CorruptVersion(f"version {version}: {reason}", version, reason)

    try:
        manifest = read_manifest(store, version) if manifest is None else manifest
        files = {name: info["sha256"] for name, info in manifest["files"].items() if wanted(name)}
    except (KeyError, ValueError, TypeError, AttributeError) as err:
        raise corrupt(f"manifest missing or unreadable ({err})") from None
    root = workdir / version_dir(version)
    for name, sha256 in files.items():
        path = root / name
        if not path.resolve().is_relative_to(root.resolve()):  # a manifest naming ../x writes nowhere else
            raise corrupt(f"manifest names a file outside the version: {name!r}")
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            store.get_to_file(f"{version_dir(version)}/{name}", path)
        except KeyError:
            raise corrupt(f"{name} is missing") from None
        except ValueError as err:  # not a valid storage key
            raise corrupt(f"manifest names an invalid file {name!r} ({err})") from None
        if _sha256(path) != sha256:
            raise corrupt(f"{name} does not match the sha256 in its manifest")
    return root, manifest


def load_version(store: ObjectStore, version: int, workdir: Path) -> tuple[Snapshot, dict]:
    """Download version ``version``, verify every file's sha256 (:func:`download_version`), and return
    its state and manifest. Raises :class:`CorruptVersion` as :func:`download_version` does.
    """
    root, manifest = download_version(store, version, workdir)
    model_state = safetensors.torch.load_file(root / WEIGHTS)
    return _read_trainer_state(root, model_state, version), manifest


def load_newest_intact(
    store: ObjectStore, workdir: Path, on_corrupt: Callable[[CorruptVersion], None]
) -> tuple[Snapshot, dict] | None:
    """Load the version LATEST names or, if it is corrupt, the nearest intact one on LATEST's chain.

    The walk goes from a corrupt version to its parent (named by its manifest, or by its claim when the
    manifest is unreadable), skipping ``rejected`` and ``fenced`` ancestors; LATEST's own version is
    loaded whatever its status (a rollback with ``--force`` may have chosen it). It never steps to
    another branch (versions a rollback abandoned, a fenced-out learner's). Only when a version's parent
    cannot be known does it take the newest version below it that is complete, neither rejected, fenced
    nor abandoned by a rollback, and whose own chain is intact: a guess, logged as an ERROR.

    ``on_corrupt`` is told about each version refused; the way taken is logged in one line ("LATEST
    names 7, corrupt (…); resuming from its parent 5"). None on an empty store; :class:`CorruptVersion`
    when no version on the chain is intact (the chain ends, or retention removed the rest).
    """
    latest, _ = read_latest(store)
    if latest is None:
        return None
    try:
        return load_version(store, latest, workdir)
    except CorruptVersion as err:
        on_corrupt(err)
        story = [f"LATEST names {latest}, corrupt ({err.reason})"]
    entries = survey_versions(store)
    version, guessed = latest, False
    while True:
        entry = entries.get(version)
        known, parent = parent_of(store, entry) if entry is not None else (False, None)
        if known:
            if parent is None or parent not in entries:
                where = "LATEST's version" if version == latest else f"version {version}"
                gone = "has no parent" if parent is None else f"names parent {parent}, no longer in storage"
                raise CorruptVersion(
                    f"no intact version on LATEST's chain in {store.describe()}: "
                    f"{'; '.join(story)}; {where} {gone}"
                )
            written = written_status(entries[parent].manifest) if entries[parent].manifest else None
            if written in (REJECTED, FENCED):
                story.append(f"its parent {parent} is {written}: skipped")
                version = parent
                continue
            candidate, how = parent, f"its parent {parent}"
        else:
            candidate = newest_sound_below(store, entries, version)
            story.append(
                f"the parent of {version} cannot be known (neither its manifest nor its claim names it)"
            )
            if candidate is None:
                raise CorruptVersion(
                    f"no intact version to resume from in {store.describe()}: {'; '.join(story)}, and no "
                    f"version below {version} is complete, neither rejected, fenced nor abandoned, on an "
                    "intact chain"
                )
            guessed = True
            how = (
                f"{candidate}, the newest version below {version} that is complete, neither rejected, fenced "
                "nor abandoned by a rollback, and on an intact chain"
            )
        try:
            found = load_version(store, candidate, workdir)
        except CorruptVersion as err:
            on_corrupt(err)
            story.append(f"{'its parent ' if known else ''}{candidate} corrupt too ({err.reason})")
            version = candidate
            continue
        if guessed:
            log.error(
                "%s; resuming from %s: a guess, check it with `stream-learner versions list`",
                "; ".join(story),
                how,
            )
        else:
            log.warning("%s; resuming from %s", "; ".join(story), how)
        return found


# ------------------------------------------------------------------------------------ publisher
class Publisher:
    """Publishes snapshots from ``publish_queue``; run :meth:`run` in its own thread.

    Why this class is ≈ 300 lines: the checkpoint sequence of the module docstring is written once,
    here, with the failure of each step (retries, the fence, the poisoning gate, claims); the layout
    and the statuses of versions are in ``versions.py``, storage in ``storage.py``.

    Parameters
    ----------
    static_files
        name → bytes of the files every version carries unchanged (``config.json``, tokenizer files).
    parent
        The version this learner resumed from (None on an empty store): the next version's parent.
    latest
        The version LATEST named at start and its ETag, for the fence (may differ from ``parent``
        when LATEST named a corrupt version); new versions are numbered after it.
    on_fatal
        Called with the exception when publishing cannot go on (fenced out): the app stops.
    latest_probe_accuracy
        The probe-set accuracy of the version LATEST names, if it has one: the poisoning gate's
        reference (``probe.max_accuracy_drop``).

    Storage errors are retried with exponential backoff until they succeed or ``abort`` is set;
    meanwhile ``degraded`` is set (``/readyz`` reports it) and the trainer goes on, handing over no
    new snapshot until this one is out (the publish queue holds one): memory stays bounded and Kafka
    offsets never move past the last durable version.
    """

    def __init__(
        self,
        settings: Settings,
        store: ObjectStore,
        static_files: dict[str, bytes],
        publish_queue: queue.Queue[Snapshot],
        commit_queue: queue.Queue[dict[int, int]],
        metrics: Metrics,
        stop: threading.Event,
        parent: int | None,
        latest: tuple[int | None, str | None],
        on_fatal: Callable[[BaseException], None] = lambda e: None,
        latest_probe_accuracy: float | None = None,
    ) -> None:
        self.settings, self.store, self.static_files = settings, store, static_files
        self.publish_queue, self.commit_queue, self.metrics, self.stop_event = (
            publish_queue,
            commit_queue,
            metrics,
            stop,
        )
        self.parent = parent
        self.latest, self.latest_etag = latest
        self.on_fatal = on_fatal
        self.latest_probe_accuracy = latest_probe_accuracy
        self.published: list[int] = []
        self._last_claimed = 0
        self.writer_id = f"{socket.gethostname()}/{os.getpid()}/{uuid.uuid4().hex}"
        self.degraded = threading.Event()  # set while storage writes are failing
        self.abort = threading.Event()  # set by the app when the stop grace period is over
        self.retrying = Retrying(
            retry=retry_if_not_exception_type((FencedOut, PreconditionFailed)),
            wait=wait_exponential(multiplier=0.5, max=RETRY_MAX_WAIT_S),
            stop=stop_when_event_set(self.abort),
            reraise=True,
        )

    @classmethod
    def standalone(
        cls,
        settings: Settings,
        store: ObjectStore,
        static_files: dict[str, bytes],
        parent: int | None = None,
        latest: tuple[int | None, str | None] | None = None,
    ) -> Publisher:
        """A publisher outside a running learner (tools, tests): its own queues, metrics and stop
        event, on the store's ``LATEST`` unless ``latest`` is given. Call :meth:`publish_version`."""
        return cls(
            settings,
            store,
            static_files,
            publish_queue=queue.Queue(maxsize=1),
            commit_queue=queue.Queue(),
            metrics=Metrics(),
            stop=threading.Event(),
            parent=parent,
            latest=read_latest(store) if latest is None else latest,
        )

    def run(self) -> None:
        """Thread target: publish every snapshot handed over; after ``stop``, drain the queue and exit.

        The thread first lowers its priority to ``publish.nice``: a publish then runs on the CPU the
        trainer leaves idle instead of taking a core from it.
        """
        nice = lower_thread_priority(self.settings.publish.nice)
        log.info("publisher thread at nice %d (publish.nice)", nice)
        while True:
            try:
                snap = self.publish_queue.get(timeout=0.2)
            except queue.Empty:
                if self.stop_event.is_set():
                    return
                continue
            try:
                self.publish_version(snap)
            except BaseException as err:
                log.error("publishing stopped: %s", err)
                self.on_fatal(err)
                return

    def publish_version(self, snap: Snapshot) -> int:
        """Steps 2–5 of the checkpoint sequence for one snapshot; returns the new version number."""
        t0 = time.perf_counter()
        # 2. claim a fresh version directory, then upload files
        version = self._claim_version()
        prefix = version_dir(version)
        log.info("publishing version %d", version)
        with staging_dir("publish") as tmp:
            root = Path(tmp)
            safetensors.torch.save_file(
                {k: v.contiguous() for k, v in snap.model_state.items()},
                root / WEIGHTS,
                metadata={"format": "pt"},
            )
            for name, data in self.static_files.items():
                (root / name).parent.mkdir(parents=True, exist_ok=True)
                (root / name).write_bytes(data)
            _write_trainer_state(snap, root)
            files = sorted(
                p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and p != root / LOCK
            )
            info = {}
            for name in files:
                digest = _sha256(root / name)
                info[name] = {"sha256": digest, "bytes": (root / name).stat().st_size}
                self._storage(self.store.put_file, f"{prefix}/{name}", root / name, sha256=digest)
        # 3. manifest; a candidate the poisoning gate holds back says so in it, and stops here
        manifest = self._manifest(snap, version, info)
        rejection = self._gate(snap.metrics.get("probe_accuracy"))
        if rejection:
            manifest["status"] = REJECTED
            manifest["rejected"] = rejection
        self._storage(self.store.put, f"{prefix}/{MANIFEST}", json.dumps(manifest, indent=1).encode())
        if rejection:
            self.metrics.versions_rejected.inc()
            self.parent = version  # the weights trained on descend from it, accepted or not
            log.warning(
                "version %d rejected by the poisoning gate: probe accuracy %.3f, LATEST (version %s) has "
                "%.3f, more than %.3f lower; LATEST stays, training goes on",
                version,
                rejection["probe_accuracy"],
                self.latest,
                rejection["latest_probe_accuracy"],
                rejection["max_accuracy_drop"],
            )
            return version
        # 4. LATEST, fenced
        try:
            self._advance_latest(version)
        except FencedOut:
            self._record_fenced(manifest)
            raise
        if "probe_accuracy" in snap.metrics:
            self.latest_probe_accuracy = snap.metrics["probe_accuracy"]
        # 5. commit offsets (the consumer thread owns the Kafka client)
        self.commit_queue.put(dict(snap.offsets))

        seconds = time.perf_counter() - t0
        self.metrics.publish_seconds.observe(seconds)
        self.metrics.latest_version.set(version)
        self.metrics.latest_version_timestamp.set(time.time())
        self.published.append(version)
        self.parent = version
        log.info(
            "published version %d (%d events, %d steps) in %.1fs to %s",
            version,
            snap.counters.events_trained,
            snap.counters.steps,
            seconds,
            self.store.describe(),
        )
        try:  # with keep_versions 0 too: the leftovers of publishes cut short go whatever it is
            prune_versions(self.store, self.settings.publish.keep_versions)
        except Exception as err:  # retention is housekeeping: never worth stopping for
            log.warning("pruning old versions failed: %s", err)
        return version

    def _manifest(self, snap: Snapshot, version: int, files: dict[str, dict]) -> dict:
        s = self.settings
        return {
            "format": MANIFEST_FORMAT,
            "version": version,
            "parent": self.parent,
            "created_at": datetime.fromtimestamp(snap.created_at, timezone.utc).isoformat(),
            "base_model": s.model.name_or_path,
            "labels": s.model.labels,
            "l2sp_lambda": s.training.l2sp_lambda,
            "training": s.training.model_dump(),
            "replay": s.replay.model_dump(),
            "offsets": {s.kafka.topic: {str(p): o for p, o in sorted(snap.offsets.items())}},
            "events_trained": snap.counters.events_trained,
            "steps": snap.counters.steps,
            "examples_replayed": snap.counters.examples_replayed,
            "nonfinite_skipped": snap.counters.nonfinite_skipped,
            # freshness: the lineage's newest event, and when the events new in this version were produced
            # (a server observes event → served from them at its swap; core/event_times.py)
            "newest_event_ms": snap.counters.newest_event_ms or None,
            "event_times": snap.event_times.to_manifest(),
            "world_size": 1 + len(snap.replay_shards),  # ranks of the data-parallel group that trained it
            "metrics": snap.metrics,
            "files": files,
        }

    def _gate(self, probe_accuracy: float | None) -> dict | None:
        """The poisoning gate: why this candidate may not advance LATEST, or None if it may."""
        max_drop = self.settings.probe.max_accuracy_drop
        reference = self.latest_probe_accuracy
        if probe_accuracy is None or reference is None or max_drop is None:
            return None
        if probe_accuracy >= reference - max_drop:
            return None
        return {
            "reason": "probe accuracy fell too far below LATEST's",
            "probe_accuracy": probe_accuracy,
            "latest_probe_accuracy": reference,
            "max_accuracy_drop": max_drop,
        }

    def _claim_version(self) -> int:
        """The lowest version number after LATEST and after every number in storage whose directory
        nobody has claimed, now ours.

        The claim is a conditional create (If-None-Match), so two writers never upload into the same
        directory and a run that died mid-publish never has its leftovers mixed with new files: its
        number is skipped (versions are numbered in order, not densely; ``parent`` gives the lineage).
        The claim records the writer and the parent (JSON): the parent is known even when the manifest
        is damaged or was never written (see :func:`load_newest_intact`).
        """
        # after LATEST, after any candidate of ours the gate rejected (LATEST did not move for it), and,
        # at the first claim, after every number in storage (retention always keeps the highest): a
        # number is never reused, not even that of a version retention deleted (a reader saw it, maybe)
        if not self._last_claimed:
            numbers = self._storage(survey_versions, self.store, read_manifests=False)
            self._last_claimed = max(numbers, default=0)
        version = max(self.latest or 0, self._last_claimed) + 1
        body = json.dumps({"writer": self.writer_id, "parent": self.parent}).encode()
        while True:
            key = f"{version_dir(version)}/{CLAIM}"
            try:
                self._storage(self.store.put, key, body, if_none_match=True)
                self._last_claimed = version
                return version
            except PreconditionFailed:
                try:
                    if claim_writer(self.store.get(key)) == self.writer_id:  # our own retried request
                        self._last_claimed = version
                        return version
                except KeyError:
                    pass
                version += 1

    def _record_fenced(self, manifest: dict) -> None:
        """Mark a version whose LATEST write another learner won: it is never served nor resumed from."""
        version = manifest["version"]
        manifest = {
            **manifest,
            "status": FENCED,
            "fenced": {
                "at": datetime.now(timezone.utc).isoformat(),
                "writer": self.writer_id,
                "reason": "another learner advanced LATEST first",
            },
        }
        try:
            self.store.put(f"{version_dir(version)}/{MANIFEST}", json.dumps(manifest, indent=1).encode())
        except Exception as err:  # stopping anyway; unmarked, it shows as abandoned (off LATEST's chain)
            log.warning("could not mark version %d fenced in its manifest: %s", version, err)

    def _advance_latest(self, version: int) -> None:
        body = f"{version_dir(version)}\n".encode()
        cond = {"if_none_match": True} if self.latest_etag is None else {"if_match": self.latest_etag}
        try:
            etag = self._storage(self.store.put, LATEST, body, **cond)
        except PreconditionFailed:
            # a retried request whose first attempt succeeded also gets 412: then LATEST holds our body
            try:
                current, etag = self.store.get_with_etag(LATEST)
            except KeyError:
                current = None
            if current != body:
                raise FencedOut(
                    f"another learner advanced LATEST in {self.store.describe()}: stopping; run one learner "
                    "per storage prefix (the Helm chart's replicas: 1 and strategy: Recreate)"
                ) from None
        self.latest, self.latest_etag = version, etag

    def _storage(self, fn: Callable, *args, **kwargs):
        """Call a storage write, retrying with backoff; count failures and flag ``degraded`` meanwhile."""

        def attempt():
            try:
                result = fn(*args, **kwargs)
            except PreconditionFailed:
                raise
            except Exception as err:
                self.metrics.publish_failures.inc()
                if not self.degraded.is_set():
                    log.warning("storage write failed, retrying with backoff: %s", err)
                self.degraded.set()
                self.metrics.publish_degraded.set(1)
                raise
            if self.degraded.is_set():
                log.info("storage writes succeed again")
                self.degraded.clear()
                self.metrics.publish_degraded.set(0)
            return result

        return self.retrying(attempt)


# ------------------------------------------------------------------------ rollback and retention
def rollback(store: ObjectStore, version: int, force: bool = False) -> int | None:
    """Point LATEST at ``version``; the next run resumes from it. Returns the version LATEST named before.

    Refused with :class:`RollbackRefused` when ``version`` is rejected or fenced (unless ``force``), or
    incomplete, corrupt or absent (always: LATEST must name a complete version); with
    :class:`CorruptVersion` when a file does not match its sha256 (every file is downloaded and checked
    first). The versions that fall off LATEST's chain are marked ``abandoned`` in their manifests (the
    mark of those back on it removed): the recovery's last resort reads it.
    """
    entries = survey_versions(store)
    previous, etag = read_latest(store)
    entry = entries.get(version)
    if entry is None:
        raise RollbackRefused(version, "absent", f"no such version in {store.describe()}", forceable=False)
    status = version_statuses(store, entries)[version]
    if status in (INCOMPLETE, CORRUPT):
        detail = (
            "no manifest: a publish cut short, or still running" if status == INCOMPLETE else entry.unreadable
        )
        raise RollbackRefused(version, status, str(detail), forceable=False)
    if status in (REJECTED, FENCED) and not force:
        raise RollbackRefused(version, status, status_detail(entry.manifest or {}), forceable=True)
    with staging_dir("rollback") as tmp:
        load_version(store, version, Path(tmp))  # CorruptVersion before LATEST moves
    cond = {"if_none_match": True} if etag is None else {"if_match": etag}
    try:
        store.put(LATEST, f"{version_dir(version)}\n".encode(), **cond)
    except PreconditionFailed:
        raise FencedOut("LATEST changed during the rollback (is a learner running?): stop it first") from None
    try:
        _record_rollback(store, entries, version, previous)
    except Exception as err:  # LATEST moved: the rollback is done; the marks only serve the last resort
        log.warning("rolled back, but marking the versions it abandoned failed: %s", err)
    return previous


def _record_rollback(
    store: ObjectStore, entries: dict[int, VersionEntry], target: int, previous: int | None
) -> None:
    chain = set(chain_of(store, target, entries))
    at = datetime.now(timezone.utc).isoformat()
    for n, e in entries.items():
        m = e.manifest
        if m is None or written_status(m):
            continue
        if n in chain and "abandoned" in m:
            m = {k: v for k, v in m.items() if k != "abandoned"}
        elif n not in chain and "abandoned" not in m:
            m = {**m, "abandoned": {"at": at, "rollback_to": target, "rollback_from": previous}}
        else:
            continue
        store.put(f"{version_dir(n)}/{MANIFEST}", json.dumps(m, indent=1).encode())
        e.manifest = m
