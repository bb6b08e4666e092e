"""report.html as a person sees it: a quick ``eval`` run on the tiny model writes it, and headless Chromium
(Debian's, through Selenium: tests/support/browser.py) opens it from disk. It must load on its own (no
request leaves the page), show every plot decoded, rank every strategy, and log no error.

Without Chromium this fails, it does not skip: scripts/setup.sh installs it (CI runs it). With
``SL_REPORT_SCREENSHOT=/some/file.png`` the test also saves a full-page screenshot of the report there.
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from stream_learner.tools import evaluation as ev
from stream_learner.tools import evaluation_report as report
from tests.support import browser as chromium
from tests.support.tiny_model import tiny_model_dir

SCENARIO = "covariate"
STRATEGIES = ("default", "naive", "offline")
PLOTS = {"heldout", "prequential", "drift", "label_mix"}  # per scenario
SCREENSHOT_ENV = "SL_REPORT_SCREENSHOT"

IMAGES = """return Array.from(document.images).map(i => ({
    plot: i.dataset.plot, scenario: i.dataset.scenario, alt: i.alt, complete: i.complete,
    width: i.naturalWidth, inline: i.src.startsWith('data:image/png;base64,')}))"""
RANKING = """return Array.from(document.querySelectorAll('#ranking-table tbody tr')).map(r => ({
    strategy: r.dataset.strategy, cls: r.className, text: r.innerText}))"""


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[dict[str, Any], Path]:
    out = tmp_path_factory.mktemp("eval")
    cfg = ev.EvalConfig.quick(
        scenarios=(SCENARIO,),
        strategies=STRATEGIES,
        layers=None,
        settings={"model": {"name_or_path": tiny_model_dir()}},
    )
    return ev.run_benchmark(cfg, out, progress=False), out


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    reason = chromium.missing()
    if reason:
        pytest.fail(reason, pytrace=False)
    with chromium.chromium() as driver:
        yield driver


def test_the_report_opens_in_headless_chromium_with_every_plot_and_no_error(run, browser):
    results, out = run
    assert "report.html" in results["reports"]
    page = out / "report.html"
    html = page.read_text(encoding="utf-8")
    # self-contained: no script, no stylesheet or image fetched from anywhere
    assert "<script" not in html and "<link" not in html
    assert not re.search(r"""(src|href)=["']?(https?:|//)""", html)

    browser.get(page.as_uri())
    assert browser.execute_script("return document.readyState") == "complete"
    assert browser.title == f"stream-learner eval: {SCENARIO}, {results['created_at']}"
    assert browser.execute_script("return performance.getEntriesByType('resource').length") == 0

    images = browser.execute_script(IMAGES)
    assert sorted((i["plot"], i["scenario"]) for i in images) == sorted((p, SCENARIO) for p in PLOTS)
    for image in images:
        assert image["inline"] and image["complete"] and image["width"] > 0, image
        assert SCENARIO in image["alt"], image

    ranked = browser.execute_script(RANKING)
    assert [r["strategy"] for r in ranked] == [r["strategy"] for r in report.ranking(results, SCENARIO)]
    assert sorted(r["strategy"] for r in ranked) == sorted(STRATEGIES)
    bound = next(r for r in ranked if r["strategy"] == "offline")
    assert bound["cls"] == "bound" and "not deployable" in bound["text"]
    best = next(r for r in ranked if r["strategy"] != "offline")
    assert best["cls"] == "recommended"
    recommended = browser.find_element("id", "recommended").text
    assert best["strategy"] in recommended and "recommended.yaml" in recommended

    # the input: a row per source read, and the tokens per event
    sources = [name for name, info in results["input"].items() if "rows" in info]
    assert len(browser.find_elements("css selector", "#input-table tbody tr")) == len(sources) > 0
    assert "Tokens per event" in browser.find_element("id", "input").text

    assert chromium.console_errors(browser) == []
    if os.environ.get(SCREENSHOT_ENV):
        chromium.screenshot(browser, Path(os.environ[SCREENSHOT_ENV]))


def test_the_browser_check_sees_a_broken_page(browser, tmp_path):
    """The checks above are not vacuous: a broken image, a console error and an uncaught exception are
    each seen."""
    page = tmp_path / "broken.html"
    page.write_text(
        "<!DOCTYPE html><title>broken</title><img class='plot' src='data:image/png;base64,AAAA'>"
        "<script>console.error('boom'); undefinedFunction();</script>"
    )
    browser.get(page.as_uri())
    (image,) = browser.execute_script(IMAGES)
    assert image["width"] == 0
    errors = " ".join(e["message"] for e in chromium.console_errors(browser))
    assert "boom" in errors and "undefinedFunction" in errors


def test_the_report_says_when_inputs_are_cut_and_runs_did_not_fit(run, tmp_path):
    results, _ = run
    changed = copy.deepcopy(results)
    changed["tokens"]["truncated_share"] = 0.31
    changed["not_run"] = [
        {"scenario": SCENARIO, "strategy": "naive", "seed": 1, "reason": "30 min budget spent"}
    ]
    html = (tmp_path / report.write_html(changed, tmp_path)).read_text(encoding="utf-8")
    limit = results["tokens"]["max_length"]
    warning = html.split("id='truncation-warning'>", 1)[1].split("</p>", 1)[0]
    assert "31% of the events are longer than" in warning
    assert f"--sweep model.max_length={2 * limit},{4 * limit}" in warning
    assert "naive, seed 1: 30 min budget spent" in html.split(f"id='not-run-{SCENARIO}'", 1)[1]
    # and none of it when nothing is cut and every run ran
    assert "truncation-warning" not in (tmp_path / report.write_html(results, tmp_path)).read_text()


def test_a_results_json_of_format_1_is_reported_again(run, tmp_path):
    """docs/quality/results.json is of format 1 (segments were domains): its report is docs/quality.md's
    screenshot."""
    results, _ = run
    old = copy.deepcopy(results)
    old["format"], old["domains"] = 1, old.pop("segments")
    for key in ("segments_from", "input", "tokens"):
        del old[key]
    for r in old["runs"]:
        r["prequential"]["domain"] = r["prequential"].pop("segment")
    new = report.upgraded(old)
    assert new["segments"] == results["segments"] and "domains" not in new
    assert [r["prequential"]["segment"] for r in new["runs"]] == [
        r["prequential"]["segment"] for r in results["runs"]
    ]
    assert "domain" in old["runs"][0]["prequential"]  # a copy: what was read is left as it was
    html = (tmp_path / report.write_html(new, tmp_path)).read_text(encoding="utf-8")
    assert html.count('class="plot"') == len(PLOTS) and "id='input'" not in html
    assert report.upgraded(results) == results
