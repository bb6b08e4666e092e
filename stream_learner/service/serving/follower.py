"""Which version is served: the follower thread, polling LATEST and loading what it names.

Every ``serving.poll_interval_s`` the follower reads LATEST (one small object). When it names a
version other than the one considered last, that version is loaded in this thread
(:class:`~stream_learner.service.serving.loader.VersionLoader`: manifest checked, files downloaded and
checked against their sha256, plain transformers, warm-up) while the batcher goes on answering with
the current one; then it is handed to the batcher (:class:`~stream_learner.service.serving.batcher.Swap`
on its inbox), which swaps it in between two batches.

**Refused versions** (rejected, fenced, incomplete, corrupt: see ``loader.py``) are never served:
each is logged once, counted once in ``serving_versions_refused_total{status}``, and not looked at
again. Then the follower walks down the refused version's chain (its ``parent`` links,
``versions.chain_of``) to the newest version that can be served and is newer than the one serving
now — with nothing served yet, to the newest servable one at all, as a learner recovering does; with
nothing found, the current version stays. A rollback (LATEST moved to an older version) is followed:
LATEST's own version is tried whatever its number, never its ancestors below the one serving.

**Freshness**: with each loaded version the follower hands the batcher the produce times of the events
it learned that the version offered before had not (the ``event_times`` of the manifests between them
on its chain, ``core/event_times.py``); the batcher observes their ages at the swap.

**Pinned** (``serving.version``, ``serve --version N``): only N is ever loaded; LATEST is not read.

**Outages**: a poll that fails for a storage error (the store raised) changes nothing: the served
version stays, readiness too. ``serving_failed_polls_total`` counts the failures and
``serving_storage_degraded`` is 1 while they go on; the first failure is logged as a WARNING and the
recovery as one INFO line, never a line per poll. The version being considered is tried again at the
next poll.
"""

from __future__ import annotations

import logging
import queue
import threading
import time

from stream_learner.core.event_times import EventTimes
from stream_learner.service.metrics import ServingMetrics
from stream_learner.service.serving.batcher import Message, Swap
from stream_learner.service.serving.loader import VersionLoader
from stream_learner.service.storage import ObjectStore
from stream_learner.service.versions import NotServable, chain_of, read_latest, read_manifest
from stream_learner.training.threads import take_threads

log = logging.getLogger(__name__)


class VersionFollower:
    """The follower thread (:meth:`run`); see the module docstring. ``stop`` ends it."""

    def __init__(
        self,
        store: ObjectStore,
        loader: VersionLoader,
        inbox: queue.Queue[Message],
        metrics: ServingMetrics,
        stop: threading.Event,
        poll_interval_s: float,
        pinned: int | None = None,
    ) -> None:
        self.store, self.loader, self.inbox, self.metrics = store, loader, inbox, metrics
        self.stop, self.poll_interval_s, self.pinned = stop, poll_interval_s, pinned
        self.offered: int | None = None  # the version last handed to the batcher
        self.considered: int | None = None  # the target last decided on (offered or refused)
        self.refused: dict[int, NotServable] = {}
        self._failing_since: float | None = None
        self._failures = 0
        self._said_empty = False

    def run(self) -> None:
        """Thread target: poll now, then a poll starting every ``poll_interval_s`` until ``stop``."""
        # loading and the warm-up on one thread: the batcher's threads keep the cores (training/threads.py)
        take_threads(1)
        while True:
            started = time.monotonic()
            self.poll()
            # from the poll's start, not its end: a poll that loaded a version does not push the next
            # one back, so a new LATEST is read within poll_interval_s (or right after a longer load)
            if self.stop.wait(max(0.0, started + self.poll_interval_s - time.monotonic())):
                return

    def poll(self) -> None:
        """One poll: read the target, and consider it if it is new. Never raises for storage errors."""
        try:
            target = self._target()
            if target is not None and target != self.considered:
                self._consider(target)
        except Exception as err:  # the store raised: an outage, not a verdict on any version
            self._failed(err)
            return
        self._recovered()

    def _target(self) -> int | None:
        if self.pinned is not None:
            return self.pinned
        latest, _ = read_latest(self.store)
        if latest is None:
            if not self._said_empty:
                log.info("no version in %s yet: waiting for LATEST", self.store.describe())
                self._said_empty = True
            return None
        self.metrics.latest_version.set(latest)
        return latest

    def _consider(self, target: int) -> None:
        """Serve ``target``, else the newest servable version below it on its chain that is newer than
        the one serving (any, with none serving); the target is decided on only once all this ran."""
        if self._offer(target):
            self.considered = target
            return
        if self.pinned is None:
            for version in chain_of(self.store, target)[1:]:
                if self.offered is not None and version <= self.offered:
                    break
                if self._offer(version):
                    break
        self.considered = target
        if self.offered is None:
            where = (
                f"version {self.pinned} (pinned)" if self.pinned is not None else f"LATEST's chain ({target})"
            )
            log.error("nothing to serve: no version of %s can be served; not ready", where)

    def _offer(self, version: int) -> bool:
        """Load ``version`` and hand it to the batcher; False if it is refused (counted and logged once)."""
        if version == self.offered:
            return True
        if version in self.refused:
            return False
        try:
            classifier = self.loader.load(version)
        except NotServable as refusal:
            self.refused[version] = refusal
            self.metrics.versions_refused.labels(refusal.status).inc()
            serving = (
                f"version {self.offered} stays served" if self.offered is not None else "none served yet"
            )
            log.error("refusing to serve %s; %s", refusal, serving)
            return False
        self.inbox.put(Swap(classifier, self._learned_since_offered(version, classifier.manifest)))
        self.offered = version
        return True

    def _learned_since_offered(self, version: int, manifest: dict) -> EventTimes | None:
        """The produce times of the events ``version`` learned that the version offered before had not:
        the ``event_times`` of the manifests on ``version``'s chain down to that one (rejected versions
        included: their weights are trained on). None with nothing offered before (a server starting
        makes no event fresh) or on a rollback. Freshness is a measure, never a reason not to serve: a
        manifest that cannot be read ends the walk there."""
        if self.offered is None or version < self.offered:
            return None
        learned = EventTimes()
        try:
            for v in chain_of(self.store, version):
                if v <= self.offered:
                    break
                learned.update(
                    EventTimes.from_manifest(
                        (manifest if v == version else read_manifest(self.store, v)).get("event_times")
                    )
                )
        except Exception as err:
            log.debug(
                "freshness of version %d: the chain's manifests could not all be read: %s", version, err
            )
        return learned

    def _failed(self, err: BaseException) -> None:
        self.metrics.failed_polls.inc()
        self._failures += 1
        if self._failing_since is None:
            self._failing_since = time.monotonic()
            self.metrics.storage_degraded.set(1)
            serving = (
                f"version {self.offered} stays served" if self.offered is not None else "nothing served yet"
            )
            log.warning(
                "polling %s failed (%s: %s): %s; retrying every %g s, quietly until it answers",
                self.store.describe(),
                type(err).__name__,
                err,
                serving,
                self.poll_interval_s,
            )

    def _recovered(self) -> None:
        if self._failing_since is None:
            return
        log.info(
            "%s answers again, after %d failed polls in %.0f s",
            self.store.describe(),
            self._failures,
            time.monotonic() - self._failing_since,
        )
        self._failing_since, self._failures = None, 0
        self.metrics.storage_degraded.set(0)
