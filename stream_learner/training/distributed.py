"""Data-parallel learning: N learner processes train one model together with ``torch.distributed``.

``torchrun`` (several GPUs or cores of one node, or one pod per rank with a rendezvous) starts
``stream-learner run`` N times with ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT`` set. Every rank is a whole learner — consumer, queue, trainer — that

* consumes a disjoint, static share of the input topic's partitions, ``p % world_size == rank``
  (:meth:`Group.partitions`), assigned explicitly (no consumer-group rebalancing), each partition
  starting at LATEST's offsets: a restart with another world size re-derives the shares from them;
* trains its model wrapped in ``DistributedDataParallel`` (NCCL on CUDA, gloo on CPU): gradients are
  all-reduced in the backward pass, so every rank holds the same weights (checked every
  ``distributed.check_every_steps`` steps, :meth:`Group.same_weights`);
* keeps its own replay buffer, part of every version (``trainer_state/replay-rank<r>.safetensors``).

Rank 0 alone publishes. The lockstep, followed by
:meth:`TrainingLoop.run <stream_learner.training.loop.TrainingLoop.run>`:

1. **agree** — each rank takes its window of fresh events, then one all-reduce MAX of (steps it
   wants, stop?, publish?: rank 0's decision) (:meth:`Group.agree`). Every rank trains the agreed
   number of steps: one with fewer fresh events fills its micro-batches with replayed examples or,
   with none at all, one example of weight 0 — a quiet partition never stalls the others;
2. **every step** — after the forward pass, one all-reduce SUM of (examples, non-finite losses)
   (:meth:`Group.step_totals`), on the device and without a host sync: each rank's summed loss is
   scaled by ``world_size / examples`` so that DDP's gradient average is the mean over the group's
   micro-batch, and a non-finite loss on any rank skips the step on all of them (as does a non-finite
   gradient norm, the same on every rank after DDP's all-reduce);
3. **snapshot** — when publishing is agreed, and at the final stop, every rank's covered offsets,
   counters and replay buffer are gathered to rank 0 (:meth:`Group.gather`), which merges them
   (:func:`merge_offsets`, :func:`merge_counters`) and hands one snapshot to its publisher: a manifest
   names, per partition, what the whole group learned, so the lineage is exact as for one learner.

Devices: the data collectives (DDP's gradients, step 2) run on the rank's own GPU with NCCL, their
tensors placed explicitly; the control collectives (steps 1 and 3, the weight check) go over a gloo
side group on the CPU, so none depends on which CUDA device is *current* in the calling thread — the
trainer runs in a thread of its own, where it is cuda:0 unless set (``StepEngine.bind_thread``).

A collective that waits more than ``distributed.timeout_s`` for a dead rank fails the trainer; the
learner exits non-zero and ``torchrun --max-restarts`` (or the pod controller) restarts the group,
every rank resuming from LATEST (:func:`restored_for_rank`).

References
----------
[^1]: Li, S. et al. (2020). PyTorch Distributed: Experiences on Accelerating Data Parallel Training.
      VLDB 13(12).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from stream_learner.core.config import DistributedSettings
from stream_learner.training.state import Counters, Snapshot

log = logging.getLogger(__name__)


@dataclass
class Group:
    """This process's place in a data-parallel group, and the collectives the learner uses.

    >>> g = Group(rank=1, world_size=2)
    >>> g.partitions(4)
    [1, 3]
    >>> Group.from_env({"WORLD_SIZE": "1"}) is None
    True
    """

    rank: int
    world_size: int
    local_rank: int = 0
    # the process group of the control collectives: gloo beside NCCL (None: the default group, gloo)
    control: Any = field(default=None, compare=False, repr=False)

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Group | None:
        """The group torchrun describes in ``env``; None for a single learner (``WORLD_SIZE`` ≤ 1)."""
        world = int(env.get("WORLD_SIZE", "1"))
        if world <= 1:
            return None
        return cls(rank=int(env["RANK"]), world_size=world, local_rank=int(env.get("LOCAL_RANK", "0")))

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    def partitions(self, count: int) -> list[int]:
        """This rank's share of a topic of ``count`` partitions: ``p % world_size == rank``."""
        return [p for p in range(count) if p % self.world_size == self.rank]

    def device(self, device: torch.device) -> torch.device:
        """One GPU per rank of a node: ``cuda:<LOCAL_RANK>``; the CPU is shared."""
        return torch.device("cuda", self.local_rank) if device.type == "cuda" else device

    # ------------------------------------------------------------------------------------- lifecycle
    def start(self, settings: DistributedSettings, device: torch.device) -> None:
        """Join the group (``env://`` rendezvous: ``MASTER_ADDR``/``MASTER_PORT``, as torchrun sets)."""
        backend = settings.backend
        if backend == "auto":
            backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            timeout = timedelta(seconds=settings.timeout_s)
            dist.init_process_group(
                backend,
                store=self._rendezvous_store(timeout),
                rank=self.rank,
                world_size=self.world_size,
                timeout=timeout,
            )
        if backend != "gloo":
            self.control = dist.new_group(backend="gloo")
        log.info("rank %d of %d joined the group (%s)", self.rank, self.world_size, backend)

    def _rendezvous_store(self, timeout: timedelta, env: Mapping[str, str] = os.environ) -> dist.Store:
        """The key-value store the ranks meet in, its keys private to this attempt of the group.

        torchrun's agent keeps one store across the group's restarts (``TORCHELASTIC_USE_AGENT_STORE``):
        without a prefix per restart, a rank of the new attempt can read the address a rank of the
        dead one left there and fail to connect (seen: every restart after a SIGKILL failing so).
        Without torchrun (one pod per rank), rank 0 hosts the store, new with every start.
        """
        agent_store = env.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
        store = dist.TCPStore(
            env["MASTER_ADDR"],
            int(env["MASTER_PORT"]),
            self.world_size,
            is_master=self.is_root and not agent_store,
            timeout=timeout,
            multi_tenant=True,
        )
        return dist.PrefixStore(f"stream-learner/attempt-{env.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()

    # ----------------------------------------------------------------------------------- collectives
    def _reduce(self, values: Sequence[int], op: dist.ReduceOp) -> list[int]:
        """A control all-reduce: on the CPU, over the gloo side group."""
        t = torch.tensor(list(values), dtype=torch.int64)
        dist.all_reduce(t, op=op, group=self.control)
        return [int(v) for v in t.tolist()]

    def agree(self, steps: int, stop: bool, publish: bool) -> tuple[int, bool, bool]:
        """Step 1 of the lockstep: the most steps any rank wants; stop or publish if any rank says so."""
        s, st, pub = self._reduce([steps, int(stop), int(publish)], dist.ReduceOp.MAX)
        return s, bool(st), bool(pub)

    def step_totals(self, examples: int, nonfinite: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Step 2: the group's examples in this step, and whether any rank's loss was non-finite.

        ``nonfinite`` is a 0-d bool tensor on the rank's device; the all-reduce runs on that device (the
        default group: NCCL on a GPU) and the results stay there, so the step does not wait for them.
        """
        mine = torch.tensor(examples, dtype=torch.int64, device=nonfinite.device)
        t = torch.stack([mine, nonfinite.long()])
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t[0], t[1] > 0

    def gather(self, obj: Any) -> list[Any] | None:
        """Step 3: every rank's ``obj`` on rank 0 (in rank order); None on the other ranks."""
        out: list[Any] | None = [None] * self.world_size if self.is_root else None
        dist.gather_object(obj, out, dst=0, group=self.control)
        return out

    def same_weights(self, parameters: Sequence[torch.Tensor]) -> bool:
        """Whether every rank holds the same weights: per-tensor float64 sums, compared by all-reduce."""
        with torch.no_grad():
            sums = torch.stack([p.detach().double().sum() for p in parameters]).cpu()
            low, high = sums.clone(), sums.clone()
            dist.all_reduce(low, op=dist.ReduceOp.MIN, group=self.control)
            dist.all_reduce(high, op=dist.ReduceOp.MAX, group=self.control)
        return bool(torch.equal(low, high))


def merge_offsets(parts: Sequence[Mapping[int, int]]) -> dict[int, int]:
    """The group's covered offsets: per partition the furthest any rank covered.

    A rank covers only its own partitions past LATEST; every rank also holds LATEST's offsets of the
    others', which the owner's are never behind.

    >>> merge_offsets([{0: 5, 1: 3}, {1: 7}])
    {0: 5, 1: 7}
    """
    merged: dict[int, int] = {}
    for part in parts:
        for p, o in part.items():
            merged[p] = max(merged.get(p, 0), o)
    return dict(sorted(merged.items()))


def merge_counters(parts: Sequence[Counters]) -> Counters:
    """The group's counters: events and replayed examples add up; steps and skips are the same on
    every rank (the lockstep), rank 0's are taken; the newest event is the newest of any rank's."""
    return dataclasses.replace(
        parts[0],
        events_trained=sum(c.events_trained for c in parts),
        examples_replayed=sum(c.examples_replayed for c in parts),
        newest_event_ms=max(c.newest_event_ms for c in parts),
    )


def restored_for_rank(restored: Snapshot, group: Group) -> Snapshot:
    """What rank ``group.rank`` resumes from: the shared weights, optimizer and offsets; its own replay
    buffer (an empty one for a rank the version did not have); the counters on rank 0 only, so that
    the next merge adds up (the other ranks count from 0, with the group's steps).
    """
    shards = [(restored.replay_arrays, restored.replay_meta), *restored.replay_shards]
    arrays: dict = {}
    meta: dict = {}
    if group.rank < len(shards):
        arrays, meta = shards[group.rank]
    else:
        log.info(
            "version %d was trained by %d ranks: rank %d starts with an empty replay buffer",
            restored.version,
            len(shards),
            group.rank,
        )
    if group.is_root and len(shards) > group.world_size:
        log.warning(
            "version %d was trained by %d ranks, this group has %d: the replay buffers of ranks "
            "%d… are left behind",
            restored.version,
            len(shards),
            group.world_size,
            group.world_size,
        )
    counters = restored.counters
    if not group.is_root:
        counters = dataclasses.replace(counters, events_trained=0, examples_replayed=0)
    return dataclasses.replace(
        restored, replay_arrays=arrays, replay_meta=meta, counters=counters, replay_shards=[]
    )
