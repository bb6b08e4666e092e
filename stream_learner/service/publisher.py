"""Versioned, atomic publication of the model to object storage, and restore from it.

Layout under the storage URL::

    versions/000042/model.safetensors        weights (never pickle)
    versions/000042/config.json, tokenizer…  loadable by plain ``from_pretrained(version_dir)``
    versions/000042/trainer_state/…          optimizer, replay buffer, RNG, counters: for resume
    versions/000042/manifest.json            lineage, offsets, metrics and the sha256 of every file
    versions/000042/claim                    its writer and parent: created first, claims the directory
    LATEST                                   written last; names the newest complete version

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

**Statuses** (:func:`version_statuses`). The lineage is LATEST's *chain*: the version LATEST names and
its ancestors by ``parent`` links (a manifest's, or, when the manifest cannot be read, its claim's),
down to the first version or to one retention removed. Each version number in storage has one status:

* ``incomplete`` — objects but no manifest: a publish cut short by a crash (or one running right now);
* ``corrupt`` — a manifest that cannot be parsed;
* ``fenced`` — its writer lost the conditional LATEST write to another learner (manifest ``status``);
* ``rejected`` — held back by the poisoning gate (manifest ``status`` / ``rejected``), on the chain
  or not: its weights may be poisoned, it was never served;
* ``published`` — on LATEST's chain, and none of the above: LATEST, or a version LATEST named before
  the versions after it were published on top of it;
* ``abandoned`` — complete, neither rejected nor fenced, but off LATEST's chain: a rollback moved
  LATEST below it (the rollback records this in its manifest, ``abandoned``), or its learner died
  between the manifest and LATEST (never named by LATEST). A publish caught between those two steps
  shows so for that moment.

``published`` and ``abandoned`` are computed from LATEST's chain when asked, not stored: a rollback
changes them. ``rejected`` and ``fenced`` are facts written by the version's own writer. The
sha256 of the files is not checked here (that takes a download): a damaged file shows at load time.

**Recovery** (:func:`load_newest_intact`) follows LATEST's chain only: LATEST's version if intact,
else its parent, else the parent's parent…, skipping ``rejected`` and ``fenced`` ancestors (never a
version to resume from), never stepping to another branch. Only when a version's parent cannot be
known (manifest and claim both unreadable) does it take the newest version below it that is complete,
neither rejected, fenced nor marked abandoned by a rollback, and whose own chain is intact — a guess,
logged as an ERROR.

**Retention** (:func:`prune_versions`) removes the leftovers of publishes cut short whatever
``keep`` is, and with ``keep`` > 0 keeps LATEST's chain first.
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
from dataclasses import dataclass, field
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
from stream_learner.training.state import Counters, Snapshot

log = logging.getLogger(__name__)

LATEST = "LATEST"
MANIFEST = "manifest.json"
CLAIM = "claim"  # created first, conditionally: this version directory belongs to one writer
WEIGHTS = "model.safetensors"
OPTIMIZER = "trainer_state/optimizer.safetensors"
REPLAY = "trainer_state/replay.safetensors"
REPLAY_OF_RANK = "trainer_state/replay-rank{rank}.safetensors"  # ranks 1… of a data-parallel group
RNG = "trainer_state/rng.safetensors"
STATE = "trainer_state/state.json"
DRIFT = "trainer_state/drift.safetensors"  # the drift signals' windows (format 2 on)
# 2: "events_trained" (format 1 called it "events_ingested"), the drift signals' state
MANIFEST_FORMAT = 2
RETRY_MAX_WAIT_S = 10.0  # backoff cap while storage is down: a recovered store is used within ~10 s


class FencedOut(RuntimeError):
    """Another learner advanced LATEST on this storage prefix: this one must stop."""


class CorruptVersion(RuntimeError):
    """A version cannot be loaded: its manifest is missing or unreadable, or a file is missing or does not
    match the sha256 its manifest records. ``version`` and ``reason`` say which and why."""

    def __init__(self, message: str, version: int | None = None, reason: str | None = None) -> None:
        super().__init__(message)
        self.version, self.reason = version, reason or message


class RollbackRefused(ValueError):
    """The target of a rollback is no version to serve: ``status`` says why; ``forceable`` whether
    ``force=True`` may override it (rejected, fenced) or nothing can (incomplete, corrupt, absent)."""

    def __init__(self, version: int, status: str, detail: str, forceable: bool) -> None:
        super().__init__(f"version {version} is {status} ({detail})")
        self.version, self.status, self.detail, self.forceable = version, status, detail, forceable


# statuses of a version (see the module docstring)
PUBLISHED = "published"
REJECTED = "rejected"
FENCED = "fenced"
ABANDONED = "abandoned"
INCOMPLETE = "incomplete"
CORRUPT = "corrupt"
STATUSES = (PUBLISHED, REJECTED, FENCED, ABANDONED, INCOMPLETE, CORRUPT)


def version_dir(version: int) -> str:
    return f"versions/{version:06d}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------------------- LATEST
def read_latest(store: ObjectStore) -> tuple[int | None, str | None]:
    """(version named by LATEST, its ETag), or (None, None) on an empty store."""
    try:
        data, etag = store.get_with_etag(LATEST)
    except KeyError:
        return None, None
    return int(data.decode().strip().rsplit("/", 1)[-1]), etag


def read_manifest(store: ObjectStore, version: int) -> dict:
    return upgraded(json.loads(store.get(f"{version_dir(version)}/{MANIFEST}")))


def upgraded(manifest: dict) -> dict:
    """A manifest of any format as the current one reads: format 1's ``events_ingested`` is
    ``events_trained``. The other fields of format 1 are those of format 2."""
    if "events_ingested" in manifest and "events_trained" not in manifest:
        manifest["events_trained"] = manifest.pop("events_ingested")
    return manifest


def list_versions(store: ObjectStore) -> list[dict]:
    """Manifests of every complete version (those with a readable manifest), oldest first."""
    return [e.manifest for e in survey_versions(store).values() if e.manifest is not None]


# ------------------------------------------------------------------------ statuses and the chain
@dataclass
class VersionEntry:
    """What storage holds under ``versions/<version>/``: object names and the manifest, if readable."""

    version: int
    names: set[str] = field(default_factory=set)  # relative to the version's directory
    manifest: dict | None = None  # None: there is none, it was not read, or it is unreadable
    unreadable: str | None = None  # why a manifest that is there could not be read

    @property
    def has_manifest(self) -> bool:
        return MANIFEST in self.names


def survey_versions(store: ObjectStore, read_manifests: bool = True) -> dict[int, VersionEntry]:
    """Every version number under ``versions/``, in order, with its object names (one listing) and,
    unless ``read_manifests`` is false, its parsed manifest."""
    entries: dict[int, VersionEntry] = {}
    for key in store.list("versions/"):
        parts = key.split("/", 2)
        if len(parts) == 3 and parts[1].isdigit():
            entries.setdefault(int(parts[1]), VersionEntry(int(parts[1]))).names.add(parts[2])
    if read_manifests:
        for e in entries.values():
            if e.has_manifest:
                e.manifest, e.unreadable = _parse_manifest(store, e.version)
    return dict(sorted(entries.items()))


def _parse_manifest(store: ObjectStore, version: int) -> tuple[dict | None, str | None]:
    try:
        manifest = upgraded(json.loads(store.get(f"{version_dir(version)}/{MANIFEST}")))
    except KeyError:
        return None, "manifest missing"
    except ValueError as err:  # not UTF-8, not JSON
        return None, f"manifest unreadable ({err})"
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        return None, "manifest unreadable (not a manifest)"
    return manifest, None


def _written_status(manifest: dict) -> str | None:
    """``fenced`` or ``rejected`` when the version's writer recorded so; None otherwise."""
    if manifest.get("status") == FENCED or manifest.get("fenced"):
        return FENCED
    if manifest.get("status") == REJECTED or manifest.get("rejected"):
        return REJECTED
    return None


