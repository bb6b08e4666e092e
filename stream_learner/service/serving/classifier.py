"""One published version loaded for inference: plain transformers weights and tokenizer, in eval mode.

Texts are tokenized as the learner tokenizes its events (``core/intake.Tokenize``: truncated at
``model.max_length``, the second segment of a pair after the first), sorted by length and cut into
forward passes of at most ``max_batch`` rows (``core/batching.collate`` pads each to its longest),
so a row's probabilities are those the learner's weights give the same event: the prequential score
it computed before learning it, on the version that learned it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from stream_learner.core.batching import collate
from stream_learner.core.events import LabeledEvent
from stream_learner.core.intake import Tokenize
from stream_learner.core.replay import StoredExample

WARM_UP_TEXTS = ("warm-up", "a warm-up text of a few words more, to run a second length")


class UnloadableVersion(RuntimeError):
    """The version's files match its manifest but do not load as a sequence classifier of its labels."""


@dataclass
class Classifier:
    """A version's model and tokenizer on ``device``, ready to predict. Used by one thread at a time
    (the batcher's; before it, the follower's warm-up)."""

    version: int
    manifest: dict
    labels: tuple[str, ...]
    model: torch.nn.Module
    tokenizer: object
    device: torch.device
    max_length: int
    max_batch: int

    def __post_init__(self) -> None:
        self._tokenize = Tokenize(self.tokenizer, self.max_length)
        self._pad_id = self.tokenizer.pad_token_id or 0  # type: ignore[attr-defined]
        self._with_token_types = "token_type_ids" in self.tokenizer.model_input_names  # type: ignore[attr-defined]

    @torch.inference_mode()
    def predict(self, texts: Sequence[str], pairs: Sequence[str | None] | None = None) -> np.ndarray:
        """Probabilities, float32 ``[len(texts), len(labels)]``, row i for ``texts[i]`` (and ``pairs[i]``).

        Method: tokenize all rows at once; order them by token length (stable); cut the order into
        forward passes of at most ``max_batch`` rows, each padded to its longest row; softmax of the
        logits in float32; rows put back in the order given.
        """
        pairs = pairs if pairs is not None else [None] * len(texts)
        events = [LabeledEvent(text=t, label=0, text_pair=p) for t, p in zip(texts, pairs, strict=True)]
        examples = [StoredExample(ids, 0, start) for ids, start in self._tokenize(events)]
        order = np.argsort([len(e.input_ids) for e in examples], kind="stable")
        out = np.empty((len(examples), len(self.labels)), dtype=np.float32)
        for first in range(0, len(order), self.max_batch):
            rows = order[first : first + self.max_batch]
            batch = collate([examples[i] for i in rows], self._pad_id, self._with_token_types)
            batch.pop("labels")
            logits = self.model(**{k: v.to(self.device) for k, v in batch.items()}).logits
            out[rows] = torch.softmax(logits.float(), dim=-1).cpu().numpy()
        return out

    def warm_up(self) -> None:
        """One batch through the model: lazy initialisations and first-call costs happen here, not in
        the first request's answer."""
        self.predict(WARM_UP_TEXTS)


def load_classifier(
    directory: Path, version: int, manifest: dict, device: torch.device, max_length: int, max_batch: int
) -> Classifier:
    """Load a version's directory with plain transformers (``AutoModelForSequenceClassification`` and
    ``AutoTokenizer``, local files only) on ``device``, in eval mode without gradients.

    The labels are the manifest's; the model must have one output per label, or
    :class:`UnloadableVersion`. So does anything transformers cannot load.
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # a clean checkpoint loads without a word; refusals say why themselves
    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, use_fast=True, local_files_only=True)
        model = AutoModelForSequenceClassification.from_pretrained(
            directory, local_files_only=True, dtype=torch.float32
        )
    except Exception as err:  # whatever transformers raises for files it cannot use
        raise UnloadableVersion(f"transformers cannot load it: {type(err).__name__}: {err}") from None
    if not tokenizer.is_fast:
        raise UnloadableVersion("its tokenizer has no fast (Rust) implementation")
    labels = manifest.get("labels")
    if not isinstance(labels, list) or not all(isinstance(name, str) for name in labels):
        labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    if len(labels) != model.config.num_labels:
        raise UnloadableVersion(
            f"its manifest names {len(labels)} labels, its model has {model.config.num_labels} outputs"
        )
    model.requires_grad_(False)
    return Classifier(
        version=version,
        manifest=manifest,
        labels=tuple(labels),
        model=model.eval().to(device),
        tokenizer=tokenizer,
        device=device,
        max_length=max_length,
        max_batch=max_batch,
    )
