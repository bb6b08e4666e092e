"""The lock, constraints.txt: well-formed, covering every dependency, and what is installed.

scripts/setup.sh installs every package at the lock's version (`pip install -c constraints.txt`), so
in a venv it made, each installed dependency of stream-learner is in the lock at that version: a
package at another version, or one missing from the lock, fails here. `make setup` brings a venv back
to the lock; `make lock` makes a new lock (see its header).
"""

from __future__ import annotations

import importlib.metadata as md
import re
import sys
import sysconfig
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

if sys.version_info >= (3, 11):
    import tomllib
else:  # pytest depends on tomli before 3.11
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
LOCK = ROOT / "constraints.txt"
PROJECT = "stream-learner"
# what pip freeze leaves out (the installers themselves), so the lock does too
UNLOCKED = {"pip", "setuptools", "wheel", "distribute"}


def read_lock(text: str) -> dict[str, str]:
    """The pins of a lock, by canonical name: ``name==version`` lines, comments and blank lines skipped."""
    pins: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)", line)
        assert m, f"not an exact pin: {line!r}"
        name = canonicalize_name(m[1])
        assert name not in pins, f"{name} pinned twice"
        pins[name] = m[2]
    return pins


def same_version(installed: str, locked: str) -> bool:
    """Equal as pip's ``==`` has it: a local label (torch's +cpu) counts only if the lock names one."""
    got, want = Version(installed), Version(locked)
    return got == want if want.local else got.public == want.public


def mismatches(lock: dict[str, str], installed: dict[str, str], needed: set[str]) -> list[str]:
    """What differs between a venv (``installed``: canonical name → version) and the lock: a locked
    package installed at another version, or a package the project needs (``needed``) not locked."""
    problems = [
        f"{name}: installed {version}, locked {lock[name]}"
        for name, version in sorted(installed.items())
        if name in lock and not same_version(version, lock[name])
    ]
    problems += [
        f"{name}: installed {installed[name]}, not in the lock" for name in sorted(needed - set(lock))
    ]
    return problems


def installed_versions(paths: list[str] | None = None) -> dict[str, str]:
    """What pip installed into this venv, by canonical name: the distributions in its site-packages
    only. Not all of ``sys.path``: setuptools (>= 71), once anything imports it, appends its own
    ``_vendor`` folder, whose bundled copies (packaging, among others) would shadow the venv's."""
    if paths is None:
        paths = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    found: dict[str, str] = {}
    for d in md.distributions(path=paths):
        found.setdefault(canonicalize_name(d.metadata["Name"]), d.version)  # the first, as import has it
    return found


def needed_by_project(installed: dict[str, str]) -> set[str]:
    """The installed distributions stream-learner brings (its dependencies and those of the extras
    installed here, and theirs, down the tree), but for what only some Pythons or platforms need."""
    requires = md.requires(PROJECT) or []
    extras = md.metadata(PROJECT).get_all("Provides-Extra") or []
    # an extra counts as installed when all of its requirements are (setup.sh's EXTRAS)
    installed_extras = {
        e
        for e in extras
        if all(
            canonicalize_name(Requirement(r).name) in installed
            for r in requires
            if Requirement(r).marker and Requirement(r).marker.evaluate({"extra": e})
        )
    }
    needed: set[str] = set()
    todo = [(PROJECT, installed_extras)]
    while todo:
        name, wanted = todo.pop()
        for spec in md.requires(name) or []:
            r = Requirement(spec)
            if r.marker:
                if not any(r.marker.evaluate({"extra": e}) for e in wanted or {""}):
                    continue
                if re.search(r"python|platform|implementation|os_name", str(r.marker)):
                    continue  # locked for CI's Python and platform only
            dep = canonicalize_name(r.name)
            if dep in UNLOCKED or dep not in installed:
                continue
            if dep not in needed:
                needed.add(dep)
                todo.append((dep, set(r.extras)))
            elif r.extras:
                todo.append((dep, set(r.extras)))
    return needed


def test_the_lock_pins_exact_versions_and_not_the_project() -> None:
    lock = read_lock(LOCK.read_text())
    assert len(lock) > 50
    assert canonicalize_name(PROJECT) not in lock
    # torch without a local label: the CPU build here, a CUDA build in the image's cuda variant
    assert lock["torch"] == "2.13.0"
    assert not [f"{n}=={v}" for n, v in lock.items() if Version(v).local]


