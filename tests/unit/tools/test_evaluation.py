"""The quality benchmark: metric functions on known inputs, the scenario builders, and one quick run."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import orjson
import pytest
from typer.testing import CliRunner

from stream_learner.cli import app
from stream_learner.tools import evaluation as ev
from stream_learner.tools import evaluation_report as report
from stream_learner.tools import stream_source as source
from stream_learner.tools.datasets import DOMAINS, STREAM, bundled_path, read_jsonl
from tests.support.tiny_model import tiny_model_dir

# ------------------------------------------------------------------------------------------- metrics


def test_macro_f1_on_known_inputs():
    assert ev.macro_f1(np.array([0, 1, 1, 0]), np.array([0, 1, 1, 0])) == 1.0
    # one class predicted for everything: F1(1) = 2·2/(4+2) = 2/3, F1(0) = 0
    assert ev.macro_f1(np.array([1, 1, 1, 1]), np.array([1, 1, 0, 0])) == pytest.approx(1 / 3)
    # class 0: tp 1, 2 predicted, 1 true → 2/3; class 1: tp 1, 1 predicted, 2 true → 2/3
    assert ev.macro_f1(np.array([0, 0, 1]), np.array([0, 1, 1])) == pytest.approx(2 / 3)
    # a class only in the predictions counts (with F1 0)
    assert ev.macro_f1(np.array([2, 0]), np.array([0, 0])) == pytest.approx((2 / 3 + 0) / 2)


def test_backward_transfer_and_forgetting_on_a_hand_made_matrix():
    # acc[i, j]: accuracy on domain j after learning through domain i
    acc = np.array(
        [
            [0.90, 0.50, 0.50, 0.50],
            [0.95, 0.80, 0.50, 0.50],
            [0.85, 0.85, 0.70, 0.50],
            [0.70, 0.82, 0.75, 0.90],
        ]
    )
    # BWT = mean(final − just after learning) over the first three domains
    assert ev.backward_transfer(acc) == pytest.approx(((0.70 - 0.90) + (0.82 - 0.80) + (0.75 - 0.70)) / 3)
    # forgetting = mean(best while/after learned, before the end − final): 0.95−0.70, 0.85−0.82, 0.70−0.75
    assert ev.average_forgetting(acc) == pytest.approx(((0.95 - 0.70) + (0.85 - 0.82) + (0.70 - 0.75)) / 3)
    # accuracy before a domain was learned does not count as "best earlier": column 3's 0.5s don't matter
    later = acc.copy()
    later[:3, 2] = [0.99, 0.99, 0.70]
    assert ev.average_forgetting(later) == ev.average_forgetting(acc)
    # nothing forgotten: a matrix that only improves
    improving = 0.5 + 0.1 * np.arange(3)[:, None] * np.ones((3, 3))  # every domain gains at every stage
    assert ev.average_forgetting(improving) == pytest.approx(-0.1)  # the best earlier is the last but one
    assert ev.backward_transfer(improving) == pytest.approx(0.15)
    assert np.isnan(ev.backward_transfer(np.ones((1, 1))))


def test_rolling_mean_and_mean_std():
    np.testing.assert_allclose(report.rolling_mean(np.array([1, 0, 1, 1]), 2), [1, 0.5, 0.5, 1])
    assert ev.mean_std([1.0, 2.0, 3.0]) == {"mean": 2.0, "std": 1.0, "n": 3}
    assert ev.mean_std([0.5]) == {"mean": 0.5, "std": None, "n": 1}


# ----------------------------------------------------------------------------------------- scenarios


@pytest.fixture(scope="module")
def stream_rows() -> list[dict]:
    return list(read_jsonl(bundled_path(STREAM)))


def test_covariate_slice_keeps_stream_order_and_domain_order(stream_rows):
    rows = ev.domain_slice(stream_rows, 50)
    assert [r["domain"] for r in rows] == [d for d in DOMAINS for _ in range(50)]
    movie = [r for r in stream_rows if r["domain"] == "movie"][:50]
    assert rows[:50] == movie
    assert source.segment_blocks(np.array([DOMAINS.index(r["domain"]) for r in rows])) == [50, 100, 150]


def test_prior_shift_resampler_gives_the_mix_with_alternating_majority(stream_rows):
    rows = ev.skewed_blocks(stream_rows, 200, ["neg", "pos"], majority_share=0.85, seed=3)
    assert len(rows) == 800
    majorities = []
    for k, domain in enumerate(DOMAINS):
        block = rows[200 * k : 200 * (k + 1)]
        assert {r["domain"] for r in block} == {domain}
        counts = Counter(r["label"] for r in block)
        label, n = counts.most_common(1)[0]
        assert n == 170 and sum(counts.values()) == 200  # 85 / 15
        majorities.append(label)
        assert len({r["id"] for r in block}) == 200  # enough rows: drawn without replacement
    assert majorities == ["pos", "neg", "pos", "neg"]
    # shuffled inside the block, and reproducible from the seed
    assert [r["label"] for r in rows[:200]] != sorted(r["label"] for r in rows[:200])
    assert ev.skewed_blocks(stream_rows, 200, ["neg", "pos"], seed=3) == rows
    # the imbalanced variant keeps one majority
    same = ev.skewed_blocks(stream_rows, 100, ["neg", "pos"], 0.9, first_majority=0, alternate=False)
    assert [Counter(r["label"] for r in same[100 * k : 100 * (k + 1)])["neg"] for k in range(4)] == [90] * 4


def test_checkpoints_and_variants():
    assert ev.checkpoint_positions(100, [25, 50, 75], 30) == [0, 25, 30, 50, 60, 75, 90, 100]
    v = ev.parse_variant("lam:training.l2sp_lambda=0.1,replay.class_balanced=true")
    assert v.name == "lam" and v.overrides == {
        "training": {"l2sp_lambda": 0.1},
        "replay": {"class_balanced": True},
    }
    with pytest.raises(ValueError):
        ev.parse_variant("no-colon")
    cfg = ev.EvalConfig(strategies=("default", "frozen"), seeds=3, other_seeds=1, seed_counts={"frozen": 2})
    assert [(s.name, seed) for _, s, seed in ev.plan_runs(cfg) if _ == "covariate"] == [
        ("default", 0),
        ("default", 1),
        ("default", 2),
        ("frozen", 0),
        ("frozen", 1),
    ]
    with pytest.raises(ValueError, match="unknown strategy"):
        ev.plan_runs(ev.EvalConfig(strategies=("bogus",)))


# ---------------------------------------------------------------------------------------- quick run


def quick_config(**changes) -> ev.EvalConfig:
    """The quick run on the tiny model (tests/support/tiny_model.py): the tests below check the tool's
    results, their structure and consistency, never how well a model learns (docs/quality.md measures
    that)."""
    base = {"scenarios": ("covariate",), "strategies": ("frozen", "default", "offline"), "layers": None}
    return ev.EvalConfig.quick(
        **{**base, "settings": {"model": {"name_or_path": tiny_model_dir()}}, **changes}
    )


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("eval")
    ev.run_benchmark(quick_config(), out, progress=False)
    return json.loads((out / "results.json").read_text()), out


def test_quick_run_results_have_the_expected_structure_and_ranges(quick):
    results, _ = quick
    assert {"config", "environment", "scenarios", "runs", "summary", "drift", "plots"} <= results.keys()
    info = results["scenarios"]["covariate"]
    n = 4 * 32
    assert info["events"] == n and info["boundaries"] == [32, 64, 96]
    assert [(r["strategy"], r["seed"]) for r in results["runs"]] == [
        ("frozen", 0),
        ("default", 0),
        ("offline", 0),
    ]
    for r in results["runs"]:
        m = r["metrics"]
        for key in ("final_accuracy", "final_f1", "prequential_accuracy"):
            assert 0.0 <= m[key] <= 1.0, (r["strategy"], key)
        assert -1.0 <= m["bwt"] <= 1.0 and -1.0 <= m["forgetting"] <= 1.0
        # checkpoints: the start, every 16 events (the boundaries fall on them), 4 domains each
        assert [c["events"] for c in r["checkpoints"]] == list(range(0, n + 1, 16))
        assert all(len(c["accuracy"]) == len(c["f1"]) == 4 for c in r["checkpoints"])
        # the accuracy matrix is read from the checkpoints at the domain ends; the metrics from it
        matrix = np.array(r["accuracy_matrix"])
        by_events = {c["events"]: c["accuracy"] for c in r["checkpoints"]}
        np.testing.assert_allclose(matrix, [by_events[e] for e in (32, 64, 96, 128)])
        assert m["forgetting"] == pytest.approx(ev.average_forgetting(matrix))
        assert m["final_accuracy"] == pytest.approx(np.mean(matrix[-1]))
        # per-event prequential records
        pq = r["prequential"]
        assert len(pq["correct"]) == len(pq["loss"]) == len(pq["label"]) == len(pq["segment"]) == n
        assert m["prequential_accuracy"] == pytest.approx(np.mean(pq["correct"]))
        assert Counter(pq["segment"]) == {0: 32, 1: 32, 2: 32, 3: 32}
    # summary: mean over the one seed, no std
    s = results["summary"]["covariate"]["default"]["final_accuracy"]
    assert s["n"] == 1 and s["std"] is None


def test_quick_run_strategies_do_what_they_say(quick):
    results, _ = quick
    runs = {r["strategy"]: r for r in results["runs"]}
    # the same number of gradient steps for every strategy, the shuffled offline bound included
    assert len({r["steps"] for r in runs.values()}) == 1 and runs["default"]["steps"] == 8
    # offline: same events (same label counts per domain), another order
    d, o = runs["default"]["prequential"], runs["offline"]["prequential"]
    assert Counter(zip(d["segment"], d["label"], strict=True)) == Counter(
        zip(o["segment"], o["label"], strict=True)
    )
    assert d["segment"] != o["segment"]
    # frozen: the encoder never moved; the default moved away from θ0 and replayed
    assert runs["frozen"]["param_distance"] == 0.0
    assert runs["default"]["param_distance"] > 0.0 and runs["default"]["examples_replayed"] > 0
    assert runs["default"]["settings"]["training"]["l2sp_lambda"] > 0
    assert runs["frozen"]["settings"]["model"]["name_or_path"] == tiny_model_dir()


def test_quick_run_records_drift_for_the_default_strategy(quick):
    results, _ = quick
    runs = {r["strategy"]: r for r in results["runs"]}
    assert "drift" not in runs["offline"] and "drift" in runs["default"]
    report = runs["default"]["drift"]["report"]
    assert [b["at"] for b in report["boundaries"]] == [32, 64, 96]
    assert set(runs["default"]["drift"]["positions"]) == {"loss", "label_mix", "embedding"}
    assert results["drift"]["covariate"]["per_seed"][0]["seed"] == 0


def test_quick_run_writes_png_plots(quick):
    results, out = quick
    assert sorted(results["plots"]) == ["heldout_covariate.png", "prequential_covariate.png"]
    for name in results["plots"]:
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_runs_in_worker_processes_equal_the_runs_in_process(quick, tmp_path):
    # the same three runs of the quick fixture, on two spawned workers (costliest first): same results
    results, _ = quick
    cfg = quick_config(jobs=2)
    parallel = ev.run_benchmark(cfg, tmp_path, progress=False)
    assert parallel["config"]["jobs"] == 2
    assert [(r["strategy"], r["seed"]) for r in parallel["runs"]] == [
        (r["strategy"], r["seed"]) for r in results["runs"]
    ]
    for mine, theirs in zip(parallel["runs"], results["runs"], strict=True):
        assert mine["metrics"] == pytest.approx(theirs["metrics"], abs=1e-6)
        assert mine["prequential"]["correct"] == theirs["prequential"]["correct"]
        assert mine["param_distance"] == pytest.approx(theirs["param_distance"], rel=1e-5)


def test_quick_tables_render(quick):
    results, _ = quick
    md = report.markdown_table(results, "covariate")
    assert md.count("\n") == 2 + 3 - 1 and "| default | 1 |" in md
    assert len(report.tables(results)) == 1


# ---------------------------------------------------------------------------------------------- CLI


def test_cli_rejects_unknown_strategy_before_training(tmp_path):
    result = CliRunner().invoke(app, ["eval", "--quick", "--strategies", "bogus", "--out", str(tmp_path)])
    assert result.exit_code == 1
    assert "unknown strategy" in result.output
    assert not (tmp_path / "results.json").exists()


def test_cli_rejects_zero_jobs(tmp_path):
    result = CliRunner().invoke(app, ["eval", "--quick", "--jobs", "0", "--out", str(tmp_path)])
    assert result.exit_code == 1
    assert "jobs must be at least 1" in result.output


def test_stream_through_the_broker_equals_the_in_process_stream(stream_rows, kafka_bootstrap):
    """``--broker``: the events the service's consumer makes from the topic are those tokenized in process."""
    from stream_learner.core.events import LabelSet
    from stream_learner.core.intake import Tokenize
    from stream_learner.tools.stream_source import parse_rows
    from tests.support.factories import small_settings, tokenizer

    cfg = ev.EvalConfig(per_domain=15)
    rows = ev.make_stream("prior_shift", stream_rows, cfg, ["neg", "pos"])
    settings = small_settings()
    tok = tokenizer()
    events = parse_rows(
        (orjson.dumps(r) for r in rows), LabelSet(settings.model.labels), 10_000, "rows"
    ).events
    direct = ev.tokenize_events(events, Tokenize(tok, settings.model.max_length))
    through = ev.events_through_broker(events, settings, tok, kafka_bootstrap, timeout_s=60)
    assert len(through) == len(rows) == 60
    for a, b in zip(direct, through, strict=True):
        np.testing.assert_array_equal(a.input_ids, b.input_ids)
        assert (a.label, a.pair_start, a.offset, b.partition) == (b.label, b.pair_start, b.offset, 0)
    assert all(e.timestamp_ms > 0 for e in through)  # they did cross the broker


