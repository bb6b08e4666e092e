"""Docs that match the code."""

from pathlib import Path

from stream_learner.core.config import settings_table

ROOT = Path(__file__).resolve().parents[2]


def test_readme_settings_table_is_generated_from_settings():
    readme = (ROOT / "README.md").read_text()
    body = readme.split("<!-- settings-table:start -->\n", 1)[1].split("<!-- settings-table:end -->", 1)[0]
    assert body.strip() == settings_table().strip(), (
        "run: python -m stream_learner.core.config, paste into README"
    )


def test_ci_runs_the_readme_test_command():
    assert "make test" in (ROOT / "README.md").read_text()
    assert "make test" in (ROOT / ".ci" / "run").read_text()