def _status(entry: VersionEntry, on_chain: bool) -> str:
    if not entry.has_manifest:
        return INCOMPLETE
    if entry.manifest is None:
        return CORRUPT
    return _written_status(entry.manifest) or (PUBLISHED if on_chain else ABANDONED)


def _parent(store: ObjectStore, entry: VersionEntry) -> tuple[bool, int | None]:
    """(known, parent) of a version: from its manifest, else from its claim (which records it too)."""
    if entry.manifest is not None:
        return _checked_parent(entry.manifest.get("parent"), entry.version)
    if CLAIM in entry.names:
        try:
            claim = json.loads(store.get(f"{version_dir(entry.version)}/{CLAIM}"))
        except (KeyError, ValueError):
            return False, None
        if isinstance(claim, dict) and "parent" in claim:
            return _checked_parent(claim["parent"], entry.version)
    return False, None


def _checked_parent(parent: object, version: int) -> tuple[bool, int | None]:
    # a parent is always numbered below its child (claims come after LATEST and after the parent)
    if parent is None:
        return True, None
    if isinstance(parent, int) and not isinstance(parent, bool) and 0 < parent < version:
        return True, parent
    return False, None


def chain_of(
    store: ObjectStore, version: int | None, entries: dict[int, VersionEntry] | None = None
) -> list[int]:
    """``version`` and its ancestors by ``parent`` links, newest first, as far as storage tells: the
    walk stops at the first version, at a parent no longer in storage (pruned), or at a version whose
    parent cannot be known."""
    entries = survey_versions(store) if entries is None else entries
    chain: list[int] = []
    while version is not None and version in entries:
        chain.append(version)
        known, version = _parent(store, entries[version])
        if not known:
            break
    return chain


