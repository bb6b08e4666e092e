"""Producing events to a topic: the ``produce`` command, the demo and the tests."""

from __future__ import annotations

import time
from collections.abc import Sequence

from confluent_kafka import KafkaException, Producer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


def produce_lines(
    client_config: dict[str, str],
    topic: str,
    values: Sequence[bytes],
    *,
    rate: float = 0.0,
    partition: int | None = None,
    console: Console | None = None,
) -> int:
    """Produce ``values`` to ``topic`` (at most ``rate`` per second when > 0); wait for every ack.

    Raises ``KafkaException`` if any message could not be delivered.
    """
    producer = Producer({**client_config, "acks": "all", "linger.ms": 10})
    errors: list[str] = []

    def on_delivery(err, _msg) -> None:
        if err is not None:
            errors.append(str(err))

    progress = Progress(
        TextColumn(f"producing to {topic}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=console is None,
        transient=False,
    )
    start = time.monotonic()
    with progress:
        task = progress.add_task("produce", total=len(values))
        for i, value in enumerate(values):
            if rate > 0:
                wait = start + i / rate - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
            kwargs = {} if partition is None else {"partition": partition}
            while True:
                try:
                    producer.produce(topic, value=value, on_delivery=on_delivery, **kwargs)
                    break
                except BufferError:  # local queue full: let librdkafka drain it
                    producer.poll(0.1)
            producer.poll(0)
            progress.advance(task)
        producer.flush(60)
    if errors or len(producer):
        raise KafkaException(f"{len(errors) or len(producer)} events not delivered to {topic}: {errors[:3]}")
    return len(values)
