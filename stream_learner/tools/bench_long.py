"""Long texts: the trainer on documents of hundreds of tokens, cut at ``model.max_length`` (issue 17).

Users' events are often e-mails and tickets — hundreds of tokens, most cut at ``max_length`` — while
the bundled stream's sentences are ≈ 25 tokens, where attention is a few per cent of a step and a
micro-batch pads little. This part of ``stream-learner bench`` measures the long case instead of
assuming it:

1. **the documents** — :func:`long_documents`: the bundled stream's sentences joined, in stream order,
   into documents of one domain and one label (a review, a thread), each until it holds a word count
   drawn from ``words`` (seeded): most are longer than 256 tokens, some longer than 512;
2. **trainer alone at each length** — the service's trainer thread fed from memory
   (``harness.run_trainer_alone``), at ``model.max_length`` = each of ``lengths``, in the trainer's
   precision and, beside a bf16 trainer, in fp32: examples/s, real tokens/s, the padding efficiency
   of its length-sorted micro-batches, and the share of events cut at the length;
3. **attention's share of a step** — :func:`attention_share`: a few of the engine's steps under
   ``torch.profiler``, the time of the attention kernels (SDPA's fused kernels, or, in its math
   backend, the batched matmuls and the softmax, forward and backward: nothing else in a BERT layer
   uses ``bmm`` or ``softmax``) over the time of every operator of the step. Beside it, the share the
   FLOPs predict, ``L / (L + 6·d)`` for sequences of ``L`` tokens and width ``d`` (4·L²·d of
   attention against 24·L·d² of the layer's matmuls).

The figures go to the bench's JSON under ``long_texts``; ``bench_report.long_rows`` renders them.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np

from stream_learner.core.config import Settings
from stream_learner.core.events import LabeledEvent, LabelSet, TokenizedEvent
from stream_learner.core.intake import Tokenize
from stream_learner.tools.datasets import STREAM, bundled_path, read_jsonl
from stream_learner.tools.harness import run_trainer_alone
from stream_learner.training.factory import build_trainer

# the operators of attention (see the module docstring): SDPA's fused kernels and, in its math
# backend, the batched matmuls (Q·Kᵀ, P·V) and the softmax with their backward
ATTENTION_OPS = frozenset(
    {
        "aten::bmm",
        "aten::_softmax",
        "aten::_softmax_backward_data",
        "aten::_scaled_dot_product_flash_attention_for_cpu",
        "aten::_scaled_dot_product_flash_attention_for_cpu_backward",
        "aten::_scaled_dot_product_flash_attention",
        "aten::_scaled_dot_product_flash_attention_backward",
        "aten::_scaled_dot_product_efficient_attention",
        "aten::_scaled_dot_product_efficient_attention_backward",
        "aten::_scaled_dot_product_cudnn_attention",
        "aten::_scaled_dot_product_cudnn_attention_backward",
    }
)


@dataclass
class LongTextConfig:
    """What the long-text part measures (recorded in the bench's JSON)."""

    lengths: tuple[int, ...] = (256, 512)  # model.max_length of each run
    documents: int = 384  # fresh events of each run
    # of them, before the rate is taken: the first window (bucket_window × fresh_per_step = 128 events
    # at the defaults) is assembled before anything is in the replay buffer, so it trains no replay
    warmup: int = 128
    words: tuple[int, int] = (120, 480)  # a document's word count, drawn uniformly
    profiled_steps: int = 3  # engine steps under the profiler (after one unprofiled)
    seed: int = 0

    @classmethod
    def quick(cls, **changes: Any) -> LongTextConfig:
        """A smoke run's size: one length, a few documents."""
        base: dict[str, Any] = {"lengths": (256,), "documents": 24, "warmup": 8, "profiled_steps": 1}
        return cls(**{**base, **changes})


def long_documents(rows: Sequence[dict], n: int, words: tuple[int, int], seed: int = 0) -> list[dict]:
    """``n`` documents of the stream's sentences: in stream order, each sentence joins the open document
    of its domain and label, which is closed once it holds its drawn word count (``words``, inclusive).
    A document's label is its sentences' label. Fewer than ``n`` if the stream runs out; rows without a
    ``domain`` count as one domain.

    >>> rows = [{"text": "a b", "label": "pos"}, {"text": "c", "label": "neg"}]
    >>> rows.append({"text": "d e", "label": "pos"})
    >>> long_documents(rows, 1, (4, 4))
    [{'text': 'a b d e', 'label': 'pos', 'domain': None}]
    """
    low, high = words
    if not 0 < low <= high:
        raise ValueError(f"words must be 0 < low <= high, not {words}")
    rng = random.Random(seed)
    open_docs: dict[tuple[Any, str], tuple[list[str], int, int]] = {}  # key -> (texts, words, target)
    out: list[dict] = []
    for row in rows:
        key = (row.get("domain"), row["label"])
        texts, count, target = open_docs.get(key) or ([], 0, rng.randint(low, high))
        texts.append(row["text"])
        count += len(row["text"].split())
        if count >= target:
            out.append({"text": " ".join(texts), "label": row["label"], "domain": key[0]})
            open_docs.pop(key, None)
            if len(out) == n:
                break
        else:
            open_docs[key] = (texts, count, target)
    return out


def tokenized_documents(
    documents: Sequence[dict], settings: Settings, tokenizer: Any
) -> tuple[list[TokenizedEvent], dict[str, float]]:
    """The documents tokenized as the consumer does (cut at ``settings.model.max_length``), with their
    token counts before the cut: mean, p50, p95 and the share cut."""
    labels = LabelSet(settings.model.labels)
    parsed = [LabeledEvent(text=d["text"], label=labels.index(d["label"])) for d in documents]
    max_length = settings.model.max_length
    cut = Tokenize(tokenizer, max_length)(parsed)
    # token counts without the cut: a tokenizer call without truncation
    full = [
        len(ids)
        for ids in tokenizer([d["text"] for d in documents], truncation=False, verbose=False)["input_ids"]
    ]
    events = [
        TokenizedEvent(ids, e.label, start, partition=0, offset=k, timestamp_ms=0)
        for k, ((ids, start), e) in enumerate(zip(cut, parsed, strict=True))
    ]
    stats = {
        "tokens_mean": float(np.mean(full)),
        "tokens_p50": float(np.percentile(full, 50)),
        "tokens_p95": float(np.percentile(full, 95)),
        "cut_share": float(np.mean([n > max_length for n in full])),
        "tokens_trained_mean": float(np.mean([len(e.input_ids) for e in events])),
    }
    return events, stats


def attention_share(
    settings: Settings, tokenizer: Any, events: Sequence[TokenizedEvent], steps: int
) -> dict[str, float]:
    """Attention's share of the engine's steps on ``events`` (module docstring, 3.): one step to warm up,
    then ``steps`` under the profiler, each on the next micro-batch of fresh + replay size, sorted by
    length as the trainer's windows are."""
    from torch.profiler import ProfilerActivity, profile

    trainer = build_trainer(settings, tokenizer)
    size = settings.training.fresh_per_step + settings.training.replay_per_step
    batches = [
        sorted(events[i : i + size], key=lambda e: len(e.input_ids)) for i in range(0, len(events), size)
    ]
    batches = [b for b in batches if len(b) == size] or [list(events)]
    trainer.engine.step(list(batches[0]), len(batches[0]))
    activities = [ProfilerActivity.CPU] + (
        [ProfilerActivity.CUDA] if trainer.engine.device.type == "cuda" else []
    )
    with profile(activities=activities) as prof:
        for k in range(steps):
            batch = batches[(k + 1) % len(batches)]
            trainer.engine.step(list(batch), len(batch))
    total = attention = 0.0
    device_time = "self_device_time_total" if trainer.engine.device.type == "cuda" else "self_cpu_time_total"
    for event in prof.key_averages():
        spent = float(getattr(event, device_time))
        total += spent
        if event.key in ATTENTION_OPS:
            attention += spent
    config = trainer.engine.model.config
    length = float(np.mean([len(e.input_ids) for b in batches for e in b]))
    return {
        "measured": attention / total if total else 0.0,
        "by_flops": length / (length + 6 * config.hidden_size),
        "mean_tokens": length,
        "steps": steps,
    }


def run_long_texts(
    cfg: LongTextConfig,
    settings_for: Callable[..., Settings],
    tokenizer: Any,
    bf16: bool,
    threads: int,
    computing: Callable[[Callable[[], Any]], Any],
    console: Any,
) -> dict[str, Any]:
    """The module docstring's measurements. ``settings_for(**sections)`` gives the bench's settings;
    ``computing(fn)`` runs ``fn`` in a thread that has the cores (the trainer thread takes its own)."""
    rows = list(read_jsonl(bundled_path(STREAM)))
    documents = long_documents(rows, cfg.documents, cfg.words, cfg.seed)
    precisions = ["bf16", "fp32"] if bf16 else ["fp32"]
    out: dict[str, Any] = {"documents": len(documents), "words": list(cfg.words), "runs": []}
    for length in cfg.lengths:
        # tokenized once per length: the cut depends on max_length only, not on the precision
        events, stats = tokenized_documents(documents, settings_for(model={"max_length": length}), tokenizer)
        console.print(
            f"  max_length {length}: {len(events)} documents, {stats['tokens_mean']:.0f} tokens on "
            f"average, {stats['cut_share']:.0%} cut; {' and '.join(precisions)}"
        )
        for precision in precisions:
            settings = settings_for(model={"max_length": length}, training={"precision": precision})
            run = run_trainer_alone(settings, tokenizer, events, cfg.warmup, threads=threads)
            share = computing(partial(attention_share, settings, tokenizer, events, cfg.profiled_steps))
            out["runs"].append(
                {
                    "max_length": length,
                    "precision": precision,
                    **stats,
                    "examples_per_second": run["examples_per_second"],
                    "events_per_second": run["events_per_second"],
                    "real_tokens_per_second": run["real_tokens_per_second"],
                    "padding_efficiency": run["padding_efficiency"],
                    "attention_share": share,
                    "trainer": run,
                }
            )
    return out
