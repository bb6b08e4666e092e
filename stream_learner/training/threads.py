"""torch's intra-op threads: one team of them per process, the trainer's.

torch runs its CPU kernels on OpenMP. Every thread that runs a parallel kernel gets a *team* of worker
threads of its own, and the team outlives the kernel — it lasts as long as its thread. A learner
builds its trainer in the main thread (the model, θ0, the start-up measurement of ``precision.py``)
and trains in a thread of its own. With torch's default threads in both, the main thread kept an idle
team beside the trainer's. With more OpenMP threads than cores, libgomp throttles its spin-waits:
the trainer's worker sleeps between kernels and every kernel wakes it through a futex. A step is
hundreds of small kernels, so the trainer lost a third of its speed to it.

Measured on the 2-core Xeon (Sapphire Rapids class, AMX), the bundled MiniLM, the trainer alone
(``tools/harness.run_trainer_alone``, 512 events after 128 of warm-up): 71.7 → 110.0 examples/s in
bf16 and 65.6 → 78.5 in fp32, when the main thread keeps to one thread and the trainer takes the
cores. The trainer thread's CPU share went from 0.80 to 0.98.

So a thread that hands its compute to another calls :func:`hand_over_threads` before it computes
anything (a team, once made, stays), and passes the count it returns on; the thread that computes calls
:func:`take_threads` first. :func:`run_with_threads` runs a function so, in a thread of its own
(whose team ends with it).

A thread whose work must not slow the trainer (the publisher's: serialising, hashing and writing a
version, ≈ 0.6 s of a core on the 2-core Xeon) lowers its own priority with
:func:`lower_thread_priority`. The kernel's scheduler then gives it the moments the trainer leaves a
core idle (the Python between kernels, the waits), and the trainer keeps its rate while a version is
written.

Example
-------
>>> n = process_threads()
>>> run_with_threads(torch.get_num_threads, n) == n
True
"""

from __future__ import annotations

import functools
import os
import sys
import threading
from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")


@functools.cache
def process_threads() -> int:
    """torch's intra-op threads as this process started with them (one per core, or
    ``OMP_NUM_THREADS``): read once, before any :func:`hand_over_threads` made the caller serial."""
    return torch.get_num_threads()


def hand_over_threads() -> int:
    """The calling thread computes on one thread from now on; returns the count the computing thread
    takes (:func:`process_threads`)."""
    threads = process_threads()
    torch.set_num_threads(1)
    return threads


def take_threads(threads: int) -> None:
    """The calling thread computes on ``threads`` threads (its own OpenMP team and MKL setting)."""
    torch.set_num_threads(threads)


def run_with_threads(fn: Callable[[], T], threads: int, name: str = "compute") -> T:
    """``fn()`` in a thread of its own that takes ``threads``; its result, or its exception re-raised."""
    result: list[T] = []
    errors: list[BaseException] = []

    def target() -> None:
        take_threads(threads)
        try:
            result.append(fn())
        except BaseException as e:  # re-raised in the caller's thread
            errors.append(e)

    thread = threading.Thread(target=target, name=name)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return result[0]


def lower_thread_priority(nice: int) -> int:
    """Raise the calling thread's nice value to ``nice`` (never lower it: that needs privileges);
    returns the value in effect. Threads it starts inherit it.

    On Linux nice is a property of each thread, set through its thread id. Elsewhere nothing changes
    and 0 is returned. A nice-19 thread beside nice-0 threads that keep a core busy gets ≈ 1.5 % of it
    (CFS weights 15 against 1024): work such a thread does is slower, never lost.

    >>> run_with_threads(lambda: lower_thread_priority(5), 1) >= 5
    True
    """
    if sys.platform != "linux":
        return 0
    tid = threading.get_native_id()
    current = os.getpriority(os.PRIO_PROCESS, tid)
    if nice > current:
        os.setpriority(os.PRIO_PROCESS, tid, nice)
    return os.getpriority(os.PRIO_PROCESS, tid)