def test_one_class_start_has_one_label_in_its_first_block_then_the_covariate_stream(stream_rows):
    rows = ev.make_stream("one_class_start", stream_rows, ev.EvalConfig(per_domain=40), ["neg", "pos"])
    assert {(r["domain"], r["label"]) for r in rows[:40]} == {("movie", "neg")}
    assert rows[40:] == ev.domain_slice(stream_rows, 40)[40:]


# ------------------------------------------------------------------------------------ the user's stream


def _own_files(tmp_path: Path, stream_rows: list[dict]) -> tuple[Path, Path]:
    """VADER rows renamed into another label set (bad/good), with a segment field and two bad rows."""
    names = {"neg": "bad", "pos": "good"}
    rows = ev.domain_slice(stream_rows, 24)
    lines = [
        orjson.dumps({"text": r["text"], "label": names[r["label"]], "segment": r["domain"]}) for r in rows
    ]
    stream, heldout = tmp_path / "mine.jsonl", tmp_path / "mine_heldout.jsonl"
    stream.write_bytes(b"\n".join([*lines[:48], b'{"text": "no label"}', b"{oops", *lines[48:]]) + b"\n")
    held = [
        orjson.dumps({**orjson.loads(line), "text": orjson.loads(line)["text"] + " !"}) for line in lines[::3]
    ]
    heldout.write_bytes(b"\n".join(held) + b"\n")
    return stream, heldout


