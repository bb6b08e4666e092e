"""Data-parallel learning (distributed.py): two gloo ranks on 127.0.0.1, each a real process.

The in-memory tests here run the trainer's lockstep without a broker; tests/integration/
test_distributed_pipeline.py runs whole learners under torchrun against the real broker.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from stream_learner.training.distributed import Group, merge_counters, merge_offsets, restored_for_rank
from stream_learner.training.state import Counters, Snapshot
from tests.support import zygote
from tests.support.services import free_port

ROOT = Path(__file__).resolve().parents[3]


#: the ranks' device: the CPU here; two GPUs, one per rank, where benchmarks/gpu_check.sh runs ``-m cuda``
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda(gpus=2))]


def run_group(
    scenario: str, out: Path, world_size: int = 2, timeout: float = 300, device: str = "cpu"
) -> None:
    """``python -m tests.support.distributed_worker SCENARIO OUT`` once per rank, with torchrun's
    environment."""
    port = free_port()
    procs = []
    for rank in range(world_size):
        env = {
            **os.environ,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
            "SL_TESTS_DEVICE": device,
        }
        with (out / f"rank{rank}.log").open("wb") as log:
            procs.append(
                zygote.spawn(
                    [sys.executable, "-m", "tests.support.distributed_worker", scenario, str(out)],
                    cwd=ROOT,
                    env=env,
                    stdout=log.fileno(),
                    stderr=log.fileno(),
                )
            )
    try:
        codes = [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            p.kill()
    logs = "\n".join((out / f"rank{r}.log").read_text(errors="replace")[-3000:] for r in range(world_size))
    assert codes == [0] * world_size, f"exit codes {codes}:\n{logs}"


@pytest.mark.parametrize("device", DEVICES)
def test_a_group_step_is_the_single_process_step_on_the_union(tmp_path: Path, device: str) -> None:
    # the loss scaling (world_size / examples) makes DDP's average the mean over the group's batch
    run_group("equivalence", tmp_path, device=device)
    initial, single = torch.load(tmp_path / "initial.pt"), torch.load(tmp_path / "single.pt")
    ranks = [torch.load(tmp_path / f"group-rank{r}.pt") for r in range(2)]
    for name in single:
        assert torch.equal(ranks[0][name], ranks[1][name]), name
    # the updates agree up to float summation order, which Adam's first step (≈ lr · sign(g))
    # amplifies only where |g| is near its ε: a handful of the 23M weights
    group_update = torch.cat([(ranks[0][k] - initial[k]).flatten().double() for k in single])
    single_update = torch.cat([(single[k] - initial[k]).flatten().double() for k in single])
    assert single_update.abs().max() > 0  # the step moved the weights
    cosine = torch.nn.functional.cosine_similarity(group_update, single_update, dim=0)
    assert cosine > 0.99999
    assert ((group_update - single_update).abs() > 1e-6).sum() < 1e-5 * len(single_update)


@pytest.mark.parametrize("device", DEVICES)
def test_ranks_keep_lockstep_with_an_idle_rank_and_merge_their_snapshot(tmp_path: Path, device: str) -> None:
    run_group("lockstep", tmp_path, device=device)
    w0, w1 = (torch.load(tmp_path / f"lockstep-rank{r}.pt") for r in range(2))
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    r0, r1 = (json.loads((tmp_path / f"lockstep-rank{r}.json").read_text()) for r in range(2))
    steps = r0["counters"]["steps"]
    assert steps == r1["counters"]["steps"] >= 40 // 4
    # the weights were compared after every step, on both ranks
    assert r0["weight_checks"] == r1["weight_checks"] == steps
    assert r0["counters"]["events_trained"] == 40 and r1["counters"]["events_trained"] == 12
    merged = json.loads((tmp_path / "lockstep-merged.json").read_text())
    assert merged["offsets"] == {"0": 40, "1": 12}
    assert merged["counters"]["events_trained"] == 52 and merged["counters"]["steps"] == steps
    assert merged["counters"]["examples_replayed"] == (
        r0["counters"]["examples_replayed"] + r1["counters"]["examples_replayed"]
    )
    # every rank's replay buffer is in the snapshot, each holding its own events
    assert merged["replay_seen"] == [40, 12] and merged["replay_sizes"] == [40, 12]


# ------------------------------------------------------------------------------------ pure helpers
def test_group_from_env_and_partition_shares() -> None:
    assert Group.from_env({}) is None
    g = Group.from_env({"WORLD_SIZE": "3", "RANK": "2", "LOCAL_RANK": "0"})
    assert g == Group(rank=2, world_size=3, local_rank=0) and not g.is_root
    shares = [Group(r, 3).partitions(8) for r in range(3)]
    assert sorted(p for share in shares for p in share) == list(range(8)) and shares[2] == [2, 5]
    assert Group(3, 4).partitions(2) == []  # more ranks than partitions: replay-only ranks


def test_merges_add_events_and_keep_the_furthest_offsets() -> None:
    assert merge_offsets([{0: 10, 1: 4}, {1: 9, 3: 2}]) == {0: 10, 1: 9, 3: 2}
    merged = merge_counters([Counters(7, 30, 60, 1, 1_000), Counters(7, 12, 28, 1, 2_000)])
    assert merged == Counters(
        steps=7, events_trained=42, examples_replayed=88, nonfinite_skipped=1, newest_event_ms=2_000
    )


def _restored(shards: int) -> Snapshot:
    arrays = lambda r: {"lengths": torch.full((r + 1,), 3).numpy()}  # noqa: E731
    return Snapshot(
        model_state={},
        optimizer_state={},
        replay_arrays=arrays(0),
        replay_meta={"rank": 0},
        torch_rng=torch.get_rng_state(),
        counters=Counters(steps=9, events_trained=100, examples_replayed=150, nonfinite_skipped=2),
        offsets={0: 60, 1: 40},
        version=3,
        replay_shards=[(arrays(r), {"rank": r}) for r in range(1, shards)],
    )


def test_each_rank_resumes_with_its_own_replay_and_the_counters_on_rank_0_only() -> None:
    r0 = restored_for_rank(_restored(2), Group(0, 2))
    r1 = restored_for_rank(_restored(2), Group(1, 2))
    assert r0.replay_meta == {"rank": 0} and r1.replay_meta == {"rank": 1}
    assert r0.counters.events_trained == 100 and r1.counters == Counters(9, 0, 0, 2)
    assert r0.offsets == r1.offsets == {0: 60, 1: 40}  # each consumer seeks its own partitions
    # grown from 2 to 3 ranks: the new rank starts with an empty buffer
    assert restored_for_rank(_restored(2), Group(2, 3)).replay_arrays == {}
    # resumed by one learner: merging counts rank 0's counters only once
    assert merge_counters([r0.counters, r1.counters]).events_trained == 100
