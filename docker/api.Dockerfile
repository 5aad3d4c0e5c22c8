# syntax=docker/dockerfile:1
# The API: validates, schedules, stores. It runs no model and never imports torch; the CPU build is
# installed only because the package's dependencies name it. Two stages: pydensecrf2 has no wheel on PyPI and
# needs g++, which stays in the build stage; the final image gets the finished virtual environment.
FROM python:3.11-slim AS build
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
COPY worker ./worker
RUN pip install '.[api]'

FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 PATH=/opt/venv/bin:$PATH
COPY --from=build /opt/venv /opt/venv
RUN useradd --create-home --uid 10001 rib
WORKDIR /home/rib
USER rib
EXPOSE 8000
CMD ["uvicorn", "service.main:app", "--host", "0.0.0.0", "--port", "8000"]
