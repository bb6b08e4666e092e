"""The alert rules and the Grafana dashboard, checked without a running learner (issue 7, acceptance 2).

* ``promtool check rules`` accepts ``alerts.yaml``; ``promtool test rules`` runs
  ``tests/support/promtool/alerts_test.yaml``, in which every alert fires on a synthetic series and stays
  silent on a healthy one (checked here to hold for every alert of the file);
* every metric the alerts and the dashboard read is one the learner or the inference server exposes
  (their registries, so a misspelled name fails), and the dashboard shows every metric of both;
* the dashboard's structure (datasource variable, job/instance variables, every panel queried, unique
  ids, a layout without overlaps);
* ``docs/observability.md`` names every metric, alert and panel.

The queries themselves run against a real Prometheus scraping a real learner in
``tests/integration/test_observability.py``, and a real inference server in
``tests/integration/test_serving_observability.py``.
"""

from __future__ import annotations

import re
import subprocess
from itertools import combinations
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.metrics_core import Metric

from stream_learner.service.metrics import Metrics, ServingMetrics
from tests.support.prometheus import (
    ALERTS_FILE,
    REPO,
    alert_rules,
    dashboard_exprs,
    dashboard_panels,
    load_dashboard,
    metric_names,
    prometheus_tool,
    top_level_operands,
    vector_selectors,
)

PROMTOOL_TESTS = REPO / "tests/support/promtool/alerts_test.yaml"
OBSERVABILITY_DOC = REPO / "docs/observability.md"
SEVERITIES = {"critical", "warning", "info"}
SYNTHETIC = {"up"}  # written by Prometheus itself for every target, not by the learner


def families() -> list[Metric]:
    """Every metric family a learner exposes (its own registry, process metrics included)."""
    return list(Metrics().registry.collect())


def serving_families() -> list[Metric]:
    """Every metric family an inference server (``stream-learner serve``) exposes, process metrics too."""
    return list(ServingMetrics().registry.collect())


# the sample names of each metric type, as exposed (a labelled metric without children has no samples)
SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "summary": ("", "_count", "_sum", "_created"),
    "info": ("_info",),
}


def exposed_names() -> set[str]:
    """Every sample name as scraped, by a learner or a server: ``x_total`` of a counter, ``x_bucket``
    of a histogram, …"""
    return {
        name
        for family in families() + serving_families()
        for name in [family.name + suffix for suffix in SUFFIXES[family.type]]
        + [sample.name for sample in family.samples]
    }


def promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [prometheus_tool("promtool"), *map(str, args)], capture_output=True, text=True, timeout=120
    )


# ---------------------------------------------------------------------------------------- promtool
def test_promtool_check_rules() -> None:
    result = promtool("check", "rules", ALERTS_FILE)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout


