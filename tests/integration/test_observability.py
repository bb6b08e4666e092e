"""A real Prometheus scraping a real learner on the real broker runs every dashboard and alert query.

Issue 7, acceptance 2. One learner (the tiny model of tests/support/tiny_model.py, publishing every 4 steps
to a temporary directory) serves /metrics on a free port; a Prometheus server (Debian's binary) scrapes it
every second as job ``stream-learner`` and loads ``alerts.yaml``, evaluated every second. After the
first scrape, valid events and one malformed event of every kind are produced, so that counters move
while Prometheus watches and every dead-letter reason has a series. Once Prometheus has scraped the
final state (every event consumed, a version published), the queries run as instant queries.

What "accepted and returns data" means here:

* **dashboard**: each panel query, with ``$job`` → ``stream-learner``, ``$instance`` → the learner's
  ``host:port`` and ``$__rate_interval`` → ``30s``, answers ``status: success`` with at least one
  sample (a value may be NaN, e.g. a latency quantile over a window without observations). The
  ``job`` and ``instance`` variables' ``label_values()`` queries list the learner. The Serving row
  (``$serving_job``, ``$serving_instance``) and the alert group ``stream-learner-serving`` read the
  inference server's metrics, another process: ``test_serving_observability.py`` runs them.
* **alerts**: a healthy learner must not fire them, so an alert expression is usually empty. For each
  one: (1) the full expression answers ``status: success``; (2) every operand of its top-level
  comparisons and ``and``/``or``/``unless`` that is not a number (``rate(a) / rate(b)`` of
  ``rate(a) / rate(b) > 0.05``; an expression without such an operator, like ``absent(x)``, has
  none) returns at least one sample; (3) every vector selector it reads
  (``name{matchers}``, range and offset dropped) returns at least one sample; (4) the server that
  loaded the rule file has evaluated every rule with health ``ok``. And one alert is seen to work on
  real data: the malformed events make up more than 5 % of those consumed, so
  ``StreamLearnerDeadLetterRateHigh`` must become active (pending: it has ``for: 10m``).
* **averages from the counters** (issue 18): Prometheus holds the learner's final
  ``examples_trained_total`` and ``step_seconds_sum``, and the trainer's speed while busy computed
  with ``rate()`` of the two over a window spanning the run is the learner's own examples / step seconds.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import pytest
import yaml

from stream_learner.core.events import Reason, encode_event
from stream_learner.service.app import Learner
from stream_learner.service.producer import produce_lines
from stream_learner.tools.datasets import malformed_events
from tests.support.factories import small_settings, tiny_rows
from tests.support.prometheus import (
    ALERTS_FILE,
    PrometheusError,
    alert_rules,
    dashboard_exprs,
    is_number,
    load_dashboard,
    returns_data,
    top_level_operands,
    vector_selectors,
)

JOB = "stream-learner"
RATE_INTERVAL = "30s"
PARTITIONS = 2
VALID = 48


def handled(learner: Learner) -> float:
    m = learner.metrics
    dead = sum(m.value("stream_learner_events_dead_lettered_total", {"reason": r.value}) for r in Reason)
    return m.value("stream_learner_events_trained_total") + dead


def learner_rules() -> list[dict[str, Any]]:
    """The alerting rules of the group ``stream-learner`` (the other group reads a server's metrics)."""
    (group,) = [g for g in yaml.safe_load(ALERTS_FILE.read_text())["groups"] if g["name"] == JOB]
    return [rule for rule in group["rules"] if "alert" in rule]


def test_dashboard_and_alert_queries_on_a_real_learner(
    kafka_bootstrap, unique_topic, tmp_path, prometheus_server
) -> None:
    t0 = time.monotonic()
    topic = unique_topic("observability")
    s = small_settings(
        kafka={
            "bootstrap_servers": kafka_bootstrap,
            "topic": topic,
            "group_id": f"{topic}-group",
            "session_timeout_ms": 6000,
            "topic_partitions": PARTITIONS,
            "poll_max_messages": 50,
        },
        publish={"storage_url": (tmp_path / "store").as_uri(), "every_steps": 4, "every_seconds": 3600},
        http={"enabled": True, "host": "127.0.0.1", "port": 0},
    )
    bad = malformed_events(s.events.max_text_bytes)
    learner = Learner(s).start()
    try:
        instance = f"127.0.0.1:{learner.http_port}"
        prom = prometheus_server([instance], job=JOB, rule_files=[ALERTS_FILE])
        sel = f'{{job="{JOB}", instance="{instance}"}}'
        # produce only after the first scrape: Prometheus then sees the counters rise from 0
        prom.wait_for(f"stream_learner_events_consumed_total{sel}", timeout_s=60)
        rows = tiny_rows(VALID)
        values = [encode_event(r["text"], r["label"], id=r["id"]) for r in rows] + [v for _, v in bad]
        for p in range(PARTITIONS):
            produce_lines(s.kafka.librdkafka(), topic, values[p::PARTITIONS], partition=p)
        total = len(values)
        assert learner.wait_until(
            lambda: handled(learner) >= total and learner.metrics.value("stream_learner_latest_version") >= 1,
            timeout=180,
        )
        # Prometheus has the final state: everything consumed and dead-lettered, a version, lag series
        prom.wait_for(f"stream_learner_events_consumed_total{sel} == {total}", timeout_s=30)
        prom.wait_for(f"sum(stream_learner_events_dead_lettered_total{sel}) == {len(bad)}", timeout_s=30)
        prom.wait_for(f"stream_learner_latest_version{sel} >= 1", timeout_s=30)
        # lag series appear with the first consumed message: two samples each, for deriv() and rate()
        prom.wait_for(
            f"count_over_time(stream_learner_consumer_lag{sel}[1m]) >= 2",
            timeout_s=30,
            check=lambda r: len(r) == PARTITIONS,
        )
        by_reason = {
            r["metric"]["reason"]: float(r["value"][1])
            for r in prom.query(f"stream_learner_events_dead_lettered_total{sel}")
        }
        assert by_reason == {reason.value: float(Counter(r for r, _ in bad)[reason]) for reason in Reason}, (
            "Prometheus does not see the learner's dead letters by reason"
        )

        # ---- averages from the counters (issue 18): Prometheus has the learner's totals, and the
        # trainer's speed while busy from rate() of the counters is the learner's own examples / step time
        m = learner.metrics
        examples = m.value("stream_learner_examples_trained_total")
        step_time = m.value("stream_learner_step_seconds_sum")
        assert examples == m.value("stream_learner_events_trained_total") + m.value(
            "stream_learner_examples_replayed_total"
        )
        assert examples > 0 and step_time > 0
        prom.wait_for(f"stream_learner_examples_trained_total{sel} == {examples:g}", timeout_s=30)
        prom.wait_for(f"stream_learner_step_seconds_sum{sel} == {step_time!r}", timeout_s=30)
        # the window spans the run, which started from 0 at Prometheus' first scrape: rate() over it is
        # extrapolated alike for both counters (same scrapes), so the ratio is the run's exact average
        busy_seconds = f"rate(stream_learner_step_seconds_sum{sel}[1h])"
        (speed,) = prom.query(f"rate(stream_learner_examples_trained_total{sel}[1h]) / {busy_seconds}")
        assert float(speed["value"][1]) == pytest.approx(examples / step_time, rel=1e-3)
        (busy,) = prom.query(busy_seconds)
        assert 0 < float(busy["value"][1]) <= 1

        failures: list[str] = []

        # ---- the dashboard: every panel query returns data for this learner
        dashboard = load_dashboard()
        variables = {"job": JOB, "instance": instance, "__rate_interval": RATE_INTERVAL}
        # the Serving row reads the inference server's job: test_serving_observability.py
        exprs = [
            substituted
            for (_, raw), substituted in zip(
                dashboard_exprs(dashboard), dashboard_exprs(dashboard, variables), strict=True
            )
            if "$serving_" not in raw
        ]
        assert len(exprs) >= 40
        for title, expr in exprs:
            assert "$" not in expr, f"unsubstituted variable in panel {title!r}: {expr}"
            if problem := returns_data(prom, expr):
                failures.append(f"dashboard panel {title!r}: {expr}\n    {problem}")
        for var in dashboard["templating"]["list"]:
            if var["type"] != "query" or var["name"].startswith("serving_"):
                continue
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            match, label = query.removeprefix("label_values(").removesuffix(")").rsplit(",", 1)
            match = match.replace("$job", JOB)
            got = prom.api(f"label/{label.strip()}/values", **{"match[]": match})["data"]
            if variables[var["name"]] not in got:
                failures.append(f"dashboard variable {var['name']}: {query} lists {got}")

        # ---- the learner's alerts: accepted; their operands and selectors return data
        for rule in learner_rules():
            name, expr = rule["alert"], rule["expr"]
            try:
                prom.query(expr)
            except PrometheusError as err:
                failures.append(f"alert {name}: rejected: {err}")
                continue
            operands = top_level_operands(expr)  # [expr] itself when it has no such operator (absent())
            parts = [o for o in operands if len(operands) > 1 and not is_number(o)] + vector_selectors(expr)
            for part in dict.fromkeys(parts):
                if problem := returns_data(prom, part):
                    failures.append(f"alert {name}: part {part!r}\n    {problem}")

        assert not failures, "\n".join(failures)

        # ---- the server's own evaluation of the rule file: no rule errs, the dead-letter alert is active
        deadline = time.monotonic() + 20
        while True:
            groups = prom.api("rules")["data"]["groups"]
            rules = {r["name"]: r for g in groups for r in g["rules"]}
            active = {a["labels"]["alertname"]: a["state"] for a in prom.api("alerts")["data"]["alerts"]}
            evaluated = all(r["health"] != "unknown" for r in rules.values())
            if (evaluated and "StreamLearnerDeadLetterRateHigh" in active) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert set(rules) == {r["alert"] for r in alert_rules()}
        errors = {n: r.get("lastError") for n, r in rules.items() if r["health"] != "ok"}
        assert not errors, f"rules that fail to evaluate: {errors}"
        assert active.get("StreamLearnerDeadLetterRateHigh") == "pending", active
        # nothing is wrong with this learner: no critical alert fires (warning/info ones may react to
        # what 48 events do to a small model: drift, a candidate the poisoning gate rejects)
        critical = {r["alert"] for r in alert_rules() if r["labels"]["severity"] == "critical"}
        assert not {n for n, state in active.items() if state == "firing" and n in critical}, active
    finally:
        learner.stop()
    assert learner.error is None
    print(f"observability test: {time.monotonic() - t0:.1f}s")
