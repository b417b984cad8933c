# Three images from one file, one build target each (docker-compose.yml picks them; docs/deploy.md):
#   api     `qaas api`, and the operator's `qaas migrate` and `qaas keys`: `.[server]`, no torch, no compiler.
#   flower  Celery's monitoring UI (the compose profile `flower`): the api's packages plus flower.
#   worker  `qaas worker`: `.[worker]` with the CPU build of torch, and the C/C++ compiler AOTInductor calls.
# `docker build .` without --target builds the worker, the last stage: it can run every role.
#
# Stages are ordered so that the classic builder (which builds every stage up to the target) never builds
# torch for the api. All three run as uid 10001 under tini, with the data directory at /data.
#
# Base: python:3.11-slim-bookworm, the Debian release of the postgres and redis images in docker-compose.yml.
# The tag follows Python's 3.11 patch releases; pin the patch and digest
# (python:3.11.N-slim-bookworm@sha256:...) once someone reads them from the registry: nobody could here.

# --- base: the Python runtime, tini and the qaas user ----------------------------------------------------------
FROM python:3.11-slim-bookworm AS base

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

# tini as PID 1: it reaps the orphans of killed runners (a compiler whose runner died), which a Python PID 1
# would leave as zombies counting against the runner's process limit, and forwards SIGTERM to qaas.
# DL3008 (pin apt versions) is waived: the Debian release is fixed by the tag, and exact pins would break the
# build at every Debian security update.
# uid/gid 10001: outside the range distributions hand out, so it never matches a host account by accident.
# /data is created here, owned by that user, because Docker seeds a new named volume (qaas-data) with the
# ownership of the directory it is mounted over: without this the volume would be root-owned and unwritable.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 qaas \
    && useradd --system --uid 10001 --gid qaas --home-dir /srv/qaas --no-create-home \
        --shell /usr/sbin/nologin qaas \
    && mkdir -p /data /srv/qaas \
    && chown qaas:qaas /data /srv/qaas

# The virtualenv lives at /opt/venv in the build stages and the images alike: its scripts carry absolute
# shebangs (#!/opt/venv/bin/python).
ENV PATH=/opt/venv/bin:$PATH \
    QAAS_DATA_DIR=/data

WORKDIR /srv/qaas
ENTRYPOINT ["/usr/bin/tini", "--"]

# --- api-build: `.[server]` in /opt/venv -------------------------------------------------------------------
FROM base AS api-build

WORKDIR /build
RUN python -m venv /opt/venv

# 1) Dependencies first, from pyproject.toml alone, so that editing the code reinstalls nothing. With no
#    package in the context yet this installs every dependency (and an empty `qaas` that step 2 replaces).
#    An empty README.md stands in for the real one (setuptools reads it into the metadata), so that editing
#    the README does not reinstall the dependencies either.
#    DL3013 (pin pip versions) is waived: the versions are pyproject.toml's to state, not this file's.
COPY pyproject.toml ./
# hadolint ignore=DL3013
RUN touch README.md \
    && pip install --no-cache-dir ".[server]"

# 2) The code: only what setuptools ships, never the whole build context. The api image must not hold torch
#    (the API never imports it, and it is hundreds of MB): the build fails if anything pulled it in.
COPY README.md ./
COPY qaas ./qaas
COPY app ./app
COPY workers ./workers
RUN pip install --no-cache-dir --no-deps --force-reinstall . \
    && python -c "import importlib.util as u, sys; sys.exit('torch is in the api image' if u.find_spec('torch') else 0)"

# --- api ---------------------------------------------------------------------------------------------------
FROM base AS api

COPY --from=api-build /opt/venv /opt/venv
# Alembic's scripts for `qaas migrate`: outside the installed packages, found in the working directory.
COPY migrations ./migrations

USER 10001:10001
EXPOSE 8000

# Liveness (/healthz) for the image: an orchestrator that restarts unhealthy containers must not restart every
# API because the database is down. docker-compose.yml checks readiness (/readyz) instead, which restarts
# nothing. python, not curl: slim images have no curl.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; r = urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4); sys.exit(r.status != 200)"]

