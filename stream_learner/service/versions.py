"""The versions under a storage URL, read without torch: their layout, LATEST, manifests, statuses,
and retention. The publish protocol and restoring from a version are in ``publisher.py``.

Layout under the storage URL::

    versions/000042/model.safetensors        weights (never pickle)
    versions/000042/config.json, tokenizer…  loadable by plain ``from_pretrained(version_dir)``
    versions/000042/trainer_state/…          optimizer, replay buffer, RNG, counters: for resume
    versions/000042/manifest.json            lineage, offsets, metrics and the sha256 of every file
    versions/000042/claim                    its writer and parent: created first, claims the directory
    LATEST                                   written last; names the newest complete version

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

**Retention** (:func:`prune_versions`) removes the leftovers of publishes cut short whatever
``keep`` is, and with ``keep`` > 0 keeps LATEST's chain first.

Nothing here imports torch: ``stream-learner versions list``, ``show`` and ``prune`` start in a
fraction of the time a learner takes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from stream_learner.service.storage import ObjectStore

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
# statuses of a version (see the module docstring)
PUBLISHED = "published"
REJECTED = "rejected"
FENCED = "fenced"
ABANDONED = "abandoned"
INCOMPLETE = "incomplete"
CORRUPT = "corrupt"
STATUSES = (PUBLISHED, REJECTED, FENCED, ABANDONED, INCOMPLETE, CORRUPT)


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


def version_dir(version: int) -> str:
    return f"versions/{version:06d}"


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
        data = store.get(f"{version_dir(version)}/{MANIFEST}")
    except KeyError:
        return None, "manifest missing"
    return _parsed_manifest(data)


def _parsed_manifest(data: bytes) -> tuple[dict | None, str | None]:
    """(manifest, None), or (None, why it cannot be read)."""
    try:
        manifest = json.loads(data)
    except ValueError as err:  # not UTF-8, not JSON
        return None, f"manifest unreadable ({err})"
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        return None, "manifest unreadable (not a manifest)"
    return upgraded(manifest), None


def written_status(manifest: dict) -> str | None:
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
    return written_status(entry.manifest) or (PUBLISHED if on_chain else ABANDONED)


def parent_of(store: ObjectStore, entry: VersionEntry) -> tuple[bool, int | None]:
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
        known, version = parent_of(store, entries[version])
        if not known:
            break
    return chain


def version_statuses(store: ObjectStore, entries: dict[int, VersionEntry] | None = None) -> dict[int, str]:
    """The status of every version number in storage (see the module docstring), in order."""
    entries = survey_versions(store) if entries is None else entries
    latest, _ = read_latest(store)
    chain = set(chain_of(store, latest, entries))
    return {n: _status(e, n in chain) for n, e in entries.items()}


def newest_sound_below(store: ObjectStore, entries: dict[int, VersionEntry], below: int) -> int | None:
    """The fallback when a version's parent cannot be known (see :func:`load_newest_intact`)."""
    for n in sorted((n for n in entries if n < below), reverse=True):
        m = entries[n].manifest
        if (
            m is not None
            and not written_status(m)
            and not m.get("abandoned")
            and _chain_intact(store, entries, n)
        ):
            return n
    return None


def _chain_intact(store: ObjectStore, entries: dict[int, VersionEntry], version: int) -> bool:
    """Whether every ancestor of ``version`` still in storage has a readable manifest and a known parent."""
    while True:
        known, parent = parent_of(store, entries[version])
        if not known:
            return False
        if parent is None or parent not in entries:  # the first version, or retention removed the rest
            return True
        if entries[parent].manifest is None:
            return False
        version = parent


class NotServable(RuntimeError):
    """A version no server may serve: ``status`` (incomplete, corrupt, rejected, fenced) and ``detail``
    say why."""

    def __init__(self, version: int, status: str, detail: str) -> None:
        super().__init__(f"version {version} is {status} ({detail})")
        self.version, self.status, self.detail = version, status, detail


def servable_manifest(store: ObjectStore, version: int) -> dict:
    """The manifest of ``version`` if it may be served; :class:`NotServable` if it is incomplete (no
    manifest), corrupt (one that cannot be parsed), rejected or fenced. Storage errors propagate.

    Its files are not checked here: the server downloads them and checks each one's sha256 against this
    manifest (``publisher.download_version``), and a mismatch makes the version corrupt there.
    """
    try:
        data = store.get(f"{version_dir(version)}/{MANIFEST}")
    except KeyError:
        raise NotServable(version, INCOMPLETE, "no manifest: a publish cut short, or one running") from None
    manifest, unreadable = _parsed_manifest(data)
    if manifest is None:
        raise NotServable(version, CORRUPT, unreadable or "manifest unreadable")
    written = written_status(manifest)
    if written is not None:
        raise NotServable(version, written, status_detail(manifest))
    return manifest


def claim_writer(claim: bytes) -> str:
    """The writer id a claim names (JSON ``writer``; a claim of older learners is the bare id)."""
    try:
        parsed = json.loads(claim)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict) and isinstance(parsed.get("writer"), str):
        return parsed["writer"]
    return claim.decode(errors="replace")


def status_detail(manifest: dict) -> str:
    if written_status(manifest) == FENCED:
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
