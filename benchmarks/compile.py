"""Does ``torch.compile`` pay for the trainer? Eager and compiled, side by side, in one run.

The trainer thread alone (``stream_learner.tools.harness.run_trainer_alone``: the service's ``Trainer.run``
fed from memory) on the bench's data and model, with ``training.compile`` off (eager) and on (the
forward pass through ``torch.compile(dynamic=True)``: sequence lengths and micro-batch sizes vary). The
two alternate, ``--repeats`` times each, and each rate is the fastest of its runs (as in
``stream-learner bench``). Inductor's cache goes to a fresh directory, so the first compiled run pays
the whole compile, as a freshly started learner would; its warm-up (the steps before the measured
ones) shows it.

    .venv/bin/python benchmarks/compile.py               # all 6 layers, ≈ 6 min on 2 cores
    .venv/bin/python benchmarks/compile.py --layers 1 --events 256 --repeats 1   # a smoke run
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch
from rich.console import Console
from rich.table import Table

from stream_learner.core.model import load_tokenizer
from stream_learner.tools.bench import BenchConfig, fastest, release_memory
from stream_learner.tools.harness import load_data, run_trainer_alone


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=None, help="encoder layers kept (default: all)")
    parser.add_argument("--events", type=int, default=768, help="fresh events measured per run")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each, alternating")
    args = parser.parse_args()
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="stream-learner-inductor-")

    console = Console()
    cfg = BenchConfig(layers=args.layers, measured_events=args.events)
    settings = cfg.run_settings()
    variants = {
        "eager": settings,
        "torch.compile(dynamic=True)": cfg.run_settings(training={"compile": True}),
    }
    tokenizer = load_tokenizer(settings.model)
    events = load_data(settings, cfg.warmup_events + cfg.measured_events, tokenizer).events
    runs: dict[str, list[dict]] = {name: [] for name in variants}
    for i in range(1, args.repeats + 1):
        for name, variant in variants.items():
            with console.status(f"{name} ({i}/{args.repeats}): {len(events)} events"):
                run = run_trainer_alone(variant, tokenizer, events, cfg.warmup_events)
            console.print(
                f"{name} ({i}): {run['examples_per_second']:.1f} examples/s, "
                f"warm-up {run['warmup_seconds']:.0f} s"
            )
            runs[name].append(run)
            release_memory()

    table = Table(title=f"trainer alone, torch {torch.__version__}, {torch.get_num_threads()} threads")
    for column in ("forward pass", "examples/s (fastest)", "runs", "warm-up (s), each run"):
        table.add_column(column, justify="left" if column in ("forward pass", "runs") else "right")
    best = {name: fastest(r) for name, r in runs.items()}
    for name, b in best.items():
        table.add_row(
            name,
            f"{b['examples_per_second']:.1f}",
            ", ".join(f"{x:.1f}" for x in b["runs"]["examples_per_second"]),
            ", ".join(f"{r['warmup_seconds']:.0f}" for r in runs[name]),
        )
    console.print(table)
    eager, compiled = (b["examples_per_second"] for b in best.values())
    console.print(f"compiled / eager: {compiled / eager:.3f}")


if __name__ == "__main__":
    main()