CMD ["qaas", "api", "--host", "0.0.0.0", "--port", "8000"]

# --- flower: Celery's monitoring UI ------------------------------------------------------------------------
# The api's packages (the same celery as the workers) plus flower, pinned here because pyproject.toml has no
# extra for it. It needs no qaas code: only the broker URL (CELERY_BROKER_URL).
FROM api-build AS flower-build
RUN pip install --no-cache-dir "flower==2.2.0"

FROM base AS flower

COPY --from=flower-build /opt/venv /opt/venv

USER 10001:10001
EXPOSE 5555

# /healthcheck answers without authentication.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; r = urllib.request.urlopen('http://127.0.0.1:5555/healthcheck', timeout=4); sys.exit(r.status != 200)"]

CMD ["celery", "flower", "--port=5555"]

# --- worker-build: `.[worker]` with the CPU build of torch in /opt/venv -----------------------------------
FROM base AS worker-build

# PyPI's torch for Linux x86_64 is the CUDA build (multi-GB with its nvidia-* wheels); PyTorch's CPU index
# serves 2.13.0+cpu. A mirror of that index can be given instead (docker-compose.yml passes TORCH_INDEX_URL).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

WORKDIR /build
RUN python -m venv /opt/venv

# 1) torch alone, from the CPU index, at the version pyproject.toml pins (the one the test suite runs): its
#    own dependencies come from that index too, as in PyTorch's install instructions. The exact build
#    installed (torch==2.13.0+cpu) becomes a constraint for step 2, and the build fails here on a CUDA torch.
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==2.13.0" \
    && python -c "import torch; print(f'torch=={torch.__version__}')" > /build/constraints.txt \
    && python -c "import sys, torch; sys.exit(f'torch {torch.__version__} is a CUDA build' if torch.version.cuda else 0)"

# 2) Everything else from PyPI. pyproject.toml's torch==2.13.0 is met by the installed 2.13.0+cpu (a local
#    version label is ignored when matching a pin without one), and the constraint keeps pip from swapping it
#    for PyPI's CUDA build: PyPI has no 2.13.0+cpu, so a resolution that wanted another torch fails instead.
COPY pyproject.toml ./
# hadolint ignore=DL3013
RUN touch README.md \
    && pip install --no-cache-dir --constraint /build/constraints.txt ".[worker]"

COPY README.md ./
COPY qaas ./qaas
COPY app ./app
COPY workers ./workers
RUN pip install --no-cache-dir --no-deps --force-reinstall . \
    && python -c "import sys, torch; print('torch', torch.__version__); sys.exit('CUDA build of torch' if torch.version.cuda else 0)"

# --- worker ------------------------------------------------------------------------------------------------
FROM base AS worker

# The compiler stays in the image on purpose: an x86 job compiles the quantized model with AOTInductor at run
# time, which calls g++ (build-essential brings gcc, g++, libc6-dev and libstdc++'s headers). The Python
# headers it also needs are already in the base image: python:*-slim builds CPython into /usr/local, and its
# `make install` leaves /usr/local/include/python3.11 in place (only tests, *.pyc and libpython*.a are
# deleted), so Debian's python3-dev, which is for /usr/bin/python3, is not wanted.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*

COPY --from=worker-build /opt/venv /opt/venv
COPY migrations ./migrations

# Not root: the runner then runs as this same uid, with no user switch (QAAS_RUNNER_USER applies only to a
# root worker). What protects the worker from its runners in a container: docs/deploy.md.
USER 10001:10001

# Alive and consuming: the worker answers a Celery ping through the broker (app.core.queue imports no torch).
# The node name is Celery's default, celery@<hostname>.
HEALTHCHECK --interval=60s --timeout=20s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import socket, sys; from app.core.queue import get_celery; sys.exit(not get_celery().control.ping(destination=['celery@' + socket.gethostname()], timeout=10))"]

CMD ["qaas", "worker"]