def test_own_stream_within_a_budget_runs_the_cheapest_first_and_lists_the_rest(stream_rows, tmp_path):
    stream, heldout = _own_files(tmp_path, stream_rows)
    cfg = quick_config(
        stream=str(stream),
        heldout=str(heldout),
        labels=("bad", "good"),
        strategies=("default", "frozen", "naive"),
        budget_minutes=1e-6,  # the first run always starts; nothing else fits after it
    )
    results = ev.run_benchmark(cfg, tmp_path / "out", progress=False)
    # cheapest first: a frozen encoder costs less than the others
    assert [r["strategy"] for r in results["runs"]] == ["frozen"]
    assert sorted(r["strategy"] for r in results["not_run"]) == ["default", "naive"]
    assert results["input"]["stream"] == {
        "source": str(stream),
        "rows": 98,
        "valid": 96,
        "invalid": {"missing_label": 1, "not_json": 1},
    }
    assert results["segments"] == list(DOMAINS) and results["segments_from"] == "segment field"
    assert results["scenarios"]["mine"]["boundaries"] == [24, 48, 72]
    assert results["labels"] == ["bad", "good"]
    assert (tmp_path / "out" / "recommended.yaml").is_file()


def test_own_stream_without_segments_is_scored_in_equal_slices(stream_rows, tmp_path):
    stream, heldout = _own_files(tmp_path, stream_rows)
    for path in (stream, heldout):  # the same rows without their segment field
        lines = [orjson.loads(x) if x.startswith(b'{"') else None for x in path.read_bytes().splitlines()]
        path.write_bytes(
            b"\n".join(
                orjson.dumps({k: v for k, v in d.items() if k != "segment"}) if d else raw
                for d, raw in zip(lines, path.read_bytes().splitlines(), strict=True)
            )
        )
    cfg = quick_config(
        stream=str(stream), heldout="last:25%", labels=("bad", "good"), strategies=("default",), slices=3
    )
    results = ev.run_benchmark(cfg, tmp_path / "out", progress=False)
    assert results["segments"] == ["part 1/3", "part 2/3", "part 3/3"]
    assert results["segments_from"] == "3 equal slices"
    assert results["input"]["heldout"]["valid"] == 24 and results["scenarios"]["mine"]["events"] == 72
    assert results["scenarios"]["mine"]["boundaries"] == [24, 48]
    [run] = results["runs"]
    assert all(len(c["accuracy"]) == 3 for c in run["checkpoints"]) and "report" not in run["drift"]


