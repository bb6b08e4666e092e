"""The memory a learner may use, item by item: what bounds it, and the start-up check against a limit.

Every buffer between Kafka and the optimizer is bounded by a setting, so the resident memory of a
learner has an upper bound that can be computed before it runs (:func:`memory_budget`):

=====================  =====================================================================
item                   bound
=====================  =====================================================================
runtime                Python, torch, transformers, tokenizer, librdkafka: measured, a constant
model                  parameters × 4 B × 5 (weights, θ0, gradients, AdamW's two moments)
snapshot               parameters × 4 B × 3 × 2 (weights and moments copied for the publisher,
                       and their serialised files being written) — on the host, also with CUDA
activations            micro-batch × max_length × hidden × layers × 40 × 4 B, plus attention
                       maps micro-batch × heads × max_length² × layers × 3 × 4 B
replay                 replay.capacity × (max_length × token bytes + 16 B)
fresh queue            (queue_max_batches + 3) × poll_max_messages × (max_length × 8 B + 1 kB):
                       the queue, one batch held back, and the partitions' buffers (one poll
                       shared between them, plus the poll that filled them)
kafka prefetch         librdkafka ``queued.max.messages.kbytes`` (:data:`PREFETCH_KBYTES`)
                       + one poll of messages of at most ``events.max_text_bytes`` × 2
=====================  =====================================================================

The factors are deliberately generous (a bound, not an estimate); ``tests/integration/
test_overload.py`` floods a learner with 200,000 events and checks its peak RSS stays below it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from stream_learner.core.config import Settings
from stream_learner.core.replay import token_dtype

MiB = 1 << 20
# an idle learner with a 1-layer MiniLM measured 590 MiB; the allocator keeps freed snapshot memory in
# its arenas, so a busy one settles higher (docs/security.md has the figures)
RUNTIME_BYTES = 800 * MiB
PREFETCH_KBYTES = 16_384  # librdkafka's consumer prefetch (its default is 65,536)


@dataclass(frozen=True)
class MemoryBudget:
    """Upper bounds, in bytes, of each part of a learner's resident memory."""

    runtime: int
    model: int
    snapshot: int
    activations: int
    replay: int
    fresh_queue: int
    kafka_prefetch: int

    @property
    def total(self) -> int:
        return sum(vars(self).values())

    def describe(self) -> str:
        parts = ", ".join(f"{k} {v / MiB:,.0f}" for k, v in vars(self).items())
        return f"{self.total / MiB:,.0f} MiB ({parts} MiB)"


def memory_budget(settings: Settings, model: torch.nn.Module) -> MemoryBudget:
    """The upper bound of a learner's resident memory with ``settings`` and ``model`` (see module doc)."""
    params = sum(p.numel() for p in model.parameters())
    cfg = model.config
    hidden = getattr(cfg, "hidden_size", 768)
    layers = getattr(cfg, "num_hidden_layers", 12)
    heads = getattr(cfg, "num_attention_heads", 12)
    t, k, length = settings.training, settings.kafka, settings.model.max_length
    batch = t.fresh_per_step + t.replay_per_step
    token_bytes = token_dtype(getattr(cfg, "vocab_size", 1 << 17)).itemsize
    return MemoryBudget(
        runtime=RUNTIME_BYTES,
        model=params * 4 * 5,
        snapshot=params * 4 * 3 * 2,
        activations=batch * length * layers * 4 * (hidden * 40 + heads * length * 3),
        replay=settings.replay.capacity * (length * token_bytes + 16),
        fresh_queue=(k.queue_max_batches + 3) * k.poll_max_messages * (length * 8 + 1024),
        kafka_prefetch=PREFETCH_KBYTES * 1024 + k.poll_max_messages * settings.events.max_text_bytes * 2,
    )
