# The explanation service. CUDA runtime base: on a GPU host (NVIDIA container toolkit,
# `docker run --gpus all`) models run on CUDA; elsewhere the same image runs on the CPU.
# The model store is a volume (read-only is enough): publish models into it, then start.
#
#   docker build -t protopnet-service .
#   docker run --gpus all -p 8000:8000 -v "$PWD/store:/store:ro" protopnet-service
FROM nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

WORKDIR /app
# Dependencies first, in a layer that only pyproject.toml invalidates (torch and its CUDA
# wheels are gigabytes): its [project] dependencies, read with tomllib, installed alone.
COPY pyproject.toml ./
RUN python3 -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt
# Then the code: a change here reinstalls only the project itself.
COPY README.md* ./
COPY protokit ./protokit
COPY protopnet ./protopnet
COPY model_store ./model_store
COPY service ./service
RUN pip install --no-cache-dir --no-deps . \
    && groupadd --gid 10001 app \
    && useradd --create-home --uid 10001 --gid 10001 --shell /usr/sbin/nologin app \
    && mkdir -p /store \
    && chown app /store

USER 10001:10001
ENV PROTOPNET_STORE=/store \
    PROTOPNET_HOST=0.0.0.0 \
    PROTOPNET_PORT=8000 \
    PROTOPNET_DEVICE=auto \
    PROTOPNET_GRACEFUL_SHUTDOWN_S=30
VOLUME ["/store"]
EXPOSE 8000

# Liveness only: /readyz turns 200 once models are loaded and warmed up.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]

# SIGTERM: stop accepting, finish in-flight requests (up to 30 s), unload models.
STOPSIGNAL SIGTERM
CMD ["python", "-m", "service"]
