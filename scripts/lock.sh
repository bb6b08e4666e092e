#!/usr/bin/env bash
# Regenerate constraints.txt, the lock (`make lock`): in a fresh throwaway venv, torch first as
# scripts/setup.sh installs it (its TORCH_SPEC), then the package with every extra of pyproject.toml at
# the newest versions its ranges allow; the lock is that venv's `pip freeze`, the project itself left
# out; and scripts/learner-modules.txt, the files a learner imports at those versions (set-up
# byte-compiles them). Run `make test` on it (setup.sh installs the new lock into .venv) before
# committing both.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-$(sed -n 's/^TORCH_SPEC=\${TORCH_SPEC:-\(.*\)}$/\1/p' scripts/setup.sh)}
# every extra, so the lock pins whatever any install (dev, runtime, ...) can bring
EXTRAS=$(sed -n '/^\[project\.optional-dependencies\]/,/^\[/ s/^\([A-Za-z0-9_-]*\) *= *\[.*/\1/p' pyproject.toml | paste -sd, -)

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$PYTHON" -m venv "$work/venv"
PIP=("$work/venv/bin/python" -m pip --disable-pip-version-check -q)
echo "lock: installing $TORCH_SPEC, then stream-learner[$EXTRAS] at the newest versions allowed, in $work"
"${PIP[@]}" install "$TORCH_SPEC" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
"${PIP[@]}" install -e ".[$EXTRAS]"

{
  cat <<'HEADER'
# The lock: every package stream-learner installs, at the version its test suite passed with.
# Constraints, not requirements: scripts/setup.sh (so `make setup`, `make test`, CI and the Dockerfile)
# runs `pip install -c constraints.txt -e ".[EXTRAS]"`, which pins a package only if something asks
# for it, so one file covers the base dependencies and every extra while an install still gets only
# its own extras. pyproject.toml keeps the library's ranges. torch is pinned without its local label
# (+cpu, +cu128): setup.sh installs the build first, from its own index.
# Made by `make lock` (scripts/lock.sh: the newest versions pyproject.toml allows, in a fresh venv with
# every extra); run `make test` before committing a new one. Do not edit by hand.
HEADER
  # markers are resolved for this Python: a dependency that only another one needs is not pinned
  echo "# Resolved on Python $("$work/venv/bin/python" -c 'import platform; print(platform.python_version())'), $(uname -s) $(uname -m)."
  "$work/venv/bin/python" -m pip --disable-pip-version-check freeze --exclude-editable |
    grep -v -E '^(#|-e )' | sed -E 's/^(torch==[^+]+)\+.*$/\1/'
} >"$work/constraints.txt"
if [ -f constraints.txt ]; then
  diff -u constraints.txt "$work/constraints.txt" || true
fi
mv "$work/constraints.txt" constraints.txt
echo "lock: constraints.txt has $(grep -c '==' constraints.txt) pins"
# the files a learner imports at these versions: what scripts/setup.sh byte-compiles on every core
HF_HUB_OFFLINE=1 "$work/venv/bin/python" scripts/bytecode.py record scripts/learner-modules.txt