def version_statuses(store: ObjectStore, entries: dict[int, VersionEntry] | None = None) -> dict[int, str]:
    """The status of every version number in storage (see the module docstring), in order."""
    entries = survey_versions(store) if entries is None else entries
    latest, _ = read_latest(store)
    chain = set(chain_of(store, latest, entries))
    return {n: _status(e, n in chain) for n, e in entries.items()}


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


def load_version(store: ObjectStore, version: int, workdir: Path) -> tuple[Snapshot, dict]:
    """Download version ``version``, verify every file's sha256, and return its state and manifest.

    Raises :class:`CorruptVersion` when the manifest is unreadable, a file is missing, or a file's
    sha256 differs from the manifest's.
    """

    def corrupt(reason: str) -> CorruptVersion:
        return CorruptVersion(f"version {version}: {reason}", version, reason)

    try:
        manifest = read_manifest(store, version)
        files = manifest["files"]
    except (KeyError, ValueError, TypeError) as err:
        raise corrupt(f"manifest missing or unreadable ({err})") from None
    root = workdir / version_dir(version)
    for name, info in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            store.get_to_file(f"{version_dir(version)}/{name}", path)
        except KeyError:
            raise corrupt(f"{name} is missing") from None
        if _sha256(path) != info["sha256"]:
            raise corrupt(f"{name} does not match the sha256 in its manifest")
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
        known, parent = _parent(store, entry) if entry is not None else (False, None)
        if known:
            if parent is None or parent not in entries:
                where = "LATEST's version" if version == latest else f"version {version}"
                gone = "has no parent" if parent is None else f"names parent {parent}, no longer in storage"
                raise CorruptVersion(
                    f"no intact version on LATEST's chain in {store.describe()}: "
                    f"{'; '.join(story)}; {where} {gone}"
                )
            written = _written_status(entries[parent].manifest) if entries[parent].manifest else None
            if written in (REJECTED, FENCED):
                story.append(f"its parent {parent} is {written}: skipped")
                version = parent
                continue
            candidate, how = parent, f"its parent {parent}"
        else:
            candidate = _newest_sound_below(store, entries, version)
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


def _newest_sound_below(store: ObjectStore, entries: dict[int, VersionEntry], below: int) -> int | None:
    """The fallback when a version's parent cannot be known (see :func:`load_newest_intact`)."""
    for n in sorted((n for n in entries if n < below), reverse=True):
        m = entries[n].manifest
        if (
            m is not None
            and not _written_status(m)
            and not m.get("abandoned")
            and _chain_intact(store, entries, n)
        ):
            return n
    return None


def _chain_intact(store: ObjectStore, entries: dict[int, VersionEntry], version: int) -> bool:
    """Whether every ancestor of ``version`` still in storage has a readable manifest and a known parent."""
    while True:
        known, parent = _parent(store, entries[version])
        if not known:
            return False
        if parent is None or parent not in entries:  # the first version, or retention removed the rest
            return True
        if entries[parent].manifest is None:
            return False
        version = parent


