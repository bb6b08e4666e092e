"""Data-parallel scaling, measured: N ranks training one model against one rank, on this machine.

:func:`measure_scaling` runs the bench's trainer alone (``harness.run_trainer_alone``: the service's
trainer thread fed from memory) in processes of their own, forked from multiprocessing's forkserver
(``child_process.forkserver_context``), with the environment ``torchrun`` would give them — ``RANK``,
``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT`` — and the same per-rank settings (so the group's
micro-batch is N times a rank's):

1. one rank with ``threads`` torch threads — the unit of work a rank is;
2. one rank with ``ranks × threads`` threads — a single learner given all the cores the group gets;
3. ``ranks`` ranks with ``threads`` threads each, sharing the events (rank r takes every r-th), their
   gradients all-reduced every step (gloo on CPU, NCCL with one GPU per rank).

The group's rate is the sum of its ranks' rates (each over its own measured span; in lockstep the
spans coincide). ``efficiency`` = group ÷ (ranks × run 1), the share of linear scaling;
``over_threads`` = group ÷ run 2, whether scaling out beats giving one learner the same cores.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from stream_learner.core.config import Settings, load_settings
from stream_learner.tools.child_process import forkserver_context
from stream_learner.training.distributed import Group


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scaling_plan(device: str, gpus: int, cpus: int, requested: int) -> tuple[int, int, str, str]:
    """How the scaling phase fits the devices found: ``(ranks, threads per rank, training.device, why)``.

    One GPU per rank where there are two or more; with a single GPU the ranks run on the CPU (two ranks
    cannot share one GPU under NCCL: rank 1 asked for cuda:1 and failed, rank 0 waited out its
    rendezvous); on the CPU, ``requested`` ranks share the cores.

    >>> scaling_plan("cuda", 4, 2, 2)
    (4, 1, 'cuda', 'one rank per GPU')
    >>> scaling_plan("cuda", 1, 2, 2)
    (2, 1, 'cpu', 'one GPU only: the ranks run on the CPU (gloo)')
    >>> scaling_plan("cpu", 0, 8, 2)
    (2, 4, 'cpu', 'the CPU cores shared between the ranks')
    """
    if device == "cuda" and gpus >= 2:
        return gpus, 1, "cuda", "one rank per GPU"
    threads = max(1, cpus // requested)
    if device == "cuda":
        return requested, threads, "cpu", "one GPU only: the ranks run on the CPU (gloo)"
    return requested, threads, "cpu", "the CPU cores shared between the ranks"


def run_ranks(
    settings: Settings, events: int, warmup: int, ranks: int, threads: int, timeout: float = 3600
) -> dict[str, Any]:
    """``ranks`` processes of :func:`_rank_main` (one: no group); their summaries and the group's rates."""
    with tempfile.TemporaryDirectory(prefix="stream-learner-scaling-") as tmp:
        spec = Path(tmp) / "spec.json"
        spec.write_text(
            json.dumps(
                {
                    "settings": settings.model_dump(mode="json"),
                    "events": events,
                    "warmup": warmup,
                    "threads": threads,
                    "out": tmp,
                }
            )
        )
        port = str(_free_port())
        context = forkserver_context()
        procs = []
        for rank in range(ranks):
            env = {"OMP_NUM_THREADS": str(threads), "RANK": str(rank), "LOCAL_RANK": str(rank)}
            env |= {"WORLD_SIZE": str(ranks), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
            log = Path(tmp) / f"rank{rank}.log"
            procs.append(context.Process(target=_rank_process, args=(str(spec), env, str(log)), daemon=True))
            procs[-1].start()
        try:
            for p in procs:
                p.join(timeout)
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
                    p.join()
        for rank, p in enumerate(procs):
            if p.exitcode != 0:
                out = (Path(tmp) / f"rank{rank}.log").read_text(errors="replace")
                raise RuntimeError(f"a rank of the scaling run failed ({p.exitcode}):\n{out[-3000:]}")
        per_rank = [json.loads((Path(tmp) / f"rank{r}.json").read_text()) for r in range(ranks)]
    return {
        "ranks": ranks,
        "threads_per_rank": threads,
        "events_per_second": sum(r["events_per_second"] for r in per_rank),
        "examples_per_second": sum(r["examples_per_second"] for r in per_rank),
        "steps": per_rank[0]["steps"],
        "per_rank": per_rank,
    }


def measure_scaling(
    settings: Settings, events: int, warmup: int, ranks: int = 2, threads: int = 1
) -> dict[str, Any]:
    """The three runs of the module docstring and the ratios between them."""
    one = run_ranks(settings, events, warmup, ranks=1, threads=threads)
    wide = run_ranks(settings, events, warmup, ranks=1, threads=threads * ranks)
    group = run_ranks(settings, events, warmup, ranks=ranks, threads=threads)
    backend = settings.distributed.backend
    if backend == "auto":
        backend = "nccl" if settings.training.device != "cpu" and torch.cuda.is_available() else "gloo"
    return {
        "ranks": ranks,
        "threads_per_rank": threads,
        "backend": backend,
        "one_rank": one,
        "one_rank_all_threads": wide,
        "group": group,
        "efficiency": group["examples_per_second"] / (ranks * one["examples_per_second"]),
        "over_threads": group["examples_per_second"] / wide["examples_per_second"],
    }


def _rank_process(spec_path: str, env: dict[str, str], log_path: str) -> None:
    """A rank as the forkserver starts it: torchrun's environment, its output in ``log_path``."""
    os.environ.update(env)
    with open(log_path, "ab", buffering=0) as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
    _rank_main(Path(spec_path))


def _rank_main(spec_path: Path) -> None:
    """One rank: its share of the bench's events through the trainer alone; a JSON summary out."""
    from stream_learner.core.model import load_tokenizer
    from stream_learner.tools.harness import load_data, run_trainer_alone
    from stream_learner.training.engine import pick_device

    spec = json.loads(spec_path.read_text())
    torch.set_num_threads(spec["threads"])
    settings = load_settings(**spec["settings"])
    group = Group.from_env()
    rank, world = (group.rank, group.world_size) if group else (0, 1)
    if group is not None:
        group.start(settings.distributed, group.device(pick_device(settings.training.device)))
    tokenizer = load_tokenizer(settings.model)
    data = load_data(settings, spec["events"], tokenizer, whole_stream=False)
    mine = data.events[rank::world]  # offsets do not matter here: nothing is published
    summary = run_trainer_alone(settings, tokenizer, mine, spec["warmup"] // world, group=group)
    Path(spec["out"], f"rank{rank}.json").write_text(json.dumps({**summary, "rank": rank}, default=float))
    if group is not None:
        group.close()


if __name__ == "__main__":
    _rank_main(Path(sys.argv[1]))
