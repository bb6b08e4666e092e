"""One rank of a 2-rank gloo group, run as ``python -m tests.support.distributed_worker SCENARIO OUT`` with
the environment torchrun would set (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT); see test_distributed.py.

The ranks train on ``$SL_TESTS_DEVICE`` (``cpu`` unless a CUDA-marked test says ``cuda``: on a GPU
runner the CPU tests stay CPU tests, and rank r takes cuda:r only where the test asked for GPUs). As in
the service, the trainer runs in a thread of its own, not the main thread — where the CUDA device
current in it is cuda:0 unless it binds its own (issue 20, finding 1).

Scenarios:

* ``equivalence`` — one step, rank 0 with 6 fresh events and rank 1 with 2 others, no replay; rank 0
  then steps a single-process trainer on all 8 and saves both weights: the group's step must be it.
* ``lockstep`` — :meth:`TrainingLoop.run` on both ranks with the weight check after every step; rank 0 gets
  40 events of partition 0, rank 1 nothing for its first two steps, then 12 of partition 1; rank 0
  stops the group once every event was trained (its own 40, and rank 1 says so of its 12). Each rank
  saves its weights and counters; rank 0 the final (merged) snapshot's offsets, counters and replay
  shards.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

from stream_learner.training.distributed import Group
from stream_learner.training.threads import run_with_threads
from tests.support.factories import batch, make_trainer, small_settings, tiny_rows, tokenized

DEVICE = os.environ.get("SL_TESTS_DEVICE", "cpu")


def _settings(replay: int, check_every: int = 1):
    return small_settings(
        training={
            "fresh_per_step": 4,
            "replay_per_step": replay,
            "bucket_window": 2,
            "max_wait_s": 0.1,
            "device": DEVICE,
        },
        publish={"every_steps": 10**6, "every_seconds": 604800},
        distributed={"check_every_steps": check_every},
    )


def _save_weights(trainer, path: Path) -> None:
    torch.save({k: v.detach().clone() for k, v in trainer.engine.model.state_dict().items()}, path)


def in_thread(work) -> None:
    """``work()`` in a thread of its own, as the service runs its trainer; its exception re-raised."""
    run_with_threads(work, torch.get_num_threads(), name="trainer")


def equivalence(group: Group, out: Path) -> None:
    settings = _settings(replay=0)
    rows = tiny_rows(8)
    # unequal shares (6 and 2): the mean of the ranks' means would not be the mean of the 8
    mine = tokenized(rows[:6] if group.is_root else rows[6:8], settings, partition=group.rank)
    trainer = make_trainer(settings, group=group)
    # the new head's random initialisation, rank 0's (DDP broadcast it), for the single trainer
    initial = {k: v.detach().clone() for k, v in trainer.engine.model.state_dict().items()}
    in_thread(lambda: (trainer.engine.bind_thread(), trainer.train_window(mine, steps=1)))
    _save_weights(trainer, out / f"group-rank{group.rank}.pt")
    if group.is_root:
        single = make_trainer(settings)
        single.engine.model.load_state_dict(initial)
        torch.save(initial, out / "initial.pt")
        both = tokenized(rows[:6], settings, partition=0) + tokenized(rows[6:8], settings, partition=1)
        single.train_window(both, steps=1)
        _save_weights(single, out / "single.pt")


def lockstep(group: Group, out: Path) -> None:
    settings = _settings(replay=4)
    trainer = make_trainer(settings, group=group)
    rows = tiny_rows(52)
    if group.is_root:
        events = tokenized(rows[:40], settings, partition=0)
        for i in range(0, 40, 8):
            trainer.fresh_queue.put(batch(events[i : i + 8]))
    import threading

    fed = out / "lockstep-rank1-trained"  # rank 1 has trained its 12 events: rank 0 may stop the group

    def wait_for(condition, what: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise TimeoutError(f"rank {group.rank}: {what} not within {timeout} s")
            time.sleep(0.05)

    def feed_and_stop() -> None:
        if group.rank == 1:  # idle at first: it takes part in the steps with replay or weight 0
            wait_for(lambda: trainer.counters.steps >= 2, "two steps taken idle")
            events = tokenized(rows[40:52], settings, partition=1)
            for i in range(0, 12, 6):
                trainer.fresh_queue.put(batch(events[i : i + 6]))
            wait_for(lambda: trainer.counters.events_trained >= 12, "its 12 events trained")
            fed.touch()
        else:
            wait_for(lambda: trainer.counters.events_trained >= 40 and fed.exists(), "every event trained")
            trainer.stop_event.set()

    threading.Thread(target=feed_and_stop, daemon=True).start()
    in_thread(trainer.run)
    _save_weights(trainer, out / f"lockstep-rank{group.rank}.pt")
    local = {
        "counters": vars(trainer.counters),
        "weight_checks": trainer.observers[0].metrics.weight_checks._value.get(),
        "stopped_by_peer": group.rank == 1,
    }
    (out / f"lockstep-rank{group.rank}.json").write_text(json.dumps(local))
    if group.is_root:
        snap = trainer.publish_queue.get(timeout=10)
        merged = {
            "offsets": snap.offsets,
            "counters": vars(snap.counters),
            "replay_sizes": [len(snap.replay_arrays.get("lengths", []))]
            + [len(a.get("lengths", [])) for a, _ in snap.replay_shards],
            "replay_seen": [snap.replay_meta.get("seen")] + [m.get("seen") for _, m in snap.replay_shards],
        }
        (out / "lockstep-merged.json").write_text(json.dumps(merged))


if __name__ == "__main__":
    torch.set_num_threads(1)
    scenario, out = sys.argv[1], Path(sys.argv[2])
    group = Group.from_env(os.environ)
    assert group is not None
    device = torch.device(DEVICE)
    group.start(small_settings().distributed, group.device(device))
    {"equivalence": equivalence, "lockstep": lockstep}[scenario](group, out)
    group.close()
