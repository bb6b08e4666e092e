"""A tiny, randomly initialised BERT with the bundled model's real tokenizer, for tests of mechanics.

The bundled all-MiniLM-L6-v2 cut to one layer still has 14 M parameters (11.7 M of them in the
30522 × 384 embedding): ≈ 160 MB per published version (weights, AdamW moments, replay), heavy to
step, snapshot, hash and upload. Offsets, lineage, crash recovery, the publish protocol, restarts,
dead letters, backpressure, fairness, lockstep, metrics… are the same on a model of 1 M parameters
(≈ 4 MB of weights), whose weights are random: nothing it predicts means anything, so tests that
assert *learning* keep the pretrained model (``tests.support.factories.pretrained_settings``).

The directory is a ``BertModel`` checkpoint (no classification head: ``load_model`` reports the head
as new, outside the L2-SP set, as for MiniLM) plus the bundled tokenizer's files, built from a fixed
seed. ``tests/conftest.py`` picks its location once per session (``$SL_TESTS_TINY_MODEL``, which the
xdist workers and the learner processes the tests start inherit); the first process that needs it
builds it there, under a file lock, the others find it built.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from filelock import FileLock

ENV = "SL_TESTS_TINY_MODEL"  # not STREAM_LEARNER_…: the learner refuses unknown variables of its prefix

CONFIG = {
    "vocab_size": 30522,  # the bundled tokenizer's (checked when built)
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "max_position_embeddings": 512,  # MiniLM's: tests of model.max_length's bound rely on it
    "type_vocab_size": 2,
    "pad_token_id": 0,
}
SEED = 0
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
DONE = "BUILT"  # written last: a directory without it is a build cut short


def choose_dir() -> Path:
    """The session's directory (not built yet), exported to child processes in ``$SL_TESTS_TINY_MODEL``."""
    path = Path(tempfile.mkdtemp(prefix="sl-tiny-model-")) / "model"
    os.environ[ENV] = str(path)
    return path


def tiny_model_dir() -> str:
    """The tiny model's directory, built on first use (once per session, whichever process comes first)."""
    path = Path(os.environ[ENV]) if os.environ.get(ENV) else choose_dir()
    if (path / DONE).exists():
        return str(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        if not (path / DONE).exists():
            build(path)
    return str(path)


def build(path: Path) -> None:
    import torch
    from transformers import BertConfig, BertModel

    from stream_learner.core.config import BUNDLED_MODEL
    from stream_learner.core.model import resolve_model_path

    bundled = Path(resolve_model_path(BUNDLED_MODEL))
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    for name in TOKENIZER_FILES:
        shutil.copyfile(bundled / name, path / name)
    vocab = sum(1 for _ in (bundled / "vocab.txt").open(encoding="utf-8"))
    assert vocab == CONFIG["vocab_size"], f"the bundled tokenizer has {vocab} tokens"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = BertModel(BertConfig(architectures=["BertModel"], **CONFIG))
    model.save_pretrained(path)
    (path / DONE).write_text("ok\n")
