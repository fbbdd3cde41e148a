# syntax=docker/dockerfile:1
#
# One image for both halves of kubellm: `kubellm router` (the default command) and
# `kubellm operator`. The Helm chart (charts/kubellm) runs both from it.
#
#   docker build -t kubellm:0.1.0 .
#   docker run --rm -p 8000:8000 -e KUBELLM_MASTER_KEY=sk-change-me kubellm:0.1.0
#   docker run --rm kubellm:0.1.0 operator --help
#
# tests/test_dockerfile.py checks this recipe without a Docker engine: it runs the builder's and the
# runtime's commands in clean virtual environments and smoke-tests the result.

ARG PYTHON_IMAGE=python:3.11-slim

# ---- builder: the kubellm wheel and a wheel of every dependency (with the [all] extras) ----------
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY kubellm ./kubellm
COPY router ./router
COPY operator ./operator
RUN pip wheel --prefer-binary --wheel-dir /wheels ".[all]"

# ---- runtime: the wheels installed offline, no build tools, no source tree, a non-root user -----
FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="kubellm" \
      org.opencontainers.image.description="Kubernetes-native, OpenAI-compatible LLM router and operator" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/home/kubellm \
    KUBELLM_STATE_DIR=/var/lib/kubellm
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install --no-index --find-links=/wheels "kubellm[all]"
RUN groupadd --system --gid 10001 kubellm \
 && useradd --system --uid 10001 --gid 10001 --home-dir /home/kubellm --create-home \
      --shell /usr/sbin/nologin kubellm \
 && install -d -o 10001 -g 10001 -m 0750 /var/lib/kubellm
# Both commands start, and `import operator` is still the standard library's module.
RUN kubellm --help >/dev/null \
 && kubellm router --help >/dev/null \
 && kubellm operator --help >/dev/null \
 && python -c "import operator, sysconfig, kubellm.operator, kubellm.router; assert operator.__file__.startswith(sysconfig.get_paths()['stdlib']), operator.__file__"
USER 10001:10001
WORKDIR /home/kubellm
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health/liveness', timeout=4)"]
ENTRYPOINT ["kubellm"]
CMD ["router", "--host", "0.0.0.0", "--port", "8000"]
