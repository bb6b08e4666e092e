"""The long-text part of ``stream-learner bench`` alone (``stream_learner/tools/bench_long.py``).

Documents of the bundled stream's sentences (120–480 words) through the trainer alone at
``model.max_length`` 256 and 512, in the precision ``training.precision=auto`` picks here and, beside
bf16, in fp32: examples/s, real tokens/s, padding, the share cut, attention's share of a step.
The JSON goes to ``benchmarks/results/long-texts-<UTC>.json``.

    .venv/bin/python benchmarks/long_texts.py                 # all 6 layers, ≈ 10 min on 2 cores
    .venv/bin/python benchmarks/long_texts.py --layers 1 --documents 48   # a smoke run
"""

from __future__ import annotations

import argparse
import time
from datetime import datetime, timezone
from pathlib import Path

import orjson
from rich.console import Console

from stream_learner.core.model import load_tokenizer
from stream_learner.tools.bench import BenchConfig, machine, step_of
from stream_learner.tools.bench_long import LongTextConfig, run_long_texts
from stream_learner.tools.bench_report import table
from stream_learner.training.engine import pick_device
from stream_learner.training.precision import resolve_precision
from stream_learner.training.threads import hand_over_threads, run_with_threads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=None, help="encoder layers kept (default: all 6)")
    parser.add_argument("--documents", type=int, default=LongTextConfig.documents)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    console = Console(stderr=True)
    threads = hand_over_threads()
    cfg = BenchConfig(layers=args.layers)
    settings = cfg.run_settings()
    device = pick_device(settings.training.device)
    precision = resolve_precision(settings.training.precision, device)
    long = LongTextConfig(documents=args.documents)
    started = time.time()
    results = {
        "started_at": datetime.fromtimestamp(started).isoformat(timespec="seconds"),
        "machine": machine(),
        "device": device.type,
        "precision_reason": precision.describe(),
        "config": {"layers": args.layers, "long_texts": long.__dict__},
    }
    with step_of(console, f"long texts: {long.documents} documents, {precision.describe()}"):
        results["long_texts"] = run_long_texts(
            long,
            cfg.run_settings,
            load_tokenizer(settings.model),
            precision.bf16,
            threads,
            lambda fn: run_with_threads(fn, threads, name="bench"),
            console,
        )
    results["seconds"] = time.time() - started
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%MZ")
    out = args.out or Path(__file__).parent / "results" / f"long-texts-{stamp}.json"
    out.write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))
    for t in table(results):
        Console().print(t)
    console.print(f"results: {out}")


if __name__ == "__main__":
    main()