# ------------------------------------------------------------------------------------ publisher
class Publisher:
    """Publishes snapshots from ``publish_queue``; run :meth:`run` in its own thread.

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

    def run(self) -> None:
        """Thread target: publish every snapshot handed over; after ``stop``, drain the queue and exit."""
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
                info[name] = {"sha256": _sha256(root / name), "bytes": (root / name).stat().st_size}
                self._storage(self.store.put_file, f"{prefix}/{name}", root / name)
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


def claim_writer(claim: bytes) -> str:
    """The writer id a claim names (JSON ``writer``; a claim of older learners is the bare id)."""
    try:
        parsed = json.loads(claim)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict) and isinstance(parsed.get("writer"), str):
        return parsed["writer"]
    return claim.decode(errors="replace")


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
        raise RollbackRefused(version, status, _status_detail(entry.manifest or {}), forceable=True)
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


def _status_detail(manifest: dict) -> str:
    if _written_status(manifest) == FENCED:
        fenced = manifest.get("fenced") or {}
        return (
            f"its learner lost LATEST to another one{' at ' + fenced['at'][:19] if fenced.get('at') else ''}"
        )
    rejected = manifest.get("rejected") or {}
    if "probe_accuracy" in rejected and "latest_probe_accuracy" in rejected:
        return (
            f"poisoning gate: probe accuracy {rejected['probe_accuracy']:.3f}, LATEST had "
            f"{rejected['latest_probe_accuracy']:.3f}"
        )
    return "poisoning gate"


def _record_rollback(
    store: ObjectStore, entries: dict[int, VersionEntry], target: int, previous: int | None
) -> None:
    chain = set(chain_of(store, target, entries))
    at = datetime.now(timezone.utc).isoformat()
    for n, e in entries.items():
        m = e.manifest
        if m is None or _written_status(m):
            continue
        if n in chain and "abandoned" in m:
            m = {k: v for k, v in m.items() if k != "abandoned"}
        elif n not in chain and "abandoned" not in m:
            m = {**m, "abandoned": {"at": at, "rollback_to": target, "rollback_from": previous}}
        else:
            continue
        store.put(f"{version_dir(n)}/{MANIFEST}", json.dumps(m, indent=1).encode())
        e.manifest = m


def prune_versions(store: ObjectStore, keep: int) -> list[int]:
    """Retention; returns the version numbers deleted.

    Whatever ``keep`` is (0 too): the leftovers of publishes cut short go — incomplete versions (files
    and/or a claim, no manifest) numbered below the newest complete one. Those above it may be a publish
    running right now, and stay.

    With ``keep`` > 0, of the complete versions, kept are: LATEST and its nearest ancestors on its
    chain, ``keep`` in all (the lineage stays unbroken down to the oldest kept; rejected links of the
    chain count like the others); if the chain is shorter, the newest abandoned versions, then the
    newest rejected, fenced or corrupt ones fill the rest. Always kept besides: LATEST, and the newest
    version directory of all (version numbers are never reused).
    """
    latest, _ = read_latest(store)
    entries = survey_versions(store, read_manifests=keep > 0)
    complete = [n for n, e in entries.items() if e.has_manifest]
    newest = complete[-1] if complete else None
    protected = {n for n in (latest, max(entries, default=None)) if n is not None}
    doomed = {n for n, e in entries.items() if not e.has_manifest and newest is not None and n < newest}
    if keep > 0:
        chain = chain_of(store, latest, entries)
        statuses = {n: _status(entries[n], n in chain) for n in complete}
        protected |= set(chain[:keep])
        rest = sorted(
            (n for n in complete if n not in chain[:keep]),
            key=lambda n: (statuses[n] != ABANDONED, -n),  # abandoned first, newest first
        )
        kept = set(chain[:keep]) | set(rest[: max(keep - len(chain[:keep]), 0)])
        doomed |= set(complete) - kept
    doomed -= protected
    for v in sorted(doomed):
        # the manifest goes first: a half-deleted version is then incomplete, never a corrupt "complete" one
        store.delete(f"{version_dir(v)}/{MANIFEST}")
        for name in sorted(entries[v].names - {MANIFEST}):
            store.delete(f"{version_dir(v)}/{name}")
    return sorted(doomed)
