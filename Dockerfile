# One image for the three roles: `qaas api` (default CMD), `qaas worker` and `qaas migrate`.
# docker-compose.yml picks the role per service; see DESIGN.md section 7.
#
# Base: the Python patch release and the Debian release (bookworm, like the postgres and redis images in
# docker-compose.yml) are pinned so rebuilds are repeatable. Bump the tag deliberately; pinning the digest too
# (python:3.11.17-slim-bookworm@sha256:...) is the next step once someone can read it from the registry.

# --- base: the Python runtime plus a C toolchain ------------------------------------------------------------
# build-essential stays in the final image on purpose: the worker compiles models at run time (torch's
# AOTInductor calls gcc/g++ and needs the Python headers, which the official python image already ships in
# /usr/local/include). A compiler-free runtime would break the AOTInductor path, not just slow it.
FROM python:3.11.17-slim-bookworm AS base

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

# DL3008 (pin apt versions) is waived: the pinned bookworm base already fixes the Debian release, and exact
# pins would break the build at every Debian security update.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*

# --- builder: a virtualenv at /opt/venv, copied whole into the runtime stage ----------------------------------
# Same path in both stages: the venv's scripts carry absolute shebangs (#!/opt/venv/bin/python).
FROM base AS builder

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /build

# 1) Dependencies first, from pyproject.toml alone, so editing the code does not reinstall torch.
#    Installing the project with no packages in the context yet gives every dependency of `.[worker]` (and
#    an empty `qaas` distribution that step 2 replaces). README.md* is a glob so a missing readme is no error.
#    torch comes from PyTorch's CPU index: the pin in pyproject.toml (torch==2.13.0) matches both the PyPI
#    build (CUDA, multi-GB) and the CPU build 2.13.0+cpu; pip prefers 2.13.0+cpu because a local version label
#    sorts higher, and takes everything else from PyPI through --extra-index-url.
#    The last command fails the build, not the first job, if an index change ever brings back the CUDA build.
#    DL3013 (pin pip versions) is waived: the versions are pyproject.toml's to state, not this file's.
COPY pyproject.toml README.md* ./
# hadolint ignore=DL3013
RUN pip install --no-cache-dir \
        --index-url https://download.pytorch.org/whl/cpu \
        --extra-index-url https://pypi.org/simple \
        ".[worker]" \
    && python -c "import sys, torch; print('torch', torch.__version__); sys.exit('CUDA build of torch' if torch.version.cuda else 0)"

# 2) The code itself: only the packages that setuptools ships, never the whole build context.
COPY qaas ./qaas
COPY app ./app
COPY workers ./workers
RUN pip install --no-cache-dir --no-deps --force-reinstall .

# --- runtime ----------------------------------------------------------------------------------------------
FROM base AS runtime

# uid/gid 10001: outside the range distributions hand out, so it never matches a host account by accident.
# /data is created here, owned by that user, because Docker seeds a new named volume (qaas-data) with the
# ownership of the directory it is mounted over: without this the volume would be root-owned and unwritable.
RUN groupadd --system --gid 10001 qaas \
    && useradd --system --uid 10001 --gid qaas --home-dir /srv/qaas --no-create-home \
        --shell /usr/sbin/nologin qaas \
    && mkdir -p /data /srv/qaas \
    && chown qaas:qaas /data /srv/qaas

COPY --from=builder /opt/venv /opt/venv

ENV PATH=/opt/venv/bin:$PATH \
    QAAS_DATA_DIR=/data

WORKDIR /srv/qaas

# Alembic's environment for `qaas migrate`: the migrations live outside the installed packages.
# alembic.ini* is a glob so the image still builds if Alembic is configured in code instead of by that file;
# pyproject.toml rides along only so the COPY always has one match.
COPY pyproject.toml alembic.ini* ./
COPY migrations ./migrations

USER 10001:10001

EXPOSE 8000

# Liveness only (/healthz); readiness (/readyz: database and broker) is for load balancers, not for restarts.
# python, not curl: slim images have no curl. The worker and migrate services switch this off in compose.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; r = urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4); sys.exit(r.status != 200)"]

CMD ["qaas", "api", "--host", "0.0.0.0", "--port", "8000"]
