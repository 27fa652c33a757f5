# convscope as a team service: gunicorn + the app factory, one worker per device.
#
#   docker build -t convscope .                        # CPU torch from PyTorch's CPU index
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130 \
#                -t convscope:cuda .                   # CUDA torch (run with --gpus all)
#
#   docker run -d --name convscope -p 127.0.0.1:8000:8000 --stop-timeout 40 \
#     -v /srv/runs:/checkpoints:ro -v convscope-data:/data \
#     -e CONVSCOPE_SECRET_KEY=... convscope
#
# See docs/deploying.md. Builds without a registry or PyTorch's index (air-gapped, CI) pass
# BASE_IMAGE, TORCH_INDEX_URL= (empty: use pip's index) and PIP_FIND_LINKS/PIP_CERT pointing at
# mounted local wheels and CA bundle; scripts/container-smoke does exactly that.

ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

# Where torch and torchvision come from. PyTorch's CPU index keeps the image small (~1 GB);
# an empty value means pip's normal index (on Linux that is the multi-GB CUDA build).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
# Optional, only for builds on machines with a private CA or local wheels. Deliberately without
# defaults: pip reads them from the environment, and an unset ARG leaves them unset.
ARG PIP_CERT
ARG PIP_FIND_LINKS

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# A plain Debian base has no Python; python:3.11-slim does. Debian's Python refuses system-wide
# pip installs (PEP 668), so everything goes into a venv on both.
RUN if ! python3 -c "import venv, ensurepip" 2>/dev/null; then \
        apt-get update \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
           python3 python3-venv ca-certificates \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install --upgrade pip setuptools wheel
ENV PATH=/opt/venv/bin:$PATH

# torch first and pinned: an unpinned torch pulled in by another package fetches a second build.
RUN pip install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} \
        "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"

# The other dependencies, from setup.cfg alone, so code (and README) changes do not reinstall them.
WORKDIR /opt/convscope
COPY setup.cfg ./
RUN python -c "import configparser; c = configparser.ConfigParser(); c.read('setup.cfg'); \
print(c['options']['install_requires'])" > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# The code, owned by root and read-only to the service user. Installed editable because the
# app serves templates/, static/ and demo/ from the source tree.
COPY . .
RUN pip install --no-deps -e . \
    && install -m 0755 scripts/container-healthcheck /usr/local/bin/convscope-healthcheck \
    && python -m compileall -q app visualizations model_adapters

# matplotlib's font cache is built here, not on the first request of every new container.
RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/convscope --create-home \
        --shell /usr/sbin/nologin convscope \
    && mkdir -p /checkpoints /datasets /data /var/cache/matplotlib \
    && MPLCONFIGDIR=/var/cache/matplotlib python -c "import matplotlib.font_manager" \
    && chown -R convscope:convscope /data /var/cache/matplotlib
VOLUME ["/data"]

# Production mode: start-up refuses without CONVSCOPE_SECRET_KEY (and refuses debug mode).
# MALLOC_ARENA_MAX=2: the worker's threads share two glibc arenas; with one per thread the heap
# floor rose by 130-140 MB in 2-minute load tests, with two it stayed flat (README, Performance).
# MALLOC_MMAP_THRESHOLD_ (32 MiB, fixed) and MALLOC_TRIM_THRESHOLD_ (4 MiB): the largest batch
# buffers get their own mappings, returned when freed, and the worker trims the heap after each
# step (malloc_trim), so its heap at rest stays flat job after job (446 -> 447 MB over six
# SmoothGrad + faithfulness jobs). A 4 MiB mmap threshold kept it as flat but made the same jobs
# take 1.6x as long (every batch buffer mapped and zeroed anew: 131 s of system time vs 43 s).
ENV CONVSCOPE_ENV=production \
    CONVSCOPE_BIND=0.0.0.0:8000 \
    CONVSCOPE_CHECKPOINT_DIR=/checkpoints \
    CONVSCOPE_DATASET_DIR=/datasets \
    CONVSCOPE_DATA_DIR=/data \
    CONVSCOPE_DEVICE=auto \
    CONVSCOPE_GRACEFUL_TIMEOUT=30 \
    MALLOC_ARENA_MAX=2 \
    MALLOC_MMAP_THRESHOLD_=33554432 \
    MALLOC_TRIM_THRESHOLD_=4194304 \
    MPLCONFIGDIR=/var/cache/matplotlib \
    HOME=/var/lib/convscope

USER convscope
EXPOSE 8000
# gunicorn stops gracefully on SIGTERM within CONVSCOPE_GRACEFUL_TIMEOUT (30 s): give the
# container a longer stop grace (docker run --stop-timeout 40, compose stop_grace_period: 40s).
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["convscope-healthcheck"]
# Logs go to stdout (gunicorn.conf.py). The config also disables the control socket; the flag
# here makes that visible in `docker inspect`.
CMD ["gunicorn", "--config", "/opt/convscope/gunicorn.conf.py", "--no-control-socket"]
