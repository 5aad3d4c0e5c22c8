# syntax=docker/dockerfile:1.7
# The API: validates, schedules, stores, and exports a job's masks (COCO, Label Studio, VOC: the
# `export` extra). It runs no model and never imports torch (tests/test_architecture.py), so this
# image has neither torch nor torchvision, nor pydensecrf2 (the workers' CRF, built with g++): the
# project is installed without its dependencies, after those the API needs, which
# docker/requirements.py reads from pyproject.toml. BASE_IMAGE: pinned Python 3.11.12 on Debian
# bookworm by default; any Debian-like image works (python3.11 comes from apt where the image has
# none), e.g. the local base scripts/podman_stack.sh makes.
ARG BASE_IMAGE=python:3.11.12-slim-bookworm

FROM ${BASE_IMAGE}
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 DEBIAN_FRONTEND=noninteractive
RUN command -v python3.11 >/dev/null || { apt-get update && apt-get install -y --no-install-recommends \
    python3.11 python3.11-venv && rm -rf /var/lib/apt/lists/*; }
RUN python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md docker/requirements.py ./
RUN python requirements.py api export --without torch torchvision pydensecrf2 > requirements.txt \
    && pip install -r requirements.txt
COPY rib_core ./rib_core
COPY contract ./contract
COPY service ./service
# The check: the app imports, and torch is not there to import.
RUN pip install --no-deps . && cd / && rm -rf /src && python -c "import service.app" \
    && ! python -c "import torch" 2>/dev/null
RUN useradd --create-home --uid 10001 rib
WORKDIR /home/rib
USER rib
EXPOSE 8000
CMD ["uvicorn", "service.main:app", "--host", "0.0.0.0", "--port", "8000"]
