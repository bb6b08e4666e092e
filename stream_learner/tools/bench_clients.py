"""The load of the bench's serving part: concurrent HTTP clients in a process of their own.

:func:`run_clients` is the target of a process that ``bench_serving.py`` spawns: ``clients`` threads,
each with one keep-alive connection (``http.client``), each sending one inference request at a time,
the next as soon as the previous one is answered (a closed loop), until told to stop. Each request's
start and end are taken with ``time.monotonic`` — ``CLOCK_MONOTONIC``, one clock for every process of
the machine — so the bench's own process can place them against the moments versions swapped.

In a process of its own rather than threads of the bench's: the server's event loop, its batcher and
the clients would otherwise share one GIL, and a thread waiting for it can wait a whole switch
interval (5 ms), which is the size of what is measured. Only the standard library is imported here:
a spawned process starts in a fraction of a second.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections.abc import Sequence
from multiprocessing.connection import Connection
from typing import Any

HEADERS = {"Content-Type": "application/json"}


def infer_body(text: str) -> bytes:
    """An Open Inference Protocol request of one text (``docs/serving.md``)."""
    return json.dumps(
        {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": [text]}]}
    ).encode()


def run_clients(
    port: int, path: str, bodies: Sequence[bytes], clients: int, ready: Any, stop: Any, out: Connection
) -> None:
    """Process target: ``clients`` closed-loop clients POSTing ``bodies`` (client k starts at body
    ``k × len(bodies) // clients``, then the next, round) to ``127.0.0.1:port`` + ``path``; ``ready``
    is set once every client is connected, and the clients stop when ``stop`` is set. Sends on ``out``
    one dict of lists, a row per request: ``started``, ``ended`` (``time.monotonic``), ``status`` and
    ``version`` (the response's ``model_version``; None for an error), and ``errors``: a client that
    fails (connection refused, reset) says why there and stops."""
    rows: list[tuple[float, float, int, str | None]] = []
    errors: list[str] = []
    lock = threading.Lock()
    connected = threading.Barrier(clients + 1, timeout=60)

    def client(k: int) -> None:
        mine: list[tuple[float, float, int, str | None]] = []
        i = k * len(bodies) // clients
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        try:
            conn.connect()
            connected.wait()
            while not stop.is_set():
                body = bodies[i % len(bodies)]
                i += 1
                started = time.monotonic()
                conn.request("POST", path, body, HEADERS)
                response = conn.getresponse()
                data = response.read()
                ended = time.monotonic()
                version = json.loads(data).get("model_version") if response.status == 200 else None
                mine.append((started, ended, response.status, version))
        except Exception as err:  # this client stops; the others go on, and the bench reports it
            connected.abort()
            with lock:
                errors.append(f"client {k}: {type(err).__name__}: {err}")
        finally:
            conn.close()
            with lock:
                rows.extend(mine)

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(clients)]
    for thread in threads:
        thread.start()
    try:
        connected.wait()
        ready.set()
    except threading.BrokenBarrierError:
        stop.set()
    for thread in threads:
        thread.join()
    rows.sort()
    out.send(
        {
            "started": [r[0] for r in rows],
            "ended": [r[1] for r in rows],
            "status": [r[2] for r in rows],
            "version": [r[3] for r in rows],
            "errors": errors,
        }
    )
    out.close()
