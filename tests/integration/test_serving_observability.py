"""A real Prometheus scraping a real inference server runs the dashboard's Serving row and the serving
alerts (issue 19, acceptance 5).

The server (``InferenceServer`` in this process, the tiny model of ``tests/support/tiny_model.py``)
follows a local store into which :class:`~tests.support.serving.VersionSource` publishes with the
learner's own publisher. A Prometheus server (Debian's binary) scrapes it every second as job
``stream-learner-serving`` (the chart's ServiceMonitor's job) and loads ``alerts.yaml``. While it
watches, a second version is published (a swap: the freshness histogram and the newest-event gauge
get their values), inference requests are answered, and two requests break the protocol (400s).

Then, as in ``test_observability.py`` for the learner: every query of the Serving row, with
``$serving_job`` → the job, ``$serving_instance`` → the server's ``host:port`` and
``$__rate_interval`` → ``30s``, answers ``status: success`` with at least one sample (a quantile
may be NaN); the ``serving_job`` / ``serving_instance`` variables list the server; every alert of the
group ``stream-learner-serving`` is accepted, its operands and selectors return data, the server's own
evaluation of each is ``ok``, and none is active on this healthy server. A few values are checked
too: the served version and LATEST's are the second version's, the lag between them 0, the second
400 is counted as a 4xx (the first created the series: ``rate()`` sees no rise at a series' first
sample).
"""

from __future__ import annotations

import time
from typing import Any

import yaml

from stream_learner.service.storage import LocalStore
from tests.support.prometheus import (
    ALERTS_FILE,
    PrometheusError,
    dashboard_exprs,
    is_number,
    load_dashboard,
    returns_data,
    top_level_operands,
    vector_selectors,
)
from tests.support.serving import TEXTS, Client, VersionSource, serving_settings, start_server, wait_for

JOB = "stream-learner-serving"  # the chart's ServiceMonitor's, and the alert group's name
RATE_INTERVAL = "30s"


def serving_rules() -> list[dict[str, Any]]:
    """The alerting rules of the group ``stream-learner-serving`` of alerts.yaml."""
    groups = yaml.safe_load(ALERTS_FILE.read_text())["groups"]
    (group,) = [g for g in groups if g["name"] == JOB]
    return [rule for rule in group["rules"] if "alert" in rule]


def serving_row_exprs(variables: dict[str, str]) -> list[tuple[str, str]]:
    """``(panel title, expr)`` of every dashboard query on the server's variables, substituted."""
    dashboard = load_dashboard()
    raw, substituted = dashboard_exprs(dashboard), dashboard_exprs(dashboard, variables)
    return [sub for (_, expr), sub in zip(raw, substituted, strict=True) if "$serving_" in expr]


