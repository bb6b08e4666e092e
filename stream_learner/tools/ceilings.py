"""The ceilings ``stream-learner bench`` measures a learner against: what this device and the model
can do without the learner around them.

* :func:`measure_roofline` — the device's matmul peak (the fastest of 1024² and 2048² matmuls, and the
  rate at the model's own largest matmul); :func:`roofline_of` combines repeated measurements (the best
  counts: other load on a machine only ever slows a matmul down); ÷ :func:`training_flops_per_example`
  (≈ 6 FLOPs per parameter and token, Kaplan et al. 2020) it is the roofline in examples/s;
* :func:`measure_forward_backward` — the model alone: forward and backward, nothing else;
* :func:`measure_step_parts` — the parts of a step that pass over every parameter whatever the batch
  (AdamW variants, the L2-SP gradient, clipping).

References
----------
[^1]: Kaplan, J. et al. (2020). Scaling Laws for Neural Language Models. arXiv:2001.08361.
[^2]: Williams, S., Waterman, A. and Patterson, D. (2009). Roofline: an insightful visual performance
      model for multicore architectures. Communications of the ACM 52(4).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from stream_learner.core.batching import collate
from stream_learner.core.config import Settings
from stream_learner.core.events import TokenizedEvent
from stream_learner.core.model import L2SP, load_model
from stream_learner.training.engine import pick_device
from stream_learner.training.precision import resolve_precision


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_flops(
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    shape: tuple[int, int, int] = (1024, 1024, 1024),
    seconds: float = 1.0,
) -> float:
    """Measured FLOP/s of an ``(m × k) @ (k × n)`` matmul on ``device``: the fastest of as many
    matmuls as fit in ``seconds``, after a warm-up. Other load on the machine only ever slows a matmul
    down, so the fastest is the least disturbed measurement (the rule of Python's ``timeit``)."""
    m, k, n = shape
    a = torch.randn(m, k, device=device, dtype=dtype)
    b = torch.randn(k, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    synchronize(device)
    best, until = math.inf, time.perf_counter() + seconds
    while time.perf_counter() < until:
        t0 = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * m * k * n / best


def measure_roofline(
    device: torch.device, dtype: torch.dtype, model_shape: tuple[int, int, int], seconds: float
) -> dict[str, Any]:
    """The device's matmul peak — the best of square matmuls of 1024² and 2048², ``seconds`` each — and,
    for comparison, the rate at ``model_shape`` (a micro-batch's tokens × hidden × intermediate: the
    model's largest matmul)."""
    square = {size: matmul_flops(device, dtype, (size, size, size), seconds) for size in (1024, 2048)}
    return {
        "matmul_flops": max(square.values()),
        "square_matmul_flops": {str(size): f for size, f in square.items()},
        "model_shape": list(model_shape),
        "model_shape_matmul_flops": matmul_flops(device, dtype, model_shape, seconds),
    }


def roofline_of(peaks: Sequence[dict[str, Any]], per_example: float) -> dict[str, Any]:
    """The roofline from repeated :func:`measure_roofline` results: the best of them (each size's and
    the model shape's), every measurement's peak kept under ``measurements``."""
    square = {
        size: max(p["square_matmul_flops"][size] for p in peaks) for size in peaks[0]["square_matmul_flops"]
    }
    flops = max(square.values())
    return {
        "matmul_flops": flops,
        "square_matmul_flops": square,
        "model_shape": peaks[0]["model_shape"],
        "model_shape_matmul_flops": max(p["model_shape_matmul_flops"] for p in peaks),
        "measurements": [p["matmul_flops"] for p in peaks],
        "training_flops_per_example": per_example,
        "examples_per_second": flops / per_example,
        "events_per_second": flops / per_example,
    }


def training_flops_per_example(model: torch.nn.Module, tokens: float) -> float:
    """≈ 6 × (encoder parameters × ``tokens`` + pooler and head parameters): forward 2, backward 4 FLOPs
    per parameter and token (Kaplan et al. 2020). Embedding lookups are not matmuls and are left out,
    and so is attention over the sequence (≈ 12·layers·tokens²·hidden, < 5 % at 25 tokens)."""
    per_token = per_sequence = 0
    for name, p in model.named_parameters():
        if ".encoder." in f".{name}":
            per_token += p.numel()
        elif "embeddings" not in name:
            per_sequence += p.numel()
    return 6.0 * (per_token * tokens + per_sequence)


def _best_seconds(fn: Callable[[], object], device: torch.device, reps: int = 3) -> float:
    """The fastest of ``reps`` calls, each timed to its end on ``device`` (a GPU runs them async)."""
    fn()
    best = math.inf
    for _ in range(reps):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return best


def measure_step_parts(settings: Settings) -> dict[str, float]:
    """Seconds per step of the parts of a step that do not depend on the batch, on this model: AdamW as
    constructed by default, with ``foreach`` and fused; the L2-SP gradient in place (as the trainer
    does it) and through a ``θ − θ0`` temporary (as it did before); gradient clipping. On the trainer's
    device, each timed to its end there."""
    device = pick_device(settings.training.device)
    model = load_model(settings.model).model.to(device)
    params = [p for p in model.parameters()]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    out: dict[str, float] = {}
    for name, options in (
        ("adamw_default", {}),
        ("adamw_foreach", {"foreach": True}),
        ("adamw_fused", {"fused": True}),
    ):
        optimizer = torch.optim.AdamW(params, lr=1e-5, **options)
        out[f"{name}_s"] = _best_seconds(optimizer.step, device)
        del optimizer
    l2sp = L2SP(params, 0.01)

    def with_temporary() -> None:
        diffs = torch._foreach_sub([p.detach() for p in params], l2sp.theta0)
        torch._foreach_add_([p.grad for p in params], diffs, alpha=2.0 * l2sp.lam)

    out["l2sp_in_place_s"] = _best_seconds(l2sp.add_gradient_, device)
    out["l2sp_temporary_s"] = _best_seconds(with_temporary, device)
    out["clip_grad_norm_s"] = _best_seconds(lambda: torch.nn.utils.clip_grad_norm_(params, 1.0), device)
    out["parameters"] = float(sum(p.numel() for p in params))
    return out


def measure_forward_backward(
    settings: Settings, tokenizer: Any, events: Sequence[TokenizedEvent]
) -> dict[str, float]:
    """The model alone: forward, cross-entropy and backward — no optimizer, L2-SP, clipping, scoring
    or Python around them — in the trainer's precision, on micro-batches of the trainer's size cut from
    ``events`` sorted by length
    (about the padding of bucketed windows). Between the roofline and the trainer alone, it splits the
    gap into what the model's own kernels reach and what the rest of a step costs."""
    t = settings.training
    size = t.fresh_per_step + t.replay_per_step
    model = load_model(settings.model).model.to(pick_device(t.device))
    model.eval()  # as the trainer: no dropout
    device = next(model.parameters()).device
    precision = resolve_precision(t.precision, device)  # the trainer's arithmetic, autocast included
    ordered = sorted(events, key=lambda e: len(e.input_ids))
    pad_id, with_token_types = tokenizer.pad_token_id or 0, "token_type_ids" in tokenizer.model_input_names
    batches = [
        collate(ordered[i : i + size], pad_id, with_token_types)
        for i in range(0, len(ordered) - size + 1, size)
    ]

    def step(batch: dict[str, torch.Tensor]) -> None:
        inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
        with precision.autocast():
            logits = model(**inputs).logits
        F.cross_entropy(logits.float(), batch["labels"].to(device)).backward()
        model.zero_grad(set_to_none=True)  # as the trainer does

    step(batches[0])  # warm-up: allocations, the first kernels
    synchronize(device)
    t0 = time.perf_counter()
    for batch in batches:
        step(batch)
    synchronize(device)
    seconds = time.perf_counter() - t0
    examples = sum(len(b["labels"]) for b in batches)
    real = sum(int(b["attention_mask"].sum()) for b in batches)
    padded = sum(b["attention_mask"].numel() for b in batches)
    return {
        "examples": examples,
        "seconds": seconds,
        "examples_per_second": examples / seconds,
        "events_per_second": examples / seconds,
        "padding_efficiency": real / padded,
    }


def run_micro_batch_loop(
    settings: Settings, tokenizer: Any, events: Sequence[TokenizedEvent], warmup_events: int, bf16: bool
) -> dict[str, float]:
    """The loop a good engineer writes in ten lines — the anchor the trainer must beat (issue 17):
    micro-batches of the trainer's size (fresh + replayed per step), each window of ``bucket_window``
    of them sorted by length as the trainer sorts its windows, fused AdamW over all weights,
    ``torch.autocast(bfloat16)`` when ``bf16`` (attention as torch picks it) — and nothing else: no
    L2-SP, clipping, replay, scoring, drift or threads. Dropout off, as in the trainer.

    The first ``warmup_events`` examples are a warm-up, not timed.
    """
    t = settings.training
    size = t.fresh_per_step + t.replay_per_step
    device = pick_device(t.device)
    model = load_model(settings.model, t.seed).model.to(device)
    model.eval()
    optimizer = torch.optim.AdamW(model.parameters(), lr=t.learning_rate, fused=True)
    pad_id, with_token_types = tokenizer.pad_token_id or 0, "token_type_ids" in tokenizer.model_input_names
    window = size * t.bucket_window
    batches = []
    for i in range(0, len(events) - size + 1, window):
        ordered = sorted(events[i : i + window], key=lambda e: len(e.input_ids))
        batches += [ordered[j : j + size] for j in range(0, len(ordered) - size + 1, size)]
    cast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    warm = max(1, warmup_events // size)
    examples, t0 = 0, 0.0
    for k, batch in enumerate(batches):
        if k == warm:
            synchronize(device)
            t0, examples = time.perf_counter(), 0
        b = {key: v.to(device) for key, v in collate(batch, pad_id, with_token_types).items()}
        labels = b.pop("labels")
        with cast:
            logits = model(**b).logits
        F.cross_entropy(logits.float(), labels).backward()
        optimizer.step()
        optimizer.zero_grad()
        examples += len(batch)
    synchronize(device)
    seconds = time.perf_counter() - t0
    return {
        "precision": "bf16 autocast" if bf16 else "fp32",
        "examples": examples,
        "seconds": seconds,
        "examples_per_second": examples / seconds,
        "events_per_second": examples / seconds,
    }
