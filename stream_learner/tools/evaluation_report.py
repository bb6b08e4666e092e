"""What ``stream-learner eval`` reports: the printed tables, their Markdown for ``docs/quality.md``, the
PNG plots, ``report.html`` (one self-contained page with all of them: :func:`write_html`) and
``recommended.yaml``, all from the results dict of :func:`stream_learner.tools.evaluation.run_benchmark`
(so a saved ``results.json`` can be reported again: :func:`upgraded` reads an older format).

Each plot is made by one function returning a matplotlib ``Figure`` (:func:`prequential_figure`,
:func:`heldout_figure`, :func:`drift_figure`, :func:`label_mix_figure`), saved as a PNG file by
:func:`write_plots` and embedded in the page by :func:`write_html`.
"""

from __future__ import annotations

import base64
import copy
import io
import math
from collections.abc import Mapping, Sequence
from html import escape
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import yaml

from stream_learner.core.config import Settings, load_settings

if TYPE_CHECKING:
    from matplotlib.figure import Figure

NOT_DEPLOYABLE = frozenset({"offline"})  # trained on the stream shuffled: an upper bound, not a setting
RECOMMENDED = "recommended.yaml"
_NOT_RECOMMENDED = {("training", "seed"), ("http", "enabled")}  # harness settings, not the user's


def rolling_mean(values: np.ndarray, window: int) -> np.ndarray:
    """Mean of the last ``window`` values at every position (fewer at the start)."""
    values = np.asarray(values, dtype=np.float64)
    c = np.concatenate([[0.0], np.cumsum(values)])
    idx = np.arange(1, len(values) + 1)
    lo = np.maximum(idx - window, 0)
    return (c[idx] - c[lo]) / (idx - lo)


def _fmt(stat: Mapping[str, Any], signed: bool = False) -> str:
    if stat["mean"] is None:
        return "–"
    mean = f"{stat['mean']:+.3f}" if signed else f"{stat['mean']:.3f}"
    return mean if stat["std"] is None else f"{mean} ± {stat['std']:.3f}"


def tables(results: Mapping[str, Any]) -> list[Any]:
    """One rich table per scenario: strategies × metrics, mean ± std over seeds."""
    from rich.table import Table

    out = []
    for scenario, strategies in results["summary"].items():
        table = Table(title=f"{scenario}: {results['scenarios'][scenario]['events']} events")
        for col in ("strategy", "seeds", "final acc", "final F1", "forgetting", "BWT", "preq. acc", "s/run"):
            table.add_column(col, justify="left" if col == "strategy" else "right")
        for name, s in strategies.items():
            table.add_row(
                name,
                str(s["final_accuracy"]["n"]),
                _fmt(s["final_accuracy"]),
                _fmt(s["final_f1"]),
                _fmt(s["forgetting"], signed=True),
                _fmt(s["bwt"], signed=True),
                _fmt(s["prequential_accuracy"]),
                f"{s['seconds']['mean']:.0f}",
            )
        out.append(table)
    return out


