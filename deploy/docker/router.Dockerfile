# syntax=docker/dockerfile:1
# The router image: `vllm-llmd-router` on python:3.11-slim, without vLLM or torch.
#
#   docker build -f deploy/docker/router.Dockerfile -t vllm-llmd-router:0.1.0 .
#
# Build from the repository root (the context); router.Dockerfile.dockerignore keeps the
# context to the files copied below. tests/test_deploy.py checks every COPY source exists and
# installs router-requirements.txt plus the package into a clean venv.
ARG PYTHON_IMAGE=python:3.11-slim

# ---- build: the vllm-llmd wheel (pure Python; the CUDA sources ship as package data) -------
FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
COPY pyproject.toml setup.cfg README.md ./
COPY vllm_llmd ./vllm_llmd
COPY kernels ./kernels
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# ---- runtime -------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE}
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
COPY deploy/docker/router-requirements.txt /tmp/router-requirements.txt
COPY --from=build /wheels /tmp/wheels
RUN pip install --requirement /tmp/router-requirements.txt \
    && pip install --no-deps /tmp/wheels/*.whl \
    && rm -rf /tmp/wheels /tmp/router-requirements.txt \
    && useradd --create-home --uid 10001 --user-group router
USER 10001:10001
WORKDIR /home/router
# Listen on every interface of the container; the port is the router's default (8000).
ENV VLLM_LLMD_ROUTER_HOST=0.0.0.0
EXPOSE 8000
# /health answers 200 once a decode-capable pod is healthy, 503 before.
HEALTHCHECK --interval=10s --timeout=3s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('VLLM_LLMD_ROUTER_PORT', '8000'), timeout=2)"]
ENTRYPOINT ["vllm-llmd-router"]