def test_class_balanced_replay_changes_the_runs_of_a_one_class_start(tmp_path):
    """The user's finding: with the reservoir never full, class_balanced=true gave bit-identical weights.
    Now the draw is balanced from the start, so every seed's run differs (docs/quality.md measures the
    held-out effect with the real model)."""
    cfg = quick_config(
        scenarios=("one_class_start",),
        strategies=("default", "default_cbrs"),
        seed_counts={"default": 2, "default_cbrs": 2},
        drift=False,
    )
    results = ev.run_benchmark(cfg, tmp_path, progress=False)
    runs = {(r["strategy"], r["seed"]): r for r in results["runs"]}
    for seed in (0, 1):
        plain, balanced = runs["default", seed], runs["default_cbrs", seed]
        assert plain["examples_replayed"] == balanced["examples_replayed"] > 0
        assert plain["param_distance"] != balanced["param_distance"]
        assert plain["prequential"]["loss"] != balanced["prequential"]["loss"]


def test_eval_help_gives_the_path_from_a_file_to_a_recommended_configuration():
    text = CliRunner().invoke(app, ["eval", "--help"], terminal_width=120).output
    steps = [line for line in text.splitlines() if line.strip()[:2] in {"1.", "2.", "3.", "4."}]
    assert len(steps) == 4  # four commands, the acceptance's "five or fewer"
    for needle in (
        "--stream",
        "--heldout",
        "--labels",
        "report.html",
        "--sweep",
        "--budget-minutes",
        "run -c",
    ):
        assert needle in text, needle


def test_a_sweep_of_max_length_trains_each_point_on_events_cut_at_its_length(tmp_path):
    from stream_learner.tools.sweep import grid
    from tests.support.own_stream import HELDOUT_FILE, LABELS, STREAM_FILE

    points = grid(["model.max_length=16,64"])
    cfg = quick_config(
        stream=str(STREAM_FILE),
        heldout=str(HELDOUT_FILE),
        labels=LABELS,
        limit=48,
        heldout_per_segment=4,
        strategies=tuple(p.name for p in points),
        variants={p.name: p for p in points},
        drift=False,
    )
    results = ev.run_benchmark(cfg, tmp_path, progress=False)
    short, long = results["runs"]
    assert short["settings"]["model"]["max_length"] == 16 and long["settings"]["model"]["max_length"] == 64
    # the same stream, seed and steps: only the cut differs, and it reaches the training
    assert short["steps"] == long["steps"] and short["prequential"]["loss"] != long["prequential"]["loss"]
    assert results["tokens"]["max_length"] == 64 and results["tokens"]["truncated_share"] > 0.1  # long texts