def markdown_table(results: Mapping[str, Any], scenario: str) -> str:
    """The summary of one scenario as a Markdown table (for docs/quality.md)."""
    rows = [
        "| strategy | seeds | final acc | final macro-F1 | forgetting | BWT | prequential acc |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, s in results["summary"][scenario].items():
        cells = [
            _fmt(s["final_accuracy"]),
            _fmt(s["final_f1"]),
            _fmt(s["forgetting"], True),
            _fmt(s["bwt"], True),
            _fmt(s["prequential_accuracy"]),
        ]
        rows.append(f"| {name} | {s['final_accuracy']['n']} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _scenario_runs(results: Mapping[str, Any], scenario: str) -> list[Mapping[str, Any]]:
    return [r for r in results["runs"] if r["scenario"] == scenario]


def _shuffled(results: Mapping[str, Any], strategy: str) -> bool:
    """Whether the strategy trained on the stream shuffled (the offline bound): its records are not in
    stream order."""
    return bool(results.get("strategies", {}).get(strategy, {}).get("shuffle", strategy == "offline"))


def _stream_run(results: Mapping[str, Any], scenario: str) -> Mapping[str, Any]:
    """A run whose per-event records are in stream order (any run but a shuffled one: all see the same
    events in the same order); a shuffled run only when no other ran."""
    runs = _scenario_runs(results, scenario)
    return next((r for r in runs if not _shuffled(results, r["strategy"])), runs[0])


def _block_names(results: Mapping[str, Any], scenario: str) -> list[str]:
    """The segment of each block of the stream, in stream order (a stream need not follow the order of
    ``results["segments"]``, nor have every segment)."""
    segments = _stream_run(results, scenario)["prequential"]["segment"]
    starts = [0, *(results["scenarios"][scenario]["boundaries"] or ())]
    return [results["segments"][segments[s]] for s in starts if s < len(segments)]


def _mark_boundaries(ax: Any, boundaries: Sequence[int] | None, n: int, names: Sequence[str]) -> None:
    """Dotted lines between segment blocks, each block named above the plot (none when segments recur)."""
    if boundaries is None:
        return
    starts = [0, *boundaries]
    for b in boundaries:
        ax.axvline(b, color="0.5", linestyle=":", linewidth=1)
    for k, s in enumerate(starts[: len(names)]):
        end = starts[k + 1] if k + 1 < len(starts) else n
        ax.text((s + end) / 2, 1.0, names[k], transform=ax.get_xaxis_transform(), ha="center", va="bottom")


def _seeds(n: int) -> str:
    return f"{n} seed" if n == 1 else f"{n} seeds"


def prequential_figure(results: Mapping[str, Any], scenario: str) -> Figure:
    """Prequential accuracy along the stream (rolling mean), one line per strategy (mean over seeds)."""
    from matplotlib.figure import Figure

    window = results["config"]["rolling_window"]
    runs = _scenario_runs(results, scenario)
    names = list(dict.fromkeys(r["strategy"] for r in runs))
    n, bounds = results["scenarios"][scenario]["events"], results["scenarios"][scenario]["boundaries"]
    fig = Figure(figsize=(10, 4.5))
    ax = fig.subplots()
    for name in names:
        curves = [
            rolling_mean(np.array(r["prequential"]["correct"]), window) for r in runs if r["strategy"] == name
        ]
        style = "--" if _shuffled(results, name) else "-"
        ax.plot(np.arange(1, n + 1), np.mean(curves, axis=0), style, label=f"{name} ({_seeds(len(curves))})")
    _mark_boundaries(ax, bounds, n, _block_names(results, scenario))
    ax.set(xlabel="events", ylabel=f"prequential accuracy (last {window})", ylim=(0.0, 1.0), xlim=(0, n))
    ax.legend(loc="lower left", fontsize="small", ncol=3)
    shuffled = [name for name in names if _shuffled(results, name)]
    note = f" ({', '.join(shuffled)}: in its shuffled order)" if shuffled else ""
    ax.set_title(f"{scenario}: prequential accuracy along the stream{note}", pad=18)
    fig.tight_layout()
    return fig


def heldout_figure(results: Mapping[str, Any], scenario: str) -> Figure:
    """Held-out accuracy per segment over the stream, one panel per strategy (mean over seeds): the
    forgetting picture. Segments without held-out events are left out."""
    from matplotlib.figure import Figure

    runs = _scenario_runs(results, scenario)
    names = list(dict.fromkeys(r["strategy"] for r in runs))
    bounds = results["scenarios"][scenario]["boundaries"]
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig = Figure(figsize=(4.6 * cols, 3.4 * rows))
    axes = fig.subplots(rows, cols, squeeze=False, sharey=True)
    for ax, name in zip(axes.flat, names, strict=False):
        rs = [r for r in runs if r["strategy"] == name]
        x = [c["events"] for c in rs[0]["checkpoints"]]
        acc = np.mean([[c["accuracy"] for c in r["checkpoints"]] for r in rs], axis=0)  # [checkpoints, D]
        for d, segment in enumerate(results["segments"]):
            if not np.isnan(acc[:, d]).all():
                ax.plot(x, acc[:, d], marker=".", label=segment)
        ax.plot(x, np.nanmean(acc, axis=1), "k--", linewidth=1, label="mean")
        for b in bounds or ():
            ax.axvline(b, color="0.5", linestyle=":", linewidth=1)
        ax.set_title(f"{name} ({_seeds(len(rs))})")
        ax.set_xlabel("events")
        ax.set_ylim(0.0, 1.0)
    for ax in axes.flat[len(names) :]:
        ax.axis("off")
    axes[0][0].set_ylabel("held-out accuracy")
    axes[0][0].legend(fontsize="small")
    fig.suptitle(f"{scenario}: held-out accuracy per segment (segment boundaries dotted)")
    fig.tight_layout()
    return fig


def drift_figure(results: Mapping[str, Any], scenario: str) -> Figure | None:
    """Where the drift signals fired along the stream (one row per signal, one tick per detection and
    seed) against the segment boundaries; for the first strategy that ran them (``default``), None if
    none did."""
    from matplotlib.figure import Figure

    runs = [r for r in _scenario_runs(results, scenario) if r.get("drift")]
    if not runs:
        return None
    strategy = runs[0]["strategy"]
    runs = [r for r in runs if r["strategy"] == strategy]
    signals = list(runs[0]["drift"]["positions"])
    n, bounds = results["scenarios"][scenario]["events"], results["scenarios"][scenario]["boundaries"]
    fig = Figure(figsize=(10, 1.6 + 0.6 * len(signals)))
    ax = fig.subplots()
    step = min(0.5 / len(runs), 0.2)
    ticks = []
    for i, signal in enumerate(signals):
        fired = 0
        for k, r in enumerate(runs):
            positions = r["drift"]["positions"].get(signal, [])
            fired += len(positions)
            y = i + (k - (len(runs) - 1) / 2) * step
            ax.plot(positions, [y] * len(positions), "|", markersize=12, markeredgewidth=2, color=f"C{i}")
        ticks.append(f"{signal} ({fired})")
    if not any(r["drift"]["positions"].get(s) for r in runs for s in signals):
        ax.text(0.5, 0.5, "no detection", transform=ax.transAxes, ha="center", va="center", color="0.4")
    _mark_boundaries(ax, bounds, n, _block_names(results, scenario))
    ax.set_yticks(range(len(signals)), ticks)
    ax.set(xlabel="events", xlim=(0, n), ylim=(-0.6, len(signals) - 0.4))
    ax.set_title(f"{scenario}: drift detections of {strategy} ({_seeds(len(runs))}, one row each)", pad=18)
    fig.tight_layout()
    return fig


def label_mix_figure(results: Mapping[str, Any], scenario: str) -> Figure:
    """The share of each label along the stream (rolling window), stacked, segment boundaries marked."""
    from matplotlib.figure import Figure

    window = results["config"]["rolling_window"]
    run = _stream_run(results, scenario)
    y = np.asarray(run["prequential"]["label"])
    n, bounds = results["scenarios"][scenario]["events"], results["scenarios"][scenario]["boundaries"]
    labels = results["labels"]
    shares = [rolling_mean(y == k, window) for k in range(len(labels))]
    fig = Figure(figsize=(10, 3.2))
    ax = fig.subplots()
    ax.stackplot(np.arange(1, len(y) + 1), shares, labels=labels, alpha=0.85)
    _mark_boundaries(ax, bounds, n, _block_names(results, scenario))
    ax.set(xlabel="events", ylabel=f"label share (last {window})", ylim=(0.0, 1.0), xlim=(0, n))
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small")
    note = " (in the shuffled order: no other run)" if _shuffled(results, run["strategy"]) else ""
    ax.set_title(f"{scenario}: label mix along the stream{note}", pad=18)
    fig.tight_layout()
    return fig


# the figures written as PNG files, <kind>_<scenario>.png (report.html has them all)
PLOT_FILES = {"prequential": prequential_figure, "heldout": heldout_figure}


def write_plots(results: Mapping[str, Any], out: Path) -> list[str]:
    """Per scenario: prequential accuracy along the stream, and held-out accuracy per domain over time."""
    written = []
    for scenario in results["scenarios"]:
        for kind, figure in PLOT_FILES.items():
            path = out / f"{kind}_{scenario}.png"
            figure(results, scenario).savefig(path, dpi=110)
            written.append(path.name)
    return written


# ========================================================================= ranking and recommendation


def ranking(results: Mapping[str, Any], scenario: str) -> list[dict[str, Any]]:
    """The strategies run on ``scenario``, best first by mean held-out macro-F1 (then accuracy)."""
    rows = []
    for name, s in results["summary"].get(scenario, {}).items():
        f1, acc = s["final_f1"], s["final_accuracy"]
        rows.append(
            {
                "strategy": name,
                "deployable": name not in NOT_DEPLOYABLE,
                "seeds": f1["n"],
                "heldout_f1": f1["mean"],
                "heldout_f1_std": f1["std"],
                "heldout_accuracy": acc["mean"],
                "prequential_accuracy": s["prequential_accuracy"]["mean"],
                "seconds_per_run": s["seconds"]["mean"],
            }
        )

    def key(row: dict[str, Any]) -> tuple[float, float]:
        f1, acc = row["heldout_f1"], row["heldout_accuracy"]
        return (-(f1 if f1 is not None and math.isfinite(f1) else -1.0), -(acc or 0.0))

    return sorted(rows, key=key)


def recommended_settings(results: Mapping[str, Any], scenario: str) -> tuple[str, dict[str, Any]]:
    """The best deployable strategy's settings that differ from the defaults (model, training, replay)."""
    best = next((r for r in ranking(results, scenario) if r["deployable"]), None)
    if best is None:
        raise ValueError("no deployable strategy ran: nothing to recommend")
    run = next(r for r in results["runs"] if r["scenario"] == scenario and r["strategy"] == best["strategy"])
    defaults = Settings().model_dump(mode="json", include={"model", "training", "replay"})
    chosen: dict[str, dict[str, Any]] = {}
    for section, values in run["settings"].items():
        for key, value in values.items():
            if (section, key) not in _NOT_RECOMMENDED and defaults[section].get(key) != value:
                chosen.setdefault(section, {})[key] = value
    return best["strategy"], chosen


def write_recommended(results: Mapping[str, Any], scenario: str, out: Path) -> Path:
    """``recommended.yaml``: the best deployable settings, checked to load, with how they were chosen."""
    name, chosen = recommended_settings(results, scenario)
    best = next(r for r in ranking(results, scenario) if r["strategy"] == name)
    spread = f" ± {best['heldout_f1_std']:.3f}" if best["heldout_f1_std"] is not None else ""
    header = (
        f"# stream-learner settings recommended by `stream-learner eval` on {scenario}\n"
        f"# ({results['created_at']}): strategy {name!r}, held-out macro-F1 {best['heldout_f1']:.3f}{spread}"
        f" over {best['seeds']} seed(s).\n"
        "# Add the kafka.* and publish.* settings of your deployment; run it with\n"
        "#   stream-learner run -c recommended.yaml\n"
    )
    path = out / RECOMMENDED
    path.write_text(header + yaml.safe_dump(chosen, sort_keys=False, allow_unicode=True), encoding="utf-8")
    load_settings(path)  # what is written must start a learner: a bad file fails here, not at deploy time
    return path


def ranking_table(results: Mapping[str, Any], scenario: str) -> Any:
    """The ranking of :func:`ranking` as a rich table, for the terminal (recommended one first)."""
    from rich.table import Table

    table = Table(title=f"ranking on {scenario}: held-out macro-F1, mean ± std over seeds")
    for col in ("rank", "strategy", "seeds", "held-out F1", "held-out acc", "preq. acc", "s/run"):
        table.add_column(col, justify="left" if col == "strategy" else "right")
    recommended = next((r["strategy"] for r in ranking(results, scenario) if r["deployable"]), None)
    for k, r in enumerate(ranking(results, scenario), 1):
        f1 = _num(r["heldout_f1"]) + ("" if r["heldout_f1_std"] is None else f" ± {r['heldout_f1_std']:.3f}")
        name = r["strategy"] if r["deployable"] else f"{r['strategy']} (bound)"
        style = "bold green" if r["strategy"] == recommended else ("dim" if not r["deployable"] else None)
        table.add_row(
            str(k),
            name,
            str(r["seeds"]),
            f1,
            _num(r["heldout_accuracy"]),
            _num(r["prequential_accuracy"]),
            f"{r['seconds_per_run']:.0f}",
            style=style,
        )
    return table


def ranking_markdown(results: Mapping[str, Any], scenario: str) -> str:
    """The ranking of :func:`ranking` as a Markdown table."""
    rows = [
        "| rank | strategy | seeds | held-out macro-F1 | held-out acc | prequential acc | s/run |",
        "|---|---|---|---|---|---|---|",
    ]
    for k, r in enumerate(ranking(results, scenario), 1):
        f1 = "–" if r["heldout_f1"] is None else f"{r['heldout_f1']:.3f}"
        if r["heldout_f1_std"] is not None:
            f1 += f" ± {r['heldout_f1_std']:.3f}"
        name = r["strategy"] if r["deployable"] else f"{r['strategy']} (bound, not deployable)"
        acc, preq = r["heldout_accuracy"], r["prequential_accuracy"]
        rows.append(
            f"| {k} | {name} | {r['seeds']} | {f1} | {'–' if acc is None else f'{acc:.3f}'} | "
            f"{'–' if preq is None else f'{preq:.3f}'} | {r['seconds_per_run']:.0f} |"
        )
    return "\n".join(rows)


# ================================================================================ the HTML report

REPORT_HTML = "report.html"
TRUNCATION_WARNING = 0.05  # a share of events cut at model.max_length said plainly in the report
HTML_TITLE = "stream-learner eval"
_CSS = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1d232a; margin: 0;
  background: #f6f7f9; }
main { max-width: 1120px; margin: 0 auto; padding: 1.2em 1.6em 3em; background: #fff; }
h1 { margin-bottom: 0.2em; }
h2 { border-bottom: 1px solid #dde1e6; padding-bottom: 0.2em; margin-top: 1.8em; }
.meta { color: #555f6b; margin-top: 0; }
table { border-collapse: collapse; margin: 0.6em 0 1em; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #dde1e6; padding: 0.3em 0.7em; text-align: left; }
th { background: #eef1f4; } .r { text-align: right; }
tr.bound td { color: #6b7580; font-style: italic; }
tr.recommended td { background: #e8f5e9; font-weight: 600; }
.warn { background: #fff4e5; border-left: 4px solid #f0a020; padding: 0.5em 0.9em; }
.note { color: #555f6b; font-size: 0.92em; }
figure { margin: 1em 0 1.6em; } figure img { max-width: 100%; height: auto; border: 1px solid #eef1f4; }
figcaption { color: #555f6b; font-size: 0.92em; }
code { background: #eef1f4; padding: 0 0.25em; border-radius: 3px; }
"""


def _png_data_uri(fig: Figure) -> str:
    """A figure as a ``data:`` URI, for an ``<img>`` the page carries itself."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _figure_html(fig: Figure, kind: str, scenario: str, alt: str, caption: str) -> str:
    """One plot: an ``<img>`` with its alt text and ``data-plot``/``data-scenario`` (what a test counts)."""
    return (
        f'<figure><img class="plot" id="plot-{escape(kind)}-{escape(scenario)}" data-plot="{escape(kind)}" '
        f'data-scenario="{escape(scenario)}" alt="{escape(alt)}" src="{_png_data_uri(fig)}">'
        f"<figcaption>{caption}</figcaption></figure>"
    )


def _table_html(
    head: Sequence[str], rows: Sequence[tuple[str, Sequence[str]]], align: str, table_id: str = ""
) -> str:
    """A table; ``rows`` are (attributes of the ``<tr>``, escaped cells); ``align`` has an ``l`` (text)
    or ``r`` (figures) per column."""
    ident = f' id="{table_id}"' if table_id else ""
    th = "".join(f'<th class="{a}">{escape(h)}</th>' for h, a in zip(head, align, strict=True))
    trs = "".join(
        f"<tr{attrs}>"
        + "".join(f'<td class="{a}">{c}</td>' for c, a in zip(cells, align, strict=True))
        + "</tr>"
        for attrs, cells in rows
    )
    return f"<table{ident}><thead><tr>{th}</tr></thead><tbody>{trs}</tbody></table>"


def _num(value: float | None, spec: str = ".3f") -> str:
    return "–" if value is None or not math.isfinite(value) else format(value, spec)


def _header_html(results: Mapping[str, Any]) -> str:
    env = {k: escape(str(v)) for k, v in results.get("environment", {}).items()}
    machine = f"{env.get('machine')}, {env.get('cpus')} CPUs, {env.get('torch_threads')} torch threads"
    versions = f"Python {env.get('python')}, torch {env.get('torch')}, transformers {env.get('transformers')}"
    wall = results.get("wall_seconds")
    took = f" in {wall:.0f} s" if wall is not None else ""
    segments = f"{escape(results.get('segments_from', '?'))}: {escape(', '.join(results['segments']))}"
    return (
        f"<header><h1>{HTML_TITLE}</h1><p class='meta'>Run {escape(results['created_at'])}{took} on "
        f"{machine}; {versions}. Segments from the {segments}; "
        f"labels: {escape(', '.join(results['labels']))}.</p>"
        "<p class='note'>Beside this file: <code>results.json</code> (everything below, and every run's "
        "records), <code>report.md</code>, the PNG plots and <code>recommended.yaml</code>.</p></header>"
    )


def _sources(results: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    """The sources read (stream, heldout), each with its rows, valid rows and invalid ones by reason."""
    return [(k, v) for k, v in results.get("input", {}).items() if isinstance(v, dict) and "rows" in v]


def _invalid(info: Mapping[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in info["invalid"].items()) or "none"


def _input_html(results: Mapping[str, Any]) -> str:
    """What was read (rows, valid, invalid by reason, per source) and how long the events are."""
    rows = []
    for name, info in _sources(results):
        cells = [name, str(info["source"]), str(info["rows"]), str(info["valid"]), _invalid(info)]
        rows.append(("", [escape(c) for c in cells]))
    tokens = results.get("tokens") or {}
    if not rows and not tokens.get("events"):
        return ""  # a results.json of format 1: nothing recorded about the input
    head = ["", "source", "rows", "valid", "invalid, by reason"]
    parts = [
        "<section id='input'><h2>Input</h2>",
        _table_html(head, rows, "llrrl", "input-table") if rows else "",
    ]
    if tokens.get("events"):
        share, limit = tokens["truncated_share"], tokens["max_length"]
        parts.append(
            f"<p>Tokens per event: median {tokens['median']:.0f}, p95 {tokens['p95']:.0f}, "
            f"max {tokens['max']}; {share:.1%} of the events cut at <code>model.max_length</code> = "
            f"{limit}.</p>"
        )
        if share >= TRUNCATION_WARNING:
            parts.append(
                f"<p class='warn' id='truncation-warning'><b>{share:.0%} of the events are longer than "
                f"model.max_length = {limit} tokens</b>: the model only sees their first {limit} tokens. "
                "Whether longer inputs pay is measured by a sweep, e.g. "
                f"<code>stream-learner eval --sweep model.max_length={2 * limit},{4 * limit}</code> "
                "(the ranking below then compares them).</p>"
            )
    parts.append("</section>")
    return "".join(parts)


def _ranking_html(results: Mapping[str, Any], scenario: str) -> str:
    ranked = ranking(results, scenario)
    best = next((r for r in ranked if r["deployable"]), None)
    rows = []
    for k, r in enumerate(ranked, 1):
        f1 = _fmt({"mean": r["heldout_f1"], "std": r["heldout_f1_std"]})
        if not r["deployable"]:
            note, cls = "upper bound (the stream shuffled): not deployable", "bound"
        elif r is best:
            note, cls = f"recommended: {RECOMMENDED}", "recommended"
        else:
            note, cls = "", ""
        cells = [str(k), escape(r["strategy"]), str(r["seeds"]), f1, _num(r["heldout_accuracy"])]
        cells += [_num(r["prequential_accuracy"]), _num(r["seconds_per_run"], ".0f"), escape(note)]
        rows.append((f' class="{cls}" data-strategy="{escape(r["strategy"])}"', cells))
    head = ["rank", "strategy", "seeds", "held-out macro-F1", "held-out acc", "prequential acc", "s/run", ""]
    if best is None:
        verdict = "<p class='warn'>No deployable strategy ran: nothing is recommended.</p>"
    else:
        verdict = (
            f"<p id='recommended'>Recommended: <b>{escape(best['strategy'])}</b> (held-out macro-F1 "
            f"{_num(best['heldout_f1'])}), the best deployable strategy. Its settings (those that differ "
            f"from the defaults) are in <a href='{RECOMMENDED}'><code>{RECOMMENDED}</code></a>: add your "
            f"<code>kafka.*</code> and <code>publish.*</code> settings and run "
            f"<code>stream-learner run -c {RECOMMENDED}</code>.</p>"
        )
    return (
        f"<section id='ranking'><h2>Ranking on {escape(scenario)}</h2>"
        "<p class='note'>Best first by the mean held-out macro-F1 at the end of the stream (then held-out "
        "accuracy); ± is the standard deviation over seeds.</p>"
        f"{_table_html(head, rows, 'rlrrrrrl', 'ranking-table')}{verdict}</section>"
    )


_SUMMARY = ("final_accuracy", "final_f1", "forgetting", "bwt", "prequential_accuracy")


def _summary_html(results: Mapping[str, Any], scenario: str) -> str:
    rows = []
    for name, s in results["summary"][scenario].items():
        cells = [escape(name), str(s["final_accuracy"]["n"])]
        cells += [_fmt(s[key], key in ("forgetting", "bwt")) for key in _SUMMARY]
        rows.append((f' data-strategy="{escape(name)}"', cells))
    head = ["strategy", "seeds", "final acc", "final macro-F1", "forgetting", "BWT", "prequential acc"]
    return _table_html(head, rows, "lrrrrrr", f"summary-{escape(scenario)}")


def _drift_html(results: Mapping[str, Any], scenario: str) -> str:
    fig = drift_figure(results, scenario)
    if fig is None:
        return "<p class='note'>No strategy ran the drift signals (<code>--no-drift</code>).</p>"
    caption = (
        "Where each of the learner's drift signals (those of the service) fired along the stream, one "
        "tick per detection, a row per seed; segment boundaries dotted. A detection counts for a "
        "boundary within 500 events after it; others inside a segment are false alarms."
    )
    rows = []
    for s in results.get("drift", {}).get(scenario, {}).get("per_seed", []):
        delays = ", ".join("missed" if d is None else str(d) for d in s["delays"]) or "–"
        rows.append(("", [str(s["seed"]), escape(delays), f"{s['false_alarms_per_5000']['any']:.2f}"]))
    table = (
        _table_html(["seed", "delay at each boundary (events)", "false alarms per 5,000"], rows, "rlr")
        if rows
        else ""
    )
    alt = f"{scenario}: drift detections per signal along the stream, with the segment boundaries"
    return _figure_html(fig, "drift", scenario, alt, caption) + table


def _checkpoints(results: Mapping[str, Any], scenario: str) -> int:
    return len(_scenario_runs(results, scenario)[0]["checkpoints"])


def _scenario_html(results: Mapping[str, Any], scenario: str) -> str:
    info = results["scenarios"][scenario]
    window = results["config"]["rolling_window"]
    parts = [
        f"<section class='scenario' data-scenario='{escape(scenario)}'>",
        f"<h2>{escape(scenario)}: {info['events']:,} events</h2><p>{escape(info.get('about', ''))}</p>",
        _summary_html(results, scenario),
        _figure_html(
            heldout_figure(results, scenario),
            "heldout",
            scenario,
            f"{scenario}: held-out accuracy per segment over the stream, one panel per strategy",
            f"Accuracy on the held-out events of each segment, measured at {_checkpoints(results, scenario)} "
            "points along the stream: a segment's line falling after its block is forgetting.",
        ),
        _figure_html(
            prequential_figure(results, scenario),
            "prequential",
            scenario,
            f"{scenario}: prequential accuracy along the stream, one line per strategy",
            f"Each event scored by the model before it learns it (the last {window} events, mean over "
            "seeds).",
        ),
        _drift_html(results, scenario),
        _figure_html(
            label_mix_figure(results, scenario),
            "label_mix",
            scenario,
            f"{scenario}: share of each label along the stream",
            f"The share of each label among the last {window} events of the stream.",
        ),
    ]
    skipped = [r for r in results.get("not_run", []) if r["scenario"] == scenario]
    if skipped:
        items = "".join(
            f"<li>{escape(r['strategy'])}, seed {r['seed']}: {escape(r['reason'])}</li>" for r in skipped
        )
        parts.append(
            f"<div class='warn' id='not-run-{escape(scenario)}'><b>Not run</b><ul>{items}</ul></div>"
        )
    parts.append("</section>")
    return "".join(parts)


def upgraded(results: Mapping[str, Any]) -> dict[str, Any]:
    """A saved ``results.json`` of an older format in the current one's terms, so it can be reported
    again: format 1 (docs/quality/results.json) called the segments domains."""
    if results.get("format", 1) >= 2:
        return dict(results)
    new = copy.deepcopy(dict(results))
    new["segments"], new["segments_from"] = new.pop("domains"), "domain field"
    for run in new["runs"]:
        run["prequential"]["segment"] = run["prequential"].pop("domain")
    return new


def write_html(results: Mapping[str, Any], out: Path) -> str:
    """``report.html``: one self-contained page (inline CSS, the plots as ``data:`` PNGs, no script, no
    network) with the input, the ranking and, per scenario, the summary and the plots; its name."""
    scenario = next(iter(results["scenarios"]))
    body = [_header_html(results), _input_html(results), _ranking_html(results, scenario)]
    body += [_scenario_html(results, name) for name in results["scenarios"]]
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{HTML_TITLE}: {escape(scenario)}, {escape(results['created_at'])}</title>"
        f"<style>{_CSS}</style></head>\n<body><main>{''.join(body)}</main></body></html>\n"
    )
    (out / REPORT_HTML).write_text(page, encoding="utf-8")
    return REPORT_HTML


def write_reports(results: Mapping[str, Any], out: Path) -> list[str]:
    """``report.md`` (tables, ranking, input and token figures), ``report.html`` (all that and the plots)
    and ``recommended.yaml``; their names."""
    scenario = next(iter(results["scenarios"]))
    md = [f"# stream-learner eval, {results['created_at']}", ""]
    tokens = results.get("tokens") or {}
    if tokens.get("events"):
        md += [
            f"Tokens per event: median {tokens['median']:.0f}, p95 {tokens['p95']:.0f}, max {tokens['max']}; "
            f"{tokens['truncated_share']:.1%} cut at model.max_length = {tokens['max_length']}.",
            "",
        ]
    for name, info in _sources(results):
        md += [
            f"- {name}: {info['rows']} rows from {info['source']}, {info['valid']} valid; "
            f"invalid: {_invalid(info)}"
        ]
    md += ["", f"## Ranking on {scenario}", "", ranking_markdown(results, scenario), ""]
    for name in results["summary"]:
        md += [f"## {name}", "", markdown_table(results, name), ""]
    (out / "report.md").write_text("\n".join(md), encoding="utf-8")
    html = write_html(results, out)
    write_recommended(results, scenario, out)
    return ["report.md", html, RECOMMENDED]
