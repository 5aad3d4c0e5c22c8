# syntax=docker/dockerfile:1.7
# A GPU worker (and Flower, same image). torch 2.14.1's CUDA build is cu130 and its wheels bring
# their own CUDA libraries, so the small `base` flavour of nvidia/cuda is enough (it sets the
# NVIDIA container toolkit's variables; the host driver must support CUDA 13.0, i.e. >= 580).
# Ubuntu 22.04 packages Python 3.11 (so does Debian bookworm: CUDA_IMAGE may be a plain Debian base,
# as in scripts/podman_stack.sh). Two stages: g++ (pydensecrf2 has no wheel on PyPI) stays in the
# build stage; the final image gets the finished virtual environment.
# TORCH_INDEX_URL: the index torch and torchvision come from; empty (the default): pip's own index
# (PyPI, or what pip.conf names). docker-compose.yml passes PyTorch's cu130 index; a CPU-only image
# takes its cpu index (see docs/SERVICE.md).
ARG CUDA_IMAGE=nvidia/cuda:13.0.0-base-ubuntu22.04

FROM ${CUDA_IMAGE} AS build
ARG TORCH_INDEX_URL=
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update && apt-get install -y --no-install-recommends python3.11 python3.11-venv python3.11-dev g++ \
    && rm -rf /var/lib/apt/lists/*
RUN python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN pip install --upgrade pip \
    && pip install torch==2.14.1 torchvision==0.29.1 ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
WORKDIR /src
COPY pyproject.toml README.md ./
COPY rib_core ./rib_core
COPY contract ./contract
COPY worker ./worker
RUN pip install '.[worker]'

FROM ${CUDA_IMAGE}
ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 PATH=/opt/venv/bin:$PATH
RUN apt-get update && apt-get install -y --no-install-recommends python3.11 \
    && rm -rf /var/lib/apt/lists/* && useradd --create-home --uid 10001 rib
COPY --from=build /opt/venv /opt/venv
WORKDIR /home/rib
USER rib
CMD ["celery", "-A", "worker.celery_app", "worker", "-Q", "rib.images", "--concurrency", "1", "--prefetch-multiplier", "1", "--loglevel", "INFO"]