def test_serving_row_and_alert_queries_on_a_real_server(tmp_path, prometheus_server) -> None:
    t0 = time.monotonic()
    store = tmp_path / "store"
    source = VersionSource(LocalStore(store))
    source.publish()
    server = start_server(serving_settings(store.as_uri()))
    try:
        wait_for(lambda: server.ready, timeout=60)
        instance = f"127.0.0.1:{server.port}"
        prom = prometheus_server([instance], job=JOB, rule_files=[ALERTS_FILE])
        sel = f'{{job="{JOB}", instance="{instance}"}}'
        prom.wait_for(f"stream_learner_serving_version{sel} == 1", timeout_s=60)

        # while Prometheus watches: a new version swapped in, requests answered, requests refused as 400s
        client = Client(server.port)
        assert client.infer([""])[0] == 400  # an empty text: the protocol's error, a 4xx
        newest = source.publish()
        wait_for(lambda: server.metrics.value("stream_learner_serving_version") == newest)
        for texts in (TEXTS, TEXTS[:1], TEXTS[1:3]):
            status, body = client.infer(texts)
            assert status == 200 and body["model_version"] == str(newest), body
        # the first 400 created its series at 1, and rate() counts no rise from a series' first sample:
        # the panel shows the errors that follow, once Prometheus has seen the series (2 samples)
        infer = f'endpoint="infer", job="{JOB}", instance="{instance}"'
        for code in ("200", "400"):
            counted = f'count_over_time(stream_learner_serving_requests_total{{{infer}, code="{code}"}}[1m])'
            prom.wait_for(f"{counted} >= 2")
        assert client.infer([""])[0] == 400
        prom.wait_for(f'stream_learner_serving_requests_total{{{infer}, code="400"}} == 2', timeout_s=30)
        prom.wait_for(f"stream_learner_serving_version{sel} == {newest}", timeout_s=30)
        prom.wait_for(f"stream_learner_serving_freshness_seconds_count{sel} > 0", timeout_s=30)

        failures: list[str] = []

        # ---- the dashboard's Serving row: every query returns data for this server
        variables = {"serving_job": JOB, "serving_instance": instance, "__rate_interval": RATE_INTERVAL}
        exprs = serving_row_exprs(variables)
        assert len(exprs) >= 20
        for title, expr in exprs:
            assert "$" not in expr, f"unsubstituted variable in panel {title!r}: {expr}"
            if problem := returns_data(prom, expr):
                failures.append(f"dashboard panel {title!r}: {expr}\n    {problem}")
        serving_variables = [
            v
            for v in load_dashboard()["templating"]["list"]
            if v["name"] in ("serving_job", "serving_instance")
        ]
        assert len(serving_variables) == 2
        for var in serving_variables:
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            match, label = query.removeprefix("label_values(").removesuffix(")").rsplit(",", 1)
            got = prom.api(f"label/{label.strip()}/values", **{"match[]": match.replace("$serving_job", JOB)})
            if variables[var["name"]] not in got["data"]:
                failures.append(f"dashboard variable {var['name']}: {query} lists {got['data']}")

        # ---- the serving alerts: accepted; their operands and selectors return data
        rules = serving_rules()
        assert len(rules) >= 3
        for rule in rules:
            name, expr = rule["alert"], rule["expr"]
            try:
                prom.query(expr)
            except PrometheusError as err:
                failures.append(f"alert {name}: rejected: {err}")
                continue
            operands = top_level_operands(expr)
            parts = [o for o in operands if len(operands) > 1 and not is_number(o)] + vector_selectors(expr)
            for part in dict.fromkeys(parts):
                if problem := returns_data(prom, part):
                    failures.append(f"alert {name}: part {part!r}\n    {problem}")
        assert not failures, "\n".join(failures)

        # ---- what the panels show is what happened
        def value(expr: str) -> float:
            (sample,) = prom.query(expr)
            return float(sample["value"][1])

        serving = 'job="stream-learner-serving", instance=~".*"'
        assert value(f"max by (job) (stream_learner_serving_latest_version{{{serving}}})") == newest
        lag = f"stream_learner_serving_latest_version{sel} - stream_learner_serving_version{sel}"
        assert value(lag) == 0
        four_xx = [e for t, e in exprs if t == "Inference requests and errors" and '"4.."' in e]
        assert len(four_xx) == 1 and value(four_xx[0]) > 0
        assert value(f"time() - stream_learner_serving_newest_event_timestamp_seconds{sel}") > 0

        # ---- the server's own evaluation of the rule file: the serving rules run, none is active
        names = {r["alert"] for r in rules}
        deadline = time.monotonic() + 20
        while True:
            groups = prom.api("rules")["data"]["groups"]
            evaluated = {r["name"]: r for g in groups for r in g["rules"] if r["name"] in names}
            if all(r["health"] != "unknown" for r in evaluated.values()) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert set(evaluated) == names
        errors = {n: r.get("lastError") for n, r in evaluated.items() if r["health"] != "ok"}
        assert not errors, f"rules that fail to evaluate: {errors}"
        # an evaluation made during the swap (LATEST ahead of the served version for a second) leaves
        # BehindLatest pending until the next one: wait a few evaluations for a healthy server's state
        deadline = time.monotonic() + 15
        while True:
            active = {a["labels"]["alertname"] for a in prom.api("alerts")["data"]["alerts"]}
            if not active & names or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert not active & names, active
    finally:
        server.stop()
    assert server.error is None
    print(f"serving observability test: {time.monotonic() - t0:.1f}s")
