"""The import contracts of pyproject.toml ([tool.importlinter]; docs/architecture.md, "Rules"), checked by
`lint-imports` (also run by `make test` and `make lint`): the layers core ← training ← service ← tools
← cli, and no import cycle between the modules of a layer.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def lint_imports(cwd: Path, pythonpath: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ}
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    return subprocess.run(
        [str(LINT_IMPORTS), str(ROOT / "pyproject.toml"), "--no-cache", "--no-logo"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def broken_imports(output: str) -> set[str]:
    """The imports a failing run names: `- a -> b (l.N)` and a cycle's `- .a -> .b (N import)`."""
    return {m[1] for m in re.finditer(r"^- (\S+ -> \S+)", output, flags=re.M)}


def test_the_package_keeps_its_import_contracts() -> None:
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Contracts: 2 kept, 0 broken." in result.stdout


def test_a_violation_fails(tmp_path: Path) -> None:
    """The same contracts on a copy of the package with a core module importing the service and a cycle
    between two service modules: lint-imports fails and names both."""
    package = tmp_path / "stream_learner"
    shutil.copytree(ROOT / "stream_learner", package, ignore=shutil.ignore_patterns("__pycache__", "data"))
    (package / "core" / "leak.py").write_text("from stream_learner.service import metrics  # noqa\n")
    (package / "service" / "cycle_a.py").write_text("from stream_learner.service import cycle_b  # noqa\n")
    (package / "service" / "cycle_b.py").write_text("from stream_learner.service import cycle_a  # noqa\n")

    result = lint_imports(tmp_path, pythonpath=tmp_path)
    assert result.returncode != 0
    assert "Analyzed" in result.stdout, result.stdout + result.stderr
    named = broken_imports(result.stdout)
    assert "stream_learner.core.leak -> stream_learner.service.metrics" in named, result.stdout
    assert "stream_learner.core is not allowed to import stream_learner.service" in result.stdout
    assert "No cycles are allowed in stream_learner.service." in result.stdout
    assert named & {".cycle_a -> .cycle_b", ".cycle_b -> .cycle_a"}, result.stdout
