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

from stream_learner.tools.datasets import DOMAINS


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


def _mark_boundaries(ax: Any, boundaries: Sequence[int], n: int) -> None:
    starts = [0, *boundaries]
    for b in boundaries:
        ax.axvline(b, color="0.5", linestyle=":", linewidth=1)
    for k, s in enumerate(starts):
        end = starts[k + 1] if k + 1 < len(starts) else n
        ax.text((s + end) / 2, 1.0, DOMAINS[k], transform=ax.get_xaxis_transform(), ha="center", va="bottom")


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
        _mark_boundaries(ax, bounds, n)
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
            for d, domain in enumerate(DOMAINS):
                ax.plot(x, acc[:, d], marker=".", label=domain)
            ax.plot(x, acc.mean(axis=1), "k--", linewidth=1, label="mean")
            for b in bounds:
                ax.axvline(b, color="0.5", linestyle=":", linewidth=1)
            ax.set_title(f"{name} ({_seeds(len(rs))})")
            ax.set_xlabel("events")
            ax.set_ylim(0.0, 1.0)
        for ax in axes.flat[len(names) :]:
            ax.axis("off")
        axes[0][0].set_ylabel("held-out accuracy")
        axes[0][0].legend(fontsize="small")
        fig.suptitle(f"{scenario}: held-out accuracy per domain (domain boundaries dotted)")
        fig.tight_layout()
        path = out / f"heldout_{scenario}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path.name)
    return written
