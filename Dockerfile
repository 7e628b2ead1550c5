# syntax=docker/dockerfile:1
#
# Two images from one file (see deploy/README.md):
#
#   docker build --target trainer -t mqsa-trainer:0.1.0 .   # torch + the `train` extra; entrypoint `mqsa`
#   docker build -t mqsa-service:0.1.0 .                    # the default (last) stage: the HTTP service
#
# The service image holds only the `serve` extra (no torch: the service never imports it).
# It reads every setting from MQSA_* variables (service/settings.py) and serves the bundle
# mounted at /bundle:
#
#   docker run -p 8000:8000 -v "$PWD/bundle:/bundle:ro" \
#       -e MQSA_REDIS_URL=redis://host:6379/0 -e WORKERS=1 mqsa-service:0.1.0

ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# One unprivileged user for both images; the Kubernetes manifests run as this uid.
RUN groupadd --system --gid 10001 mqsa \
    && useradd --system --uid 10001 --gid 10001 --home-dir /tmp --no-create-home \
       --shell /usr/sbin/nologin mqsa
WORKDIR /src
COPY pyproject.toml README.md ./
COPY mqsa ./mqsa
COPY models ./models
COPY training ./training
COPY service ./service


# ---------------------------------------------------------------------------
# trainer: the install steps are the ones CI runs (Makefile `setup`):
#   pip install torch==2.13.0, then the project's extras.
# CI's machines take torch 2.13.0 (CPU) from a local wheel. On a machine without that
# wheel, PyPI's torch==2.13.0 is the CUDA build (several GB); for the CPU build pass the
# CPU wheel index, e.g.
#   docker build --target trainer \
#       --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu -t mqsa-trainer .
# TORCH_INDEX_URL is empty by default so the default build runs exactly CI's steps.
# The `serve` extra is installed too (as CI does) because the nightly job runs
# `mqsa data export-events`, which reads the event stream from Redis.
FROM base AS trainer
ARG TORCH_INDEX_URL=""
RUN python -m venv /opt/venv
ENV PATH="/opt/venv/bin:${PATH}" \
    HOME=/tmp \
    MPLCONFIGDIR=/tmp/matplotlib
# DL3013 (pin pip versions): the project is a local path; its dependencies are the ranges in
# pyproject.toml, resolved as CI resolves them (the project keeps no lock file).
# hadolint ignore=DL3013
RUN pip install torch==2.13.0 --no-cache-dir ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} \
    && pip install --no-cache-dir ".[train,serve]" \
    && rm -rf /src/build
WORKDIR /work
USER 10001:10001
ENTRYPOINT ["mqsa"]
CMD ["--help"]


# ---------------------------------------------------------------------------
# service-builder: a virtual environment with the project and only the `serve` extra.
FROM base AS service-builder
RUN python -m venv /opt/venv
ENV PATH="/opt/venv/bin:${PATH}"
# DL3013: as in the trainer stage, the versions are pyproject.toml's ranges, as CI installs them.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".[serve]" \
    && rm -rf /src/build


# ---------------------------------------------------------------------------
# service (default target): the venv (the project's packages are installed in it,
# non-editable), no compilers, no torch, non-root.
FROM ${PYTHON_IMAGE} AS service
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH="/opt/venv/bin:${PATH}" \
    HOME=/tmp \
    MQSA_BUNDLE_DIR=/bundle \
    MQSA_ONNX_THREADS=1 \
    MQSA_FAISS_THREADS=1 \
    OMP_NUM_THREADS=1 \
    WORKERS=1
RUN groupadd --system --gid 10001 mqsa \
    && useradd --system --uid 10001 --gid 10001 --home-dir /tmp --no-create-home \
       --shell /usr/sbin/nologin mqsa \
    && mkdir -p /bundle
COPY --from=service-builder /opt/venv /opt/venv
# The bundle (written by `mqsa export`) is mounted here, read-only; MQSA_BUNDLE_DIR points at it.
WORKDIR /app
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; r = urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=3); sys.exit(0 if r.status == 200 else 1)"]
# Threads per worker come from MQSA_ONNX_THREADS / MQSA_FAISS_THREADS, worker processes from
# WORKERS; keep WORKERS x threads within the CPUs the container may use.
CMD ["sh", "-c", "exec mqsa serve --bundle \"$MQSA_BUNDLE_DIR\" --host 0.0.0.0 --port 8000 --workers \"${WORKERS:-1}\""]
