"""The demo's code path, small: its own local broker, the tiny model (tests/support/tiny_model.py),
versions in a temp dir."""

from rich.console import Console

from stream_learner.tools.datasets import malformed_events
from stream_learner.tools.demo import run_demo
from tests.support.factories import small_settings


def test_demo_runs_to_its_summary_with_loadable_versions(tmp_path):
    s = small_settings(publish={"storage_url": tmp_path.as_uri(), "every_steps": 5})
    console = Console(record=True, width=200)
    summary = run_demo(s, per_domain=12, console=console)
    out = console.export_text()
    assert summary["events_trained"] == 48
    assert sum(summary["dead_lettered"].values()) == len(malformed_events(s.events.max_text_bytes))
    assert len(summary["versions"]) >= 2
    assert 0.0 <= summary["prequential_accuracy_run"] <= 1.0
    assert summary["newest_version_path"].endswith(f"versions/{summary['versions'][-1]:06d}")
    assert "from transformers import pipeline" in out and "classify(" in out
