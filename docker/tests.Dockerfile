# The integration tests, run against the compose file's containerd through the shared
# socket volume (PYCTRD_TEST_ADDRESS).
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}

# ca-certificates: pip downloads the dependencies (all wheels, nothing is compiled).
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        ca-certificates \
        python3 \
        python3-pip \
        python3-venv \
    && rm -rf /var/lib/apt/lists/*

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH

WORKDIR /src

# The package first, so that editing the tests does not reinstall the dependencies.
COPY pyproject.toml README.md LICENSE ./
COPY pyctrd_cache/ pyctrd_cache/
COPY containerd_api/ containerd_api/
# PIP_CERT: a CA bundle to trust for PyPI, for builds behind an intercepting proxy (the
# compose script mounts the host's bundle there); empty means pip's own.
ARG PIP_CERT=""
RUN python3 -m venv /opt/venv \
    && if [ -n "$PIP_CERT" ]; then export PIP_CERT; else unset PIP_CERT; fi \
    && /opt/venv/bin/pip install --only-binary=:all: ".[test]"

COPY tests/ tests/
COPY scripts/ scripts/
COPY docker/run-tests.sh /usr/local/bin/run-tests.sh

ENV PYCTRD_TEST_ADDRESS=/run/containerd/containerd.sock

CMD ["/usr/local/bin/run-tests.sh"]
