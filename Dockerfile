# stream-learner image. Build (CPU):   docker build -t stream-learner .
#                      Build (CUDA):  docker build --build-arg BASE=nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04 \
#                                       --build-arg TORCH_SPEC="torch>=2.4,<3" -t stream-learner:cuda .
# The install step is scripts/setup.sh, the same script the README's commands and CI run.
ARG BASE=python:3.11-slim-bookworm

FROM ${BASE} AS build
ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1
RUN if ! command -v python3 >/dev/null; then \
      apt-get update && apt-get install -y --no-install-recommends python3 python3-venv && rm -rf /var/lib/apt/lists/*; \
    fi
WORKDIR /app
COPY pyproject.toml README.md NOTICE ./
COPY scripts ./scripts
COPY stream_learner ./stream_learner
# runtime extras only: no test servers in the image
RUN VENV=/opt/venv EXTRAS=runtime TORCH_SPEC="${TORCH_SPEC}" TORCH_INDEX_URL="${TORCH_INDEX_URL}" ./scripts/setup.sh \
 && /opt/venv/bin/pip uninstall -y pip

FROM ${BASE} AS runtime
RUN if ! command -v python3 >/dev/null; then \
      apt-get update && apt-get install -y --no-install-recommends python3 && rm -rf /var/lib/apt/lists/*; \
    fi \
 && useradd --uid 10001 --create-home --shell /usr/sbin/nologin learner
COPY --from=build /opt/venv /opt/venv
COPY --from=build /app /app
ENV PATH=/opt/venv/bin:$PATH \
    HF_HUB_OFFLINE=1 \
    HF_HOME=/tmp/hf \
    PYTHONUNBUFFERED=1
USER 10001
WORKDIR /app
EXPOSE 9108
ENTRYPOINT ["stream-learner"]
CMD ["run"]
