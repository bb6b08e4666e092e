"""What ``stream-learner eval`` reports: the printed tables, their Markdown for ``docs/quality.md`` and
the PNG plots, all from the results dict of :func:`stream_learner.tools.evaluation.run_benchmark` (so a saved
``results.json`` can be reported again).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from stream_learner.core.config import Settings, load_settings

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


def _mark_boundaries(ax: Any, boundaries: Sequence[int] | None, n: int, names: Sequence[str]) -> None:
    """Dotted lines between segment blocks, each block named above the plot (none when segments recur)."""
    if boundaries is None:
        return
    starts = [0, *boundaries]
    for b in boundaries:
        ax.axvline(b, color="0.5", linestyle=":", linewidth=1)
    for k, s in enumerate(starts):
        end = starts[k + 1] if k + 1 < len(starts) else n
        ax.text((s + end) / 2, 1.0, names[k], transform=ax.get_xaxis_transform(), ha="center", va="bottom")


def _seeds(n: int) -> str:
    return f"{n} seed" if n == 1 else f"{n} seeds"


def write_plots(results: Mapping[str, Any], out: Path) -> list[str]:
    """Per scenario: prequential accuracy along the stream, and held-out accuracy per domain over time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    window = results["config"]["rolling_window"]
    written = []
    for scenario, info in results["scenarios"].items():
        runs = [r for r in results["runs"] if r["scenario"] == scenario]
        names = list(dict.fromkeys(r["strategy"] for r in runs))
        n, bounds = info["events"], info["boundaries"]

        fig, ax = plt.subplots(figsize=(10, 4.5))
        for name in names:
            curves = [
                rolling_mean(np.array(r["prequential"]["correct"]), window)
                for r in runs
                if r["strategy"] == name
            ]
            style = "--" if name == "offline" else "-"
            ax.plot(
                np.arange(1, n + 1), np.mean(curves, axis=0), style, label=f"{name} ({_seeds(len(curves))})"
            )
        _mark_boundaries(ax, bounds, n, results["segments"])
        ax.set(xlabel="events", ylabel=f"prequential accuracy (last {window})", ylim=(0.0, 1.0), xlim=(0, n))
        ax.legend(loc="lower left", fontsize="small", ncol=3)
        note = " (offline: in its shuffled order)" if "offline" in names else ""
        ax.set_title(f"{scenario}: prequential accuracy along the stream{note}", pad=18)
        fig.tight_layout()
        path = out / f"prequential_{scenario}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path.name)

        cols = min(3, len(names))
        rows = math.ceil(len(names) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.4 * rows), squeeze=False, sharey=True)
        for ax, name in zip(axes.flat, names, strict=False):
            rs = [r for r in runs if r["strategy"] == name]
            x = [c["events"] for c in rs[0]["checkpoints"]]
            acc = np.mean([[c["accuracy"] for c in r["checkpoints"]] for r in rs], axis=0)  # [checkpoints, D]
            for d, segment in enumerate(results["segments"]):
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
        path = out / f"heldout_{scenario}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
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


def write_reports(results: Mapping[str, Any], out: Path) -> list[str]:
    """``report.md`` (tables, ranking, input and token figures) and ``recommended.yaml``; their names."""
    scenario = next(iter(results["scenarios"]))
    md = [f"# stream-learner eval, {results['created_at']}", ""]
    tokens = results.get("tokens") or {}
    if tokens.get("events"):
        md += [
            f"Tokens per event: median {tokens['median']:.0f}, p95 {tokens['p95']:.0f}, max {tokens['max']}; "
            f"{tokens['truncated_share']:.1%} cut at model.max_length = {tokens['max_length']}.",
            "",
        ]
    for name, info in results.get("input", {}).items():
        if isinstance(info, dict) and "rows" in info:
            bad = ", ".join(f"{k} {v}" for k, v in info["invalid"].items()) or "none"
            md += [
                f"- {name}: {info['rows']} rows from {info['source']}, {info['valid']} valid; invalid: {bad}"
            ]
    md += ["", f"## Ranking on {scenario}", "", ranking_markdown(results, scenario), ""]
    for name in results["summary"]:
        md += [f"## {name}", "", markdown_table(results, name), ""]
    (out / "report.md").write_text("\n".join(md), encoding="utf-8")
    write_recommended(results, scenario, out)
    return ["report.md", RECOMMENDED]
