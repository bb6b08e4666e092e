"""The trainer's drift watch: feeds each step's prequential outputs to the drift signals.

The signals themselves (Page-Hinkley on the errors or losses, a χ² test of the label mix, an MMD
test of input embeddings) are in ``core/drift.py``; this part gives them their inputs from a step:

- errors and losses of the fresh events, scored before the step learned them;
- their labels against the replay buffer's label mix (not with a class-balanced buffer, whose mix is
  not the stream's by design);
- their input embeddings — means of the *pretrained* token embeddings θ0, a fixed feature map that
  does not move as the encoder learns — against those of the replayed examples.

Its state goes into every snapshot, so a learner that resumes does not warm its signals up again
and re-report a shift it reported before the restart.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from stream_learner.core.config import Settings
from stream_learner.core.drift import DriftMonitor, static_embeddings
from stream_learner.core.events import TokenizedEvent
from stream_learner.core.replay import ReservoirBuffer, StoredExample

log = logging.getLogger(__name__)


class DriftWatch:
    """The drift signals of one learner, fed one step at a time.

    Parameters
    ----------
    settings
        ``drift.*`` thresholds and windows, ``model.labels``, ``training.seed``,
        ``replay.class_balanced``.
    token_table
        θ0's token-embedding matrix [vocab, hidden] (float32, not trained).
    special_ids
        Token ids left out of the embeddings (CLS, SEP, PAD…).
    """

    def __init__(self, settings: Settings, token_table: np.ndarray, special_ids: Sequence[int]) -> None:
        self.monitor = DriftMonitor(len(settings.model.labels), settings.drift, settings.training.seed)
        self.token_table, self.special_ids = token_table, list(special_ids)
        self.label_mix_from_replay = not settings.replay.class_balanced

    def observe(
        self,
        fresh: Sequence[TokenizedEvent],
        predictions: np.ndarray,
        labels: np.ndarray,
        losses: np.ndarray,
        replayed: Sequence[StoredExample],
        replay: ReservoirBuffer,
    ) -> list[str]:
        """Feed one step's fresh events; the names of the signals that fired on them."""
        embeddings = static_embeddings([e.input_ids for e in fresh], self.token_table, self.special_ids)
        reference = static_embeddings([r.input_ids for r in replayed], self.token_table, self.special_ids)
        counts = replay.label_counts() if self.label_mix_from_replay else None
        errors = (predictions != labels).astype(np.float32)
        fired = self.monitor.update(errors, losses, labels, embeddings, counts, reference)
        for name in fired:
            log.warning("drift detected by the %s signal after %d events", name, self.monitor.events_seen)
        return fired

    def scores(self) -> dict[str, float]:
        return self.monitor.scores()

    def state_dict(self) -> tuple[dict[str, np.ndarray], dict]:
        return self.monitor.state_dict()

    def load_state_dict(self, arrays: dict[str, np.ndarray], meta: dict) -> None:
        self.monitor.load_state_dict(arrays, meta)
