"""Dynamic micro-batching, and the swap between versions: the one thread that computes predictions.

Everything reaches the batcher through one queue, its *inbox*, in arrival order: :class:`Infer`
(a request's rows and where to send the :class:`Answer`), :class:`Swap` (a loaded version, from the
follower) and :class:`Stop`. The batcher alone holds the model it predicts with, so a swap cannot
happen in the middle of a batch:

1. take the first item; a swap is applied at once (between batches: nothing is being computed);
2. a request opens a batch: more requests join it until it holds ``max_batch`` texts or
   ``max_wait_s`` has passed since it opened (a request that would overflow it opens the next one; a
   single request larger than ``max_batch`` is a batch of its own, computed in several passes);
   a swap arriving meanwhile waits for the batch to end;
3. the batch's rows, sorted by length, go through the model held when the batch opened
   (:meth:`Classifier.predict`, under ``torch.inference_mode``); each request is answered with its
   own rows and that version's number.

Before the first swap there is nothing to answer with: requests get 503. A batch whose computation
fails answers its requests with 500 and the batcher goes on.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from stream_learner.core.event_times import EventTimes
from stream_learner.service.metrics import ServingMetrics
from stream_learner.service.serving.classifier import Classifier
from stream_learner.service.serving.protocol import created_timestamp
from stream_learner.training.threads import take_threads

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Answer:
    """What one request gets: its rows' probabilities computed by ``version`` (whose labels are
    ``labels``), or an HTTP error ``code`` and its message."""

    version: int | None = None
    labels: tuple[str, ...] = ()
    probabilities: np.ndarray | None = None
    code: int = 200
    error: str | None = None


@dataclass(frozen=True)
class Infer:
    """A request's rows; ``reply`` is called once, from the batcher's thread, with its :class:`Answer`."""

    texts: tuple[str, ...]
    pairs: tuple[str, ...] | None
    reply: Callable[[Answer], None]

    @property
    def size(self) -> int:
        return len(self.texts)


@dataclass(frozen=True)
class Swap:
    """Serve ``classifier`` from the next batch on; ``learned`` holds the produce times of the events it
    learned that the version served now had not (None: not known, or nothing served before)."""

    classifier: Classifier
    learned: EventTimes | None = None


@dataclass(frozen=True)
class Stop:
    """Answer what is queued before it, then end the thread."""


@dataclass(frozen=True)
class ServedVersion:
    """What the batcher serves, for the metadata endpoint (immutable: replaced whole at a swap)."""

    version: int
    labels: tuple[str, ...]
    manifest: dict


Message = Infer | Swap | Stop


class MicroBatcher:
    """The batcher thread (:meth:`run`); see the module docstring.

    ``ready`` is set once a version is loaded; ``served`` is the :class:`ServedVersion` answering now
    (None before the first swap): other threads only read them.
    """

    def __init__(
        self,
        inbox: queue.Queue[Message],
        max_batch: int,
        max_wait_s: float,
        metrics: ServingMetrics,
        threads: int | None = None,
    ) -> None:
        self.inbox, self.max_batch, self.max_wait_s, self.metrics = inbox, max_batch, max_wait_s, metrics
        self.threads = threads
        self.ready = threading.Event()
        self.served: ServedVersion | None = None
        self._model: Classifier | None = None  # touched by the batcher thread only

    def run(self) -> None:
        """Thread target: batches until a :class:`Stop` arrives."""
        if self.threads is not None:
            take_threads(self.threads)  # torch's intra-op threads are this thread's (training/threads.py)
        carried: Infer | None = None
        while True:
            first = carried if carried is not None else self.inbox.get()
            carried = None
            if isinstance(first, Swap):
                self._swap(first)
                continue
            if isinstance(first, Stop):
                return
            batch, swaps, carried, stop = self._gather(first)
            self._compute(batch)
            for swap in swaps:
                self._swap(swap)
            if stop:
                if carried is not None:
                    self._compute([carried])
                return

    def _gather(self, first: Infer) -> tuple[list[Infer], list[Swap], Infer | None, bool]:
        """The batch ``first`` opens: (its requests, swaps that arrived meanwhile, the request that
        would have overflowed it, whether a Stop arrived)."""
        batch, size, swaps = [first], first.size, []
        deadline = time.monotonic() + self.max_wait_s
        while size < self.max_batch:
            item = self._next(deadline)
            if item is None:
                break
            if isinstance(item, Swap):
                swaps.append(item)
            elif isinstance(item, Stop):
                return batch, swaps, None, True
            elif size + item.size > self.max_batch:
                return batch, swaps, item, False
            else:
                batch.append(item)
                size += item.size
        return batch, swaps, None, False

    def _next(self, deadline: float) -> Message | None:
        """The next message before ``deadline``, or None (with max_wait 0: only one already queued)."""
        try:
            if not self.max_wait_s:
                return self.inbox.get_nowait()
            return self.inbox.get(timeout=max(deadline - time.monotonic(), 0))
        except queue.Empty:
            return None

    def _compute(self, batch: list[Infer]) -> None:
        """One batch on the model held now; every request answered, whatever happens."""
        model = self._model
        if model is None:
            for request in batch:
                _send(request, Answer(code=503, error="no version loaded yet: see /v2/health/ready"))
            return
        texts = [t for request in batch for t in request.texts]
        pairs = [p for r in batch for p in (r.pairs if r.pairs is not None else [None] * r.size)]
        self.metrics.batch_size.observe(len(texts))
        try:
            probabilities = model.predict(texts, pairs if any(p is not None for p in pairs) else None)
        except Exception as err:
            log.exception("a batch of %d texts failed on version %d", len(texts), model.version)
            for request in batch:
                _send(request, Answer(code=500, error=f"inference failed: {type(err).__name__}: {err}"))
            return
        first = 0
        for request in batch:
            rows = probabilities[first : first + request.size]
            first += request.size
            _send(request, Answer(version=model.version, labels=model.labels, probabilities=rows))

    def _swap(self, swap: Swap) -> None:
        classifier = swap.classifier
        before = self._model.version if self._model is not None else None
        self._model = classifier  # the previous one is dropped here, between two batches
        self.served = ServedVersion(classifier.version, classifier.labels, classifier.manifest)
        newest = classifier.manifest.get("newest_event_ms")
        self.metrics.now_serving(
            classifier.version,
            created_timestamp(classifier.manifest),
            newest if isinstance(newest, int) and not isinstance(newest, bool) else None,
            swap.learned,
        )
        self.ready.set()
        log.info(
            "serving version %d%s", classifier.version, "" if before is None else f" (was version {before})"
        )


def _send(request: Infer, answer: Answer) -> None:
    """Hand an answer over; a requester gone meanwhile (its event loop closed) never stops the batcher."""
    try:
        request.reply(answer)
    except Exception as err:
        log.debug("an answer could not be handed over: %s", err)