def test_the_lock_covers_every_dependency_and_extra_within_its_range() -> None:
    lock = read_lock(LOCK.read_text())
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        declared += extra
    for spec in declared:
        r = Requirement(spec)
        name = canonicalize_name(r.name)
        assert name in lock, f"{r.name} is not in the lock: run `make lock`"
        assert r.specifier.contains(lock[name], prereleases=True), (
            f"{name}=={lock[name]} is outside pyproject.toml's {spec!r}: run `make lock`"
        )


def test_installed_versions_are_the_locked_ones() -> None:
    lock = read_lock(LOCK.read_text())
    installed = installed_versions()
    needed = needed_by_project(installed)
    # the runtime dependencies at least, and those of the dev extra the tests run with
    assert {"transformers", "torch", "numpy", "pytest"} <= needed
    problems = mismatches(lock, installed, needed)
    assert not problems, "this venv is not the lock (`make setup` installs it):\n" + "\n".join(problems)


def test_mismatches_finds_a_version_other_than_the_locked_one() -> None:
    lock = read_lock("# a comment\n\ntorch==2.13.0\ntransformers==5.24.0\nNumPy==2.4.6\n")
    assert lock == {"torch": "2.13.0", "transformers": "5.24.0", "numpy": "2.4.6"}
    same = {"torch": "2.13.0+cpu", "transformers": "5.24.0", "numpy": "2.4.6", "ipython": "9.0"}
    assert mismatches(lock, same, {"torch", "transformers", "numpy"}) == []
    newer = {**same, "transformers": "5.25.0", "torch": "2.13.1+cpu"}
    assert mismatches(lock, newer, {"torch", "transformers"}) == [
        "torch: installed 2.13.1+cpu, locked 2.13.0",
        "transformers: installed 5.25.0, locked 5.24.0",
    ]
    # a dependency the lock forgot: its version would be whatever was newest at install time
    assert mismatches(lock, same, {"numpy", "ipython"}) == ["ipython: installed 9.0, not in the lock"]
    # a local label in the lock must match exactly
    assert not same_version("2.13.0+cu128", "2.13.0+cpu") and same_version("2.13.0+cpu", "2.13.0")


def test_a_vendored_copy_on_sys_path_does_not_shadow_the_venv(tmp_path, monkeypatch) -> None:
    """CI failed so: a test had imported setuptools, whose ``_vendor`` folder (on ``sys.path`` from
    then on) holds packaging 26.3, and the lock check read that instead of the venv's 26.4."""
    vendored = tmp_path / "packaging-0.0.1.dist-info"
    vendored.mkdir()
    (vendored / "METADATA").write_text("Metadata-Version: 2.1\nName: packaging\nVersion: 0.0.1\n")
    monkeypatch.setattr(sys, "path", [*sys.path, str(tmp_path)])
    # sys.path as a whole does see the copy ...
    assert "0.0.1" in {d.version for d in md.distributions() if d.metadata["Name"] == "packaging"}
    # ... the venv's own packages do not
    assert installed_versions()["packaging"] == md.version("packaging") != "0.0.1"


LEARNER_MODULES = ROOT / "scripts" / "learner-modules.txt"


def test_the_learner_modules_list_names_files_of_this_venv() -> None:
    """scripts/learner-modules.txt, what set-up byte-compiles (scripts/bytecode.py): made with the lock,
    so in a venv at the lock's versions every file it names exists. A new lock without a new list fails
    here (`make lock` makes both); a stale list would only cost set-up time, never correctness."""
    lines = [line for line in LEARNER_MODULES.read_text().splitlines() if not line.startswith("#")]
    assert lines == sorted(set(lines)) and len(lines) > 1000  # sorted, no repeats, torch and the rest
    site = Path(sysconfig.get_paths()["purelib"])
    assert all(not Path(line).is_absolute() and line.endswith(".py") for line in lines)
    missing = [line for line in lines if not (site / line).is_file()]
    assert not missing, f"{len(missing)} listed files are not in this venv (run `make lock`): {missing[:5]}"
    assert any(line.startswith("torch/") for line in lines) and any(
        line.startswith("transformers/") for line in lines
    )