def test_promtool_unit_tests_pass() -> None:
    result = promtool("test", "rules", PROMTOOL_TESTS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def _rule_tests() -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(test group, alert_rule_test) pairs of the promtool unit tests."""
    doc = yaml.safe_load(PROMTOOL_TESTS.read_text())
    return [(group, case) for group in doc["tests"] for case in group.get("alert_rule_test", [])]


def _series_labels(series: str) -> dict[str, str]:
    matchers = re.search(r"\{(.*)\}", series)
    return dict(re.findall(r'(\w+)="([^"]*)"', matchers.group(1))) if matchers else {}


@pytest.mark.parametrize("alert", [r["alert"] for r in alert_rules()])
def test_every_alert_fires_on_a_broken_series_and_not_on_a_healthy_one(alert: str) -> None:
    """promtool only checks the cases written: make sure each alert has both kinds.

    Fires: an evaluation expecting it. Silent: an evaluation expecting nothing, and, where the firing
    evaluation names the series (job/instance/…), an input series of the same test group that the
    expected alerts leave out, i.e. a healthy series evaluated at the same moment (promtool's match
    of the expected alerts is exact, so that series must not fire).
    """
    cases = [(group, case) for group, case in _rule_tests() if case["alertname"] == alert]
    firing = [(group, case) for group, case in cases if case.get("exp_alerts")]
    assert firing, f"no promtool case in which {alert} fires"
    assert any(not case.get("exp_alerts") for _, case in cases), f"no promtool case where {alert} is silent"
    for group, case in firing:
        for expected in case["exp_alerts"]:
            assert set(expected["exp_annotations"]) >= {"summary", "description", "runbook_url"}
        keys = {k for e in case["exp_alerts"] for k in e["exp_labels"]} - {"severity"}
        if not keys:  # absent(): no series to name (its silent case runs with a target present)
            continue
        fired = [{k: e["exp_labels"].get(k) for k in keys} for e in case["exp_alerts"]]
        healthy = [
            s["series"]
            for s in group["input_series"]
            if {k: _series_labels(s["series"]).get(k) for k in keys} not in fired
        ]
        assert healthy, f"{alert} at {case['eval_time']}: no healthy series evaluated alongside"


def test_rules_are_labelled_and_annotated() -> None:
    rules = alert_rules()
    assert len({r["alert"] for r in rules}) == len(rules), "duplicate alert names"
    for rule in rules:
        name = rule["alert"]
        assert rule["labels"]["severity"] in SEVERITIES, name
        annotations = rule["annotations"]
        assert annotations["summary"] and annotations["description"], name
        runbook = annotations["runbook_url"]
        assert re.fullmatch(r"docs/(operations|observability)\.md#[a-z0-9-]+", runbook), name
    # the issue's list: each of these is covered by an alert
    exprs = " ".join(r["expr"] for r in rules)
    for needle in (
        "up{",
        "stream_learner_latest_version_timestamp_seconds",
        "stream_learner_publish_failures_total",
        "stream_learner_publish_degraded",
        "stream_learner_consumer_lag",
        "stream_learner_events_dead_lettered_total",
        "stream_learner_dead_letter_failures_total",
        "stream_learner_nonfinite_steps_skipped_total",
        "stream_learner_drift_detections_total",
        "stream_learner_prequential_accuracy",
        "stream_learner_versions_rejected_total",
        "stream_learner_corrupt_versions_total",
        # issue 19: an inference server behind LATEST, or cut off from the store
        "stream_learner_serving_latest_version > stream_learner_serving_version",
        "stream_learner_serving_storage_degraded",
    ):
        assert needle in exprs, f"no alert on {needle}"


def _anchors(doc: Path) -> set[str]:
    """GitHub's anchors of a Markdown file's headings."""
    headings = [line.lstrip("#").strip() for line in doc.read_text().splitlines() if line.startswith("#")]
    return {re.sub(r"[^a-z0-9 _-]", "", h.lower()).replace(" ", "-") for h in headings}


def test_runbook_sections_exist() -> None:
    """Every runbook_url names a heading of the document it points to."""
    for rule in alert_rules():
        path, anchor = rule["annotations"]["runbook_url"].split("#")
        assert anchor in _anchors(REPO / path), f"{rule['alert']}: {path} has no section #{anchor}"


# ------------------------------------------------------------------------------------ metric names
def test_metric_name_parsing_finds_a_misspelled_metric() -> None:
    """The checks below rest on metric_names(): it must see names, not functions, labels or keywords."""
    expr = (
        'sum by (job, instance) (rate(stream_learner_events_consumd_total{reason!="x", job=~"$job"}'
        "[$__rate_interval] offset 1h)) / on (job) group_left max(process_open_fds) > bool 0.5"
    )
    assert metric_names(expr) == {"stream_learner_events_consumd_total", "process_open_fds"}
    assert not metric_names(expr) <= exposed_names()


def test_top_level_operands_split_comparisons_and_set_operators_only() -> None:
    """What the integration test queries separately for an alert that is empty when all is well."""
    ratio = 'sum without (r) (rate(a{x=">"}[5m])) / on (job) b'
    expr = f"{ratio} > bool 0.05\nand on (job, instance) c >= 10"
    assert top_level_operands(expr) == [ratio, "0.05", "c", "10"]
    assert top_level_operands("absent(up{job='x'})") == ["absent(up{job='x'})"]
    assert top_level_operands("(x > 0 or y) > 3600") == ["(x > 0 or y)", "3600"]


def test_alerts_read_only_exposed_metrics() -> None:
    exposed = exposed_names() | SYNTHETIC
    for rule in alert_rules():
        unknown = metric_names(rule["expr"]) - exposed
        assert not unknown, (
            f"{rule['alert']} reads metrics neither a learner nor a server exposes: {sorted(unknown)}"
        )


def test_dashboard_reads_only_exposed_metrics() -> None:
    exposed = exposed_names() | SYNTHETIC
    for title, expr in dashboard_exprs(load_dashboard()):
        unknown = metric_names(expr) - exposed
        assert not unknown, (
            f"panel {title!r} reads metrics neither a learner nor a server exposes: {sorted(unknown)}"
        )


@pytest.mark.parametrize("process", ["learner", "server"])
def test_dashboard_shows_every_metric(process: str) -> None:
    """A metric added to metrics.py gets a panel (or a query in one), the learner's and the inference
    server's alike: the dashboard is the product."""
    used = set().union(*(metric_names(expr) for _, expr in dashboard_exprs(load_dashboard())))
    missing = [
        family.name
        for family in (families() if process == "learner" else serving_families())
        if family.name.startswith("stream_learner_")
        and not any(family.name + suffix in used for suffix in SUFFIXES[family.type])
    ]
    assert not missing, f"no dashboard panel reads {missing}"


# The dashboard's variable pairs: the learner's job/instance, the inference server's (another scrape
# job: the chart's ServiceMonitors name them stream-learner and stream-learner-serving)
LEARNER_VARIABLES = ("job", "instance")
SERVING_VARIABLES = ("serving_job", "serving_instance")


def follows(selector: str, variables: tuple[str, str]) -> bool:
    """Whether a vector selector filters on this job / instance variable pair."""
    job, instance = variables
    return f'job=~"${job}"' in selector and f'instance=~"${instance}"' in selector


# --------------------------------------------------------------------------------------- dashboard
def test_dashboard_structure() -> None:
    d = load_dashboard()
    assert d["schemaVersion"] >= 36
    assert d["uid"] and d["title"]
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in LEARNER_VARIABLES + SERVING_VARIABLES:
        var = variables[name]
        assert var["type"] == "query"
        assert var["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        label = name.removeprefix("serving_")
        assert query.startswith("label_values(") and query.endswith(f", {label})")
        # each pair lists the targets of its own process: by a metric only that process exposes
        metric = query.removeprefix("label_values(").split("{")[0].split(",")[0]
        assert metric.startswith("stream_learner_serving_") == (name in SERVING_VARIABLES), query
        if label == "instance":
            assert f'job=~"${name.replace("instance", "job")}"' in query, query

    panels = dashboard_panels(d)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids are not unique"
    queried = [p for p in panels if p["type"] != "row"]
    assert len(queried) >= 20
    for p in panels:
        grid = p["gridPos"]
        assert all(isinstance(grid[k], int) for k in ("h", "w", "x", "y")), p["title"]
        assert grid["w"] > 0 and grid["h"] > 0 and grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, p["title"]
    for p in queried:
        title = p["title"]
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, title
        assert p.get("description"), f"panel {title!r} has no description"
        targets = p["targets"]
        assert targets, f"panel {title!r} has no query"
        assert len({t["refId"] for t in targets}) == len(targets), title
        pairs = set()
        for t in targets:
            assert t["expr"].strip(), title
            assert t.get("datasource", p["datasource"]) == p["datasource"], title
            # every selector follows the job / instance variables of the process that exposes its
            # metric: the inference server's own (stream_learner_serving_*) or the learner's
            for selector in vector_selectors(t["expr"]):
                serving = selector.startswith("stream_learner_serving_")
                learner = selector.startswith("stream_learner_") and not serving
                pair = (
                    SERVING_VARIABLES
                    if serving or follows(selector, SERVING_VARIABLES)
                    else LEARNER_VARIABLES
                )
                assert not (learner and pair == SERVING_VARIABLES), (title, selector)
                assert follows(selector, pair), (title, selector)
                pairs.add(pair)
        assert len(pairs) == 1, f"panel {title!r} mixes the learner's and the server's variables"

    # no two panels overlap
    def cells(p: dict[str, Any]) -> set[tuple[int, int]]:
        g = p["gridPos"]
        return {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}

    for a, b in combinations(panels, 2):
        assert not cells(a) & cells(b), f"panels {a['title']!r} and {b['title']!r} overlap"


SERVING_QUANTILE = "histogram_quantile({}, sum by (job, instance, le) (rate(stream_learner_serving_{}_bucket"


def test_dashboard_panels_cover_the_issue() -> None:
    """The panels the issue asks for, each found by what it queries."""
    exprs = " ".join(expr for _, expr in dashboard_exprs(load_dashboard()))
    for needle in (
        "stream_learner_events_per_second",
        "stream_learner_examples_per_second",
        "stream_learner_consumer_lag",
        "stream_learner_queue_depth",
        "stream_learner_consumer_paused",
        "stream_learner_training_loss",
        "stream_learner_l2sp_penalty",
        "stream_learner_prequential_loss",
        "stream_learner_prequential_accuracy",
        "stream_learner_prequential_f1",
        "stream_learner_probe_accuracy",
        "stream_learner_drift_score",
        "stream_learner_drift_detections_total",
        "stream_learner_latest_version",
        "histogram_quantile(0.95, sum by (job, instance, le) (rate(stream_learner_publish_seconds_bucket",
        "stream_learner_publish_failures_total",
        "sum by (reason) (rate(stream_learner_events_dead_lettered_total",
        "stream_learner_param_distance",
        "stream_learner_nonfinite_steps_skipped_total",
        "stream_learner_step_seconds_bucket",
        # issue 18: throughput and speed as rate() of counters; the gauges are instantaneous
        "rate(stream_learner_events_trained_total",
        "rate(stream_learner_examples_trained_total",
        "/ rate(stream_learner_step_seconds_sum",
        "stream_learner_replay_size",
        "stream_learner_replay_bytes",
        "process_resident_memory_bytes",
        "process_cpu_seconds_total",
        # issue 19: the inference server — served version and LATEST, the lag between them, requests
        # and errors, latency and batch quantiles, version age, freshness, refusals, the store
        "stream_learner_serving_version{",
        "max by (job) (stream_learner_serving_latest_version{",
        "stream_learner_serving_latest_version{",
        'rate(stream_learner_serving_requests_total{endpoint="infer", code=~"5..",',
        SERVING_QUANTILE.format(0.5, "request_seconds"),
        SERVING_QUANTILE.format(0.99, "request_seconds"),
        "stream_learner_serving_batch_size_bucket",
        "stream_learner_serving_version_age_seconds",
        SERVING_QUANTILE.format(0.5, "freshness_seconds"),
        SERVING_QUANTILE.format(0.99, "freshness_seconds"),
        "stream_learner_serving_versions_refused_total",
        "stream_learner_serving_storage_degraded",
    ):
        assert needle in exprs, f"no panel queries {needle}"
    # the lag behind LATEST: LATEST minus the served version, per replica
    lag = "stream_learner_serving_latest_version{%s} - stream_learner_serving_version{%s}"
    selector = 'job=~"$serving_job", instance=~"$serving_instance"'
    assert lag % (selector, selector) in exprs


# -------------------------------------------------------------------------------------------- docs
def test_observability_doc_names_every_metric_alert_and_panel() -> None:
    doc = OBSERVABILITY_DOC.read_text()
    for family in families() + serving_families():
        if family.name.startswith("stream_learner_"):
            # documented as exposed: the counter's _total, the histogram's base name
            shown = family.name + ("_total" if family.type == "counter" else "")
            assert f"`{shown}`" in doc, f"docs/observability.md does not document {shown}"
    for rule in alert_rules():
        assert f"`{rule['alert']}`" in doc, f"docs/observability.md does not describe {rule['alert']}"
    for panel in dashboard_panels(load_dashboard()):
        assert panel["title"] in doc, f"docs/observability.md does not describe panel {panel['title']!r}"
