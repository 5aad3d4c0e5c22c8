# syntax=docker/dockerfile:1.7
# The API: validates, schedules, stores, and exports a job's masks (COCO, Label Studio, VOC: the
# `export` extra). It runs no model and never imports torch; the CPU build is installed only because
# the package's dependencies name it. The base image is pinned (Python 3.11.12 on Debian bookworm).
# Two stages: pydensecrf2 has no wheel on PyPI and needs g++, which stays in the build stage; the
# final image gets the finished virtual environment.
FROM python:3.11.12-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update && apt-get install -y --no-install-recommends g++ && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN pip install torch==2.14.1 torchvision==0.29.1 --index-url https://download.pytorch.org/whl/cpu
WORKDIR /src
COPY pyproject.toml README.md ./
COPY rib_core ./rib_core
COPY contract ./contract
COPY service ./service
RUN pip install '.[api,export]'

FROM python:3.11.12-slim-bookworm
ENV PYTHONUNBUFFERED=1 PATH=/opt/venv/bin:$PATH
COPY --from=build /opt/venv /opt/venv
RUN useradd --create-home --uid 10001 rib
WORKDIR /home/rib
USER rib
EXPOSE 8000
CMD ["uvicorn", "service.main:app", "--host", "0.0.0.0", "--port", "8000"]
