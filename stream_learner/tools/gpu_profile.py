"""A profile of the trainer's step on its device: ``python -m stream_learner.tools.gpu_profile``.

Part 4 of ``benchmarks/gpu_check.sh``. It runs ``--steps`` steps of the step engine
(:class:`~stream_learner.training.engine.StepEngine`, as the trainer builds it: the model, its
precision, fused AdamW, L2-SP, clipping) on micro-batches of the bundled stream, length-sorted in
windows as the trainer cuts them, and reports:

1. steps/s and examples/s over all steps after ``--warmup``;
2. peak memory: CUDA's ``max_memory_allocated`` on a GPU, the process's peak RSS on the CPU;
3. from ``torch.profiler`` over the last ``--profiled`` steps: the device's busy share (the sum of
   its kernels' times over the wall time — how idle the GPU is between launches), the host syncs per
   step (``cudaStreamSynchronize``, ``cudaDeviceSynchronize`` and device→host ``cudaMemcpy`` calls:
   one is the design, ``engine.py`` step 6), and the host time between the end of the forward and the
   start of the backward (what the host does there delays the GPU).

On the CPU the same run gives the step rate and peak RSS (the device figures are ``None``): the CPU
twin that the test suite runs, so the tool is known to work before a GPU runs it.

Example::

    python -m stream_learner.tools.gpu_profile --steps 200 --json
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from typing import Any

import torch

from stream_learner.core.batching import plan_window
from stream_learner.core.config import Settings, load_settings
from stream_learner.core.model import load_model, load_tokenizer
from stream_learner.tools.harness import load_data
from stream_learner.training.engine import StepEngine

SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpy")


def profile_steps(settings: Settings, steps: int, warmup: int = 5, profiled: int = 20) -> dict[str, Any]:
    """Run ``warmup + steps`` steps; the figures of the module docstring."""
    tokenizer = load_tokenizer(settings.model)
    loaded = load_model(settings.model, settings.training.seed)
    engine = StepEngine(
        loaded,
        settings.training,
        tokenizer.pad_token_id or 0,
        "token_type_ids" in (tokenizer.model_input_names),
    )
    size = settings.training.fresh_per_step + settings.training.replay_per_step
    total = warmup + steps
    data = load_data(settings, total * size, tokenizer)
    window = settings.training.bucket_window
    batches = []
    for i in range(0, total, window):
        n = min(window, total - i)
        batches.extend(plan_window(data.events[i * size : (i + n) * size], n))
    fresh = settings.training.fresh_per_step
    cuda = engine.device.type == "cuda"

    for batch in batches[:warmup]:
        engine.step(batch, fresh)
    if cuda:
        torch.cuda.synchronize(engine.device)
        torch.cuda.reset_peak_memory_stats(engine.device)
    timed = batches[warmup:]
    plain = timed[: max(0, len(timed) - profiled)]
    t0 = time.perf_counter()
    for batch in plain:
        engine.step(batch, fresh)
    device_figures: dict[str, Any] = {"device_busy_share": None, "syncs_per_step": None}
    if timed[len(plain) :]:
        device_figures = _profiled(engine, timed[len(plain) :], fresh)
    if cuda:
        torch.cuda.synchronize(engine.device)
    seconds = time.perf_counter() - t0
    examples = sum(len(b) for b in timed)
    return {
        "device": str(engine.device),
        "device_name": torch.cuda.get_device_name(engine.device) if cuda else None,
        "precision": engine.precision.describe(),
        "model": settings.model.name_or_path,
        "steps": len(timed),
        "examples_per_step": size,
        "seconds": seconds,
        "steps_per_second": len(timed) / seconds,
        "examples_per_second": examples / seconds,
        "peak_memory_mib": (
            torch.cuda.max_memory_allocated(engine.device) / 2**20
            if cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        ),
        "peak_memory_of": "cuda max_memory_allocated" if cuda else "process peak RSS",
        **device_figures,
    }


def _profiled(engine: StepEngine, batches: list, fresh: int) -> dict[str, Any]:
    """The profiler's figures over ``batches`` (see the module docstring, item 3)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = engine.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        for batch in batches:
            engine.step(batch, fresh)
        if cuda:
            torch.cuda.synchronize(engine.device)
    wall_us = (time.perf_counter() - t0) * 1e6
    events = prof.events()
    out: dict[str, Any] = {"device_busy_share": None, "syncs_per_step": None}
    if cuda:
        busy = sum(e.device_time_total for e in events if e.device_type.name == "CUDA")
        syncs = sum(1 for e in events if e.name in SYNC_CALLS)
        out = {"device_busy_share": busy / wall_us, "syncs_per_step": syncs / len(batches)}
    # the host between the forward's end and the backward's start, in the first profiled step: from
    # the last matmul before autograd's first backward node to that node
    backwards = sorted((e for e in events if "Backward" in e.name), key=lambda e: e.time_range.start)
    if backwards:
        start = backwards[0].time_range.start
        ends = [e.time_range.end for e in events if e.name == "aten::linear" and e.time_range.end <= start]
        if ends:
            out["host_ms_between_forward_and_backward"] = (start - max(ends)) / 1000
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200, help="steps measured (after --warmup)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--profiled", type=int, default=20, help="the last steps, under torch.profiler")
    parser.add_argument("--model", default=None, help="model.name_or_path (default: the bundled model)")
    parser.add_argument("--device", default="auto", help="training.device (auto: CUDA when present)")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = parser.parse_args(argv)
    model: dict[str, Any] = {} if args.model is None else {"name_or_path": args.model}
    settings = load_settings(model=model, training={"device": args.device}, http={"enabled": False})
    result = profile_steps(settings, args.steps, args.warmup, min(args.profiled, args.steps))
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
